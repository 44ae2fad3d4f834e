"""The KFAC optimizer's update, clipping, schedules and dtypes against independent formulas.

References: Kronecker factors from per-sample autograd loops (tests/conftest.py), damped
inverses by ``torch.linalg.solve``, the Fisher quadratic by an explicit ``torch.kron``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import natgrad
from conftest import (
    DTYPE,
    FLOAT32_RTOL,
    KL_CLIP_SLACK,
    LIKELIHOODS,
    RTOL_EXACT,
    RTOL_STEP,
    brute_force_fisher,
    brute_force_kfac,
    grad_matrix,
    kron_full,
    kronecker_layers,
    make_embedding_model,
    make_inputs,
    make_model,
    make_targets,
    make_tokens,
    mean_nll,
    rel_err,
)

pytestmark = pytest.mark.usefixtures("single_thread")

DAMPING = 1e-2


def problem(arch: str, likelihood: str = "categorical", seed: int = 1):
    if arch == "embed":
        model, inputs = make_embedding_model(), make_tokens(seed=seed)
    else:
        model, inputs = make_model(arch), make_inputs(arch, seed=seed)
    with torch.no_grad():
        targets = make_targets(likelihood, model(inputs))
    return model, inputs, targets


def settings(likelihood="categorical", **options):
    """Plain one-batch K-FAC: lr=1, no momentum, no clipping, this batch's empirical factors."""
    base = dict(
        lr=1.0, damping=DAMPING, momentum=0.0, kl_clip=None, kind="empirical", stat_decay=0.0,
        inv_every=1, stat_every=1, likelihood=likelihood,
    )
    base.update(options)
    return base


def train_step(opt, model, inputs, targets, likelihood="categorical"):
    opt.zero_grad()
    loss = mean_nll(likelihood, model(inputs), targets)
    loss.backward()
    opt.step()
    return loss


def layer_changes(before: nn.Module, after: nn.Module) -> dict[str, torch.Tensor]:
    """θ_after − θ_before of every Kronecker layer in natgrad's X layout."""
    out = {}
    for name, module in kronecker_layers(before).items():
        new = after.get_submodule(name)
        diffs = {
            p: q.detach() - p.detach()
            for p, q in zip(module.parameters(), new.parameters(), strict=True)
        }
        out[name] = grad_matrix(module, diffs)
    return out


def layer_grads(model: nn.Module, inputs, targets, likelihood="categorical"):
    """X of every Kronecker layer for the batch-mean negative log-likelihood (autograd)."""
    model.zero_grad()
    mean_nll(likelihood, model(inputs), targets).backward()
    grads = {
        name: grad_matrix(m, {p: p.grad.clone() for p in m.parameters()})
        for name, m in kronecker_layers(model).items()
    }
    model.zero_grad()
    return grads


def expected_direction(A: torch.Tensor, G: torch.Tensor, X: torch.Tensor, damping: float):
    """(G + √λ/π I)⁻¹ X (A + π√λ I)⁻¹ with π = √((tr A/dim A)/(tr G/dim G)), by solves."""
    if A.dim() == 1:
        A = torch.diag(A)
    pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
    root = math.sqrt(damping)
    eye_a, eye_g = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(G.shape[0], dtype=G.dtype)
    left = torch.linalg.solve(G + root / pi * eye_g, X)
    return torch.linalg.solve(A + pi * root * eye_a, left.T).T  # A is symmetric


# --- the update -----------------------------------------------------------------------------
CASES = [("mlp", lik) for lik in LIKELIHOODS] + [
    (arch, "categorical") for arch in ("mlp_nobias", "cnn", "seq", "embed")
]


@pytest.mark.parametrize(("arch", "likelihood"), CASES)
def test_one_step_is_damped_kronecker_solve(arch, likelihood):
    model, inputs, targets = problem(arch, likelihood)
    before = copy.deepcopy(model)
    factors = brute_force_kfac(before, inputs, likelihood, "empirical", targets)
    grads = layer_grads(before, inputs, targets, likelihood)
    opt = natgrad.KFAC(model, **settings(likelihood))
    train_step(opt, model, inputs, targets, likelihood)
    changes = layer_changes(before, model)
    for name, (A, G) in factors.items():
        state = opt.state[model.get_submodule(name).weight]
        a_state = state["input_cov"]
        assert rel_err(a_state, A.diagonal() if a_state.dim() == 1 else A) <= RTOL_EXACT, name
        assert rel_err(state["grad_cov"], G) <= RTOL_EXACT, name
        expected = -expected_direction(A, G, grads[name], DAMPING)
        assert rel_err(changes[name], expected) <= RTOL_STEP, name


