"""``nn.Linear``: ā = [a; 1] for every leading position, δ = ∂/∂(output) at that position."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from natgrad.layers.base import KroneckerHandler

__all__ = ["LinearHandler"]


class LinearHandler(KroneckerHandler):
    """Linear(d_in, d_out) with inputs ``[N, ..., d_in]``; X = [∇W | ∇b], ``[d_out, d_in+1]``."""

    module: nn.Linear

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias

    @property
    def params(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]

    @property
    def has_bias(self) -> bool:
        return self.bias is not None and self.bias.requires_grad

    def input_rows(self, inputs: Tensor) -> Tensor:
        rows = inputs.reshape(-1, inputs.shape[-1])
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def positions(self, inputs: Tensor) -> tuple[int, ...]:
        return tuple(inputs.shape[:-1])

    def grad_rows(self, grad_outputs: Tensor) -> Tensor:
        return grad_outputs.reshape(-1, grad_outputs.shape[-1])

    def gather(self, grads: dict[Tensor, Tensor]) -> Tensor:
        weight = grads[self.weight]
        if not self.has_bias:
            return weight
        return torch.cat([weight, grads[self.bias].unsqueeze(1)], dim=1)

    def scatter(self, matrix: Tensor) -> dict[Tensor, Tensor]:
        if not self.has_bias:
            return {self.weight: matrix}
        return {self.weight: matrix[:, :-1], self.bias: matrix[:, -1]}

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        return None if module.weight.requires_grad else "its weight is frozen"
