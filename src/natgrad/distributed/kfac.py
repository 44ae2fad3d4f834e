"""What data-parallel K-FAC exchanges between ranks: statistics, inverses, EKFAC's scaling.

Under ``DistributedDataParallel`` every rank sees its own part of the global batch. K-FAC's
statistics are *sums* over samples (Σ āāᵀ, Σ δδᵀ, Σ g², Σ (Q_Gᵀ Xₙ Q_A)²) with sample
counts beside them, so summing them over ranks (one bucketed all-reduce per statistics step)
gives exactly the statistics of the concatenated batch; every rank then folds the same sums
into the same moving averages. Inverses (or eigenbases) are computed once per block, by the
rank that :func:`natgrad.distributed.placement.balanced_placement` assigns it, and broadcast
(one broadcast per owning rank, bucketed); ``inverse_placement="everywhere"`` computes every
block on every rank instead. Either way every rank ends a refresh with all inverses, so each
preconditions the (all-reduced) gradient itself and the parameters stay identical.

``inverse_placement="owner"`` keeps each block's state on its owner only: the owner folds the
summed statistics into its moving averages, refreshes the inverses and preconditions the
block's gradient; every step the owners broadcast their blocks' directions (one broadcast per
owning rank, bucketed), so every rank ends the step with the same directions while holding
about 1/W of the blocks' factors and inverses (:meth:`FactorSync.share_directions`). Since
only the owner needs a block's sums, they are reduced to it (one bucketed reduce per owning
rank, about half the bytes of an all-reduce), and only what every rank needs is all-reduced:
the fallback diagonal, the sample counts and one finiteness flag per block
(:meth:`FactorSync.reduce_statistics`). EKFAC's scaling statistics Σ (Q_Gᵀ Xₙ Q_A)² need the
eigenbases where the samples are: after a refresh each owner broadcasts its blocks' new
eigenbases once (at the next statistics step, :meth:`FactorSync.eigenbases`), and the other
ranks keep them as a cache outside the optimizer state; the scaling sums are reduced to the
owner, which alone keeps them.

References:
    Osawa et al., Large-scale distributed second-order optimization using
    Kronecker-factored approximate curvature for deep convolutional neural networks, 2019.
    Pauloski et al., KAISA: an adaptive second-order optimizer framework for deep neural
    networks, 2021.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from natgrad.curvature.ekfac import EigenBlock
from natgrad.curvature.kfac import DenseBlock, FactorSums, KroneckerBlock
from natgrad.curvature.shared import SharedBlock, SharedHandler
from natgrad.distributed.comm import Communicator
from natgrad.distributed.placement import (
    PLACEMENTS,
    balanced_placement,
    block_cost,
    block_size,
    owner_placement,
)
from natgrad.layers.base import KroneckerHandler, LayerHandler

__all__ = ["BLOCK_KEYS", "FactorSync", "keeps_state_on_owners", "kronecker_preconditioner",
           "refresh_layout", "statistic_shapes"]

Block = KroneckerBlock | DenseBlock | SharedBlock
Shape = tuple[int, ...]
# the state keys of a block (curvature/kfac.py, ekfac.py, shared.py), and the prefixes of a
# shared block's per-use factors: what a rank that does not own the block leaves out
BLOCK_KEYS = ("input_cov", "grad_cov", "input_inv", "grad_inv", "fisher_block", "block_inv",
              "eigvecs_out", "eigvecs_in", "scaling", "shared_left", "shared_right",
              "shared_scale", "factor_updates", "eigvecs_version")
_BLOCK_PREFIXES = ("input_cov.", "grad_cov.")


def kronecker_preconditioner(optimizer: object) -> Any:
    """``optimizer``'s K-FAC preconditioner (its blocks and :class:`FactorSync`), or None."""
    preconditioner = getattr(optimizer, "preconditioner", None)
    if getattr(preconditioner, "sync", None) is None:  # NGDCG holds it inside the CG solve
        preconditioner = getattr(preconditioner, "inner", None)
    return preconditioner if isinstance(getattr(preconditioner, "sync", None), FactorSync) \
        else None


def keeps_state_on_owners(optimizer: object) -> bool:
    """Whether ``optimizer``'s block states live on their owners only (``"owner"``)."""
    preconditioner = kronecker_preconditioner(optimizer)
    return preconditioner is not None and preconditioner.sync.on_owners


