"""natgrad.kfac_factors, damped_inverse and pi_damping against per-sample brute force.

References come from tests/conftest.py: one forward per sample, one autograd backward per
outcome (every class / bit pattern / Gaussian sigma point for ``kind="true"``), and convolution
patches cut by a hand-written loop over output locations (checked here against the layer).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import natgrad
from conftest import (
    DTYPE,
    LIKELIHOODS,
    MC_FEW,
    MC_MANY,
    MC_MIN_SHRINK,
    MC_RTOL_MANY,
    MC_SEED,
    OUT,
    RTOL_EXACT,
    block_indices,
    brute_force_kfac,
    exact_block,
    hand_patches,
    kron_full,
    kronecker_layers,
    make_embedding_model,
    make_inputs,
    make_model,
    make_targets,
    make_tokens,
    rel_err,
)
from natgrad.curvature.kfac import damped_inverse, pi_damping

pytestmark = pytest.mark.usefixtures("single_thread")

# Conv2d variants: each is Conv2d(2, 3, **config) → Tanh → Flatten → Linear on 5×6 images.
CONV_CONFIGS = {
    "valid": dict(kernel_size=3),
    "padding": dict(kernel_size=3, padding=1),
    "stride": dict(kernel_size=3, stride=2, padding=1),
    "dilation": dict(kernel_size=(3, 2), dilation=(1, 2)),
    "same": dict(kernel_size=(2, 3), padding="same", dilation=(1, 2)),  # asymmetric padding
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(kernel_size=3, padding=(1, 2), stride=(1, 2), padding_mode="circular"),
    "replicate": dict(kernel_size=2, padding=1, padding_mode="replicate"),
    "no_bias": dict(kernel_size=3, padding=1, bias=False),
}
IMAGE = (2, 5, 6)
# with 8 or more input channels the patches are cut channels-last (natgrad.layers.conv)
WIDE_CONV_CONFIGS = {
    "wide_stride": dict(kernel_size=3, stride=2, padding=1),
    "wide_dilation_reflect": dict(kernel_size=(3, 2), dilation=(1, 2), padding=1,
                                  padding_mode="reflect"),
    "wide_no_bias": dict(kernel_size=2, bias=False),
}


def make_conv_model(config: dict, image=IMAGE, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv2d(image[0], 3, **config).to(DTYPE)
    with torch.no_grad():
        flat = conv(torch.zeros(1, *image, dtype=DTYPE)).numel()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, OUT)).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model


def make_images(n: int, image=IMAGE, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, *image), generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def problem(arch: str, likelihood: str, n: int = 6):
    """(model, inputs, targets) for the architectures of this file."""
    if arch == "embed":
        model, inputs = make_embedding_model(), make_tokens(n)
    elif arch == "embed_one_position":
        model, inputs = make_embedding_model(), make_tokens(n, positions=1)
    elif arch in CONV_CONFIGS:
        model, inputs = make_conv_model(CONV_CONFIGS[arch]), make_images(n)
    elif arch in WIDE_CONV_CONFIGS:  # 9 input channels: A from channels-last patches
        image = (9, *IMAGE[1:])
        model, inputs = make_conv_model(WIDE_CONV_CONFIGS[arch], image), make_images(n, image)
    elif arch == "conv_one_position":  # a 3×3 kernel on a 3×3 image: one output location
        model = make_conv_model(dict(kernel_size=3), image=(2, 3, 3))
        inputs = make_images(n, image=(2, 3, 3))
    else:
        model, inputs = make_model(arch), make_inputs(arch, n)
    with torch.no_grad():
        targets = make_targets(likelihood, model(inputs))
    return model, inputs, targets


def factors(model, inputs, likelihood, kind="true", targets=None, **kwargs):
    if kind == "mc":
        kwargs.setdefault("generator", torch.Generator().manual_seed(MC_SEED))
    return natgrad.kfac_factors(
        model, inputs, likelihood=likelihood, kind=kind, targets=targets, **kwargs
    )


def assert_factors_match(got, expected, model):
    layers = kronecker_layers(model)
    assert list(got) == list(layers)  # named_modules order, every Kronecker layer
    for name, (a_ref, g_ref) in expected.items():
        a, g = got[name]
        if isinstance(layers[name], nn.Embedding):  # A is diagonal, returned as a vector
            assert a.shape == (a_ref.shape[0],)
            assert torch.equal(a_ref, torch.diag(a_ref.diagonal()))
            a_ref = a_ref.diagonal()
        assert a.shape == a_ref.shape and g.shape == g_ref.shape, name
        assert a.dtype == DTYPE and g.dtype == DTYPE
        assert rel_err(a, a_ref) <= RTOL_EXACT, name
        assert rel_err(g, g_ref) <= RTOL_EXACT, name


# --- the hand-written reference itself ------------------------------------------------------
@pytest.mark.parametrize("config", list(CONV_CONFIGS))
def test_hand_patches_reproduce_the_convolution(config):
    """W_flat · patch + b at every location rebuilds the layer's output: the hand-cut patches
    (loop over locations, (C_in, kh, kw) order) are what the layer multiplies."""
    conv = make_conv_model(CONV_CONFIGS[config])[0]
    images = make_images(3)
    with torch.no_grad():
        expected = conv(images)
        for image, out in zip(images, expected, strict=True):
            rows = hand_patches(conv, image)
            got = rows @ conv.weight.reshape(conv.out_channels, -1).T
            if conv.bias is not None:
                got = got + conv.bias
            assert rows.shape[0] == out.shape[1] * out.shape[2]
            assert rel_err(got, out.permute(1, 2, 0).reshape(-1, conv.out_channels)) <= RTOL_EXACT


def test_hand_patches_agree_with_unfold():
    conv = make_conv_model(CONV_CONFIGS["dilation"])[0]
    image = make_images(1)
    unfolded = nn.functional.unfold(image, conv.kernel_size, dilation=conv.dilation)[0].T
    assert rel_err(hand_patches(conv, image[0]), unfolded) <= RTOL_EXACT


# --- factors against brute force ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ["mlp", "mlp_nobias", "seq", "cnn", "embed"])
def test_factors_match_brute_force(arch, likelihood, kind):
    model, inputs, targets = problem(arch, likelihood)
    got = factors(model, inputs, likelihood, kind, targets)
    assert_factors_match(got, brute_force_kfac(model, inputs, likelihood, kind, targets), model)


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("arch", ["seq", "cnn", "mlp"])
def test_reduce_factors_match_their_definition(arch, kind):
    """K-FAC-reduce: each sample's positions averaged in A and summed in G before the outer
    products; on the MLP (no sharing) it equals expand."""
    model, inputs, targets = problem(arch, "categorical")
    got = natgrad.kfac_factors(model, inputs, likelihood="categorical", kind=kind,
                               targets=targets, kfac_approx="reduce")
    expected = brute_force_kfac(model, inputs, "categorical", kind, targets, reduce=True)
    assert_factors_match(got, expected, model)
    expand = natgrad.kfac_factors(model, inputs, likelihood="categorical", kind=kind,
                                  targets=targets)
    # (for the true Fisher of a position-wise model G is the same: the scores of different
    # positions are independent with mean zero, so the cross terms vanish; A differs)
    differs = any(rel_err(got[n][i], expand[n][i]) > 1e-6 for n in got for i in (0, 1))
    assert differs == (arch != "mlp")


def test_kfac_approx_is_validated():
    model, inputs, _ = problem("mlp", "categorical")
    with pytest.raises(ValueError, match="kfac_approx must be one of"):
        natgrad.kfac_factors(model, inputs, likelihood="categorical", kfac_approx="sum")
    with pytest.raises(ValueError, match="kfac_approx must be one of"):
        natgrad.KFAC(model, kfac_approx="sum")


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("config", list(CONV_CONFIGS) + list(WIDE_CONV_CONFIGS))
def test_conv2d_factors_match_brute_force(config, kind):
    model, inputs, targets = problem(config, "categorical")
    got = factors(model, inputs, "categorical", kind, targets)
    expected = brute_force_kfac(model, inputs, "categorical", kind, targets)
    assert_factors_match(got, expected, model)


def test_norm_layers_have_no_kronecker_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, OUT)).to(DTYPE)
    got = factors(model, make_inputs("mlp"), "categorical")
    assert list(got) == ["0", "2"]


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_mc_factors_converge_to_true(arch, likelihood):
    model, inputs, _ = problem(arch, likelihood)
    exact = factors(model, inputs, likelihood)
    few = factors(model, inputs, likelihood, "mc", mc_samples=MC_FEW)
    many = factors(model, inputs, likelihood, "mc", mc_samples=MC_MANY)
    for name, (a, g) in exact.items():
        assert rel_err(many[name][0], a) <= RTOL_EXACT  # A does not depend on the labels
        err_few, err_many = rel_err(few[name][1], g), rel_err(many[name][1], g)
        assert err_many <= MC_RTOL_MANY, (name, err_many)
        assert err_few >= MC_MIN_SHRINK * err_many, (name, err_few, err_many)


# --- where K-FAC is exact -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize(
    "arch", ["mlp", "mlp_nobias", "conv_one_position", "embed_one_position"]
)
def test_kfac_block_is_exact_at_batch_size_one(arch, likelihood, kind):
    """One sample, one position per layer: the per-sample gradient is δāᵀ with ā independent
    of the label, so E[vec(δāᵀ) vec(δāᵀ)ᵀ] = E[δδᵀ] ⊗ āāᵀ exactly, for every layer."""
    model, inputs, targets = problem(arch, likelihood, n=1)
    got = factors(model, inputs, likelihood, kind, targets)
    dense = natgrad.fisher_matrix(
        model, inputs, likelihood=likelihood, kind=kind, targets=targets
    )
    for name, module in kronecker_layers(model).items():
        a, g = got[name]
        block = exact_block(model, inputs, likelihood, module, kind, targets)
        index = block_indices(model, module)
        assert rel_err(dense[index][:, index], block) <= RTOL_EXACT  # the permutation
        assert rel_err(kron_full(g, a), block) <= RTOL_EXACT, name


def test_kfac_block_is_not_exact_for_a_batch():
    """Sanity check of the test above: with several samples G ⊗ A ≠ the exact block."""
    model, inputs, _ = problem("mlp", "categorical")
    a, g = factors(model, inputs, "categorical")["0"]
    block = exact_block(model, inputs, "categorical", model[0])
    assert rel_err(kron_full(g, a), block) > 1e-3


# --- damping and inverses -------------------------------------------------------------------
def random_psd(d: int, rank: int | None = None, seed: int = 0, dtype=DTYPE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    root = torch.randn(d, rank or d, generator=gen, dtype=DTYPE)
    return (root @ root.T / d).to(dtype)


def test_pi_damping_formula():
    A, G = random_psd(5, seed=1), 7.0 * random_psd(3, seed=2)
    damping = 0.3
    pi = math.sqrt((torch.trace(A).item() / 5) / (torch.trace(G).item() / 3))
    damping_in, damping_grad = pi_damping(A, G, damping)
    assert damping_in == pytest.approx(pi * math.sqrt(damping), rel=RTOL_EXACT)
    assert damping_grad == pytest.approx(math.sqrt(damping) / pi, rel=RTOL_EXACT)
    # product = λ: the damping of the Kronecker product does not depend on the split
    assert damping_in * damping_grad == pytest.approx(damping, rel=RTOL_EXACT)


def test_pi_damping_diagonal_input_factor():
    a, G = torch.tensor([0.5, 0.0, 1.5], dtype=DTYPE), random_psd(4, seed=3)
    pi = math.sqrt((a.mean().item()) / (torch.trace(G).item() / 4))
    damping_in, damping_grad = pi_damping(a, G, 0.01)
    assert damping_in == pytest.approx(pi * 0.1, rel=RTOL_EXACT)
    assert damping_grad == pytest.approx(0.1 / pi, rel=RTOL_EXACT)


def test_pi_damping_degenerate_factor_falls_back_to_one():
    """A zero factor (a dead layer) would give π = 0 or ∞; π = 1 keeps both dampings finite."""
    A = torch.zeros(3, 3, dtype=DTYPE)
    damping_in, damping_grad = pi_damping(A, random_psd(2), 0.04)
    assert (damping_in, damping_grad) == pytest.approx((0.2, 0.2), rel=RTOL_EXACT)


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_damped_inverse_formula(method):
    M, damping = random_psd(6, rank=3), 0.05  # singular M: the damping makes it invertible
    got = damped_inverse(M, damping, method)
    expected = torch.linalg.inv(M + damping * torch.eye(6, dtype=DTYPE))
    assert got.dtype == DTYPE
    assert rel_err(got, expected) <= RTOL_EXACT
    assert rel_err(got @ (M + damping * torch.eye(6, dtype=DTYPE)), torch.eye(6, dtype=DTYPE)) <= (
        RTOL_EXACT
    )


def test_damped_inverse_diagonal_and_dtype():
    diag = torch.tensor([0.0, 1.0, 3.0], dtype=DTYPE)
    got = damped_inverse(diag, 0.5, dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor([2.0, 1.0 / 1.5, 1.0 / 3.5]))
    assert damped_inverse(random_psd(3), 0.1, dtype=torch.float32).dtype == torch.float32


def test_damped_inverse_falls_back_on_an_indefinite_float32_matrix():
    """M + λI indefinite even with 100λ: Cholesky fails every time, the eigh fallback clamps
    M's negative eigenvalue at 0 and returns a finite (M₊ + λI)⁻¹ in the input's dtype."""
    M = torch.diag(torch.tensor([2.0, -1000.0], dtype=torch.float32))
    got = damped_inverse(M, 0.5)
    assert got.dtype == torch.float32
    assert bool(torch.isfinite(got).all())
    assert torch.allclose(got, torch.diag(torch.tensor([1 / 2.5, 1 / 0.5])), rtol=1e-6)


def test_damped_inverse_slightly_indefinite_float32_matrix_is_finite_and_positive():
    """A rank-deficient float32 PSD matrix with tiny damping (rounding makes it indefinite)."""
    M = random_psd(20, rank=2, dtype=torch.float32)
    M = M - 1e-6 * torch.eye(20)  # slightly negative eigenvalues
    got = damped_inverse(M, 1e-8)
    assert got.dtype == torch.float32
    assert bool(torch.isfinite(got).all())
    assert torch.linalg.eigvalsh(got.double()).min() > 0
