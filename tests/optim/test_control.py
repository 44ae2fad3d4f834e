"""Automatic lr, momentum and damping: the quadratic model, Levenberg–Marquardt, CG, NGDCG."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
import natgrad.optim.control as control
from conftest import RTOL_EXACT, rel_err
from natgrad.curvature.products import conjugate_gradient
from natgrad.layers.capture import ForwardRecord
from natgrad.optim.control import (
    backtrack_fraction,
    check_rows,
    lm_update,
    quadratic_value,
    row_stride,
    solve_coefficients,
)

DTYPE = torch.float64
# CG against a dense solve on a well-conditioned system (the bound).
CG_RTOL = 1e-8


def _spd(n: int, condition: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    return q @ torch.diag(torch.logspace(0, math.log10(condition), n, dtype=DTYPE)) @ q.T


def test_cg_reaches_dense_solve():
    matrix = _spd(40, 10.0, seed=0)
    rhs = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    solution, iters, residual = conjugate_gradient(lambda v: matrix @ v, rhs, tol=1e-12)
    assert rel_err(solution, torch.linalg.solve(matrix, rhs)) <= CG_RTOL
    assert residual <= 1e-12 and iters <= 40


def test_cg_warm_start_and_zero_rhs():
    matrix = _spd(20, 10.0, seed=2)
    rhs = torch.randn(20, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    exact = torch.linalg.solve(matrix, rhs)
    _, iters, _ = conjugate_gradient(lambda v: matrix @ v, rhs, initial=exact, tol=1e-10)
    assert iters == 0
    zero, iters, residual = conjugate_gradient(lambda v: matrix @ v, torch.zeros(20, dtype=DTYPE))
    assert torch.equal(zero, torch.zeros(20, dtype=DTYPE)) and iters == 0


def test_preconditioned_cg_needs_fewer_iterations():
    matrix = _spd(60, 1e5, seed=4)
    rhs = torch.randn(60, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    approx = matrix + 0.01 * torch.eye(60, dtype=DTYPE)  # a good SPD preconditioner M ≈ A
    solve_m = torch.linalg.cholesky(approx)

    def precondition(r: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(r.unsqueeze(1), solve_m).squeeze(1)

    _, plain, _ = conjugate_gradient(lambda v: matrix @ v, rhs, max_iters=500, tol=1e-8)
    x, pre, _ = conjugate_gradient(
        lambda v: matrix @ v, rhs, max_iters=500, tol=1e-8, preconditioner=precondition
    )
    assert pre < plain
    assert rel_err(x, torch.linalg.solve(matrix, rhs)) <= 1e-6


def test_cg_on_fisher_vector_products_matches_dense_solve():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(7, 4, dtype=DTYPE)
    damping = 0.5  # keeps the damped Fisher well conditioned
    fisher = natgrad.fisher_matrix(model, x, likelihood="categorical")
    rhs = torch.randn(fisher.shape[0], dtype=DTYPE)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return natgrad.fisher_vector_product(model, x, v, likelihood="categorical") + damping * v

    solution, _, _ = conjugate_gradient(matvec, rhs, max_iters=200, tol=1e-13)
    expected = torch.linalg.solve(fisher + damping * torch.eye(fisher.shape[0], dtype=DTYPE), rhs)
    assert rel_err(solution, expected) <= CG_RTOL


def test_solve_coefficients_matches_closed_form_minimiser():
    curvature = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=DTYPE)
    linear = torch.tensor([-2.0, 0.5], dtype=DTYPE)
    a, m, value = solve_coefficients(curvature, linear, (True, True), (0.0, 0.0))
    # closed form: c* = −C⁻¹ g = −(1/11)[[3, −1], [−1, 4]] g
    expected = -torch.tensor([[3.0, -1.0], [-1.0, 4.0]], dtype=DTYPE) @ linear / 11.0
    assert a == pytest.approx(float(expected[0]), rel=1e-12)
    assert m == pytest.approx(float(expected[1]), rel=1e-12)
    assert value == pytest.approx(0.5 * float(linear @ expected), rel=1e-12)  # −½ gᵀC⁻¹g
    assert value == pytest.approx(quadratic_value(curvature, linear, a, m), rel=1e-14)


def test_solve_coefficients_first_step_and_safeguards():
    curvature = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=DTYPE)
    linear = torch.tensor([-3.0, 0.0], dtype=DTYPE)
    a, m, _ = solve_coefficients(curvature, linear, (True, True), (0.0, 0.0))
    assert (a, m) == (1.5, 0.0)  # α alone: −gᵀd / dᵀCd
    parallel = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=DTYPE)  # d ∥ δ₀: singular
    a, m, _ = solve_coefficients(parallel, torch.tensor([-1.0, -1.0], dtype=DTYPE),
                                 (True, True), (0.0, 0.0))
    assert (a, m) == (1.0, 0.0)
    a, m, _ = solve_coefficients(curvature, linear, (False, False), (0.3, 0.9))
    assert (a, m) == (0.3, 0.9)


@pytest.mark.parametrize(
    ("rho", "expected"), [(0.9, 0.5), (0.5, 1.0), (0.1, 2.0), (math.nan, 2.0), (-5.0, 2.0)]
)
def test_lm_update(rho, expected):
    assert lm_update(1.0, rho, 0.5, 1e-5, 1e3) == pytest.approx(expected)


def test_lm_update_respects_bounds():
    assert lm_update(1e-5, 0.9, 0.5, 1e-5, 1e3) == 1e-5
    assert lm_update(1e3, 0.0, 0.5, 1e-5, 1e3) == 1e3


def _linear_gaussian_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=gen, dtype=DTYPE)
    y = x @ torch.randn(5, 2, generator=gen, dtype=DTYPE) + 0.1 * torch.randn(
        32, 2, generator=gen, dtype=DTYPE
    )
    torch.manual_seed(seed)
    return nn.Linear(5, 2).double(), x, y


def _gaussian_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(1).mean()


@pytest.mark.parametrize("optimizer", ["KFAC", "NaturalGradient"])
def test_rho_is_one_on_an_exactly_quadratic_problem_and_damping_shrinks(optimizer):
    model, x, y = _linear_gaussian_problem()
    opt = getattr(natgrad, optimizer)(
        model, lr="auto", momentum="auto", damping="auto", likelihood="gaussian", lm_every=1,
        initial_damping=1.0, min_damping=1e-8,
    )
    dampings = []
    for _ in range(4):
        opt.zero_grad()
        _gaussian_loss(model(x), y).backward()
        opt.step()
        assert opt.state["natgrad"]["rho"] == pytest.approx(1.0, abs=1e-8)
        dampings.append(opt.state["natgrad"]["damping"])
    assert all(b < a for a, b in zip([1.0] + dampings, dampings, strict=False))


def test_damping_grows_on_a_strongly_nonquadratic_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # saturated tanh units: the quadratic model is poor
    x = torch.randn(64, 2, dtype=DTYPE) * 3
    y = torch.randint(0, 2, (64,))
    opt = natgrad.KFAC(model, lr="auto", momentum="auto", damping="auto", lm_every=1,
                       initial_damping=1e-4, stat_every=1, inv_every=1)
    start = opt.damping_of(opt.param_groups[0])
    rhos = []
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rhos.append(opt.state["natgrad"]["rho"])
    assert min(rhos) < 0.25
    assert opt.state["natgrad"]["damping"] > start


def test_targets_recovered_from_the_output_gradient():
    gen = torch.Generator().manual_seed(0)
    for name, targets in [
        ("categorical", torch.randint(0, 4, (5,), generator=gen)),
        ("gaussian", torch.randn(5, 4, generator=gen, dtype=DTYPE)),
        ("bernoulli", torch.randint(0, 2, (5, 4), generator=gen).to(DTYPE)),
    ]:
        likelihood = natgrad.get_likelihood(name)
        outputs = torch.randn(5, 4, generator=gen, dtype=DTYPE, requires_grad=True)
        (-likelihood.log_prob(outputs, targets).mean()).backward()
        recovered = likelihood.targets_from_grad(outputs.detach(), outputs.grad)
        expected = F.one_hot(targets, 4).to(DTYPE) if name == "categorical" else targets
        assert rel_err(recovered, expected) <= RTOL_EXACT
        ce = likelihood.cross_entropy(outputs.detach(), recovered)
        assert rel_err(ce, -likelihood.log_prob(outputs.detach(), targets)) <= RTOL_EXACT


def _digits(n: int = 512):
    from sklearn.datasets import load_digits

    inputs, labels = load_digits(return_X_y=True)
    return torch.tensor(inputs[:n] / 16.0, dtype=torch.float32), torch.tensor(labels[:n])


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC", "NGDCG"])
def test_automatic_settings_reduce_the_loss_on_digits_without_tuning(optimizer):
    x, y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = getattr(natgrad, optimizer)(model)  # every hyper-parameter at its default
    start = F.cross_entropy(model(x), y).item()
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    end = F.cross_entropy(model(x), y).item()
    assert end < 0.25 * start
    assert opt.state["natgrad"]["skipped_steps"] == 0


def _train(model, opt, x, y, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


@pytest.mark.parametrize(("optimizer", "extra"), [
    ("KFAC", {}), ("EKFAC", {}), ("NGDCG", {}), ("NaturalGradient", {}),
    ("KFAC", {"momentum_every": 3}), ("EKFAC", {"momentum_every": 3}),  # the kept ratio
])
def test_adaptive_state_round_trip_is_bit_identical(optimizer, extra):
    torch.manual_seed(0)
    x = torch.randn(64, 5, dtype=DTYPE)
    y = torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    kwargs = dict(lr="auto", momentum="auto", damping="auto", lm_every=2, **extra)
    opt = getattr(natgrad, optimizer)(model, **kwargs)
    _train(model, opt, x, y, 7, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(model)
    clone.load_state_dict(saved["model"])
    resumed = getattr(natgrad, optimizer)(clone, **kwargs)
    resumed.load_state_dict(saved["opt"])
    assert "damping" in resumed.state["natgrad"] and "lr" in resumed.state["natgrad"]
    _train(model, opt, x, y, 6, seed=2)
    _train(clone, resumed, x, y, 6, seed=2)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.state["natgrad"]["damping"] == resumed.state["natgrad"]["damping"]


def test_ngdcg_arguments_are_validated():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="cg_max_iters"):
        natgrad.NGDCG(model, cg_max_iters=0)
    with pytest.raises(ValueError, match="cg_tol"):
        natgrad.NGDCG(model, cg_tol=-1.0)
    with pytest.raises(ValueError, match="preconditioner"):
        natgrad.NGDCG(model, preconditioner="jacobi")


@pytest.mark.parametrize("preconditioner", ["kfac", "diagonal", "none"])
def test_ngdcg_step_solves_the_damped_fisher_system(preconditioner):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    reference = copy.deepcopy(model)
    x = torch.randn(10, 4, dtype=DTYPE)
    y = torch.randint(0, 3, (10,))
    damping = 0.3
    opt = natgrad.NGDCG(model, lr=1.0, momentum=0.0, damping=damping, cg_max_iters=200,
                        cg_tol=1e-12, preconditioner=preconditioner, stat_every=1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    fisher = natgrad.fisher_matrix(reference, x, likelihood="categorical")
    expected = torch.linalg.solve(fisher + damping * torch.eye(len(grad), dtype=DTYPE), grad)
    assert rel_err(before - after, expected) <= CG_RTOL


def _records(*shapes: tuple[int, ...]) -> list[ForwardRecord]:
    return [ForwardRecord(inputs=(torch.zeros(shape[0], 3),), calls={}, batch_size=shape[0],
                          output=torch.zeros(shape)) for shape in shapes]


@pytest.mark.parametrize(
    ("rows", "shapes", "expected"),
    [
        ("auto", [(256, 10)], 1),  # classifier: 10 outputs need ≥ 410 rows: all of them
        ("auto", [(256, 1)], 1),  # scalar regression
        ("auto", [(256, 64)], 4),  # 64 outputs: 64 rows
        ("auto", [(256, 784)], 4),  # never fewer than 64 rows
        ("auto", [(256, 28, 28)], 4),  # outputs per example, whatever their shape
        ("auto", [(512, 32)], 4),  # 32 outputs: 128 rows
        ("auto", [(128, 784), (128, 784)], 4),  # micro-batches count together
        ("auto", [(40, 784)], 1),  # a batch smaller than the minimum
        (None, [(256, 784)], 1),
        (16, [(256, 10)], 16),
        (1000, [(256, 10)], 1),
    ],
)
def test_row_stride(rows, shapes, expected):
    assert row_stride(rows, _records(*shapes), nn.Linear(3, 3)) == expected


def test_row_stride_uses_every_row_when_examples_interact():
    model = nn.Sequential(nn.Linear(3, 784), nn.BatchNorm1d(784))
    assert row_stride("auto", _records((256, 784)), model) == 1
    assert row_stride("auto", _records((256, 784)), model.eval()) == 4
    assert row_stride(64, _records((256, 784)), model.train()) == 4  # asked for explicitly


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "all"])
def test_curvature_rows_is_validated(bad):
    with pytest.raises(ValueError, match="curvature_rows"):
        check_rows(bad)
    for optimizer in (natgrad.KFAC, natgrad.EKFAC, natgrad.NGDCG, natgrad.NaturalGradient):
        with pytest.raises(ValueError, match="curvature_rows"):
            optimizer(nn.Linear(3, 2), curvature_rows=bad)


@pytest.mark.parametrize(("slope", "quadratic"), [(-2.0, 5.0), (-1.0, 4.0), (-3.0, 12.0)])
def test_backtrack_fraction_is_the_parabola_minimum(slope, quadratic):
    """J(θ + tδ) − J(θ) = slope·t + quadratic·t² exactly: the fraction is its minimiser."""
    change = slope + quadratic  # at t = 1
    t = backtrack_fraction(slope, predicted=-0.5, change=change)
    assert t == pytest.approx(-slope / (2 * quadratic), rel=1e-12)
    assert slope * t + quadratic * t * t < 0


def test_backtrack_fraction_bounds_and_refusals():
    assert backtrack_fraction(-1.0, -0.5, 1e9) == 0.05  # a wild overshoot: 5 % of the step
    assert backtrack_fraction(-1.0, -0.5, -1.5) is None  # no curvature: nothing to fit
    assert backtrack_fraction(-1.0, -0.5, -0.2) == 0.5  # never more than half the step
    assert backtrack_fraction(1.0, -0.5, 2.0) is None  # not a descent direction
    assert backtrack_fraction(-1.0, 0.1, 2.0) is None  # the model expected no decrease
    assert backtrack_fraction(-1.0, -0.5, math.inf) is None
    assert backtrack_fraction(-1.0, -0.5, math.nan) is None


def _record_proposals(monkeypatch) -> list:
    """Every (update, info) the quadratic model proposes from now on, in order."""
    from natgrad.optim.control import QuadraticControl

    proposals, original = [], QuadraticControl.updates

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        proposals.append(result)
        return result

    monkeypatch.setattr(QuadraticControl, "updates", spy)
    return proposals


def test_a_failed_step_is_retried_at_the_parabola_minimum(monkeypatch):
    """ρ < 0 on the step's batch: the optimizer applies t·δ with t = backtrack_fraction(...)
    if ρ at tδ is ≥ 0, counts it, and keeps tδ as the momentum direction."""
    from natgrad.optim.control import QuadraticControl

    x, y = _digits(64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    before = [p.detach().clone() for p in model.parameters()]
    ratios, proposals = [], _record_proposals(monkeypatch)
    original_ratio = QuadraticControl.reduction_ratio

    def first_fails(self, fmodel, records, predicted, penalty_change=0.0):
        rho = original_ratio(self, fmodel, records, predicted, penalty_change)
        ratios.append(predicted)
        return -3.0 if len(ratios) == 1 else rho

    monkeypatch.setattr(QuadraticControl, "reduction_ratio", first_fails)
    opt = natgrad.KFAC(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state = opt.state["natgrad"]
    assert len(ratios) == 2 and state["backtracked_steps"] == 1
    assert state.get("rejected_steps", 0) == 0
    (update, info), = proposals
    predicted, slope = info["predicted_change"], info["slope"]
    pairs = zip(model.parameters(), update, strict=True)
    grad_dot = sum(float((p.grad * d).sum()) for p, d in pairs)
    assert slope == pytest.approx(grad_dot, rel=1e-4)  # ∇Jᵀδ
    t = backtrack_fraction(slope, predicted, -3.0 * predicted)
    assert 0.05 <= t <= 0.5
    for p0, p, delta in zip(before, model.parameters(), update, strict=True):
        assert torch.allclose(p.detach() - p0, t * delta, rtol=1e-4, atol=1e-7)
        assert torch.allclose(opt.state[p]["previous_update"], t * delta, rtol=1e-6)
    assert ratios[1] == pytest.approx(t * slope + t * t * (predicted - slope), rel=1e-12)


def test_a_failed_retry_is_retried_from_its_own_parabola(monkeypatch):
    """ρ < 0 at δ and at t₁δ: the next try is at t₂ = backtrack_fraction of the parabola
    through J(θ), the slope and the change measured at t₁δ (all scaled to t₁δ), so the step
    taken is t₁t₂δ; after ``backtracks`` failed tries the step is rejected, with exactly
    1 + ``backtracks`` evaluations of the batch's loss."""
    from natgrad.optim.control import QuadraticControl

    x, y = _digits(64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    before = [p.detach().clone() for p in model.parameters()]
    given, predictions, proposals = [-3.0, -2.0, 0.5], [], _record_proposals(monkeypatch)

    def scripted(self, fmodel, batch, predicted, penalty_change=0.0):
        predictions.append(predicted)
        return given.pop(0)

    monkeypatch.setattr(QuadraticControl, "reduction_ratio", scripted)
    opt = natgrad.KFAC(model)
    assert opt.auto.backtracks == 3
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state = opt.state["natgrad"]
    assert not given and state["backtracked_steps"] == 1
    (update, info), = proposals
    predicted, slope = info["predicted_change"], info["slope"]
    t1 = backtrack_fraction(slope, predicted, -3.0 * predicted)
    at_1 = t1 * slope + t1 * t1 * (predicted - slope)
    t2 = backtrack_fraction(t1 * slope, at_1, -2.0 * at_1)
    at_2 = t2 * t1 * slope + t2 * t2 * (at_1 - t1 * slope)
    assert predictions == pytest.approx([predicted, at_1, at_2], rel=1e-12)
    for p0, p, delta in zip(before, model.parameters(), update, strict=True):
        assert torch.allclose(p.detach() - p0, t1 * t2 * delta, rtol=1e-4, atol=1e-7)

    given.extend([-3.0] * 4)  # the step and its three tries fail: rejected
    kept = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not given and state["rejected_steps"] == 1 and len(predictions) == 3 + 4
    assert all(torch.equal(a, b) for a, b in zip(kept, model.parameters(), strict=True))


@pytest.mark.parametrize("initial", [1e-2, 900.0])
def test_a_second_rejection_in_a_row_doubles_the_damping(monkeypatch, initial):
    """ρ < 0 at δ and at tδ on every step: parameters unchanged; the first rejection raises λ
    by Levenberg–Marquardt's 1/ω alone, the next ones by 2/ω (up to max_damping); a step
    whose loss went down resets the count."""
    from natgrad.optim.control import QuadraticControl

    x, y = _digits(64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    before = [p.detach().clone() for p in model.parameters()]
    rho = [-3.0]
    monkeypatch.setattr(QuadraticControl, "reduction_ratio", lambda *args, **kwargs: rho[0])
    opt = natgrad.KFAC(model, initial_damping=initial)
    settings, state = opt.auto, opt.state["natgrad"]

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def raised(damping: float) -> float:
        return lm_update(damping, rho[0], settings.omega, settings.min_damping,
                         settings.max_damping)

    step()
    assert state["rejected_steps"] == 1 and state.get("backtracked_steps", 0) == 0
    assert state["failed_in_a_row"] == 1
    assert all(torch.equal(p0, p) for p0, p in zip(before, model.parameters(), strict=True))
    first = raised(initial)
    assert state["damping"] == pytest.approx(first, rel=1e-12)
    step()
    assert state["rejected_steps"] == 2 and state["failed_in_a_row"] == 2
    second = min(settings.reject_factor * raised(first), settings.max_damping)
    assert settings.reject_factor == 2.0
    assert state["damping"] == pytest.approx(second, rel=1e-12)
    rho[0] = 0.5  # accepted, λ unchanged by LM
    step()
    assert state["rejected_steps"] == 2 and state["failed_in_a_row"] == 0
    assert state["damping"] == pytest.approx(second, rel=1e-12)
    rho[0] = -3.0  # a lone rejection again: 1/ω only
    step()
    assert state["damping"] == pytest.approx(raised(second), rel=1e-12)


def test_a_second_backtrack_in_a_row_doubles_the_damping(monkeypatch):
    """The loss of the batch went up (ρ < 0) on consecutive steps whose backtracked step is
    then taken (ρ ≥ 0 at tδ): the first raises λ by 1/ω alone, the next ones by 2/ω, as
    rejections do; a step whose loss went down resets the count (a word-level GPT-2 starts
    with such steps one after another: with 1/ω alone λ crept up 5 % a step)."""
    from natgrad.optim.control import QuadraticControl

    x, y = _digits(64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    ratios = []  # ρ of each evaluation: at δ, then at tδ when it backtracks
    monkeypatch.setattr(QuadraticControl, "reduction_ratio",
                        lambda *args, **kwargs: ratios.pop(0))
    opt = natgrad.KFAC(model, initial_damping=1e-2)
    settings, state = opt.auto, opt.state["natgrad"]

    def step(*rhos: float) -> None:
        ratios.extend(rhos)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert not ratios  # every ρ given was used

    def raised(damping: float, rho: float = -3.0) -> float:
        return lm_update(damping, rho, settings.omega, settings.min_damping,
                         settings.max_damping)

    step(-3.0, 0.5)
    assert state["backtracked_steps"] == 1 and state["failed_in_a_row"] == 1
    first = raised(1e-2)
    assert state["damping"] == pytest.approx(first, rel=1e-12)
    step(-3.0, 0.5)
    assert state["backtracked_steps"] == 2 and state["failed_in_a_row"] == 2
    second = settings.reject_factor * raised(first)
    assert state["damping"] == pytest.approx(second, rel=1e-12)
    step(-3.0, -1.0, -1.0, -1.0)  # every try failed: rejected after a backtrack, doubled
    assert state["rejected_steps"] == 1 and state["failed_in_a_row"] == 3
    third = settings.reject_factor * raised(second)
    assert state["damping"] == pytest.approx(third, rel=1e-12)
    step(0.5)
    assert state["failed_in_a_row"] == 0
    assert state["damping"] == pytest.approx(raised(third, 0.5), rel=1e-12)


@pytest.mark.parametrize("chunk", [1 << 24, 10, 1])
def test_parameter_gram_equals_the_pairwise_dot_products(monkeypatch, chunk):
    """[⟨vᵢ, vⱼ⟩] over parameters of mixed shapes, flattened in one run or in runs of at most
    ``chunk`` values (a parameter larger than a run is a run of its own)."""
    monkeypatch.setattr(control, "GRAM_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), (2, 2, 3), (5,)]
    vectors = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
               for _ in range(3)]
    expected = torch.tensor([[sum(float((a * b).sum()) for a, b in zip(u, w, strict=True))
                              for w in vectors] for u in vectors], dtype=torch.float64)
    assert rel_err(control._parameter_gram(vectors), expected) <= 1e-12
