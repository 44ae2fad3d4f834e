"""Matrix-free Fisher-vector products: F v = (1/N) Σₙ Jₙᵀ Λ̃ₙ Jₙ v without forming F or J.

J v is one forward-mode pass (``torch.func.jvp``), Λ̃ (Jv) is applied in output space by the
likelihood, and Jᵀ(·) is one reverse-mode pass (``torch.func.vjp``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from natgrad.curvature.model import (
    FisherKind,
    FunctionalModel,
    Inputs,
    as_tuple,
    check_kind,
    flatten,
    output_factor,
)
from natgrad.likelihoods import Likelihood, get_likelihood

__all__ = ["fisher_vector_product", "output_operator"]


def output_operator(
    likelihood: Likelihood,
    outputs: Tensor,
    kind: FisherKind,
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Callable[[Tensor], Tensor]:
    """u ↦ Λ̃ u per sample (u shaped like ``outputs``) for the chosen Fisher kind."""
    outputs = outputs.detach()
    if kind is FisherKind.TRUE:
        return lambda u: likelihood.fisher_matvec(outputs, u)
    factor = output_factor(likelihood, outputs, kind, targets, mc_samples, generator)

    def apply(u: Tensor) -> Tensor:
        flat = u.reshape(u.shape[0], -1, 1)
        # S (Sᵀ u), never forming S Sᵀ
        return (factor @ (factor.transpose(1, 2) @ flat)).reshape(u.shape)

    return apply


def fisher_vector_product(
    model: nn.Module,
    inputs: Inputs,
    v: Tensor,
    *,
    likelihood: str | Likelihood,
    kind: str = "true",
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> Tensor:
    """F v for the Fisher of :func:`natgrad.fisher_matrix`, matrix-free.

    F v = (1/N) Σₙ Jₙᵀ Λ̃ₙ (Jₙ v), with Λ̃ the output-space Fisher of ``kind`` (see
    :func:`natgrad.fisher_matrix`); same conventions and parameter order.

    Args:
        model: any ``nn.Module`` whose samples do not interact.
        inputs: a Tensor ``[N, ...]`` or a tuple of Tensors batched along dimension 0.
        v: a flat vector ``[P]`` in ``model.parameters()`` order.
        likelihood, kind, targets, mc_samples, generator, output_fn: as in
            :func:`natgrad.fisher_matrix`.

    Returns:
        F v, ``[P]``.

    Raises:
        ValueError: bad ``likelihood``/``kind``/``mc_samples``, missing targets, or ``v`` of
            the wrong shape. TypeError: ``v`` of the wrong dtype.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> v = torch.randn(8)
        >>> natgrad.fisher_vector_product(model, torch.randn(5, 3), v, likelihood="gaussian")

    References:
        Pearlmutter, Fast exact multiplication by the Hessian, 1994.
        Schraudolph, Fast curvature matrix-vector products for second-order gradient
        descent, 2002.
    """
    likelihood = get_likelihood(likelihood)
    kind = check_kind(kind, targets, mc_samples)
    inputs = as_tuple(inputs)
    fmodel = FunctionalModel(model, output_fn)
    if not isinstance(v, Tensor):
        raise TypeError(f"v must be a Tensor, got {type(v).__name__}")
    if v.shape != (fmodel.num_params,):
        raise ValueError(f"v must have shape ({fmodel.num_params},), got {tuple(v.shape)}")
    if v.dtype != fmodel.params[0].dtype:
        raise TypeError(
            f"v must have the parameters' dtype {fmodel.params[0].dtype}, got {v.dtype}"
        )
    params = fmodel.detached_params()

    def f(*ps: Tensor) -> Tensor:
        return fmodel.outputs(ps, inputs)

    outputs, jv = torch.func.jvp(f, params, tuple(fmodel.unflatten(v)))  # v -> J v
    apply = output_operator(likelihood, outputs, kind, targets, mc_samples, generator)
    _, vjp_fn = torch.func.vjp(f, *params)
    return flatten(vjp_fn(apply(jv) / outputs.shape[0]))  # -> Jᵀ Λ̃ J v / N
