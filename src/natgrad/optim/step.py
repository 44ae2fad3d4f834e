"""The update of one step, for fixed and automatic settings alike: δ = a·(−Δ) + m·δ₀.

Every natgrad optimizer ends its step here. Given the directions Δ (the preconditioned
gradient) and the previous update δ₀, the update of each parameter is

    δ = a·(−Δ) + m·δ₀,   θ ← s·θ + δ   (s = 1 − lr·wd with decoupled weight decay, else 1),

and only the source of the coefficients differs:

* fixed settings: a = the group's ``lr`` (times the KL-clipping factor ν, if ``kl_clip``),
  m = the group's ``momentum`` μ times lr / (the lr of δ₀): heavy-ball momentum
  θ ← θ − lr(μ·buf + Δ) as ``torch.optim.SGD`` takes it, written on the update
  (buf = −δ₀ / lr) instead of a buffer;
* automatic settings: the free ones of (a, m) minimise the quadratic model of the batch
  (:class:`natgrad.optim.control.QuadraticControl`), each group's ``lr`` multiplying the
  chosen step (LR schedulers still act); with ``damping="auto"`` the step is checked on its
  batch (ρ), retried at a fraction of its length if the batch's loss went up (up to
  ``backtracks`` times, each at the minimum of the parabola through the last try), and
  rejected if that fails too (Levenberg–Marquardt adapts λ either way, and a step whose
  loss went up right after one whose loss went up multiplies it by ``reject_factor``
  besides). With ``momentum_every`` > 1 the steps between fits of both coefficients keep
  the last fit's ratio r = m/a and fit the length of a step along d + r·δ₀ alone.

:func:`decide` returns a :class:`Decision`; the optimizer applies it and keeps the step's
curvature only if it is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from natgrad._checks import all_finite
from natgrad.curvature.batch import StepBatch
from natgrad.curvature.model import FunctionalModel, swapped_tensors
from natgrad.optim.control import (
    AutoSettings,
    QuadraticControl,
    backtrack_fraction,
    lm_update,
)

__all__ = ["Decision", "StepProblem", "decide"]


@dataclass
class StepProblem:
    """What one step decides on; every list follows ``params``.

    Attributes:
        fmodel: the model as a function of ``params`` (automatic settings only).
        batch: the step's forwards.
        params: the parameters with a gradient.
        values: θ per parameter as whole tensors (None: the parameters themselves; under
            ``fully_shard`` they are the all-gathered shards).
        grads: ∇J per parameter (with the L2 penalty's gradient).
        directions: Δ per parameter (the step is along −Δ).
        previous: δ₀ per parameter, None where there is none (first step, after a reject).
        lrs, momenta: each parameter's group ``lr`` and ``momentum``.
        previous_lrs: the fixed ``lr`` that δ₀ was taken with (None: unknown or automatic).
        shrink: s per parameter (decoupled weight decay), 1.0 without.
        damping: λ in force; weight_decay: the L2 penalty η of the quadratic model.
        step: the optimizer's step count (Levenberg–Marquardt runs every ``lm_every``).
        failed_in_a_row: how many steps just before this one raised their batch's loss
            (ρ < 0: backtracked or rejected).
        momentum_ratio: r = m/a of the last fit of both coefficients (None: none since the
            momentum last restarted).
        kl_clip: KL-clipping bound for fixed lr (None: off); quadratic: v ↦ vᵀF̃v for it.
        paused: a context in which the model's forwards are not captured.
    """

    fmodel: FunctionalModel | None
    batch: StepBatch
    params: list[Tensor]
    grads: list[Tensor]
    directions: list[Tensor]
    previous: list[Tensor | None]
    lrs: list[float]
    momenta: list[float]
    previous_lrs: list[float | None]
    shrink: list[float]
    damping: float
    weight_decay: float
    step: int
    paused: Callable[[], AbstractContextManager[None]]
    kl_clip: float | None = None
    quadratic: Callable[[dict[Tensor, Tensor]], float] | None = None
    values: list[Tensor] | None = None
    failed_in_a_row: int = 0
    momentum_ratio: float | None = None


@dataclass
class Decision:
    """The update δ per parameter, whether it is taken, and what to record.

    ``info`` holds ``lr`` and ``momentum`` (the coefficients a, m applied to −Δ and δ₀, first
    group's), with automatic settings ``failed_in_a_row`` (this step's count, for the next
    step), and with automatic damping ``rho`` and the new ``damping``; ``counter`` names
    the counter to increment (``"backtracked_steps"``, ``"rejected_steps"``) or is None.
    """

    update: list[Tensor]
    accepted: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    counter: str | None = None


def decide(control: QuadraticControl, problem: StepProblem) -> Decision | None:
    """The step's update (see module doc); None if a non-finite quantity appears."""
    settings = control.settings
    directions = _kl_clipped(problem)
    previous = problem.previous
    has_previous = all(v is not None for v in previous)
    if not settings.enabled:  # fixed lr and momentum, per group
        update = torch._foreach_mul(directions, [-lr for lr in problem.lrs])
        for u, v, lr, mu, before in zip(update, previous, problem.lrs, problem.momenta,
                                        problem.previous_lrs, strict=True):
            if mu != 0.0 and v is not None:
                # −lr(Δ + μ·buf) with buf = −δ₀/lr_before: an LR schedule scales it all
                u.add_(v, alpha=mu * lr / (before or lr))
        return Decision(update, info={"lr": problem.lrs[0], "momentum": problem.momenta[0]})

    # the quadratic model chooses the free coefficients; a fixed lr is folded into d
    lrs = problem.lrs
    descent = (torch._foreach_neg(directions) if settings.lr
               else [-lr * d for d, lr in zip(directions, lrs, strict=True)])
    uniform = len(set(lrs)) == 1
    ratio = _kept_ratio(settings, problem, has_previous)
    if ratio is not None:  # a alone along u = d + r·δ₀: one Jacobian-vector product
        descent = torch._foreach_add(descent, previous, alpha=ratio)
    with problem.paused():
        result = control.updates(
            problem.fmodel, problem.batch, problem.grads, descent,
            previous if has_previous and ratio is None else None, problem.damping,
            problem.weight_decay, fixed=(1.0, problem.momenta[0]),
            scale=lrs[0] if settings.lr and uniform else 1.0,
        )
    if result is None or not all_finite(result[0]):
        return None
    update, info = result
    if settings.lr and not uniform:  # each group's lr multiplies the chosen step
        update = [u * lr for u, lr in zip(update, lrs, strict=True)]
    momentum = info["momentum"] if ratio is None else info["lr"] * ratio
    decision = Decision(update, info={"lr": info["lr"], "momentum": momentum,
                                      "failed_in_a_row": 0})
    if ratio is None and settings.momentum_every > 1 and settings.lr and settings.momentum \
            and has_previous:
        # both fitted: the ratio the steps until the next fit keep; none unless a, m > 0 (a
        # negative m undoes part of the last step: kept, it would undo the next ones too)
        positive = info["lr"] > 0 and info["momentum"] > 0
        decision.info["momentum_ratio"] = info["momentum"] / info["lr"] if positive else None
    if not (settings.damping and problem.step % settings.lm_every == 0):
        return decision

    # Levenberg–Marquardt: ρ on the step's own batch; a step that raised it is retried
    predicted = info["predicted_change"]
    rho = _reduction_ratio(control, problem, update, predicted)
    decision.info.update(rho=rho, damping=lm_update(
        problem.damping, rho, settings.omega, settings.min_damping, settings.max_damping
    ))
    if rho >= 0:
        return decision
    decision.info["failed_in_a_row"] = problem.failed_in_a_row + 1
    if problem.failed_in_a_row:  # the loss went up again: λ is far too small
        decision.info["damping"] = min(decision.info["damping"] * settings.reject_factor,
                                       settings.max_damping)
    slope, change = info["slope"], rho * predicted
    for _ in range(settings.backtracks):  # each try: one forward; a rejection: a whole step
        t = backtrack_fraction(slope, predicted, change)
        if t is None:
            break
        update = [u * t for u in update]
        # the undamped model at tδ: t·slope + t²·(its quadratic part at δ)
        at_t = t * slope + t * t * (predicted - slope)
        rho_t = _reduction_ratio(control, problem, update, at_t)
        if rho_t >= 0:
            decision.update, decision.counter = update, "backtracked_steps"
            return decision
        slope, predicted, change = t * slope, at_t, rho_t * at_t  # the tried step's
    decision.accepted, decision.counter = False, "rejected_steps"
    return decision


def _kept_ratio(settings: AutoSettings, problem: StepProblem,
                has_previous: bool) -> float | None:
    """r = m/a of the last fit if this step keeps it (automatic lr and momentum, between
    fits every ``momentum_every`` steps, δ₀ present, the step before not failed); else None:
    this step fits both coefficients."""
    if not (settings.lr and settings.momentum and has_previous) or settings.momentum_every == 1:
        return None
    if problem.momentum_ratio is None or problem.failed_in_a_row:
        return None
    return None if problem.step % settings.momentum_every == 0 else problem.momentum_ratio


def trial_parameters(problem: StepProblem, update: list[Tensor]) -> Iterator[Tensor]:
    """s·θ + δ per parameter: where the step would take the parameters."""
    values = problem.params if problem.values is None else problem.values
    if all(s == 1.0 for s in problem.shrink):
        yield from torch._foreach_add(values, update)
        return
    for p, delta, s in zip(values, update, problem.shrink, strict=True):
        yield p.add(delta) if s == 1.0 else p.mul(s).add_(delta)


def _kl_clipped(problem: StepProblem) -> list[Tensor]:
    """Δ scaled by ν = min(1, √(kl_clip / Σ lr²ΔᵀF̃Δ)) (Ba et al. 2017), for a fixed lr."""
    directions = problem.directions
    if problem.kl_clip is None or problem.quadratic is None:
        return directions
    lrs = problem.lrs
    if len(set(lrs)) == 1:  # lr²·ΔᵀF̃Δ
        quadratic = lrs[0] ** 2 * problem.quadratic(dict(zip(problem.params, directions,
                                                             strict=True)))
    else:
        quadratic = problem.quadratic({
            p: lr * d for p, d, lr in zip(problem.params, directions, lrs, strict=True)
        })
    if quadratic > 0 and problem.kl_clip / quadratic < 1.0:
        scale = math.sqrt(problem.kl_clip / quadratic)
        return [d * scale for d in directions]
    return directions


def _reduction_ratio(
    control: QuadraticControl, problem: StepProblem, update: list[Tensor], predicted: float
) -> float:
    """ρ of the step to s·θ + δ on the step's batch, the L2 penalty's change included."""
    trial = list(trial_parameters(problem, update))
    penalty = 0.0  # L2 penalty change η(θ_newᵀδ − ½‖δ‖²), part of the objective
    if problem.weight_decay:
        penalty = problem.weight_decay * float(sum(
            (p * d).sum() - 0.5 * d.square().sum() for p, d in zip(trial, update, strict=True)
        ))
    swap = {id(p): t for p, t in zip(problem.params, trial, strict=True)}
    with problem.paused(), swapped_tensors(problem.fmodel.model, swap):
        return control.reduction_ratio(problem.fmodel, problem.batch, predicted, penalty)
