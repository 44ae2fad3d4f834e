"""Models sharded with FSDP2 (``fully_shard``): whole tensors for the step, shards for the update.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a DTensor sharded along
dim 0 (``Shard(0)`` on a 1-D mesh): rank r holds rows [r·c, (r+1)·c) with c = ⌈d₀/W⌉, and
after ``backward`` its gradient is sharded the same way (the mean of the ranks' gradients,
reduce-scattered by FSDP). Under HSDP (a 2-D mesh, ``(Replicate(), Shard(0))``) the same
holds within each shard group of S ranks (c = ⌈d₀/S⌉; FSDP all-reduces the shards' gradients
over the replicas), so the whole tensors are gathered within the shard group.

natgrad's step needs whole tensors: a Kronecker block preconditions its layer's whole
gradient matrix G⁻¹ X A⁻¹, and the quadratic model evaluates the model at whole parameters.
:class:`ShardedParams` provides them, losslessly:

* :meth:`ShardedParams.whole`: the whole tensors of sharded ones, one bucketed all-gather of
  the padded dim-0 shards per dtype (the gradient at the start of the step, the parameters);
* :meth:`ShardedParams.shard`: this rank's rows of a whole update, applied in place to the
  local shard (no communication: every rank computes the same whole update);
* :meth:`ShardedParams.kept`: per-parameter state the size of its parameter (the momentum
  δ₀) as the parameter is kept: this rank's rows, a DTensor with the parameter's mesh and
  placements, so that ``torch.distributed.checkpoint`` saves each rank's rows and reshards
  them on load; the step gathers the whole δ₀ with :meth:`ShardedParams.whole`;
* :meth:`ShardedParams.own_forwards`: natgrad's own evaluations of the model (the quadratic
  model's Jacobian-vector products, ρ) run with whole parameter tensors swapped into the
  modules and FSDP's forward hooks set aside, so the model computes exactly as the
  unsharded one (FSDP would otherwise all-gather its own copy and discard the swap);
* :meth:`ShardedParams.sampled_backward`: the true Fisher's sampled-label backward, run
  inside the loss's backward, keeps FSDP from resharding the layers it passes through
  (their unsharded weights are needed again by the loss's own backward) and differentiates
  with respect to the unsharded parameters that the graph holds.

The statistics, inverses and directions then follow the data-parallel path of
:mod:`natgrad.distributed.kfac` unchanged, so the steps equal one process on the
concatenated batch up to rounding. :class:`WholeParams` is the same interface for models
whose parameters are whole tensors (one process, DDP): every method returns its input.

Cost per step (P parameters, W ranks, bytes of the parameter dtype): the all-gathers of the
gradients, of the parameters and (with momentum, once there is a δ₀) of the momentum each
move (W−1)/W·P values into every rank, on top of FSDP's own traffic and the data-parallel
exchange of the statistics. The momentum takes P/W values per rank instead of P; where the
factors and inverses live is the placement's business (:mod:`natgrad.distributed.kfac`:
every block on every rank, or each on its owner under ``"owner"``, FSDP2's default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.distributed.comm import Communicator

__all__ = ["SHARDED_STATE", "ShardedParams", "WholeParams", "is_sharded", "param_sharding",
           "shard_like"]

# per-parameter optimizer state that is kept as the parameter is (sharded under FSDP2)
SHARDED_STATE = ("previous_update",)


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (e.g. a parameter or gradient under ``fully_shard``)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def shard_like(param: Tensor, local: Tensor) -> Tensor:
    """A DTensor on ``param``'s mesh and placements whose local tensor is ``local`` (this
    rank's rows of a tensor shaped like the DTensor ``param``; no communication).

    Example:
        >>> momentum = shard_like(weight, torch.zeros_like(weight.to_local()))
    """
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


class WholeParams:
    """Parameters that are whole tensors on every rank (one process, DDP): all no-ops."""

    sharded = False

    def whole(self, tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """The whole tensors of ``tensors``: themselves."""
        return list(tensors)

    def kept(self, param: Tensor, value: Tensor) -> Tensor:
        """Per-parameter state shaped like ``param`` as this rank keeps it: ``value``."""
        return value

    def shard(self, params: Sequence[Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
        """This rank's part of whole tensors shaped like ``params``: all of them."""
        return list(tensors)

    def local(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The tensors an update is added to in place: the parameters."""
        return list(params)

    def own_forwards(self, swapped: Sequence[Tensor] = ()) -> Any:
        """A context for natgrad's own evaluations of the model: nothing to set aside."""
        return nullcontext()

    def sampled_backward(
        self, sampler: Callable[[Any, Tensor], None], targets: Sequence[Tensor]
    ) -> Callable[[Any, Tensor], None]:
        """The label sampler as it is."""
        return sampler


def _fsdp_states(model: nn.Module) -> list[Any]:
    """The FSDP2 states of ``model``'s modules (each once, in module order)."""
    from torch.distributed.fsdp import FSDPModule

    states: list[Any] = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            if all(state is not s for s in states):
                states.append(state)
    return states


class ShardedParams(WholeParams):
    """Parameters sharded on dim 0 by FSDP2 over the ranks of ``comm`` (see module doc).

    Args:
        model: the ``fully_shard``-ed model.
        comm: the communicator of the ranks the parameters are sharded over.
    """

    sharded = True

    def __init__(self, model: nn.Module, comm: Communicator) -> None:
        self.model = model
        self.comm = comm
        self._states = _fsdp_states(model)
        # sharded parameter -> FSDP's record of it (its unsharded twin, used in the graph)
        self._records = {
            id(record.sharded_param): record
            for state in self._states for group in state._fsdp_param_groups
            for record in group.fsdp_params
        }

    # --- whole tensors and shards -------------------------------------------------------------
    def _rows(self, rows: int) -> tuple[int, int, int]:
        """(chunk c, start, stop) of this rank's rows of a dim of ``rows`` (torch.chunk's split)."""
        chunk = math.ceil(rows / self.comm.world_size)
        start = min(self.comm.rank * chunk, rows)
        return chunk, start, min(start + chunk, rows)

    def whole(self, tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Whole tensors of dim-0 sharded DTensors (others, and None, as they are): per
        dtype one all-gather of every tensor's shard padded to c rows, unpadded after.
        Collective when some tensor is sharded: every rank passes the same layout.

        The modules hold their sharded parameters from here on: one kept unsharded after
        backward (``set_reshard_after_backward(False)``) is resharded, since natgrad finds
        the parameters it swaps by the sharded ones' identity.
        """
        self._reshard()
        out: list[Tensor | None] = list(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            if is_sharded(t):
                by_dtype.setdefault(t.dtype, []).append(i)
        for indices in by_dtype.values():
            parts = []
            for i in indices:
                t = tensors[i]
                local = t.to_local()
                chunk, start, stop = self._rows(t.shape[0])
                padded = local.new_zeros((chunk, *t.shape[1:]))
                padded[: stop - start] = local
                parts.append(padded.reshape(-1))
            gathered = self.comm.all_gather(torch.cat(parts))
            offset = 0
            for i in indices:
                t = tensors[i]
                chunk = math.ceil(t.shape[0] / self.comm.world_size)
                size = chunk * math.prod(t.shape[1:])
                pieces = [g[offset : offset + size].view(chunk, *t.shape[1:]) for g in gathered]
                out[i] = torch.cat(pieces)[: t.shape[0]]
                offset += size
        return out

    def _reshard(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()  # no communication; a no-op when already sharded

    def shard(self, params: Sequence[Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
        """This rank's rows of each whole tensor, for the sharded ``params`` (others whole)."""
        out = []
        for p, t in zip(params, tensors, strict=True):
            if is_sharded(p):
                _, start, stop = self._rows(p.shape[0])
                t = t[start:stop]
            out.append(t)
        return out

    def local(self, params: Sequence[Tensor]) -> list[Tensor]:
        """Each parameter's local shard (the tensor FSDP all-gathers from), updated in place."""
        return [p.to_local() if is_sharded(p) else p for p in params]

    def kept(self, param: Tensor, value: Tensor) -> Tensor:
        """Per-parameter state shaped like ``param`` as this rank keeps it: for a sharded
        ``param``, a copy of this rank's rows of the whole tensor ``value`` (the whole may
        be freed) as a DTensor placed like ``param`` (:func:`shard_like`); a DTensor
        ``value`` (already kept) and the state of a whole ``param`` as they are."""
        if not is_sharded(param) or is_sharded(value):
            return value
        _, start, stop = self._rows(param.shape[0])
        return shard_like(param, value[start:stop].clone())

    # --- natgrad's own forwards and backwards ---------------------------------------------------
    @contextmanager
    def own_forwards(self, swapped: Sequence[Tensor] = ()) -> Iterator[None]:
        """FSDP's forward hooks set aside: the modules compute with whatever tensors natgrad
        swaps in, FSDP neither all-gathers nor reshards. The evaluations swap in whole values
        of the ``swapped`` parameters; every other sharded parameter (frozen, or without a
        gradient this step) is replaced by its whole tensor here (one all-gather)."""
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

        skip = {id(p) for p in swapped}
        others = [(module._parameters, name, p) for module in self.model.modules()
                  for name, p in module._parameters.items()
                  if p is not None and is_sharded(p) and id(p) not in skip]
        wholes = self.whole([p.detach() for _, _, p in others])
        saved = []
        for module in self.model.modules():
            for attr in ("_forward_pre_hooks", "_forward_hooks"):
                hooks = getattr(module, attr)
                kept = type(hooks)((k, h) for k, h in hooks.items()
                                   if not isinstance(getattr(h, "__self__", None), FSDPState))
                if len(kept) != len(hooks):
                    saved.append((module, attr, hooks))
                    setattr(module, attr, kept)
        for (table, name, _), value in zip(others, wholes, strict=True):
            table[name] = value
        try:
            yield
        finally:
            for module, attr, hooks in saved:
                setattr(module, attr, hooks)
            for table, name, p in others:
                table[name] = p

    def sampled_backward(
        self, sampler: Callable[[Any, Tensor], None], targets: Sequence[Tensor]
    ) -> Callable[[Any, Tensor], None]:
        """The label sampler run inside the loss's backward without FSDP resharding the
        layers its backward passes through (the loss's backward needs their unsharded
        weights next), differentiating with respect to the unsharded twins of ``targets``
        (the parameters the graph holds); ``sampler.extra_targets`` is set before each call."""
        groups = [group for state in self._states for group in state._fsdp_param_groups]
        records = [self._records.get(id(p)) for p in targets]

        def run(record: Any, output: Tensor) -> None:
            sampler.extra_targets = [p if r is None else r.unsharded_param
                                     for p, r in zip(targets, records, strict=True)]
            reshard = [group.reshard_after_backward for group in groups]
            for group in groups:
                group.reshard_after_backward = False
            try:
                sampler(record, output)
            finally:
                for group, value in zip(groups, reshard, strict=True):
                    group.reshard_after_backward = value

        return run


def param_sharding(model: nn.Module, comm: Communicator) -> WholeParams:
    """:class:`ShardedParams` for a model with FSDP2-sharded parameters, else
    :class:`WholeParams`.

    FSDP2 shards over a 1-D mesh of all the ranks (``Shard(0)``); HSDP (``fully_shard`` with
    a 2-D mesh, placements ``(Replicate(), Shard(0))``) shards over the mesh's second
    dimension and replicates over its first. The whole tensors are then gathered within each
    shard group, while the data-parallel exchange (statistics, owners, directions) spans every
    rank of ``comm``, as for FSDP2.

    Raises:
        ValueError: sharded parameters on another layout (tensor parallelism, a mesh of
            other ranks than the communicator's, parameters on different meshes).
    """
    params = list(model.parameters())
    if not any(is_sharded(p) for p in params):
        return WholeParams()
    from torch.distributed.tensor import Replicate, Shard

    meshes = []
    for name, p in model.named_parameters():
        if not is_sharded(p):
            continue
        mesh = p.device_mesh
        layouts = {1: (Shard(0),), 2: (Replicate(), Shard(0))}
        if tuple(p.placements) != layouts.get(mesh.ndim):
            raise ValueError(
                f"model: parameter {name!r} is a DTensor with placements {p.placements} on "
                f"a {mesh.ndim}-D mesh; natgrad supports fully_shard's Shard(0) on a 1-D "
                "mesh and HSDP's (Replicate(), Shard(0)) on a 2-D mesh"
            )
        if mesh.size() != comm.world_size:
            raise ValueError(
                f"model: parameter {name!r} is sharded over {mesh.size()} ranks, but the "
                f"optimizer's process group has {comm.world_size}"
            )
        if all(mesh != m for m in meshes):
            meshes.append(mesh)
    if len(meshes) > 1:
        raise ValueError("model: parameters sharded over different device meshes; natgrad "
                         "needs one mesh for the whole model")
    mesh = meshes[0]
    if mesh.ndim == 2:  # HSDP: gather within this rank's shard group
        return ShardedParams(model, comm.within(mesh.get_group(1)))
    return ShardedParams(model, comm)