def test_first_step_with_momentum_equals_plain_step():
    """The momentum buffer starts at Δ, so the first step is −lr Δ whatever μ is."""
    model, inputs, targets = problem("mlp")
    plain, heavy = copy.deepcopy(model), copy.deepcopy(model)
    train_step(natgrad.KFAC(plain, **settings()), plain, inputs, targets)
    train_step(natgrad.KFAC(heavy, **settings(momentum=0.9)), heavy, inputs, targets)
    for p, q in zip(plain.parameters(), heavy.parameters(), strict=True):
        assert torch.equal(p, q)


def test_decoupled_weight_decay_shrinks_before_the_step():
    model, inputs, targets = problem("mlp")
    plain, decayed = copy.deepcopy(model), copy.deepcopy(model)
    lr, wd = 0.5, 0.1
    train_step(natgrad.KFAC(plain, **settings(lr=lr)), plain, inputs, targets)
    opt = natgrad.KFAC(decayed, **settings(lr=lr, weight_decay=wd, decoupled_weight_decay=True))
    train_step(opt, decayed, inputs, targets)
    for p0, p, q in zip(model.parameters(), plain.parameters(), decayed.parameters(), strict=True):
        assert rel_err(q - p, -lr * wd * p0) <= RTOL_STEP


# --- automatic step size ---------------------------------------------------------------------
def flat_change(before: nn.Module, after: nn.Module) -> torch.Tensor:
    return torch.cat([(q.detach() - p.detach()).reshape(-1)
                      for p, q in zip(before.parameters(), after.parameters(), strict=True)])


