"""Exact natural gradient: Δθ = −lr (F + damping·I)⁻¹ ∇J with F from the current batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad._checks import check_choice
from natgrad.curvature.batch import StepBatch
from natgrad.curvature.dense import fisher_rows
from natgrad.curvature.model import FisherKind, FunctionalModel, check_kind, flatten, unflatten
from natgrad.curvature.tangents import supports_trace
from natgrad.layers.capture import LayerCapture
from natgrad.likelihoods import Likelihood
from natgrad.losses import resolve_loss
from natgrad.optim.base import CurvatureOptimizer

__all__ = ["ExactPreconditioner", "NaturalGradient", "damped_solve"]

SOLVERS = ("auto", "cholesky", "woodbury")


def damped_solve(rows: Tensor, damping: Tensor, grad: Tensor, solver: str = "auto") -> Tensor:
    """Solve (Uᵀ U + diag(d)) x = g for x.

    Args:
        rows: U, ``[M, P]`` (the Fisher is F = Uᵀ U).
        damping: d, ``[P]``, positive.
        grad: g, ``[P]``.
        solver: ``"cholesky"`` factors the P×P matrix (O(P³)); ``"woodbury"`` factors the M×M
            matrix I + U D⁻¹ Uᵀ (O(M²P + M³)); ``"auto"`` takes Woodbury when M < P.

    Returns:
        x, ``[P]``.
    """
    m, p = rows.shape
    if solver == "auto":
        solver = "woodbury" if m < p else "cholesky"
    if solver == "cholesky":
        matrix = rows.T @ rows
        matrix.diagonal().add_(damping)
        return _spd_solve(matrix, grad)
    # Woodbury: (D + UᵀU)⁻¹ = D⁻¹ − D⁻¹Uᵀ (I + U D⁻¹ Uᵀ)⁻¹ U D⁻¹
    scaled = rows / damping  # U D⁻¹
    inner = scaled @ rows.T
    inner.diagonal().add_(1.0)
    dinv_g = grad / damping
    return dinv_g - scaled.T @ _spd_solve(inner, rows @ dinv_g)


def _spd_solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """Cholesky solve of a symmetric positive-definite system; eigh if Cholesky fails."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    # numerically indefinite (round-off): solve on the positive eigen-space
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    floor = eigvals.abs().max() * torch.finfo(matrix.dtype).eps * matrix.shape[0]
    inv = torch.where(eigvals > floor, 1.0 / eigvals.clamp_min(floor), 0.0)
    return eigvecs @ (inv * (eigvecs.T @ rhs))


