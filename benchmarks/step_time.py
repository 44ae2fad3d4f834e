"""Median and mean step time of KFAC and EKFAC as a ratio to Adam's, measured in one run.

    python benchmarks/step_time.py [--threads 1] [--steps 200] [--problems digits-mlp,...]
                                   [--variant NAME=JSON ...] [--phases]

For each problem, every configuration trains the same model on the same minibatches; the
configurations take turns (round-robin, one block of steps each) so that machine noise hits
them alike. A step is forward + backward + ``opt.step()`` including each optimizer's own
work (statistics, inversions, the quadratic model). Configurations:

* ``kfac-s1i10`` / ``ekfac-s1i10``: fixed lr 0.1, damping 0.1, statistics every step,
  inverses every 10 (the issue's benchmark setting);
* ``kfac`` / ``ekfac``: the defaults (automatic lr, momentum and damping, statistics every
  5 steps, inverses every 10);
* ``--variant NAME=JSON`` (repeatable): ``natgrad.KFAC`` with the JSON's arguments, e.g.
  ``--variant rows8='{"curvature_rows": 8}'``.

``--phases`` then times where natgrad's default KFAC step goes, one run per problem after the
ratios (CPU time per step, mean over the steps after the first 20, ``time.process_time``
around natgrad's functions): the forward and backward (with natgrad's hooks and the
sampled-label backward of statistics steps), statistics, inverses (refreshes), the
preconditioning, the quadratic model's Jacobian-vector products, the rest of the quadratic
model, the check of the step (ρ: a forward per try) and everything else in ``opt.step()``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

import natgrad
from natgrad.bench import PROBLEMS
from natgrad.optim import control, kronecker, step

CONFIGS = {
    "adam": lambda model, loss: torch.optim.Adam(model.parameters(), lr=3e-3),
    "kfac-s1i10": lambda model, loss: natgrad.KFAC(
        model, loss=loss, lr=0.1, damping=0.1, momentum=0.9, stat_every=1, inv_every=10
    ),
    "ekfac-s1i10": lambda model, loss: natgrad.EKFAC(
        model, loss=loss, lr=0.1, damping=0.1, momentum=0.9, stat_every=1, inv_every=10
    ),
    "kfac": lambda model, loss: natgrad.KFAC(model, loss=loss),
    "ekfac": lambda model, loss: natgrad.EKFAC(model, loss=loss),
}


def variant(hparams: dict) -> Callable[[torch.nn.Module, torch.nn.Module], torch.optim.Optimizer]:
    """``natgrad.KFAC`` with ``hparams`` on top of the defaults."""
    return lambda model, loss: natgrad.KFAC(model, loss=loss, **hparams)


def time_problem(name: str, steps: int, block: int) -> dict[str, tuple[float, float]]:
    problem = PROBLEMS[name]
    data = problem.load(0)
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for config, build in CONFIGS.items():
        torch.manual_seed(0)
        model = problem.build_model()
        runs[config] = (model, build(model, problem.loss), [])
    x_all, y_all = data.x_train, data.y_train
    for start in range(0, steps, block):
        batches = [torch.randint(0, len(x_all), (problem.batch_size,), generator=gen)
                   for _ in range(min(block, steps - start))]
        for model, opt, times in runs.values():
            for idx in batches:
                x, y = x_all[idx], y_all[idx]
                begin = time.perf_counter()
                opt.zero_grad()
                problem.compute_loss(model(x), y).backward()
                opt.step()
                times.append(time.perf_counter() - begin)
    warmup = min(20, steps // 5)
    return {config: (statistics.median(times[warmup:]), statistics.mean(times[warmup:]))
            for config, (_, _, times) in runs.items()}


# phase name -> (owner, attribute): the functions whose CPU time --phases adds up; a phase
# running inside another (products inside the quadratic model) is subtracted from it
PHASES = {
    "statistics": (kronecker.KroneckerPreconditioner, "_gather_statistics"),
    "inverses": (kronecker.KroneckerPreconditioner, "_refresh"),
    "preconditioning": (kronecker.KroneckerPreconditioner, "apply"),
    "quadratic model": (control.QuadraticControl, "updates"),
    "J·t products": (control, "_jvps"),
    "check (ρ)": (step, "_reduction_ratio"),
}


@contextmanager
def timed_phases(totals: dict[str, float]) -> Iterator[None]:
    """Wrap each of :data:`PHASES` so that its CPU time adds to ``totals[name]``."""
    originals = {name: getattr(owner, attr) for name, (owner, attr) in PHASES.items()}

    def wrapper(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            begin = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.process_time() - begin
        return timed

    try:
        for name, (owner, attr) in PHASES.items():
            setattr(owner, attr, wrapper(name, originals[name]))
        yield
    finally:
        for name, (owner, attr) in PHASES.items():
            setattr(owner, attr, originals[name])


def phase_times(name: str, steps: int, skip: int = 20) -> dict[str, float]:
    """ms per step of natgrad's default KFAC on ``name`` in each phase (see module doc)."""
    problem = PROBLEMS[name]
    data = problem.load(0)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = problem.build_model()
    opt = natgrad.KFAC(model, loss=problem.loss)
    totals: dict[str, float] = {}
    with timed_phases(totals):
        for i in range(skip + steps):
            if i == skip:
                totals.clear()
            idx = torch.randint(0, len(data.x_train), (problem.batch_size,), generator=gen)
            x, y = data.x_train[idx], data.y_train[idx]
            begin = time.process_time()
            opt.zero_grad()
            problem.compute_loss(model(x), y).backward()
            middle = time.process_time()
            opt.step()
            end = time.process_time()
            totals["forward+backward"] = totals.get("forward+backward", 0.0) + middle - begin
            totals["step"] = totals.get("step", 0.0) + end - middle
    totals["quadratic model"] -= totals.get("J·t products", 0.0)  # nested in it
    inside = sum(v for k, v in totals.items() if k not in ("forward+backward", "step"))
    totals["other"] = totals.pop("step") - inside
    return {k: v * 1000 / steps for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--problems", default="digits-mlp,digits-autoencoder")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=JSON: also time natgrad.KFAC with these arguments")
    parser.add_argument("--phases", action="store_true",
                        help="also break natgrad's default KFAC step into phases")
    args = parser.parse_args()
    for spec in args.variant:
        name, _, hparams = spec.partition("=")
        CONFIGS[name] = variant(json.loads(hparams))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    summary = {}
    for name in args.problems.split(","):
        medians = time_problem(name, args.steps, args.block)
        print(f"{name} ({args.threads} thread(s), batch {PROBLEMS[name].batch_size})")
        adam_median, adam_mean = medians["adam"]
        for config, (median, mean) in medians.items():
            print(f"  {config:<12} median {median * 1000:7.2f} ms  {median / adam_median:5.2f}x "
                  f"Adam   mean {mean * 1000:7.2f} ms  {mean / adam_mean:5.2f}x Adam")
        summary[name] = {c: {"ms": m * 1000, "x_adam": m / adam_median,
                             "mean_ms": a * 1000, "mean_x_adam": a / adam_mean}
                         for c, (m, a) in medians.items()}
    print(json.dumps(summary))
    if args.phases:
        names = args.problems.split(",")
        phases = {name: phase_times(name, args.steps) for name in names}
        order = ["forward+backward", *PHASES, "other"]
        print("KFAC default, CPU ms per step by phase (after 20 steps):")
        print("| phase | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for phase in order:
            print(f"| {phase} | " + " | ".join(f"{phases[n].get(phase, 0.0):.2f}"
                                              for n in names) + " |")
        totals = {n: sum(phases[n].values()) for n in names}
        print("| total | " + " | ".join(f"{totals[n]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
