"""K-FAC's preconditioner as a value: blocks, their statistics, inverses and directions.

:class:`KroneckerPreconditioner` is what :class:`natgrad.KFAC`, :class:`natgrad.EKFAC` and
:class:`natgrad.NGDCG` hold: every supported layer's block (Kronecker, eigenbasis or dense,
:mod:`natgrad.curvature.kfac`), the diagonal Fisher of the parameters without one (the
*fallback*), and the plain gradient for excluded parameters. One step:

    ok = pre.update(batch, grads, step)   # statistics into the EMAs, inverses when due
    directions = pre.apply(grads)         # Δ per parameter
    pre.commit()  or  pre.discard()       # keep the new curvature only for a taken step

``update`` works on a copy of the state: the moving averages are updated out of place and
the refreshed inverses written into the copy, so a step that is skipped or rejected after
``update`` leaves the optimizer's state exactly as it was (``discard``). The tensors live in
the optimizer's ``state[first parameter of the block]`` (:func:`block_state`) and
``state[p]["fisher_diag"]``, so ``state_dict()`` saves them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from natgrad._checks import (
    all_finite,
    check_choice,
    check_dtype,
    check_nonnegative,
    check_positive_int,
)
from natgrad.curvature.batch import StepBatch
from natgrad.curvature.ekfac import scaling_sum
from natgrad.curvature.kfac import (
    KFAC_APPROX,
    DenseBlock,
    FactorSums,
    KroneckerBlock,
    ema,
    record_sums,
)
from natgrad.curvature.model import FisherKind
from natgrad.curvature.sampling import LabelSampler
from natgrad.curvature.shared import SharedBlock, SharedHandler
from natgrad.curvature.tangents import supports_trace
from natgrad.distributed.kfac import FactorSync, statistic_shapes
from natgrad.distributed.placement import PLACEMENTS, resolve_placement
from natgrad.layers.base import KroneckerHandler, LayerHandler
from natgrad.layers.capture import LayerCapture, find_layers

if TYPE_CHECKING:
    from natgrad.optim.base import CurvatureOptimizer

__all__ = [
    "Assignment",
    "KroneckerPreconditioner",
    "assign_blocks",
    "block_state",
    "check_statistics",
    "kronecker_curvature",
]

Block = KroneckerBlock | DenseBlock | SharedBlock


class Assignment:
    """Which treatment each optimized parameter gets (see :func:`assign_blocks`)."""

    def __init__(
        self, blocks: dict[str, Block], fallback: dict[str, Tensor], reasons: dict[str, str],
        excluded: set[int],
    ) -> None:
        self.blocks = blocks
        self.fallback = fallback  # parameter name -> parameter
        self.reasons = reasons  # parameter name -> why its module has no block
        self.excluded = excluded  # ids of parameters of excluded modules

    def fallback_modules(self) -> list[str]:
        """``"module (reason)"`` for every module whose parameters use the fallback."""
        return sorted({f"{n.rsplit('.', 1)[0] or '<model>'} ({self.reasons[n]})"
                       for n in self.fallback})


def block_state(state: Any, handler: LayerHandler) -> dict[str, Any]:
    """Where a block keeps its tensors: ``state[p]`` of its first parameter p, or, for a block
    over rows of p (:meth:`LayerHandler.row_slice`), ``state[p]["rows a:b"]``."""
    first = handler.params[0]
    rows = handler.row_slice(first)
    if rows is None:
        return state[first]
    return state[first].setdefault(f"rows {rows.start}:{rows.stop}", {})


def factor_side(handler: LayerHandler) -> int:
    """The largest side of a block's dense matrices (its Kronecker factors, or the dense
    block of a norm layer); a diagonal input factor (Embedding) does not count."""
    input_shape, grad_shape = statistic_shapes(handler)
    sides = [grad_shape[-1]]
    if input_shape is not None and len(input_shape) > 1:
        sides.append(input_shape[-1])
    return max(sides)


def assign_blocks(
    model: nn.Module,
    params: Iterable[Tensor],
    exclude: Iterable[str | type],
    block_type: type[KroneckerBlock],
    state: Any,
    max_factor_size: int | None = None,
) -> Assignment:
    """A block per supported layer whose parameters are all in ``params``; the rest of
    ``params`` falls back to the diagonal Fisher, except those of ``exclude``-d modules.
    A weight of two Kronecker layers (a tied embedding and head) gets one
    :class:`natgrad.curvature.shared.SharedBlock`.

    ``state`` is the optimizer's per-parameter state (``state[p]`` holds each block's tensors).
    A block with a dense matrix larger than ``max_factor_size`` on a side (a language model's
    output head: V × V) is not formed; its parameters fall back to the diagonal.
    """

    def too_large(handler: LayerHandler) -> str | None:
        side = factor_side(handler)
        if max_factor_size is None or side <= max_factor_size:
            return None
        return (f"{type(handler.module).__name__} with a {side}×{side} curvature factor "
                f"(max_factor_size={max_factor_size})")

    layers = find_layers(model, exclude)
    mine = {id(p) for p in params}
    named = dict(model.named_parameters())
    reasons = {n: why for n, why in layers.fallback.items() if id(named[n]) in mine}
    blocks: dict[str, Block] = {}
    for pname, uses in layers.shared.items():
        if id(named[pname]) in mine:
            handler = SharedHandler(named[pname], dict(uses))
            why = too_large(handler)
            if why is not None:
                reasons[pname] = f"{why}, tied weights"
                continue
            blocks["+".join(uses)] = SharedBlock(handler, state[named[pname]])
    for name, handler in layers.handlers.items():
        optimized = [id(p) in mine for p in handler.params]
        if not any(optimized):
            continue
        if not all(optimized):  # a block needs all of its parameters' gradients
            why = (f"{type(handler.module).__name__} with only some of its parameters in the "
                   "optimizer")
            for pname, p in named.items():
                if id(p) in mine and any(p is q for q in handler.params):
                    reasons[pname] = why
            continue
        why = too_large(handler)
        if why is not None:
            for pname, p in named.items():
                if any(p is q for q in handler.params):
                    reasons[pname] = why
            continue
        kind = block_type if isinstance(handler, KroneckerHandler) else DenseBlock
        if getattr(handler, "groups", 1) > 1:  # EKFAC's eigenbasis is not batched over groups
            kind = KroneckerBlock
        blocks[name] = kind(handler, block_state(state, handler))
    fallback = {n: named[n] for n in reasons}
    excluded = {id(named[n]) for n in layers.excluded}
    return Assignment(blocks, fallback, reasons, excluded)


class _Use:
    """One use of a shared weight, as the data-parallel exchange sees a block."""

    def __init__(self, handler: KroneckerHandler) -> None:
        self.handler = handler


class KroneckerPreconditioner:
    """Block-diagonal K-FAC (or EKFAC) curvature with a diagonal fallback (see module doc).

    Args:
        assignment: blocks and fallback parameters (:func:`assign_blocks`).
        state: the optimizer's per-parameter state.
        kind: ``FisherKind.MC`` (sampled-label δ's) or ``FisherKind.EMPIRICAL``.
        mc_samples: sampled labels per input (weights of the draws).
        stat_decay: EMA decay of the statistics (the first ones averaged, :meth:`_decay`).
        inv_every: steps between inverse (eigenbasis) refreshes.
        warmup: steps at the start that refresh every step.
        inverse_method: ``"cholesky"`` or ``"eigh"``.
        factor_dtype, inverse_dtype: dtypes of the statistics and of the inverses.
        kfac_approx: ``"expand"`` or ``"reduce"`` (:func:`natgrad.curvature.kfac.record_sums`).
        sync: the data-parallel exchange (a no-op communicator on one process).
        damping: the damping λ in force for a parameter (its group's, or the adaptive one).
    """

    def __init__(
        self,
        assignment: Assignment,
        state: Any,
        *,
        kind: FisherKind,
        mc_samples: int,
        stat_decay: float,
        inv_every: int,
        inverse_method: str,
        factor_dtype: Any,
        inverse_dtype: Any,
        sync: FactorSync,
        damping: Callable[[Tensor], float],
        warn: Callable[[str, str], None] | None = None,
        kfac_approx: str = "expand",
        warmup: int = 0,
    ) -> None:
        self.blocks = assignment.blocks
        self.warn = warn
        self._checked_calls = False
        self.fallback = list(assignment.fallback.values())
        self.excluded = assignment.excluded
        self.state = state
        self.kind = kind
        self.mc_samples = mc_samples
        self.stat_decay = stat_decay
        self.inv_every = inv_every
        self.warmup = warmup
        self.inverse_method = inverse_method
        self.factor_dtype = factor_dtype
        self.inverse_dtype = inverse_dtype
        self.sync = sync
        self.damping = damping
        self.kfac_approx = kfac_approx
        self._committed: dict[str, dict[str, Any]] | None = None
        self._diagonal: dict[Tensor, Tensor] = {}  # pending fallback diagonals
        self._diagonal_updates: dict[Tensor, int | None] = {}  # and their statistics counts

    # --- pending state ----------------------------------------------------------------------
    def rebind(self, state: Any) -> None:
        """Point the blocks at the optimizer's state (a new one after ``load_state_dict``)."""
        self.state = state
        self._committed, self._diagonal, self._diagonal_updates = None, {}, {}
        for block in self.blocks.values():
            block.state = block_state(self.state, block.handler)
        self.sync.prune(self.blocks)  # "owner": a checkpoint holds every rank's blocks

    def _diag(self, p: Tensor) -> Tensor | None:
        return self._diagonal.get(p, self.state[p].get("fisher_diag"))

    def commit(self) -> None:
        """Keep what :meth:`update` computed."""
        if self._committed is None:
            return
        for name, block in self.blocks.items():
            committed = self._committed[name]
            for key, value in block.state.items():
                if committed.get(key, committed) is not value:
                    committed[key] = value
            block.state = committed
        for p, value in self._diagonal.items():
            self.state[p]["fisher_diag"] = value
            if self._diagonal_updates.get(p) is not None:
                self.state[p]["fisher_diag_updates"] = self._diagonal_updates[p]
        self._committed, self._diagonal, self._diagonal_updates = None, {}, {}

    def discard(self) -> None:
        """Forget what :meth:`update` computed: the state is as before it."""
        if self._committed is None:
            return
        for name, block in self.blocks.items():
            block.state = self._committed[name]
        self._committed, self._diagonal, self._diagonal_updates = None, {}, {}

    # --- the step ---------------------------------------------------------------------------
    def update(self, batch: StepBatch, grads: dict[Tensor, Tensor], step: int) -> bool:
        """Statistics (if the batch has them) and refreshes (every ``inv_every`` steps, and
        for blocks never refreshed), into a pending copy. False if a statistic is not finite."""
        self.discard()
        self._committed = {name: block.state for name, block in self.blocks.items()}
        for block in self.blocks.values():
            block.state = dict(block.state)
        has_stats = any(r.stats for r in batch.records)
        if has_stats and not self._gather_statistics(batch, grads):
            return False
        due = step < self.warmup or step % self.inv_every == 0
        if due or not all(b.refreshed for b in self.blocks.values() if b.ready):
            self._refresh()
        if has_stats:
            self._scaling_statistics(batch)
        return True

    def _active(self, block: Block) -> bool:
        """Refreshed, and not superseded: a block over whole parameters yields to its refreshed
        alternatives over their rows (a packed attention that has had a cross-attention call,
        :mod:`natgrad.layers.attention`)."""
        handler = block.handler
        if not block.refreshed or handler.row_slice(handler.params[0]) is not None:
            return block.refreshed
        return not any(self.blocks[a].refreshed for a in handler.alternatives
                       if a in self.blocks)

    def apply(self, grads: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """Δ per parameter: Kronecker, eigenbasis and dense blocks, the diagonal fallback; the
        plain gradient where there is no curvature yet or the module is excluded."""
        directions: dict[Tensor, Tensor] = {}
        for block in self.blocks.values():
            params = block.handler.params
            if not self._active(block) or not all(p in grads for p in params):
                continue
            direction = block.precondition(block.handler.gather(grads), self.damping(params[0]))
            for p, piece in block.handler.scatter(direction).items():
                rows = block.handler.row_slice(p)
                if rows is None:
                    directions[p] = piece
                else:  # the block's rows; rows no block covers keep the gradient
                    directions.setdefault(p, grads[p].clone())[rows] = piece
        for p in self.fallback:
            diag = self._diag(p)
            if p in grads and diag is not None:
                directions[p] = grads[p] / (diag + self.damping(p))
        for p, g in grads.items():
            directions.setdefault(p, g)  # excluded parameters, or no statistics yet
        self.sync.share_directions(self.blocks, directions)  # "owner": Δ from the owners
        return {p: d for p, d in directions.items() if p in grads}

    def quadratic(self, vectors: dict[Tensor, Tensor]) -> float:
        """vᵀ F̃ v with the undamped blocks and diagonal (KL clipping), for v per parameter."""
        total = 0.0
        for block in self.blocks.values():
            params = block.handler.params
            if self._active(block) and all(p in vectors for p in params):
                total += float(block.quadratic(block.handler.gather(vectors)).double())
        total = self.sync.sum_owned(total)  # "owner": each rank has its own blocks' part
        for p in self.fallback:
            diag = self._diag(p)
            if p in vectors and diag is not None:
                total += float((diag * vectors[p].square()).sum().double())
        return total

    # --- statistics -------------------------------------------------------------------------
    def _draw_weights(self, batch: StepBatch, index: int) -> list[float]:
        """Weights of forward ``index``'s δ draws in G (on the canonical scale)."""
        if self.kind is FisherKind.EMPIRICAL:
            return [batch.scales[index] ** -2]  # the loss's δ is s·(per-sample δ)
        return [1.0 / self.mc_samples] * self.mc_samples

    def _gather_statistics(self, batch: StepBatch, grads: dict[Tensor, Tensor]) -> bool:
        new: dict[str, FactorSums] = {}
        shared: dict[str, list[FactorSums]] = {}
        for name, block in self.blocks.items():
            if isinstance(block, SharedBlock):  # statistics of each use
                shared[name] = [self._layer_sums(batch, use_name, use)
                                for use_name, use in block.handler.uses.items()]
                continue
            sums = self._layer_sums(batch, name, block.handler)
            if sums.samples:
                new[name] = sums
        if not self._checked_calls and self.warn is not None:
            self._checked_calls = True
            called = set(new) | set(shared)
            silent = sorted(n for n, b in self.blocks.items() if n not in called
                            and not called.intersection(b.handler.alternatives))
            if silent:  # e.g. a layer whose weight the model uses through F.linear
                self.warn("uncalled", "these layers were not called in the model's forward, "
                          "their parameters take plain gradient steps until they are: "
                          + ", ".join(silent))
        if self.sync.active:
            new, shared, diag = self._reduce_statistics(batch, grads, new, shared)
        else:
            diag = self._fallback_diagonal(batch, grads)
        parts = list(new.values()) + [s for uses in shared.values() for s in uses]
        values = [s.input_sum for s in parts if s.input_sum is not None]
        values += [s.grad_sum for s in parts if s.grad_sum is not None] + list(diag.values())
        if not all_finite(values):
            return False
        for name, sums in new.items():
            if self.sync.keeps(self.blocks, name):  # "owner": on the block's owner only
                block = self.blocks[name]
                block.update(sums, self._block_decay(block))
        for name, uses in shared.items():
            if self.sync.keeps(self.blocks, name):
                block = self.blocks[name]
                block.update(uses, self._block_decay(block))
        for p, value in diag.items():
            old = self.state[p].get("fisher_diag")
            decay, self._diagonal_updates[p] = self._decay(
                self.state[p].get("fisher_diag_updates"), old is not None)
            self._diagonal[p] = ema(old, value, decay)
        return True

    def _decay(self, count: int | None, started: bool) -> tuple[float, int | None]:
        """The moving average's decay for its next statistics and its new count of them:
        min(1 − 1/k, ``stat_decay``) for the k-th (Martens & Grosse 2015, §5). The first
        statistics are averaged, not decayed: with a constant 0.95 the initial parameters'
        statistics keep 0.95⁴ = 81 % of the weight after four more (20 steps at
        ``stat_every=5``). An average saved without a count (``started``) keeps ``stat_decay``
        and stays without one."""
        if started and count is None:
            return self.stat_decay, None
        count = (count or 0) + 1
        return min(1.0 - 1.0 / count, self.stat_decay), count

    def _block_decay(self, block: Block) -> float:
        """:meth:`_decay` for a block's factors, counted in its (pending) state."""
        decay, count = self._decay(block.state.get("factor_updates"), block.ready)
        if count is not None:
            block.state["factor_updates"] = count
        return decay

    def _layer_sums(self, batch: StepBatch, name: str, handler: LayerHandler) -> FactorSums:
        """The batch's statistics of the layer ``name`` (all forwards, all calls)."""
        sums = FactorSums()
        for i, record in enumerate(batch.records):
            if name in record.calls:
                record_sums(handler, record.calls[name], record.batch_size, sums,
                            self._draw_weights(batch, i), self.factor_dtype, batch.valid[i],
                            self.kfac_approx)
        return sums

    def _reduce_statistics(
        self, batch: StepBatch, grads: dict[Tensor, Tensor], new: dict[str, FactorSums],
        shared: dict[str, list[FactorSums]],
    ) -> tuple[dict[str, FactorSums], dict[str, list[FactorSums]], dict[Tensor, Tensor]]:
        """The statistics of every rank's batch together (one bucketed all-reduce) and the
        fallback diagonal normalised by the total number of samples N. Each use of a shared
        weight travels as a block of its own (``name#i``)."""
        empirical = self.kind is FisherKind.EMPIRICAL
        # sampled-label diagonal: reduce the sums Σ g² (normaliser 1), divide by N after;
        # the empirical one comes from the already all-reduced gradient and N alone
        local = {} if empirical else self._fallback_diagonal(batch, grads, samples=1)
        params = [] if empirical else [p for p in self.fallback if p in grads]
        blocks: dict[str, Any] = {}
        for name, block in self.blocks.items():
            if not isinstance(block, SharedBlock):
                blocks[name] = block
                continue
            for i, use in enumerate(block.handler.uses.values()):
                blocks[f"{name}#{i}"] = _Use(use)
                new[f"{name}#{i}"] = shared[name][i]
        new, diag, total = self.sync.reduce_statistics(
            blocks, new, local, params, batch.rows, self.factor_dtype
        )
        for name, block in self.blocks.items():
            if isinstance(block, SharedBlock):
                shared[name] = [new.pop(f"{name}#{i}", FactorSums())
                                for i in range(len(block.handler.uses))]
        if empirical:
            return new, shared, self._fallback_diagonal(batch, grads, samples=total)
        return new, shared, {p: value / total for p, value in diag.items()}

    def _fallback_diagonal(
        self, batch: StepBatch, grads: dict[Tensor, Tensor], samples: int | None = None
    ) -> dict[Tensor, Tensor]:
        """diag F ≈ E[ĝ²]/N with ĝ the batch-summed sampled-label gradient (unbiased);
        N = ``samples`` if given, else the batch's rows."""
        if not self.fallback or not batch:
            return {}
        n = batch.rows if samples is None else samples
        if self.kind is FisherKind.EMPIRICAL:
            return {p: (grads[p] * n).square() / n for p in self.fallback if p in grads}
        out: dict[Tensor, Tensor] = {}
        for record in batch.records:
            for draw in record.sampled_param_grads:
                for p, g in zip(self.fallback, draw, strict=True):
                    if g is not None:
                        value = g.square() / (n * self.mc_samples)
                        out[p] = value if p not in out else out[p] + value
        return out

    def _scaling_statistics(self, batch: StepBatch) -> None:
        """EKFAC: the per-sample second moments in the (current) eigenbases."""
        parts: dict[str, tuple[Tensor | None, int]] = {}
        # the refreshed EKFAC blocks' eigenbases on every rank ("owner": from the owners)
        bases = self.sync.eigenbases(self.blocks, self.inverse_dtype)
        for name, (eigvecs_out, eigvecs_in) in bases.items():
            block = self.blocks[name]
            total, samples = None, 0
            for i, record in enumerate(batch.records):
                if name not in record.calls:
                    continue
                part = scaling_sum(
                    block.handler, record.calls[name], self._draw_weights(batch, i),
                    eigvecs_out, eigvecs_in,
                )
                total = part if total is None else total + part
                samples += record.batch_size
            parts[name] = (total, samples)
        if not parts:
            return
        if self.sync.active:  # the scaling of every rank's batch together
            parts = self.sync.reduce_scaling(self.blocks, parts, self.inverse_dtype)
        for name, (total, samples) in parts.items():
            if total is not None:
                self.blocks[name].update_scaling(total, samples, self.stat_decay)

    # --- inverses ---------------------------------------------------------------------------
    def _refresh(self) -> None:
        def refresh(block: Block) -> None:
            block.refresh(self.damping(block.handler.params[0]), self.inverse_method,
                          self.inverse_dtype)

        if self.sync.active:  # on the owners, then broadcast (see inverse_placement)
            self.sync.refresh(self.blocks, refresh, self.inverse_dtype)
            return
        for block in self.blocks.values():
            if block.ready:
                refresh(block)


def check_statistics(
    kind: Any, mc_samples: Any, stat_every: Any, inv_every: Any, stat_decay: Any,
    inverse_method: Any, factor_dtype: Any, inverse_dtype: Any, placement: Any,
    kfac_approx: Any, curvature_warmup: Any = 0,
) -> tuple[str, str, str]:
    """Validate the statistics arguments of KFAC, EKFAC and NGDCG (ValueError/TypeError
    naming the argument); returns ``kind``, ``inverse_method`` and ``placement`` as str."""
    check_choice("kfac_approx", kfac_approx, KFAC_APPROX)
    kind = fisher_kind(kind)
    check_positive_int("mc_samples", mc_samples)
    check_positive_int("stat_every", stat_every)
    check_positive_int("inv_every", inv_every)
    check_positive_int("curvature_warmup", curvature_warmup, allow=(0,))
    check_nonnegative("stat_decay", stat_decay, upper=1.0)
    inverse_method = check_choice("inverse_method", inverse_method, ("cholesky", "eigh"))
    check_dtype("factor_dtype", factor_dtype)
    check_dtype("inverse_dtype", inverse_dtype)
    return kind, inverse_method, check_choice("inverse_placement", placement, PLACEMENTS)


def fisher_kind(kind: Any) -> str:
    """Validate an optimizer's ``kind``: ``"mc"`` (the true Fisher estimated with labels drawn
    from the model) or ``"empirical"``. ``"true"``, the old name of ``"mc"`` here, still works
    with a DeprecationWarning: it means the exact expectation in the functional API."""
    if kind == "true":
        warnings.warn(
            "kind='true' for an optimizer is deprecated: its true Fisher is estimated with "
            "labels drawn from the model, which is kind='mc' (as in natgrad.fisher_matrix, "
            "where kind='true' is the exact expectation)", DeprecationWarning, stacklevel=4,
        )
        return "mc"
    return check_choice("kind", kind, ("mc", "empirical"))


def kronecker_curvature(
    opt: CurvatureOptimizer,
    *,
    exclude: Iterable[str | type],
    block_type: type[KroneckerBlock],
    kind: str,
    mc_samples: int,
    stat_decay: float,
    inv_every: int,
    inverse_method: str,
    factor_dtype: Any,
    inverse_dtype: Any,
    placement: str,
    fallback_effect: str,
    kfac_approx: str = "expand",
    diagonal_only: bool = False,
    max_factor_size: int | None = None,
    warmup: int = 0,
) -> KroneckerPreconditioner:
    """K-FAC's curvature for ``opt``: the blocks of its model's layers (or, with
    ``diagonal_only``, the diagonal Fisher of every parameter), and the hooks that feed them
    (attached to ``opt``): sampled labels for the true Fisher, the loss's own δ's for the
    empirical one. Warns once, naming the modules that have no block."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if diagonal_only:
        named = {id(p): n for n, p in opt.model.named_parameters()}
        assignment = Assignment({}, {named[id(p)]: p for p in params},
                                {named[id(p)]: "diagonal preconditioner" for p in params}, set())
    else:
        assignment = assign_blocks(opt.model, params, exclude, block_type, opt.state,
                                   max_factor_size)
        if assignment.fallback:
            opt._warn_once(
                "fallback",
                f"{type(opt).__name__}: no Kronecker-factored block for these modules; their "
                f"parameters {fallback_effect}: {', '.join(assignment.fallback_modules())}",
            )
    fisher = FisherKind(kind)
    ref = params[0]
    # statistics and inverses in at least float32 (bf16 parameters: AᵀA in bf16 breaks eigh)
    factor_dtype = factor_dtype or torch.promote_types(ref.dtype, torch.float32)
    preconditioner = KroneckerPreconditioner(
        assignment, opt.state, kind=fisher, mc_samples=mc_samples, stat_decay=stat_decay,
        inv_every=inv_every, inverse_method=inverse_method, factor_dtype=factor_dtype,
        inverse_dtype=inverse_dtype or factor_dtype,
        sync=FactorSync(opt.communicator, resolve_placement(placement, opt._sharding.sharded)),
        damping=opt.damping_of_param, warn=opt._warn_once, kfac_approx=kfac_approx,
        warmup=warmup,
    )
    sampler = None
    if fisher is FisherKind.MC:
        sampler = LabelSampler(opt.loss_spec, opt._generator, mc_samples,
                               preconditioner.fallback)
    handlers = {}
    for name, block in assignment.blocks.items():
        uses = block.handler.uses if isinstance(block, SharedBlock) else {name: block.handler}
        handlers.update(uses)
    sharding = opt._sharding  # FSDP2: the sampled backward on unsharded weights (else as is)
    on_backward = None if sampler is None else sharding.sampled_backward(
        sampler, preconditioner.fallback)
    opt._attach(LayerCapture(
        opt.model, handlers, opt.output_fn, on_backward=on_backward,
        grad_hooks=fisher is FisherKind.EMPIRICAL,
        # traced tangents read the modules' weights, which FSDP keeps sharded between steps
        trace=opt.auto.enabled and supports_trace(opt.model) and not sharding.sharded,
    ))
    return preconditioner
