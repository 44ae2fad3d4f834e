"""FunctionalModel's Jacobian-vector products on models beyond Sequential MLPs, in float64.

The reference is ``torch.autograd.functional.jvp`` (its double-backward route, not forward
mode) on the whole batch's outputs as a function of the parameters, with attention on the
math kernel. Models: causal self-attention written with ``F.scaled_dot_product_attention``
(the CPU flash kernel in the training forward), PyTorch's own ``nn.TransformerEncoderLayer``,
a custom ``autograd.Function`` that has no forward-mode derivative, a GPT with a tied head
over every attention form natgrad's forward rule takes (causal, a learned additive mask,
grouped-query, a boolean padding mask from keyword inputs) for k = 1, 2, 3 tangents, and
Hugging Face's GPT-2 and Llama called with keywords. The last two run both routes of
:meth:`FunctionalModel.jvp`: the stacked pass (all tangents at once) and forward-mode AD one
tangent at a time (the route of a model the stacked pass does not take).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import natgrad
from conftest import DTYPE, RTOL_EXACT, rel_err, train_losses
from natgrad._calls import CallLayout
from natgrad.curvature.model import (
    FunctionalModel,
    mark_unstacked,
    reverse_only,
    unstacked_reason,
)

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
    # the stacked pass takes the plain GPT; not the custom Function (its forward runs with
    # forward-mode AD off) nor the encoder layer (multi_head_attention_forward has no rule)
    assert (unstacked_reason(model) is None) == (name == "sdpa")
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


class TiedGPT(nn.Module):
    """A GPT-like model over every attention form the forward rule takes: token and position
    embeddings, pre-norm blocks (LayerNorm, SDPA, residual adds, a GELU MLP), a final
    LayerNorm and a head tied to the token embedding.

    ``attention``: ``causal`` (``is_causal``), ``bias`` (a learned additive mask with −∞ above
    the diagonal: a mask with a tangent), ``grouped`` (two key/value heads for four query
    heads, ``enable_gqa``, an explicit scale). Called with keywords
    (``input_ids=..., attention_mask=...``, a dict with ``logits`` out, as Hugging Face's
    models are) the padding mask joins the causal one as a boolean mask; left padding leaves
    queries that see no key (PyTorch's safe softmax gives them 0).
    """

    def __init__(self, attention: str = "causal", heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.attention, self.heads = attention, heads
        self.kv_heads = heads // 2 if attention == "grouped" else heads
        head = WIDTH // heads
        self.tokens, self.positions = nn.Embedding(VOCAB, WIDTH), nn.Embedding(T, WIDTH)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(WIDTH), q=nn.Linear(WIDTH, WIDTH),
            kv=nn.Linear(WIDTH, 2 * self.kv_heads * head), proj=nn.Linear(WIDTH, WIDTH),
            norm2=nn.LayerNorm(WIDTH), up=nn.Linear(WIDTH, 16), down=nn.Linear(16, WIDTH),
        )) for _ in range(layers))
        self.bias = nn.Parameter(0.1 * torch.randn(heads, T, T))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        b, t = input_ids.shape
        h = self.tokens(input_ids) + self.positions(torch.arange(t))
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        options = {"is_causal": True}
        if attention_mask is not None:
            options = {"attn_mask": causal & attention_mask.bool()[:, None, None, :]}
        elif self.attention == "bias":
            options = {"attn_mask": self.bias[:, :t, :t].masked_fill(~causal, -torch.inf)}
        elif self.attention == "grouped":
            options = {"is_causal": True, "enable_gqa": True, "scale": 0.3}
        for block in self.blocks:
            q = block["q"](block["norm1"](h)).view(b, t, self.heads, -1).transpose(1, 2)
            k, v = block["kv"](block["norm1"](h)).view(b, t, 2, self.kv_heads, -1).unbind(2)
            attended = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                                      **options)
            h = h + block["proj"](attended.transpose(1, 2).reshape(b, t, WIDTH))
            h = h + block["down"](F.gelu(block["up"](block["norm2"](h))))
        logits = self.head(self.norm(h))
        return logits if attention_mask is None else {"logits": logits}


def _reference(model: nn.Module, inputs: tuple[torch.Tensor, ...], layout: CallLayout | None,
               tangent: list[torch.Tensor]) -> torch.Tensor:
    """J·t by ``torch.autograd.functional.jvp`` (double backward) on the math kernel."""
    names = [n for n, _ in model.named_parameters()]

    def outputs(*ps):
        kwargs = {} if layout is None else layout.keywords_of(inputs)
        positional = inputs if layout is None else inputs[: layout.positional]
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), positional,
                                         kwargs)
        return out if isinstance(out, torch.Tensor) else out["logits"]  # a dict or ModelOutput

    params = tuple(p.detach() for p in model.parameters())
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.jvp(outputs, params, tuple(tangent))[1]


@pytest.mark.parametrize("route", ["stacked", "per-tangent"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("attention", ["causal", "bias", "grouped", "keywords"])
def test_products_of_a_tied_transformer(attention, k, route, monkeypatch):
    """k tangents through :meth:`FunctionalModel.jvp`, each against
    ``torch.autograd.functional.jvp``; outputs against the training forward. ``stacked``: all
    at once; ``per-tangent``: one forward-mode pass each, through natgrad's attention rule."""
    from natgrad.curvature import forward_rules

    calls = []
    original = forward_rules._Attention.forward
    monkeypatch.setattr(forward_rules._Attention, "forward",
                        staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a)))
    torch.manual_seed(0)
    model = TiedGPT("causal" if attention == "keywords" else attention).to(DTYPE)
    tokens = torch.randint(VOCAB, (N, T), generator=torch.Generator().manual_seed(1))
    layout = None
    inputs = (tokens,)
    if attention == "keywords":  # left padding: row 0's first query sees no key
        mask = torch.ones(N, T, dtype=torch.long)
        mask[0, :2] = mask[1, :1] = 0
        layout = CallLayout(0, ("input_ids", "attention_mask"))
        inputs = (tokens, mask)
    gen = torch.Generator().manual_seed(2)
    tangents = [[torch.randn(p.shape, dtype=DTYPE, generator=gen) for p in model.parameters()]
                for _ in range(k)]
    fmodel = FunctionalModel(model, layout=layout)
    if route == "per-tangent":
        mark_unstacked(model, "the test asks for the per-tangent route")
    outputs, products = fmodel.jvp(inputs, tangents)
    # per tangent, every block's attention went through the forward-mode rule; stacked
    # (k = 1 too), none
    assert len(calls) == (2 * k if route == "per-tangent" else 0)
    assert route == "per-tangent" or unstacked_reason(model) is None
    assert not reverse_only(model)
    training = fmodel.call(inputs).detach()
    assert torch.isfinite(training).all()
    assert rel_err(outputs, training) <= RTOL_EXACT
    for tangent, product in zip(tangents, products, strict=True):
        assert rel_err(product, _reference(model, inputs, layout, tangent)) <= RTOL_EXACT
    # the tied weight is one parameter: its tangent moves the embedding and the head together
    assert len(fmodel.params) == len(list(model.parameters()))


