"""Conv1d and Conv3d Kronecker blocks (KFC), in float64 against the definition.

* The patches natgrad cuts, multiplied by the flattened weight, rebuild the layer's own output
  at every location (torch's convolution is the reference for the layout), for strides,
  paddings (numbers, 'same', circular/reflect), dilations and no bias.
* With one output location and one sample K-FAC is exact: G ⊗ A equals the layer's block of the
  true Fisher, computed from per-sample, per-class gradients (autograd on each example's
  log-likelihood, weighted by the class probabilities).
* Transposed convolutions (1-d, 2-d, 3-d; strides, paddings, output padding, dilation, groups,
  no bias, an ``output_size`` call): the patches of the spread input times the gradient-matrix
  layout rebuild the layer's output; the per-class parameter gradients of PyTorch's layer have
  the K-FAC form Σₜ δₜāₜᵀ with δₜ the gradients at its output, and A and G equal the
  definition from those; networks with them train with KFAC's and EKFAC's defaults.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import natgrad
from conftest import DTYPE, RTOL_EXACT, rel_err, train_losses
from natgrad.layers.capture import find_layers
from natgrad.layers.conv import ConvHandler, ConvTransposeHandler

CONFIGS = {
    "1d-plain": (nn.Conv1d, dict(in_channels=2, out_channels=3, kernel_size=3)),
    "1d-stride-pad": (nn.Conv1d, dict(in_channels=2, out_channels=3, kernel_size=3, stride=2,
                                      padding=1)),
    "1d-dilation-nobias": (nn.Conv1d, dict(in_channels=2, out_channels=3, kernel_size=2,
                                           dilation=2, bias=False)),
    "1d-same-circular": (nn.Conv1d, dict(in_channels=2, out_channels=3, kernel_size=3,
                                         padding="same", padding_mode="circular")),
    "3d-plain": (nn.Conv3d, dict(in_channels=2, out_channels=3, kernel_size=2)),
    "3d-stride-pad-dilation": (nn.Conv3d, dict(in_channels=2, out_channels=3, kernel_size=2,
                                               stride=(1, 2, 1), padding=1, dilation=(2, 1, 1))),
    "3d-reflect": (nn.Conv3d, dict(in_channels=2, out_channels=2, kernel_size=3, padding=1,
                                   padding_mode="reflect")),
}


def inputs_for(conv: nn.Module, n: int = 3, size: int = 6) -> torch.Tensor:
    spatial = (size,) if isinstance(conv, nn.Conv1d) else (size - 1, size, size - 2)
    return torch.randn(n, conv.in_channels, *spatial, dtype=DTYPE,
                       generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_patches_rebuild_the_convolution(config):
    layer_type, kwargs = CONFIGS[config]
    torch.manual_seed(0)
    conv = layer_type(**kwargs).to(DTYPE)
    x = inputs_for(conv)
    handler = ConvHandler(conv)
    with torch.no_grad():
        out = conv(x)
        rows = handler.input_rows(x)
        flat = handler.gather({p: p for p in handler.params})  # [W | b] as X is laid out
    expected = out.movedim(1, -1).reshape(-1, conv.out_channels)
    assert rows.shape == (expected.shape[0], flat.shape[1])
    assert rel_err(rows @ flat.T, expected) <= RTOL_EXACT
    assert rel_err(handler.grad_rows(out), expected) <= RTOL_EXACT


@pytest.mark.parametrize("channels", [2, 9])  # 9: the patches are cut channels-last
@pytest.mark.parametrize("config", list(CONFIGS))
def test_input_sum_is_the_patches_outer_product(config, channels):
    """Σ āāᵀ formed without the rows (bias entries from sums) equals Rᵀ R of the rows
    that :func:`test_patches_rebuild_the_convolution` checks, in the factor's dtype."""
    layer_type, kwargs = CONFIGS[config]
    torch.manual_seed(0)
    conv = layer_type(**{**kwargs, "in_channels": channels})
    x = inputs_for(conv).float()
    handler = ConvHandler(conv)
    total, count = handler.input_sum(x, DTYPE)
    rows = handler.input_rows(x.to(DTYPE))
    assert total.dtype == DTYPE and count == rows.shape[0]
    assert rel_err(total, rows.T @ rows) <= RTOL_EXACT


