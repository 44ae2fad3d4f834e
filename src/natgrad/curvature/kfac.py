"""Kronecker factors, their damped inverses, and the functional ``kfac_factors``.

For a layer with gradient matrix X (``[d_out, d_in]``), K-FAC approximates the layer's Fisher
block by G ⊗ A with A = (1/(N·T)) Σ āāᵀ and G = (1/N) Σ δδᵀ (see
:mod:`natgrad.layers.base`), and preconditions with factored Tikhonov damping:

    X ↦ (G + √λ/π · I)⁻¹ X (A + π√λ · I)⁻¹,   π = √((tr A / d_in) / (tr G / d_out)).

π balances the two factors' scales so that the damping added to the Kronecker product,
G ⊗ A + √λ(π A' + G'/π) + λ I, is insensitive to how the product's scale is split between
A and G (Martens & Grosse 2015, §6.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad._calls import model_output
from natgrad._checks import check_choice
from natgrad.curvature.model import Inputs, as_tuple, check_kind, output_factor
from natgrad.layers.base import KroneckerHandler, LayerHandler
from natgrad.layers.capture import Call, LayerCapture, find_layers
from natgrad.likelihoods import Likelihood
from natgrad.losses import resolve_loss

__all__ = [
    "KFAC_APPROX",
    "DenseBlock",
    "FactorSums",
    "KroneckerBlock",
    "ema",
    "damped_inverse",
    "kfac_factors",
    "pi_damping",
    "record_sums",
]


KFAC_APPROX = ("expand", "reduce")  # K-FAC for layers shared over positions

def _outer_sum(rows: Tensor) -> Tensor:
    """Σₘ rₘrₘᵀ over rows ``[M, d]`` → ``[d, d]``; grouped rows ``[M, g, d]`` → ``[g, d, d]``."""
    if rows.dim() == 2:
        return rows.T @ rows
    grouped = rows.transpose(0, 1)
    return grouped.mT @ grouped


class FactorSums:
    """Running sums of one layer's statistics over samples (and draws, and micro-batches).

    ``input_sum`` = Σ āāᵀ (``[d_in, d_in]``, or ``[d_in]`` for a diagonal input factor) over
    ``rows`` rows; ``grad_sum`` = Σ w δδᵀ over ``samples`` samples (w weights the draws);
    for dense blocks ``grad_sum`` = Σ w ggᵀ of per-sample parameter gradients.
    """

    def __init__(self) -> None:
        self.input_sum: Tensor | None = None
        self.grad_sum: Tensor | None = None
        self.rows = 0
        self.samples = 0

    @staticmethod
    def _add(total: Tensor | None, value: Tensor) -> Tensor:
        return value if total is None else total + value

    def add_inputs(
        self, handler: KroneckerHandler, inputs: Tensor, dtype: torch.dtype,
        valid: Tensor | None = None, reduce: bool = False, own: Tensor | None = None,
    ) -> None:
        """Add Σ āāᵀ over the input's rows; with ``valid`` (``[N, ...]`` bool, the positions
        the loss counts) only over valid rows, where the rows are those positions; with
        ``own`` (the call's own mask of its rows' positions, ``[N, ...]``: a recurrent layer's
        steps beyond a packed sequence's end) only over those, whatever the loss counts. With
        ``reduce`` each sample contributes one row, the mean of its (valid) positions' rows
        (K-FAC-reduce; a diagonal input factor always expands)."""
        keep = None
        if own is not None:
            keep = own.reshape(-1)
        elif valid is not None and handler.positions(inputs) == tuple(valid.shape):
            keep = valid.reshape(-1)
        if handler.diagonal_input:
            indices = inputs.reshape(-1) if keep is None else inputs.reshape(-1)[keep]
            self.input_sum = self._add(self.input_sum, handler.input_counts(indices, dtype))
            self.rows += indices.shape[0]
            return
        fast = None if reduce or keep is not None else handler.input_sum(inputs, dtype)
        if fast is not None:  # e.g. a convolution's patches, never formed with a bias column
            self.input_sum = self._add(self.input_sum, fast[0])
            self.rows += fast[1]
            return
        rows = handler.input_rows(inputs).to(dtype)
        if reduce:  # ā_n = mean over the sample's positions
            per_sample = rows.reshape(inputs.shape[0], -1, *rows.shape[1:])
            if keep is None:
                rows = per_sample.mean(1)
            else:
                weights = keep.reshape(per_sample.shape[:2]).to(dtype)
                counts = weights.sum(1)
                rows = (per_sample * weights.unsqueeze(-1)).sum(1)[counts > 0]
                rows = rows / counts[counts > 0].unsqueeze(-1)
        elif keep is not None:
            rows = rows[keep]
        self.input_sum = self._add(self.input_sum, _outer_sum(rows))
        self.rows += rows.shape[0]

    def add_grads(self, rows: Tensor, weight: float, samples: int | None = None) -> None:
        """Add Σ w rᵀr for a ``[M, d]`` block of δ rows (or per-sample gradients); with
        ``samples`` the rows of each sample are summed first (K-FAC-reduce)."""
        if samples is not None:
            rows = rows.reshape(samples, -1, *rows.shape[1:]).sum(1)
        self.grad_sum = self._add(self.grad_sum, _outer_sum(rows) * weight)

    def input_factor(self) -> Tensor:
        return self.input_sum / self.rows

    def grad_factor(self) -> Tensor:
        return self.grad_sum / self.samples


def record_sums(
    handler: LayerHandler,
    calls: list[Call],
    batch_size: int,
    sums: FactorSums,
    weights: list[float],
    dtype: torch.dtype,
    valid: Tensor | None = None,
    approx: str = "expand",
) -> None:
    """Add one forward's statistics of one layer to ``sums``.

    ``calls[i].grads[j]`` is δ of draw j at call i (shaped like the layer output), weighted
    by ``weights[j]``; ``valid`` marks the positions the loss counts (see
    :meth:`FactorSums.add_inputs`). ``approx`` is how a layer shared over positions
    (sequence steps, spatial locations) is factored (Eschenhagen et al. 2023):

    * ``"expand"``: positions count as samples, A = (1/(N·T)) Σₙₜ āāᵀ, G = (1/N) Σₙₜ δδᵀ;
    * ``"reduce"``: positions are summed first, A = (1/N) Σₙ āₙāₙᵀ with āₙ the mean of
      sample n's rows, G = (1/N) Σₙ δₙδₙᵀ with δₙ the sum of its rows.

    Both are exact without weight sharing (T = 1).
    """
    sums.samples += batch_size
    reduce = approx == "reduce"
    for call in calls:
        if isinstance(handler, KroneckerHandler):
            reduce_here = reduce and not handler.diagonal_input
            sums.add_inputs(handler, call.inputs, dtype, valid, reduce_here, call.valid)
            samples = call.inputs.shape[0] if reduce_here else None
            for grad, weight in zip(call.grads, weights, strict=True):
                sums.add_grads(handler.grad_rows(grad).to(dtype), weight, samples)
        else:
            for grad, weight in zip(call.grads, weights, strict=True):
                sums.add_grads(handler.per_sample_grads(call.inputs, grad).to(dtype), weight)


def pi_damping(
    input_factor: Tensor, grad_factor: Tensor, damping: float
) -> tuple[float, float]:
    """Factored Tikhonov damping (π√λ for A, √λ/π for G) with the trace-norm rule for π."""
    # (grouped blocks: one π for all groups, from the mean over groups)
    diag_in = input_factor if input_factor.dim() == 1 else input_factor.diagonal(0, -2, -1)
    mean_in = float(diag_in.mean())
    mean_grad = float(grad_factor.diagonal(0, -2, -1).mean())
    pi = math.sqrt(mean_in / mean_grad) if mean_in > 0 and mean_grad > 0 else 1.0
    if not math.isfinite(pi) or pi == 0:
        pi = 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


def damped_inverse(
    matrix: Tensor, damping: float, method: str = "cholesky", dtype: torch.dtype | None = None
) -> Tensor:
    """(M + damping·I)⁻¹ for a symmetric PSD ``matrix`` (``[d, d]``, or ``[d]`` diagonal).

    Cholesky by default; if it fails (round-off makes M + λI indefinite in low precision),
    retry in float64, then with 10× and 100× the damping, then by eigendecomposition with
    eigenvalues clamped at the damping. ``method="eigh"`` goes straight to the last.
    Returns the inverse in ``dtype`` (default: the matrix's).
    """
    dtype = matrix.dtype if dtype is None else dtype
    if matrix.dim() == 1:
        return (1.0 / (matrix.clamp_min(0) + damping)).to(dtype)
    if method == "cholesky":
        for double, scale in ((False, 1.0), (True, 1.0), (True, 10.0), (True, 100.0)):
            mat = matrix.double() if double else matrix  # the retries only when needed
            shifted = mat.clone()  # (a batch of groups: every one must succeed)
            shifted.diagonal(0, -2, -1).add_(damping * scale)
            chol, info = torch.linalg.cholesky_ex(shifted)
            if bool((info == 0).all()):
                inverse = torch.cholesky_inverse(chol)
                if bool(torch.isfinite(inverse.sum())):  # a NaN or inf entry spoils the sum
                    return inverse.to(dtype)
    eigvals, eigvecs = torch.linalg.eigh(matrix.double())
    inv = 1.0 / (eigvals.clamp_min(0) + damping)
    return ((eigvecs * inv.unsqueeze(-2)) @ eigvecs.mT).to(dtype)


def kfac_factors(
    model: nn.Module,
    inputs: Inputs,
    *,
    likelihood: str | Likelihood | None = None,
    loss: nn.Module | None = None,
    kind: str = "true",
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    output_fn: Callable[[Any], Tensor] | None = None,
    kfac_approx: str = "expand",
) -> dict[str, tuple[Tensor, Tensor]]:
    """K-FAC's Kronecker factors (A, G) of every supported layer on one batch.

    A = (1/(N·T)) Σ āāᵀ over samples and positions, with ā = [a; 1] when the layer has a
    bias (``[d_in+1, d_in+1]``); for ``nn.Embedding`` A is diagonal and returned as a vector
    of token frequencies (``[V]``). G = (1/N) Σₙ E_y[Σₜ δδᵀ] (``[d_out, d_out]``), where δ is
    the gradient of one sample's log-likelihood with respect to the layer's output: the
    expectation is exact for ``kind="true"`` (one backward per column of the output Fisher's
    factor), a mean over ``mc_samples`` drawn labels for ``"mc"``, the observed ``targets``
    for ``"empirical"``. The layer's Fisher block ≈ G ⊗ A on [W | b] flattened row-major
    (Conv2d: W reshaped to ``[C_out, C_in·kh·kw]``; Embedding: on Wᵀ). Normalisation layers
    have dense blocks, not Kronecker factors, and are not in the result. Each layer that
    uses a tied weight has its own (A, G) (:mod:`natgrad.curvature.shared` combines them).

    With ``loss=``, G is on the loss's scale (c·G, see :func:`natgrad.fisher_matrix`) and
    positions that ``targets`` mark as ignored contribute to neither factor (A drops their
    rows where a layer's input rows are the output's positions, e.g. a Linear layer on
    ``[B, T, d]`` inputs of a model with ``[B, T, V]`` outputs).

    Args:
        model, inputs, likelihood, loss, kind, targets, mc_samples, generator, output_fn: as
            in :func:`natgrad.fisher_matrix`.
        kfac_approx: ``"expand"`` or ``"reduce"``, how layers shared over positions are
            factored (see :func:`record_sums`); Embedding layers always expand.

    Returns:
        ``{module name: (A, G)}`` in ``model.named_modules()`` order.

    Example:
        >>> factors = natgrad.kfac_factors(model, x, likelihood="categorical")
        >>> A, G = factors["0"]

    References:
        Martens & Grosse, Optimizing neural networks with Kronecker-factored approximate
        curvature, 2015. Grosse & Martens, A Kronecker-factored approximate Fisher matrix for
        convolution layers, 2016.
    """
    spec = resolve_loss(likelihood, loss, required=True)
    kind = check_kind(kind, targets, mc_samples)
    kfac_approx = check_choice("kfac_approx", kfac_approx, KFAC_APPROX)
    layers = find_layers(model)
    handlers = {name: h for name, h in layers.handlers.items() if isinstance(h, KroneckerHandler)}
    for uses in layers.shared.values():  # each use of a tied weight: its own factors
        handlers.update(uses)
    order = {id(m): i for i, m in enumerate(model.modules())}  # the model's module order
    handlers = dict(sorted(handlers.items(), key=lambda item: order[id(item[1].module)]))
    with LayerCapture(model, handlers) as capture:
        output = model(*as_tuple(inputs))
        record = capture.records[-1] if capture.records else None
    output = model_output(output, output_fn)
    if record is None:
        return {}
    factor = output_factor(spec, output, kind, targets, mc_samples, generator)
    valid = spec.valid_from_targets(output, targets)
    scale = spec.fisher_scale(output, valid)
    calls = [call for name in handlers for call in record.calls.get(name, [])]
    for column in factor.unbind(-1):  # δ for each column of S: Σ_col δδᵀ = E_y[δδᵀ]
        grads = torch.autograd.grad(
            output, [c.output for c in calls], column.reshape(output.shape),
            retain_graph=True, allow_unused=True,
        )
        for call, grad in zip(calls, grads, strict=True):
            call.grads.append(torch.zeros_like(call.output) if grad is None else grad)
    result = {}
    for name, handler in handlers.items():
        if name not in record.calls:
            continue
        sums = FactorSums()
        record_sums(
            handler, record.calls[name], record.batch_size, sums,
            [scale] * factor.shape[-1], output.dtype, valid, kfac_approx,
        )
        result[name] = (sums.input_factor(), sums.grad_factor())
    return result



def ema(old: Tensor | None, value: Tensor, decay: float) -> Tensor:
    """decay·old + (1 − decay)·value, a new tensor (``value`` itself when there is no
    ``old``): the old average stays intact until the optimizer keeps the new one."""
    return value if old is None else torch.lerp(old, value, 1 - decay)


class KroneckerBlock:
    """The K-FAC block of one layer; its tensors live in ``state`` (the optimizer's state).

    State keys: ``input_cov`` (A), ``grad_cov`` (G), ``input_inv``, ``grad_inv`` (the damped
    inverses of the last refresh).
    """

    def __init__(self, handler: KroneckerHandler, state: dict[str, Any]) -> None:
        self.handler = handler
        self.state = state

    def update(self, sums: FactorSums, decay: float) -> None:
        """Fold one step's statistics into the exponential moving averages."""
        self.state["input_cov"] = ema(self.state.get("input_cov"), sums.input_factor(), decay)
        self.state["grad_cov"] = ema(self.state.get("grad_cov"), sums.grad_factor(), decay)

    @property
    def ready(self) -> bool:
        return "input_cov" in self.state

    def refresh(self, damping: float, method: str, dtype: torch.dtype) -> None:
        """Recompute the π-damped inverses of the factors."""
        A, G = self.state["input_cov"], self.state["grad_cov"]
        damping_in, damping_grad = pi_damping(A, G, damping)
        self.state["input_inv"] = damped_inverse(A, damping_in, method, dtype)
        self.state["grad_inv"] = damped_inverse(G, damping_grad, method, dtype)

    @property
    def refreshed(self) -> bool:
        return "grad_inv" in self.state

    def precondition(self, matrix: Tensor, damping: float) -> Tensor:
        """X ↦ (G + √λ/π I)⁻¹ X (A + π√λ I)⁻¹ for the gradient matrix X, ``[d_out, d_in]``.

        The damping λ is the one of the last :meth:`refresh` (the inverses hold it).
        """
        grad_inv, input_inv = self.state["grad_inv"], self.state["input_inv"]
        out = grad_inv @ matrix.to(grad_inv.dtype)
        out = out * input_inv if input_inv.dim() == 1 else out @ input_inv
        return out.to(matrix.dtype)

    def quadratic(self, matrix: Tensor) -> Tensor:
        """vᵀ (G ⊗ A) v = tr(Vᵀ G V A) for V = ``matrix`` (undamped factors)."""
        A, G = self.state["input_cov"], self.state["grad_cov"]
        v = matrix.to(G.dtype)
        va = v * A if A.dim() == 1 else v @ A
        return ((G @ v) * va).sum()


class DenseBlock:
    """An exact dense block F = (1/N) Σ ggᵀ for layers with few parameters (normalisation).

    State keys: ``fisher_block`` and ``block_inv`` = (F + λI)⁻¹.
    """

    def __init__(self, handler: LayerHandler, state: dict[str, Any]) -> None:
        self.handler = handler
        self.state = state

    def update(self, sums: FactorSums, decay: float) -> None:
        self.state["fisher_block"] = ema(self.state.get("fisher_block"), sums.grad_factor(), decay)

    @property
    def ready(self) -> bool:
        return "fisher_block" in self.state

    def refresh(self, damping: float, method: str, dtype: torch.dtype) -> None:
        self.state["block_inv"] = damped_inverse(self.state["fisher_block"], damping, method, dtype)

    @property
    def refreshed(self) -> bool:
        return "block_inv" in self.state

    def precondition(self, vector: Tensor, damping: float) -> Tensor:
        inverse = self.state["block_inv"]
        return (inverse @ vector.to(inverse.dtype)).to(vector.dtype)

    def quadratic(self, vector: Tensor) -> Tensor:
        block = self.state["fisher_block"]
        v = vector.to(block.dtype)
        return v @ (block @ v)