def statistic_shapes(handler: LayerHandler) -> tuple[Shape | None, Shape]:
    """Shapes of a block's statistic sums: (Σ āāᵀ or None for dense blocks, Σ δδᵀ or Σ ggᵀ).

    Read off the layer's gradient matrix X, ``[d_out, d_in]``: ``(d_in, d_in)`` (``(d_in,)``
    for a diagonal input factor) and ``(d_out, d_out)``; a dense block of P parameters has
    no input factor and a ``(P, P)`` sum.
    """
    if isinstance(handler, SharedHandler):  # in the weight's orientation, [V, D]: L and R
        v, d = handler.param.shape
        return (d, d), (v, v)
    with torch.no_grad():  # whole shapes (a sharded parameter's shape is its whole one)
        matrix = handler.gather({p: torch.empty(p.shape, dtype=p.dtype, device="meta")
                                 for p in handler.params})
    if isinstance(handler, KroneckerHandler):
        *groups, d_out, d_in = matrix.shape  # grouped convolutions: a leading group axis
        if handler.diagonal_input:
            return (d_in,), (d_out, d_out)
        return (*groups, d_in, d_in), (*groups, d_out, d_out)
    return None, (matrix.numel(), matrix.numel())


def refresh_layout(block: Block) -> dict[str, Shape | None]:
    """State keys a block's ``refresh`` writes and their shapes (None: the key holds None).

    K-FAC: the damped inverses of A and G; EKFAC: both eigenbases (none for a diagonal A)
    and the restarted scaling ``[d_out, d_in]``; dense blocks: (F + λI)⁻¹.
    """
    if isinstance(block, DenseBlock):
        return {"block_inv": tuple(block.state["fisher_block"].shape)}
    if isinstance(block, SharedBlock):
        v, d = block.handler.param.shape
        return {"shared_left": (v, v), "shared_right": (d, d), "shared_scale": (v, d)}
    A, G = block.state["input_cov"], block.state["grad_cov"]
    if isinstance(block, EigenBlock):
        return {
            "eigvecs_out": tuple(G.shape),
            "eigvecs_in": None if A.dim() == 1 else tuple(A.shape),
            "scaling": (G.shape[0], A.shape[0]),
        }
    return {"input_inv": tuple(A.shape), "grad_inv": tuple(G.shape)}


def _counts(values: Sequence[float], dtype: torch.dtype) -> Tensor:
    """Sample counts in the statistics' own dtype when it holds them well enough (float32:
    exact to 2²⁴, then off by < 1e-7 relative, below the sums' own rounding), so that they
    travel in the same buffer; in float64 beside half-precision statistics."""
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float64
    return torch.tensor([float(v) for v in values], dtype=dtype)


def _finite_each(groups: Sequence[Sequence[Tensor]]) -> list[bool]:
    """Per group of tensors, whether :func:`natgrad._checks.all_finite` holds for it (each
    tensor's 2-norm finite: the test the optimizer applies to the statistics), one device
    sync per dtype and device in all."""
    found: dict[tuple[torch.dtype, torch.device], list[tuple[int, Tensor]]] = {}
    for index, group in enumerate(groups):
        for t in group:
            found.setdefault((t.dtype, t.device), []).append((index, t))
    finite = [True] * len(groups)
    for entries in found.values():
        norms = torch.stack(torch._foreach_norm([t for _, t in entries], 2))
        for (index, _), ok in zip(entries, norms.isfinite().tolist(), strict=True):
            finite[index] = finite[index] and ok
    return finite


