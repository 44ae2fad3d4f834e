"""What one training run records, and the comparisons made from it.

A run evaluates the loss on the whole training set at step 0 and every few steps; a
:class:`Curve` holds those evaluations together with the optimizer-step seconds spent up to
each of them (forward, backward and ``step()`` only, never the evaluations themselves).

Definitions used by every report (see the module functions):

* target loss T of a problem: the final full-training-set loss of the reference optimizer
  (tuned Adam) in the same run;
* steps to target: the first evaluated step whose loss is ≤ T (None if none is);
* seconds to target: the optimizer-step seconds spent up to that step;
* ratio: seconds to target divided by the reference's seconds to target.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Curve",
    "RunResult",
    "finite_or_none",
    "problem_summary",
    "seconds_to_target",
    "steps_to_target",
    "target_loss",
    "time_ratio",
]


@dataclass
class Curve:
    """Full-training-set loss at evaluated steps.

    Attributes:
        steps: evaluated steps, increasing, starting at 0.
        seconds: optimizer-step seconds spent before each evaluation (0.0 at step 0).
        losses: full-training-set loss at each evaluation (may be non-finite on divergence).
    """

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def append(self, step: int, seconds: float, loss: float) -> None:
        """Record one evaluation."""
        self.steps.append(step)
        self.seconds.append(seconds)
        self.losses.append(loss)

    @property
    def final_loss(self) -> float:
        """The last evaluated loss (NaN for an empty curve)."""
        return self.losses[-1] if self.losses else math.nan


@dataclass
class RunResult:
    """One optimizer trained on one problem.

    Attributes:
        optimizer: registry name.
        hparams: hyper-parameters it ran with.
        curve: the evaluations.
        step_times: wall-clock seconds of each optimizer step.
        test_metric: test accuracy or test loss after the last step.
        diverged: whether the run stopped early on a non-finite loss.
        counters: natgrad's step counters (``skipped_steps``, ``backtracked_steps``,
            ``rejected_steps`` of ``state["natgrad"]``); empty for torch.optim optimizers.
    """

    optimizer: str
    hparams: dict[str, float | str]
    curve: Curve
    step_times: list[float]
    test_metric: float
    diverged: bool = False
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def final_train_loss(self) -> float:
        """Full-training-set loss after the last step."""
        return self.curve.final_loss

    @property
    def step_time_median(self) -> float:
        """Median seconds of one optimizer step (NaN if no step ran)."""
        return statistics.median(self.step_times) if self.step_times else math.nan


def target_loss(reference: Curve) -> float | None:
    """The target loss: the reference run's final training loss, None if not finite."""
    final = reference.final_loss
    return final if math.isfinite(final) else None


def _first_reaching(curve: Curve, target: float | None) -> int | None:
    if target is None:
        return None
    for index, loss in enumerate(curve.losses):
        if math.isfinite(loss) and loss <= target:
            return index
    return None


def steps_to_target(curve: Curve, target: float | None) -> int | None:
    """The first evaluated step at which the loss is ≤ ``target``; None if never (or no target).

    Example:
        >>> steps_to_target(Curve([0, 10, 20], [0.0, 1.0, 2.0], [3.0, 1.0, 0.5]), 1.0)
        10
    """
    index = _first_reaching(curve, target)
    return None if index is None else curve.steps[index]


def seconds_to_target(curve: Curve, target: float | None) -> float | None:
    """Optimizer-step seconds until the loss first is ≤ ``target``; None if never.

    Example:
        >>> seconds_to_target(Curve([0, 10, 20], [0.0, 1.0, 2.0], [3.0, 1.0, 0.5]), 0.7)
        2.0
    """
    index = _first_reaching(curve, target)
    return None if index is None else curve.seconds[index]


def time_ratio(seconds: float | None, reference_seconds: float | None) -> float | None:
    """``seconds / reference_seconds``; None if either is None or the reference is 0."""
    if seconds is None or reference_seconds is None or reference_seconds <= 0:
        return None
    return seconds / reference_seconds


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or None where it is missing or not finite (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _list(values: Sequence[float]) -> list[float | None]:
    return [finite_or_none(v) for v in values]


def problem_summary(
    runs: dict[str, RunResult], reference: str, *, curves: bool = True
) -> dict[str, Any]:
    """The ``results.json`` entry of one problem.

    Args:
        runs: optimizer name → its run (must contain ``reference``).
        reference: the optimizer whose final loss is the target (``"adam"``).
        curves: include each run's evaluated steps, seconds and losses.

    Returns:
        ``{"target_loss": float|None, "runs": {optimizer: {"steps", "final_train_loss",
        "test_metric", "step_time_median_s", "steps_to_target", "seconds_to_target",
        "seconds_to_target_ratio", "hparams", "diverged", ["curve"]}}}``; non-finite
        numbers become None.
    """
    target = target_loss(runs[reference].curve)
    reference_seconds = seconds_to_target(runs[reference].curve, target)
    entries: dict[str, Any] = {}
    for name, run in runs.items():
        seconds = seconds_to_target(run.curve, target)
        entry: dict[str, Any] = {
            "steps": len(run.step_times),
            "final_train_loss": finite_or_none(run.final_train_loss),
            "test_metric": finite_or_none(run.test_metric),
            "step_time_median_s": finite_or_none(run.step_time_median),
            "steps_to_target": steps_to_target(run.curve, target),
            "seconds_to_target": seconds,
            "seconds_to_target_ratio": time_ratio(seconds, reference_seconds),
            "hparams": dict(run.hparams),
            "diverged": run.diverged,
        }
        if curves:
            entry["curve"] = {
                "steps": list(run.curve.steps),
                "seconds": _list(run.curve.seconds),
                "train_loss": _list(run.curve.losses),
            }
        entries[name] = entry
    return {"target_loss": target, "runs": entries}
