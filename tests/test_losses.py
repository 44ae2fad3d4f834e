"""loss=: torch loss modules as natgrad's losses, checked against brute force in float64.

The functional curvature with ``loss=`` is the Fisher of that loss as it is normalised, which
for these exponential families is the Gauss–Newton matrix Jᵀ (∂²L/∂f²) J of the loss. The
reference differentiates the user's own torch loss twice with respect to the model's outputs
(``torch.autograd.functional.hessian``) and takes the full-batch Jacobian of the outputs
(``torch.autograd.functional.jacobian``): no natgrad code, no natgrad convention.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from conftest import DTYPE, OUT, RTOL_EXACT, make_inputs, make_model, rel_err
from natgrad.losses import LossSpec

B = 5


def gauss_newton(model: nn.Module, inputs: torch.Tensor, loss_fn, targets) -> torch.Tensor:
    """Jᵀ H J with H = ∂²loss/∂f² of the user's loss at the model's outputs, ``[P, P]``."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def outputs_of(*flat):
        tensors = dict(zip(names, flat, strict=True))
        return torch.func.functional_call(model, tensors, (inputs,))

    outputs = outputs_of(*params).detach()
    jac = torch.autograd.functional.jacobian(outputs_of, tuple(p.detach() for p in params))
    J = torch.cat([j.reshape(outputs.numel(), -1) for j in jac], dim=1)
    H = torch.autograd.functional.hessian(lambda f: loss_fn(f, targets), outputs)
    H = H.reshape(outputs.numel(), outputs.numel())
    return J.T @ H @ J


def sequence_problem(ignore: bool):
    model = make_model("seq", seed=2)
    inputs = make_inputs("seq", B, seed=3)
    gen = torch.Generator().manual_seed(4)
    targets = torch.randint(OUT, (B, inputs.shape[1]), generator=gen)
    if ignore:
        targets[0, -1] = -100
        targets[3, 0] = -100
    return model, inputs, targets


CE_CASES = [
    pytest.param(nn.CrossEntropyLoss(), False, id="mean"),
    pytest.param(nn.CrossEntropyLoss(reduction="sum"), False, id="sum"),
    pytest.param(nn.CrossEntropyLoss(), True, id="mean-ignore"),
    pytest.param(nn.CrossEntropyLoss(reduction="sum"), True, id="sum-ignore"),
    pytest.param(nn.CrossEntropyLoss(label_smoothing=0.2), True, id="mean-ignore-smoothing"),
]


def flat_ce(loss: nn.Module):
    """The loss as a language-model script writes it: logits flattened to tokens."""
    return lambda f, y: loss(f.reshape(-1, OUT), y.reshape(-1))


@pytest.mark.parametrize("loss, ignore", CE_CASES)
def test_fisher_matrix_of_cross_entropy_is_its_gauss_newton(loss, ignore):
    model, inputs, targets = sequence_problem(ignore)
    expected = gauss_newton(model, inputs, flat_ce(loss), targets)
    got = natgrad.fisher_matrix(model, inputs, loss=loss, targets=targets.reshape(-1))
    assert rel_err(got, expected) <= RTOL_EXACT
    # without targets the ignored positions cannot be known: all positions count
    if not ignore:
        assert rel_err(natgrad.fisher_matrix(model, inputs, loss=loss), expected) <= RTOL_EXACT


@pytest.mark.parametrize(
    "loss, likelihood",
    [
        (nn.MSELoss(), "gaussian"),
        (nn.MSELoss(reduction="sum"), "gaussian"),
        (nn.BCEWithLogitsLoss(), "bernoulli"),
        (nn.BCEWithLogitsLoss(reduction="sum"), "bernoulli"),
    ],
    ids=["mse-mean", "mse-sum", "bce-mean", "bce-sum"],
)
def test_fisher_matrix_of_elementwise_losses_is_their_gauss_newton(loss, likelihood):
    model = make_model("mlp", seed=2)
    inputs = make_inputs("mlp", B, seed=3)
    gen = torch.Generator().manual_seed(4)
    targets = torch.bernoulli(torch.full((B, OUT), 0.5, dtype=DTYPE), generator=gen)
    expected = gauss_newton(model, inputs, loss, targets)
    got = natgrad.fisher_matrix(model, inputs, loss=loss)
    assert rel_err(got, expected) <= RTOL_EXACT


