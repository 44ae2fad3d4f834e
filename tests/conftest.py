"""Shared float64 set-up for natgrad's tests: tolerances, random models, brute-force references.

Every reference here is computed by a *different route* than the library: per-sample loops
with ordinary autograd on ``torch.distributions`` log-likelihoods, explicit enumeration of
all outcomes (categorical classes, Bernoulli bit patterns) or Gaussian sigma points, and
``torch.autograd.functional.jacobian`` of the full-batch outputs for the Gauss–Newton form.
Nothing here calls into natgrad.

Tolerances are set once here. Any looser than ``RTOL_EXACT`` carries a comment saying why.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

DTYPE = torch.float64

# --- tolerances -------------------------------------------------------------------------------
# Exact identities computed by two different float64 routes (relative Frobenius error).
RTOL_EXACT = 1e-10
# PSD: the smallest eigenvalue may dip below zero by rounding, relative to the largest.
PSD_RTOL = 1e-12
# Looser: the invariance check solves with F (condition number up to ~1e5 on its range for
# the small MLP) and with A, so rounding is amplified by cond(F)·cond(A)² (≈3e-12 observed).
RTOL_INVARIANT = 1e-8
# Eigenvalues of F below this fraction of the largest count as its null space (the logit
# shift of the categorical likelihood); the rest span its range.
RANGE_RTOL = 1e-9

# Statistical tolerances (fixed seeds, so the tests are deterministic).
MC_SEED = 1234
MC_FEW = 1
MC_MANY = 400
# Looser: a Monte-Carlo estimate with 400 draws per input has relative error ~ 1/√400 times
# a model-dependent constant (≈0.05 observed on the test models); 0.15 leaves room for it.
MC_RTOL_MANY = 0.15
# The error must shrink by at least this factor from MC_FEW to MC_MANY draws (√400 = 20
# expected).
MC_MIN_SHRINK = 5.0
# Sampling checks: the empirical mean must be within this many standard errors.
SAMPLE_DRAWS = 20_000
SAMPLE_Z = 5.0
# The empirical Fisher must differ from the true one by at least this relative amount.
EMPIRICAL_MIN_REL_DIFF = 0.05
# KL / (½ ε² dᵀ F d) − 1 at the smallest ε (the gap is O(ε)).
KL_EPSILONS = (1e-1, 1e-2, 1e-3)
KL_RTOL_SMALLEST = 1e-2

# --- problems ---------------------------------------------------------------------------------
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")
ARCHS = ("mlp", "mlp_nobias", "cnn", "seq")
BATCH = 6
OUT = 3  # classes / output dimensions per position
POSITIONS = 2  # positions per sample in the "seq" problem


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A small random float64 model; ``seq`` maps ``[N, T, 4]`` to ``[N, T, OUT]``."""
    torch.manual_seed(seed)
    if arch in ("mlp", "seq"):
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, OUT))
    elif arch == "mlp_nobias":
        model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, OUT, bias=False))
    elif arch == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 2, kernel_size=3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, OUT)
        )
    else:  # pragma: no cover - test table typo
        raise ValueError(arch)
    model = model.to(DTYPE)
    with torch.no_grad():  # larger weights so that predictive distributions are far from uniform
        for p in model.parameters():
            p.mul_(2.0)
    return model


