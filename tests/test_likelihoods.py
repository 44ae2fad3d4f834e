"""natgrad.likelihoods against torch.distributions, autograd and enumeration of outcomes."""

from __future__ import annotations

import pytest
import torch

import natgrad
from conftest import (
    DTYPE,
    LIKELIHOODS,
    PSD_RTOL,
    RTOL_EXACT,
    SAMPLE_DRAWS,
    SAMPLE_Z,
    distribution,
    enumerated_output_fisher,
    make_targets,
    rel_err,
)
from natgrad.likelihoods import LikelihoodName

# output shapes: [N, K] and [N, T, K] (independent positions)
SHAPES = ((4, 3), (3, 2, 3))


def random_outputs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(shape, generator=gen, dtype=DTYPE)


def reference_per_sample(likelihood: str, outputs: torch.Tensor, targets: torch.Tensor):
    """torch.distributions log-likelihood summed over positions, [N]."""
    logp = distribution(likelihood, outputs).log_prob(targets)
    return logp.reshape(outputs.shape[0], -1).sum(1)


# --- get_likelihood -------------------------------------------------------------------------
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_get_likelihood_by_name_and_enum(name):
    lik = natgrad.get_likelihood(name)
    assert isinstance(lik, natgrad.Likelihood)
    assert lik.name == name
    assert type(natgrad.get_likelihood(LikelihoodName(name))) is type(lik)
    assert natgrad.get_likelihood(lik) is lik


def test_unknown_likelihood_names_the_allowed_ones():
    with pytest.raises(ValueError, match="poisson") as info:
        natgrad.get_likelihood("poisson")
    for name in LIKELIHOODS:
        assert name in str(info.value)


def test_likelihood_of_wrong_type():
    with pytest.raises(TypeError):
        natgrad.get_likelihood(3)


# --- log_prob and score ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_log_prob_matches_torch_distributions(name, shape):
    outputs = random_outputs(shape)
    targets = make_targets(name, outputs)
    got = natgrad.get_likelihood(name).log_prob(outputs, targets)
    assert got.shape == (shape[0],)
    assert rel_err(got, reference_per_sample(name, outputs, targets)) <= RTOL_EXACT


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_score_is_gradient_of_log_prob(name, shape):
    outputs = random_outputs(shape).requires_grad_(True)
    targets = make_targets(name, outputs.detach())
    (expected,) = torch.autograd.grad(reference_per_sample(name, outputs, targets).sum(), outputs)
    got = natgrad.get_likelihood(name).score(outputs.detach(), targets)
    assert got.shape == outputs.shape
    assert rel_err(got, expected) <= RTOL_EXACT


def test_log_prob_is_differentiable():
    outputs = random_outputs((4, 3)).requires_grad_(True)
    targets = make_targets("categorical", outputs.detach())
    natgrad.get_likelihood("categorical").log_prob(outputs, targets).sum().backward()
    assert outputs.grad is not None


# --- output Fisher and its factors ----------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_output_fisher_matches_enumeration(name, shape):
    outputs = random_outputs(shape)
    expected = enumerated_output_fisher(name, outputs)
    got = natgrad.get_likelihood(name).output_fisher(outputs)
    k = outputs[0].numel()
    assert got.shape == (shape[0], k, k)
    assert rel_err(got, expected) <= RTOL_EXACT


