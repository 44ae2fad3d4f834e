"""Checkpoints of data-parallel training that load on any number of processes.

Every rank holds the same parameters and the same optimizer state (statistics, inverses,
momentum: natgrad keeps them identical), so one copy, written by rank 0, restores a run on
any world size. The one per-rank piece is K-FAC's label generator (each rank draws its own
labels for the true Fisher): :func:`save_checkpoint` gathers every rank's generator state
and :func:`load_checkpoint` gives each rank its own back when the world size is unchanged,
so a restarted run continues exactly where the checkpoint left it. On another world size a
rank without a saved stream forks one of its own (see :meth:`natgrad.KFAC.load_state_dict`).

Both functions are collective: every rank calls them at the same step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from natgrad.distributed.comm import Communicator

__all__ = ["load_checkpoint", "read_checkpoint", "save_checkpoint"]

GLOBAL = "natgrad"  # natgrad's optimizer-wide state entry (CurvatureOptimizer.global_state)


def _rng_state(state: dict[str, Any]) -> torch.Tensor | None:
    return state["state"].get(GLOBAL, {}).get("rng_state")


def save_checkpoint(
    path: str | Path, comm: Communicator, model: nn.Module, optimizer: Optimizer, **extra: Any
) -> None:
    """Write model, optimizer and ``extra`` to ``path`` (rank 0; atomically, by renaming).

    Args:
        path: the checkpoint file.
        comm: the data-parallel communicator (every rank must call this function).
        model: the model (not its DDP wrapper).
        optimizer: the optimizer.
        extra: anything else to store (the step, the configuration, ...).
    """
    state = optimizer.state_dict()
    rng = _rng_state(state)
    streams = None if rng is None else [s.cpu() for s in comm.all_gather(rng)]
    if comm.rank == 0:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"model": model.state_dict(), "optimizer": state, "rng_streams": streams,
                    "world_size": comm.world_size, **extra}, temporary)
        os.replace(temporary, path)  # a reader sees the old file or the new, never half
    comm.barrier()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, tensors on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(
    path: str | Path, comm: Communicator, model: nn.Module, optimizer: Optimizer
) -> dict[str, Any]:
    """Restore model and optimizer from ``path`` on this rank; returns the whole checkpoint.

    With the world size it was written on, each rank gets its own label stream back.
    """
    checkpoint = read_checkpoint(path)
    model.load_state_dict(checkpoint["model"])
    state = checkpoint["optimizer"]
    streams = checkpoint.get("rng_streams")
    if streams is not None and checkpoint.get("world_size") == comm.world_size:
        state["state"][GLOBAL].update(rng_state=streams[comm.rank], rng_rank=comm.rank)
    optimizer.load_state_dict(state)
    return checkpoint