@pytest.mark.parametrize("opt_type", [natgrad.KFAC, natgrad.EKFAC])
def test_auto_lr_minimises_the_exact_quadratic_model(opt_type):
    """lr="auto", no momentum: the step −αΔ minimises M(−αΔ) = −α gᵀΔ + ½α² Δᵀ(F + λI)Δ
    with F the exact batch Fisher, so α = gᵀΔ / Δᵀ(F + λI)Δ; Δ is the fixed-lr=1 step."""
    model, inputs, targets = problem("mlp")
    fixed, auto = copy.deepcopy(model), copy.deepcopy(model)
    train_step(opt_type(fixed, **settings()), fixed, inputs, targets)
    opt = opt_type(auto, **settings(lr="auto"))
    train_step(opt, auto, inputs, targets)
    direction = -flat_change(model, fixed)  # Δ
    fisher = brute_force_fisher(model, inputs, "categorical")
    g = torch.cat([p.grad.reshape(-1) for p in auto.parameters()])
    curvature = direction @ fisher @ direction + DAMPING * direction @ direction
    alpha = float(g @ direction / curvature)
    assert opt.state["natgrad"]["lr"] == pytest.approx(alpha, rel=RTOL_STEP)
    assert rel_err(flat_change(model, auto), -alpha * direction) <= RTOL_STEP


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_auto_lr_curvature_on_a_row_subset(rows):
    """curvature_rows=k: the quadratic model's Fisher term is the exact Fisher of every
    (N // k)-th row of the batch (their mean), the gradient term stays the full batch's."""
    model, inputs, targets = problem("mlp")
    fixed, auto = copy.deepcopy(model), copy.deepcopy(model)
    train_step(natgrad.KFAC(fixed, **settings()), fixed, inputs, targets)
    opt = natgrad.KFAC(auto, **settings(lr="auto", curvature_rows=rows))
    train_step(opt, auto, inputs, targets)
    direction = -flat_change(model, fixed)
    stride = max(1, inputs.shape[0] // rows)
    fisher = brute_force_fisher(model, inputs[::stride], "categorical")
    g = torch.cat([p.grad.reshape(-1) for p in auto.parameters()])
    alpha = float(g @ direction / (direction @ fisher @ direction
                                   + DAMPING * direction @ direction))
    assert opt.state["natgrad"]["lr"] == pytest.approx(alpha, rel=RTOL_STEP)


def _count_products(monkeypatch) -> list[int]:
    """The number of tangents of each step's Jacobian-vector products, recorded."""
    from natgrad.optim import control

    tangents, original = [], control._jvps

    def count(fmodel, records, inputs, given, stride=1):
        tangents.append(len(given))
        return original(fmodel, records, inputs, given, stride)

    monkeypatch.setattr(control, "_jvps", count)
    return tangents


def _until_a_ratio_is_kept(opt, model, inputs, targets, steps=12):
    for _ in range(steps):
        train_step(opt, model, inputs, targets)
        if opt.state["natgrad"].get("momentum_ratio") is not None:
            return
    raise AssertionError("no fit with a, m > 0 in the first steps")


def test_kept_momentum_ratio_fits_the_step_length_along_d_plus_r_delta0(monkeypatch):
    """lr and momentum "auto": a step that fits (a, m) with a, m > 0 (two Jacobian-vector
    products) keeps r = m/a; the next steps until a multiple of ``momentum_every`` move
    along u = d + r·δ₀, d = −Δ, with a = −gᵀu / uᵀ(F + λI)u for the exact batch Fisher F
    (one product); a fit whose m ≤ 0 keeps none."""
    from natgrad.optim import step

    model, inputs, targets = problem("mlp")
    opt = natgrad.KFAC(model, **settings(lr="auto", momentum="auto", momentum_every=1000))
    tangents = _count_products(monkeypatch)
    directions = []
    original_decide = step.decide

    def spy(ctrl, problem):
        directions.append([d.clone() for d in problem.directions])
        return original_decide(ctrl, problem)

    monkeypatch.setattr("natgrad.optim.base.decide", spy)
    _until_a_ratio_is_kept(opt, model, inputs, targets)
    state = opt.state["natgrad"]
    fits = len(tangents)
    assert tangents == [1] + [2] * (fits - 1)  # no δ₀ on the first step; then both fitted
    ratio = state["momentum_ratio"]
    assert state["momentum"] > 0 and state["lr"] > 0
    assert ratio == pytest.approx(state["momentum"] / state["lr"], rel=1e-12)
    before = copy.deepcopy(model)
    previous = torch.cat([opt.state[p]["previous_update"].reshape(-1)
                          for p in model.parameters()])
    train_step(opt, model, inputs, targets)
    assert tangents[fits:] == [1] and state["momentum_ratio"] == ratio  # kept, not refitted
    delta = torch.cat([d.reshape(-1) for d in directions[-1]])
    u = -delta + ratio * previous
    fisher = brute_force_fisher(before, inputs, "categorical")
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    a = float(-(g @ u) / (u @ fisher @ u + DAMPING * u @ u))
    assert state["lr"] == pytest.approx(a, rel=RTOL_STEP)
    assert state["momentum"] == pytest.approx(a * ratio, rel=RTOL_STEP)
    assert rel_err(flat_change(before, model), a * u) <= RTOL_STEP


def test_momentum_every_refits_on_its_multiples(monkeypatch):
    """With momentum_every=k a kept ratio lasts until the next step that is a multiple of
    k, which fits both coefficients again; momentum_every=1 fits them on every step."""
    model, inputs, targets = problem("mlp")
    opt = natgrad.KFAC(model, **settings(lr="auto", momentum="auto", momentum_every=3))
    tangents = _count_products(monkeypatch)
    _until_a_ratio_is_kept(opt, model, inputs, targets)
    for _ in range(6):
        step = opt.state["natgrad"]["step"]
        kept = opt.state["natgrad"].get("momentum_ratio") is not None
        train_step(opt, model, inputs, targets)
        assert tangents[-1] == (2 if step % 3 == 0 or not kept else 1), step
    every = natgrad.KFAC(copy.deepcopy(model), **settings(lr="auto", momentum="auto",
                                                          momentum_every=1))
    del tangents[:]
    for _ in range(4):
        train_step(every, every.model, inputs, targets)
    assert tangents == [1, 2, 2, 2]


def test_a_rejected_step_forgets_the_kept_momentum_ratio(monkeypatch):
    """After a rejected step the momentum restarts: the kept ratio goes with it, the next
    step has no δ₀ (one product) and the one after fits both coefficients (two), although
    momentum_every=1000 would keep a ratio."""
    from natgrad.optim.control import QuadraticControl

    model, inputs, targets = problem("mlp")
    opt = natgrad.KFAC(model, **settings(lr="auto", momentum="auto", damping="auto",
                                         momentum_every=1000))
    _until_a_ratio_is_kept(opt, model, inputs, targets)
    state = opt.state["natgrad"]
    with monkeypatch.context() as patch:
        patch.setattr(QuadraticControl, "reduction_ratio", lambda *args, **kwargs: -3.0)
        train_step(opt, model, inputs, targets)
    assert state["rejected_steps"] == 1 and "momentum_ratio" not in state
    tangents = _count_products(monkeypatch)
    for _ in range(2):
        train_step(opt, model, inputs, targets)
    assert tangents == [1, 2] and state.get("rejected_steps") == 1


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
def test_momentum_every_is_validated(bad):
    model, _, _ = problem("mlp")
    with pytest.raises((ValueError, TypeError), match="momentum_every"):
        natgrad.KFAC(model, momentum_every=bad)


def test_a_step_that_raises_its_batch_loss_is_rejected():
    """damping="auto": a step whose batch loss goes up (ρ < 0; here a fixed lr far too
    large) leaves the parameters unchanged, is counted, raises λ and forgets the momentum
    direction; the next steps go on from there."""
    model, inputs, targets = problem("mlp")
    trained = copy.deepcopy(model)
    opt = natgrad.KFAC(trained, **settings(lr=1e4, damping="auto", lm_every=1,
                                            initial_damping=DAMPING))
    train_step(opt, trained, inputs, targets)
    state = opt.state["natgrad"]
    assert state["rejected_steps"] == 1 and state["step"] == 1 and state["rho"] < 0
    assert state["damping"] == pytest.approx(DAMPING / 0.95, rel=RTOL_EXACT)
    for p, q in zip(model.parameters(), trained.parameters(), strict=True):
        assert torch.equal(p, q)
        assert "previous_update" not in opt.state[q]
        # the rejected step's statistics and inverses were not kept either
        assert not {"input_cov", "grad_cov", "input_inv", "grad_inv"} & set(opt.state[q])
    sane = copy.deepcopy(model)
    opt = natgrad.KFAC(sane, **settings(lr="auto", damping="auto", lm_every=1))
    for _ in range(3):
        train_step(opt, sane, inputs, targets)
    assert opt.state["natgrad"].get("rejected_steps", 0) == 0


def test_auto_damping_follows_the_reduction_ratio():
    """damping="auto" (lm_every=1): ρ = (J(θ+δ) − J(θ)) / M₀(δ) on the step's batch, with
    M₀(δ) = ∇Jᵀδ + ½ δᵀFδ the undamped quadratic model (exact batch Fisher), and
    λ ← λ·ω if ρ > ¾, λ/ω if ρ < ¼ (ω = 0.95^lm_every), from initial_damping."""
    model, inputs, targets = problem("mlp")
    after = copy.deepcopy(model)
    opt = natgrad.KFAC(after, **settings(lr="auto", damping="auto", lm_every=1,
                                          initial_damping=DAMPING))
    train_step(opt, after, inputs, targets)
    step = flat_change(model, after)
    fisher = brute_force_fisher(model, inputs, "categorical")
    g = torch.cat([p.grad.reshape(-1) for p in after.parameters()])
    predicted = float(g @ step + 0.5 * step @ fisher @ step)
    with torch.no_grad():
        change = float(mean_nll("categorical", after(inputs), targets)
                       - mean_nll("categorical", model(inputs), targets))
    rho = change / predicted
    state = opt.state["natgrad"]
    assert state["rho"] == pytest.approx(rho, rel=1e-8)
    omega = 0.95
    expected = DAMPING * omega if rho > 0.75 else DAMPING / omega if rho < 0.25 else DAMPING
    assert state["damping"] == pytest.approx(expected, rel=RTOL_EXACT)


# --- KL clipping ----------------------------------------------------------------------------
def block_quadratic(opt, model, changes) -> float:
    """Σ_blocks vec(D)ᵀ F̂ vec(D) for the applied change D, F̂ = G ⊗ A (KFAC) or
    Q diag(s) Qᵀ (EKFAC), by explicit Kronecker products."""
    total = 0.0
    for name, change in changes.items():
        state = opt.state[model.get_submodule(name).weight]
        if "scaling" in state:
            q_in = state["eigvecs_in"]
            q_in = torch.eye(state["input_cov"].shape[0], dtype=DTYPE) if q_in is None else q_in
            q = torch.kron(state["eigvecs_out"].contiguous(), q_in.contiguous())
            block = q @ torch.diag(state["scaling"].reshape(-1)) @ q.T
        else:
            block = kron_full(state["grad_cov"], state["input_cov"])
        v = change.reshape(-1)
        total += float(v @ block @ v)
    return total


@pytest.mark.parametrize("opt_type", [natgrad.KFAC, natgrad.EKFAC])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_kl_clip_bounds_the_applied_step(arch, opt_type):
    """ν = min(1, √(kl_clip / (lr² vᵀF̂v))) makes the applied step's lr²vᵀF̂v = kl_clip when
    active; with a huge bound nothing changes."""
    model, inputs, targets = problem(arch)
    kl_clip, lr = 1e-6, 0.5
    runs = {}
    for clip in (kl_clip, 1e6, None):
        copy_ = copy.deepcopy(model)
        opt = opt_type(copy_, **settings(lr=lr, kl_clip=clip))
        train_step(opt, copy_, inputs, targets)
        runs[clip] = (opt, copy_, layer_changes(model, copy_))
    opt, clipped, changes = runs[kl_clip]
    quadratic = block_quadratic(opt, clipped, changes)  # the change already carries lr
    assert quadratic <= kl_clip * (1 + KL_CLIP_SLACK)
    assert quadratic >= kl_clip * (1 - KL_CLIP_SLACK)  # active here (the step was large)
    unclipped = runs[None][2]
    nu = math.sqrt(kl_clip / block_quadratic(runs[None][0], runs[None][1], unclipped))
    assert nu < 1
    for name, change in changes.items():
        assert rel_err(change, nu * unclipped[name]) <= RTOL_STEP
        assert torch.equal(runs[1e6][2][name], unclipped[name])


# --- inverse method and dtypes --------------------------------------------------------------
def test_eigh_and_cholesky_give_the_same_updates():
    model, inputs, targets = problem("cnn")
    ends = {}
    for method in ("cholesky", "eigh"):
        copy_ = copy.deepcopy(model)
        opt = natgrad.KFAC(
            copy_, lr=0.3, damping=DAMPING, momentum=0.5, kind="mc", inverse_method=method,
            inv_every=2, stat_every=1, kl_clip=1e-2, seed=3,
        )
        for _ in range(3):
            train_step(opt, copy_, inputs, targets)
        ends[method] = layer_changes(model, copy_)
    for name, change in ends["cholesky"].items():
        assert rel_err(ends["eigh"][name], change) <= RTOL_STEP, name


def float32_problem():
    model, inputs, targets = problem("mlp")
    return model.float(), inputs.float(), targets


@pytest.mark.parametrize("opt_type", [natgrad.KFAC, natgrad.EKFAC])
@pytest.mark.parametrize(
    ("factor_dtype", "inverse_dtype", "want_factor", "want_inverse"),
    [
        (None, None, torch.float32, torch.float32),
        (torch.float64, None, torch.float64, torch.float64),
        (torch.float64, torch.float32, torch.float64, torch.float32),
    ],
)
def test_factor_and_inverse_dtypes_are_honoured(
    opt_type, factor_dtype, inverse_dtype, want_factor, want_inverse
):
    model, inputs, targets = float32_problem()
    reference = copy.deepcopy(model).double()
    opt = opt_type(
        model, **settings(factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)
    )
    train_step(opt, model, inputs, targets)
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all())
               for p in model.parameters())
    state = opt.state[model[0].weight]
    assert state["input_cov"].dtype == want_factor and state["grad_cov"].dtype == want_factor
    inverse_keys = ("eigvecs_in", "eigvecs_out") if opt_type is natgrad.EKFAC else (
        "input_inv", "grad_inv")
    for key in inverse_keys:
        assert state[key].dtype == want_inverse, key
    # layer 0 sees the (float32-exact) inputs: float64 factors are float64-accurate
    A = brute_force_kfac(reference, inputs.double(), "categorical", "empirical", targets)["0"][0]
    err = rel_err(state["input_cov"].double(), A)
    assert err <= (RTOL_EXACT if want_factor == torch.float64 else FLOAT32_RTOL)


