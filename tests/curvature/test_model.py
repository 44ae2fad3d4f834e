"""FunctionalModel's Jacobian-vector products on models beyond Sequential MLPs, in float64.

The reference is ``torch.autograd.functional.jvp`` (its double-backward route, not forward
mode) on the whole batch's outputs as a function of the parameters, with attention on the
math kernel. Models: causal self-attention written with ``F.scaled_dot_product_attention``
(the CPU flash kernel in the training forward), PyTorch's own ``nn.TransformerEncoderLayer``,
and a custom ``autograd.Function`` that has no forward-mode derivative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import natgrad
from conftest import DTYPE, RTOL_EXACT, rel_err, train_losses
from natgrad.curvature.model import FunctionalModel, reverse_only

VOCAB, WIDTH, HEADS, T, N = 7, 8, 2, 5, 4


class Square(torch.autograd.Function):
    """x² with a backward formula only (no ``jvp``): forward-mode AD cannot pass it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class TinyGPT(nn.Module):
    """Embedding, one pre-norm causal attention block (SDPA), a GELU MLP, a linear head."""

    def __init__(self, custom: bool = False) -> None:
        super().__init__()
        self.custom = custom
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.up, self.down = nn.Linear(WIDTH, 16), nn.Linear(16, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        b, t, _ = h.shape
        q, k, v = self.qkv(self.norm(h)).view(b, t, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(b, t, WIDTH))
        hidden = self.up(h)
        hidden = Square.apply(hidden) * 0.1 if self.custom else F.gelu(hidden)
        return self.head(h + self.down(hidden))


def encoder() -> nn.Module:
    return nn.Sequential(
        nn.Embedding(VOCAB, WIDTH),
        nn.TransformerEncoderLayer(WIDTH, HEADS, dim_feedforward=16, dropout=0.0,
                                   batch_first=True),
        nn.Linear(WIDTH, VOCAB),
    )


MODELS = {"sdpa": lambda: TinyGPT(), "custom-function": lambda: TinyGPT(custom=True),
          "transformer-layer": encoder}


def setup(name: str):
    torch.manual_seed(0)
    model = MODELS[name]().to(DTYPE)
    tokens = torch.randint(VOCAB, (N, T), generator=torch.Generator().manual_seed(1))
    return model, tokens


def reference_jvp(model: nn.Module, tokens: torch.Tensor, tangent: list[torch.Tensor]):
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def outputs(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (tokens,))

    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.jvp(outputs, params, tuple(tangent))[1]


def test_the_training_forward_uses_a_kernel_without_forward_mode_ad():
    """Negative control: plain forward-mode AD through the model's own attention fails (the
    CPU flash kernel), so the products below are not passing by accident."""
    model, tokens = setup("sdpa")
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises((NotImplementedError, RuntimeError)):
        x = fwAD.make_dual(torch.randn(N, HEADS, T, 4, dtype=DTYPE),
                           torch.randn(N, HEADS, T, 4, dtype=DTYPE))
        F.scaled_dot_product_attention(x, x, x, is_causal=True)
    assert model(tokens).shape == (N, T, VOCAB)


@pytest.mark.parametrize("name", list(MODELS))
def test_jvp_matches_the_double_backward_reference(name):
    model, tokens = setup(name)
    gen = torch.Generator().manual_seed(2)
    tangents = [[torch.randn(p.shape, dtype=DTYPE, generator=gen) for p in model.parameters()]
                for _ in range(2)]
    fmodel = FunctionalModel(model)
    outputs, products = fmodel.jvp((tokens,), tangents)
    assert rel_err(outputs, model(tokens).detach()) <= RTOL_EXACT
    for tangent, product in zip(tangents, products, strict=True):
        assert rel_err(product, reference_jvp(model, tokens, tangent)) <= RTOL_EXACT
    # the custom Function has no forward-mode derivative: the model went reverse-only
    assert reverse_only(model) == (name == "custom-function")
    _, again = fmodel.jvp_reverse((tokens,), tangents)
    for product, other in zip(products, again, strict=True):
        assert rel_err(other, product) <= RTOL_EXACT


@pytest.mark.parametrize("name", list(MODELS))
def test_fisher_vector_product_through_attention(name):
    """F v = Jᵀ Λ J v / N against the explicit Jacobian (math kernel) and Λ."""
    model, tokens = setup(name)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DTYPE,
                    generator=torch.Generator().manual_seed(3))
    got = natgrad.fisher_vector_product(model, tokens, v, likelihood="categorical")
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def outputs(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (tokens,))

    with sdpa_kernel([SDPBackend.MATH]):
        jac = torch.autograd.functional.jacobian(outputs, params)
        out = outputs(*params)
    J = torch.cat([j.reshape(out.numel(), -1) for j in jac], dim=1)
    probs = out.softmax(-1).reshape(-1, VOCAB)
    blocks = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    lam = torch.block_diag(*blocks)
    assert rel_err(got, J.T @ lam @ J @ v / N) <= RTOL_EXACT


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC", "NGDCG", "NaturalGradient"])
def test_defaults_train_models_with_fused_attention(name, optimizer):
    """natgrad's defaults (automatic lr, momentum, damping) on a token-mean language-model
    loss: no crash from the attention kernel or the custom Function, and the loss falls."""
    model, tokens = setup(name)
    targets = torch.roll(tokens, -1, dims=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the encoder's packed attention uses the fallback
        extra = {} if optimizer == "NaturalGradient" else {"stat_every": 1}
        opt = getattr(natgrad, optimizer)(model, loss=nn.CrossEntropyLoss(), lr="auto",
                                          momentum="auto", damping="auto", **extra)
    losses = train_losses(opt, model, tokens, targets, 8)
    assert opt.state["natgrad"]["skipped_steps"] == 0
    assert losses[-1] < 0.8 * losses[0], losses
