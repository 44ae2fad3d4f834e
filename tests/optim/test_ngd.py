"""NaturalGradient: its step against −lr (F + λI)⁻¹∇J with F from per-sample brute force,
Woodbury against Cholesky, per-group settings, convergence against SGD, and error paths."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from conftest import (
    DTYPE,
    LIKELIHOODS,
    RTOL_EXACT,
    RTOL_STEP,
    brute_force_fisher,
    make_inputs,
    make_model,
    make_targets,
    mean_nll,
    rel_err,
    trainable,
)

pytestmark = pytest.mark.usefixtures("single_thread")

DAMPING = 1e-2


def problem(arch="mlp", likelihood="categorical", n=6):
    model, inputs = make_model(arch), make_inputs(arch, n)
    with torch.no_grad():
        targets = make_targets(likelihood, model(inputs))
    return model, inputs, targets


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def gradient(model, inputs, targets, likelihood="categorical") -> torch.Tensor:
    """∇J of the batch-mean negative log-likelihood, ``model.parameters()`` order."""
    loss = mean_nll(likelihood, model(inputs), targets)
    return flat(torch.autograd.grad(loss, trainable(model)))


def one_step(model, inputs, targets, likelihood="categorical", params=None, **options):
    """One NaturalGradient step; returns the parameter change (flat)."""
    before = flat(p.detach().clone() for p in model.parameters())
    settings = dict(lr=0.7, damping=DAMPING, likelihood=likelihood)
    settings.update(options)
    opt = natgrad.NaturalGradient(model, params, **settings)
    opt.zero_grad()
    mean_nll(likelihood, model(inputs), targets).backward()
    opt.step()
    return flat(p.detach() for p in model.parameters()) - before


CASES = [("mlp", lik) for lik in LIKELIHOODS] + [
    ("mlp_nobias", "categorical"), ("cnn", "categorical"), ("seq", "categorical")
]


@pytest.mark.parametrize(("arch", "likelihood"), CASES)
def test_step_is_damped_fisher_solve(arch, likelihood):
    model, inputs, targets = problem(arch, likelihood)
    fisher = brute_force_fisher(model, inputs, likelihood)
    dense = natgrad.fisher_matrix(model, inputs, likelihood=likelihood)
    assert rel_err(dense, fisher) <= RTOL_EXACT
    g = gradient(model, inputs, targets, likelihood)
    eye = torch.eye(len(g), dtype=DTYPE)
    expected = -0.7 * torch.linalg.solve(fisher + DAMPING * eye, g)
    assert rel_err(one_step(model, inputs, targets, likelihood), expected) <= RTOL_STEP


@pytest.mark.parametrize(("arch", "n"), [("mlp", 6), ("mlp", 40), ("cnn", 6)])
def test_woodbury_and_cholesky_agree(arch, n):
    """N·R < P (Woodbury's regime) and N·R > P (Cholesky's): the same step either way."""
    model, inputs, targets = problem(arch, n=n)
    changes = {
        solver: one_step(copy.deepcopy(model), inputs, targets, solver=solver)
        for solver in ("auto", "cholesky", "woodbury")
    }
    assert rel_err(changes["woodbury"], changes["cholesky"]) <= RTOL_EXACT
    assert rel_err(changes["auto"], changes["cholesky"]) <= RTOL_EXACT


def test_per_group_damping_and_lr():
    """Damping becomes a diagonal D over the groups; each group steps with its own lr."""
    model, inputs, targets = problem()
    fisher = brute_force_fisher(model, inputs, "categorical")
    g = gradient(model, inputs, targets)
    groups = [
        {"params": list(model[0].parameters()), "damping": 0.1, "lr": 0.5},
        {"params": list(model[2].parameters()), "damping": 1.0},
    ]
    sizes = [sum(p.numel() for p in group["params"]) for group in groups]
    damping = torch.cat([torch.full((sizes[0],), 0.1, dtype=DTYPE),
                         torch.full((sizes[1],), 1.0, dtype=DTYPE)])
    direction = torch.linalg.solve(fisher + torch.diag(damping), g)
    lrs = torch.cat([torch.full((sizes[0],), 0.5, dtype=DTYPE),
                     torch.full((sizes[1],), 0.7, dtype=DTYPE)])
    change = one_step(model, inputs, targets, params=groups)
    assert rel_err(change, -lrs * direction) <= RTOL_STEP


def test_subset_of_parameters_uses_their_fisher_block():
    model, inputs, targets = problem()
    fisher = brute_force_fisher(model, inputs, "categorical")
    g = gradient(model, inputs, targets)
    first = sum(p.numel() for p in model[0].parameters())
    block = fisher[first:, first:]
    eye = torch.eye(len(block), dtype=DTYPE)
    expected = -0.7 * torch.linalg.solve(block + DAMPING * eye, g[first:])
    change = one_step(model, inputs, targets, params=model[2].parameters())
    assert torch.equal(change[:first], torch.zeros(first, dtype=DTYPE))
    assert rel_err(change[first:], expected) <= RTOL_STEP


def test_l2_weight_decay_is_preconditioned():
    model, inputs, targets = problem()
    fisher = brute_force_fisher(model, inputs, "categorical")
    theta = flat(p.detach() for p in model.parameters())
    g = gradient(model, inputs, targets) + 0.1 * theta
    expected = -0.7 * torch.linalg.solve(fisher + DAMPING * torch.eye(len(g), dtype=DTYPE), g)
    assert rel_err(one_step(model, inputs, targets, weight_decay=0.1), expected) <= RTOL_STEP


def test_auto_lr_is_one_for_the_exact_natural_gradient():
    """Δ = (F + λI)⁻¹g is the exact minimiser of the damped quadratic model, so lr="auto"
    must choose α = gᵀΔ / Δᵀ(F + λI)Δ = 1 and take the lr=1 step."""
    model, inputs, targets = problem()
    fisher = brute_force_fisher(model, inputs, "categorical")
    g = gradient(model, inputs, targets)
    expected = -torch.linalg.solve(fisher + DAMPING * torch.eye(len(g), dtype=DTYPE), g)
    auto = copy.deepcopy(model)
    settings = dict(lr="auto", momentum=0.0, damping=DAMPING, likelihood="categorical")
    opt = natgrad.NaturalGradient(auto, **settings)
    opt.zero_grad()
    mean_nll("categorical", auto(inputs), targets).backward()
    opt.step()
    assert opt.state["natgrad"]["lr"] == pytest.approx(1.0, rel=RTOL_STEP)
    change = flat(q.detach() - p.detach()
                  for p, q in zip(model.parameters(), auto.parameters(), strict=True))
    assert rel_err(change, expected) <= RTOL_STEP


# --- convergence ----------------------------------------------------------------------------
NGD_TARGET_LOSS = 0.1
SGD_LRS = (0.03, 0.1, 0.3, 1.0)
MAX_STEPS = 200


def moons():
    from sklearn.datasets import make_moons

    x, y = make_moons(100, noise=0.1, random_state=0)
    return torch.tensor(x, dtype=DTYPE), torch.tensor(y)


def steps_to_target(make_opt) -> float:
    x, y = moons()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).to(DTYPE)
    opt = make_opt(model)
    for step in range(MAX_STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if loss.item() < NGD_TARGET_LOSS:
            return step
        loss.backward()
        opt.step()
    return float("inf")


def test_reaches_target_loss_in_fewer_steps_than_tuned_sgd():
    ngd = steps_to_target(lambda m: natgrad.NaturalGradient(m, lr=1.0, damping=DAMPING))
    sgd = min(
        steps_to_target(lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr))
        for lr in SGD_LRS
    )
    assert ngd < 20, ngd
    assert ngd < sgd, (ngd, sgd)


# --- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(kind="empirical"), "kind"),
        (dict(kind="bogus"), "kind"),
        (dict(solver="bogus"), "solver"),
        (dict(damping=0.0), "damping"),
        (dict(damping=-1.0), "damping"),
        (dict(lr=0.0), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(mc_samples=0, kind="mc"), "mc_samples"),
        (dict(likelihood="bogus"), "likelihood"),
        (dict(lr="fast"), "lr"),
        (dict(lm_every=0), "lm_every"),
        (dict(min_damping=0.0), "min_damping"),
        (dict(initial_damping=-1.0), "initial_damping"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        natgrad.NaturalGradient(make_model("mlp"), **kwargs)


def test_step_without_backpropagated_forward_raises():
    model, inputs, targets = problem()
    opt = natgrad.NaturalGradient(model, lr=0.5, damping=DAMPING)
    for p in model.parameters():  # gradients from nowhere: no forward was seen
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="forward"):
        opt.step()
    # a forward that was not backpropagated does not count either
    model(inputs)
    with pytest.raises(RuntimeError, match="forward"):
        opt.step()
    # after a proper step, the forward is consumed
    opt.zero_grad()
    mean_nll("categorical", model(inputs), targets).backward()
    opt.step()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="forward"):
        opt.step()


def test_params_must_belong_to_the_model():
    with pytest.raises(ValueError, match="params"):
        natgrad.NaturalGradient(make_model("mlp"), [nn.Parameter(torch.zeros(3))])