@pytest.mark.parametrize("loss, ignore", CE_CASES[2:4])
def test_fisher_vector_product_with_loss(loss, ignore):
    model, inputs, targets = sequence_problem(ignore)
    expected = gauss_newton(model, inputs, flat_ce(loss), targets)
    v = torch.randn(expected.shape[0], dtype=DTYPE, generator=torch.Generator().manual_seed(7))
    got = natgrad.fisher_vector_product(model, inputs, v, loss=loss, targets=targets)
    assert rel_err(got, expected @ v) <= RTOL_EXACT


@pytest.mark.parametrize("loss, ignore", CE_CASES)
def test_kfac_factors_with_loss_leave_ignored_positions_out(loss, ignore):
    """The output layer's δ is the score itself, so its G is the sum of the diagonal blocks
    of ∂²L/∂f² over positions (the loss's scale, ignored positions zero); its A is the mean
    of āāᵀ over the valid positions' hidden activations."""
    model, inputs, targets = sequence_problem(ignore)
    outputs = model(inputs).detach()
    tokens = outputs.shape[0] * outputs.shape[1]
    H = torch.autograd.functional.hessian(lambda f: flat_ce(loss)(f, targets), outputs)
    H = H.reshape(tokens, OUT, tokens, OUT)
    expected_G = sum(H[i, :, i, :] for i in range(tokens))  # c·(1/N)·Σ Λ = Σ of blocks
    hidden = model[1](model[0](inputs)).detach().reshape(tokens, -1)
    rows = torch.cat([hidden, torch.ones(tokens, 1, dtype=DTYPE)], dim=1)
    rows = rows[targets.reshape(-1) != -100]
    expected_A = rows.T @ rows / rows.shape[0]
    A, G = natgrad.kfac_factors(model, inputs, loss=loss, targets=targets)["2"]
    assert rel_err(A, expected_A) <= RTOL_EXACT
    assert rel_err(G, expected_G) <= RTOL_EXACT


def test_empirical_fisher_with_smoothed_and_ignored_targets():
    """kind='empirical' uses the loss's own per-example gradients: F = c · (1/N) Σₙ gₙgₙᵀ with
    gₙ the gradient of example n's summed (smoothed) cross entropy, c = N / n_valid."""
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    model, inputs, targets = sequence_problem(True)
    grads = []
    for n in range(B):
        m = copy.deepcopy(model)
        out = m(inputs[n : n + 1]).reshape(-1, OUT)
        total = F.cross_entropy(out, targets[n], label_smoothing=0.1, reduction="sum")
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            total, list(m.parameters()))]))
    g = torch.stack(grads)
    n_valid = int((targets != -100).sum())
    expected = g.T @ g / n_valid
    got = natgrad.fisher_matrix(model, inputs, loss=loss, kind="empirical", targets=targets)
    assert rel_err(got, expected) <= RTOL_EXACT


# --- what natgrad refuses -------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss, message",
    [
        (nn.CrossEntropyLoss(weight=torch.ones(OUT)), "class weights"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(OUT)), "pos_weight"),
        (nn.MSELoss(reduction="none"), "reduction='none'"),
        (nn.CrossEntropyLoss(reduction="none"), "reduction='none'"),
    ],
)
def test_unrepresentable_loss_modules_are_refused_everywhere(loss, message):
    model = make_model("mlp")
    inputs = make_inputs("mlp", B)
    for build in (natgrad.KFAC, natgrad.EKFAC, natgrad.NGDCG, natgrad.NaturalGradient):
        with pytest.raises(ValueError, match=message):
            build(model, loss=loss)
    with pytest.raises(ValueError, match=message):
        natgrad.fisher_matrix(model, inputs, loss=loss)


@pytest.mark.parametrize("loss", [nn.L1Loss(), nn.NLLLoss(), nn.BCELoss(), F.mse_loss, "mse"])
def test_other_losses_are_a_type_error_naming_the_supported_ones(loss):
    with pytest.raises(TypeError, match="CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss"):
        natgrad.KFAC(make_model("mlp"), loss=loss)


def test_likelihood_and_loss_together_are_refused():
    model = make_model("mlp")
    for build in (natgrad.KFAC, natgrad.EKFAC, natgrad.NGDCG, natgrad.NaturalGradient):
        with pytest.raises(ValueError, match="either likelihood= or loss="):
            build(model, loss=nn.MSELoss(), likelihood="gaussian")
    with pytest.raises(ValueError, match="either likelihood= or loss="):
        natgrad.kfac_factors(model, make_inputs("mlp", B), loss=nn.MSELoss(),
                             likelihood="gaussian")


