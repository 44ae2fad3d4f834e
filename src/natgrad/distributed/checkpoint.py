"""Checkpoints of data-parallel training that load on any number of processes.

Every rank holds the same parameters and the same optimizer state (statistics, inverses,
momentum: natgrad keeps them identical), so one copy, written by rank 0, restores a run on
any world size. The one per-rank piece is K-FAC's label generator (each rank draws its own
labels for the true Fisher): :func:`save_checkpoint` gathers every rank's generator state
and :func:`load_checkpoint` gives each rank its own back when the world size is unchanged,
so a restarted run continues exactly where the checkpoint left it. On another world size a
rank without a saved stream forks one of its own (see :meth:`natgrad.KFAC.load_state_dict`).

A model sharded with FSDP2 (``fully_shard``) is saved whole: its shards are gathered into
one full state dict on rank 0 (on the CPU), and loaded by every rank taking its own shards
of it, so the checkpoint loads on any world size, sharded or not. The optimizer state that
FSDP2 shards like its parameter (the momentum, a DTensor) is gathered whole the same way, and
each rank keeps its rows of it again on loading (:meth:`natgrad.KFAC.load_state_dict`).

With ``inverse_placement="owner"`` each rank holds only the blocks it owns: the checkpoint
gathers every rank's optimizer state into one that holds every block (rank 0's entries
first, each block's from its owner), and loading keeps each rank's own blocks.

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
from natgrad.distributed.fsdp import is_sharded
from natgrad.distributed.kfac import keeps_state_on_owners

__all__ = ["load_checkpoint", "read_checkpoint", "save_checkpoint"]

GLOBAL = "natgrad"  # natgrad's optimizer-wide state entry (CurvatureOptimizer.global_state)


def _rng_state(state: dict[str, Any]) -> torch.Tensor | None:
    return state["state"].get(GLOBAL, {}).get("rng_state")


def _sharded(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def _model_state(model: nn.Module) -> dict[str, Any]:
    """The model's state dict with whole tensors (a sharded model's: on rank 0 only)."""
    if not _sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _whole_state(state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state dict with its sharded tensors (DTensors: FSDP2's momentum) whole
    (collective where there are any: every rank holds them for the same parameters)."""
    entries = dict(state["state"])
    # in parameter order: the ranks' state entries may have been made in different orders
    for key in sorted(k for k in entries if isinstance(k, int)):
        if any(is_sharded(v) for v in entries[key].values()):
            entries[key] = {name: v.full_tensor() if is_sharded(v) else v
                            for name, v in entries[key].items()}
    return {**state, "state": entries}


def _merged_state(state: dict[str, Any], comm: Communicator) -> dict[str, Any]:
    """Every rank's optimizer state in one (on rank 0): per entry the union of the ranks'
    keys, a key from the lowest rank that has it (the block states only their owners; the
    states of blocks over rows of a parameter, nested in its entry, merged the same way)."""
    import torch.distributed as dist

    parts: list[Any] | None = [None] * comm.world_size if comm.rank == 0 else None
    dist.gather_object(state, parts, dst=comm._global_rank(0), group=comm.group)
    if parts is None:
        return state
    merged: dict[Any, dict[str, Any]] = {}
    for part in parts:
        for key, entry in part["state"].items():
            target = merged.setdefault(key, {})
            for name, value in entry.items():
                if isinstance(value, dict) and isinstance(target.get(name), dict):
                    target[name] = {**value, **target[name]}  # a block over rows of the entry
                else:
                    target.setdefault(name, value)
    return {**parts[0], "state": merged}


def _load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a whole state dict (a sharded model takes this rank's shards of it)."""
    if not _sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(
    path: str | Path, comm: Communicator, model: nn.Module, optimizer: Optimizer, **extra: Any
) -> None:
    """Write model, optimizer and ``extra`` to ``path`` (rank 0; atomically, by renaming).

    Args:
        path: the checkpoint file.
        comm: the data-parallel communicator (every rank must call this function).
        model: the model (not its DDP wrapper; a ``fully_shard``-ed model is saved whole).
        optimizer: the optimizer.
        extra: anything else to store (the step, the configuration, ...).
    """
    state = _whole_state(optimizer.state_dict())  # collective for sharded state
    if keeps_state_on_owners(optimizer):  # every rank's blocks, on rank 0
        state = _merged_state(state, comm)
    model_state = _model_state(model)  # collective for a sharded model
    rng = _rng_state(state)
    streams = None if rng is None else [s.cpu() for s in comm.all_gather(rng)]
    if comm.rank == 0:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"model": model_state, "optimizer": state, "rng_streams": streams,
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

    With the world size it was written on, each rank gets its own label stream back. A
    sharded model takes this rank's shards of the saved whole tensors.
    """
    checkpoint = read_checkpoint(path)
    _load_model_state(model, checkpoint["model"])
    state = checkpoint["optimizer"]
    streams = checkpoint.get("rng_streams")
    if streams is not None and checkpoint.get("world_size") == comm.world_size:
        state["state"][GLOBAL].update(rng_state=streams[comm.rank], rng_rank=comm.rank)
    optimizer.load_state_dict(state)
    return checkpoint
