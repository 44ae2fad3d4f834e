"""The exact dense Fisher for small models.

F = (1/N) Σₙ Jₙᵀ Sₙ Sₙᵀ Jₙ (see :mod:`natgrad.curvature.model`), computed from per-sample
Jacobians (``torch.func.vmap`` over ``jacrev``) in chunks of samples, so that only the
P×P result and one chunk of Jacobians are held at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from natgrad.curvature.model import (
    FisherKind,
    FisherTooLargeError,
    FunctionalModel,
    Inputs,
    as_tuple,
    available_memory,
    check_kind,
    output_factor,
)
from natgrad.likelihoods import Likelihood
from natgrad.losses import LossSpec, resolve_loss

__all__ = ["fisher_matrix", "fisher_rows"]

_STRUCTURED = (
    "use a structured alternative instead: natgrad.fisher_vector_product (matrix-free), "
    "natgrad.kfac_factors, or the optimizers natgrad.KFAC, natgrad.EKFAC and natgrad.NGDCG"
)


def _chunk_size(n: int, per_sample_bytes: int, budget: int) -> int:
    # a quarter of the budget for one chunk of Jacobians (jacrev needs some headroom)
    return max(1, min(n, budget // (4 * max(per_sample_bytes, 1))))


def _row_chunks(
    fmodel: FunctionalModel,
    outputs: Tensor,
    factor: Tensor,
    inputs: tuple[Tensor, ...],
    budget: int,
) -> Iterator[Tensor]:
    """Yield Sₙᵀ Jₙ for consecutive chunks of samples, each ``[n_c·R, P]`` (unscaled)."""
    n, k, _ = factor.shape
    chunk = _chunk_size(n, k * fmodel.num_params * outputs.element_size(), budget)
    for start in range(0, n, chunk):
        part = tuple(x[start : start + chunk] for x in inputs)
        jac = fmodel.per_sample_jacobian(part)  # [n_c, K, P]
        yield torch.einsum("nkr,nkp->nrp", factor[start : start + chunk], jac).flatten(0, 1)


def _outputs_and_factor(
    fmodel: FunctionalModel,
    spec: LossSpec,
    inputs: tuple[Tensor, ...],
    kind: FisherKind,
    targets: Tensor | None,
    mc_samples: int,
    generator: torch.Generator | None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        outputs = fmodel.outputs(fmodel.detached_params(), inputs)
    return outputs, output_factor(spec, outputs, kind, targets, mc_samples, generator, valid)


def fisher_rows(
    fmodel: FunctionalModel,
    spec: LossSpec,
    inputs: tuple[Tensor, ...],
    kind: FisherKind,
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    max_memory: int | None = None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Rows U, ``[N·R, P]``, with F = Uᵀ U, and the model's outputs ``[N, ...]``.

    Uₙ = Sₙᵀ Jₙ / √N stacked over samples (the canonical, batch-mean Fisher; positions that
    ``valid`` or ``targets`` mark as ignored have zero rows). Used by the Woodbury solve,
    where N·R < P.
    """
    outputs, factor = _outputs_and_factor(
        fmodel, spec, inputs, kind, targets, mc_samples, generator, valid
    )
    n, _, r = factor.shape
    need = n * r * fmodel.num_params * outputs.element_size()
    budget = available_memory(outputs.device) if max_memory is None else max_memory
    if need > budget:
        raise FisherTooLargeError(
            f"the {n * r}x{fmodel.num_params} Fisher rows need {need / 2**20:.1f} MiB, more "
            f"than the {budget / 2**20:.1f} MiB available; {_STRUCTURED}"
        )
    rows = torch.cat(list(_row_chunks(fmodel, outputs, factor, inputs, budget - need)))
    return rows / math.sqrt(n), outputs


