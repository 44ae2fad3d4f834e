"""Time of one NaturalGradient step, Woodbury vs Cholesky, on an MLP with about 10⁴ parameters.

    python benchmarks/ngd_solvers.py [--threads 1] [--batch 64] [--repeats 5]

Prints the median seconds of a full training step (forward, backward, Fisher rows, solve,
update) for each solver, their ratio, and the relative difference of the two steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import natgrad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs, labels = load_digits(return_X_y=True)
    x = torch.tensor(inputs[: args.batch] / 16.0, dtype=torch.float32)
    y = torch.tensor(labels[: args.batch])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 10),
    )
    params = sum(p.numel() for p in model.parameters())
    results, steps = {}, {}
    for solver in ("woodbury", "cholesky"):
        times = []
        for _ in range(args.repeats):
            trial = copy.deepcopy(model)
            opt = natgrad.NaturalGradient(trial, lr=1.0, damping=0.1, solver=solver)
            before = [p.detach().clone() for p in trial.parameters()]
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(trial(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - start)
            after = list(trial.parameters())
            steps[solver] = torch.cat(
                [(b - p.detach()).reshape(-1) for b, p in zip(before, after, strict=True)]
            )
        results[solver] = statistics.median(times)
    diff = float((steps["woodbury"] - steps["cholesky"]).norm() / steps["cholesky"].norm())
    print(f"MLP 64-96-32-10, {params} parameters, batch {args.batch}, {args.threads} thread(s)")
    for solver, seconds in results.items():
        print(f"  {solver:<9} {seconds * 1000:9.1f} ms per step")
    ratio = results["cholesky"] / results["woodbury"]
    print(f"  cholesky / woodbury: {ratio:.1f}x; relative step difference {diff:.1e}")
    print(json.dumps({"params": params, "batch": args.batch, "seconds": results,
                      "cholesky_over_woodbury": ratio, "step_rel_diff": diff}))


if __name__ == "__main__":
    main()
