"""natgrad.fisher_matrix against per-sample autograd loops and the Gauss–Newton form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from conftest import (
    ARCHS,
    DTYPE,
    EMPIRICAL_MIN_REL_DIFF,
    LIKELIHOODS,
    MC_FEW,
    MC_MANY,
    MC_MIN_SHRINK,
    MC_RTOL_MANY,
    MC_SEED,
    RTOL_EXACT,
    assert_psd,
    brute_force_empirical_fisher,
    brute_force_fisher,
    gauss_newton,
    make_inputs,
    make_model,
    make_problem,
    make_targets,
    rel_err,
    trainable,
)

KINDS = ("true", "mc", "empirical")


def fisher(model, inputs, likelihood, kind="true", targets=None, **kwargs):
    if kind == "mc":
        kwargs.setdefault("generator", torch.Generator().manual_seed(MC_SEED))
    return natgrad.fisher_matrix(
        model, inputs, likelihood=likelihood, kind=kind, targets=targets, **kwargs
    )


# --- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_true_fisher_matches_brute_force(arch, likelihood):
    model, inputs, _ = make_problem(arch, likelihood)
    got = fisher(model, inputs, likelihood)
    num = sum(p.numel() for p in model.parameters())
    assert got.shape == (num, num)
    assert got.dtype == DTYPE
    assert rel_err(got, brute_force_fisher(model, inputs, likelihood)) <= RTOL_EXACT


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_true_fisher_equals_gauss_newton(arch, likelihood):
    model, inputs, _ = make_problem(arch, likelihood)
    got = fisher(model, inputs, likelihood)
    assert rel_err(got, gauss_newton(model, inputs, likelihood)) <= RTOL_EXACT


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_empirical_fisher_matches_brute_force_and_differs_from_true(arch, likelihood):
    model, inputs, targets = make_problem(arch, likelihood)
    got = fisher(model, inputs, likelihood, kind="empirical", targets=targets)
    expected = brute_force_empirical_fisher(model, inputs, likelihood, targets)
    assert rel_err(got, expected) <= RTOL_EXACT
    assert rel_err(got, fisher(model, inputs, likelihood)) >= EMPIRICAL_MIN_REL_DIFF


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mc_fisher_converges_to_true(likelihood):
    model, inputs, _ = make_problem("mlp", likelihood)
    exact = fisher(model, inputs, likelihood)
    errors = {
        m: rel_err(fisher(model, inputs, likelihood, kind="mc", mc_samples=m), exact)
        for m in (MC_FEW, MC_MANY)
    }
    assert errors[MC_MANY] <= MC_RTOL_MANY, errors
    assert errors[MC_FEW] >= MC_MIN_SHRINK * errors[MC_MANY], errors


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mc_fisher_is_reproducible_with_seeded_generator(likelihood):
    model, inputs, _ = make_problem("mlp", likelihood)
    first = fisher(model, inputs, likelihood, kind="mc", mc_samples=3)
    again = fisher(model, inputs, likelihood, kind="mc", mc_samples=3)
    other = fisher(
        model, inputs, likelihood, kind="mc", mc_samples=3,
        generator=torch.Generator().manual_seed(MC_SEED + 1),
    )  # fmt: skip
    assert torch.equal(first, again)
    assert rel_err(first, other) > RTOL_EXACT


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mc_fisher_with_one_draw_has_rank_at_most_batch(likelihood):
    """Each input contributes one score outer product per draw: rank F_mc ≤ N·mc_samples."""
    model, inputs, _ = make_problem("mlp", likelihood)
    got = fisher(model, inputs, likelihood, kind="mc", mc_samples=1)
    eigvals = torch.linalg.eigvalsh(got)
    rank = int((eigvals > 1e-10 * eigvals.max()).sum())
    assert rank <= inputs.shape[0]


# --- structure ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fisher_is_symmetric_psd(arch, likelihood, kind):
    model, inputs, targets = make_problem(arch, likelihood)
    got = fisher(model, inputs, likelihood, kind=kind, targets=targets, mc_samples=2)
    assert rel_err(got, got.T) <= RTOL_EXACT
    assert_psd(got)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_fisher_is_a_batch_mean(likelihood):
    """F on a batch is the mean of the per-sample Fishers (not their sum)."""
    model, inputs, _ = make_problem("mlp", likelihood)
    full = fisher(model, inputs, likelihood)
    singles = torch.stack([fisher(model, inputs[n : n + 1], likelihood) for n in range(6)])
    assert rel_err(full, singles.mean(0)) <= RTOL_EXACT


def test_only_trainable_parameters_in_model_order():
    model, inputs, _ = make_problem("mlp", "categorical")
    full = fisher(model, inputs, "categorical")
    model[0].bias.requires_grad_(False)
    got = fisher(model, inputs, "categorical")
    w0 = model[0].weight.numel()
    keep = torch.cat([torch.arange(w0), torch.arange(w0 + 5, full.shape[0])])
    assert got.shape == (keep.numel(), keep.numel())
    assert rel_err(got, full[keep][:, keep]) <= RTOL_EXACT
    assert rel_err(got, brute_force_fisher(model, inputs, "categorical")) <= RTOL_EXACT


class TwoInputDict(nn.Module):
    """f(x, z) = {"logits": W [x; z] + b}; used with ``output_fn`` and tuple inputs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4 + 2, 3)

    def forward(self, x, z):
        return {"logits": self.linear(torch.cat([x, z], dim=1)), "unused": x.sum()}


