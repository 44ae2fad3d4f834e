"""The claims natgrad is built on, checked numerically in float64.

(a) The Fisher is the local metric of the KL divergence between predictive distributions:
    KL(p_θ ‖ p_{θ+εd}) = ½ ε² dᵀ F d + O(ε³), with KL averaged over the batch like F.
(b) The natural-gradient step F⁻¹∇ is invariant under a linear reparametrisation θ = A x;
    the plain gradient step is not.
(c) The Fisher is positive semi-definite for every likelihood.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from conftest import (
    ARCHS,
    DTYPE,
    KL_EPSILONS,
    KL_RTOL_SMALLEST,
    LIKELIHOODS,
    RANGE_RTOL,
    RTOL_EXACT,
    RTOL_INVARIANT,
    assert_psd,
    distribution,
    make_problem,
    make_targets,
    rel_err,
)


def outputs_at(model: nn.Module, inputs: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The model's outputs with its flat parameter vector replaced by ``theta``."""
    names = [name for name, _ in model.named_parameters()]
    chunks = theta.split([p.numel() for p in model.parameters()])
    params = {n: c.view_as(p) for n, c, p in zip(names, chunks, model.parameters(), strict=True)}
    return torch.func.functional_call(model, params, (inputs,))


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --- (a) KL ≈ ½ ε² dᵀ F d -------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fisher_is_the_local_metric_of_kl(arch, likelihood):
    model, inputs, _ = make_problem(arch, likelihood)
    lik = natgrad.get_likelihood(likelihood)
    fisher = natgrad.fisher_matrix(model, inputs, likelihood=likelihood)
    theta = flat_params(model)
    direction = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    direction /= direction.norm()
    with torch.no_grad():
        base = outputs_at(model, inputs, theta)
        gaps = []
        for eps in KL_EPSILONS:
            kl = lik.kl(base, outputs_at(model, inputs, theta + eps * direction)).mean()
            quadratic = 0.5 * eps**2 * (direction @ fisher @ direction)
            gaps.append(abs(kl / quadratic - 1).item())
    assert gaps[-1] < KL_RTOL_SMALLEST, gaps
    # the gap is O(ε): it shrinks by about 10× per decade of ε (between 5× and 30×)
    for larger, smaller in zip(gaps[:-1], gaps[1:], strict=True):
        assert 5 * smaller <= larger <= 30 * smaller, gaps


# --- (b) invariance of the natural-gradient step --------------------------------------------
class Reparametrised(nn.Module):
    """The same function as ``base`` with one flat parameter x and θ = A x."""

    def __init__(self, base: nn.Module, matrix: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule: x is the only parameter
        self.register_buffer("matrix", matrix)
        self.x = nn.Parameter(torch.linalg.solve(matrix, flat_params(base)))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return outputs_at(self.base, inputs, self.matrix @ self.x)


def random_invertible(size: int, seed: int = 9) -> torch.Tensor:
    """Q₁ diag(s) Q₂ with singular values s between 0.5 and 2 (well conditioned)."""
    gen = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=DTYPE))
    right, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=DTYPE))
    return left @ torch.diag(torch.logspace(-0.3, 0.3, size, dtype=DTYPE)) @ right


def log_likelihood_gradient(model: nn.Module, inputs, targets, likelihood) -> torch.Tensor:
    """∇ of J = (1/N) Σ log p(yₙ | xₙ), by ordinary autograd."""
    model.zero_grad()
    logp = distribution(likelihood, model(inputs)).log_prob(targets)
    (logp.sum() / inputs.shape[0]).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    return grad


def range_solve(fisher: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F⁺ ∇ restricted to the range of F, and an orthonormal basis of that range."""
    eigvals, eigvecs = torch.linalg.eigh(fisher)
    keep = eigvals > RANGE_RTOL * eigvals.max()
    basis, eigvals = eigvecs[:, keep], eigvals[keep]
    return basis @ ((basis.T @ grad) / eigvals), basis


def small_base(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "linear":
        return nn.Linear(3, 3).to(DTYPE)
    return nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).to(DTYPE)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_natural_gradient_step_is_reparametrisation_invariant(arch, likelihood):
    base = small_base(arch)
    inputs = torch.randn(20, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    with torch.no_grad():
        targets = make_targets(likelihood, base(inputs))
    num = flat_params(base).numel()
    matrix = random_invertible(num)
    reparam = Reparametrised(base, matrix)
    with torch.no_grad():
        assert rel_err(reparam(inputs), base(inputs)) <= RTOL_EXACT

    fisher_theta = natgrad.fisher_matrix(base, inputs, likelihood=likelihood)
    fisher_x = natgrad.fisher_matrix(reparam, inputs, likelihood=likelihood)
    grad_theta = log_likelihood_gradient(base, inputs, targets, likelihood)
    grad_x = log_likelihood_gradient(reparam, inputs, targets, likelihood)
    # the Fisher and the gradient transform as F_x = Aᵀ F_θ A and ∇_x = Aᵀ ∇_θ
    assert rel_err(fisher_x, matrix.T @ fisher_theta @ matrix) <= RTOL_EXACT
    assert rel_err(grad_x, matrix.T @ grad_theta) <= RTOL_EXACT

    step_theta, basis = range_solve(fisher_theta, grad_theta)
    step_x, _ = range_solve(fisher_x, grad_x)
    if likelihood == "categorical":
        # softmax is invariant to a shift of all logits: F has a null space
        assert basis.shape[1] < num
    else:
        assert basis.shape[1] == num
    # compare on the range of F_θ (the whole space except for categorical)
    mapped = basis @ (basis.T @ (matrix @ step_x))
    assert rel_err(mapped, step_theta) <= RTOL_INVARIANT
    # the plain gradient step maps to A Aᵀ ∇_θ, which is not ∇_θ
    assert rel_err(matrix @ grad_x, grad_theta) > 0.1


# --- (c) PSD --------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fisher_is_psd(arch, likelihood):
    model, inputs, _ = make_problem(arch, likelihood)
    fisher = natgrad.fisher_matrix(model, inputs, likelihood=likelihood)
    assert_psd(fisher)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        v = torch.randn(fisher.shape[0], generator=gen, dtype=DTYPE)
        fvp = natgrad.fisher_vector_product(model, inputs, v, likelihood=likelihood)
        assert (v @ fvp).item() >= 0
