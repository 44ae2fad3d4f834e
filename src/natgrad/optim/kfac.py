"""KFAC and EKFAC optimizers: Kronecker-factored natural gradient for real networks.

Each is a :class:`natgrad.optim.base.CurvatureOptimizer` holding a
:class:`natgrad.optim.kronecker.KroneckerPreconditioner` (Kronecker or eigenbasis blocks)
and the hooks that feed it; the step itself is the base class's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad._checks import check_positive, check_positive_int
from natgrad.curvature.ekfac import EigenBlock
from natgrad.curvature.kfac import KroneckerBlock
from natgrad.likelihoods import Likelihood
from natgrad.losses import resolve_loss
from natgrad.optim.base import CurvatureOptimizer
from natgrad.optim.kronecker import (
    KroneckerPreconditioner,
    check_statistics,
    kronecker_curvature,
)

__all__ = ["KFAC", "EKFAC"]

class KFAC(CurvatureOptimizer):
    """K-FAC: natural gradient with a block-diagonal, Kronecker-factored Fisher.

    Each supported layer's Fisher block is G ⊗ A (see :func:`natgrad.kfac_factors`), kept as
    exponential moving averages (decay ``stat_decay``) of statistics gathered every
    ``stat_every`` steps, and inverted with factored Tikhonov damping every ``inv_every``
    steps:  Δ = (G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹.  The true Fisher's statistics need labels
    drawn from the model: on statistics steps the optimizer backpropagates them itself,
    inside the loss's backward, so the training loop is unchanged.

    Supported: ``nn.Linear`` (inputs of any leading shape), ``nn.Conv1d/2d/3d`` (grouped and
    depthwise too: one Kronecker product per group), ``nn.ConvTranspose1d/2d/3d`` (as the
    stride-1 convolution of the spread input), ``nn.Embedding`` (diagonal input factor),
    ``nn.MultiheadAttention`` (its in-projection: one packed block for self-attention, one
    per q/k/v for cross-attention and kdim/vdim weights; out_proj), ``nn.RNN``/``GRU``/
    ``LSTM`` and their cells (one block for each layer's and direction's input projection and
    one for its recurrent projection, shared over time steps; packed sequences too), a weight
    tied between two of these (one shared block, :mod:`natgrad.curvature.shared`) and the
    affine parameters of BatchNorm/LayerNorm/GroupNorm (an exact dense block). Other
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
    A model sharded with FSDP2's ``fully_shard`` trains the same way, losslessly: the step
    runs on whole (all-gathered) gradients and parameters and each rank applies its shard of
    the update (:mod:`natgrad.distributed.fsdp`, docs/distributed.md).

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
        kind: ``"mc"`` (the true Fisher, estimated with labels sampled from the model) or
            ``"empirical"`` (the loss's own gradients).
        mc_samples: sampled labels per input for ``kind="mc"``.
        stat_every: steps between statistics updates.
        inv_every: steps between inverse (or eigenbasis) refreshes. ``stat_every=1,
            inv_every=5`` takes 12–33 % fewer steps on every bench problem (seeds 0–2) but
            costs 24–45 % more per step; it saves seconds only on char-gpt and the digits
            autoencoder.
        curvature_warmup: the first ``curvature_warmup`` steps gather statistics and refresh
            the inverses every step (the curvature changes fastest there; 0: off). With the
            default 20, ``benchmarks/robustness.py`` (seeds 0–2) takes 8 % fewer steps to
            target in all than with 0 (MNIST autoencoder 50/30/80 → 20/20/50), no problem
            more than +20; EKFAC reaches char-gpt's target (seed 0, 270 steps). A warm-up
            step costs about twice a later one (EKFAC's three to four times): 10 would cut
            the MNIST autoencoder's seconds to target by about 30 % (seeds 0–5) and
            digits-cnn's by 5–7 %, but costs the language models (char-gpt 4–6 % more
            seconds; after a fixed number of steps ``benchmarks/outside_llama.py`` held-out
            loss 2.294/2.413/2.308 against 2.249/2.344/2.313, ``outside_gpt2.py`` seed 2
            5.14 against 4.46); statistics every ``stat_every`` steps during the warm-up
            (inverses still every step) cost steps everywhere (MNIST 30/30/50 against
            20/20/40, char-gpt 230/220/280 against 180/220/240).
        stat_decay: EMA decay of the statistics in [0, 1); the k-th statistics of a block
            enter with weight max(1/k, 1 − stat_decay) (a plain average of the first ones,
            Martens & Grosse 2015; on the bench, seeds 0–2, 12 % fewer steps to
            target in all for KFAC, 4 % for EKFAC, none more than +20 steps).
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
            ρ < 0 (the loss of the batch it was fitted to went up) is retried at the
            minimum of the parabola through the loss, its slope and the measured loss, up
            to 3 times (``state["natgrad"]["backtracked_steps"]``), else not taken:
            parameters unchanged, momentum restarted (``["rejected_steps"]``); λ is doubled
            when the step before also raised its batch's loss. Checking every step (the
            default) is what keeps a rare bad step from undoing a run. The start 1e-4
            (with the averaged first statistics and ``curvature_warmup``):
            ``benchmarks/robustness.py`` seeds 0–2
            take 1240 steps to target on the five non-LM bench problems against 1870 from
            1e-2 (regression 150/160/170 → 50/60/60), seeds 3–5 none diverged; char-gpt
            180/170/240 against 180/170/190; ``benchmarks/outside_llama.py`` held-out loss
            2.305/2.158/2.273 against 2.323/2.346/2.292. 1e-5 never reached char-gpt's
            target on seed 1.
        inverse_placement: under data parallelism, ``"balanced"`` computes each block's
            inverse (or eigenbasis) on one rank, chosen to balance the cost Σ d³ per rank,
            and broadcasts it; ``"everywhere"`` computes every inverse on every rank and
            broadcasts nothing (W-fold compute, no inverse traffic); ``"owner"`` keeps each
            block's factors and inverses on its owner only, which preconditions and broadcasts
            the block's direction every step (about 1/W of the state per rank; EKFAC's
            eigenbases are also cached on every rank); ``"auto"`` (default) is ``"owner"``
            for a model sharded with FSDP2 and ``"balanced"`` otherwise. Ignored on one
            process.
        process_group: the ``torch.distributed`` group of the data-parallel ranks (default:
            the default group, if one is initialised).
        curvature_rows: rows of the batch on which the quadratic model (``"auto"``
            settings) evaluates its two Fisher terms: ``"auto"`` (enough rows for 4096
            output dimensions, at least 64; see :func:`natgrad.optim.control.row_stride`),
            an int, or None for every row.
        kfac_approx: how a layer shared over positions (sequence steps, spatial locations)
            is factored (Eschenhagen et al., 2023): ``"expand"`` (positions count as samples:
            A is the mean of āāᵀ over samples and positions, G the mean over samples of
            Σₜ δδᵀ) or ``"reduce"`` (each sample's positions are averaged in A and summed in
            G first). Both are exact without sharing; Embedding layers always expand.
        max_factor_size: the largest side of a block's dense matrices (default 8192: 256 MB
            each in float32); a layer with a larger factor — a language model's output head
            and tied embedding with a vocabulary of V > 8192 have a V × V one — takes the
            diagonal Fisher instead (named in the fallback warning). None: no limit.
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 training loop, needed only
            when it unscales the gradients before its step (``scaler.unscale_(opt)``, to clip
            them); ``scaler.step(opt)`` alone hands its scale over (see
            :mod:`natgrad.optim.amp`).
        momentum_every: with ``lr`` and ``momentum`` both ``"auto"``, the steps between
            fits of both coefficients (two Jacobian-vector products). A fit with a, m > 0
            keeps its ratio r = m/a, and the steps until the next multiple of
            ``momentum_every`` move along d + r·δ₀ with only the length fitted (one
            product; checked, backtracked and damped as any step); a rejected step drops
            the ratio. 1 (default): both on every step. With 4, ``benchmarks/robustness.py``
            (seeds 0–5) takes 11 % fewer steps to target on the five bench problems that are
            not language models (2030 against 2270; digits-cnn 110/140/140/90/110 against
            130/150/140/130/130 on seeds 0–4; none more than +10 steps) at a 2.5–10 %
            cheaper step (``benchmarks/step_time.py``), but the language models lose:
            char-gpt 200/190/210/160/170/290 steps against 180/220/240/140/160/200,
            ``benchmarks/outside_llama.py`` held-out 2.374/2.373/2.373 against
            2.249/2.344/2.313, ``outside_gpt2.py`` seed 0 5.03 against 4.61 (their fitted m
            changes sign from step to step), and so do small models on other data
            (``benchmarks/outside_tabular.py --variant 'me4={"momentum_every": 4}'``, six
            problems, seeds 0–5: 4945 steps against 4700; breast cancer 970 against 880,
            the autoencoder 1035 against 950).

    Example:
        >>> opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss())  # automatic lr, momentum, damping
        >>> opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

    References:
        Martens & Grosse, Optimizing neural networks with Kronecker-factored approximate
        curvature, 2015. Grosse & Martens, A Kronecker-factored approximate Fisher matrix for
        convolution layers, 2016. Eschenhagen, Immer, Turner, Schneider & Hennig,
        Kronecker-factored approximate curvature for modern neural network architectures,
        2023. Ba, Grosse & Martens, Distributed second-order optimization
        using Kronecker-factored approximations, 2017. Pauloski et al., KAISA: an adaptive
        second-order optimizer framework for deep neural networks, 2021.
    """

    data_parallel = True
    fully_sharded = True
    _block_type: type[KroneckerBlock] = KroneckerBlock

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
        kind: str = "mc",
        mc_samples: int = 1,
        stat_every: int = 5,
        inv_every: int = 10,
        curvature_warmup: int = 20,
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
        initial_damping: float = 1e-4,
        inverse_placement: str = "auto",
        process_group: Any = None,
        curvature_rows: int | str | None = "auto",
        kfac_approx: str = "expand",
        grad_scaler: Any = None,
        max_factor_size: int | None = 8192,
        momentum_every: int = 1,
    ) -> None:
        spec = resolve_loss(likelihood, loss)
        if max_factor_size is not None:
            check_positive_int("max_factor_size", max_factor_size)
        kind, inverse_method, placement = check_statistics(
            kind, mc_samples, stat_every, inv_every, stat_decay, inverse_method, factor_dtype,
            inverse_dtype, inverse_placement, kfac_approx, curvature_warmup,
        )
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        defaults = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(
            model, params, defaults, spec, output_fn, lm_every, min_damping,
            initial_damping, process_group, curvature_rows, seed, grad_scaler,
            momentum_every=momentum_every,
        )
        self.kl_clip = None if self.auto.lr else kl_clip  # the quadratic model bounds it
        self.stat_every = stat_every
        self.curvature_warmup = curvature_warmup
        self.preconditioner: KroneckerPreconditioner = kronecker_curvature(
            self, exclude=exclude, block_type=self._block_type, kind=kind,
            mc_samples=mc_samples, stat_decay=stat_decay, inv_every=inv_every,
            inverse_method=inverse_method, factor_dtype=factor_dtype,
            inverse_dtype=inverse_dtype, placement=placement, kfac_approx=kfac_approx,
            fallback_effect="get a diagonal-Fisher update instead",
            max_factor_size=max_factor_size,
            warmup=curvature_warmup,
        )

    @property
    def blocks(self) -> dict[str, Any]:
        """The curvature block of each supported layer, by module name."""
        return self.preconditioner.blocks

    @property
    def fallback(self) -> list[Tensor]:
        """Parameters preconditioned by their diagonal Fisher (no block for their module)."""
        return self.preconditioner.fallback


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
