"""KFAC and EKFAC optimizers: Kronecker-factored natural gradient for real networks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.curvature.batch import StepBatch
from natgrad.curvature.ekfac import EigenBlock, scaling_sum
from natgrad.curvature.kfac import DenseBlock, FactorSums, KroneckerBlock, record_sums
from natgrad.curvature.model import FisherKind, check_kind
from natgrad.curvature.sampling import LabelSampler
from natgrad.curvature.tangents import supports_trace
from natgrad.distributed.kfac import FactorSync
from natgrad.distributed.placement import PLACEMENTS
from natgrad.layers.base import KroneckerHandler
from natgrad.layers.capture import ForwardRecord, LayerCapture, find_layers
from natgrad.likelihoods import Likelihood
from natgrad.losses import resolve_loss
from natgrad.optim.base import (
    CurvatureOptimizer,
    all_finite,
    check_choice,
    check_nonnegative,
    check_positive,
)

__all__ = ["KFAC", "EKFAC"]

_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_every(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class KFAC(CurvatureOptimizer):
    """K-FAC: natural gradient with a block-diagonal, Kronecker-factored Fisher.

    Each supported layer's Fisher block is G ⊗ A (see :func:`natgrad.kfac_factors`), kept as
    exponential moving averages (decay ``stat_decay``) of statistics gathered every
    ``stat_every`` steps, and inverted with factored Tikhonov damping every ``inv_every``
    steps:  Δ = (G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹.  The true Fisher's statistics need labels
    drawn from the model: on statistics steps the optimizer backpropagates them itself,
    inside the loss's backward, so the training loop is unchanged.

    Supported: ``nn.Linear`` (inputs of any leading shape), ``nn.Conv2d`` (groups=1; other
    groups use the fallback), ``nn.Embedding`` (diagonal input factor) and the affine
    parameters of BatchNorm/LayerNorm/GroupNorm (an exact dense block of their own). Other
    trainable parameters get the *fallback* update Δ = ∇ / (diag F + λ), with diag F the
    diagonal Fisher estimated from the same sampled-label gradients, and a one-time warning
    names their modules. Parameters of ``exclude``-d modules get the plain gradient.

    By default (``lr="auto"``, ``momentum="auto"``, ``damping="auto"``) the update
    δ = a·(−Δ) + m·δ_prev takes (a, m) minimising the quadratic model of the loss with the
    exact Fisher of the batch, and λ follows Levenberg–Marquardt (Martens & Grosse 2015,
    §6–7; :mod:`natgrad.optim.control`): no hyper-parameter needs tuning. With a fixed lr the
    update is θ ← θ − lr (μ buf + ν Δ) with momentum μ and KL clipping
    ν = min(1, √(kl_clip / (lr² Δᵀ F Δ))) (Ba et al. 2017, with K-FAC's F).

    Data parallel (``torch.distributed``, e.g. under ``DistributedDataParallel``; see
    :mod:`natgrad.distributed`): construct the optimizer on every rank after
    ``init_process_group``, from the model or its DDP wrapper, and run the usual loop with
    each rank's loss the mean over its own batch. Each statistics step sums the ranks'
    statistics in one bucketed all-reduce, so the factors are those of the concatenated
    batch; each inverse is computed on one rank (``inverse_placement``) and broadcast; the
    quadratic model (``"auto"`` settings) averages its batch terms over the ranks. Every rank
    then takes the same step: parameters stay identical, and the run matches one process
    on the concatenated batch up to rounding. Labels for the true Fisher are drawn with
    ``seed + rank``. Without a process group, or at world size 1, nothing is communicated.

    Args:
        model: the module being trained.
        params: parameters or param groups (default: all trainable parameters); groups may
            set ``lr``, ``damping``, ``momentum``, ``weight_decay``; a layer uses the group
            of its weight.
        lr: learning rate, > 0, or ``"auto"``: chosen each step by minimising the quadratic
            model with the exact Fisher of the batch (the number in ``param_groups`` then
            multiplies it, so LR schedulers still act; KL clipping is off).
        damping: Tikhonov damping λ, > 0, or ``"auto"`` (Levenberg–Marquardt).
        momentum: heavy-ball momentum in [0, 1), or ``"auto"`` (chosen jointly with lr).
        weight_decay: weight decay; L2 (preconditioned) unless ``decoupled_weight_decay``.
        decoupled_weight_decay: apply weight decay as θ ← θ(1 − lr·wd) (AdamW-style).
        loss: the loss as the training loop computes it, a torch loss module:
            ``nn.CrossEntropyLoss()`` (reduction ``"mean"`` or ``"sum"``, ``ignore_index``,
            ``label_smoothing``; logits ``[N, ..., C]`` flattened to tokens or not),
            ``nn.MSELoss()`` or ``nn.BCEWithLogitsLoss()`` (``"mean"`` or ``"sum"``). It
            defines the likelihood and the normalisation (see :mod:`natgrad.losses`): the
            step does not depend on how the loss is normalised, ignored positions count
            nowhere, and with k forwards backpropagated before one ``step()`` each loss is
            taken as divided by k (gradient accumulation). The loop may call the
            functional form (``F.cross_entropy``) with the same settings.
        likelihood: instead of ``loss``: ``"categorical"``, ``"gaussian"``, ``"bernoulli"``
            or a Likelihood, with the loss the batch mean of each example's negative
            log-likelihood summed over its outputs. Neither: ``"categorical"``.
        kind: ``"true"`` (labels sampled from the model) or ``"empirical"`` (the loss's own
            gradients).
        mc_samples: sampled labels per input for ``kind="true"``.
        stat_every: steps between statistics updates.
        inv_every: steps between inverse (or eigenbasis) refreshes.
        stat_decay: EMA decay of the statistics in [0, 1).
        kl_clip: KL-clipping bound (None: off).
        inverse_method: ``"cholesky"`` or ``"eigh"``.
        factor_dtype, inverse_dtype: dtypes of factors and inverses (default: the
            parameters').
        exclude: module names or types whose parameters are not preconditioned.
        output_fn: maps the model's output to the likelihood's parameters.
        seed: seeds label sampling (its RNG state is in ``state_dict``).
        lm_every, min_damping, initial_damping: Levenberg–Marquardt settings for
            ``damping="auto"``: steps between adjustments, floor, starting value. Each
            adjustment measures ρ on the step's batch (one extra forward); a step with
            ρ < 0 (the loss of the batch it was fitted to went up) is retried once at the
            minimum of the parabola through the loss, its slope and the measured loss
            (``state["natgrad"]["backtracked_steps"]``), else not taken: parameters
            unchanged, momentum restarted (``["rejected_steps"]``). Checking every step
            (the default) is what keeps a rare bad step from undoing a run.
        inverse_placement: under data parallelism, ``"balanced"`` computes each block's
            inverse (or eigenbasis) on one rank, chosen to balance the cost Σ d³ per rank,
            and broadcasts it; ``"everywhere"`` computes every inverse on every rank and
            broadcasts nothing (W-fold compute, no inverse traffic). Ignored on one process.
        process_group: the ``torch.distributed`` group of the data-parallel ranks (default:
            the default group, if one is initialised).
        curvature_rows: rows of the batch on which the quadratic model (``"auto"``
            settings) evaluates its two Fisher terms: ``"auto"`` (enough rows for 4096
            output dimensions, at least 64; see :func:`natgrad.optim.control.row_stride`),
            an int, or None for every row.

    Example:
        >>> opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss())  # automatic lr, momentum, damping
        >>> opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

    References:
        Martens & Grosse, Optimizing neural networks with Kronecker-factored approximate
        curvature, 2015. Grosse & Martens, A Kronecker-factored approximate Fisher matrix for
        convolution layers, 2016. Ba, Grosse & Martens, Distributed second-order optimization
        using Kronecker-factored approximations, 2017. Pauloski et al., KAISA: an adaptive
        second-order optimizer framework for deep neural networks, 2021.
    """

    data_parallel = True
    _block_type: type[KroneckerBlock] = KroneckerBlock
    _fallback_effect = "get a diagonal-Fisher update instead"

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        *,
        lr: float | str = "auto",
        damping: float | str = "auto",
        momentum: float | str = "auto",
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        loss: nn.Module | None = None,
        likelihood: str | Likelihood | None = None,
        kind: str = "true",
        mc_samples: int = 1,
        stat_every: int = 5,
        inv_every: int = 10,
        stat_decay: float = 0.95,
        kl_clip: float | None = 1e-3,
        inverse_method: str = "cholesky",
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype | None = None,
        exclude: Iterable[str | type] = (),
        output_fn: Callable[[Any], Tensor] | None = None,
        seed: int = 0,
        lm_every: int = 1,
        min_damping: float = 1e-5,
        initial_damping: float = 1e-2,
        inverse_placement: str = "balanced",
        process_group: Any = None,
        curvature_rows: int | str | None = "auto",
    ) -> None:
        spec = resolve_loss(likelihood, loss)
        kind = check_choice("kind", kind, ("true", "mc", "empirical"))
        # the optimizer's true Fisher is estimated with sampled labels: "mc" is the same thing
        self.kind = FisherKind.EMPIRICAL if kind == "empirical" else FisherKind.TRUE
        check_kind("mc", None, mc_samples)  # validates mc_samples
        self.mc_samples = mc_samples
        _check_every("stat_every", stat_every)
        _check_every("inv_every", inv_every)
        check_nonnegative("stat_decay", stat_decay, upper=1.0)
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        self.inverse_method = check_choice("inverse_method", inverse_method, ("cholesky", "eigh"))
        for name, dtype in (("factor_dtype", factor_dtype), ("inverse_dtype", inverse_dtype)):
            if dtype not in _DTYPES:
                raise TypeError(f"{name} must be a floating torch.dtype or None, got {dtype!r}")
        self.stat_every, self.inv_every, self.stat_decay = stat_every, inv_every, stat_decay
        placement = check_choice("inverse_placement", inverse_placement, PLACEMENTS)
        self.kl_clip = kl_clip
        defaults = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(
            model, params, defaults, spec, output_fn, lm_every, min_damping,
            initial_damping, process_group, curvature_rows,
        )
        self._sync = FactorSync(self._comm, placement)
        if self.auto.lr:
            self.kl_clip = None  # the quadratic model bounds the step instead
        ref = self.param_groups[0]["params"][0]
        self.factor_dtype = factor_dtype or ref.dtype
        self.inverse_dtype = inverse_dtype or self.factor_dtype
        self._generator = torch.Generator(device=ref.device)
        self._generator.manual_seed(seed + self._comm.rank)  # ranks draw different labels
        self._setup_layers(self.model, exclude, output_fn)
        self._sync_capture()

    # --- set-up -----------------------------------------------------------------------------
    def _setup_layers(
        self, model: nn.Module, exclude: Iterable[str | type], output_fn: Callable | None
    ) -> None:
        layers = find_layers(model, exclude)
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        named = dict(model.named_parameters())
        fallback = {n: why for n, why in layers.fallback.items() if id(named[n]) in mine}
        self.blocks: dict[str, KroneckerBlock | DenseBlock] = {}
        for name, handler in layers.handlers.items():
            optimized = [id(p) in mine for p in handler.params]
            if not any(optimized):
                continue
            if not all(optimized):  # a block needs all of its parameters' gradients
                reason = "only some of its parameters in the optimizer"
                for pname, p in named.items():
                    if id(p) in mine and any(p is q for q in handler.params):
                        fallback[pname] = f"{type(handler.module).__name__} with {reason}"
                continue
            block_type = self._block_type if isinstance(handler, KroneckerHandler) else DenseBlock
            self.blocks[name] = block_type(handler, self.state[handler.params[0]])
        self.fallback = [named[n] for n in fallback]
        self.excluded = {id(named[n]) for n in layers.excluded}
        if self.fallback:
            modules = sorted({f"{n.rsplit('.', 1)[0] or '<model>'} ({why})"
                              for n, why in fallback.items()})
            self._warn_once(
                "fallback",
                f"{type(self).__name__}: no Kronecker-factored block for these modules; their "
                f"parameters {self._fallback_effect}: {', '.join(modules)}",
            )
        handlers = {name: block.handler for name, block in self.blocks.items()}
        self._capture = self._attach(LayerCapture(
            model, handlers, output_fn,
            on_backward=self._label_sampler(), grad_hooks=self.kind is FisherKind.EMPIRICAL,
            trace=self.auto.enabled and supports_trace(model),
        ))

    def _label_sampler(self) -> LabelSampler | None:
        """Draws the true Fisher's labels inside the loss's backward (None: empirical)."""
        if self.kind is FisherKind.EMPIRICAL:
            return None
        return LabelSampler(self.loss_spec, self._generator, self.mc_samples, self.fallback)

    def _sync_capture(self) -> None:
        # statistics are gathered on steps 0, stat_every, 2·stat_every, ...
        self._capture.active = self.global_state["step"] % self.stat_every == 0

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.global_state["rng_state"] = self._generator.get_state()
        if self._comm.active:
            self.global_state["rng_rank"] = self._comm.rank  # whose label stream it is
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for block in self.blocks.values():  # blocks view the (new) per-layer state dicts
            block.state = self.state[block.handler.params[0]]
        rng = self.global_state.get("rng_state")
        if rng is not None:
            self._generator.set_state(rng.cpu())
            rank = self._comm.rank
            if self.global_state.get("rng_rank", 0) != rank:
                # another rank's stream (a checkpoint written by rank 0): fork a stream of
                # this rank's own from it, so that ranks keep drawing different labels
                start = torch.randint(2**62, (1,), generator=self._generator,
                                      device=self._generator.device)
                self._generator.manual_seed(int(start) + rank)
                self.global_state["rng_rank"] = rank
        self._sync_capture()

    # --- statistics -------------------------------------------------------------------------
    def _draw_weights(self, batch: StepBatch, index: int) -> list[float]:
        """Weights of forward ``index``'s δ draws in G (on the canonical scale)."""
        if self.kind is FisherKind.EMPIRICAL:
            return [batch.scales[index] ** -2]  # the loss's δ is s·(per-sample δ)
        return [1.0 / self.mc_samples] * self.mc_samples

    def _gather_statistics(self, batch: StepBatch, grads: dict[Tensor, Tensor]) -> bool:
        """Fold the batch's statistics into the EMAs; False if any is not finite."""
        records = batch.records
        new: dict[str, FactorSums] = {}
        for name, block in self.blocks.items():
            sums = FactorSums()
            for i, record in enumerate(records):
                if name in record.calls:
                    record_sums(
                        block.handler, record.calls[name], record.batch_size, sums,
                        self._draw_weights(batch, i), self.factor_dtype, batch.valid[i],
                    )
            if sums.samples:
                new[name] = sums
        if self._sync.active:
            new, diag = self._reduce_statistics(records, grads, new)
        else:
            diag = self._fallback_diagonal(records, grads)
        values = [s.input_sum for s in new.values() if s.input_sum is not None]
        values += [s.grad_sum for s in new.values()] + list(diag.values())
        if not all_finite(values):
            return False
        for name, sums in new.items():
            self.blocks[name].update(sums, self.stat_decay)
        for p, value in diag.items():
            state = self.state[p]
            old = state.get("fisher_diag")
            state["fisher_diag"] = value if old is None else old.mul_(self.stat_decay).add_(
                value, alpha=1 - self.stat_decay
            )
        return True

    def _reduce_statistics(
        self, records: list[ForwardRecord], grads: dict[Tensor, Tensor],
        new: dict[str, FactorSums],
    ) -> tuple[dict[str, FactorSums], dict[Tensor, Tensor]]:
        """The statistics of every rank's batch together (one bucketed all-reduce) and the
        fallback diagonal normalised by the total number of samples N."""
        empirical = self.kind is FisherKind.EMPIRICAL
        # sampled-label diagonal: reduce the sums Σ g² (normaliser 1), divide by N after;
        # the empirical one comes from the already all-reduced gradient and N alone
        local = {} if empirical else self._fallback_diagonal(records, grads, samples=1)
        params = [] if empirical else [p for p in self.fallback if p in grads]
        new, diag, total = self._sync.reduce_statistics(
            self.blocks, new, local, params, sum(r.batch_size for r in records),
            self.factor_dtype,
        )
        if empirical:
            return new, self._fallback_diagonal(records, grads, samples=total)
        return new, {p: value / total for p, value in diag.items()}

    def _fallback_diagonal(
        self, records: list[ForwardRecord], grads: dict[Tensor, Tensor],
        samples: int | None = None,
    ) -> dict[Tensor, Tensor]:
        """diag F ≈ E[ĝ²]/N with ĝ the batch-summed sampled-label gradient (unbiased);
        N = ``samples`` if given, else the records' batch sizes summed."""
        if not self.fallback or not records:
            return {}
        n = sum(r.batch_size for r in records) if samples is None else samples
        if self.kind is FisherKind.EMPIRICAL:
            return {p: (grads[p] * n).square() / n for p in self.fallback if p in grads}
        out: dict[Tensor, Tensor] = {}
        for record in records:
            for draw in record.sampled_param_grads:
                for p, g in zip(self.fallback, draw, strict=True):
                    if g is not None:
                        value = g.square() / (n * self.mc_samples)
                        out[p] = value if p not in out else out[p] + value
        return out

    def _extra_statistics(self, batch: StepBatch) -> None:
        """Hook for EKFAC's scaling statistics."""

    # --- the update ---------------------------------------------------------------------------
    def _refresh(self, groups: dict[int, dict[str, Any]]) -> None:
        def refresh(block: KroneckerBlock | DenseBlock) -> None:
            damping = self.damping_of(groups[id(block.handler.params[0])])
            block.refresh(damping, self.inverse_method, self.inverse_dtype)

        if self._sync.active:  # on the owners, then broadcast (see inverse_placement)
            self._sync.refresh(self.blocks, refresh, self.inverse_dtype)
            return
        for block in self.blocks.values():
            if block.ready:
                refresh(block)

    def _update_curvature(self, grads: dict[Tensor, Tensor], batch: StepBatch) -> bool:
        """Statistics (on statistics steps) and refreshes (every ``inv_every`` steps).

        False if a statistic is not finite.
        """
        has_stats = any(r.stats for r in batch.records)
        if has_stats and not self._gather_statistics(batch, grads):
            return False
        due = self.global_state["step"] % self.inv_every == 0
        if due or not all(b.refreshed for b in self.blocks.values() if b.ready):
            self._refresh(self._group_of())
        if has_stats:
            self._extra_statistics(batch)
        return True

    def _kfac_directions(
        self, grads: dict[Tensor, Tensor], quadratics: list[Tensor] | None = None
    ) -> dict[Tensor, Tensor]:
        """Δ per parameter: Kronecker blocks, dense blocks, the diagonal fallback; the plain
        gradient where there is no curvature yet or the module is excluded. Appends
        lr² ΔᵀFΔ per block to ``quadratics`` when given (KL clipping)."""
        groups = self._group_of()
        directions: dict[Tensor, Tensor] = {}
        for block in self.blocks.values():
            params = block.handler.params
            if not block.refreshed or not all(p in grads for p in params):
                continue
            group = groups[id(params[0])]
            direction = block.precondition(block.handler.gather(grads), self.damping_of(group))
            if quadratics is not None:
                quadratics.append(group["lr"] ** 2 * block.quadratic(direction))
            directions.update(block.handler.scatter(direction))
        for p in self.fallback:
            if p in grads and "fisher_diag" in self.state[p]:
                group = groups[id(p)]
                diag = self.state[p]["fisher_diag"]
                direction = grads[p] / (diag + self.damping_of(group))
                directions[p] = direction
                if quadratics is not None:
                    quadratics.append(group["lr"] ** 2 * (diag * direction.square()).sum())
        for p, g in grads.items():
            directions.setdefault(p, g)  # excluded parameters, or no statistics yet
        return {p: d for p, d in directions.items() if p in grads}

    def _precondition(
        self, grads: dict[Tensor, Tensor], batch: StepBatch
    ) -> dict[Tensor, Tensor] | None:
        if not self._update_curvature(grads, batch):
            return None
        quadratics: list[Tensor] | None = [] if self.kl_clip is not None else None
        directions = self._kfac_directions(grads, quadratics)
        if quadratics:
            quadratic = float(sum(q.double() for q in quadratics))
            if quadratic > 0 and self.kl_clip / quadratic < 1.0:
                # KL clipping: lr² ΔᵀFΔ ≤ kl_clip
                scale = math.sqrt(self.kl_clip / quadratic)
                directions = {p: d * scale for p, d in directions.items()}
        return directions

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = super().step(closure)
        self._sync_capture()
        return loss

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (no more statistics are gathered)."""
        self._capture.remove()


class EKFAC(KFAC):
    """EKFAC: K-FAC's eigenbasis (refreshed every ``inv_every`` steps) with a diagonal
    rescaling s = E[(Q_Gᵀ Xₙ Q_A)²] of the per-sample gradients in that basis (updated every
    ``stat_every`` steps): Δ = Q_G ((Q_Gᵀ ∇W Q_A) / (s + λ)) Q_Aᵀ.

    Same arguments as :class:`KFAC` (``inverse_method`` is unused: EKFAC always
    eigendecomposes). After each eigenbasis refresh the scaling restarts from K-FAC's
    eigenvalues and is refined by the following statistics steps.

    References:
        George, Laurent, Bouthillier, Ballas & Vincent, Fast approximate natural gradient
        descent in a Kronecker-factored eigenbasis, 2018.
    """

    _block_type = EigenBlock

    def _extra_statistics(self, batch: StepBatch) -> None:
        parts: dict[str, tuple[Tensor | None, int]] = {}
        for name, block in self.blocks.items():
            if not isinstance(block, EigenBlock) or not block.refreshed:
                continue
            total, samples = None, 0
            for i, record in enumerate(batch.records):
                if name not in record.calls:
                    continue
                part = scaling_sum(
                    block.handler, record.calls[name], self._draw_weights(batch, i),
                    block.state["eigvecs_out"], block.state["eigvecs_in"],
                )
                total = part if total is None else total + part
                samples += record.batch_size
            parts[name] = (total, samples)
        if self._sync.active:  # the scaling of every rank's batch together
            parts = self._sync.reduce_scaling(self.blocks, parts)
        for name, (total, samples) in parts.items():
            if total is not None:
                self.blocks[name].update_scaling(total, samples, self.stat_decay)
