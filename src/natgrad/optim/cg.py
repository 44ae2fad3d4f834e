"""NGDCG: matrix-free natural gradient, (F + λI) Δ = ∇J solved by truncated CG."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from natgrad.curvature.batch import StepBatch
from natgrad.curvature.model import FunctionalModel, flatten
from natgrad.curvature.products import conjugate_gradient, fisher_operator
from natgrad.curvature.tangents import supports_trace
from natgrad.distributed.comm import mean_operator
from natgrad.layers.capture import LayerCapture
from natgrad.likelihoods import Likelihood
from natgrad.optim.base import check_choice, check_positive
from natgrad.optim.kfac import KFAC

__all__ = ["NGDCG"]

PRECONDITIONERS = ("kfac", "diagonal", "none")


class NGDCG(KFAC):
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
        model, params, loss, likelihood, kind, mc_samples, stat_every, inv_every, stat_decay,
        factor_dtype, inverse_dtype, exclude, output_fn, seed, weight_decay,
        decoupled_weight_decay, inverse_placement, process_group: as in
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

    _fallback_effect = "are preconditioned in CG by the diagonal Fisher instead"

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        *,
        lr: float | str = "auto",
        damping: float | str = "auto",
        momentum: float | str = "auto",
        loss: nn.Module | None = None,
        likelihood: str | Likelihood | None = None,
        cg_max_iters: int = 10,
        cg_tol: float = 1e-3,
        preconditioner: str = "kfac",
        stat_every: int = 5,
        inv_every: int = 10,
        **kwargs: Any,
    ) -> None:
        if isinstance(cg_max_iters, bool) or not isinstance(cg_max_iters, int) or cg_max_iters < 1:
            raise ValueError(f"cg_max_iters must be a positive int, got {cg_max_iters!r}")
        check_positive("cg_tol", cg_tol)
        self.preconditioner = check_choice("preconditioner", preconditioner, PRECONDITIONERS)
        self.cg_max_iters, self.cg_tol = cg_max_iters, cg_tol
        kwargs.setdefault("kl_clip", None)
        # the exact batch Fisher, as in NaturalGradient: more damping than K-FAC's EMA needs
        kwargs.setdefault("initial_damping", 1.0)
        kwargs.setdefault("min_damping", 0.1)
        kwargs.setdefault("lm_every", 1)
        super().__init__(
            model, params, lr=lr, damping=damping, momentum=momentum, loss=loss,
            likelihood=likelihood,
            stat_every=stat_every, inv_every=inv_every, **kwargs,
        )

    def _setup_layers(
        self, model: nn.Module, exclude: Iterable[str | type], output_fn: Callable | None
    ) -> None:
        if self.preconditioner == "kfac":
            super()._setup_layers(model, exclude, output_fn)
            return
        self.blocks = {}
        self.excluded = set()
        diagonal = self.preconditioner == "diagonal"
        self.fallback = [p for g in self.param_groups for p in g["params"]] if diagonal else []
        self._capture = self._attach(LayerCapture(
            model, {}, output_fn, on_backward=self._label_sampler(),
            trace=self.auto.enabled and supports_trace(model),
        ))

    def _sync_capture(self) -> None:
        super()._sync_capture()
        if self.preconditioner == "none":
            self._capture.active = False

    def _precondition(
        self, grads: dict[Tensor, Tensor], batch: StepBatch
    ) -> dict[Tensor, Tensor] | None:
        if not self._update_curvature(grads, batch):
            return None
        if not batch:
            raise RuntimeError(
                "NGDCG.step() needs the Fisher of the current batch, but no forward of the "
                "model was backpropagated since the last step"
            )
        params = list(grads)
        fmodel = FunctionalModel(self.model, self.output_fn, params)
        first = self.param_groups[0]
        shift = self.damping_of(first)
        if first.get("weight_decay") and not first.get("decoupled_weight_decay"):
            shift += first["weight_decay"]
        with self._capture.paused():
            inputs = batch.inputs()
            fisher = fisher_operator(
                fmodel, inputs, self.loss_spec, frozen_buffers=True, valid=batch.valid_rows()
            )
            # data parallel: F v of the ranks' batches together (one all-reduce per product)
            fisher = mean_operator(self._comm, fisher, inputs[0].shape[0])

            def matvec(v: Tensor) -> Tensor:  # (F + λI) v
                return fisher(v) + shift * v

            def precondition(r: Tensor) -> Tensor:  # r -> M⁻¹ r
                directions = self._kfac_directions(
                    dict(zip(params, fmodel.unflatten(r), strict=True))
                )
                return flatten([directions[p] for p in params])

            previous = [self.state[p].get("cg_solution") for p in params]
            initial = flatten(previous) if all(x is not None for x in previous) else None
            solution, iters, residual = conjugate_gradient(
                matvec, flatten([grads[p] for p in params]), initial, self.cg_max_iters,
                self.cg_tol, None if self.preconditioner == "none" else precondition,
            )
        self.global_state.update(cg_iters=iters, cg_residual=residual)
        directions = dict(zip(params, fmodel.unflatten(solution), strict=True))
        for p, d in directions.items():
            self.state[p]["cg_solution"] = d.detach().clone()
        return directions

