"""Damping and step-size control shared by all optimizers (Martens & Grosse 2015, §6–7).

Given the preconditioned direction Δ (descent d = −Δ) and the previous update δ₀, the update
is δ = a·d + m·δ₀. The quadratic model of the canonical objective J (the batch-mean negative
log-likelihood, see :mod:`natgrad.losses`),

    M(δ) = ∇Jᵀδ + ½ δᵀ (F + (λ + η) I) δ,

with F the exact Fisher of the current batch (via two Jacobian-vector products, never
formed), λ the damping and η the L2 weight decay, is minimised over the free coefficients:
a (``lr="auto"``) and m (``momentum="auto"``), a 2×2 linear system. Levenberg–Marquardt
adapts λ every ``lm_every`` steps from the reduction ratio ρ = (J(θ+δ) − J(θ)) / M₀(δ),
M₀ being the model without the damping term:
λ ← ω λ if ρ > 3/4, λ ← λ / ω if ρ < 1/4, clamped to [``min_damping``, ``max_damping``].
A step with ρ < 0 (the loss of the batch it was fitted to went up) is not taken as it is:
the optimizer tries again at the minimum of the parabola through J(θ), its slope and
J(θ+δ) (:func:`backtrack_fraction`), and from there again, up to ``backtracks`` (3) tries,
before it rejects the step. A try costs one forward, a rejection the whole step: on the
MNIST autoencoder (``benchmarks/robustness.py``, seeds 0–2) one try left 3 of its first 20
steps rejected, three tries none (steps to target unchanged at this resolution; digits-cnn
seed 2 150 → 140, the other problems unchanged). A step with
ρ < 0 (backtracked or rejected) right after another also multiplies λ by ``reject_factor``
(2), as Levenberg–Marquardt codes do after failed steps (Madsen, Nielsen & Tingleff 2004):
with ω alone λ grows 5 % a step, and the char-gpt transformer (seed 2) rejected its first 49
steps while it crept up, a word-level GPT-2 (``benchmarks/outside_gpt2.py``) backtracked
every one of its first 20–40 (held-out loss after 100 steps 5.21 → 4.69 on seed 0, AdamW
5.01); a lone failure keeps ω's increase (doubling there cost mnist-autoencoder 20 steps). The
Gauss-Newton curvature misses the network's own curvature, which is large where the
residuals are (an autoencoder on its mean-image plateau; attention logits, bilinear in the
residual stream, at a transformer's initialisation): there a step the model trusts can
overshoot badly.

The Fisher terms dᵀFd, dᵀFδ₀, δ₀ᵀFδ₀ are averages over the batch's rows; for models with
many outputs per example (autoencoders) a strided subset of rows estimates them as well at
a fraction of the forward-mode cost (``curvature_rows``, :func:`row_stride`). The gradient
terms and ρ always use the whole batch: a row subset's gradient is too noisy for them.

J(θ+δ) needs the batch's targets, which the optimizer never sees: they are recovered
exactly from the loss's gradient with respect to the model's output and the loss's
normalisation (:meth:`natgrad.curvature.batch.StepBatch.targets`). Positions the loss
ignores enter neither the Fisher terms nor ρ.

Data parallel: given a :class:`natgrad.distributed.Communicator`, the batch terms (the
Fisher's 2×2 Gram matrix, the loss change) are averaged over the ranks' batches, weighted by
their sizes, before anything is decided, so every rank picks the same (a, m, λ): those of
the concatenated batch. The gradient terms need no exchange (DDP has averaged the gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from natgrad._checks import check_positive_int
from natgrad.curvature.batch import StepBatch
from natgrad.curvature.model import FunctionalModel
from natgrad.curvature.tangents import sequential_jvp
from natgrad.distributed.comm import Communicator
from natgrad.layers.capture import ForwardRecord

__all__ = [
    "AutoSettings",
    "QuadraticControl",
    "backtrack_fraction",
    "lm_update",
    "quadratic_value",
    "solve_coefficients",
]


Matrix2 = Sequence[Sequence[float]] | Tensor
Vector2 = Sequence[float] | Tensor


def _floats(curvature: Matrix2, linear: Vector2) -> tuple[list[list[float]], list[float]]:
    c = curvature.tolist() if isinstance(curvature, Tensor) else curvature
    g = linear.tolist() if isinstance(linear, Tensor) else linear
    return [[float(v) for v in row] for row in c], [float(v) for v in g]


def solve_coefficients(
    curvature: Matrix2, linear: Vector2, free: tuple[bool, bool], fixed: tuple[float, float]
) -> tuple[float, float, float]:
    """Minimise q(c) = linearᵀc + ½ cᵀ curvature c over the free entries of c = (a, m).

    Args:
        curvature: the 2×2 matrix [[dᵀCd, dᵀCδ₀], [δ₀ᵀCd, δ₀ᵀCδ₀]].
        linear: [∇ᵀd, ∇ᵀδ₀].
        free: which of (a, m) are chosen; the others take their ``fixed`` value.
        fixed: values of (a, m) that are not free.

    Returns:
        (a, m, q(a, m)). Safeguards: the joint solution is taken only if the 2×2 system is
        clearly positive definite, it beats a alone, a > 0 and |m| < 1; otherwise m = 0 and
        a is fitted alone. A non-positive curvature along d keeps a at its fixed value.
    """
    c, g = _floats(curvature, linear)
    a, m = fixed
    if free[0] and free[1]:
        a_alone = -g[0] / c[0][0] if c[0][0] > 0 else a
        a, m = a_alone, 0.0
        det = c[0][0] * c[1][1] - c[0][1] * c[1][0]
        # d and δ₀ must not be (numerically) parallel in the C-metric: the inputs carry the
        # model's precision, so demand a clearly positive determinant
        if c[1][1] > 0 and det > 1e-4 * c[0][0] * c[1][1]:
            joint = ((c[0][1] * g[1] - c[1][1] * g[0]) / det,  # C c = −g by Cramer's rule
                     (c[1][0] * g[0] - c[0][0] * g[1]) / det)
            better = quadratic_value(c, g, *joint) <= quadratic_value(c, g, a_alone, 0.0)
            if better and abs(joint[1]) < 1.0 and joint[0] > 0:
                a, m = joint
    elif free[0]:
        if c[0][0] > 0:
            a = -(g[0] + m * c[0][1]) / c[0][0]
    elif free[1]:
        m = -(g[1] + a * c[0][1]) / c[1][1] if c[1][1] > 0 else 0.0
        m = min(max(m, -1.0), 1.0)
    return a, m, quadratic_value(c, g, a, m)


def quadratic_value(curvature: Matrix2, linear: Vector2, a: float, m: float) -> float:
    """q(a, m) = linearᵀc + ½ cᵀ curvature c for c = (a, m)."""
    c, g = _floats(curvature, linear)
    quad = c[0][0] * a * a + (c[0][1] + c[1][0]) * a * m + c[1][1] * m * m
    return g[0] * a + g[1] * m + 0.5 * quad


def backtrack_fraction(slope: float, predicted: float, change: float) -> float | None:
    """The fraction t of a failed step δ at which to try again, or None (give up).

    The parabola through J(θ) with slope ∇Jᵀδ = ``slope`` and the measured ``change``
    J(θ+δ) − J(θ) has its minimum at t = −slope / (2 (change − slope)); t is kept in
    [0.05, 0.5]. ``predicted`` is unused except to refuse a step the model itself did not
    expect to help (predicted ≥ 0) or a change that is not finite.
    """
    curvature = change - slope
    if not (math.isfinite(change) and slope < 0 and predicted < 0 and curvature > 0):
        return None
    return min(max(-slope / (2.0 * curvature), 0.05), 0.5)


def lm_update(
    damping: float, rho: float, omega: float, min_damping: float, max_damping: float
) -> float:
    """One Levenberg–Marquardt adjustment of λ from the reduction ratio ρ."""
    if not math.isfinite(rho) or rho < 0.25:
        damping = damping / omega
    elif rho > 0.75:
        damping = damping * omega
    return min(max(damping, min_damping), max_damping)


@dataclass
class AutoSettings:
    """Which quantities are automatic, and the Levenberg–Marquardt constants."""

    lr: bool = False
    momentum: bool = False
    damping: bool = False
    lm_every: int = 5
    lm_decay: float = 0.95  # ω = lm_decay ** lm_every
    min_damping: float = 1e-5
    max_damping: float = 1e3
    reject_factor: float = 2.0  # a step with ρ < 0 after one also multiplies λ by this
    backtracks: int = 3  # tries at a fraction of a step whose batch loss went up
    momentum_every: int = 1  # steps between fits of (a, m); between them a alone on d + rδ₀
    rows: int | str | None = "auto"  # rows of the batch in the quadratic model's curvature

    @property
    def enabled(self) -> bool:
        return self.lr or self.momentum or self.damping

    @property
    def omega(self) -> float:
        return self.lm_decay**self.lm_every


GRAM_CHUNK = 1 << 24  # values per vector flattened at once by _parameter_gram


def _parameter_gram(vectors: Sequence[Sequence[Tensor]]) -> Tensor:
    """The Gram matrix [⟨vᵢ, vⱼ⟩] of k vectors given per parameter (each a list of tensors
    following the parameters), ``[k, k]``, in at least float32: one matrix product of the
    flattened vectors per run of parameters holding at most ``GRAM_CHUNK`` values (a small
    model's in one; a large model's copies stay bounded)."""
    dtype = torch.promote_types(vectors[0][0].dtype, torch.float32)
    sizes = [t.numel() for t in vectors[0]]
    total, start = None, 0
    while start < len(sizes):
        end, size = start + 1, sizes[start]
        while end < len(sizes) and size + sizes[end] <= GRAM_CHUNK:
            size, end = size + sizes[end], end + 1
        flat = torch.stack([torch.cat([t.reshape(-1) for t in vector[start:end]]).to(dtype)
                            for vector in vectors])  # [k, values of the run]
        part = flat @ flat.T
        total = part if total is None else total + part
        start = end
    return total


AUTO_ROWS_OUTPUTS = 4096  # "auto": keep ≥ this many output dimensions (rows × outputs)
AUTO_ROWS_MIN = 64  # ... and never fewer rows than this


def check_rows(value: Any) -> int | str | None:
    """Validate ``curvature_rows``: a positive int, ``"auto"`` or None (every row)."""
    check_positive_int("curvature_rows", value, allow=("auto", None))
    return value


def row_stride(rows: int | str | None, records: list[ForwardRecord], model: nn.Module) -> int:
    """Every how many rows of the batch the quadratic model's Fisher terms are computed.

    The two curvature terms dᵀFd and δ₀ᵀFδ₀ are averages over the batch's rows, each row
    contributing as many independent directions as the model has outputs K per example.
    ``rows="auto"`` keeps at least max(64, ⌈4096 / K⌉) rows: every row for classifiers
    (K = 10) or scalar regression, a quarter of a 256-batch for a 784-pixel autoencoder, where
    the forward-mode pass dominates the step. Models whose examples interact in the forward
    (BatchNorm in training mode) always use every row. An int asks for about that many rows;
    None for all of them. Fewer rows for classifiers cost steps (``benchmarks/robustness.py``,
    seeds 0–2: digits MLP 150/160/190 steps with 64 of 256 rows, 140/140/190 with 128,
    against 110/120/110), and so does checking the step (ρ) on the subset too, with the
    subset's own linear term from the products (digits MLP 870/920/390 with 126/125/61
    rejected steps; the MNIST autoencoder 20/30/40 against 20/20/40).
    """
    batch = sum(r.batch_size for r in records)
    if rows is None or batch <= 1:
        return 1
    if rows == "auto":
        if any(isinstance(m, _BatchNorm) and m.training for m in model.modules()):
            return 1
        output = records[0].output
        per_example = output[0].numel() if output is not None and output.dim() else 1
        rows = max(AUTO_ROWS_MIN, math.ceil(AUTO_ROWS_OUTPUTS / max(per_example, 1)))
    return max(1, batch // int(rows))


def _jvps(
    fmodel: FunctionalModel,
    records: list[ForwardRecord],
    inputs: tuple[Tensor, ...],
    tangents: list[list[Tensor]],
    stride: int = 1,
) -> tuple[Tensor, list[Tensor]]:
    """Outputs and J·t per tangent on every ``stride``-th row of the batch: from the traced
    activations of a Sequential model when available (about one forward), else by
    forward-mode AD through the module."""
    inputs = tuple(x[::stride] for x in inputs)
    traced = fmodel.output_fn is None and all(r.trace for r in records) and len(inputs) == 1
    if not traced:
        return fmodel.jvp(inputs, tangents)
    # under autocast the traced activations are in half precision: the quadratic model
    # propagates its tangents in the parameters' precision
    dtype = fmodel.params[0].dtype
    outputs = [(parts[0] if len(parts) == 1 else torch.cat(parts))[::stride].to(dtype)
               for parts in zip(*(r.trace for r in records), strict=True)]
    directions = [
        {id(p): t for p, t in zip(fmodel.params, tangent, strict=True)} for tangent in tangents
    ]
    first = inputs[0].to(dtype) if inputs[0].is_floating_point() else inputs[0]
    return outputs[-1], sequential_jvp(fmodel.model, first, outputs, directions)


class QuadraticControl:
    """Chooses (a, m) on the quadratic model and adapts the damping (see module doc).

    ``comm``: averages the batch terms over data-parallel ranks (None: this batch only).
    """

    def __init__(self, settings: AutoSettings, comm: Communicator | None = None) -> None:
        self.settings = settings
        self.comm = comm

    @property
    def _distributed(self) -> bool:
        return self.comm is not None and self.comm.active

    def updates(
        self,
        fmodel: FunctionalModel,
        batch: StepBatch,
        grads: list[Tensor],
        descent: list[Tensor],
        previous: list[Tensor] | None,
        damping: float,
        weight_decay: float,
        fixed: tuple[float, float],
        scale: float = 1.0,
    ) -> tuple[list[Tensor], dict[str, Any]] | None:
        """The update δ = s·(a·d + m·δ₀) per parameter and the step's diagnostics.

        ``grads``, ``descent`` (d) and ``previous`` (δ₀, None on the first step) follow
        ``fmodel.params``; ``scale`` s multiplies the chosen coefficients (the group's lr
        when ``lr="auto"``, so that LR schedulers still act). Returns None if a non-finite
        quantity appears.
        """
        records = batch.records
        use_momentum = previous is not None and (self.settings.momentum or fixed[1] != 0.0)
        tangents = [descent] + ([previous] if use_momentum else [])
        stride = row_stride(self.settings.rows, records, fmodel.model)
        outputs, products = _jvps(fmodel, records, batch.inputs(), tangents, stride)
        # the quadratic model in at least float32 (bf16 parameters: products widened)
        dtype = torch.promote_types(torch.promote_types(outputs.dtype, fmodel.params[0].dtype),
                                    torch.float32)
        outputs, products = outputs.to(dtype), [p.to(dtype) for p in products]
        n = outputs.shape[0]
        valid = batch.valid_rows()
        if valid is not None:  # ignored positions: no Fisher term
            weights = valid[::stride].unsqueeze(-1).to(outputs.dtype)
            products = [product * weights for product in products]

        likelihood = batch.spec.likelihood
        gram = likelihood.fisher_gram(outputs, products) / n  # (J·tᵢ)ᵀ Λ (J·tⱼ) / N
        # parameter-space inner products, rows/columns (d, δ₀, ∇J)
        inner = _parameter_gram([descent, previous, grads] if use_momentum
                                else [descent, grads])
        k = gram.shape[0]  # the batch terms first, in one float64 vector
        packed = torch.cat([gram.reshape(-1), inner.reshape(-1)]).double()
        if self._distributed:  # the batch terms of the ranks' batches together
            local = torch.cat([packed[:k * k] * n, packed.new_tensor([n])])
            self.comm.all_reduce([local])
            packed[:k * k] = local[:-1] / local[-1]
        values = packed.tolist()  # one sync
        if not all(math.isfinite(v) for v in values):
            return None
        f, g = values[:k * k], values[k * k:]  # row-major k×k and (k+1)×(k+1)
        f00, n00, g0 = f[0], g[0], g[k]
        f01 = n01 = f11 = n11 = g1 = 0.0
        if use_momentum:
            f01, f11, n01, n11, g1 = f[1], f[3], g[1], g[4], g[5]
        # curvature = fisher + (λ + η)·norms, with the 2×2 Gram matrices in both metrics
        fisher = [[f00, f01], [f01, f11]]
        norms = [[n00, n01], [n01, n11]]
        linear = [g0, g1]
        shift = damping + weight_decay
        curvature = [[f + shift * v for f, v in zip(fr, nr, strict=True)]
                     for fr, nr in zip(fisher, norms, strict=True)]
        free = (self.settings.lr, self.settings.momentum and use_momentum)
        a, m, _ = solve_coefficients(
            curvature, linear, free, (fixed[0], fixed[1] if use_momentum else 0.0)
        )
        a, m = a * scale, m * scale
        if not (math.isfinite(a) and math.isfinite(m)):
            return None
        update = torch._foreach_mul(descent, a)
        if use_momentum and m != 0.0:
            torch._foreach_add_(update, previous, alpha=m)
        # ρ compares the loss with the *undamped* model (Martens 2010; kfac-jax does the same):
        # damping is the knob being adapted, not part of the objective
        undamped = [[f + weight_decay * v for f, v in zip(fr, nr, strict=True)]
                    for fr, nr in zip(fisher, norms, strict=True)]
        predicted = quadratic_value(undamped, linear, a, m)
        slope = linear[0] * a + linear[1] * m  # ∇Jᵀδ
        info = {"lr": a, "momentum": m, "predicted_change": predicted, "slope": slope}
        return update, info

    def reduction_ratio(
        self,
        fmodel: FunctionalModel,
        batch: StepBatch,
        predicted: float,
        penalty_change: float = 0.0,
    ) -> float:
        """ρ = (J(θ+δ) − J(θ)) / M₀(δ) on the step's batch, with θ+δ the current parameters
        and M₀ the undamped model; ``penalty_change`` is the L2 penalty's part of the change."""
        if predicted >= 0:
            return -math.inf  # the model predicts no decrease: treat as a failed step
        targets = batch.targets()  # canonical per-row losses, ignored positions left out
        before_all = batch.loss_rows(batch.outputs(), targets)
        after = batch.loss_rows(fmodel.frozen_forward(batch.inputs()), targets)
        if self._distributed:  # the mean change over the ranks' batches together
            sums = torch.stack([(after.sum() - before_all.sum()).double(),
                                after.new_tensor(after.numel(), dtype=torch.float64)])
            self.comm.all_reduce([sums])
            change = float(sums[0] / sums[1]) + penalty_change
        else:
            change = float(after.mean() - before_all.mean()) + penalty_change
        return change / predicted
