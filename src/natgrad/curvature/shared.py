"""One curvature block for a weight that two Kronecker layers use (a tied embedding and head).

GPT-2 ties its input embedding to its output head: one matrix W, ``[V, D]``, is looked up by
``nn.Embedding(V, D)`` and multiplied by ``nn.Linear(D, V)``. Its gradient is the sum of the
two uses' gradients. Leaving out the cross terms between the uses (as K-FAC leaves out those
between layers), its Fisher block is the sum of the uses' Kronecker products, each written in
W's own orientation, left factor on the V side and right factor on the D side:

    F ≈ L₁ ⊗ R₁ + L₂ ⊗ R₂,
    embedding: L = diag(token frequencies) (its A), R = its G  (its gradient matrix is Wᵀ);
    head:      L = its G,                    R = its A       (its gradient matrix is W).

The damped sum is inverted exactly, as Martens & Grosse (2015, appendix) invert a sum of two
Kronecker products: with the first use π-damped, L₁' = L₁ + π√λ I and R₁' = R₁ + √λ/π I,

    (L₁'⊗R₁' + L₂⊗R₂)⁻¹ X = M_L [(M_Lᵀ X M_R) / (1 + l rᵀ)] M_Rᵀ,

where L₁'^{-1/2} L₂ L₁'^{-1/2} = Q diag(l) Qᵀ, R₁'^{-1/2} R₂ R₁'^{-1/2} = U diag(r) Uᵀ,
M_L = L₁'^{-1/2} Q and M_R = R₁'^{-1/2} U. A layer applied twice is one layer (one block over
all its calls); sharing patterns other than two Kronecker layers of one weight fall back to
the diagonal Fisher.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from natgrad.curvature.kfac import FactorSums, ema, pi_damping
from natgrad.layers.base import KroneckerHandler, LayerHandler

__all__ = ["SharedBlock", "SharedHandler", "shared_orientation"]


def shared_orientation(use: KroneckerHandler, param: Tensor) -> bool | None:
    """Whether ``use``'s gradient matrix is ``param`` transposed (True), ``param`` itself
    (False), or neither (None: the use has other parameters, e.g. a bias)."""
    if [id(p) for p in use.params] != [id(param)] or param.dim() != 2:
        return None
    marker = torch.arange(param.numel(), dtype=torch.float64).reshape(param.shape)
    matrix = use.gather({param: marker})
    if matrix.shape == marker.shape and torch.equal(matrix, marker):
        return False
    if matrix.shape == marker.T.shape and torch.equal(matrix, marker.T):
        return True
    return None


class SharedHandler(LayerHandler):
    """The uses of one weight: ``uses`` maps module names to their Kronecker handlers."""

    def __init__(self, param: Tensor, uses: dict[str, KroneckerHandler]) -> None:
        super().__init__(next(iter(uses.values())).module)
        self.param = param
        self.uses = uses
        self.transposed = {name: shared_orientation(h, param) for name, h in uses.items()}

    @property
    def params(self) -> list[Tensor]:
        return [self.param]

    def gather(self, grads: dict[Tensor, Tensor]) -> Tensor:
        return grads[self.param]

    def scatter(self, tensor: Tensor) -> dict[Tensor, Tensor]:
        return {self.param: tensor}


def _root_inverse(matrix: Tensor) -> Tensor:
    """M^{-1/2} of a symmetric positive-definite ``matrix`` (``[d]``: a diagonal)."""
    if matrix.dim() == 1:
        return torch.diag(matrix.rsqrt())
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    return (eigvecs * eigvals.clamp_min(torch.finfo(matrix.dtype).tiny).rsqrt()) @ eigvecs.T


def _eye_like(matrix: Tensor) -> Tensor:
    return torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)


class SharedBlock:
    """The block of a weight with two Kronecker uses (see module doc); its tensors live in
    ``state``: ``input_cov.i``/``grad_cov.i`` per use i and, after a refresh,
    ``shared_left`` (M_L), ``shared_right`` (M_R) and ``shared_scale`` (1 + l rᵀ)."""

    def __init__(self, handler: SharedHandler, state: dict[str, Any]) -> None:
        self.handler = handler
        self.state = state

    def update(self, sums: list[FactorSums], decay: float) -> None:
        """Fold one step's statistics of each use into its moving averages."""
        for i, part in enumerate(sums):
            if part.samples:
                for key, value in ((f"input_cov.{i}", part.input_factor()),
                                   (f"grad_cov.{i}", part.grad_factor())):
                    self.state[key] = ema(self.state.get(key), value, decay)

    @property
    def ready(self) -> bool:
        return all(f"grad_cov.{i}" in self.state for i in range(len(self.handler.uses)))

    def factors(self) -> list[tuple[Tensor, Tensor]]:
        """(L, R) of each use in the weight's own orientation (L may be a diagonal ``[V]``)."""
        pairs = []
        for i, transposed in enumerate(self.handler.transposed.values()):
            A, G = self.state[f"input_cov.{i}"], self.state[f"grad_cov.{i}"]
            pairs.append((A, G) if transposed else (G, A))
        return pairs

    def refresh(self, damping: float, method: str, dtype: torch.dtype) -> None:
        """Recompute the exact inverse of the π-damped sum of the uses' Kronecker products
        (in float64, eigendecompositions; ``method`` does not apply)."""
        (left1, right1), (left2, right2) = [(a.double(), b.double()) for a, b in self.factors()]
        damping_left, damping_right = pi_damping(left1, right1, damping)
        left1 = left1 + damping_left if left1.dim() == 1 else left1 + damping_left * _eye_like(
            left1)
        right1 = right1 + damping_right * _eye_like(right1)
        left2 = torch.diag(left2) if left2.dim() == 1 else left2
        root_left, root_right = _root_inverse(left1), _root_inverse(right1)
        l, q = torch.linalg.eigh(root_left @ left2 @ root_left)
        r, u = torch.linalg.eigh(root_right @ right2 @ root_right)
        self.state["shared_left"] = (root_left @ q).to(dtype)
        self.state["shared_right"] = (root_right @ u).to(dtype)
        self.state["shared_scale"] = (1 + torch.outer(l.clamp_min(0), r.clamp_min(0))).to(dtype)

    @property
    def refreshed(self) -> bool:
        return "shared_scale" in self.state

    def precondition(self, matrix: Tensor, damping: float = 0.0) -> Tensor:
        """X ↦ (L₁'⊗R₁' + L₂⊗R₂)⁻¹ X for X shaped like the weight (damping of the refresh)."""
        left, right = self.state["shared_left"], self.state["shared_right"]
        projected = left.T @ matrix.to(left.dtype) @ right
        return (left @ (projected / self.state["shared_scale"]) @ right.T).to(matrix.dtype)

    def quadratic(self, matrix: Tensor) -> Tensor:
        """vᵀ (Σ L⊗R) v = Σ tr(Xᵀ L X R) with the undamped factors."""
        total = matrix.new_zeros((), dtype=torch.float64)
        for left, right in self.factors():
            v = matrix.to(right.dtype)
            lv = left.unsqueeze(1) * v if left.dim() == 1 else left @ v
            total = total + (lv * (v @ right)).sum().double()
        return total