@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_output_fisher_is_identity(shape):
    outputs = random_outputs(shape)
    k = outputs[0].numel()
    eye = torch.eye(k, dtype=DTYPE).expand(shape[0], k, k)
    assert torch.equal(natgrad.get_likelihood("gaussian").output_fisher(outputs), eye)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_fisher_sqrt_is_symmetric_root(name, shape):
    outputs = random_outputs(shape)
    lam = enumerated_output_fisher(name, outputs)
    root = natgrad.get_likelihood(name).fisher_sqrt(outputs)
    assert root.shape == lam.shape
    assert rel_err(root, root.transpose(1, 2)) <= RTOL_EXACT
    assert rel_err(root @ root, lam) <= RTOL_EXACT
    eigvals = torch.linalg.eigvalsh(root)
    assert eigvals.min() >= -PSD_RTOL * eigvals.abs().max()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_fisher_factor_squares_to_output_fisher(name, shape):
    outputs = random_outputs(shape)
    lam = enumerated_output_fisher(name, outputs)
    factor = natgrad.get_likelihood(name).fisher_factor(outputs)
    assert factor.shape[:2] == lam.shape[:2]
    assert rel_err(factor @ factor.transpose(1, 2), lam) <= RTOL_EXACT


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_fisher_matvec_applies_output_fisher(name, shape):
    outputs = random_outputs(shape)
    vectors = random_outputs(shape, seed=5)
    lam = enumerated_output_fisher(name, outputs)
    expected = (lam @ vectors.reshape(shape[0], -1, 1)).reshape(shape)
    got = natgrad.get_likelihood(name).fisher_matvec(outputs, vectors)
    assert got.shape == shape
    assert rel_err(got, expected) <= RTOL_EXACT


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_fisher_gram_is_the_summed_output_fisher_inner_product(name, shape):
    """fisher_gram[i, j] = Σₙ vᵢₙᵀ Λₙ vⱼₙ with Λₙ enumerated independently."""
    outputs = random_outputs(shape)
    vectors = [random_outputs(shape, seed=5 + i) for i in range(3)]
    lam = enumerated_output_fisher(name, outputs)
    flat = [v.reshape(shape[0], -1, 1) for v in vectors]
    expected = torch.stack([
        torch.stack([(a.transpose(1, 2) @ lam @ b).sum() for b in flat]) for a in flat
    ])
    got = natgrad.get_likelihood(name).fisher_gram(outputs, vectors)
    assert got.shape == (3, 3)
    assert rel_err(got, expected) <= RTOL_EXACT


# --- KL -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_kl_matches_torch_distributions(name, shape):
    f_p, f_q = random_outputs(shape, seed=0), random_outputs(shape, seed=1)
    kl = torch.distributions.kl_divergence(distribution(name, f_p), distribution(name, f_q))
    expected = kl.reshape(shape[0], -1).sum(1)
    got = natgrad.get_likelihood(name).kl(f_p, f_q)
    assert got.shape == (shape[0],)
    assert rel_err(got, expected) <= RTOL_EXACT
    assert torch.all(natgrad.get_likelihood(name).kl(f_p, f_p).abs() <= 1e-14)


def test_categorical_kl_is_explicit_sum_over_classes():
    f_p, f_q = random_outputs((4, 3), seed=0), random_outputs((4, 3), seed=1)
    p, q = f_p.softmax(-1), f_q.softmax(-1)
    expected = torch.stack(
        [sum(p[n, c] * torch.log(p[n, c] / q[n, c]) for c in range(3)) for n in range(4)]
    )
    got = natgrad.get_likelihood("categorical").kl(f_p, f_q)
    assert rel_err(got, expected) <= RTOL_EXACT


