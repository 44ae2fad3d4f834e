"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): written by every rank, read on any
world size.

DCP saves a flat state dict of tensors as a folder that every rank writes its part of, and
loads it in place into the tensors of a state dict with the same keys, on any number of
ranks: a DTensor (an FSDP2 parameter) takes its shard of the saved whole, a plain tensor all
of it. natgrad's optimizer state is made of whole tensors (statistics, inverses), and under
FSDP2 of DTensors sharded like their parameters (the momentum,
:data:`natgrad.distributed.fsdp.SHARDED_STATE`), so keyed by parameter name rather than by
position it loads on any world size. :func:`optimizer_state_dict` gives that flat dict::

    state/{parameter name}/{state key}        a tensor (or a pickled value)
    state/{parameter name}/rows a:b/{key}     a block over rows a:b of the parameter
    global/{key}                              optimizer-wide values (step, damping, ...)
    rng/{rank}                                each rank's label stream (a uint8 tensor)
    param_groups, world_size                  pickled values

Values other than tensors are pickled into ``bytes`` so that DCP stores each as one item.
Every rank passes the state it holds: with the same key on several ranks (replicated state)
DCP writes it once, so under ``inverse_placement="owner"`` each block is written by its owner,
the momentum of an FSDP2 model by every rank its own rows (of a replicated model by one
rank).

Loading needs the keys and shapes before reading (DCP loads in place):
:func:`optimizer_template` makes them from the checkpoint's metadata, leaving out the blocks
this rank does not own and, for a sharded parameter, making its momentum a DTensor placed
like the parameter, so that DCP reads only this rank's rows of it (from the saved rows of
any world size, or from a whole tensor); :func:`load_optimizer_state_dict` hands the loaded
values to the optimizer. On the world size it was saved on, each rank gets its own label
stream back; on another, rank 0's (the other ranks fork their own from it, as
:meth:`natgrad.KFAC.load_state_dict` does). :func:`save_dcp` and :func:`load_dcp` are the
whole recipe, the model included (``get_model_state_dict``: an FSDP2 model's shards,
resharded by DCP on load).

Both recipes are collective under a process group (every rank calls them); without one they
read and write on this process alone.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from natgrad.distributed.fsdp import SHARDED_STATE, is_sharded, shard_like
from natgrad.distributed.kfac import kronecker_preconditioner

__all__ = [
    "load_dcp",
    "load_optimizer_state_dict",
    "optimizer_state_dict",
    "optimizer_template",
    "save_dcp",
]

GLOBAL = "natgrad"  # natgrad's optimizer-wide state entry (CurvatureOptimizer.global_state)
PER_RANK = ("rng_state", "rng_rank")  # global entries that are each rank's own


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _names(optimizer: Optimizer) -> dict[int, str]:
    """id(parameter) → its name in the optimizer's model (``named_parameters``)."""
    model = getattr(optimizer, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError("optimizer: a natgrad optimizer (it holds its model), got "
                        f"{type(optimizer).__name__}")
    names = {}
    for name, p in model.named_parameters():
        if "/" in name:
            raise ValueError(f"optimizer: parameter name {name!r} contains '/', which the "
                             "checkpoint keys use as separator")
        names[id(p)] = name
    return names


def _named(optimizer: Optimizer) -> dict[str, Tensor]:
    """The optimizer's parameters by name in its model."""
    names = _names(optimizer)
    return {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]}


def _pack(value: Any) -> Any:
    return value if isinstance(value, Tensor) else pickle.dumps(value)


def _unpack(value: Any) -> Any:
    return pickle.loads(value) if isinstance(value, bytes) else value


