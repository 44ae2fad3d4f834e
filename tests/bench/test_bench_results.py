"""Target, steps-to-target, seconds-to-target and ratio on made-up curves."""

from __future__ import annotations

import json
import math

import pytest

from natgrad.bench.results import (
    Curve,
    RunResult,
    finite_or_none,
    problem_summary,
    seconds_to_target,
    steps_to_target,
    target_loss,
    time_ratio,
)
from natgrad.bench.tune import selection_key

# Adam-like reference: reaches its own final loss only at the end.
REFERENCE = Curve(steps=[0, 10, 20, 30], seconds=[0.0, 1.0, 2.0, 3.0], losses=[4.0, 2.0, 1.5, 1.0])
# Faster method: crosses 1.0 at step 20, after 0.5 s of steps.
FAST = Curve(steps=[0, 10, 20, 30], seconds=[0.0, 0.25, 0.5, 0.75], losses=[4.0, 1.2, 0.9, 0.5])
# Never reaches 1.0.
SLOW = Curve(steps=[0, 10, 20, 30], seconds=[0.0, 0.1, 0.2, 0.3], losses=[4.0, 3.0, 2.5, 2.0])
# Reaches the target, then diverges.
SPIKY = Curve(steps=[0, 10, 20], seconds=[0.0, 0.4, 0.8], losses=[4.0, 0.8, math.nan])


def run(name: str, curve: Curve, step_times: list[float] | None = None) -> RunResult:
    times = [0.1, 0.3, 0.2] if step_times is None else step_times
    return RunResult(name, {"lr": 0.1}, curve, times, test_metric=0.5)


def test_target_is_reference_final_loss() -> None:
    assert target_loss(REFERENCE) == 1.0
    assert target_loss(Curve([0, 5], [0.0, 1.0], [1.0, math.nan])) is None
    assert target_loss(Curve()) is None


def test_steps_and_seconds_to_target() -> None:
    assert steps_to_target(REFERENCE, 1.0) == 30
    assert seconds_to_target(REFERENCE, 1.0) == 3.0
    assert steps_to_target(FAST, 1.0) == 20
    assert seconds_to_target(FAST, 1.0) == 0.5
    # reaching exactly the target counts (≤)
    assert steps_to_target(FAST, 1.2) == 10
    assert seconds_to_target(FAST, 1.2) == 0.25


def test_never_reaching_the_target_is_none() -> None:
    assert steps_to_target(SLOW, 1.0) is None
    assert seconds_to_target(SLOW, 1.0) is None
    assert steps_to_target(FAST, None) is None  # no target at all
    assert seconds_to_target(FAST, None) is None


def test_first_crossing_counts_even_after_divergence() -> None:
    assert steps_to_target(SPIKY, 1.0) == 10
    assert seconds_to_target(SPIKY, 1.0) == 0.4
    # NaN never counts as reaching a target
    assert steps_to_target(Curve([0], [0.0], [math.nan]), 1e9) is None


def test_time_ratio() -> None:
    assert time_ratio(0.5, 3.0) == pytest.approx(1 / 6)
    assert time_ratio(3.0, 3.0) == 1.0
    assert time_ratio(None, 3.0) is None
    assert time_ratio(0.5, None) is None
    assert time_ratio(0.5, 0.0) is None


def test_finite_or_none() -> None:
    assert finite_or_none(1.5) == 1.5
    assert finite_or_none(math.nan) is None
    assert finite_or_none(math.inf) is None
    assert finite_or_none(None) is None


def test_run_result_median_and_final() -> None:
    result = run("adam", REFERENCE, [0.3, 0.1, 0.2, 10.0])
    assert result.step_time_median == pytest.approx(0.25)
    assert result.final_train_loss == 1.0
    assert math.isnan(run("x", Curve(), []).step_time_median)


def test_problem_summary_shape_and_values() -> None:
    runs = {"adam": run("adam", REFERENCE), "fast": run("fast", FAST), "slow": run("slow", SLOW)}
    summary = problem_summary(runs, "adam")
    json.dumps(summary, allow_nan=False)  # strict JSON
    assert summary["target_loss"] == 1.0
    adam, fast, slow = (summary["runs"][k] for k in ("adam", "fast", "slow"))
    assert adam["steps_to_target"] == 30 and adam["seconds_to_target_ratio"] == 1.0
    assert fast["steps_to_target"] == 20
    assert fast["seconds_to_target"] == 0.5
    assert fast["seconds_to_target_ratio"] == pytest.approx(0.5 / 3.0)
    assert slow["steps_to_target"] is None
    assert slow["seconds_to_target"] is None
    assert slow["seconds_to_target_ratio"] is None
    for entry in summary["runs"].values():
        assert set(entry) >= {
            "final_train_loss", "test_metric", "step_time_median_s", "steps_to_target",
            "seconds_to_target",
        }
        assert entry["step_time_median_s"] == pytest.approx(0.2)
        assert entry["curve"]["steps"] == [0, 10, 20, 30]


def test_problem_summary_without_a_target() -> None:
    diverged = Curve([0, 10], [0.0, 1.0], [4.0, math.inf])
    summary = problem_summary({"adam": run("adam", diverged), "fast": run("fast", FAST)}, "adam")
    assert summary["target_loss"] is None
    assert summary["runs"]["adam"]["final_train_loss"] is None
    assert summary["runs"]["fast"]["steps_to_target"] is None
    assert summary["runs"]["fast"]["seconds_to_target_ratio"] is None
    assert summary["runs"]["adam"]["curve"]["train_loss"] == [4.0, None]


def test_selection_key_prefers_fewer_steps_then_lower_loss() -> None:
    keys = {name: selection_key(run(name, c), 1.0) for name, c in
            (("fast", FAST), ("slow", SLOW), ("reference", REFERENCE))}
    assert sorted(keys, key=keys.get) == ["fast", "reference", "slow"]
    # without a target (the reference's own grid) only the final loss counts
    assert selection_key(run("fast", FAST), None) == (math.inf, 0.5)
    assert selection_key(run("spiky", SPIKY), None) == (math.inf, math.inf)
