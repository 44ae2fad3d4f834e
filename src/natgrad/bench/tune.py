"""Hyper-parameter selection for ``natgrad bench --tune``.

For each problem, every optimizer runs every point of its grid (``OptimizerSpec.grid``) with
the problem's step budget, seed and thread count, exactly as the benchmark runs it:

1. the reference (Adam) first: the grid point with the lowest final full-training-set loss
   wins, and that loss is the problem's target;
2. every other optimizer: the grid point that reaches the target in the fewest steps wins
   (ties and runs that never reach it: the lowest final training loss). Steps, not seconds,
   so the choice does not depend on timing noise; for one optimizer the step time hardly
   depends on its hyper-parameters.

The chosen values are merged into the tuned values read at the start (the shipped
``tuned.json`` or ``--tuned``), so tuning a new optimizer alone keeps everyone else's
values; optimizers an entry cannot run on (``OptimizerSpec.skip_reason``) get no value.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch

from natgrad.bench.optimizers import OPTIMIZERS, REFERENCE, load_tuned
from natgrad.bench.problems import PROBLEMS, Problem
from natgrad.bench.results import RunResult, finite_or_none, steps_to_target, target_loss
from natgrad.bench.runner import DTYPES, BenchConfig, model_size, train_run

__all__ = ["TUNED_COMMENT", "run_tuning", "selection_key"]

TUNED_COMMENT = (
    "Hyper-parameters chosen by `natgrad bench --tune` (grids in natgrad/bench/optimizers.py). "
    "Adam: lowest final training loss; others: fewest steps to Adam's final loss, then lowest "
    "final loss. Copy a new tuning's tuned.json here to change the defaults."
)


def selection_key(run: RunResult, target: float | None) -> tuple[float, float]:
    """Sort key of a grid point (smaller is better): (steps to target, final loss).

    Missing or non-finite values sort last; for the reference pass ``target=None``, so
    only the final loss counts.
    """
    steps = steps_to_target(run.curve, target)
    final = run.final_train_loss
    return (
        math.inf if steps is None else float(steps),
        final if math.isfinite(final) else math.inf,
    )


def _trial(run: RunResult, target: float | None) -> dict[str, Any]:
    return {
        "hparams": dict(run.hparams),
        "final_train_loss": finite_or_none(run.final_train_loss),
        "steps_to_target": steps_to_target(run.curve, target),
        "step_time_median_s": finite_or_none(run.step_time_median),
        "diverged": run.diverged,
    }


def tune_problem(
    problem: Problem, config: BenchConfig
) -> tuple[dict[str, dict[str, float | str]], dict[str, Any]]:
    """Run the grids of ``config``'s optimizers on one problem.

    Returns:
        (chosen hyper-parameters by optimizer, the trial log: ``{"target_loss", "trials":
        {optimizer: [{"hparams", "final_train_loss", "steps_to_target", ...}]}}``).
    """
    dataset = problem.load(config.seed)
    num_params, outputs = model_size(problem, dataset)
    dataset = dataset.to(config.device, DTYPES[config.dtype])
    steps, eval_every = config.budget(problem)
    chosen: dict[str, dict[str, float | str]] = {}
    trials: dict[str, list[dict[str, Any]]] = {}
    target: float | None = None
    for name in config.optimizer_names():  # the reference comes first
        spec = OPTIMIZERS[name]
        if spec.skip_reason(num_params, problem.batch_size, outputs) is not None:
            continue
        run_steps, run_every = spec.budget(steps, eval_every)
        runs = [
            train_run(problem, dataset, spec, hparams, steps=run_steps, eval_every=run_every,
                      seed=config.seed, progress=config.progress)
            for hparams in spec.configs()
        ]
        key_target = None if name == REFERENCE else target
        best = min(runs, key=lambda run: selection_key(run, key_target))
        if name == REFERENCE:
            target = target_loss(best.curve)
        chosen[name] = dict(best.hparams)
        trials[name] = [_trial(run, key_target) for run in runs]
    return chosen, {"target_loss": target, "steps": steps, "trials": trials}


def run_tuning(config: BenchConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tune every configured optimizer on every configured problem.

    Returns:
        (tuned values: the file format of :func:`natgrad.bench.optimizers.load_tuned`, merged
        with the values read at the start; the log of every trial, by problem).

    Raises:
        ValueError: if ``config`` is invalid.
    """
    config.validate()
    tuned = copy.deepcopy(load_tuned(config.tuned))
    log: dict[str, Any] = {}
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        for name in config.problems:
            chosen, log[name] = tune_problem(PROBLEMS[name], config)
            tuned["values"].setdefault(name, {}).update(chosen)
    finally:
        torch.set_num_threads(threads)
    tuned["comment"] = TUNED_COMMENT
    budget = tuned.setdefault("budget", {})
    budget.update(seed=config.seed, threads=config.threads, dtype=config.dtype,
                  device=config.device)
    budget.setdefault("steps", {}).update({name: log[name]["steps"] for name in config.problems})
    tuned.setdefault("grids", {}).update({
        name: {k: list(v) for k, v in OPTIMIZERS[name].grid.items()}
        for name in config.optimizer_names()
    })
    tuned = {key: tuned[key] for key in ("comment", "budget", "grids", "values")} | {
        key: value for key, value in tuned.items()
        if key not in ("comment", "budget", "grids", "values")
    }
    return tuned, {"problems": log, "wall_seconds": time.perf_counter() - start}
