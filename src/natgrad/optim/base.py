"""What every natgrad optimizer shares: the torch.optim contract and one step, top to bottom.

A natgrad optimizer is :class:`CurvatureOptimizer` composed with three objects:

* a capture (:class:`natgrad.layers.capture.LayerCapture`): hooks that record what the
  optimizer must see of the model's forwards and backwards;
* a preconditioner (exact, Kronecker, eigenbasis, diagonal or CG): ``update(batch, grads,
  step)`` computes the step's curvature without committing it, ``apply(grads)`` maps the
  gradients to directions Δ, ``commit()`` / ``discard()`` keep or forget the curvature;
* the step's controller (:func:`natgrad.optim.step.decide`): the update δ = a·(−Δ) + m·δ₀
  with fixed or automatic coefficients, checked on its batch when the damping is automatic.

:meth:`CurvatureOptimizer.step` reads in one pass: take the captured batch → ∇J → update
the curvature → precondition → decide → apply, with the curvature committed only when the
step is taken. A non-finite loss, gradient, curvature or quadratic model skips the step and
leaves parameters and state exactly as they were (counted, warned once).

Everything is on the canonical objective J of :mod:`natgrad.losses`: the accumulated
gradient divided by the batch's ``grad_scale`` is ∇J, whatever the loss's reduction; weight
decay is a penalty on J.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from natgrad._checks import all_finite, check_nonnegative, check_positive, check_positive_int
from natgrad.curvature.batch import StepBatch
from natgrad.curvature.model import FunctionalModel
from natgrad.distributed.comm import Communicator, unwrap_model
from natgrad.distributed.fsdp import param_sharding
from natgrad.layers.capture import LayerCapture
from natgrad.likelihoods import Likelihood
from natgrad.losses import LossSpec
from natgrad.optim.amp import check_grad_scaler, loss_scaling
from natgrad.optim.control import AutoSettings, QuadraticControl, check_rows
from natgrad.optim.step import Decision, StepProblem, decide

__all__ = ["CurvatureOptimizer", "Preconditioner"]

GLOBAL = "natgrad"  # key of the optimizer-wide entry in ``self.state``
AUTO = "auto"
INITIAL_DAMPING = 1e-2  # Levenberg-Marquardt's starting λ unless an optimizer sets its own


class Preconditioner(Protocol):
    """Maps gradients to directions; its curvature is kept only for a taken step."""

    def update(self, batch: StepBatch, grads: dict[Tensor, Tensor], step: int) -> bool: ...
    def apply(self, grads: dict[Tensor, Tensor]) -> dict[Tensor, Tensor] | None: ...
    def commit(self) -> None: ...
    def discard(self) -> None: ...
    def rebind(self, state: Any) -> None: ...


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


class CurvatureOptimizer(Optimizer):
    """Base class of natgrad's optimizers (see module docstring).

    Subclasses call ``super().__init__`` with the model, the user's ``params`` (or None for
    all of the model's trainable parameters), the defaults and the loss, then set
    :attr:`preconditioner` and the capture (through :meth:`_attach`), and :attr:`stat_every`
    if the capture gathers statistics. A ``DistributedDataParallel`` model is unwrapped.
    Subclasses that keep ranks in lockstep under data parallelism set :attr:`data_parallel`;
    their quadratic model then averages its batch terms over the ranks of ``process_group``.
    """

    data_parallel = False  # communicates through self._comm so that ranks stay identical
    fully_sharded = False  # trains fully_shard (FSDP2) models: whole tensors for the step
    # GradScaler.step hands the loss scale and overflow flag to step() (natgrad.optim.amp)
    _step_supports_amp_scaling = True
    preconditioner: Preconditioner
    stat_every: int | None = None  # steps between statistics (None: the capture never gathers)
    curvature_warmup: int = 0  # the first steps gather statistics every step
    kl_clip: float | None = None  # KL-clipping bound of a fixed lr (KFAC, EKFAC)

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
        seed: int = 0,
        grad_scaler: Any = None,
        momentum_every: int = 1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        defaults = dict(defaults)
        check_positive_int("lm_every", lm_every)
        check_positive_int("momentum_every", momentum_every)
        self.auto = AutoSettings(
            lr=defaults["lr"] == AUTO,
            momentum=defaults.get("momentum") == AUTO,
            damping=defaults.get("damping") == AUTO,
            lm_every=lm_every,
            min_damping=min_damping,
            rows=check_rows(curvature_rows),
            momentum_every=momentum_every,
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
        check_positive("min_damping", min_damping)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        model_params = {id(p) for p in model.parameters()}
        for group in self.param_groups:
            if any(id(p) not in model_params for p in group["params"]):
                raise ValueError("params must be parameters of model")
        self.model = unwrap_model(model)
        self.grad_scaler = check_grad_scaler(grad_scaler)
        self.loss_spec = loss_spec
        self.output_fn = output_fn
        self._comm = Communicator(process_group)
        # FSDP2: the step on whole tensors, the update on this rank's shards (else no-ops)
        self._sharding = param_sharding(self.model, self._comm)
        if self._sharding.sharded and not self.fully_sharded:
            raise TypeError(f"{type(self).__name__} does not support models sharded with "
                            "fully_shard (FSDP2); KFAC, EKFAC and NGDCG do")
        self._control = QuadraticControl(self.auto, self._comm if self.data_parallel else None)
        self._capture: LayerCapture  # set by subclasses (_attach)
        self._warned: set[str] = set()
        # the random source of sampled labels; ranks draw different ones
        self._generator = torch.Generator(device=self.param_groups[0]["params"][0].device)
        self._generator.manual_seed(seed + self._comm.rank)
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
        self._capture = capture
        self._schedule_statistics()
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

    def damping_of_param(self, p: Tensor) -> float:
        """The damping λ in force for parameter ``p`` (its group's)."""
        if self.auto.damping:
            return self.damping_of(self.param_groups[0])
        return self._group_of(p)["damping"]

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        """The param group that holds ``p`` (looked up in a map rebuilt when groups change)."""
        # the groups are new dicts after load_state_dict or add_param_group
        key = tuple((id(g), id(g["params"]), len(g["params"])) for g in self.param_groups)
        if getattr(self, "_groups_key", None) != key:
            self._groups = {id(q): g for g in self.param_groups for q in g["params"]}
            self._groups_key = key
        return self._groups[id(p)]

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (no more statistics are gathered)."""
        self._capture.remove()

    # --- state ----------------------------------------------------------------------------
    @property
    def global_state(self) -> dict[str, Any]:
        """Optimizer-wide state (counters, RNG, ...); saved by ``state_dict()``."""
        state = self.state[GLOBAL]
        if not state:
            state.update(step=0, skipped_steps=0)
        return state

    def state_dict(self) -> dict[str, Any]:
        self.global_state["rng_state"] = self._generator.get_state()
        if self._comm.active:
            self.global_state["rng_rank"] = self._comm.rank  # whose label stream it is
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.preconditioner.rebind(self.state)  # blocks view the new per-parameter state
        rng = self.global_state.get("rng_state")
        if rng is not None:
            self._generator.set_state(rng.cpu())
            rank = self._comm.rank
            if self.global_state.get("rng_rank", 0) != rank:
                # another rank's stream (a checkpoint written by rank 0): fork a stream of
                # this rank's own from it, so that ranks keep drawing different labels
                start = torch.randint(2**62, (1,), generator=self._generator,
                                      device=self._generator.device)
                self._generator.manual_seed(int(start) + rank)
                self.global_state["rng_rank"] = rank
        for group in self.param_groups:  # checkpoints of the momentum-buffer days
            for p in group["params"]:
                buffer = self.state[p].pop("momentum_buffer", None) if p in self.state else None
                if buffer is not None and "previous_update" not in self.state[p]:
                    self.state[p]["previous_update"] = buffer * -group["lr"]
                    self.state[p]["previous_lr"] = group["lr"]
                if p in self.state and "previous_update" in self.state[p]:  # FSDP2: its rows
                    self.state[p]["previous_update"] = self._sharding.kept(
                        p, self.state[p]["previous_update"])
        self._schedule_statistics()

    def _schedule_statistics(self) -> None:
        # statistics are gathered on every step before curvature_warmup, then on multiples
        # of stat_every
        step = self.global_state["step"]
        self._capture.gathering = self.stat_every is not None and (
            step < self.curvature_warmup or step % self.stat_every == 0)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _skip(self, reason: str) -> None:
        self.preconditioner.discard()
        self.global_state["skipped_steps"] += 1
        self._warn_once(
            "skip",
            f"{type(self).__name__}: skipped a step because the {reason} is not finite; "
            "parameters and optimizer state are unchanged (counted in "
            "state['natgrad']['skipped_steps'])",
        )

    # --- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update; ``closure`` re-evaluates the model and returns the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        # the forwards since the last step (taken also when skipping: not for the next step)
        records = self._capture.take()
        scaling = loss_scaling(self)  # a GradScaler's loss scale S: taken out of everything
        if scaling.grads is not None:
            for p in params:
                p.grad.div_(scaling.grads)
        self._capture.unscale(records, scaling.records)
        batch = StepBatch(records, self.loss_spec)
        accumulated = self._sharding.whole([p.grad for p in params])  # all-gathered if sharded
        if not _is_finite(loss):
            self._skip("loss")
        elif scaling.found_inf or not all_finite(accumulated):
            self._skip("gradient")
        else:
            self._step(batch, params, accumulated)
        self._schedule_statistics()
        return loss

    def _step(self, batch: StepBatch, params: list[Tensor], accumulated: list[Tensor]) -> None:
        step = self.global_state["step"]
        values = self._sharding.whole(params)  # θ as whole tensors
        grads = self._objective_gradients(params, values, accumulated, batch.grad_scale)
        if not self.preconditioner.update(batch, grads, step):  # pending curvature
            return self._skip("curvature")
        directions = self.preconditioner.apply(grads)  # Δ
        # with automatic settings the quadratic model checks the directions (dᵀd is finite)
        if directions is None or not (self.auto.enabled or all_finite(directions.values())):
            return self._skip("curvature")
        problem = self._problem(batch, params, values, grads, directions)
        decision = decide(self._control, problem)
        if decision is None:
            return self._skip("quadratic model")
        if decision.accepted:
            self.preconditioner.commit()
            self._apply(params, decision, problem.shrink)
        else:  # parameters and curvature unchanged, momentum restarted
            self.preconditioner.discard()
            for p in params:
                self.state[p].pop("previous_update", None)
        state = self.global_state
        state.update(decision.info)
        if not decision.accepted:  # the next step with momentum fits its ratio anew
            state.pop("momentum_ratio", None)
        if decision.counter is not None:
            state[decision.counter] = state.get(decision.counter, 0) + 1
        state["step"] = step + 1

    def _objective_gradients(
        self, params: list[Tensor], values: list[Tensor], accumulated: list[Tensor],
        scale: float,
    ) -> dict[Tensor, Tensor]:
        """∇J per parameter: the accumulated gradient over ``scale``, plus η·θ for L2 decay
        (``values``: θ; both lists as whole tensors, following ``params``)."""
        grads = {}
        for p, value, grad in zip(params, values, accumulated, strict=True):
            group = self._group_of(p)
            wd = group.get("weight_decay", 0.0)
            l2 = wd and not group.get("decoupled_weight_decay", False)
            grad = grad if scale == 1.0 else grad / scale
            grads[p] = grad + wd * value if l2 else grad  # the penalty is preconditioned too
        return grads

    @contextmanager
    def _own_forwards(self, params: list[Tensor]) -> Iterator[None]:
        """The optimizer's own evaluations of the model: not captured; under FSDP its hooks
        set aside and the sharded parameters other than ``params`` (frozen, unused this step)
        whole (``params`` the evaluations swap in themselves)."""
        with self._capture.paused(), self._sharding.own_forwards(params):
            yield

    def _problem(
        self, batch: StepBatch, params: list[Tensor], values: list[Tensor],
        grads: dict[Tensor, Tensor], directions: dict[Tensor, Tensor],
    ) -> StepProblem:
        first = self.param_groups[0]
        # momentum, weight decay and damping of the quadratic model are optimizer-wide (the
        # first group's)
        decoupled = first.get("decoupled_weight_decay", False)
        shrink = []
        for p in params:
            group = self._group_of(p)
            wd = group.get("weight_decay", 0.0)
            shrink.append(1 - group["lr"] * wd if wd and group.get("decoupled_weight_decay")
                          else 1.0)
        quadratic = getattr(self.preconditioner, "quadratic", None)
        return StepProblem(
            fmodel=FunctionalModel(self.model, self.output_fn, params, batch.layout,
                                   values=values) if self.auto.enabled else None,
            batch=batch,
            params=params,
            values=values,
            grads=[grads[p] for p in params],
            directions=[directions[p] for p in params],
            # δ₀ whole (FSDP2 keeps this rank's rows: one all-gather)
            previous=self._sharding.whole([self.state[p].get("previous_update")
                                           for p in params]),
            lrs=[self._group_of(p)["lr"] for p in params],
            momenta=[self._group_of(p).get("momentum", 0.0) for p in params],
            previous_lrs=[self.state[p].get("previous_lr") for p in params],
            shrink=shrink,
            damping=self.damping_of(first),
            weight_decay=0.0 if decoupled else first.get("weight_decay", 0.0),
            step=self.global_state["step"],
            failed_in_a_row=self.global_state.get("failed_in_a_row", 0),
            momentum_ratio=self.global_state.get("momentum_ratio"),
            paused=partial(self._own_forwards, params),
            kl_clip=self.kl_clip,
            quadratic=quadratic if self.kl_clip is not None else None,
        )

    def _apply(self, params: list[Tensor], decision: Decision, shrink: list[float]) -> None:
        """θ ← s·θ + δ (s: decoupled weight decay, the problem's); δ is the next step's δ₀.
        Sharded parameters take their own rows of the whole δ, and keep only those of δ₀."""
        local = self._sharding.local(params)
        for t, s in zip(local, shrink, strict=True):
            if s != 1.0:
                t.mul_(s)
        torch._foreach_add_(local, self._sharding.shard(params, decision.update))
        for p, delta in zip(params, decision.update, strict=True):
            group = self._group_of(p)
            if self.auto.momentum or group.get("momentum", 0.0):
                self.state[p]["previous_update"] = self._sharding.kept(p, delta)
                if not self.auto.enabled:
                    self.state[p]["previous_lr"] = group["lr"]
