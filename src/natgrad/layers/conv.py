"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` after Grosse & Martens 2016 (KFC): ā = unfolded
input patches, δ per output location.

With T output locations per sample (L_out, H_out·W_out or D_out·H_out·W_out), A = (1/(N·T)) Σ āāᵀ
over samples and locations and G = (1/N) Σ δδᵀ (summed over locations, averaged over samples),
so G ⊗ A carries the factor T of the spatially-homogeneous, spatially-uncorrelated
approximation; with one location (T = 1) it is the exact Kronecker factorisation of a
per-sample Fisher. The gradient matrix is W reshaped to ``[C_out, C_in·k₁·…]`` (row-major, as
the weight is stored) with the bias as a last column.

A grouped convolution (``groups`` = g, depthwise when g = C_in) is g independent convolutions,
each from C_in/g input to C_out/g output channels: its block is block-diagonal with one
Kronecker product per group. Its rows carry the group axis (``[N·T, g, d]``) and its gradient
matrix is ``[g, C_out/g, C_in/g·k₁·… (+1)]``; the factors are batched over groups.

A transposed convolution (``nn.ConvTranspose1d/2d/3d``) is a stride-1 convolution of its input
spread out by the stride (stride − 1 zeros between neighbours) and padded to the output's size
(dilation·(k − 1) − padding on the left, the rest, output padding included, on the right), with
the kernel flipped and its channel axes swapped, W'[o, i, k] = W[i, o, k_max − k]. Its block is
that convolution's: ā are patches of the spread input (:meth:`ConvTransposeHandler.call_input`
records the spread input, sized from the call's output, so ``output_size`` calls work too), the
gradient matrix is ∇W' (``[C_out, C_in/g·k₁·…]``, bias last). The spread input costs stride^d ×
the input's memory while a statistics step's calls are kept.