def optimizer_state_dict(optimizer: Optimizer) -> dict[str, Any]:
    """This rank's optimizer state as a flat, name-keyed dict for ``dcp.save`` (see module
    doc for the keys); tensors are the optimizer's own (not copies).

    Args:
        optimizer: a natgrad optimizer (``KFAC``, ``EKFAC``, ``NGDCG``, ...).

    Raises:
        TypeError: an optimizer that does not hold its model.
        ValueError: a parameter name containing ``/``.
    """
    names = _names(optimizer)
    packed = optimizer.state_dict()  # torch's contract: parameters by position
    position = {}
    for group, saved in zip(optimizer.param_groups, packed["param_groups"], strict=True):
        position.update(zip(saved["params"], (names[id(p)] for p in group["params"]),
                            strict=True))
    rank, world = _rank_and_world()
    flat: dict[str, Any] = {"world_size": _pack(world)}
    for key, entry in packed["state"].items():
        if key == GLOBAL:
            for name, value in entry.items():
                if name == "rng_state":
                    flat[f"rng/{rank}"] = value
                elif name not in PER_RANK:
                    flat[f"global/{name}"] = _pack(value)
            continue
        prefix = f"state/{position[key]}"
        for name, value in entry.items():
            if isinstance(value, dict):  # a block over rows of the parameter
                for inner, item in value.items():
                    flat[f"{prefix}/{name}/{inner}"] = _pack(item)
            else:
                flat[f"{prefix}/{name}"] = _pack(value)
    groups = [{**g, "params": [position[i] for i in g["params"]]}
              for g in packed["param_groups"]]
    flat["param_groups"] = _pack(groups)
    return flat


def _owned_blocks(optimizer: Optimizer) -> tuple[Any, dict[tuple[str, str | None], str]]:
    """The optimizer's exchange and, under ``inverse_placement="owner"``, where each block
    keeps its state: (parameter name, rows entry or None) → block name (else empty)."""
    preconditioner = kronecker_preconditioner(optimizer)
    if preconditioner is None or not preconditioner.sync.on_owners:
        return None, {}
    names = _names(optimizer)
    where = {}
    for name, block in preconditioner.blocks.items():
        first = block.handler.params[0]
        rows = block.handler.row_slice(first)
        where[(names[id(first)], None if rows is None else f"rows {rows.start}:{rows.stop}")] = name
    return preconditioner, where


