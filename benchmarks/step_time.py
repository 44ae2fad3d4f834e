"""Median and mean step time of KFAC and EKFAC as a ratio to Adam's, measured in one run.

    python benchmarks/step_time.py [--threads 1] [--steps 200] [--problems digits-mlp,...]
                                   [--variant NAME=JSON ...]

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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import natgrad
from natgrad.bench import PROBLEMS

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--problems", default="digits-mlp,digits-autoencoder")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=JSON: also time natgrad.KFAC with these arguments")
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


if __name__ == "__main__":
    main()