Σ āāᵀ of an ungrouped convolution is formed without the rows (:meth:`ConvHandler.input_sum`):
``F.unfold``, its transpose to rows and a column of ones cost three copies of the N·T·C_in·k
patches; one strided copy in a layout whose runs are contiguous, one matmul and the patches'
sum for the bias entries cost less (digits-cnn: the A of its three layers 3.7 -> 2.7 ms per
statistics step, CPU time in training). EKFAC's rows in A's eigenbasis are a
convolution with the eigenvectors as kernels (:meth:`ConvHandler.projected_input_rows`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.layers.base import KroneckerHandler

__all__ = ["CONV_TRANSPOSE_TYPES", "CONV_TYPES", "ConvHandler", "ConvTransposeHandler"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CHANNELS_LAST = 8  # from this many input channels Σ āāᵀ cuts its patches channels-last


def _padded(inputs: Tensor, conv: nn.Module) -> Tensor:
    """``inputs`` padded exactly as the layer pads them (string paddings and non-zero modes
    included)."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(inputs, conv._reversed_padding_repeated_twice, mode=mode)


def _patches(inputs: Tensor, conv: nn.Module) -> Tensor:
    """Input patches ``[N·T, C_in·k₁·…]`` of a convolution, in the weight's layout."""
    padded = _padded(inputs, conv)
    if padded.dim() == 4:  # 2-d: F.unfold is the fast path
        patches = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    # 1-d and 3-d: a sliding window per spatial dimension, then every patch as a row
    dims = padded.dim() - 2
    windows = _windows(padded, conv, 2)
    # [N, C, T₁, …, T_d, k₁, …, k_d] -> [N, T₁, …, T_d, C, k₁, …, k_d]
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    windows = windows.permute(order)
    columns = padded.shape[1] * math.prod(conv.kernel_size)
    return windows.reshape(-1, columns)


def _windows(padded: Tensor, conv: nn.Module, first: int) -> Tensor:
    """Every patch of ``padded`` as a view: the spatial dimensions from ``first`` on become
    ``[T₁, …, T_d]`` and the kernel offsets ``[k₁, …, k_d]`` are appended last."""
    windows = padded
    for axis, (size, step, dilation) in enumerate(
        zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)
    ):
        span = dilation * (size - 1) + 1
        windows = windows.unfold(first + axis, span, step)
        if dilation > 1:
            windows = windows[..., ::dilation]
    return windows


def _input_sum(
    inputs: Tensor, conv: nn.Module, dtype: torch.dtype, bias: bool
) -> tuple[Tensor, int]:
    """Σ āāᵀ over every patch (``[C_in·k₁·… (+1), ·]``, weight layout, bias entry last) and
    the number of patches, from one strided copy of the patches and one matmul.

    With few channels the copy is a ``[C_in·k, N·T]`` matrix (runs along the output rows);
    with many, the input goes channels-last and the copy is ``[N·T, k·C_in]`` (runs of
    C_in), whose sum is permuted back to the weight's channel-outer layout. The bias entries
    are the patches' sum and their count, not a column of ones.
    """
    padded = _padded(inputs.to(dtype), conv)
    dims, channels = padded.dim() - 2, padded.shape[1]
    kernel = math.prod(conv.kernel_size)
    size = channels * kernel
    if channels < _CHANNELS_LAST:  # [N, C, T…, k…] -> [C, k…, N, T…]
        windows = _windows(padded, conv, 2)
        order = [1, *range(2 + dims, 2 + 2 * dims), 0, *range(2, 2 + dims)]
        columns = windows.permute(order).reshape(size, -1)
        weight_part, patch_sum, count = columns @ columns.T, columns.sum(1), columns.shape[1]
    else:  # [N, T…, C, k…] -> [N, T…, k…, C], then (k, C) -> (C, k) in the sum
        windows = _windows(padded.movedim(1, -1).contiguous(), conv, 1)
        order = [*range(1 + dims), *range(2 + dims, 2 + 2 * dims), 1 + dims]
        rows = windows.permute(order).reshape(-1, size)
        swap = (rows.T @ rows).reshape(kernel, channels, kernel, channels)
        weight_part = swap.permute(1, 0, 3, 2).reshape(size, size)
        patch_sum, count = rows.sum(0).reshape(kernel, channels).T.reshape(-1), rows.shape[0]
    return _with_bias(weight_part, patch_sum, count) if bias else weight_part, count


def _with_bias(weight_part: Tensor, patch_sum: Tensor, count: int) -> Tensor:
    """Σ āāᵀ with the bias entry last, from the weight's part, the patches' sum and count."""
    size = weight_part.shape[0]
    total = weight_part.new_empty(size + 1, size + 1)
    total[:size, :size] = weight_part
    total[:size, size] = patch_sum
    total[size, :size] = patch_sum
    total[size, size] = count
    return total


@dataclass(frozen=True)
class _Unpadded:
    """The patch geometry of a stride-1 convolution without padding (what :func:`_patches`
    and :func:`_input_sum` read of a layer): a transposed convolution's view."""

    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def stride(self) -> tuple[int, ...]:
        return (1,) * len(self.kernel_size)

    padding_mode = "zeros"

    @property
    def _reversed_padding_repeated_twice(self) -> tuple[int, ...]:
        return (0,) * (2 * len(self.kernel_size))


class ConvHandler(KroneckerHandler):
    """Conv1d/2d/3d; X = [∇W reshaped to ``[C_out, C_in·k₁·…]`` | ∇b], with a leading group
    axis ``[g, C_out/g, …]`` when ``groups`` = g > 1."""

    module: nn.Conv1d | nn.Conv2d | nn.Conv3d

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None and self.module.bias.requires_grad

    @property
    def groups(self) -> int:
        return self.module.groups

    @property
    def geometry(self) -> nn.Module | _Unpadded:
        """Whose kernel, stride, dilation and padding cut the recorded input into patches."""
        return self.module

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The weight as a convolution's, ``[C_out, C_in/g, k₁, …]``."""
        return tuple(self.module.weight.shape)

    def _convolve(self, inputs: Tensor, kernels: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's convolution of ``inputs`` with other kernels (``[d, C_in, k₁, …]``)."""
        return self.module._conv_forward(inputs, kernels, bias)

    def input_rows(self, inputs: Tensor) -> Tensor:
        rows = _patches(inputs, self.geometry)  # [N·T, C_in·k] with channels outermost
        if self.groups > 1:
            rows = rows.reshape(rows.shape[0], self.groups, -1)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
        return rows

    def input_sum(self, inputs: Tensor, dtype: torch.dtype) -> tuple[Tensor, int] | None:
        if self.groups > 1:
            return None
        return _input_sum(inputs, self.geometry, dtype, self.has_bias)

    def projected_input_rows(self, inputs: Tensor, basis: Tensor) -> Tensor:
        if self.groups > 1:
            return super().projected_input_rows(inputs, basis)
        # āᵀ Q at every location is the convolution of the input with Q's columns as kernels
        # (the bias row of Q as their bias): no patches
        width = math.prod(self.kernel_shape[1:])
        kernels = basis[:width].T.reshape(basis.shape[1], *self.kernel_shape[1:])
        bias = basis[width] if self.has_bias else None
        out = self._convolve(inputs.to(basis.dtype), kernels, bias)
        return out.movedim(1, -1).reshape(-1, basis.shape[1])

    def grad_rows(self, grad_outputs: Tensor) -> Tensor:
        # [N, C_out, T₁, …] -> [N·T, C_out] (grouped: [N·T, g, C_out/g]), as the transpose
        # of a [C_out, N·T] copy: its runs along T are contiguous, a channels-last copy's aren't
        channels = grad_outputs.shape[1]
        rows = grad_outputs.transpose(0, 1).reshape(channels, -1).T
        return rows if self.groups == 1 else rows.reshape(rows.shape[0], self.groups, -1)

    def _as_matrix(self, weight: Tensor) -> Tensor:
        """A weight-shaped tensor as the gradient matrix's weight part, ``[C_out, C_in/g·k…]``."""
        return weight.reshape(self.module.out_channels, -1)

    def _as_weight(self, part: Tensor) -> Tensor:
        """Inverse of :meth:`_as_matrix`."""
        return part.reshape(self.module.weight.shape)

    def gather(self, grads: dict[Tensor, Tensor]) -> Tensor:
        weight = self._as_matrix(grads[self.module.weight])
        if self.has_bias:
            weight = torch.cat([weight, grads[self.module.bias].unsqueeze(1)], dim=1)
        return weight if self.groups == 1 else weight.reshape(self.groups, -1, weight.shape[1])

    def scatter(self, matrix: Tensor) -> dict[Tensor, Tensor]:
        weight = self.module.weight
        matrix = matrix.reshape(self.module.out_channels, -1)
        if not self.has_bias:
            return {weight: self._as_weight(matrix)}
        return {weight: self._as_weight(matrix[:, :-1]), self.module.bias: matrix[:, -1]}

    def per_sample_grads(self, inputs: Tensor, grad_outputs: Tensor) -> Tensor:
        if self.groups == 1:
            return super().per_sample_grads(inputs, grad_outputs)
        n = inputs.shape[0]
        rows_in = self.input_rows(inputs)
        rows_in = rows_in.reshape(n, -1, self.groups, rows_in.shape[-1])
        rows_out = self.grad_rows(grad_outputs).reshape(n, -1, self.groups,
                                                        self.module.out_channels // self.groups)
        return torch.einsum("ntgo,ntgi->ngoi", rows_out, rows_in)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        return None if module.weight.requires_grad else "its weight is frozen"


class ConvTransposeHandler(ConvHandler):
    """ConvTranspose1d/2d/3d as the stride-1 convolution of its spread input (module doc):
    X = [∇W' reshaped to ``[C_out, C_in/g·k₁·…]`` | ∇b], grouped as :class:`ConvHandler`."""

    module: nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d

    @property
    def geometry(self) -> _Unpadded:
        return _Unpadded(tuple(self.module.kernel_size), tuple(self.module.dilation))

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        m = self.module
        return (m.out_channels, m.in_channels // m.groups, *m.kernel_size)

    def _convolve(self, inputs: Tensor, kernels: Tensor, bias: Tensor | None) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[inputs.dim() - 3]
        return conv(inputs, kernels, bias, 1, 0, self.module.dilation)

    def call_input(self, inputs: Tensor, output: Tensor) -> Tensor:
        """The input spread by the stride and padded so that its stride-1 patches are the
        output's positions, ``[N, C_in, L₁', …]``."""
        m = self.module
        dims = inputs.dim() - 2
        spread = inputs
        if any(step > 1 for step in m.stride):
            sizes = [(n - 1) * step + 1 for n, step in zip(inputs.shape[2:], m.stride,
                                                           strict=True)]
            spread = inputs.new_zeros(*inputs.shape[:2], *sizes)
            spread[(slice(None), slice(None), *(slice(None, None, t) for t in m.stride))] = inputs
        pads: list[int] = []
        for axis in reversed(range(dims)):  # F.pad: the last dimension first
            reach, left = self._reach(axis), self._left(axis)
            pads += [left, output.shape[2 + axis] + reach - left - spread.shape[2 + axis]]
        return F.pad(spread, pads)

    def _reach(self, axis: int) -> int:
        """dilation·(k − 1) along spatial ``axis``: the kernel's span less one."""
        return self.module.dilation[axis] * (self.module.kernel_size[axis] - 1)

    def _left(self, axis: int) -> int:
        """The spread input's padding on the left of ``axis`` (negative: cropped)."""
        return self._reach(axis) - self.module.padding[axis]

    def input_sum(self, inputs: Tensor, dtype: torch.dtype) -> tuple[Tensor, int] | None:
        if self.groups > 1:
            return None
        if all(step == 1 for step in self.module.stride):
            return _input_sum(inputs, self.geometry, dtype, self.has_bias)
        return self._phase_input_sum(inputs, dtype)

    def _phase_input_sum(self, spread: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
        """Σ āāᵀ over the patches of the spread input without its zeros: the output positions
        of one phase (their index modulo the stride) read the input only through the kernel
        taps j with (phase + j·dilation − left) ≡ 0 modulo the stride, so each phase is a
        dense sum over its positions and taps, added into A at those taps' entries (about
        stride^d times fewer products and copies than the patches)."""
        m = self.module
        dims, channels = spread.dim() - 2, spread.shape[1]
        windows = _windows(spread.to(dtype), self.geometry, 2)  # [N, C, T…, k…], a view
        size = channels * math.prod(m.kernel_size)
        columns = torch.arange(size, device=spread.device).view(channels, *m.kernel_size)
        weight_part = spread.new_zeros(size, size, dtype=dtype)
        patch_sum = spread.new_zeros(size, dtype=dtype)
        order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
        for phase in itertools.product(*(range(step) for step in m.stride)):
            taps = [
                torch.tensor([j for j in range(k) if (f + j * d - self._left(axis)) % s == 0],
                             dtype=torch.long, device=spread.device)
                for axis, (f, k, d, s) in enumerate(zip(phase, m.kernel_size, m.dilation,
                                                        m.stride, strict=True))
            ]
            if any(t.numel() == 0 for t in taps):  # its positions read only zeros
                continue
            part = windows[(slice(None), slice(None),
                            *(slice(f, None, s) for f, s in zip(phase, m.stride, strict=True)))]
            cols = columns
            for axis, t in enumerate(taps):
                part = part.index_select(2 + dims + axis, t)
                cols = cols.index_select(1 + axis, t)
            rows = part.permute(order).reshape(-1, cols.numel())
            cols = cols.reshape(-1)
            weight_part[cols.unsqueeze(1), cols] += rows.T @ rows
            patch_sum[cols] += rows.sum(0)
        count = spread.shape[0] * math.prod(windows.shape[2:2 + dims])  # every position
        return (_with_bias(weight_part, patch_sum, count) if self.has_bias else weight_part,
                count)

    def _as_matrix(self, weight: Tensor) -> Tensor:
        """∇W ``[C_in, C_out/g, k…]`` → ∇W' ``[C_out, C_in/g·k…]`` (flipped, axes swapped)."""
        g, k = self.groups, self.module.kernel_size
        spatial = tuple(range(3, 3 + len(k)))
        view = weight.reshape(g, weight.shape[0] // g, weight.shape[1], *k).transpose(1, 2)
        return view.flip(spatial).reshape(self.module.out_channels, -1)

    def _as_weight(self, part: Tensor) -> Tensor:
        m, g = self.module, self.groups
        spatial = tuple(range(3, 3 + len(m.kernel_size)))
        view = part.reshape(g, m.out_channels // g, m.in_channels // g, *m.kernel_size)
        return view.flip(spatial).transpose(1, 2).reshape(m.weight.shape)
