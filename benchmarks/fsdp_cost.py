"""KFAC and EKFAC under FSDP2 (``fully_shard``) on W gloo processes: bytes per step, memory.

    python benchmarks/fsdp_cost.py --world 1 2 4 --steps 20 --placement balanced owner \
        --optimizer kfac ekfac

Trains an MLP (784 → 256 → 128 → 10, float32, ``fully_shard`` on each Linear and on the
model for W > 1) with ``natgrad.KFAC``'s (or ``EKFAC``'s) defaults, but without the
curvature warm-up (the steady schedule from the first step), and each
``inverse_placement`` on a global batch of 256 random examples split over the ranks, and
prints per optimizer, placement and W:

* natgrad's own communication per step: the payload a rank passes to collectives (the flat
  buffers, from ``optimizer.communicator``) and the bytes it sends on the wire inside them
  (the growth of the process's ``wchar`` in ``/proc/self/io`` during natgrad's collectives:
  gloo writes its TCP traffic with ``writev``, so this measures what gloo's algorithms
  actually send, e.g. 2(W−1)/W of the buffer for a ring all-reduce); the largest rank's.
  FSDP's own all-gathers and reduce-scatters come on top (not counted);
* natgrad's state on the fullest and the emptiest rank (factors, inverses, momentum: every
  tensor in ``optimizer.state``, a DTensor by its local shard, plus EKFAC's cached eigenbases
  of blocks other ranks own under ``"owner"``), and of it the momentum δ₀
  (``previous_update``) on the fullest rank;
* the parameters a rank holds (its shards) and the time per step.

The last line is the JSON of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.distributed.kfac import kronecker_preconditioner
from natgrad.distributed.launch import init_from_env, spawn

BATCH = 256
COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather")  # natgrad's (Communicator)


def _bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.numel() * local.element_size()
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    return 0


def _written() -> int | None:
    """Bytes this process has written so far (``wchar``), None where Linux does not say."""
    try:
        with open("/proc/self/io") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("wchar"))
    except (OSError, StopIteration):
        return None


def count_sent(comm: object) -> dict[str, int]:
    """Count the bytes this process writes inside each of ``comm``'s collectives, by
    collective (a wrapper around its methods on this instance; nothing else changes)."""
    counter = dict.fromkeys(COLLECTIVES, 0)
    for name in COLLECTIVES:
        method = getattr(comm, name, None)
        if method is None:
            continue

        def wrapped(*args: object, _method: object = method, _name: str = name,
                    **kwargs: object) -> object:
            before = _written()
            try:
                return _method(*args, **kwargs)
            finally:
                after = _written()
                if before is not None and after is not None:
                    counter[_name] += after - before

        setattr(comm, name, wrapped)
    return counter


def _figure(value: float | None, width: int) -> str:
    return f"{'n/a' if value is None else format(value, ',.0f'):>{width}}"


def worker(steps: int, optimizer: str, placement: str, out: str) -> None:
    """One rank: train, then write this rank's figures to ``out/rank{r}.json``."""
    torch.set_num_threads(1)
    init_from_env("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 128), nn.Tanh(),
                          nn.Linear(128, 10))
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module)
        fully_shard(model)
    # the steady schedule (statistics every 5 steps, inverses every 10) from the first step
    opt = getattr(natgrad, optimizer)(model, loss=nn.CrossEntropyLoss(),
                                      inverse_placement=placement, curvature_warmup=0)
    sent = count_sent(opt.communicator)
    gen = torch.Generator().manual_seed(1)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    start = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(BATCH, 784, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    seconds = (time.perf_counter() - start) / steps
    measured = _written() is not None  # else no figures on the wire (not Linux)
    figures = {
        "optimizer": optimizer, "world": world, "rank": rank,
        "placement": kronecker_preconditioner(opt).sync.placement,
        "natgrad_bytes_per_step": opt.communicator.bytes / steps,
        "natgrad_sent_per_step": sum(sent.values()) / steps if measured else None,
        **{f"sent_{name}_per_step": sent[name] / steps if measured else None
           for name in COLLECTIVES},
        "natgrad_calls_per_step": opt.communicator.calls / steps,
        "state_bytes": sum(_bytes(s) for s in opt.state.values())
        + kronecker_preconditioner(opt).sync.cached_bytes(),
        "momentum_bytes": sum(_bytes(s.get("previous_update")) for s in opt.state.values()),
        "param_bytes": sum(_bytes(p) for p in model.parameters()),
        "seconds_per_step": seconds,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(figures))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--placement", nargs="+", default=["balanced", "owner"],
                        choices=["auto", "balanced", "everywhere", "owner"])
    parser.add_argument("--optimizer", nargs="+", default=["kfac", "ekfac"],
                        choices=["kfac", "ekfac"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    runs = [(o.upper(), p, w) for o in args.optimizer for p in args.placement
            for w in args.world if w > 1 or p == args.placement[0]]  # W = 1: one placement
    for optimizer, placement, world in runs:
        with tempfile.TemporaryDirectory() as out:
            spawn(worker, world, (args.steps, optimizer, placement, out))
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
        row = {key: None if None in (values := [r[key] for r in ranks]) else max(values)
               for key in ranks[0] if key != "rank"}  # the largest rank's
        row["min_state_bytes"] = min(r["state_bytes"] for r in ranks)
        rows.append(row)
    print(f"{'optimizer':>9} {'placement':>10} {'W':>3} {'payload B/step':>15} "
          f"{'sent B/step':>12} {'calls/step':>11} {'state B, max rank':>18} {'min rank':>10} "
          f"{'momentum B':>11} {'params B/rank':>14} {'s/step':>8}")
    for r in rows:
        print(f"{r['optimizer']:>9} {r['placement']:>10} {r['world']:>3} "
              f"{r['natgrad_bytes_per_step']:>15,.0f} {_figure(r['natgrad_sent_per_step'], 12)} "
              f"{r['natgrad_calls_per_step']:>11.1f} {r['state_bytes']:>18,} "
              f"{r['min_state_bytes']:>10,} {r['momentum_bytes']:>11,} "
              f"{r['param_bytes']:>14,} {r['seconds_per_step']:>8.3f}")
    print(f"\nbytes sent per step by natgrad's collectives (largest rank's)\n"
          f"{'optimizer':>9} {'placement':>10} {'W':>3} "
          + " ".join(f"{name:>12}" for name in COLLECTIVES))
    for r in rows:
        print(f"{r['optimizer']:>9} {r['placement']:>10} {r['world']:>3} "
              + " ".join(_figure(r[f"sent_{name}_per_step"], 12) for name in COLLECTIVES))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
