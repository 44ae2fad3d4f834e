"""Automatic K-FAC against best-of-grid fixed K-FAC and best-of-grid Adam: seconds to target.

    python benchmarks/auto_vs_grid.py [--problems digits-mlp,digits-autoencoder] [--threads 1]

For each problem: Adam runs its whole step budget for every lr of its grid; the target loss is
the best final full-training-set loss among them. Fixed K-FAC runs every (lr, damping) of its
grid (momentum 0.9, KL clipping 1e-2, statistics every 5 steps, inverses every 10, the same
schedule as the automatic default) and automatic K-FAC runs once with every hyper-parameter
at its default. Time to target counts optimizer steps only (natgrad.bench's runner). Prints
each method's best seconds to target and the ratios, then one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import warnings

import torch

from natgrad.bench import OPTIMIZERS, PROBLEMS
from natgrad.bench.results import seconds_to_target, steps_to_target
from natgrad.bench.runner import train_run

ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
KFAC_GRID = {"lr": (0.03, 0.1, 0.3), "damping": (1e-2, 0.1, 1.0)}
KFAC_FIXED = {"momentum": 0.9, "kl_clip": 1e-2, "stat_every": 5, "inv_every": 10}


def best(runs, target):
    """(seconds, steps, hparams) of the run that reaches ``target`` soonest."""
    reached = [(seconds_to_target(r.curve, target), steps_to_target(r.curve, target), r.hparams)
               for r in runs]
    reached = [r for r in reached if r[0] is not None]
    return min(reached, key=lambda r: r[0]) if reached else (None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="digits-mlp,digits-autoencoder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    summary = {}
    for name in args.problems.split(","):
        problem = PROBLEMS[name]
        data = problem.load(args.seed)
        eval_every = problem.eval_every(problem.steps)

        def run(optimizer, hparams, steps, data=data, problem=problem, eval_every=eval_every):
            return train_run(problem, data, OPTIMIZERS[optimizer], hparams, steps=steps,
                             eval_every=eval_every, seed=args.seed)

        adam = [run("adam", {"lr": lr}, problem.steps) for lr in ADAM_GRID]
        target = min(r.final_train_loss for r in adam)
        kfac_steps = problem.steps // 2
        fixed = [run("kfac-fixed", {**dict(zip(KFAC_GRID, values, strict=True)), **KFAC_FIXED},
                     kfac_steps) for values in itertools.product(*KFAC_GRID.values())]
        auto = [run("kfac", {}, kfac_steps)]
        rows = {"adam (best lr)": best(adam, target), "kfac fixed (best of grid)":
                best(fixed, target), "kfac auto (defaults)": best(auto, target)}
        adam_seconds = rows["adam (best lr)"][0]
        print(f"{name}: target loss {target:.4g} (best Adam after {problem.steps} steps)")
        summary[name] = {"target_loss": target}
        for label, (seconds, steps, hparams) in rows.items():
            ratio = None if seconds is None or not adam_seconds else seconds / adam_seconds
            text = "not reached" if seconds is None else f"{seconds:7.2f} s, {steps} steps"
            ratio_text = "" if ratio is None else f", {ratio:.2f}x Adam"
            print(f"  {label:<26} {text}{ratio_text}  {hparams}")
            summary[name][label] = {"seconds": seconds, "steps": steps, "ratio": ratio,
                                    "hparams": hparams}
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