class NaturalGradient(CurvatureOptimizer):
    """Exact natural-gradient descent for models of up to ~10⁴ parameters.

    Δθ = −lr (F + damping·I)⁻¹ ∇J, with F the Fisher of the loss's likelihood on the batch of the
    last forward (several forwards with gradient accumulation), computed at ``step()`` from
    per-sample Jacobians. With momentum μ: buf ← μ buf + Δ, θ ← θ − lr buf.

    The solve factors the P×P damped Fisher (Cholesky) or, when N·R < P (N samples, R rows
    per sample: the number of outputs for ``kind="true"``), the (N·R)×(N·R) system of the
    Woodbury identity; ``solver`` overrides the choice. Each param group may set its own
    ``lr``, ``damping``, ``momentum`` and ``weight_decay`` (damping becomes a diagonal).

    J and F are on the canonical scale of :mod:`natgrad.losses` (the batch mean of each
    example's negative log-likelihood), whatever the reduction of ``loss``.

    Args:
        model: the module being trained; its forward must take Tensor arguments batched
            along dimension 0, and its samples must not interact.
        params: parameters or param groups (default: all trainable parameters of ``model``).
        lr: learning rate, > 0, or ``"auto"`` (chosen on the quadratic model each step;
            a number in ``param_groups`` then multiplies it, for LR schedulers).
        damping: Tikhonov damping added to F, > 0, or ``"auto"`` (Levenberg–Marquardt).
        momentum: heavy-ball momentum in [0, 1), or ``"auto"`` (quadratic model).
        weight_decay: L2 penalty (added to the gradient, so it is preconditioned too).
        loss: the training loop's torch loss module (see :class:`natgrad.KFAC`).
        likelihood: instead of ``loss``: ``"categorical"``, ``"gaussian"``, ``"bernoulli"``
            or a Likelihood (the loss the batch-mean NLL); neither: ``"categorical"``.
        kind: ``"true"`` (exact expectation), ``"mc"`` (sampled labels) or ``"empirical"``
            (not available here: the optimizer never sees the targets).
        mc_samples: labels per input for ``kind="mc"``.
        solver: ``"auto"``, ``"cholesky"`` or ``"woodbury"``.
        output_fn: maps the model's output to the likelihood's parameters.
        seed: seeds the label sampling of ``kind="mc"`` (its RNG state is in ``state_dict``).
        lm_every: steps between Levenberg–Marquardt adjustments (``damping="auto"``).
        initial_damping, min_damping: start and floor of ``damping="auto"``. The exact
            batch Fisher has rank ≤ N·C: with less damping than ~0.1 the step fits the
            batch (ρ ≈ 1 on it) and fails on the next one, so both are higher than K-FAC's.
        curvature_rows: rows of the batch for the quadratic model's Fisher terms (see
            :class:`natgrad.KFAC`).
        grad_scaler: as in :class:`natgrad.KFAC` (fp16 with ``scaler.unscale_``).

    Example:
        >>> opt = natgrad.NaturalGradient(model, lr=0.5, damping=1e-3, loss=nn.CrossEntropyLoss())
        >>> opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

    References:
        Amari, Natural gradient works efficiently in learning, 1998.
        Martens, New insights and perspectives on the natural gradient method, 2020.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        *,
        lr: float | str = 1.0,
        damping: float | str = 1e-1,
        momentum: float | str = 0.0,
        weight_decay: float = 0.0,
        loss: nn.Module | None = None,
        likelihood: str | Likelihood | None = None,
        kind: str = "true",
        mc_samples: int = 1,
        solver: str = "auto",
        output_fn: Callable[[Any], Tensor] | None = None,
        seed: int = 0,
        lm_every: int = 1,
        initial_damping: float = 1.0,
        min_damping: float = 0.1,
        curvature_rows: int | str | None = "auto",
        grad_scaler: Any = None,
    ) -> None:
        spec = resolve_loss(likelihood, loss)
        if kind == FisherKind.EMPIRICAL.value:
            raise ValueError(
                "kind='empirical' needs the targets, which an optimizer does not see; use "
                "kind='true' or 'mc' (or natgrad.fisher_matrix(..., kind='empirical'))"
            )
        self.kind = check_kind(kind, None, mc_samples)
        self.mc_samples = mc_samples
        self.solver = check_choice("solver", solver, SOLVERS)
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(
            model, params, defaults, spec, output_fn, lm_every, min_damping,
            initial_damping, curvature_rows=curvature_rows, seed=seed, grad_scaler=grad_scaler,
        )
        self.preconditioner = ExactPreconditioner(self, solver, self.kind, mc_samples)
        self._attach(LayerCapture(
            self.model, {}, output_fn, trace=self.auto.enabled and supports_trace(self.model)
        ))


class ExactPreconditioner:
    """Δ = (F + D)⁻¹ ∇J with F the exact Fisher of the step's batch (rows U, F = UᵀU) and D
    each parameter's damping; no state is kept between steps."""

    def __init__(
        self, opt: CurvatureOptimizer, solver: str, kind: FisherKind, mc_samples: int
    ) -> None:
        self.opt = opt
        self.solver, self.kind, self.mc_samples = solver, kind, mc_samples
        self._rows: Tensor | None = None

    def update(self, batch: StepBatch, grads: dict[Tensor, Tensor], step: int) -> bool:
        if not batch:
            raise RuntimeError(
                "NaturalGradient.step() needs the Fisher of the current batch, but no forward of "
                "the model was backpropagated since the last step"
            )
        opt = self.opt
        fmodel = FunctionalModel(opt.model, opt.output_fn, list(grads), batch.layout)
        with opt._capture.paused():
            rows, _ = fisher_rows(
                fmodel, opt.loss_spec, batch.inputs(), self.kind, None, self.mc_samples,
                opt._generator, valid=batch.valid_rows(),
            )
        self._rows = rows
        return bool(torch.isfinite(rows).all())

    def apply(self, grads: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        params = list(grads)
        damping = torch.cat([
            p.new_full((p.numel(),), self.opt.damping_of_param(p)) for p in params
        ])
        direction = damped_solve(self._rows, damping, flatten([grads[p] for p in params]),
                                 self.solver)
        return dict(zip(params, unflatten(direction, params), strict=True))

    def commit(self) -> None:
        self._rows = None

    def discard(self) -> None:
        self._rows = None

    def rebind(self, state: Any) -> None:
        """No state of its own."""