def fisher_matrix(
    model: nn.Module,
    inputs: Inputs,
    *,
    likelihood: str | Likelihood | None = None,
    loss: nn.Module | None = None,
    kind: str = "true",
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
    max_memory: int | None = None,
) -> Tensor:
    """The dense Fisher information matrix of ``model`` on a batch, ``[P, P]``.

    F = (1/N) Σₙ E_{y~p(y|xₙ,θ)}[∇θ log p(y|xₙ,θ) ∇θ log p(y|xₙ,θ)ᵀ]

    for ``kind="true"`` (exact expectation), with the expectation replaced by the mean over
    ``mc_samples`` labels drawn from the model for ``kind="mc"``, and by the observed
    ``targets`` for ``kind="empirical"``. Rows and columns follow ``model.parameters()``
    order (those with ``requires_grad``), each parameter flattened row-major.

    With ``loss=`` (a torch loss module, see :class:`natgrad.losses.LossSpec`) the result is
    the Fisher *of that loss as it is normalised*: c·F with the loss = c·J, J the batch-mean
    negative log-likelihood (c = 2/K for ``nn.MSELoss()`` over K outputs per example, N/n
    for a token mean over n valid tokens, ...), which for these exponential families is
    the Gauss–Newton matrix of the loss; positions whose ``targets`` equal the loss's
    ``ignore_index`` contribute nothing. ``targets`` then may be shaped as the loss takes
    them (``y.view(-1)`` for ``[B, T, V]`` logits).

    Args:
        model: any ``nn.Module`` whose samples do not interact (e.g. BatchNorm in eval mode).
        inputs: a Tensor ``[N, ...]`` or a tuple of Tensors batched along dimension 0.
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or a Likelihood.
        loss: instead of ``likelihood``: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or
            ``nn.BCEWithLogitsLoss`` (reduction ``"mean"`` or ``"sum"``).
        kind: ``"true"``, ``"mc"`` or ``"empirical"``.
        targets: observed labels, required for ``kind="empirical"``; with ``loss=`` they
            also mark ignored positions for every kind.
        mc_samples: labels drawn per input for ``kind="mc"``.
        generator: random source for ``kind="mc"``.
        output_fn: maps the module's output to the likelihood's parameters (dict/tuple outputs).
        max_memory: bytes the computation may use (default: the memory available now).

    Returns:
        F, ``[P, P]``, symmetric positive semi-definite, in the parameters' dtype.

    Raises:
        ValueError: unknown ``likelihood`` or ``kind``, missing ``targets``, bad ``mc_samples``,
            both or neither of ``likelihood`` and ``loss``, a loss module natgrad can't
            represent (class weights, ``pos_weight``, ``reduction="none"``).
        TypeError: inputs or targets of the wrong type or dtype.
        FisherTooLargeError: (a ``MemoryError``) if P×P would not fit; the message names the
            structured alternatives.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> F = natgrad.fisher_matrix(model, torch.randn(5, 3), likelihood="categorical")
        >>> F.shape
        torch.Size([8, 8])

    References:
        Amari, Natural gradient works efficiently in learning, 1998.
        Martens, New insights and perspectives on the natural gradient method, 2020.
    """
    spec = resolve_loss(likelihood, loss, required=True)
    kind = check_kind(kind, targets, mc_samples)
    inputs = as_tuple(inputs)
    fmodel = FunctionalModel(model, output_fn)
    p = fmodel.num_params
    ref = fmodel.params[0]
    budget = available_memory(ref.device) if max_memory is None else max_memory
    need = p * p * ref.element_size()
    if need > budget:
        raise FisherTooLargeError(
            f"the dense {p}x{p} Fisher needs {need / 2**20:.1f} MiB, more than the "
            f"{budget / 2**20:.1f} MiB available; {_STRUCTURED}"
        )
    outputs, factor = _outputs_and_factor(
        fmodel, spec, inputs, kind, targets, mc_samples, generator
    )
    fisher = torch.zeros(p, p, dtype=outputs.dtype, device=outputs.device)
    for rows in _row_chunks(fmodel, outputs, factor, inputs, budget - need):
        fisher.addmm_(rows.T, rows)
    valid = spec.valid_from_targets(outputs, targets)
    return fisher * (spec.fisher_scale(outputs, valid) / factor.shape[0])