# --- schedules ------------------------------------------------------------------------------
def test_stat_every_and_inv_every_are_respected():
    """stat_every=2, inv_every=3, stat_decay=½: the factors change on steps 0, 2, 4 (EMA of
    those batches), the inverses on steps 0 and 3 (from the factors of that moment)."""
    model = make_model("mlp")
    batches = []
    for k in range(6):
        inputs = make_inputs("mlp", seed=10 + k)
        with torch.no_grad():
            batches.append((inputs, make_targets("categorical", model(inputs), seed=20 + k)))
    opt = natgrad.KFAC(
        model, **settings(lr=0.1, stat_every=2, inv_every=3, stat_decay=0.5, curvature_warmup=0)
    )
    state = opt.state[model[0].weight]
    keys = ("input_cov", "grad_cov", "input_inv", "grad_inv")
    history = []
    for inputs, targets in batches:
        train_step(opt, model, inputs, targets)
        history.append({k: state[k].clone() for k in keys})
    changed = lambda k, s: not torch.equal(history[s][k], history[s - 1][k])  # noqa: E731
    for step in range(1, 6):
        for key in ("input_cov", "grad_cov"):
            assert changed(key, step) == (step % 2 == 0), (key, step)
        for key in ("input_inv", "grad_inv"):
            assert changed(key, step) == (step % 3 == 0), (key, step)
    # layer 0's A depends on the inputs only: EMA of the batch values of steps 0, 2, 4
    batch_a = []
    for inputs, _ in batches:
        rows = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=DTYPE)], dim=1)
        batch_a.append(rows.T @ rows / len(inputs))
    expected = 0.5 * (0.5 * batch_a[0] + 0.5 * batch_a[2]) + 0.5 * batch_a[4]
    assert rel_err(history[5]["input_cov"], expected) <= RTOL_EXACT
    # the inverse refreshed on step 3 uses the factors of step 2 with π-damping
    A, G = history[3]["input_cov"], history[3]["grad_cov"]
    pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
    root = math.sqrt(DAMPING)
    eye = torch.eye(A.shape[0], dtype=DTYPE)
    assert rel_err(history[3]["input_inv"], torch.linalg.inv(A + pi * root * eye)) <= RTOL_EXACT
    eye = torch.eye(G.shape[0], dtype=DTYPE)
    assert rel_err(history[3]["grad_inv"], torch.linalg.inv(G + root / pi * eye)) <= RTOL_EXACT
    assert opt.state["natgrad"]["step"] == 6


