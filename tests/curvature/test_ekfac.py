"""EKFAC's eigenbasis and scaling against the exact per-sample Fisher block (brute force).

EKFAC's scaling s is claimed to be the diagonal of the layer's Fisher block in K-FAC's
eigenbasis Q_G ⊗ Q_A. The reference forms the block from per-sample parameter gradients
(autograd, one backward per sample), rotates it with an explicit Kronecker product and reads
its diagonal, a different route from the library's squared projected rows.
"""

from __future__ import annotations

import copy

import pytest
import torch

import natgrad
from conftest import (
    DTYPE,
    LIKELIHOODS,
    MC_FEW,
    MC_MANY,
    MC_MIN_SHRINK,
    MC_RTOL_MANY,
    RTOL_EXACT,
    brute_force_kfac,
    exact_block,
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


def problem(arch: str, likelihood: str):
    if arch == "embed":
        model, inputs = make_embedding_model(), make_tokens()
    else:
        model, inputs = make_model(arch), make_inputs(arch)
    with torch.no_grad():
        targets = make_targets(likelihood, model(inputs))
    return model, inputs, targets


def ekfac_after_one_step(arch, likelihood, **options):
    """(optimizer, copy of the model before the step, inputs, targets): one EKFAC step with
    the statistics of this batch only (stat_decay=0, eigenbasis refreshed on it)."""
    model, inputs, targets = problem(arch, likelihood)
    before = copy.deepcopy(model)
    settings = dict(
        lr=1.0, damping=1e-3, momentum=0.0, kl_clip=None, kind="empirical", stat_decay=0.0,
        inv_every=1, stat_every=1, likelihood=likelihood,
    )
    settings.update(options)
    opt = natgrad.EKFAC(model, **settings)
    opt.zero_grad()
    mean_nll(likelihood, model(inputs), targets).backward()
    opt.step()
    return opt, before, inputs, targets


def eigenbasis(state) -> torch.Tensor:
    """Q = Q_G ⊗ Q_A (Q_A = I for a diagonal input factor)."""
    q_in = state["eigvecs_in"]
    if q_in is None:
        q_in = torch.eye(state["input_cov"].shape[0], dtype=DTYPE)
    # (torch.kron needs contiguous operands; eigh returns column-major eigenvectors)
    return torch.kron(state["eigvecs_out"].contiguous(), q_in.contiguous())


def diagonal_in_basis(block: torch.Tensor, state) -> torch.Tensor:
    q = eigenbasis(state)
    return (q.T @ block @ q).diagonal().reshape(state["scaling"].shape)


ARCH_LIKELIHOODS = [("mlp", likelihood) for likelihood in LIKELIHOODS] + [
    (arch, "categorical") for arch in ("mlp_nobias", "cnn", "seq", "embed")
]


@pytest.mark.parametrize(("arch", "likelihood"), ARCH_LIKELIHOODS)
def test_empirical_scaling_is_diagonal_of_exact_block_in_eigenbasis(arch, likelihood):
    opt, before, inputs, targets = ekfac_after_one_step(arch, likelihood)
    reference = brute_force_kfac(before, inputs, likelihood, "empirical", targets)
    for name, module in kronecker_layers(before).items():
        state = opt.state[opt.model.get_submodule(name).weight]
        a_ref, g_ref = reference[name]
        # the eigenbasis is that of this batch's factors
        q_out = state["eigvecs_out"]
        assert rel_err(q_out.T @ q_out, torch.eye(q_out.shape[0], dtype=DTYPE)) <= RTOL_EXACT
        rotated = q_out.T @ g_ref @ q_out
        assert rel_err(rotated, torch.diag(rotated.diagonal())) <= RTOL_EXACT
        if state["eigvecs_in"] is not None:
            q_in = state["eigvecs_in"]
            rotated = q_in.T @ a_ref @ q_in
            assert rel_err(rotated, torch.diag(rotated.diagonal())) <= RTOL_EXACT
        block = exact_block(before, inputs, likelihood, module, "empirical", targets)
        expected = diagonal_in_basis(block, state)
        assert state["scaling"].shape == expected.shape
        assert rel_err(state["scaling"], expected) <= RTOL_EXACT, name


# (the CNN is left out here only for time: 400 draws × 9 locations; it is in the exact tests)
@pytest.mark.parametrize("arch", ["mlp", "seq"])
def test_true_scaling_converges_to_diagonal_of_exact_block(arch):
    """Sampled labels: s estimates diag(Qᵀ F Q) of the true Fisher block, error ~ 1/√M."""
    errors = {}
    for mc in (MC_FEW, MC_MANY):
        opt, before, inputs, _ = ekfac_after_one_step(
            arch, "categorical", kind="mc", mc_samples=mc, seed=7
        )
        errors[mc] = {}
        for name, module in kronecker_layers(before).items():
            state = opt.state[opt.model.get_submodule(name).weight]
            block = exact_block(before, inputs, "categorical", module, "true")
            errors[mc][name] = rel_err(state["scaling"], diagonal_in_basis(block, state))
    for name, err_many in errors[MC_MANY].items():
        assert err_many <= MC_RTOL_MANY, (name, err_many)
        assert errors[MC_FEW][name] >= MC_MIN_SHRINK * err_many, (name, errors)


@pytest.mark.parametrize(("arch", "likelihood"), ARCH_LIKELIHOODS)
def test_ekfac_error_is_at_most_kfac_error(arch, likelihood):
    """Same eigenbasis, optimal diagonal: ‖Q diag(s) Qᵀ − F‖ ≤ ‖G ⊗ A − F‖ (Frobenius)."""
    opt, before, inputs, targets = ekfac_after_one_step(arch, likelihood)
    for name, module in kronecker_layers(before).items():
        state = opt.state[opt.model.get_submodule(name).weight]
        block = exact_block(before, inputs, likelihood, module, "empirical", targets)
        q = eigenbasis(state)
        ekfac = q @ torch.diag(state["scaling"].reshape(-1)) @ q.T
        kfac = kron_full(state["grad_cov"], state["input_cov"])
        ekfac_err, kfac_err = (ekfac - block).norm(), (kfac - block).norm()
        assert ekfac_err <= kfac_err * (1 + RTOL_EXACT), (name, ekfac_err, kfac_err)


@pytest.mark.parametrize("arch", ["mlp", "embed"])
def test_ekfac_update_is_eigenbasis_rescaling(arch):
    """lr=1, no momentum, no clipping: vec(Δθ) = −Q diag(1/(s+λ)) Qᵀ vec(X)."""
    damping = 1e-2
    opt, before, inputs, targets = ekfac_after_one_step(arch, "categorical", damping=damping)
    before.zero_grad()
    mean_nll("categorical", before(inputs), targets).backward()
    for name, module in kronecker_layers(before).items():
        state = opt.state[opt.model.get_submodule(name).weight]
        q = eigenbasis(state)
        x = grad_matrix(module, {p: p.grad for p in module.parameters()}).reshape(-1)
        expected = -(q @ ((q.T @ x) / (state["scaling"].reshape(-1) + damping)))
        after = opt.model.get_submodule(name)
        change = grad_matrix(
            module,
            {p: a.detach() - p.detach() for p, a in
             zip(module.parameters(), after.parameters(), strict=True)},
        )
        assert rel_err(change.reshape(-1), expected) <= RTOL_EXACT, name


def test_scaling_restarts_from_kfac_eigenvalues_then_averages():
    """stat_decay=0.5: on a refresh s = ½ g⊗a + ½ s_batch; a refresh on a step without
    statistics (stat_every=2) leaves s = g⊗a of the current factors."""
    opt, before, inputs, targets = ekfac_after_one_step(
        "mlp", "categorical", stat_decay=0.5, stat_every=2, curvature_warmup=0
    )
    module, state = before[0], opt.state[opt.model[0].weight]
    kfac_eigs = torch.outer(
        torch.linalg.eigvalsh(state["grad_cov"]), torch.linalg.eigvalsh(state["input_cov"])
    )
    block = exact_block(before, inputs, "categorical", module, "empirical", targets)
    expected = 0.5 * kfac_eigs + 0.5 * diagonal_in_basis(block, state)
    assert rel_err(state["scaling"], expected) <= RTOL_EXACT
    # step 1: no statistics (stat_every=2), but a refresh (inv_every=1)
    factors = {k: state[k].clone() for k in ("input_cov", "grad_cov")}
    opt.zero_grad()
    mean_nll("categorical", opt.model(inputs), targets).backward()
    opt.step()
    assert all(torch.equal(state[k], v) for k, v in factors.items())
    kfac_eigs = torch.outer(
        torch.linalg.eigvalsh(state["grad_cov"]), torch.linalg.eigvalsh(state["input_cov"])
    )
    assert rel_err(state["scaling"], kfac_eigs) <= RTOL_EXACT


def test_ekfac_state_keys():
    opt, *_ = ekfac_after_one_step("mlp", "categorical")
    state = opt.state[opt.model[0].weight]
    assert {"input_cov", "grad_cov", "eigvecs_in", "eigvecs_out", "scaling"} <= set(state)
    assert state["scaling"].shape == (5, 5)  # [d_out, d_in + 1]


@pytest.mark.parametrize("failure", ["nan", "raise"])
def test_eigh_falls_back_to_float64(monkeypatch, failure):
    """float32 eigh can return NaN (seen on MNIST's input factor: zero border pixels) or not
    converge: the decomposition is then redone in float64 and is exact."""
    from natgrad.curvature.ekfac import stable_eigh

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(20, 8, generator=gen)
    rows[:, :3] = 0  # inputs that are always zero: a repeated eigenvalue 0
    matrix = rows.T @ rows / 20
    original = torch.linalg.eigh
    calls = []

    def flaky(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            if failure == "raise":
                raise torch.linalg.LinAlgError("did not converge")
            values, vectors = original(m)
            return values, torch.full_like(vectors, float("nan"))
        return original(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    eigvals, eigvecs = stable_eigh(matrix, torch.float32)
    assert calls == [torch.float32, torch.float64]
    assert eigvals.dtype == eigvecs.dtype == torch.float32
    rebuilt = (eigvecs.double() * eigvals.double()) @ eigvecs.double().T
    assert rel_err(rebuilt, matrix.double()) <= 1e-6  # float32 storage of a float64 result
