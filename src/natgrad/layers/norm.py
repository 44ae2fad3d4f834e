"""Affine parameters of BatchNorm / LayerNorm / GroupNorm / RMSNorm: an exact dense block.

The layer computes y = x̂ ⊙ γ + β with x̂ the normalised input, so the per-sample gradients
are ∂/∂γ = Σ_positions δ ⊙ x̂ and ∂/∂β = Σ_positions δ. x̂ is recomputed from the captured
input with the layer's own statistics (batch statistics in training mode); for RMSNorm
x̂ = x / √(mean(x²) + ε) over the normalised shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from natgrad.layers.base import DenseHandler

__all__ = ["NormHandler", "NORM_TYPES"]

NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


class NormHandler(DenseHandler):
    """BatchNorm{1,2,3}d, LayerNorm, GroupNorm, RMSNorm with affine parameters."""

    @property
    def normalized_shape(self) -> tuple[int, ...] | None:
        """The trailing shape a LayerNorm/RMSNorm normalises over (None: channels at dim 1)."""
        if isinstance(self.module, (nn.LayerNorm, nn.RMSNorm)):
            return tuple(self.module.normalized_shape)
        return None

    def _normalised(self, inputs: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(inputs, m.normalized_shape, eps=m.eps)
        if isinstance(m, nn.RMSNorm):
            return F.rms_norm(inputs, m.normalized_shape, eps=m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(inputs, m.num_groups, eps=m.eps)
        use_batch = m.training or m.running_mean is None
        return F.batch_norm(
            inputs,
            None if use_batch else m.running_mean,
            None if use_batch else m.running_var,
            training=use_batch,
            eps=m.eps,
        )

    def _reduce(self, values: Tensor) -> Tensor:
        """Sum over positions that share a parameter, ``[N, d]``."""
        shape = self.normalized_shape
        if shape is not None:
            return values.reshape(values.shape[0], -1, *shape).sum(1).reshape(values.shape[0], -1)
        return values.reshape(values.shape[0], values.shape[1], -1).sum(2)  # channels at dim 1

    def per_sample_grads(self, inputs: Tensor, grad_outputs: Tensor) -> Tensor:
        parts = []
        if self.module.weight is not None and self.module.weight.requires_grad:
            parts.append(self._reduce(grad_outputs * self._normalised(inputs)))
        bias = getattr(self.module, "bias", None)
        if bias is not None and bias.requires_grad:
            parts.append(self._reduce(grad_outputs))
        return torch.cat(parts, dim=1)

    def gather(self, grads: dict[Tensor, Tensor]) -> Tensor:
        return torch.cat([grads[p].reshape(-1) for p in self.params])

    def scatter(self, vector: Tensor) -> dict[Tensor, Tensor]:
        pieces = vector.split([p.numel() for p in self.params])
        return {p: v.view_as(p) for p, v in zip(self.params, pieces, strict=True)}

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        has = [p for p in (module.weight, getattr(module, "bias", None))
               if p is not None and p.requires_grad]
        return None if has else "it has no trainable affine parameters"