def test_tuple_inputs_and_output_fn():
    torch.manual_seed(0)
    model = TwoInputDict().to(DTYPE)
    x, z = make_inputs("mlp"), make_inputs("mlp", seed=3)[:, :2]
    got = natgrad.fisher_matrix(
        model, (x, z), likelihood="categorical", output_fn=lambda out: out["logits"]
    )
    plain = model.linear  # same parameters, same order, on the concatenated input
    expected = brute_force_fisher(plain, torch.cat([x, z], dim=1), "categorical")
    assert rel_err(got, expected) <= RTOL_EXACT


# --- errors ---------------------------------------------------------------------------------
@pytest.fixture
def small():
    model = make_model("mlp")
    inputs = make_inputs("mlp")
    return model, inputs


def test_unknown_kind_raises(small):
    with pytest.raises(ValueError, match="kind"):
        natgrad.fisher_matrix(*small, likelihood="gaussian", kind="exact")


def test_unknown_likelihood_raises(small):
    with pytest.raises(ValueError, match="categorical"):
        natgrad.fisher_matrix(*small, likelihood="poisson")


def test_empirical_without_targets_raises(small):
    with pytest.raises(ValueError, match="targets"):
        natgrad.fisher_matrix(*small, likelihood="gaussian", kind="empirical")


@pytest.mark.parametrize("mc_samples", [0, -1, 1.5, True])
def test_bad_mc_samples_raises(small, mc_samples):
    with pytest.raises(ValueError, match="mc_samples"):
        natgrad.fisher_matrix(*small, likelihood="gaussian", kind="mc", mc_samples=mc_samples)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_targets_of_wrong_shape_raise(small, likelihood):
    model, inputs = small
    with torch.no_grad():
        targets = make_targets(likelihood, model(inputs))
    with pytest.raises(ValueError, match="shape"):
        natgrad.fisher_matrix(
            model, inputs, likelihood=likelihood, kind="empirical", targets=targets[:-1]
        )


def test_float_targets_for_categorical_raise_type_error(small):
    with pytest.raises(TypeError):
        natgrad.fisher_matrix(
            *small, likelihood="categorical", kind="empirical", targets=torch.zeros(6, dtype=DTYPE)
        )


def test_int32_targets_for_categorical(small):
    """int32 class indices pass the target check, so they must give the int64 result (or be
    rejected there with a TypeError), not a RuntimeError from inside torch."""
    model, inputs = small
    targets = torch.tensor([0, 2, 1, 2, 0, 1])
    expected = natgrad.fisher_matrix(
        model, inputs, likelihood="categorical", kind="empirical", targets=targets
    )
    try:
        got = natgrad.fisher_matrix(
            model, inputs, likelihood="categorical", kind="empirical", targets=targets.int()
        )
    except TypeError:
        return  # rejected by the target check: acceptable
    assert rel_err(got, expected) <= RTOL_EXACT


def test_tiny_max_memory_raises_fisher_too_large(small):
    with pytest.raises(natgrad.FisherTooLargeError) as info:
        natgrad.fisher_matrix(*small, likelihood="categorical", max_memory=64)
    assert isinstance(info.value, MemoryError)
    assert "KFAC" in str(info.value)
    assert "fisher_vector_product" in str(info.value)


def test_max_memory_that_fits_only_the_matrix_still_works(small):
    """A budget just above P² floats forces one-sample chunks; the result must not change."""
    model, inputs = small
    num = sum(p.numel() for p in trainable(model))
    budget = num * num * 8 + 1
    got = natgrad.fisher_matrix(model, inputs, likelihood="bernoulli", max_memory=budget)
    assert rel_err(got, fisher(model, inputs, "bernoulli")) <= RTOL_EXACT