def make_inputs(arch: str, n: int = BATCH, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = {"cnn": (n, 1, 5, 5), "seq": (n, POSITIONS, 4)}.get(arch, (n, 4))
    return torch.randn(shape, generator=gen, dtype=DTYPE)


def make_targets(likelihood: str, outputs: Tensor, seed: int = 2) -> Tensor:
    """Observed labels in the likelihood's convention, independent of the model."""
    gen = torch.Generator().manual_seed(seed)
    if likelihood == "categorical":
        return torch.randint(0, outputs.shape[-1], outputs.shape[:-1], generator=gen)
    if likelihood == "gaussian":
        return torch.randn(outputs.shape, generator=gen, dtype=outputs.dtype)
    return torch.randint(0, 2, outputs.shape, generator=gen).to(outputs.dtype)


def make_problem(arch: str, likelihood: str) -> tuple[nn.Module, Tensor, Tensor]:
    """(model, inputs, targets) for one row of the test table."""
    model = make_model(arch)
    inputs = make_inputs(arch)
    with torch.no_grad():
        targets = make_targets(likelihood, model(inputs))
    return model, inputs, targets


# --- reference pieces (no natgrad) ------------------------------------------------------------
def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ (Frobenius)."""
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


def distribution(likelihood: str, outputs: Tensor) -> torch.distributions.Distribution:
    """``torch.distributions`` object matching natgrad's convention for ``outputs``."""
    if likelihood == "categorical":
        return torch.distributions.Categorical(logits=outputs)
    if likelihood == "gaussian":
        return torch.distributions.Normal(outputs, torch.ones_like(outputs))
    if likelihood == "bernoulli":
        return torch.distributions.Bernoulli(logits=outputs)
    raise ValueError(likelihood)  # pragma: no cover


def reference_log_prob(likelihood: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """log p(y | f) of one sample's outputs, summed over all positions (a scalar)."""
    return distribution(likelihood, outputs).log_prob(targets).sum()


def outcomes(likelihood: str, outputs: Tensor) -> Iterator[tuple[Tensor, float]]:
    """(y, weight) pairs for one sample's outputs with Σ w·g(y) = E_y[g(y)] for every g that is
    quadratic in the score: all outcomes with their probabilities (categorical, Bernoulli), or
    the 2K Gaussian sigma points f ± √K eₖ (unit variance, so exact second moments)."""
    outputs = outputs.detach()
    if likelihood == "categorical":
        classes = outputs.shape[-1]
        probs = outputs.softmax(-1).reshape(-1, classes)
        for labels in itertools.product(range(classes), repeat=probs.shape[0]):
            weight = math.prod(probs[t, c].item() for t, c in enumerate(labels))
            yield torch.tensor(labels).reshape(outputs.shape[:-1]), weight
    elif likelihood == "bernoulli":
        probs = torch.sigmoid(outputs).reshape(-1)
        for bits in itertools.product((0, 1), repeat=probs.numel()):
            pairs = zip(probs.tolist(), bits, strict=True)
            weight = math.prod(p if b else 1 - p for p, b in pairs)
            yield torch.tensor(bits, dtype=outputs.dtype).reshape(outputs.shape), weight
    elif likelihood == "gaussian":
        k = outputs.numel()
        for index, sign in itertools.product(range(k), (1.0, -1.0)):
            shift = torch.zeros(k, dtype=outputs.dtype)
            shift[index] = sign * math.sqrt(k)
            yield outputs + shift.reshape(outputs.shape), 1.0 / (2 * k)
    else:  # pragma: no cover
        raise ValueError(likelihood)


def enumerated_output_fisher(likelihood: str, outputs: Tensor) -> Tensor:
    """Λₙ = E_y[r rᵀ] with r = autograd of the torch.distributions log-likelihood, [N, K, K]."""
    blocks = []
    for row in outputs.detach():
        k = row.numel()
        fisher = torch.zeros(k, k, dtype=row.dtype)
        for y, weight in outcomes(likelihood, row):
            f = row.clone().requires_grad_(True)
            (r,) = torch.autograd.grad(reference_log_prob(likelihood, f, y), f)
            fisher += weight * torch.outer(r.reshape(-1), r.reshape(-1))
        blocks.append(fisher)
    return torch.stack(blocks)


def closed_form_output_fisher(likelihood: str, outputs: Tensor) -> Tensor:
    """Λₙ from the textbook formulas, [N, K, K] (block diagonal over categorical positions)."""
    blocks = []
    for row in outputs.detach():
        if likelihood == "categorical":
            probs = row.softmax(-1).reshape(-1, row.shape[-1])
            per_position = [torch.diag(p) - torch.outer(p, p) for p in probs]
            blocks.append(torch.block_diag(*per_position))
        elif likelihood == "bernoulli":
            p = torch.sigmoid(row).reshape(-1)
            blocks.append(torch.diag(p * (1 - p)))
        else:
            blocks.append(torch.eye(row.numel(), dtype=row.dtype))
    return torch.stack(blocks)


def per_sample_grad(model: nn.Module, logp: Tensor, retain_graph: bool = True) -> Tensor:
    grads = torch.autograd.grad(logp, trainable(model), retain_graph=retain_graph)
    return torch.cat([g.reshape(-1) for g in grads])


def brute_force_fisher(model: nn.Module, inputs: Tensor, likelihood: str) -> Tensor:
    """(1/N) Σₙ Σ_y w(y) gₙ(y) gₙ(y)ᵀ, one autograd call per sample and outcome."""
    num = sum(p.numel() for p in trainable(model))
    fisher = torch.zeros(num, num, dtype=DTYPE)
    for n in range(inputs.shape[0]):
        out = model(inputs[n : n + 1])[0]
        for y, weight in outcomes(likelihood, out):
            g = per_sample_grad(model, reference_log_prob(likelihood, out, y))
            fisher += weight * torch.outer(g, g)
    return fisher / inputs.shape[0]


def brute_force_empirical_fisher(
    model: nn.Module, inputs: Tensor, likelihood: str, targets: Tensor
) -> Tensor:
    """(1/N) Σₙ gₙ gₙᵀ with gₙ the gradient of log p(yₙ | xₙ) for the observed yₙ."""
    num = sum(p.numel() for p in trainable(model))
    fisher = torch.zeros(num, num, dtype=DTYPE)
    for n in range(inputs.shape[0]):
        model.zero_grad()
        logp = reference_log_prob(likelihood, model(inputs[n : n + 1])[0], targets[n])
        logp.backward()
        g = torch.cat([p.grad.reshape(-1) for p in trainable(model)])
        fisher += torch.outer(g, g)
    model.zero_grad()
    return fisher / inputs.shape[0]


def full_jacobian(model: nn.Module, inputs: Tensor) -> Tensor:
    """J = ∂ vec(f(X)) / ∂θ of the full-batch outputs, [N·K, P]."""
    params = trainable(model)
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def outputs(*ps: Tensor) -> Tensor:
        params = dict(zip(names, ps, strict=True))
        return torch.func.functional_call(model, params, (inputs,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(outputs, tuple(p.detach() for p in params))
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


def gauss_newton(model: nn.Module, inputs: Tensor, likelihood: str) -> Tensor:
    """Jᵀ Λ J / N with J from ``torch.autograd.functional.jacobian`` and Λ in closed form."""
    jac = full_jacobian(model, inputs)
    with torch.no_grad():
        lam = torch.block_diag(*closed_form_output_fisher(likelihood, model(inputs)))
    return jac.T @ lam @ jac / inputs.shape[0]


def assert_psd(matrix: Tensor) -> None:
    eigvals = torch.linalg.eigvalsh(matrix)
    scale = eigvals.abs().max().item()
    assert eigvals.min().item() >= -PSD_RTOL * scale, (eigvals.min().item(), scale)
