"""``nn.Embedding``: the input is a one-hot vector, so A is diagonal (token frequencies).

The weight ``[V, D]`` has gradient Σₜ e_{iₜ} δₜᵀ; natgrad's gradient matrix is its transpose
X = Σₜ δₜ e_{iₜ}ᵀ, ``[D, V]``, so that G (``[D, D]``) acts on the left and the diagonal A
(``[V]``, stored as a vector) on the right, as for Linear.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from natgrad.layers.base import KroneckerHandler

__all__ = ["EmbeddingHandler"]


class EmbeddingHandler(KroneckerHandler):
    """Embedding(V, D) with index inputs ``[N, ...]``; A = diag(token counts / (N·T))."""

    module: nn.Embedding
    diagonal_input = True

    def input_rows(self, inputs: Tensor) -> Tensor:
        """Token indices of every sample and position, ``[N·T]`` (the one-hot rows' support)."""
        return inputs.reshape(-1)

    def positions(self, inputs: Tensor) -> tuple[int, ...]:
        return tuple(inputs.shape)

    def input_counts(self, inputs: Tensor, dtype: torch.dtype) -> Tensor:
        """Σ āāᵀ's diagonal: how often each token occurs, ``[V]``."""
        return torch.bincount(inputs.reshape(-1), minlength=self.module.num_embeddings).to(dtype)

    def grad_rows(self, grad_outputs: Tensor) -> Tensor:
        return grad_outputs.reshape(-1, grad_outputs.shape[-1])

    def gather(self, grads: dict[Tensor, Tensor]) -> Tensor:
        return grads[self.module.weight].T

    def scatter(self, matrix: Tensor) -> dict[Tensor, Tensor]:
        return {self.module.weight: matrix.T}

    def per_sample_grads(self, inputs: Tensor, grad_outputs: Tensor) -> Tensor:
        n, vocab = inputs.shape[0], self.module.num_embeddings
        deltas = self.grad_rows(grad_outputs)
        sample = torch.arange(n, device=inputs.device).repeat_interleave(deltas.shape[0] // n)
        out = deltas.new_zeros(n * vocab, deltas.shape[1])
        out.index_add_(0, sample * vocab + inputs.reshape(-1), deltas)  # Σₜ e_{iₜ} δₜᵀ
        return out.reshape(n, vocab, -1).transpose(1, 2)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if module.sparse:
            return "sparse=True (sparse gradients)"
        return None if module.weight.requires_grad else "its weight is frozen"
