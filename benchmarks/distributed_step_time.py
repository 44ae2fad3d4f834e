"""Data-parallel step time and traffic of natgrad's K-FAC on the digits autoencoder.

    python benchmarks/distributed_step_time.py [--steps 300] [--optimizers kfac,ekfac]

Every configuration trains ``digits-autoencoder`` (64-256-128-32-128-256-64, Bernoulli) at
the same *global* batch of 256 with ``natgrad train`` (the tuned fixed-lr settings:
statistics every 5 steps, inverses every 10), in a fresh process group each:

* ``1 proc x 1 thread``: the single-process baseline (nothing is communicated);
* ``1 proc x 2 threads``: the same two cores used by intra-op threads instead;
* ``2 procs x 1 thread``: DistributedDataParallel on gloo over 127.0.0.1, 128 examples a
  rank, inverses placed by cost and broadcast (``balanced``), or computed on both ranks
  (``everywhere``).

A step is forward + backward (with DDP's gradient all-reduce) + ``opt.step()``. Reported:
median and mean step time (the mean includes the statistics and inversion steps), the speed-up
of the mean over the baseline, and bytes per step each rank contributes to collectives:
natgrad's own (factor all-reduce, inverse broadcasts) and DDP's gradient all-reduce. One
JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = (  # name, processes, threads, inverse placement
    ("1 proc x 1 thread", 1, 1, "balanced"),
    ("1 proc x 2 threads", 1, 2, "balanced"),
    ("2 procs x 1 thread, balanced", 2, 1, "balanced"),
    ("2 procs x 1 thread, everywhere", 2, 1, "everywhere"),
)


def run(optimizer: str, nproc: int, threads: int, placement: str, steps: int) -> dict:
    """One ``natgrad train`` run; its JSON summary."""
    command = [sys.executable, "-m", "natgrad.cli", "train", "--problem", "digits-autoencoder",
               "--optimizer", optimizer, "--steps", str(steps), "--batch-size", "256",
               "--nproc", str(nproc), "--threads", str(threads),
               "--inverse-placement", placement]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--optimizers", default="kfac,ekfac")
    args = parser.parse_args()
    rows = []
    for optimizer in args.optimizers.split(","):
        base = None
        for name, nproc, threads, placement in CONFIGS:
            result = run(optimizer, nproc, threads, placement, args.steps)
            base = base or result["mean_step_seconds"]
            rows.append({"optimizer": optimizer, "config": name, "processes": nproc,
                         "threads": threads, "inverse_placement": placement,
                         "median_ms": 1e3 * result["median_step_seconds"],
                         "mean_ms": 1e3 * result["mean_step_seconds"],
                         "speedup": base / result["mean_step_seconds"],
                         "natgrad_bytes": result["natgrad_bytes_per_step"],
                         "ddp_bytes": result["ddp_bytes_per_step"],
                         "final_train_loss": result["final_train_loss"]})
    print(f"digits-autoencoder, global batch 256, {args.steps} steps, CPU")
    print(f"{'optimizer':<9} {'configuration':<31} {'median ms':>9} {'mean ms':>8} "
          f"{'speed-up':>8} {'natgrad B/step':>14} {'DDP B/step':>11} {'final loss':>10}")
    for r in rows:
        print(f"{r['optimizer']:<9} {r['config']:<31} {r['median_ms']:>9.2f} {r['mean_ms']:>8.2f} "
              f"{r['speedup']:>7.2f}x {r['natgrad_bytes']:>14,.0f} {r['ddp_bytes']:>11,.0f} "
              f"{r['final_train_loss']:>10.4g}")
    print(json.dumps({"steps": args.steps, "global_batch": 256, "rows": rows}))


if __name__ == "__main__":
    main()