def optimizer_template(
    optimizer: Optimizer, metadata: Any, prefix: str = "optimizer."
) -> dict[str, Any]:
    """The state dict for ``dcp.load`` to fill on this rank: the saved optimizer keys this
    rank needs, as empty CPU tensors of the saved shapes and dtypes (pickled values: None).

    Left out: the blocks this rank does not own (``inverse_placement="owner"``), and the
    other ranks' label streams (on the saved world size this rank's own is loaded, else
    rank 0's). The momentum of a sharded (FSDP2) parameter is this rank's rows, a DTensor
    placed like the parameter, on the parameter's device.

    Args:
        optimizer: the optimizer to load into (built as for the saved run).
        metadata: the checkpoint's ``Metadata`` (``FileSystemReader(path).read_metadata()``).
        prefix: where the optimizer's keys sit in the saved state dict (DCP joins nested
            keys with "."; :func:`save_dcp` nests them under ``"optimizer"``).
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {key[len(prefix):]: md for key, md in metadata.state_dict_metadata.items()
             if key.startswith(prefix)}
    if "param_groups" not in saved:
        raise ValueError(f"metadata: no optimizer state under the prefix {prefix!r}")
    rank, world = _rank_and_world()
    streams = sum(key.startswith("rng/") for key in saved)
    stream = f"rng/{rank if streams == world else 0}"
    preconditioner, where = _owned_blocks(optimizer)
    sharded = {name: p for name, p in _named(optimizer).items() if is_sharded(p)}
    template: dict[str, Any] = {}
    for key, md in saved.items():
        parts = key.split("/")
        if parts[0] == "rng" and key != stream:
            continue
        block = where.get((parts[1], parts[2] if len(parts) == 4 else None)) \
            if parts[0] == "state" else None
        if block is not None and preconditioner.sync.drops(preconditioner.blocks, block,
                                                            parts[-1]):
            continue  # a block another rank owns
        param = sharded.get(parts[1]) if len(parts) == 3 else None
        if isinstance(md, TensorStorageMetadata) and param is not None \
                and parts[2] in SHARDED_STATE and tuple(md.size) == tuple(param.shape):
            local = param.to_local()  # this rank's rows of the parameter
            template[key] = shard_like(param, torch.empty(local.shape, dtype=md.properties.dtype,
                                                          device=local.device))
        elif isinstance(md, TensorStorageMetadata):
            template[key] = torch.empty(md.size, dtype=md.properties.dtype)
        else:
            template[key] = None
    return template


def load_optimizer_state_dict(optimizer: Optimizer, state: dict[str, Any]) -> None:
    """Load the flat state of :func:`optimizer_state_dict` (a filled
    :func:`optimizer_template`) into ``optimizer`` through its ``load_state_dict``.

    Raises:
        ValueError: the saved parameter groups name parameters ``optimizer`` does not have.
    """
    names = _names(optimizer)
    groups = _unpack(state["param_groups"])
    position, index = {}, 0
    for group in optimizer.param_groups:  # torch's positions: in group order, from 0
        for p in group["params"]:
            position.setdefault(names[id(p)], index)
            index += 1
    missing = sorted({n for g in groups for n in g["params"]} - set(position))
    if missing:
        raise ValueError(f"state: parameters not in the optimizer: {', '.join(missing)}")
    packed_state: dict[Any, dict[str, Any]] = {}
    for key, value in state.items():
        parts = key.split("/")
        if parts[0] == "state":
            entry = packed_state.setdefault(position[parts[1]], {})
            if len(parts) == 4:  # a block over rows of the parameter
                entry = entry.setdefault(parts[2], {})
            entry[parts[-1]] = _unpack(value)
        elif parts[0] == "global":
            packed_state.setdefault(GLOBAL, {})[parts[1]] = _unpack(value)
        elif parts[0] == "rng":  # another rank's stream is forked from (load_state_dict)
            packed_state.setdefault(GLOBAL, {}).update(rng_state=value, rng_rank=int(parts[1]))
    packed_groups = [{**g, "params": [position[n] for n in g["params"]]} for g in groups]
    optimizer.load_state_dict({"state": packed_state, "param_groups": packed_groups})


def save_dcp(checkpoint_id: str | os.PathLike, model: nn.Module, optimizer: Optimizer,
             **extra: Any) -> None:
    """Save model, optimizer and ``extra`` with ``torch.distributed.checkpoint`` to the folder
    ``checkpoint_id`` (collective: every rank calls it at the same step).

    The model's state is ``get_model_state_dict(model)`` (an FSDP2 model's shards: each rank
    writes its own), the optimizer's :func:`optimizer_state_dict` (each block written once).

    Args:
        checkpoint_id: the checkpoint folder (created).
        model: the model (a ``fully_shard``-ed one, or the module inside DDP).
        optimizer: the natgrad optimizer of ``model``.
        extra: anything else to store (the step, ...), pickled.

    Example:
        >>> save_dcp("run/step-100", model, opt, step=100)
        >>> extra = load_dcp("run/step-100", model, opt)  # on any number of ranks
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {"model": get_model_state_dict(model),
             "optimizer": optimizer_state_dict(optimizer),
             "extra": pickle.dumps(extra)}
    dcp.save(state, checkpoint_id=checkpoint_id, no_dist=_rank_and_world()[1] == 1)


def load_dcp(checkpoint_id: str | os.PathLike, model: nn.Module,
             optimizer: Optimizer) -> dict[str, Any]:
    """Load a :func:`save_dcp` checkpoint into ``model`` and ``optimizer`` on this rank, on any
    world size (collective); returns the saved ``extra``.

    Raises:
        ValueError: the checkpoint holds no natgrad optimizer state.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    metadata = dcp.FileSystemReader(Path(checkpoint_id)).read_metadata()
    state = {"model": get_model_state_dict(model),
             "optimizer": optimizer_template(optimizer, metadata),
             "extra": None}
    dcp.load(state, checkpoint_id=checkpoint_id, no_dist=_rank_and_world()[1] == 1)
    set_model_state_dict(model, state["model"])
    load_optimizer_state_dict(optimizer, state["optimizer"])
    return pickle.loads(state["extra"])
