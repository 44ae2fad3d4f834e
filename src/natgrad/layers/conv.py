"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` after Grosse & Martens 2016 (KFC): ā = unfolded
input patches, δ per output location.

With T output locations per sample (L_out, H_out·W_out or D_out·H_out·W_out), A = (1/(N·T)) Σ āāᵀ
over samples and locations and G = (1/N) Σ δδᵀ (summed over locations, averaged over samples),
so G ⊗ A carries the factor T of the spatially-homogeneous, spatially-uncorrelated
approximation; with one location (T = 1) it is the exact Kronecker factorisation of a
per-sample Fisher. The gradient matrix is W reshaped to ``[C_out, C_in·k₁·…]`` (row-major, as
the weight is stored) with the bias as a last column. Grouped convolutions use the fallback.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.layers.base import KroneckerHandler

__all__ = ["CONV_TYPES", "ConvHandler"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _patches(inputs: Tensor, conv: nn.Module) -> Tensor:
    """Input patches ``[N·T, C_in·k₁·…]`` of a convolution, in the weight's layout."""
    # pad exactly as the layer does (string paddings and non-zero modes included)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(inputs, conv._reversed_padding_repeated_twice, mode=mode)
    if padded.dim() == 4:  # 2-d: F.unfold is the fast path
        patches = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    # 1-d and 3-d: a sliding window per spatial dimension, then every patch as a row
    dims = padded.dim() - 2
    windows = padded
    for axis, (size, step, dilation) in enumerate(
        zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)
    ):
        span = dilation * (size - 1) + 1
        windows = windows.unfold(2 + axis, span, step)
        if dilation > 1:
            windows = windows[..., ::dilation]
    # [N, C, T₁, …, T_d, k₁, …, k_d] -> [N, T₁, …, T_d, C, k₁, …, k_d]
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    windows = windows.permute(order)
    columns = padded.shape[1] * math.prod(conv.kernel_size)
    return windows.reshape(-1, columns)


class ConvHandler(KroneckerHandler):
    """Conv1d/2d/3d with groups=1; X = [∇W reshaped to ``[C_out, C_in·k₁·…]`` | ∇b]."""

    module: nn.Conv1d | nn.Conv2d | nn.Conv3d

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None and self.module.bias.requires_grad

    def input_rows(self, inputs: Tensor) -> Tensor:
        rows = _patches(inputs, self.module)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def grad_rows(self, grad_outputs: Tensor) -> Tensor:
        # [N, C_out, T₁, …] -> [N·T, C_out]
        return grad_outputs.movedim(1, -1).reshape(-1, grad_outputs.shape[1])

    def gather(self, grads: dict[Tensor, Tensor]) -> Tensor:
        weight = grads[self.module.weight].reshape(self.module.out_channels, -1)
        if not self.has_bias:
            return weight
        return torch.cat([weight, grads[self.module.bias].unsqueeze(1)], dim=1)

    def scatter(self, matrix: Tensor) -> dict[Tensor, Tensor]:
        weight = self.module.weight
        if not self.has_bias:
            return {weight: matrix.reshape(weight.shape)}
        return {weight: matrix[:, :-1].reshape(weight.shape), self.module.bias: matrix[:, -1]}

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (grouped convolutions have no single Kronecker block)"
        return None if module.weight.requires_grad else "its weight is frozen"