@pytest.mark.parametrize("cls", [natgrad.KFAC, natgrad.EKFAC, natgrad.NGDCG])
def test_curvature_warmup_gathers_and_refreshes_every_step_first(cls):
    """curvature_warmup=3, stat_every=4, inv_every=5: statistics on steps 0, 1, 2, 4, 8 and
    refreshes on 0, 1, 2, 5; a plain-gradient step (no statistics yet) never happens."""
    model = make_model("mlp")
    extra = {} if cls is natgrad.NGDCG else {"kl_clip": None}
    opt = cls(model, lr=0.1, damping=DAMPING, momentum=0.0, kind="empirical",
              stat_every=4, inv_every=5, curvature_warmup=3, **extra)
    state = opt.state[model[0].weight]
    inverse = "scaling" if cls is natgrad.EKFAC else "input_inv"
    history = []
    for k in range(9):
        inputs = make_inputs("mlp", seed=60 + k)
        with torch.no_grad():
            targets = make_targets("categorical", model(inputs), seed=70 + k)
        train_step(opt, model, inputs, targets)
        history.append((state["factor_updates"], state["input_cov"].clone(),
                        state[inverse].clone()))
    assert [h[0] for h in history] == [1, 2, 3, 3, 4, 4, 4, 4, 5]
    refreshed = [k for k in range(1, 9) if not torch.equal(history[k][2], history[k - 1][2])]
    # EKFAC's scaling also moves on statistics steps (4, 8)
    assert refreshed == ([1, 2, 4, 5, 8] if cls is natgrad.EKFAC else [1, 2, 5])


