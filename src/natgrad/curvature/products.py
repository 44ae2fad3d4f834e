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
    position_weights,
    product_kernels,
    swapped_tensors,
)
from natgrad.likelihoods import Likelihood
from natgrad.losses import LossSpec, resolve_loss

__all__ = [
    "conjugate_gradient",
    "fisher_operator",
    "fisher_vector_product",
    "output_operator",
]


def output_operator(
    spec: LossSpec,
    outputs: Tensor,
    kind: FisherKind,
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    valid: Tensor | None = None,
) -> Callable[[Tensor], Tensor]:
    """u ↦ Λ̃ u per sample (u shaped like ``outputs``) for the chosen Fisher kind; zero at
    positions that ``valid`` or ``targets`` mark as ignored."""
    outputs = outputs.detach()
    if kind is FisherKind.TRUE:
        weights = position_weights(spec, outputs, targets, valid)
        if weights is None:
            return lambda u: spec.likelihood.fisher_matvec(outputs, u)
        return lambda u: spec.likelihood.fisher_matvec(outputs, u * weights) * weights
    factor = output_factor(spec, outputs, kind, targets, mc_samples, generator, valid)

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
    likelihood: str | Likelihood | None = None,
    loss: nn.Module | None = None,
    kind: str = "true",
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    output_fn: Callable[[object], Tensor] | None = None,
) -> Tensor:
    """F v for the Fisher of :func:`natgrad.fisher_matrix`, matrix-free.

    F v = (1/N) Σₙ Jₙᵀ Λ̃ₙ (Jₙ v), with Λ̃ the output-space Fisher of ``kind`` (see
    :func:`natgrad.fisher_matrix`); same conventions and parameter order, and with
    ``loss=`` the same scale (the Fisher of that loss as it is normalised).

    Args:
        model: any ``nn.Module`` whose samples do not interact.
        inputs: a Tensor ``[N, ...]`` or a tuple of Tensors batched along dimension 0.
        v: a flat vector ``[P]`` in ``model.parameters()`` order.
        likelihood, loss, kind, targets, mc_samples, generator, output_fn: as in
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
    spec = resolve_loss(likelihood, loss, required=True)
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
    operator = fisher_operator(
        fmodel, inputs, spec, kind, targets, mc_samples, generator, loss_scale=True
    )
    return operator(v)


def fisher_operator(
    fmodel: FunctionalModel,
    inputs: tuple[Tensor, ...],
    spec: LossSpec,
    kind: FisherKind = FisherKind.TRUE,
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    frozen_buffers: bool = False,
    loss_scale: bool = False,
    valid: Tensor | None = None,
) -> Callable[[Tensor], Tensor]:
    """v ↦ F v on one batch, for repeated products (CG): the reverse pass is built once.

    ``v`` is flat, ``[P]`` over ``fmodel.params``. Each product costs one forward-mode pass.
    The product is the canonical (batch-mean) Fisher's, or with ``loss_scale`` that of the
    loss as ``spec`` normalises it (c times the canonical one, see :func:`fisher_matrix`).
    """
    leaves = {id(p): v.detach().requires_grad_()  # at fmodel's values (whole under FSDP2)
              for p, v in zip(fmodel.params, fmodel.values, strict=True)}
    params = [leaves[id(p)] for p in fmodel.params]
    # the reverse graph, built once: plain autograd, so that any operation with a backward
    # formula works (custom autograd.Functions included); attention on the math kernel
    with torch.enable_grad(), product_kernels():
        with swapped_tensors(fmodel.model, leaves, frozen_buffers=frozen_buffers):
            outputs = fmodel.call(inputs)
    apply = output_operator(spec, outputs, kind, targets, mc_samples, generator, valid)
    n = outputs.shape[0]
    if loss_scale:
        n = n / spec.fisher_scale(outputs, spec.valid_from_targets(outputs, targets))

    def transposed(u: Tensor) -> Tensor:  # u -> Jᵀ u
        grads = torch.autograd.grad(outputs, params, u, retain_graph=True, allow_unused=True)
        return flatten([torch.zeros_like(p) if g is None else g
                        for p, g in zip(params, grads, strict=True)])

    def product(v: Tensor) -> Tensor:
        _, (jv,) = fmodel.jvp(inputs, [fmodel.unflatten(v)])  # v -> J v
        return transposed(apply(jv) / n)  # -> Jᵀ Λ̃ J v / N (· c)

    return product


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    initial: Tensor | None = None,
    max_iters: int = 50,
    tol: float = 1e-6,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, int, float]:
    """Solve A x = b for symmetric positive-definite A by (preconditioned) conjugate gradient.

    Args:
        matvec: x ↦ A x on flat vectors ``[P]``.
        rhs: b, ``[P]``.
        initial: warm start x₀ (default 0).
        max_iters: iteration cap (truncated CG).
        tol: stop when ‖b − A x‖ ≤ tol · ‖b‖.
        preconditioner: r ↦ M⁻¹ r for an SPD approximation M of A.

    Returns:
        (x, iterations, relative residual).

    References:
        Hestenes & Stiefel, Methods of conjugate gradients for solving linear systems, 1952.
        Martens, Deep learning via Hessian-free optimization, 2010.
    """
    x = torch.zeros_like(rhs) if initial is None else initial.clone()
    residual = rhs - matvec(x) if initial is not None else rhs.clone()
    norm_b = float(rhs.norm())
    if norm_b == 0.0:
        return torch.zeros_like(rhs), 0, 0.0
    z = residual if preconditioner is None else preconditioner(residual)
    direction = z.clone()
    rz = torch.dot(residual, z)
    iters = 0
    for iters in range(1, max_iters + 1):  # noqa: B007 - iters is reported
        if float(residual.norm()) <= tol * norm_b:
            iters -= 1
            break
        a_dir = matvec(direction)
        curvature = torch.dot(direction, a_dir)
        if not float(curvature) > 0:  # lost positive definiteness (round-off): stop here
            break
        step = rz / curvature
        x.add_(direction, alpha=float(step))
        residual.sub_(a_dir, alpha=float(step))
        z = residual if preconditioner is None else preconditioner(residual)
        rz_new = torch.dot(residual, z)
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    return x, iters, float(residual.norm()) / norm_b
