"""How close each Fisher approximation comes to the exact natural gradient (``natgrad fisher``).

On a model small enough for the dense Fisher F (true Fisher, exact expectation), every
approximation F̃ is built as a dense P×P matrix in ``model.parameters()`` order and compared:

* Fisher error: ‖F̃ − F‖_F / ‖F‖_F (block-diagonal approximations are zero off their blocks);
* direction: the damped natural gradient (F̃ + λI)⁻¹ g against the exact (F + λI)⁻¹ g, as the
  cosine of the two directions and the relative error ‖Δ̃ − Δ‖ / ‖Δ‖.

Approximations: the diagonal of F; K-FAC (G ⊗ A per layer, exact expectation); EKFAC (K-FAC's
eigenbasis with the exact diagonal of each block in it); conjugate gradient on the exact F
after k iterations (no Fisher error: it uses F itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from natgrad.curvature.dense import fisher_matrix
from natgrad.curvature.kfac import kfac_factors
from natgrad.curvature.products import conjugate_gradient
from natgrad.layers.capture import find_layers
from natgrad.likelihoods import get_likelihood

__all__ = ["ApproximationRow", "compare_approximations", "kronecker_blocks"]


@dataclass
class ApproximationRow:
    """One approximation's errors (``fisher_error`` is None where F̃ is not formed)."""

    method: str
    fisher_error: float | None
    cosine: float
    direction_error: float


def _param_offsets(model: nn.Module) -> dict[int, int]:
    offsets, start = {}, 0
    for p in model.parameters():
        if p.requires_grad:
            offsets[id(p)] = start
            start += p.numel()
    return offsets


def _block_indices(model: nn.Module, module: nn.Module) -> Tensor:
    """Positions in the flat parameter vector of the layer's gradient matrix X = [W | b]
    flattened row-major (Conv2d W as ``[C_out, C_in·kh·kw]``)."""
    offsets = _param_offsets(model)
    weight = module.weight
    rows = weight.shape[0]
    cols = weight[0].numel()
    w_idx = offsets[id(weight)] + torch.arange(rows * cols).reshape(rows, cols)
    if module.bias is not None and module.bias.requires_grad:
        b_idx = offsets[id(module.bias)] + torch.arange(rows).reshape(rows, 1)
        w_idx = torch.cat([w_idx, b_idx], dim=1)
    return w_idx.reshape(-1)


def kronecker_blocks(
    model: nn.Module, inputs: Tensor, likelihood: str, fisher: Tensor
) -> tuple[Tensor, Tensor]:
    """Dense K-FAC and EKFAC approximations of ``fisher`` (``[P, P]`` each), built from the
    exact-expectation Kronecker factors of every Linear/Conv2d layer."""
    factors = kfac_factors(model, inputs, likelihood=likelihood)
    modules = dict(model.named_modules())
    kfac = torch.zeros_like(fisher)
    ekfac = torch.zeros_like(fisher)
    for name, (input_factor, grad_factor) in factors.items():
        if input_factor.dim() == 1:
            input_factor = torch.diag(input_factor)
        idx = _block_indices(model, modules[name])
        kfac[idx.unsqueeze(1), idx] = torch.kron(grad_factor, input_factor)
        _, q_grad = torch.linalg.eigh(grad_factor)
        _, q_in = torch.linalg.eigh(input_factor)
        basis = torch.kron(q_grad, q_in)
        exact = fisher[idx.unsqueeze(1), idx]
        scaling = torch.diagonal(basis.T @ exact @ basis)  # EKFAC: exact diagonal in the basis
        ekfac[idx.unsqueeze(1), idx] = (basis * scaling) @ basis.T
    return kfac, ekfac


def compare_approximations(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    likelihood: str,
    damping: float = 1e-3,
    cg_iterations: tuple[int, ...] = (1, 5, 20),
) -> list[ApproximationRow]:
    """Compare the approximations on one batch (see module docstring). float64 advised.

    Args:
        model: a model with only Linear/Conv2d trainable layers (others are not blocked).
        inputs, targets: the batch.
        likelihood: the likelihood name; the gradient is that of its batch-mean NLL.
        damping: λ added to every approximation.
        cg_iterations: CG iteration counts to report.
    """
    unsupported = find_layers(model).fallback
    if unsupported:
        raise ValueError(f"natgrad fisher needs Linear/Conv2d layers only, got {unsupported}")
    params = [p for p in model.parameters() if p.requires_grad]
    nll = -get_likelihood(likelihood).log_prob(model(inputs), targets).mean()
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(nll, params)])
    fisher = fisher_matrix(model, inputs, likelihood=likelihood)
    eye = torch.eye(fisher.shape[0], dtype=fisher.dtype)
    exact = torch.linalg.solve(fisher + damping * eye, grad)
    norm_f = float(fisher.norm())

    def row(method: str, direction: Tensor, approx: Tensor | None) -> ApproximationRow:
        error = None if approx is None else float((approx - fisher).norm()) / norm_f
        cosine = float(direction @ exact / (direction.norm() * exact.norm()))
        return ApproximationRow(method, error, cosine, float((direction - exact).norm() /
                                                             exact.norm()))

    kfac, ekfac = kronecker_blocks(model, inputs, likelihood, fisher)
    diagonal = torch.diag(torch.diagonal(fisher))
    rows = [row("gradient (identity)", grad / damping, None)]
    for name, approx in (("diagonal", diagonal), ("K-FAC", kfac), ("EKFAC", ekfac)):
        rows.append(row(name, torch.linalg.solve(approx + damping * eye, grad), approx))
    for k in cg_iterations:
        solution, _, _ = conjugate_gradient(
            lambda v: fisher @ v + damping * v, grad, max_iters=k, tol=0.0
        )
        rows.append(row(f"CG, {k} iterations", solution, None))
    return rows