PROJECTED = {
    **CONFIGS,
    "2d-same-reflect": (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=(3, 2),
                                        padding="same", padding_mode="reflect")),
    "2d-stride-dilation": (nn.Conv2d, dict(in_channels=9, out_channels=4, kernel_size=3,
                                           stride=2, dilation=(1, 2), padding=1)),
}


@pytest.mark.parametrize("config", list(PROJECTED))
def test_projected_rows_are_the_rows_times_the_basis(config):
    """EKFAC's rows in A's eigenbasis, from a convolution with the basis as kernels, equal
    the checked rows times the basis (a square basis, and fewer columns than rows)."""
    layer_type, kwargs = PROJECTED[config]
    torch.manual_seed(0)
    conv = layer_type(**kwargs)
    x = torch.randn(3, conv.in_channels, 5, 6) if config.startswith("2d") else inputs_for(conv)
    x = x.float()  # a float32 layer input, projected in the basis's float64
    handler = ConvHandler(conv)
    rows = handler.input_rows(x.to(DTYPE))
    for columns in (rows.shape[1], 2):
        basis = torch.randn(rows.shape[1], columns, dtype=DTYPE)
        got = handler.projected_input_rows(x, basis)
        assert got.dtype == DTYPE
        assert rel_err(got, rows @ basis) <= RTOL_EXACT


@pytest.mark.parametrize("layer_type", [nn.Conv1d, nn.Conv3d])
def test_kfac_is_exact_with_one_output_location(layer_type):
    """Kernel as large as the input and one sample: one location, so the gradient is δ āᵀ
    and the Fisher block is exactly G ⊗ A (with more samples, the mean of Kronecker products
    is not the product of means)."""
    torch.manual_seed(1)
    spatial = (4,) if layer_type is nn.Conv1d else (2, 3, 2)
    conv = layer_type(2, 3, kernel_size=spatial).to(DTYPE)
    model = nn.Sequential(conv, nn.Flatten()).to(DTYPE)
    x = torch.randn(1, 2, *spatial, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    A, G = natgrad.kfac_factors(model, x, likelihood="categorical")["0"]
    # brute force: (1/N) Σₙ Σ_y p(y|xₙ) gₙ,y gₙ,yᵀ over [W | b] in X's row-major layout
    blocks = []
    for xn in x:
        logits = model(xn.unsqueeze(0))[0]
        probs = logits.softmax(-1).detach()
        for y in range(logits.shape[0]):
            logp = logits.log_softmax(-1)[y]
            gw, gb = torch.autograd.grad(logp, [conv.weight, conv.bias], retain_graph=True)
            g = torch.cat([gw.reshape(3, -1), gb.unsqueeze(1)], dim=1).reshape(-1)
            blocks.append(probs[y] * torch.outer(g, g))
    exact = torch.stack(blocks).sum(0) / x.shape[0]
    assert rel_err(torch.kron(G, A), exact) <= RTOL_EXACT


@pytest.mark.parametrize("layer_type", [nn.Conv1d, nn.Conv3d])
def test_conv_networks_get_kronecker_blocks_and_train(layer_type):
    torch.manual_seed(0)
    if layer_type is nn.Conv1d:
        model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3),
                              nn.Flatten(), nn.Linear(4 * 6, 3)).to(DTYPE)
        x = torch.randn(16, 2, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    else:
        model = nn.Sequential(nn.Conv3d(1, 3, 2), nn.Tanh(), nn.Flatten(),
                              nn.Linear(3 * 27, 3)).to(DTYPE)
        x = torch.randn(16, 1, 4, 4, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
        opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss(), stat_every=1)
    assert len(opt.blocks) == len([m for m in model if isinstance(m, (nn.Linear, layer_type))])
    losses = train_losses(opt, model, x, y, 10)
    assert losses[-1] < 0.5 * losses[0], losses


# --- grouped and depthwise convolutions: one Kronecker product per group --------------------
GROUPED = {
    "grouped-2d": (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2,
                                   padding=1)),
    "depthwise-2d": (nn.Conv2d, dict(in_channels=3, out_channels=3, kernel_size=3, groups=3,
                                     stride=2)),
    "depthwise-1d-nobias": (nn.Conv1d, dict(in_channels=4, out_channels=8, kernel_size=3,
                                            groups=4, bias=False)),
}