# --- sampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_sample_is_reproducible_with_seeded_generator(name, shape):
    lik = natgrad.get_likelihood(name)
    outputs = random_outputs(shape)
    first = lik.sample(outputs, torch.Generator().manual_seed(7))
    second = lik.sample(outputs, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    # the draws are valid targets: same shape and dtype that check_targets accepts
    assert first.shape == make_targets(name, outputs).shape
    lik.check_targets(outputs, first)
    if name == "categorical":
        assert not first.is_floating_point()


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_sample_has_the_right_mean(name):
    """Many copies of one sample's outputs: the mean of the draws matches the model's."""
    lik = natgrad.get_likelihood(name)
    row = torch.tensor([[1.0, -0.5, 0.3]], dtype=DTYPE)
    outputs = row.expand(SAMPLE_DRAWS, 3).contiguous()
    draws = lik.sample(outputs, torch.Generator().manual_seed(11))
    if name == "categorical":
        freq = torch.nn.functional.one_hot(draws, 3).to(DTYPE)
        mean, var = row.softmax(-1)[0], (row.softmax(-1) * (1 - row.softmax(-1)))[0]
    elif name == "bernoulli":
        freq = draws
        mean = torch.sigmoid(row)[0]
        var = mean * (1 - mean)
    else:
        freq = draws
        mean, var = row[0], torch.ones(3, dtype=DTYPE)
        assert abs(draws.var(0) - 1).max() <= SAMPLE_Z * (2 / SAMPLE_DRAWS) ** 0.5
    stderr = (var / SAMPLE_DRAWS).sqrt()
    assert torch.all((freq.mean(0) - mean).abs() <= SAMPLE_Z * stderr)


def test_sample_does_not_track_gradients():
    outputs = random_outputs((4, 3)).requires_grad_(True)
    draws = natgrad.get_likelihood("gaussian").sample(outputs, torch.Generator().manual_seed(0))
    assert not draws.requires_grad


# --- shape and dtype errors -----------------------------------------------------------------
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_outputs_without_output_dimension_raise(name):
    lik = natgrad.get_likelihood(name)
    with pytest.raises(ValueError, match="shape"):
        lik.output_fisher(torch.zeros(4, dtype=DTYPE))


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_integer_outputs_raise(name):
    lik = natgrad.get_likelihood(name)
    with pytest.raises(TypeError):
        lik.fisher_factor(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        lik.sample([[0.0, 1.0]])


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_targets_of_wrong_shape_raise(name):
    lik = natgrad.get_likelihood(name)
    outputs = random_outputs((4, 3))
    targets = make_targets(name, outputs)
    with pytest.raises(ValueError, match="shape"):
        lik.log_prob(outputs, targets[:3])
    with pytest.raises(ValueError, match="shape"):
        lik.score(outputs, targets.unsqueeze(-1))
    with pytest.raises(TypeError):
        lik.log_prob(outputs, targets.tolist())


def test_categorical_float_targets_raise_type_error():
    lik = natgrad.get_likelihood("categorical")
    with pytest.raises(TypeError, match="integer"):
        lik.log_prob(random_outputs((4, 3)), torch.zeros(4, dtype=DTYPE))
    with pytest.raises(TypeError):
        lik.score(random_outputs((4, 3)), torch.zeros(4, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_categorical_integer_targets_of_any_width(dtype):
    """Integer class indices that pass ``check_targets`` must work like int64 ones; a width
    the likelihood cannot use must be rejected there with a TypeError, never fail later with
    a RuntimeError from inside torch."""
    lik = natgrad.get_likelihood("categorical")
    outputs = random_outputs((4, 3))
    wide = torch.tensor([0, 2, 1, 2])
    narrow = wide.to(dtype)
    try:
        lik.check_targets(outputs, narrow)
    except TypeError:
        return  # rejected up front: acceptable
    assert rel_err(lik.log_prob(outputs, narrow), lik.log_prob(outputs, wide)) <= RTOL_EXACT
    assert rel_err(lik.score(outputs, narrow), lik.score(outputs, wide)) <= RTOL_EXACT


def test_gaussian_integer_targets_raise_type_error():
    with pytest.raises(TypeError):
        natgrad.get_likelihood("gaussian").log_prob(
            random_outputs((4, 3)), torch.zeros(4, 3, dtype=torch.long)
        )


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_fisher_matvec_and_kl_shape_mismatch_raise(name):
    lik = natgrad.get_likelihood(name)
    outputs = random_outputs((4, 3))
    with pytest.raises(ValueError, match="shape"):
        lik.fisher_matvec(outputs, random_outputs((4, 2)))
    with pytest.raises(ValueError, match="shape"):
        lik.fisher_gram(outputs, [outputs, random_outputs((4, 2))])
    with pytest.raises(ValueError, match="shape"):
        lik.kl(outputs, random_outputs((3, 3)))
