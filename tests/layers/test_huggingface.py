"""Hugging Face's layers (GPT-2's Conv1D, the RMSNorm family) and PyTorch's nn.RMSNorm.

* Conv1D: with one sample and one position K-FAC is exact, so G ⊗ A equals the layer's
  block of the true Fisher from per-class gradients (autograd on the transposed weight).
* RMSNorm: the dense block's per-sample gradients equal autograd's, one sample at a time
  (float64 for torch's nn.RMSNorm; float32 for Hugging Face's, which compute in float32).
* An RMSNorm of another form (a gate input, a squared weight) takes the fallback, named.
* Tiny GPT-2 and Llama models built from configs (no download), called with keywords as
  their users call them, get blocks for every parameter and train with KFAC and EKFAC.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import natgrad
from conftest import DTYPE, RTOL_EXACT, rel_err
from natgrad.layers.capture import find_layers
from natgrad.layers.huggingface import Conv1DHandler, RMSNormHandler
from natgrad.layers.norm import NormHandler

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, T, BATCH = 23, 7, 4


def test_conv1d_kfac_is_exact_with_one_position():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 3)).to(DTYPE)  # nf = 5 outputs, nx = 3 inputs
    with torch.no_grad():
        model[0].bias.normal_()
    assert isinstance(find_layers(model).handlers["0"], Conv1DHandler)
    x = torch.randn(1, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    A, G = natgrad.kfac_factors(model, x, likelihood="categorical")["0"]
    logits = model(x)[0]
    probs = logits.softmax(-1).detach()
    block = torch.zeros(5 * 4, 5 * 4, dtype=DTYPE)
    for y in range(5):
        gw, gb = torch.autograd.grad(logits.log_softmax(-1)[y], [model[0].weight, model[0].bias],
                                     retain_graph=True)
        g = torch.cat([gw.T, gb.unsqueeze(1)], dim=1).reshape(-1)  # [∇Wᵀ | ∇b], row-major
        block += probs[y] * torch.outer(g, g)
    assert rel_err(torch.kron(G, A), block) <= RTOL_EXACT


def test_conv1d_gather_and_scatter_are_inverse():
    layer = Conv1D(5, 3)
    handler = Conv1DHandler(layer)
    grads = {layer.weight: torch.randn(3, 5), layer.bias: torch.randn(5)}
    matrix = handler.gather(grads)
    assert matrix.shape == (5, 4)
    back = handler.scatter(matrix)
    assert torch.equal(back[layer.weight], grads[layer.weight])
    assert torch.equal(back[layer.bias], grads[layer.bias])


def _per_sample_grads(norm: nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor):
    rows = []
    for n in range(inputs.shape[0]):
        out = norm(inputs[n : n + 1])
        (g,) = torch.autograd.grad(out, [norm.weight], grad_out[n : n + 1])
        rows.append(g.reshape(-1))
    return torch.stack(rows)


def test_torch_rms_norm_per_sample_grads_equal_autograd():
    torch.manual_seed(0)
    norm = nn.RMSNorm(6, eps=1e-5).to(DTYPE)
    with torch.no_grad():
        norm.weight.normal_()
    handler = find_layers(nn.Sequential(norm)).handlers["0"]
    assert isinstance(handler, NormHandler)
    inputs = torch.randn(3, T, 6, dtype=DTYPE)
    grad_out = torch.randn(3, T, 6, dtype=DTYPE)
    got = handler.per_sample_grads(inputs, grad_out)
    assert rel_err(got, _per_sample_grads(norm, inputs, grad_out)) <= RTOL_EXACT


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_huggingface_rms_norm_per_sample_grads_equal_autograd(name):
    if name == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as Norm
    else:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm as Norm
    torch.manual_seed(0)
    norm = Norm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    handler = find_layers(nn.Sequential(norm)).handlers["0"]
    assert isinstance(handler, RMSNormHandler)
    inputs, grad_out = torch.randn(3, T, 6), torch.randn(3, T, 6)
    got = handler.per_sample_grads(inputs, grad_out)
    # the layers normalise in float32 whatever the parameters' dtype: a float32 tolerance
    assert rel_err(got, _per_sample_grads(norm, inputs, grad_out)) <= 1e-5


class GatedRMSNorm(nn.Module):  # Mamba-2's form: a second input
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = 1e-6

    def forward(self, x, gate=None):
        x = x if gate is None else x * torch.sigmoid(gate)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class SquaredRMSNorm(nn.Module):  # y = x̂ ⊙ w²: ∂y/∂w is not x̂
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((d,), 1.5))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight**2 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("norm", [GatedRMSNorm(6), SquaredRMSNorm(6)],
                         ids=["gated", "squared-weight"])
def test_rms_norms_of_another_form_take_the_fallback(norm):
    layers = find_layers(nn.Sequential(nn.Linear(4, 6), norm))
    assert list(layers.handlers) == ["0"]
    assert "is not a supported layer type" in layers.fallback["1.weight"]


def _gpt2(tie: bool = True):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, T), generator=generator)
    mask = torch.ones(BATCH, T, dtype=torch.long)
    mask[0, -2:] = 0  # right padding: no attention to, no loss at those positions
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_huggingface_causal_lms_get_blocks_and_train_with_keyword_calls(build, optimizer):
    torch.manual_seed(0)
    model = build()
    layers = find_layers(model)
    assert layers.fallback == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback, no uncalled layer
        opt = getattr(natgrad, optimizer)(model, loss=nn.CrossEntropyLoss())
        batch = _batch()
        losses = []
        for _ in range(6):
            opt.zero_grad()
            out = model(**batch)  # the loss Hugging Face computes: shifted, -100 ignored
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert opt.state_dict()["state"]  # natgrad, not a no-op, took the steps


def _train_gpt2(steps: int) -> tuple[nn.Module, natgrad.KFAC]:
    torch.manual_seed(0)
    model = _gpt2().to(DTYPE)
    opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss())
    for k in range(steps):
        opt.zero_grad()
        model(**_batch(seed=k)).loss.backward()
        opt.step()
    return model, opt


def test_labels_are_left_out_of_natgrads_own_calls_of_a_causal_lm():
    """GPT-2's logits do not depend on ``labels``: natgrad's own evaluations (the quadratic
    model's products, the per-step check) call it without them, so they compute no loss,
    and the steps are those of calls with them up to rounding (float64; without the loss the
    products take the stacked-tangent route, with it the per-tangent one)."""
    from unittest import mock

    from natgrad.layers import capture
    from natgrad.layers.huggingface import loss_keywords

    assert loss_keywords(_gpt2()) == {"labels"}
    assert loss_keywords(nn.Linear(2, 2)) == frozenset()
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    assert loss_keywords(t5) == frozenset()  # builds its decoder inputs from labels
    model, opt = _train_gpt2(3)
    with mock.patch.object(capture, "loss_keywords", lambda m: frozenset()):
        reference, ref_opt = _train_gpt2(3)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert rel_err(p, q) <= RTOL_EXACT
    model(**_batch(seed=9))  # a recorded forward: called again without labels
    assert opt._capture.records[-1].layout.keywords == ("input_ids", "attention_mask")
