"""Training runs and the whole benchmark, driven by a :class:`BenchConfig`.

Fairness rules (every optimizer of one problem):

* the same initial weights (``torch.manual_seed(seed)`` before the model is built), the
  same train/test split and the same sequence of minibatches (all fixed by the seed);
* the same step budget and the same ``torch.set_num_threads``;
* the unchanged loop ``opt.zero_grad(); loss = problem.compute_loss(model(x), y); loss.backward();
  opt.step()``, timed from before ``zero_grad`` to after ``step`` (with a device
  synchronisation on CUDA), so each optimizer's own overhead counts; fetching the minibatch
  and the periodic full-training-set evaluations are outside the timed region.

Nothing here parses arguments: the command line builds the :class:`BenchConfig`.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from natgrad._checks import check_positive_int
from natgrad.bench.data import Dataset, batch_indices
from natgrad.bench.optimizers import (
    OPTIMIZERS,
    REFERENCE,
    OptimizerSpec,
    available_optimizers,
    load_tuned,
)
from natgrad.bench.problems import PROBLEMS, Problem
from natgrad.bench.results import Curve, RunResult, problem_summary

__all__ = ["BenchConfig", "DTYPES", "QUICK_DIVISOR", "run_bench", "train_run"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("cpu", "cuda")
QUICK_DIVISOR = 10  # --quick runs a tenth of each step budget ...
QUICK_EVAL_DIVISOR = 4  # ... with a quarter of the evaluations


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run needs (built by ``natgrad bench``; no argument parsing here).

    Attributes:
        problems: problem names (registry keys of ``PROBLEMS``), in run order.
        optimizers: optimizer names; None means every available one. The reference
            (``adam``) is always run first, because its final loss is the target.
        steps: step budget for every problem; None uses each problem's own budget.
        seed: seeds the split, the initial weights and the minibatch order (0 ≤ seed < 2³²).
        quick: a tenth of each budget (ignored where ``steps`` is given).
        threads: ``torch.set_num_threads`` for the whole run.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"float32"`` or ``"float64"``.
        out: folder for ``results.json`` and the plots.
        quiet: no progress bars.
        tune: run the hyper-parameter grids instead of the benchmark.
        tuned: a tuned-values file to read instead of the one shipped with natgrad.
    """

    problems: tuple[str, ...] = tuple(PROBLEMS)
    optimizers: tuple[str, ...] | None = None
    steps: int | None = None
    seed: int = 0
    quick: bool = False
    threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    out: Path = field(default_factory=lambda: Path("natgrad-bench"))
    quiet: bool = False
    tune: bool = False
    tuned: Path | None = None

    def validate(self) -> None:
        """Raise ValueError, naming the setting and its allowed values, if one is invalid."""
        _check_names("problem", self.problems, list(PROBLEMS), list(PROBLEMS))
        if self.optimizers is not None:
            _check_names("optimizer", self.optimizers, list(OPTIMIZERS), available_optimizers())
        check_positive_int("steps", self.steps, allow=(None,))
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in 0..2**32-1, got {self.seed!r}")
        check_positive_int("threads", self.threads)
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {list(DEVICES)}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.tuned is not None:
            load_tuned(self.tuned)  # raises ValueError naming the file

    def optimizer_names(self) -> list[str]:
        """The optimizers to run: the reference first, then the others in registry order."""
        chosen = set(available_optimizers() if self.optimizers is None else self.optimizers)
        chosen.add(REFERENCE)
        return [REFERENCE] + [name for name in OPTIMIZERS if name in chosen - {REFERENCE}]

    def budget(self, problem: Problem) -> tuple[int, int]:
        """(steps, steps between evaluations) for ``problem``."""
        if self.steps is not None:
            return self.steps, problem.eval_every(self.steps)
        if self.quick:
            steps = max(1, problem.steps // QUICK_DIVISOR)
            evals = max(1, problem.evals // QUICK_EVAL_DIVISOR)
            return steps, max(1, round(steps / evals))
        return problem.steps, problem.eval_every(problem.steps)

    @property
    def progress(self) -> bool:
        """Progress bars are shown unless ``quiet`` or stderr is not a terminal."""
        return not self.quiet and sys.stderr.isatty()

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (paths as strings)."""
        values = asdict(self)
        values["out"] = str(self.out)
        values["tuned"] = None if self.tuned is None else str(self.tuned)
        values["optimizers"] = self.optimizer_names()
        values["problems"] = list(self.problems)
        return values


COUNTERS = ("skipped_steps", "backtracked_steps", "rejected_steps")  # of state["natgrad"]


def _check_names(kind: str, names: Any, known: list[str], available: list[str]) -> None:
    if not names:
        raise ValueError(f"no {kind}s given; choose from {','.join(available)}")
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {kind} {name!r}; choose from {','.join(available)}")
        if name not in available:
            raise ValueError(
                f"{kind} {name!r} is not available in this natgrad install; "
                f"choose from {','.join(available)}"
            )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_size(problem: Problem, dataset: Dataset) -> tuple[int, int]:
    """(trainable parameters, outputs per example) of ``problem``'s model."""
    model = problem.build_model()
    x = dataset.x_train[:1].cpu()
    with torch.no_grad():
        outputs = model(x.float() if x.is_floating_point() else x)
    return sum(p.numel() for p in model.parameters() if p.requires_grad), outputs[0].numel()


def train_run(
    problem: Problem,
    dataset: Dataset,
    spec: OptimizerSpec,
    hparams: dict[str, float | str],
    *,
    steps: int,
    eval_every: int,
    seed: int,
    progress: bool = False,
    stop_at: float | None = None,
) -> RunResult:
    """Train ``problem``'s model with one optimizer and record its curve and step times.

    Args:
        problem: the problem (model, loss, likelihood).
        dataset: its data, already on the device and in the dtype to train in.
        spec: the optimizer's registry entry.
        hparams: keyword arguments of the optimizer.
        steps: number of optimizer steps.
        eval_every: steps between two full-training-set evaluations (the last step is
            always evaluated).
        seed: seeds the initial weights and the minibatch order.
        progress: show a tqdm progress bar on stderr.
        stop_at: stop once an evaluated training loss is ≤ this (None: run every step).

    Returns:
        The run; it stops early (``diverged=True``) once an evaluated loss is not finite.
    """
    from tqdm import tqdm

    x_train, y_train = dataset.x_train, dataset.y_train
    device = x_train.device
    torch.manual_seed(seed)
    model = problem.build_model().to(device=device, dtype=dataset.float_dtype)
    optimizer = spec.build(model, problem.loss, hparams)
    indices = batch_indices(dataset.num_train, problem.batch_size, steps, seed).to(device)
    autoencoder = y_train is x_train

    curve, step_times, elapsed, diverged = Curve(), [], 0.0, False
    curve.append(0, 0.0, problem.dataset_loss(model, x_train, y_train))
    bar = tqdm(total=steps, desc=f"{problem.name} {spec.name}", disable=not progress,
               leave=False, file=sys.stderr, dynamic_ncols=True)
    with bar:
        for step in range(1, steps + 1):
            x = x_train[indices[step - 1]]
            y = x if autoencoder else y_train[indices[step - 1]]
            _sync(device)
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = problem.compute_loss(model(x), y)
            loss.backward()
            optimizer.step()
            _sync(device)
            step_times.append(time.perf_counter() - start)
            elapsed += step_times[-1]
            bar.update(1)
            if step % eval_every == 0 or step == steps:
                full = problem.dataset_loss(model, x_train, y_train)
                curve.append(step, elapsed, full)
                bar.set_postfix(train_loss=f"{full:.4g}", refresh=False)
                if not math.isfinite(full):
                    diverged = True
                    break
                if stop_at is not None and full <= stop_at:
                    break
    metric = math.nan if diverged else problem.test_metric(model, dataset)
    state = optimizer.state.get("natgrad", {})
    counters = {k: int(state[k]) for k in COUNTERS if k in state}
    return RunResult(spec.name, dict(hparams), curve, step_times, metric, diverged, counters)


def environment(config: BenchConfig) -> dict[str, Any]:
    """Versions and machine facts stored with the results."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": config.threads,
        "device": config.device,
        "dtype": config.dtype,
    }
    if config.device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    return info


def run_problem(
    problem: Problem, config: BenchConfig, tuned: dict[str, Any]
) -> dict[str, Any]:
    """Run every configured optimizer on ``problem``; its ``results.json`` entry."""
    dataset = problem.load(config.seed)
    num_params, outputs = model_size(problem, dataset)
    dataset = dataset.to(config.device, DTYPES[config.dtype])
    steps, eval_every = config.budget(problem)
    runs: dict[str, RunResult] = {}
    skipped: dict[str, str] = {}
    for name in config.optimizer_names():
        spec = OPTIMIZERS[name]
        reason = spec.skip_reason(num_params, problem.batch_size, outputs)
        if reason is not None:
            skipped[name] = reason
            continue
        run_steps, run_every = spec.budget(steps, eval_every)
        runs[name] = train_run(
            problem, dataset, spec, spec.hparams(problem.name, tuned), steps=run_steps,
            eval_every=run_every, seed=config.seed, progress=config.progress,
        )
    entry = {
        "description": problem.description,
        "likelihood": problem.likelihood,
        "loss": repr(problem.loss),
        "test_metric_name": problem.metric,
        "num_params": num_params,
        "steps": steps,
        "batch_size": problem.batch_size,
        "eval_every": eval_every,
    }
    entry.update(problem_summary(runs, REFERENCE))
    entry["skipped"] = skipped
    return entry


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark described by ``config`` (see :class:`BenchConfig`).

    Returns:
        The ``results.json`` object: ``{"problems": {problem: {"target_loss", "runs":
        {optimizer: {...}}, "skipped", ...}}, "config", "environment", "wall_seconds"}``.

    Raises:
        ValueError: if ``config`` is invalid.
    """
    config.validate()
    tuned = load_tuned(config.tuned)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        problems = {name: run_problem(PROBLEMS[name], config, tuned) for name in config.problems}
    finally:
        torch.set_num_threads(threads)
    return {
        "problems": problems,
        "config": config.as_dict(),
        "environment": environment(config),
        "tuned_values_file": tuned.get("source"),
        "wall_seconds": time.perf_counter() - start,
    }
