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
from natgrad.likelihoods import Likelihood, get_likelihood

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
    likelihood: Likelihood,
    inputs: tuple[Tensor, ...],
    kind: FisherKind,
    targets: Tensor | None,
    mc_samples: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        outputs = fmodel.outputs(fmodel.detached_params(), inputs)
    return outputs, output_factor(likelihood, outputs, kind, targets, mc_samples, generator)


def fisher_rows(
    fmodel: FunctionalModel,
    likelihood: Likelihood,
    inputs: tuple[Tensor, ...],
    kind: FisherKind,
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    max_memory: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Rows U, ``[N·R, P]``, with F = Uᵀ U, and the model's outputs ``[N, ...]``.

    Uₙ = Sₙᵀ Jₙ / √N stacked over samples. Used by the Woodbury solve, where N·R < P.
    """
    outputs, factor = _outputs_and_factor(
        fmodel, likelihood, inputs, kind, targets, mc_samples, generator
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
    likelihood: str | Likelihood,
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

    Args:
        model: any ``nn.Module`` whose samples do not interact (e.g. BatchNorm in eval mode).
        inputs: a Tensor ``[N, ...]`` or a tuple of Tensors batched along dimension 0.
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or a Likelihood.
        kind: ``"true"``, ``"mc"`` or ``"empirical"``.
        targets: observed labels, required for ``kind="empirical"``.
        mc_samples: labels drawn per input for ``kind="mc"``.
        generator: random source for ``kind="mc"``.
        output_fn: maps the module's output to the likelihood's parameters (dict/tuple outputs).
        max_memory: bytes the computation may use (default: the memory available now).

    Returns:
        F, ``[P, P]``, symmetric positive semi-definite, in the parameters' dtype.

    Raises:
        ValueError: unknown ``likelihood`` or ``kind``, missing ``targets``, bad ``mc_samples``.
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
    likelihood = get_likelihood(likelihood)
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
        fmodel, likelihood, inputs, kind, targets, mc_samples, generator
    )
    fisher = torch.zeros(p, p, dtype=outputs.dtype, device=outputs.device)
    for rows in _row_chunks(fmodel, outputs, factor, inputs, budget - need):
        fisher.addmm_(rows.T, rows)
    return fisher / factor.shape[0]
