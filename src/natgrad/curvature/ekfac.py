"""EKFAC: K-FAC's eigenbasis with a diagonal rescaling fitted to the per-sample gradients.

With A = Q_A diag(a) Q_Aᵀ and G = Q_G diag(g) Q_Gᵀ, K-FAC's block is (Q_G ⊗ Q_A) diag(g ⊗ a)
(Q_G ⊗ Q_A)ᵀ. EKFAC keeps the eigenbasis and replaces g ⊗ a by the exact second moments of
the per-sample gradients in that basis,

    s = (1/N) Σₙ E_y[(Q_Gᵀ Xₙ Q_A)²]   (elementwise square, ``[d_out, d_in]``),

which is the diagonal of the true Fisher block in the eigenbasis, so EKFAC's error is never
larger than K-FAC's in Frobenius norm. Preconditioning: X ↦ Q_G ((Q_Gᵀ X Q_A) / (s + λ)) Q_Aᵀ.
For a diagonal input factor (Embedding) Q_A = I and is not stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.curvature.kfac import KroneckerBlock, ema
from natgrad.layers.base import KroneckerHandler
from natgrad.layers.capture import Call

__all__ = ["EigenBlock", "scaling_sum", "stable_eigh"]


def _project(matrices: Tensor, eigvecs_out: Tensor, eigvecs_in: Tensor | None) -> Tensor:
    """Q_Gᵀ X Q_A for a matrix X."""
    out = eigvecs_out.T @ matrices
    return out if eigvecs_in is None else out @ eigvecs_in


def stable_eigh(matrix: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of a symmetric ``matrix`` in ``dtype``.

    float32 LAPACK can return NaN for a factor with many exactly equal eigenvalues (input
    pixels that are zero in every sample: MNIST's borders), or fail to converge; the
    decomposition is then redone in float64.
    """
    try:
        eigvals, eigvecs = torch.linalg.eigh(matrix.to(dtype))
        if bool(torch.isfinite(eigvecs.sum())) and bool(torch.isfinite(eigvals.sum())):
            return eigvals, eigvecs
    except torch.linalg.LinAlgError:
        pass
    eigvals, eigvecs = torch.linalg.eigh(matrix.double())
    return eigvals.to(dtype), eigvecs.to(dtype)


def _per_sample(rows: list[Tensor], n: int) -> Tensor:
    """Each call's ``[N·T, d]`` rows as ``[N, T, d]``, the calls' positions joined."""
    parts = [r.reshape(n, -1, r.shape[1]) for r in rows]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def scaling_sum(
    handler: KroneckerHandler,
    calls: list[Call],
    weights: list[float],
    eigvecs_out: Tensor,
    eigvecs_in: Tensor | None,
) -> Tensor:
    """Σₙ Σ_draws w (Q_Gᵀ Xₙ Q_A)² over one forward's samples, ``[d_out, d_in]``.

    Xₙ = Σ over positions and calls of δ āᵀ is one sample's gradient matrix. The rows are
    projected onto the eigenbases first; with one position per sample the squared projected
    gradient factorises, (Q_Gᵀδ)² ((Q_Aᵀā)²)ᵀ, and the sum over samples is one matmul.
    """
    dtype = eigvecs_out.dtype
    total = None
    for j, weight in enumerate(weights):
        if eigvecs_in is None:  # diagonal input factor: the gradient matrix is sparse
            per_sample = sum(handler.per_sample_grads(c.inputs, c.grads[j]) for c in calls)
            part = (eigvecs_out.T @ per_sample.to(dtype)).square().sum(0)
        else:
            n = calls[0].grads[j].shape[0]
            rows_out = [handler.grad_rows(c.grads[j]).to(dtype) @ eigvecs_out for c in calls]
            rows_in = [handler.projected_input_rows(c.inputs, eigvecs_in) for c in calls]
            if len(calls) == 1 and rows_out[0].shape[0] == n:
                part = rows_out[0].square().T @ rows_in[0].square()
            else:
                out, inp = _per_sample(rows_out, n), _per_sample(rows_in, n)
                part = (out.transpose(1, 2) @ inp).square().sum(0)
        part = part * weight
        total = part if total is None else total + part
    return total


class EigenBlock(KroneckerBlock):
    """The EKFAC block of one layer. Extra state: ``eigvecs_in``, ``eigvecs_out``,
    ``scaling`` (EMA of s)."""

    def refresh(self, damping: float, method: str, dtype: torch.dtype) -> None:
        """Recompute the eigenbasis; restart the scaling from K-FAC's eigenvalues g ⊗ a."""
        A, G = self.state["input_cov"], self.state["grad_cov"]
        eigvals_out, eigvecs_out = stable_eigh(G, dtype)
        if A.dim() == 1:
            eigvals_in, eigvecs_in = A.to(dtype), None
        else:
            eigvals_in, eigvecs_in = stable_eigh(A, dtype)
        self.state["eigvecs_out"], self.state["eigvecs_in"] = eigvecs_out, eigvecs_in
        self.state["scaling"] = torch.outer(eigvals_out.clamp_min(0), eigvals_in.clamp_min(0))

    @property
    def refreshed(self) -> bool:
        return "scaling" in self.state

    def update_scaling(self, total: Tensor, samples: int, decay: float) -> None:
        self.state["scaling"] = ema(self.state.get("scaling"), total / samples, decay)

    def precondition(self, matrix: Tensor, damping: float = 0.0) -> Tensor:
        eigvecs_out, eigvecs_in = self.state["eigvecs_out"], self.state["eigvecs_in"]
        projected = _project(matrix.to(eigvecs_out.dtype), eigvecs_out, eigvecs_in)
        scaled = projected / (self.state["scaling"] + damping)
        out = eigvecs_out @ scaled
        out = out if eigvecs_in is None else out @ eigvecs_in.T
        return out.to(matrix.dtype)

    def quadratic(self, matrix: Tensor) -> Tensor:
        eigvecs_out, eigvecs_in = self.state["eigvecs_out"], self.state["eigvecs_in"]
        projected = _project(matrix.to(eigvecs_out.dtype), eigvecs_out, eigvecs_in)
        return (projected.square() * self.state["scaling"]).sum()