def grouped_inputs(conv: nn.Module, n: int = 3) -> torch.Tensor:
    spatial = (7,) if isinstance(conv, nn.Conv1d) else (5, 6)
    return torch.randn(n, conv.in_channels, *spatial, dtype=DTYPE,
                       generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("config", list(GROUPED))
def test_grouped_patches_rebuild_each_group(config):
    layer_type, kwargs = GROUPED[config]
    torch.manual_seed(0)
    conv = layer_type(**kwargs).to(DTYPE)
    x = grouped_inputs(conv)
    handler = ConvHandler(conv)
    with torch.no_grad():
        out = conv(x).movedim(1, -1).reshape(-1, conv.out_channels)
        rows = handler.input_rows(x)  # [N·T, g, d_in]
        flat = handler.gather({p: p for p in handler.params})  # [g, C_out/g, d_in]
    per_group = conv.out_channels // conv.groups
    for j in range(conv.groups):
        expected = out[:, j * per_group : (j + 1) * per_group]
        assert rel_err(rows[:, j] @ flat[j].T, expected) <= RTOL_EXACT
    assert rel_err(handler.grad_rows(conv(x).detach()).reshape(out.shape), out) <= RTOL_EXACT
    scattered = handler.scatter(flat)
    assert all(torch.equal(scattered[p], p) for p in handler.params)


def test_grouped_kfac_is_exact_per_group_with_one_location():
    """One sample, kernel as large as the input: each group's block of the Fisher (the
    group's rows of [W | b]) is exactly G_j ⊗ A_j."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, kernel_size=(2, 3), groups=2).to(DTYPE)
    model = nn.Sequential(conv, nn.Flatten()).to(DTYPE)
    x = torch.randn(1, 4, 2, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    A, G = natgrad.kfac_factors(model, x, likelihood="categorical")["0"]
    assert A.shape == (2, 13, 13) and G.shape == (2, 3, 3)  # 2 channels · 2·3 taps + bias
    logits = model(x)[0]
    probs = logits.softmax(-1).detach()
    blocks = []
    for y in range(logits.shape[0]):
        gw, gb = torch.autograd.grad(logits.log_softmax(-1)[y], [conv.weight, conv.bias],
                                     retain_graph=True)
        g = torch.cat([gw.reshape(6, -1), gb.unsqueeze(1)], dim=1)  # [6, 13]
        blocks.append(probs[y] * torch.einsum("ai,bj->aibj", g, g))
    exact = torch.stack(blocks).sum(0)  # [6, 13, 6, 13]
    for j in range(2):
        rows = slice(3 * j, 3 * j + 3)
        block = exact[rows, :, rows, :].reshape(39, 39)
        assert rel_err(torch.kron(G[j], A[j]), block) <= RTOL_EXACT


def test_grouped_block_preconditions_each_group_with_its_damped_factors():
    from natgrad.curvature.kfac import KroneckerBlock, pi_damping

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, groups=2).to(DTYPE)
    x = torch.randn(5, 4, 6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    model = nn.Sequential(conv, nn.Flatten()).to(DTYPE)
    A, G = natgrad.kfac_factors(model, x, likelihood="categorical")["0"]
    block = KroneckerBlock(ConvHandler(conv), {"input_cov": A, "grad_cov": G})
    block.refresh(1e-2, "cholesky", DTYPE)
    d_in, d_grad = pi_damping(A, G, 1e-2)
    X = torch.randn(2, 3, 19, dtype=DTYPE, generator=torch.Generator().manual_seed(4))  # 2·9+1
    got = block.precondition(X, 1e-2)
    for j in range(2):
        expected = (torch.linalg.inv(G[j] + d_grad * torch.eye(3, dtype=DTYPE)) @ X[j]
                    @ torch.linalg.inv(A[j] + d_in * torch.eye(19, dtype=DTYPE)))
        assert rel_err(got[j], expected) <= RTOL_EXACT


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
def test_depthwise_networks_get_blocks_and_train(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 36, 3)).to(DTYPE)
    x = torch.randn(16, 1, 6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
        opt = getattr(natgrad, optimizer)(model, loss=nn.CrossEntropyLoss(), stat_every=1)
    assert set(opt.blocks) == {"0", "2", "5"}
    losses = train_losses(opt, model, x, y, 10)
    assert opt.blocks["2"].state["input_cov"].shape == (4, 10, 10)
    assert losses[-1] < 0.5 * losses[0], losses


# --- transposed convolutions: the stride-1 convolution of the spread input ---------------------
TRANSPOSED = {  # layer type, arguments, input's spatial shape, output_size (None: the default)
    "1d-plain": (nn.ConvTranspose1d, dict(kernel_size=3), (5,), None),
    "1d-stride-pad-outpad": (nn.ConvTranspose1d, dict(kernel_size=3, stride=2, padding=1,
                                                      output_padding=1), (4,), None),
    "1d-output-size": (nn.ConvTranspose1d, dict(kernel_size=3, stride=3, padding=1), (4,),
                       [11]),
    "2d-stride-nobias": (nn.ConvTranspose2d, dict(kernel_size=(3, 2), stride=(2, 1),
                                                  bias=False), (3, 4), None),
    "2d-dilation-groups": (nn.ConvTranspose2d, dict(kernel_size=3, stride=2, padding=2,
                                                    dilation=2, groups=2), (4, 3), None),
    "2d-padding-beyond-reach": (nn.ConvTranspose2d, dict(kernel_size=2, padding=2), (5, 5),
                                None),
    "3d-stride": (nn.ConvTranspose3d, dict(kernel_size=2, stride=2), (2, 3, 2), None),
}


def _transposed(config):
    layer_type, kwargs, spatial, output_size = TRANSPOSED[config]
    torch.manual_seed(len(config))
    conv = layer_type(4, 6, **kwargs).to(DTYPE)
    x = torch.randn(2, 4, *spatial, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    return conv, x, output_size


@pytest.mark.parametrize("config", list(TRANSPOSED))
def test_transposed_patches_rebuild_the_layer(config):
    conv, x, output_size = _transposed(config)
    y = conv(x, output_size=output_size).detach()
    handler = ConvTransposeHandler(conv)
    rows = handler.input_rows(handler.call_input(x, y))  # [N·T, (g,) d]
    params = {p: p.detach() for p in handler.params}
    matrix = handler.gather(params)  # the weights in the gradient matrix's layout
    rebuilt = (rows @ matrix.T if handler.groups == 1
               else torch.einsum("tgd,god->tgo", rows, matrix).flatten(1))
    expected = y.movedim(1, -1).reshape(-1, y.shape[1])  # [N·T, C_out]
    assert rel_err(rebuilt, expected) <= RTOL_EXACT
    back = handler.scatter(handler.gather({p: torch.randn_like(p) for p in handler.params}))
    again = handler.scatter(handler.gather(back))
    assert all(torch.equal(back[p], again[p]) for p in handler.params)


@pytest.mark.parametrize("config", ["1d-stride-pad-outpad", "2d-dilation-groups", "3d-stride",
                                    "1d-output-size"])
def test_transposed_kfac_factors_against_the_definition(config):
    """Per sample and class, X_y (autograd on PyTorch's layer) = Σₜ δₜāₜᵀ with δₜ the
    gradient at the layer's output (autograd) and āₜ natgrad's rows; A = (1/(N·T)) Σ āāᵀ and
    G = (1/N) Σₙ Σ_y p(y) Σₜ δₜδₜᵀ from them."""
    conv, x, output_size = _transposed(config)
    y_shape = conv(x, output_size=output_size).shape
    head = nn.Linear(math.prod(y_shape[1:]), 3).to(DTYPE)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = conv, head

        def forward(self, inputs):
            return self.head(self.conv(inputs, output_size=output_size).flatten(1))

    model = Model()
    factors = natgrad.kfac_factors(model, x, likelihood="categorical")
    handler = find_layers(model).handlers["conv"]
    assert isinstance(handler, ConvTransposeHandler)
    groups, sum_a, sum_g, count = handler.groups, 0, 0, 0
    for n in range(x.shape[0]):
        xn = x[n:n + 1]
        out = conv(xn, output_size=output_size)
        rows = handler.input_rows(handler.call_input(xn, out.detach()))
        rows = rows.unsqueeze(1) if groups == 1 else rows  # [T, g, d]
        logp = head(out.flatten(1))[0].log_softmax(-1)
        probs = logp.exp().detach()
        for cls in range(3):
            grads = torch.autograd.grad(logp[cls], [out, *handler.params], retain_graph=True)
            deltas = grads[0].movedim(1, -1).reshape(-1, groups, out.shape[1] // groups)
            X = handler.gather(dict(zip(handler.params, grads[1:], strict=True)))
            X = X.unsqueeze(0) if groups == 1 else X
            assert rel_err(torch.einsum("tgo,tgd->god", deltas, rows), X) <= RTOL_EXACT
            sum_g = sum_g + probs[cls] * torch.einsum("tgo,tgp->gop", deltas, deltas)
        sum_a = sum_a + torch.einsum("tgd,tge->gde", rows, rows)
        count += rows.shape[0]
    A, G = factors["conv"]
    squeeze = (lambda t: t[0]) if groups == 1 else (lambda t: t)  # noqa: E731
    assert rel_err(A, squeeze(sum_a / count)) <= RTOL_EXACT
    assert rel_err(G, squeeze(sum_g / x.shape[0])) <= RTOL_EXACT


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
def test_conv_autoencoders_with_transposed_decoders_train(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(4, 1, 3, padding=1, groups=1),
    ).to(DTYPE)
    x = torch.rand(16, 1, 6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
        opt = getattr(natgrad, optimizer)(model, loss=nn.MSELoss(), stat_every=1)
    assert set(opt.blocks) == {"0", "2", "4"} and opt.fallback == []
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("config", ["1d-stride-pad-outpad", "2d-stride-nobias", "3d-stride"])
def test_transposed_projected_rows_are_the_rows_times_the_basis(config):
    conv, x, output_size = _transposed(config)
    handler = ConvTransposeHandler(conv)
    recorded = handler.call_input(x, conv(x, output_size=output_size).detach())
    rows = handler.input_rows(recorded)
    basis = torch.randn(rows.shape[1], rows.shape[1] - 1, dtype=DTYPE,
                        generator=torch.Generator().manual_seed(4))
    assert rel_err(handler.projected_input_rows(recorded, basis), rows @ basis) <= RTOL_EXACT


@pytest.mark.parametrize("config", [c for c in TRANSPOSED if "groups" not in c])
def test_transposed_input_sum_is_the_patches_outer_product(config):
    """Σ āāᵀ by phases of the stride (the spread input's zeros skipped) against the rows."""
    conv, x, output_size = _transposed(config)
    handler = ConvTransposeHandler(conv)
    recorded = handler.call_input(x, conv(x, output_size=output_size).detach()).float()
    total, count = handler.input_sum(recorded, DTYPE)  # a float32 input summed in float64
    rows = handler.input_rows(recorded.to(DTYPE))
    assert total.dtype == DTYPE and count == rows.shape[0]
    assert rel_err(total, rows.T @ rows) <= RTOL_EXACT