def _batch_input_factor(inputs: torch.Tensor) -> torch.Tensor:
    rows = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=DTYPE)], dim=1)
    return rows.T @ rows / len(inputs)


@pytest.mark.filterwarnings("ignore:KFAC. no Kronecker-factored block:RuntimeWarning")
def test_first_statistics_are_averaged_then_decayed():
    """The k-th statistics enter with weight 1/k until 1 − 1/k reaches stat_decay (Martens &
    Grosse 2015, §5), then with 1 − stat_decay: with stat_decay=0.75 the first four batches'
    A is their plain mean, the fifth and sixth are decayed into it. The fallback diagonal
    (empirical: the batch's squared summed gradient over N) is averaged the same way."""
    model = make_model("mlp")
    opt = natgrad.KFAC(model, **settings(lr=0.01, stat_decay=0.75, max_factor_size=5))
    state = opt.state[model[0].weight]
    last = model[-1].weight  # 3 × 5 plus a bias: its block (side 6) takes the diagonal
    history, diagonals = [], []
    for k in range(6):
        inputs = make_inputs("mlp", seed=30 + k)
        with torch.no_grad():
            targets = make_targets("categorical", model(inputs), seed=40 + k)
        history.append(_batch_input_factor(inputs))
        train_step(opt, model, inputs, targets)
        n = len(inputs)
        diagonals.append((last.grad * n).square() / n)  # the gradient before the step
        expected_a = torch.stack(history[:min(k + 1, 4)]).mean(0)
        for later in history[4:k + 1]:
            expected_a = 0.75 * expected_a + 0.25 * later
        assert rel_err(state["input_cov"], expected_a) <= RTOL_EXACT, k
        assert state["factor_updates"] == k + 1
        expected_d = torch.stack(diagonals[:min(k + 1, 4)]).mean(0)
        for later in diagonals[4:k + 1]:
            expected_d = 0.75 * expected_d + 0.25 * later
        assert rel_err(opt.state[last]["fisher_diag"], expected_d) <= RTOL_EXACT, k


