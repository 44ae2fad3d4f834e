"""Shared bookkeeping of natgrad's optimizers: the torch.optim contract, fault handling, update.

:class:`CurvatureOptimizer` owns everything that does not depend on the curvature model:
hyper-parameter validation, param groups that must belong to the model, ``step(closure)``,
skipping (and counting) steps whose loss, gradient or curvature is not finite, weight decay,
momentum and the learning rate. Subclasses implement one hook, :meth:`_precondition`, which
maps the gradients to update directions.

Every step works on the canonical objective J of :mod:`natgrad.losses`: the forwards since
the last step are taken from the capture as a :class:`natgrad.curvature.batch.StepBatch`,
the accumulated gradient is divided by its ``grad_scale`` (∇J, whatever the loss's
reduction, token mean or accumulation), and the quadratic model and ρ use its masks and
recovered targets. Weight decay is a penalty on J.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from natgrad.curvature.batch import StepBatch
from natgrad.curvature.model import FunctionalModel, swapped_tensors
from natgrad.distributed.comm import Communicator, unwrap_model
from natgrad.layers.capture import LayerCapture
from natgrad.likelihoods import Likelihood
from natgrad.losses import LossSpec
from natgrad.optim.control import (
    AutoSettings,
    QuadraticControl,
    backtrack_fraction,
    check_rows,
    lm_update,
)

__all__ = ["CurvatureOptimizer", "check_positive", "check_nonnegative", "check_choice"]

GLOBAL = "natgrad"  # key of the optimizer-wide entry in ``self.state``


def check_positive(name: str, value: Any, allow: Sequence[str] = ()) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (or one of ``allow``)."""
    if isinstance(value, str) and value in allow:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        extra = f" or one of {list(allow)}" if allow else ""
        raise ValueError(f"{name} must be a finite number > 0{extra}, got {value!r}")


def check_nonnegative(name: str, value: Any, upper: float | None = None) -> None:
    """Raise ValueError unless ``value`` is a finite number ≥ 0 (and < ``upper`` if given)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and value >= 0 and (upper is None or value < upper)
    if not ok:
        bound = f" and < {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be a number >= 0{bound}, got {value!r}")


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Raise ValueError unless ``value`` is one of ``allowed``; returns it as a plain str."""
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return str(value)


AUTO = "auto"
INITIAL_DAMPING = 1e-2  # Levenberg-Marquardt's starting λ (PERFORMANCE.md: lower diverged)


def _check_hyper(group: dict[str, Any]) -> None:
    check_positive("lr", group["lr"])
    check_nonnegative("momentum", group.get("momentum", 0.0), upper=1.0)
    check_nonnegative("weight_decay", group.get("weight_decay", 0.0))
    if "damping" in group:
        check_positive("damping", group["damping"])


