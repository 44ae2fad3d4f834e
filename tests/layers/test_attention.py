"""nn.MultiheadAttention's Kronecker blocks (packed in-projection and out_proj), in float64.

* While natgrad watches it, the module runs natgrad's forward: the same outputs as PyTorch's
  (batch_first or not; no mask, an additive or a boolean 2-D mask, the causal hint), each
  projection reported once per call, and PyTorch's own forward back after the hooks go.
* With one sample and one position K-FAC is exact: G ⊗ A of each projection equals its
  block of the true Fisher from per-class gradients (autograd on the parameters).
* Calls natgrad does not take over (need_weights=True, a key padding mask) run PyTorch's
  forward, and the optimizer names the layers it did not see.
* PyTorch's TransformerEncoderLayer gets blocks for everything and trains with the defaults.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import natgrad
from conftest import DTYPE, RTOL_EXACT, rel_err, train_losses
from natgrad.layers.capture import LayerCapture, find_layers

E, H, L, B = 8, 2, 5, 3


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first)

    def forward(self, x, mask=None, causal=False, **kwargs):
        kwargs.setdefault("need_weights", False)
        return self.mha(x, x, x, attn_mask=mask, is_causal=causal, **kwargs)[0]


MASKS = {
    "none": (None, False),
    "additive": (nn.Transformer.generate_square_subsequent_mask(L, dtype=DTYPE), False),
    "additive-causal-hint": (nn.Transformer.generate_square_subsequent_mask(L, dtype=DTYPE),
                             True),
    "bool": (torch.triu(torch.ones(L, L, dtype=torch.bool), 1), False),
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_natgrads_forward_equals_pytorchs(batch_first, mask):
    torch.manual_seed(0)
    model = SelfAttention(batch_first).to(DTYPE)
    shape = (B, L, E) if batch_first else (L, B, E)
    x = torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    attn_mask, causal = MASKS[mask]
    expected = model(x, attn_mask, causal)
    with LayerCapture(model, find_layers(model).handlers) as capture:
        got = model(x, attn_mask, causal)
        calls = {name: len(c) for name, c in capture.records[-1].calls.items()}
        twin = copy.deepcopy(model)  # a copy computes with its own weights, reports nothing
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(0.5)
        before = len(capture.records)
        assert rel_err(twin(x, attn_mask, causal), expected) > 1e-3
        twin_expected = twin.mha.__class__.forward(twin.mha, x, x, x, need_weights=False,
                                                   attn_mask=attn_mask, is_causal=causal)[0]
        assert rel_err(twin(x, attn_mask, causal), twin_expected) <= RTOL_EXACT
        assert len(capture.records) == before and not capture._current
    assert rel_err(got, expected) <= RTOL_EXACT
    assert calls == {"mha.in_proj": 1, "mha.out_proj": 1}
    assert "forward" not in model.mha.__dict__  # PyTorch's forward is back


def test_kfac_is_exact_for_both_projections_with_one_position():
    torch.manual_seed(2)
    model = nn.Sequential(SelfAttention(), nn.Flatten()).to(DTYPE)
    mha = model[0].mha
    x = torch.randn(1, 1, E, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    factors = natgrad.kfac_factors(model, x, likelihood="categorical")
    logits = model(x)[0]
    probs = logits.softmax(-1).detach()
    pieces = {"0.mha.in_proj": (mha.in_proj_weight, mha.in_proj_bias),
              "0.mha.out_proj": (mha.out_proj.weight, mha.out_proj.bias)}
    for name, (weight, bias) in pieces.items():
        blocks = []
        for y in range(logits.shape[0]):
            gw, gb = torch.autograd.grad(logits.log_softmax(-1)[y], [weight, bias],
                                         retain_graph=True)
            g = torch.cat([gw, gb.unsqueeze(1)], dim=1).reshape(-1)
            blocks.append(probs[y] * torch.outer(g, g))
        A, G = factors[name]
        assert rel_err(torch.kron(G, A), torch.stack(blocks).sum(0)) <= RTOL_EXACT, name


def test_calls_natgrad_does_not_take_over_run_pytorchs_forward_and_are_named():
    torch.manual_seed(0)
    model = SelfAttention().to(DTYPE)
    x = torch.randn(B, L, E, dtype=DTYPE)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, -1] = True
    expected = model(x, need_weights=True)
    opt = natgrad.KFAC(model, likelihood="gaussian", stat_every=1)
    assert rel_err(model(x, need_weights=True), expected) <= RTOL_EXACT
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        opt.zero_grad()
        model(x, key_padding_mask=padding).square().sum().div(B).backward()
        opt.step()
    messages = [str(r.message) for r in records if issubclass(r.category, RuntimeWarning)]
    assert messages == ["these layers were not called in the model's forward, their parameters "
                        "take plain gradient steps until they are: mha.in_proj, mha.out_proj"]


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
def test_pytorchs_transformer_layer_gets_blocks_and_trains(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(7, E),
        nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True),
        nn.Linear(E, 7),
    ).to(DTYPE)
    tokens = torch.randint(7, (B, L), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback, no uncalled layer
        opt = getattr(natgrad, optimizer)(model, loss=nn.CrossEntropyLoss(), stat_every=1)
        losses = train_losses(opt, model, tokens, torch.roll(tokens, -1, 1), 10)
    assert {"1.self_attn.in_proj", "1.self_attn.out_proj"} <= set(opt.blocks)
    assert opt.fallback == []
    assert losses[-1] < 0.7 * losses[0], losses