def test_statistics_saved_without_a_count_keep_stat_decay():
    """State written before the averages were counted (no ``factor_updates``) is a mature
    average: the next statistics are decayed in with stat_decay, not averaged."""
    model = make_model("mlp")
    opt = natgrad.KFAC(model, **settings(lr=0.01, stat_decay=0.75))
    inputs = make_inputs("mlp", seed=50)
    with torch.no_grad():
        targets = make_targets("categorical", model(inputs), seed=51)
    train_step(opt, model, inputs, targets)
    saved = opt.state_dict()
    for entry in saved["state"].values():
        entry.pop("factor_updates", None)
    opt.load_state_dict(saved)
    state = opt.state[model[0].weight]
    before = state["input_cov"].clone()
    inputs = make_inputs("mlp", seed=52)
    with torch.no_grad():
        targets = make_targets("categorical", model(inputs), seed=53)
    train_step(opt, model, inputs, targets)
    expected = 0.75 * before + 0.25 * _batch_input_factor(inputs)
    assert rel_err(state["input_cov"], expected) <= RTOL_EXACT
    assert "factor_updates" not in state


@pytest.mark.parametrize("kind", ["mc", "empirical"])
def test_gradient_accumulation_over_two_micro_batches(kind):
    """Two forwards and backwards, one step: A is the full batch's A. With each micro-batch's
    loss its own batch-mean NLL divided by the number of micro-batches (the documented
    gradient-accumulation recipe), the empirical G is exact too."""
    model, inputs, targets = problem("mlp")
    reference = brute_force_kfac(copy.deepcopy(model), inputs, "categorical", "empirical",
                                 targets)
    opt = natgrad.KFAC(model, **settings(kind=kind))
    opt.zero_grad()
    for part in (slice(0, 2), slice(2, 6)):  # unequal micro-batches
        (mean_nll("categorical", model(inputs[part]), targets[part]) / 2).backward()
    opt.step()
    for name, (A, G) in reference.items():
        state = opt.state[model.get_submodule(name).weight]
        assert rel_err(state["input_cov"], A) <= RTOL_EXACT, name
        if kind == "empirical":
            assert rel_err(state["grad_cov"], G) <= RTOL_EXACT, name


# --- which parameters -----------------------------------------------------------------------
def test_params_subset_of_whole_layers():
    """Only layer 2 is optimised: it alone gets a block, layer 0 does not move."""
    model, inputs, targets = problem("mlp")
    before = copy.deepcopy(model)
    factors = brute_force_kfac(before, inputs, "categorical", "empirical", targets)
    grads = layer_grads(before, inputs, targets)
    opt = natgrad.KFAC(model, model[2].parameters(), **settings())
    train_step(opt, model, inputs, targets)
    assert list(opt.blocks) == ["2"]
    changes = layer_changes(before, model)
    assert torch.equal(changes["0"], torch.zeros_like(changes["0"]))
    expected = -expected_direction(*factors["2"], grads["2"], DAMPING)
    assert rel_err(changes["2"], expected) <= RTOL_STEP


