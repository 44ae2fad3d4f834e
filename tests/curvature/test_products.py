"""natgrad.fisher_vector_product against the dense Fisher and the Gauss–Newton reference."""

from __future__ import annotations

import pytest
import torch

import natgrad
from conftest import (
    ARCHS,
    DTYPE,
    LIKELIHOODS,
    MC_SEED,
    RTOL_EXACT,
    gauss_newton,
    make_inputs,
    make_model,
    make_problem,
    rel_err,
)

KINDS = ("true", "mc", "empirical")


def random_vector(model, seed=3):
    num = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return torch.randn(num, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fvp_equals_dense_fisher_times_v(arch, likelihood, kind):
    """Same kind, same targets, and for ``mc`` a generator in the same state (same draws)."""
    model, inputs, targets = make_problem(arch, likelihood)
    v = random_vector(model)
    common = dict(likelihood=likelihood, kind=kind, targets=targets, mc_samples=3)
    dense = natgrad.fisher_matrix(
        model, inputs, generator=torch.Generator().manual_seed(MC_SEED), **common
    )
    got = natgrad.fisher_vector_product(
        model, inputs, v, generator=torch.Generator().manual_seed(MC_SEED), **common
    )
    assert got.shape == v.shape
    assert got.dtype == DTYPE
    assert rel_err(got, dense @ v) <= RTOL_EXACT


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_fvp_on_basis_vectors_rebuilds_gauss_newton(likelihood):
    """Apply F to every basis vector and compare with Jᵀ Λ J / N built from autograd."""
    model, inputs, _ = make_problem("mlp", likelihood)
    num = sum(p.numel() for p in model.parameters())
    columns = [
        natgrad.fisher_vector_product(model, inputs, e, likelihood=likelihood)
        for e in torch.eye(num, dtype=DTYPE)
    ]
    got = torch.stack(columns, dim=1)
    assert rel_err(got, gauss_newton(model, inputs, likelihood)) <= RTOL_EXACT


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mc_fvp_depends_on_the_generator(likelihood):
    model, inputs, _ = make_problem("mlp", likelihood)
    v = random_vector(model)

    def fvp(seed):
        return natgrad.fisher_vector_product(
            model, inputs, v, likelihood=likelihood, kind="mc",
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    assert torch.equal(fvp(MC_SEED), fvp(MC_SEED))
    assert rel_err(fvp(MC_SEED), fvp(MC_SEED + 1)) > RTOL_EXACT


def test_fvp_is_linear_in_v():
    model, inputs, _ = make_problem("cnn", "categorical")
    v, w = random_vector(model, 3), random_vector(model, 4)

    def fvp(u):
        return natgrad.fisher_vector_product(model, inputs, u, likelihood="categorical")

    assert rel_err(fvp(2.0 * v - 3.0 * w), 2.0 * fvp(v) - 3.0 * fvp(w)) <= RTOL_EXACT


def test_fvp_leaves_model_gradients_alone():
    model, inputs, _ = make_problem("mlp", "gaussian")
    natgrad.fisher_vector_product(model, inputs, random_vector(model), likelihood="gaussian")
    assert all(p.grad is None for p in model.parameters())


# --- errors ---------------------------------------------------------------------------------
@pytest.fixture
def small():
    model = make_model("mlp")
    return model, make_inputs("mlp"), random_vector(model)


def test_v_of_wrong_shape_raises(small):
    model, inputs, v = small
    with pytest.raises(ValueError, match="shape"):
        natgrad.fisher_vector_product(model, inputs, v[:-1], likelihood="gaussian")
    with pytest.raises(ValueError, match="shape"):
        natgrad.fisher_vector_product(model, inputs, v.reshape(1, -1), likelihood="gaussian")


def test_v_of_wrong_dtype_raises(small):
    model, inputs, v = small
    with pytest.raises(TypeError, match="dtype"):
        natgrad.fisher_vector_product(model, inputs, v.float(), likelihood="gaussian")
    with pytest.raises(TypeError):
        natgrad.fisher_vector_product(model, inputs, v.tolist(), likelihood="gaussian")


def test_fvp_argument_errors(small):
    model, inputs, v = small
    with pytest.raises(ValueError, match="kind"):
        natgrad.fisher_vector_product(model, inputs, v, likelihood="gaussian", kind="exact")
    with pytest.raises(ValueError, match="targets"):
        natgrad.fisher_vector_product(model, inputs, v, likelihood="gaussian", kind="empirical")
    with pytest.raises(ValueError, match="mc_samples"):
        natgrad.fisher_vector_product(
            model, inputs, v, likelihood="gaussian", kind="mc", mc_samples=0
        )
    with pytest.raises(ValueError, match="categorical"):
        natgrad.fisher_vector_product(model, inputs, v, likelihood="poisson")
    with pytest.raises(TypeError):
        natgrad.fisher_vector_product(
            model, inputs, v, likelihood="categorical", kind="empirical",
            targets=torch.zeros(6, dtype=DTYPE),
        )  # fmt: skip
