"""``nn.Conv2d`` after Grosse & Martens 2016 (KFC): ā = unfolded input patches, δ per location.

With T = H_out·W_out locations per sample, A = (1/(N·T)) Σ āāᵀ over samples and locations
and G = (1/N) Σ δδᵀ (summed over locations, averaged over samples), so G ⊗ A carries the
factor T of the spatially-homogeneous, spatially-uncorrelated approximation; with one
location (T = 1) it is the exact Kronecker factorisation of a per-sample Fisher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.layers.base import KroneckerHandler

__all__ = ["Conv2dHandler"]


class Conv2dHandler(KroneckerHandler):
    """Conv2d; X = [∇W reshaped to ``[C_out, C_in·kh·kw]`` | ∇b]."""

    module: nn.Conv2d

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None and self.module.bias.requires_grad

    def input_rows(self, inputs: Tensor) -> Tensor:
        conv = self.module
        # pad exactly as the layer does (string paddings and non-zero modes included)
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        padded = F.pad(inputs, conv._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # [N·T, C_in·kh·kw]
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def grad_rows(self, grad_outputs: Tensor) -> Tensor:
        return grad_outputs.permute(0, 2, 3, 1).reshape(-1, grad_outputs.shape[1])

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