class FactorSync:
    """K-FAC's communication: statistics exchange, inverse placement and broadcast.

    Args:
        comm: the communicator (the statistics and refresh methods assume
            ``comm.active``; callers check :attr:`active` and take their single-process path
            otherwise; the owner-placement methods are no-ops on one process).
        placement: ``"balanced"`` (each block computed by one owner, then broadcast),
            ``"everywhere"`` (every rank computes every block; nothing is broadcast) or
            ``"owner"`` (each block's state and preconditioning on its owner only, the
            directions broadcast).
    """

    def __init__(self, comm: Communicator, placement: str = "balanced") -> None:
        if placement not in PLACEMENTS[1:]:  # "auto" is resolved by the optimizer
            raise ValueError(f"placement must be one of {list(PLACEMENTS[1:])}, got "
                             f"{placement!r}")
        self.comm = comm
        self.placement = placement
        self._shapes: dict[str, tuple[Shape | None, Shape]] = {}
        # (world size, block names) -> owner by block name, and by id of each block parameter
        self._owners: tuple[tuple[int, tuple[str, ...]], dict[str, int], dict[int, int]] | None \
            = None
        # "owner" with EKFAC: the eigenbases of blocks other ranks own (Q_G, Q_A), and the
        # version of each block's eigenbases last broadcast (the same on every rank)
        self._bases: dict[str, tuple[Tensor, Tensor | None]] = {}
        self._sent: dict[str, int] = {}

    @property
    def active(self) -> bool:
        """Whether there is anyone to communicate with."""
        return self.comm.active

    def _shape(self, name: str, block: Block) -> tuple[Shape | None, Shape]:
        if name not in self._shapes:
            self._shapes[name] = statistic_shapes(block.handler)
        return self._shapes[name]

    def owners(self, blocks: dict[str, Block]) -> dict[str, int]:
        """The rank that computes each block's inverse: balanced by cost Σ d³, and under
        ``"owner"`` (where the owner alone keeps the block's state) by memory too."""
        key = (self.comm.world_size, tuple(blocks))
        if self._owners is None or self._owners[0] != key:
            shapes = [[s for s in self._shape(n, b) if s is not None]
                      for n, b in blocks.items()]
            costs = [block_cost(s) for s in shapes]
            if self.placement == "owner":
                owners = owner_placement(costs, [block_size(s) for s in shapes],
                                         self.comm.world_size)
            else:
                owners = balanced_placement(costs, self.comm.world_size)
            # blocks over one parameter (an attention's packed block and its row blocks) share
            # the first one's owner: the parameter's direction is assembled on one rank
            first: dict[int, int] = {}
            for index, block in enumerate(blocks.values()):
                ids = [id(p) for p in block.handler.params]
                owners[index] = next((first[i] for i in ids if i in first), owners[index])
                first.update(dict.fromkeys(ids, owners[index]))
            self._owners = (key, dict(zip(blocks, owners, strict=True)), first)
        return self._owners[1]

    @property
    def on_owners(self) -> bool:
        """Whether block states live on their owners only (``"owner"`` over > 1 process)."""
        return self.placement == "owner" and self.comm.active

    def keeps(self, blocks: dict[str, Block], name: str) -> bool:
        """Whether this rank keeps the state of block ``name`` (its owner, or every rank)."""
        return not self.on_owners or self.owners(blocks)[name] == self.comm.rank

    def drops(self, blocks: dict[str, Block], name: str, key: str) -> bool:
        """Whether this rank leaves out the state entry ``key`` of block ``name``: a block
        tensor (factors, inverses, eigenbases, scaling) of a block it does not keep."""
        is_block_key = key in BLOCK_KEYS or key.startswith(_BLOCK_PREFIXES)
        return is_block_key and not self.keeps(blocks, name)

    def prune(self, blocks: dict[str, Block]) -> None:
        """Drop the state of the blocks this rank does not own (after loading a checkpoint
        that holds every block) and the cached eigenbases of other ranks' blocks (the next
        statistics step broadcasts them again)."""
        for name, block in blocks.items():
            for key in [k for k in block.state if self.drops(blocks, name, k)]:
                del block.state[key]
            if (self.on_owners and isinstance(block, EigenBlock) and block.refreshed
                    and "eigvecs_version" not in block.state):  # saved under another placement
                block.state["eigvecs_version"] = 1
        self._bases, self._sent = {}, {}

    def cached_bytes(self) -> int:
        """Bytes of the eigenbases this rank holds for blocks other ranks own (EKFAC)."""
        return sum(t.numel() * t.element_size() for bases in self._bases.values()
                   for t in bases if t is not None)

    def eigenbases(
        self, blocks: dict[str, Block], dtype: torch.dtype
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """(Q_G, Q_A) of every refreshed EKFAC block, in block order, on every rank: the
        scaling statistics project each rank's samples onto them.

        ``"owner"`` over > 1 process (collective: every rank calls it on every statistics
        step): the owners' eigenbasis versions (a count of refreshes, in the block's state)
        are summed in one all-reduce of one number per EKFAC block; each block whose version
        differs from the one last broadcast is broadcast by its owner (bucketed, one call per
        owning rank) and cached by the other ranks. Without refreshes nothing more moves.
        ``dtype`` is the eigenbases' (the inverse dtype).
        """
        names = [n for n, b in blocks.items() if isinstance(b, EigenBlock)]
        if not self.on_owners:
            return {n: (blocks[n].state["eigvecs_out"], blocks[n].state["eigvecs_in"])
                    for n in names if blocks[n].refreshed}
        if not names:
            return {}
        owners, rank = self.owners(blocks), self.comm.rank
        versions = torch.tensor([float(blocks[n].state.get("eigvecs_version", 0))
                                 if owners[n] == rank else 0.0 for n in names],
                                dtype=torch.float64)
        self.comm.all_reduce([versions])
        current = dict(zip(names, (round(v) for v in versions.tolist()), strict=True))
        for src in range(self.comm.world_size):
            stale = [n for n in names if owners[n] == src and current[n]
                     and current[n] != self._sent.get(n)]
            if not stale:
                continue
            tensors = []
            for name in stale:
                block = blocks[name]
                if rank == src:
                    pair = (block.state["eigvecs_out"], block.state["eigvecs_in"])
                else:
                    input_shape, grad_shape = self._shape(name, block)
                    device = block.handler.params[0].device
                    pair = (torch.empty(grad_shape, dtype=dtype, device=device),
                            None if len(input_shape) == 1
                            else torch.empty(input_shape, dtype=dtype, device=device))
                    self._bases[name] = pair
                tensors += [t for t in pair if t is not None]
                self._sent[name] = current[name]
            self.comm.broadcast(tensors, src)
        out = {}
        for name in names:
            if owners[name] == rank and blocks[name].refreshed:
                out[name] = (blocks[name].state["eigvecs_out"], blocks[name].state["eigvecs_in"])
            elif owners[name] != rank and current[name]:
                out[name] = self._bases[name]
        return out

    def share_directions(
        self, blocks: dict[str, Block], directions: dict[Tensor, Tensor]
    ) -> None:
        """Every block's directions from its owner (``"owner"`` placement; else nothing).

        ``directions`` holds Δ for every parameter, computed by the block's owner and the
        plain gradient elsewhere; each owner broadcasts its blocks' Δ (one bucketed broadcast
        per owning rank) and every other rank takes them in place.

        Raises:
            ValueError: a parameter in two blocks on different owners (each would be
                broadcast whole; :meth:`owners` gives such blocks one owner).
        """
        if not self.on_owners:
            return
        owners, rank = self.owners(blocks), self.comm.rank
        owner_of: dict[int, int] = {}
        for name, block in blocks.items():
            if any(owner_of.setdefault(id(p), owners[name]) != owners[name]
                   for p in block.handler.params):
                raise ValueError(f"inverse_placement='owner': block {name!r} shares a "
                                 "parameter with a block of another owner")
        for src in range(self.comm.world_size):
            params = list({id(p): p for name, block in blocks.items() if owners[name] == src
                           for p in block.handler.params if p in directions}.values())
            if not params:
                continue
            if rank != src:  # receive into fresh tensors: the gradients are not overwritten
                for p in params:
                    directions[p] = torch.empty_like(directions[p])
            self.comm.broadcast([directions[p] for p in params], src)

    def sum_owned(self, value: float) -> float:
        """Σ over ranks of a sum over the blocks each rank owns (``"owner"``; else value)."""
        return self.comm.sum_values([value])[0] if self.on_owners else value

    # --- statistics ---------------------------------------------------------------------------
    def _statistics_owners(self, blocks: dict[str, Any]) -> dict[str, int] | None:
        """The rank that keeps each entry's statistics under ``"owner"`` (else None).

        ``blocks`` is the optimizer's blocks, or those with each shared weight's block
        replaced by one entry per use (:class:`natgrad.optim.kronecker.KroneckerPreconditioner`
        sends the uses' statistics separately); a use goes to the owner of the block over its
        weight, known once :meth:`owners` has seen the blocks. None before that: the first
        statistics step of a model with a shared weight sums everything on every rank.
        """
        if not self.on_owners:
            return None
        if all(isinstance(b, KroneckerBlock | DenseBlock | SharedBlock) for b in blocks.values()):
            return self.owners(blocks)
        if self._owners is None:
            return None
        by_name, by_param = self._owners[1], self._owners[2]
        owners = {}
        for name, block in blocks.items():
            owner = by_name.get(name) if isinstance(block, KroneckerBlock | DenseBlock) \
                else by_param.get(id(block.handler.params[0]))
            if owner is None:
                return None
            owners[name] = owner
        return owners

    def reduce_statistics(
        self,
        blocks: dict[str, Block],
        sums: dict[str, FactorSums],
        diagonal: dict[Tensor, Tensor],
        diagonal_params: Sequence[Tensor],
        samples: int,
        dtype: torch.dtype,
    ) -> tuple[dict[str, FactorSums], dict[Tensor, Tensor], int]:
        """Σ over ranks of every block's sums (on the ranks that keep the block), of the
        fallback diagonal sums and of ``samples`` (on every rank).

        ``"balanced"`` and ``"everywhere"`` (every rank keeps every block): one bucketed
        all-reduce of everything (one call per dtype: one in all for float32 or float64
        statistics, counts included). ``"owner"``: each owner receives the sums of its blocks,
        one bucketed reduce per owning rank (a reduce sends about half the bytes of an
        all-reduce of the same buffer), then one all-reduce of what every rank needs: the
        diagonal (every rank preconditions the fallback parameters), the sample counts (the
        diagonal's normaliser) and a flag per block, set by its owner when the summed sums are
        not finite. A block or parameter that this rank has no statistics for contributes
        zeros, so every rank sends the same layout.

        Args:
            blocks: all blocks, in the optimizer's (rank-independent) order.
            sums: this rank's sums of the blocks it saw (modified in place).
            diagonal: this rank's fallback diagonal sums Σ g² (modified in place).
            diagonal_params: the parameters of ``diagonal``, in a rank-independent order.
            samples: this rank's number of samples.
            dtype: the factor dtype (for the zeros of missing blocks).

        Returns:
            (summed sums of the blocks some rank saw, summed diagonal, total samples). Under
            ``"owner"`` a block this rank does not keep comes with its total counts and no
            sums (None), or, where its owner's sums are not finite, a NaN ``grad_sum``: the
            finiteness of the statistics is the same on every rank, so every rank skips
            such a step.
        """
        per_block: list[list[Tensor]] = []
        counts: list[float] = []
        parts: list[tuple[str, FactorSums]] = []
        for name, block in blocks.items():
            input_shape, grad_shape = self._shape(name, block)
            part = sums[name] if name in sums else FactorSums()
            device = block.handler.params[0].device
            if input_shape is not None and part.input_sum is None:
                part.input_sum = torch.zeros(input_shape, dtype=dtype, device=device)
            if part.grad_sum is None:
                part.grad_sum = torch.zeros(grad_shape, dtype=dtype, device=device)
            per_block.append([t for t in (part.input_sum, part.grad_sum) if t is not None])
            counts += [part.rows, part.samples]
            parts.append((name, part))
        diag = [diagonal[p] if p in diagonal else torch.zeros(p.shape, dtype=p.dtype,
                                                              device=p.device)
                for p in diagonal_params]
        owners = self._statistics_owners(blocks)
        if owners is None:  # every rank keeps every block
            count_tensor = _counts([*counts, samples], dtype)
            self.comm.all_reduce([*(t for ts in per_block for t in ts), *diag, count_tensor])
        else:
            rank = self.comm.rank
            for src in range(self.comm.world_size):
                self.comm.reduce([t for (name, _), ts in zip(parts, per_block, strict=True)
                                  if owners[name] == src for t in ts], src)
            mine = [i for i, (name, _) in enumerate(parts) if owners[name] == rank]
            finite = _finite_each([per_block[i] for i in mine])
            flags = [0.0] * len(parts)
            for i, ok in zip(mine, finite, strict=True):
                flags[i] = 0.0 if ok else 1.0
            count_tensor = _counts([*counts, samples, *flags], dtype)
            self.comm.all_reduce([*diag, count_tensor])
        totals = [round(c) for c in count_tensor.tolist()]
        reduced = {}
        for index, (name, part) in enumerate(parts):
            part.rows, part.samples = totals[2 * index], totals[2 * index + 1]
            if owners is not None and owners[name] != self.comm.rank:  # summed on its owner
                nonfinite = totals[2 * len(parts) + 1 + index]
                part.input_sum = None
                part.grad_sum = torch.full((), float("nan"), dtype=dtype) if nonfinite else None
            if part.samples:
                reduced[name] = part
        return reduced, dict(zip(diagonal_params, diag, strict=True)), totals[2 * len(parts)]

    def reduce_scaling(
        self, blocks: dict[str, Block], parts: dict[str, tuple[Tensor | None, int]],
        dtype: torch.dtype,
    ) -> dict[str, tuple[Tensor, int]]:
        """Σ over ranks of EKFAC's scaling sums and their sample counts, for the blocks
        whose scaling this rank keeps: one all-reduce, or under ``"owner"`` one reduce per
        owning rank of its blocks' sums and counts (only the owner keeps the scaling).

        ``parts`` maps every block of :meth:`eigenbases` to (Σ (Q_Gᵀ Xₙ Q_A)², Nᵣ), or
        (None, 0) where this rank saw no samples of it; ``dtype`` is the scaling's.
        """
        names = list(parts)  # the blocks of :meth:`eigenbases`: the same on every rank
        tensors, counts = [], []
        for name in names:
            total, samples = parts[name]
            if total is None:
                input_shape, grad_shape = self._shape(name, blocks[name])
                total = torch.zeros(grad_shape[0], input_shape[0], dtype=dtype,
                                    device=blocks[name].handler.params[0].device)
                samples = 0
            tensors.append(total)
            counts.append(samples)
        dtype = tensors[0].dtype if tensors else torch.float64
        if not self.on_owners:
            count_tensor = _counts(counts, dtype)
            self.comm.all_reduce([*tensors, count_tensor])
            totals = [round(c) for c in count_tensor.tolist()]
            return {n: (t, c) for n, t, c in zip(names, tensors, totals, strict=True) if c}
        owners, rank, out = self.owners(blocks), self.comm.rank, {}
        for src in range(self.comm.world_size):
            owned = [i for i, name in enumerate(names) if owners[name] == src]
            if not owned:
                continue
            count_tensor = _counts([counts[i] for i in owned], dtype)
            self.comm.reduce([*(tensors[i] for i in owned), count_tensor], src)
            if src == rank:  # the sums of the blocks this rank keeps
                totals = [round(c) for c in count_tensor.tolist()]
                out = {names[i]: (tensors[i], c) for i, c in zip(owned, totals, strict=True)
                       if c}
        return out

    # --- inverses -----------------------------------------------------------------------------
    def refresh(
        self, blocks: dict[str, Block], refresh: Callable[[Block], None], dtype: torch.dtype
    ) -> None:
        """Refresh every ready block: on its owner (then broadcast) or on every rank.

        Args:
            blocks: all blocks, in the optimizer's order.
            refresh: recomputes one block's inverses in place (``block.refresh`` with the
                block's damping).
            dtype: the inverse dtype (for the receiving buffers).
        """
        ready = {name: block for name, block in blocks.items() if block.ready}
        if self.placement == "owner":  # on the owners, kept there
            for name, block in ready.items():
                if self.keeps(blocks, name):
                    refresh(block)
                    if isinstance(block, EigenBlock):  # new eigenbases: broadcast them once
                        block.state["eigvecs_version"] = block.state.get("eigvecs_version",
                                                                         0) + 1
            return
        if self.placement == "everywhere":
            for block in ready.values():
                refresh(block)
            return
        owners, rank = self.owners(blocks), self.comm.rank
        for name, block in ready.items():
            if owners[name] == rank:
                refresh(block)
        for src in range(self.comm.world_size):
            tensors = []
            for name, block in ready.items():
                if owners[name] != src:
                    continue
                device = block.handler.params[0].device
                for key, shape in refresh_layout(block).items():
                    if shape is None:
                        block.state[key] = None
                    elif rank == src:  # one memory layout on every rank: same rounding later
                        tensors.append(block.state[key].contiguous())
                        block.state[key] = tensors[-1]
                    else:
                        tensors.append(torch.empty(shape, dtype=dtype, device=device))
                        block.state[key] = tensors[-1]
            self.comm.broadcast(tensors, src)