def test_functional_api_needs_a_likelihood_or_a_loss():
    with pytest.raises(ValueError, match="likelihood= .* or loss= .* is required"):
        natgrad.fisher_matrix(make_model("mlp"), make_inputs("mlp", B))


def test_spec_of_each_module():
    ce = LossSpec.from_module(nn.CrossEntropyLoss(ignore_index=7, label_smoothing=0.3))
    assert (ce.likelihood.name, ce.reduction, ce.ignore_index, ce.label_smoothing) == (
        "categorical", "mean", 7, 0.3)
    mse = LossSpec.from_module(nn.MSELoss(reduction="sum"))
    assert (mse.likelihood.name, mse.reduction, mse.factor) == ("gaussian", "sum", 2.0)
    bce = LossSpec.from_module(nn.BCEWithLogitsLoss())
    assert (bce.likelihood.name, bce.reduction, bce.factor) == ("bernoulli", "mean", 1.0)


def test_sum_scale_relates_each_loss_to_the_summed_nll():
    """s with loss = s · Σ nll, checked on the losses' own values."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(4, 3, 5, dtype=DTYPE, generator=gen)
    y = torch.randint(5, (4, 3), generator=gen)
    y[1, 2] = -100
    valid = y != -100
    nll = -(f.log_softmax(-1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1))[valid].sum()
    for module in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")):
        spec = LossSpec.from_module(module)
        value = module(f.reshape(-1, 5), y.reshape(-1))
        assert torch.isclose(value, spec.sum_scale(f, valid) * nll, rtol=1e-13)
    g = torch.randn(4, 3, dtype=DTYPE, generator=gen)
    z = torch.randn(4, 3, dtype=DTYPE, generator=gen)
    gaussian_nll = 0.5 * (g - z).square().sum()
    for module in (nn.MSELoss(), nn.MSELoss(reduction="sum")):
        spec = LossSpec.from_module(module)
        assert torch.isclose(module(g, z), spec.sum_scale(g, None) * gaussian_nll, rtol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_fitted_position_counts_though_its_gradient_is_zero(dtype):
    """∂L/∂f is zero at an ignored position and at one the model fits to the output's
    precision (p one-hot): the second counts, the first does not."""
    spec = LossSpec.from_module(nn.CrossEntropyLoss())
    logits = torch.tensor([[900.0, 0.0, 0.0],   # fitted: p = (1, 0, 0) exactly
                           [0.3, 0.1, 0.2],     # ignored (target -100)
                           [0.0, 2.0, 0.5]],    # an ordinary position
                          dtype=dtype, requires_grad=True)
    targets = torch.tensor([0, -100, 1])
    F.cross_entropy(logits, targets).backward()
    assert torch.equal(logits.grad[0], torch.zeros(3, dtype=dtype))  # underflowed
    assert spec.valid(logits.detach(), logits.grad).tolist() == [True, False, True]
    # a batch fitted everywhere (loss exactly 0): every position counts
    fitted = logits.detach()[[0, 0]].clone().requires_grad_()
    F.cross_entropy(fitted, torch.tensor([0, 0])).backward()
    assert spec.valid(fitted.detach(), fitted.grad) is None


def test_kfac_statistics_stay_finite_on_a_batch_fitted_exactly():
    """A batch at a loss of exactly 0 (every gradient underflowed) gives finite factors (its
    positions counted, not all dropped as ignored) and a taken step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[300.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
        model[0].bias.zero_()
    opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss(), lr=0.1, damping=1e-2, momentum=0.0,
                       kind="empirical", stat_every=1)
    inputs = torch.rand(8, 4) + 1.0  # first logit ≥ 300 above the others
    opt.zero_grad()
    loss = nn.CrossEntropyLoss()(model(inputs), torch.zeros(8, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    opt.step()
    state = opt.state[model[0].weight]
    assert torch.isfinite(state["input_cov"]).all() and torch.isfinite(state["grad_cov"]).all()
    rows = torch.cat([inputs, torch.ones(8, 1)], dim=1)
    assert rel_err(state["input_cov"].double(), (rows.T @ rows / 8).double()) <= 1e-6
    assert opt.state["natgrad"].get("skipped_steps", 0) == 0