def test_layer_with_only_its_weight_in_params_is_not_silently_unpreconditioned():
    """params holds a layer's weight but not its bias. Whatever the library chooses (a block
    on the weight alone, or the fallback), it must not silently fall back to a plain
    gradient step for a layer it reports as having a K-FAC block."""
    model, inputs, targets = problem("mlp")
    params = [model[0].weight, model[2].weight, model[2].bias]
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        opt = natgrad.KFAC(model, params, **settings(lr=0.5))
        weight = model[0].weight.detach().clone()
        opt.zero_grad()
        mean_nll("categorical", model(inputs), targets).backward()
        grad = model[0].weight.grad.clone()
        opt.step()
    plain = rel_err(model[0].weight.detach() - weight, -0.5 * grad) <= RTOL_STEP
    assert not plain, f"layer 0 took a plain gradient step (blocks: {list(opt.blocks)})"
    # natgrad's choice: the fallback (a block needs all its parameters), named in one warning
    messages = [str(r.message) for r in records if issubclass(r.category, RuntimeWarning)]
    assert messages == [
        "KFAC: no Kronecker-factored block for these modules; their parameters get a "
        "diagonal-Fisher update instead: 0 (Linear with only some of its parameters in the "
        "optimizer)"
    ]


# --- argument validation --------------------------------------------------------------------
INVALID = [
    (dict(lr=0.0), ValueError, "lr"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(damping=0.0), ValueError, "damping"),
    (dict(damping=float("nan")), ValueError, "damping"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(stat_every=0), ValueError, "stat_every"),
    (dict(inv_every=0), ValueError, "inv_every"),
    (dict(inv_every=1.5), ValueError, "inv_every"),
    (dict(stat_decay=1.0), ValueError, "stat_decay"),
    (dict(curvature_warmup=-1), ValueError, "curvature_warmup"),
    (dict(curvature_warmup=2.0), ValueError, "curvature_warmup"),
    (dict(curvature_warmup=True), ValueError, "curvature_warmup"),
    (dict(kl_clip=0.0), ValueError, "kl_clip"),
    (dict(mc_samples=0), ValueError, "mc_samples"),
    (dict(kind="bogus"), ValueError, "kind"),
    (dict(likelihood="bogus"), ValueError, "likelihood"),
    (dict(inverse_method="x"), ValueError, "inverse_method"),
    (dict(factor_dtype=int), TypeError, "factor_dtype"),
    (dict(inverse_dtype=torch.int64), TypeError, "inverse_dtype"),
    (dict(lr="fast"), ValueError, "lr"),
    (dict(lm_every=0), ValueError, "lm_every"),
    (dict(min_damping=0.0), ValueError, "min_damping"),
    (dict(initial_damping=-1.0), ValueError, "initial_damping"),
]


@pytest.mark.parametrize("opt_type", [natgrad.KFAC, natgrad.EKFAC])
@pytest.mark.parametrize(("kwargs", "error", "name"), INVALID, ids=[c[2] for c in INVALID])
def test_invalid_arguments_name_the_argument(opt_type, kwargs, error, name):
    with pytest.raises(error, match=name):
        opt_type(make_model("mlp"), **kwargs)


def test_invalid_param_group_settings():
    model = make_model("mlp")
    opt = natgrad.KFAC(model, params=[{"params": model[0].parameters()}])
    with pytest.raises(ValueError, match="damping"):
        opt.add_param_group({"params": model[2].parameters(), "damping": -1.0})
    with pytest.raises(ValueError, match="params"):
        natgrad.KFAC(model, params=[nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("tied", [False, True], ids=["head", "tied-embedding-head"])
def test_a_block_larger_than_max_factor_size_takes_the_diagonal(tied):
    """A language model's head has a V × V factor: above max_factor_size it is not formed
    (it would not fit for V in the tens of thousands); the parameters take the diagonal."""
    torch.manual_seed(0)
    embedding, head = nn.Embedding(40, 6), nn.Linear(6, 40, bias=False)
    if tied:
        head.weight = embedding.weight
    model = nn.Sequential(embedding, nn.Linear(6, 6), nn.Tanh(), head).to(DTYPE)
    tokens = torch.randint(0, 40, (8, 5))
    for limit, fallback in ((32, True), (40, False), (None, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss(), max_factor_size=limit)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        named = any("40×40 curvature factor (max_factor_size=32)" in m for m in messages)
        assert named == fallback, messages
        blocks = opt.preconditioner.blocks
        assert any("3" in name for name in blocks) != fallback  # the head's block
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(tokens).reshape(-1, 40), tokens.reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses)
    with pytest.raises(ValueError, match="max_factor_size"):
        natgrad.KFAC(model, loss=nn.CrossEntropyLoss(), max_factor_size=0)