def _hugging_face(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if name == "gpt2":  # NewGELU (Python numbers), Conv1D layers, tied head
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=2, n_head=HEADS,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        build = transformers.GPT2LMHeadModel
    else:  # rotary embeddings (constants times tangents), RMSNorm, grouped-query attention
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=16,
            bos_token_id=0, eos_token_id=0, pad_token_id=0)
        build = transformers.LlamaForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return build(config).to(DTYPE)


@pytest.mark.parametrize("route", ["stacked", "per-tangent"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_products_of_hugging_face_models_called_with_keywords(name, route):
    """Hugging Face causal LMs called as ``model(input_ids=..., attention_mask=...)`` with
    left and right padding: two tangents against ``torch.autograd.functional.jvp``, by either
    route of :meth:`FunctionalModel.jvp`."""
    model = _hugging_face(name)
    if route == "per-tangent":
        mark_unstacked(model, "the test asks for the per-tangent route")
    tokens = torch.randint(1, VOCAB, (N, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(N, T, dtype=torch.long)
    mask[0, :2] = mask[1, -1] = 0
    layout = CallLayout(0, ("input_ids", "attention_mask"))
    gen = torch.Generator().manual_seed(2)
    tangents = [[torch.randn(p.shape, dtype=DTYPE, generator=gen) for p in model.parameters()]
                for _ in range(2)]
    fmodel = FunctionalModel(model, layout=layout)
    outputs, products = fmodel.jvp((tokens, mask), tangents)
    assert not reverse_only(model)
    assert route == "per-tangent" or unstacked_reason(model) is None
    assert rel_err(outputs, fmodel.call((tokens, mask)).detach()) <= RTOL_EXACT
    for tangent, product in zip(tangents, products, strict=True):
        assert rel_err(product, _reference(model, (tokens, mask), layout, tangent)) <= RTOL_EXACT
