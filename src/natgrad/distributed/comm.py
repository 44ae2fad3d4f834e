"""A small communicator over ``torch.distributed``: bucketed collectives, no-ops on one process.

natgrad's optimizers never call ``torch.distributed`` themselves; they hold a
:class:`Communicator` and call it at a few fixed points of the step (statistics, inverses,
the quadratic model). Without an initialised process group, or at world size 1, every
method returns at once without touching its tensors, so single-process training runs the
same code, bit for bit, at the same speed.

Collectives are *bucketed*: a list of tensors becomes one flat buffer per dtype, so a
statistics step of a 50-layer network is one ``all_reduce`` call (or one ``reduce`` per
owning rank), not 100. The backend's
device holds the buffer (CUDA for NCCL, the CPU for gloo), so the same code runs on both.
Payload bytes and calls are counted for the benchmark (:attr:`Communicator.bytes`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ByteCounter", "Communicator", "count_ddp_bytes", "mean_operator", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` and ``torch.compile`` wrappers, in any
    nesting (any other module unchanged).

    natgrad hooks the wrapped module's layers and re-evaluates it functionally; going
    through DDP would start its gradient synchronisation for those re-evaluations, and
    through a compiled module would run natgrad's forward-mode and double-backward products
    on a graph that supports neither.
    """
    # no compiled module exists unless torch.compile has loaded its module (a slow import)
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = eval_frame.OptimizedModule if eval_frame is not None else ()
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif compiled and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


class Communicator:
    """Bucketed collectives over one process group; no-ops unless it spans > 1 process.

    Args:
        group: the process group (None: the default group, looked up at each call, so a
            communicator made before ``init_process_group`` works once the group exists).

    Attributes:
        bytes: payload bytes this process has contributed to collectives so far (the size
            of each flat buffer; a ring all-reduce sends about 2(W−1)/W times that).
        calls: number of collectives so far.

    Example:
        >>> comm = Communicator()
        >>> comm.all_reduce([a, b])  # a ← Σ_ranks a, b ← Σ_ranks b, one call per dtype
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.bytes = 0
        self.calls = 0
        self._parent: Communicator | None = None

    def within(self, group: Any) -> Communicator:
        """A communicator over ``group`` (a subgroup of this one's ranks, e.g. HSDP's shard
        group) whose traffic also counts in this one's :attr:`bytes` and :attr:`calls`."""
        sub = Communicator(group)
        sub._parent = self
        return sub

    def _count(self, nbytes: int) -> None:
        self.bytes += nbytes
        self.calls += 1
        if self._parent is not None:
            self._parent._count(nbytes)

    # --- the group --------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        """Whether a process group exists."""
        return dist.is_available() and dist.is_initialized()

    @property
    def world_size(self) -> int:
        """Number of processes in the group (1 without a process group)."""
        return dist.get_world_size(self.group) if self.initialized else 1

    @property
    def rank(self) -> int:
        """This process's rank in the group (0 without a process group)."""
        return dist.get_rank(self.group) if self.initialized else 0

    @property
    def active(self) -> bool:
        """True when collectives communicate: a process group of more than one process."""
        return self.initialized and dist.get_world_size(self.group) > 1

    @property
    def device(self) -> torch.device:
        """Where flat buffers live: the current CUDA device for NCCL, else the CPU."""
        if self.initialized and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # --- collectives ------------------------------------------------------------------------
    def _buckets(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        groups: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        return list(groups.values())

    def _collective(
        self, tensors: Sequence[Tensor], op: Callable[[Tensor], None], receives: bool = True
    ) -> None:
        """``op`` on one flat buffer per dtype; the result copied back where ``receives``."""
        device = self.device
        for bucket in self._buckets(tensors):
            flat = torch.cat([t.reshape(-1).to(device) for t in bucket])
            op(flat)
            self._count(flat.numel() * flat.element_size())
            if not receives:
                continue
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def all_reduce(self, tensors: Sequence[Tensor]) -> None:
        """tᵢ ← Σ_ranks tᵢ in place, for every tensor; one ``all_reduce`` per dtype.

        Every rank must pass tensors of the same shapes and dtypes in the same order.
        """
        if tensors and self.active:
            self._collective(tensors, lambda flat: dist.all_reduce(flat, group=self.group))

    def reduce(self, tensors: Sequence[Tensor], dst: int) -> None:
        """tᵢ ← Σ_ranks tᵢ in place on rank ``dst`` (a rank of the group) only; the other
        ranks' tensors are left as they were. One ``reduce`` per dtype.

        Only ``dst`` receives the sum: a ring or chain reduce sends each rank's buffer about
        once, half of what a ring all-reduce sends (2(W−1)/W times it) for the same sums.
        """
        if tensors and self.active:
            root = self._global_rank(dst)
            self._collective(tensors, lambda flat: dist.reduce(flat, dst=root, group=self.group),
                             receives=self.rank == dst)

    def broadcast(self, tensors: Sequence[Tensor], src: int) -> None:
        """tᵢ ← rank ``src``'s tᵢ in place (``src`` is a rank of the group); one call per dtype."""
        if tensors and self.active:
            root = self._global_rank(src)
            self._collective(
                tensors, lambda flat: dist.broadcast(flat, src=root, group=self.group)
            )

    def sum_values(self, values: Sequence[float]) -> list[float]:
        """Σ_ranks of each Python number (in float64); the values unchanged on one process."""
        if not self.active:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self.all_reduce([tensor])
        return tensor.tolist()

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order."""
        if not self.active:
            return [tensor]
        local = tensor.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        self._count(local.numel() * local.element_size())
        return [p.to(tensor.device) for p in parts]

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.active:
            dist.barrier(group=self.group)


def mean_operator(
    comm: Communicator, operator: Callable[[Tensor], Tensor], samples: int
) -> Callable[[Tensor], Tensor]:
    """v ↦ Σ_ranks (Nᵣ/N) Fᵣ v: the batch-mean operator of the union of the ranks' batches.

    ``operator`` is this rank's mean over its ``samples`` = Nᵣ examples (e.g. a Fisher-vector
    product); N = Σ Nᵣ. One all-reduce per application; ``operator`` itself on one process.
    """
    if not comm.active:
        return operator
    weight = samples / comm.sum_values([samples])[0]

    def apply(v: Tensor) -> Tensor:
        out = operator(v) * weight
        comm.all_reduce([out])
        return out

    return apply


@dataclass
class ByteCounter:
    """Bytes and calls of DDP's gradient all-reduces, counted by :func:`count_ddp_bytes`."""

    bytes: int = 0
    calls: int = 0


def count_ddp_bytes(model: nn.parallel.DistributedDataParallel) -> ByteCounter:
    """Count the payload of a DDP model's gradient all-reduces (a communication hook).

    The hook is DDP's reference ``allreduce_hook`` (the average DDP computes anyway) with a
    counter in front, so training is unchanged.

    Returns:
        The counter, updated on every bucket DDP reduces.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    counter = ByteCounter()
    group = model.process_group

    # DDP checks the hook's annotations at run time: leave ``bucket`` unannotated (it is a
    # torch.distributed.GradBucket; postponed annotations would be strings)
    def hook(state, bucket):  # noqa: ANN001, ANN202
        buffer = bucket.buffer()
        state.bytes += buffer.numel() * buffer.element_size()
        state.calls += 1
        return default_hooks.allreduce_hook(group, bucket)

    model.register_comm_hook(counter, hook)
    return counter
