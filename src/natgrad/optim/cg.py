"""NGDCG: matrix-free natural gradient, (F + λI) Δ = ∇J solved by truncated CG.

:class:`NGDCG` is a :class:`natgrad.optim.base.CurvatureOptimizer` whose preconditioner is
:class:`ConjugateGradientSolve`; that holds its own inner preconditioner for CG (K-FAC's
blocks, the diagonal Fisher, or none), a :class:`natgrad.optim.kronecker.KroneckerPreconditioner`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad._checks import check_choice, check_positive, check_positive_int
from natgrad.curvature.batch import StepBatch
from natgrad.curvature.kfac import KroneckerBlock
from natgrad.curvature.model import FunctionalModel, flatten
from natgrad.curvature.products import conjugate_gradient, fisher_operator
from natgrad.curvature.tangents import supports_trace
from natgrad.distributed.comm import mean_operator
from natgrad.layers.capture import LayerCapture
from natgrad.likelihoods import Likelihood
from natgrad.losses import resolve_loss
from natgrad.optim.base import CurvatureOptimizer
from natgrad.optim.kronecker import (
    KroneckerPreconditioner,
    check_statistics,
    kronecker_curvature,
)

__all__ = ["NGDCG", "ConjugateGradientSolve"]

PRECONDITIONERS = ("kfac", "diagonal", "none")


class ConjugateGradientSolve:
    """Δ = (F + λI)⁻¹ ∇J by truncated CG on the batch's exact Fisher, matrix-free.

    ``inner`` preconditions CG (None: plain CG). Warm-started from the last taken step's
    solution (``state[p]["cg_solution"]``); a discarded step keeps the previous one.
    """

    def __init__(
        self, opt: CurvatureOptimizer, inner: KroneckerPreconditioner | None,
        max_iters: int, tol: float,
    ) -> None:
        self.opt = opt
        self.inner = inner
        self.max_iters, self.tol = max_iters, tol
        self._batch: StepBatch | None = None
        self._pending: tuple[dict[Tensor, Tensor], int, float] | None = None

    def update(self, batch: StepBatch, grads: dict[Tensor, Tensor], step: int) -> bool:
        if self.inner is not None and not self.inner.update(batch, grads, step):
            return False
        if not batch:
            raise RuntimeError(
                "NGDCG.step() needs the Fisher of the current batch, but no forward of the "
                "model was backpropagated since the last step"
            )
        self._batch = batch
        return True

    def apply(self, grads: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        opt, batch = self.opt, self._batch
        params = list(grads)
        fmodel = FunctionalModel(opt.model, opt.output_fn, params, batch.layout,
                                 values=opt._sharding.whole(params))  # θ whole (FSDP2)
        first = opt.param_groups[0]
        shift = opt.damping_of(first)
        if first.get("weight_decay") and not first.get("decoupled_weight_decay"):
            shift += first["weight_decay"]
        with opt._own_forwards(params):
            inputs = batch.inputs()
            fisher = fisher_operator(
                fmodel, inputs, opt.loss_spec, frozen_buffers=True, valid=batch.valid_rows()
            )
            # data parallel: F v of the ranks' batches together (one all-reduce per product)
            fisher = mean_operator(opt.communicator, fisher, inputs[0].shape[0])

            def matvec(v: Tensor) -> Tensor:  # (F + λI) v
                return fisher(v) + shift * v

            def precondition(r: Tensor) -> Tensor:  # r -> M⁻¹ r
                directions = self.inner.apply(dict(zip(params, fmodel.unflatten(r), strict=True)))
                return flatten([directions[p] for p in params])

            previous = [opt.state[p].get("cg_solution") for p in params]
            initial = flatten(previous) if all(x is not None for x in previous) else None
            solution, iters, residual = conjugate_gradient(
                matvec, flatten([grads[p] for p in params]), initial, self.max_iters,
                self.tol, None if self.inner is None else precondition,
            )
        directions = dict(zip(params, fmodel.unflatten(solution), strict=True))
        self._pending = (directions, iters, residual)
        return directions

    def commit(self) -> None:
        if self.inner is not None:
            self.inner.commit()
        if self._pending is not None:
            directions, iters, residual = self._pending
            for p, d in directions.items():
                self.opt.state[p]["cg_solution"] = d.detach().clone()
            self.opt.global_state.update(cg_iters=iters, cg_residual=residual)
        self._batch, self._pending = None, None

    def discard(self) -> None:
        if self.inner is not None:
            self.inner.discard()
        self._batch, self._pending = None, None

    def rebind(self, state: Any) -> None:
        if self.inner is not None:
            self.inner.rebind(state)


class NGDCG(CurvatureOptimizer):
    """Matrix-free natural gradient (Martens 2010, with the Fisher in place of the Hessian).

    Each step solves (F + λI) Δ = ∇J by truncated conjugate gradient, with F the exact
    Fisher of the current batch applied matrix-free (one forward-mode and one reverse-mode
    pass per iteration, the reverse graph built once per step), warm-started from the
    previous step's solution, stopped after ``cg_max_iters`` iterations or at relative
    residual ``cg_tol``. The CG is preconditioned by K-FAC (``preconditioner="kfac"``), by
    the diagonal Fisher (``"diagonal"``, estimated from sampled-label gradients) or not at
    all (``"none"``). By default lr, momentum and damping are automatic (quadratic model and
    Levenberg–Marquardt, see :mod:`natgrad.optim.control`). Data parallel as
    :class:`natgrad.KFAC`, and each Fisher-vector product of CG is averaged over the ranks'
    batches (one all-reduce per CG iteration), so every rank solves the same system.

    Args:
        model, params, loss, likelihood, kind, mc_samples, stat_every, inv_every,
        curvature_warmup, stat_decay,
        factor_dtype, inverse_dtype, exclude, output_fn, seed, weight_decay,
        decoupled_weight_decay, inverse_method, inverse_placement, process_group,
        curvature_rows, kfac_approx, grad_scaler, max_factor_size: as in
        :class:`natgrad.KFAC` (statistics serve the preconditioner only).
        lm_every, min_damping, initial_damping: Levenberg–Marquardt settings (defaults 1,
            0.1 and 1.0: the exact batch Fisher has rank ≤ N·C, and with less damping the
            step fits the batch and fails on the next, as for NaturalGradient).
        lr, momentum, damping: numbers or ``"auto"`` (the default for all three).
        cg_max_iters: CG iteration cap per step.
        cg_tol: CG relative-residual tolerance.
        preconditioner: ``"kfac"``, ``"diagonal"`` or ``"none"``.

    Example:
        >>> opt = natgrad.NGDCG(model, loss=nn.CrossEntropyLoss())
        >>> opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

    References:
        Martens, Deep learning via Hessian-free optimization, 2010.
        Martens & Sutskever, Training deep and recurrent networks with Hessian-free
        optimization, 2012.
    """

    data_parallel = True
    fully_sharded = True

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        *,
        lr: float | str = "auto",
        damping: float | str = "auto",
        momentum: float | str = "auto",
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        loss: nn.Module | None = None,
        likelihood: str | Likelihood | None = None,
        kind: str = "mc",
        mc_samples: int = 1,
        cg_max_iters: int = 10,
        cg_tol: float = 1e-3,
        preconditioner: str = "kfac",
        stat_every: int = 5,
        inv_every: int = 10,
        curvature_warmup: int = 20,
        stat_decay: float = 0.95,
        inverse_method: str = "cholesky",
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype | None = None,
        exclude: Iterable[str | type] = (),
        output_fn: Callable[[Any], Tensor] | None = None,
        seed: int = 0,
        lm_every: int = 1,
        min_damping: float = 0.1,
        initial_damping: float = 1.0,
        inverse_placement: str = "auto",
        process_group: Any = None,
        curvature_rows: int | str | None = "auto",
        kfac_approx: str = "expand",
        grad_scaler: Any = None,
        max_factor_size: int | None = 8192,
    ) -> None:
        spec = resolve_loss(likelihood, loss)
        if max_factor_size is not None:
            check_positive_int("max_factor_size", max_factor_size)
        check_positive_int("cg_max_iters", cg_max_iters)
        check_positive("cg_tol", cg_tol)
        preconditioner = check_choice("preconditioner", preconditioner, PRECONDITIONERS)
        kind, inverse_method, placement = check_statistics(
            kind, mc_samples, stat_every, inv_every, stat_decay, inverse_method, factor_dtype,
            inverse_dtype, inverse_placement, kfac_approx, curvature_warmup,
        )
        defaults = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(
            model, params, defaults, spec, output_fn, lm_every, min_damping,
            initial_damping, process_group, curvature_rows, seed, grad_scaler,
        )
        self.cg_max_iters, self.cg_tol = cg_max_iters, cg_tol
        inner = None
        if preconditioner == "none":
            self._attach(LayerCapture(
                self.model, {}, output_fn, trace=self.auto.enabled and supports_trace(self.model)
            ))
        else:
            self.stat_every = stat_every
            self.curvature_warmup = curvature_warmup
            inner = kronecker_curvature(
                self, exclude=exclude, block_type=KroneckerBlock, kind=kind,
                mc_samples=mc_samples, stat_decay=stat_decay, inv_every=inv_every,
                inverse_method=inverse_method, factor_dtype=factor_dtype,
                inverse_dtype=inverse_dtype, placement=placement, kfac_approx=kfac_approx,
                fallback_effect="are preconditioned in CG by the diagonal Fisher instead",
                diagonal_only=preconditioner == "diagonal", max_factor_size=max_factor_size,
                warmup=curvature_warmup,
            )
        self.preconditioner = ConjugateGradientSolve(self, inner, cg_max_iters, cg_tol)