def _is_finite(value: Tensor | float | None) -> bool:
    if value is None:
        return True
    if isinstance(value, Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(float(value))


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """True if every entry of every tensor is finite (one device sync per dtype/device)."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t is not None and t.is_floating_point():
            groups.setdefault((t.dtype, t.device), []).append(t)
    # a norm is NaN or inf when some entry is (or, harmlessly, when it overflows)
    return all(
        bool(torch.stack(torch._foreach_norm(ts, 2)).isfinite().all())
        for ts in groups.values()
    )


class CurvatureOptimizer(Optimizer):
    """Base class of natgrad's optimizers (see module docstring).

    Subclasses call ``super().__init__`` with the model, the user's ``params`` (or None for
    all of the model's trainable parameters) and the defaults, then implement
    :meth:`_precondition`. A ``DistributedDataParallel`` model is unwrapped. Subclasses that
    keep ranks in lockstep under data parallelism set :attr:`data_parallel`; their quadratic
    model then averages its batch terms over the ranks of ``process_group``.
    """

    data_parallel = False  # communicates through self._comm so that ranks stay identical

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        defaults: dict[str, Any],
        loss_spec: LossSpec,
        output_fn: Callable[[Any], Tensor] | None = None,
        lm_every: int = 1,
        min_damping: float = 1e-5,
        initial_damping: float = INITIAL_DAMPING,
        process_group: Any = None,
        curvature_rows: int | str | None = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        defaults = dict(defaults)
        self.auto = AutoSettings(
            lr=defaults["lr"] == AUTO,
            momentum=defaults.get("momentum") == AUTO,
            damping=defaults.get("damping") == AUTO,
            lm_every=lm_every,
            min_damping=min_damping,
            rows=check_rows(curvature_rows),
        )
        if self.auto.lr:
            defaults["lr"] = 1.0  # a multiplier on the automatic step, for LR schedulers
        if self.auto.momentum:
            defaults["momentum"] = 0.0
        check_positive("initial_damping", initial_damping)
        if self.auto.damping:
            defaults["damping"] = initial_damping
        self._initial_damping = initial_damping
        _check_hyper(defaults)
        if isinstance(lm_every, bool) or not isinstance(lm_every, int) or lm_every < 1:
            raise ValueError(f"lm_every must be a positive int, got {lm_every!r}")
        check_positive("min_damping", min_damping)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        model_params = {id(p) for p in model.parameters()}
        for group in self.param_groups:
            if any(id(p) not in model_params for p in group["params"]):
                raise ValueError("params must be parameters of model")
        self.model = unwrap_model(model)
        self.loss_spec = loss_spec
        self.output_fn = output_fn
        self._comm = Communicator(process_group)
        self._control = QuadraticControl(self.auto, self._comm if self.data_parallel else None)
        self._capture: LayerCapture  # set by subclasses: what they need to see of forwards
        self._warned: set[str] = set()
        if self._comm.active and not self.data_parallel:
            self._warn_once(
                "data_parallel",
                f"{type(self).__name__} preconditions with this process's batch only: under "
                "DistributedDataParallel the ranks' parameters drift apart (KFAC, EKFAC and "
                "NGDCG support data parallelism)",
            )

    def _attach(self, capture: LayerCapture) -> LayerCapture:
        """The optimizer's hooks on the model: they hold no reference to the optimizer and
        are removed when it is garbage-collected (a replaced optimizer leaves no hooks)."""
        weakref.finalize(self, capture.remove)
        return capture

    @property
    def likelihood(self) -> Likelihood:
        """The predictive distribution p(y | f) of the loss."""
        return self.loss_spec.likelihood

    @property
    def communicator(self) -> Communicator:
        """The data-parallel communicator (its ``bytes`` and ``calls`` count the traffic)."""
        return self._comm

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_hyper(self.param_groups[-1])

    def damping_of(self, group: dict[str, Any]) -> float:
        """The damping λ in force for ``group`` (the adaptive one if ``damping="auto"``)."""
        if self.auto.damping:
            return self.global_state.setdefault("damping", self._initial_damping)
        return group["damping"]

    # --- state ----------------------------------------------------------------------------
    @property
    def global_state(self) -> dict[str, Any]:
        """Optimizer-wide state (counters, RNG, ...); saved by ``state_dict()``."""
        state = self.state[GLOBAL]
        if not state:
            state.update(step=0, skipped_steps=0)
        return state

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _skip(self, reason: str) -> None:
        self.global_state["skipped_steps"] += 1
        self._warn_once(
            "skip",
            f"{type(self).__name__}: skipped a step because the {reason} is not finite; "
            "parameters and optimizer state are unchanged (counted in "
            "state['natgrad']['skipped_steps'])",
        )

    # --- the step -------------------------------------------------------------------------
    def _params_with_grad(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update; ``closure`` re-evaluates the model and returns the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params_with_grad()
        if not params:
            return loss
        # the forwards since the last step (also when skipping: they must not feed the next)
        batch = StepBatch(self._capture.take(), self.loss_spec)
        if not _is_finite(loss):
            self._skip("loss")
            return loss
        if not all_finite(p.grad for p in params):
            self._skip("gradient")
            return loss
        groups = self._group_of()
        scale = batch.grad_scale
        grads = {p: self._regularised_grad(p, groups[id(p)], scale) for p in params}
        directions = self._precondition(grads, batch)
        # with automatic settings the quadratic model checks the directions (dᵀd is finite)
        if directions is None or not (self.auto.enabled or all_finite(directions.values())):
            self._skip("curvature")
            return loss
        if self.auto.enabled:
            if not self._apply_auto(grads, directions, batch):
                self._skip("quadratic model")
                return loss
        else:
            self._apply(directions)
        self.global_state["step"] += 1
        return loss

    def _group_of(self) -> dict[int, dict[str, Any]]:
        return {id(p): g for g in self.param_groups for p in g["params"]}

    @staticmethod
    def _regularised_grad(p: Tensor, group: dict[str, Any], scale: float) -> Tensor:
        """∇J (the accumulated gradient over ``scale``), plus the L2 penalty's gradient."""
        grad = p.grad if scale == 1.0 else p.grad / scale
        wd = group.get("weight_decay", 0.0)
        if wd and not group.get("decoupled_weight_decay", False):
            return grad + wd * p  # L2: the penalty's gradient is preconditioned too
        return grad

    def _precondition(
        self, grads: dict[Tensor, Tensor], batch: StepBatch
    ) -> dict[Tensor, Tensor] | None:
        """Map gradients to update directions Δ (the step is −lr·Δ). None: skip the step."""
        raise NotImplementedError

    def _apply_auto(
        self, grads: dict[Tensor, Tensor], directions: dict[Tensor, Tensor], batch: StepBatch
    ) -> bool:
        """δ = a·d + m·δ₀ from the quadratic model; LM damping (see :mod:`.control`)."""
        if not batch:
            raise RuntimeError(
                f"{type(self).__name__}.step() with automatic lr/momentum/damping needs the "
                "current batch, but no forward of the model was backpropagated since the last step"
            )
        groups = self._group_of()
        params = list(directions)
        first = self.param_groups[0]
        lrs = [groups[id(p)]["lr"] for p in params]
        # d = −lr·Δ for a fixed lr (a = 1 then reproduces the plain step); d = −Δ for auto
        descent = [-directions[p] if self.auto.lr else -lr * directions[p]
                   for p, lr in zip(params, lrs, strict=True)]
        previous = [self.state[p].get("previous_update") for p in params]
        has_previous = all(v is not None for v in previous)
        fmodel = FunctionalModel(self.model, self.output_fn, params)
        # momentum, weight decay and damping of the quadratic model are optimizer-wide (the
        # first group's); with lr="auto" each group's lr multiplies the chosen step
        wd = 0.0 if first.get("decoupled_weight_decay") else first.get("weight_decay", 0.0)
        damping = self.damping_of(first)
        uniform = len(set(lrs)) == 1
        with self._capture.paused():
            result = self._control.updates(
                fmodel, batch, [grads[p] for p in params], descent,
                previous if has_previous else None, damping, wd,
                fixed=(1.0, first.get("momentum", 0.0)),
                scale=lrs[0] if self.auto.lr and uniform else 1.0,
            )
        if result is not None and self.auto.lr and not uniform:
            result = ([u * lr for u, lr in zip(result[0], lrs, strict=True)], result[1])
        if result is None or not all_finite(result[0]):
            return False
        update, info = result
        trial = self._trial(params, update, groups)
        state = self.global_state
        state.update(alpha=info["alpha"], mu=info["mu"])
        if self.auto.damping and state["step"] % self.auto.lm_every == 0:
            predicted = info["predicted_change"]
            rho = self._reduction_ratio(fmodel, batch, params, trial, update, predicted, wd)
            state["rho"] = rho
            state["damping"] = lm_update(
                damping, rho, self.auto.omega, self.auto.min_damping, self.auto.max_damping
            )
            if not rho >= 0:  # the step raised the loss of the very batch it was fitted to
                t = backtrack_fraction(info["slope"], predicted, rho * predicted)
                if t is not None:
                    update = [u * t for u in update]
                    trial = self._trial(params, update, groups)
                    # the undamped model at tδ: t·slope + t²·(its quadratic part at δ)
                    at_t = t * info["slope"] + t * t * (predicted - info["slope"])
                    rho = self._reduction_ratio(fmodel, batch, params, trial, update, at_t, wd)
                if t is None or not rho >= 0:
                    state["rejected_steps"] = state.get("rejected_steps", 0) + 1
                    for p in params:
                        self.state[p].pop("previous_update", None)
                    return True
                state["backtracked_steps"] = state.get("backtracked_steps", 0) + 1
        for p, new, delta in zip(params, trial, update, strict=True):
            p.copy_(new)
            self.state[p]["previous_update"] = delta
        return True

    def _trial(
        self, params: list[Tensor], update: list[Tensor], groups: dict[int, dict[str, Any]]
    ) -> list[Tensor]:
        """θ + δ per parameter (after decoupled weight decay); not applied yet."""
        trial = []
        for p, delta in zip(params, update, strict=True):
            group = groups[id(p)]
            if group.get("weight_decay") and group.get("decoupled_weight_decay"):
                trial.append(p.mul(1 - group["lr"] * group["weight_decay"]).add_(delta))
            else:
                trial.append(p.add(delta))
        return trial

    def _reduction_ratio(
        self, fmodel: FunctionalModel, batch: StepBatch, params: list[Tensor],
        trial: list[Tensor], update: list[Tensor], predicted: float, wd: float,
    ) -> float:
        """ρ of the step to ``trial`` on this step's batch (see :mod:`.control`)."""
        penalty = 0.0  # L2 penalty change η(θ_newᵀδ − ½‖δ‖²), part of the objective
        if wd:
            penalty = wd * float(sum(
                (p * d).sum() - 0.5 * d.square().sum() for p, d in zip(trial, update, strict=True)
            ))
        swap = {id(p): t for p, t in zip(params, trial, strict=True)}
        with self._capture.paused(), swapped_tensors(self.model, swap):
            return self._control.reduction_ratio(fmodel, batch, predicted, penalty)

    def _apply(self, directions: dict[Tensor, Tensor]) -> None:
        # p ← p − lr (μ buf + Δ), with decoupled weight decay p ← p (1 − lr·wd) first
        for group in self.param_groups:
            params = [p for p in group["params"] if p in directions]
            if not params:
                continue
            lr, momentum = group["lr"], group.get("momentum", 0.0)
            wd = group.get("weight_decay", 0.0)
            if wd and group.get("decoupled_weight_decay", False):
                torch._foreach_mul_(params, 1 - lr * wd)
            steps = [directions[p] for p in params]
            if momentum:
                old = [p for p in params if "momentum_buffer" in self.state[p]]
                if old:
                    buffers = [self.state[p]["momentum_buffer"] for p in old]
                    torch._foreach_mul_(buffers, momentum)
                    torch._foreach_add_(buffers, [directions[p] for p in old])
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = directions[p].detach().clone()
                steps = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_add_(params, steps, alpha=-lr)
