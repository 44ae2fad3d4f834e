"""nn.MultiheadAttention's Kronecker blocks (in-projections and out_proj), in float64.

* While natgrad watches it, the module runs natgrad's forward: the same outputs as PyTorch's
  for self-attention, cross-attention (key is value, or three tensors) and separate kdim/vdim
  weights, batch_first or not, with no mask, additive, boolean, 3-D and key padding masks
  and the causal hint; each projection reported once per call (one packed in_proj call for
  self-attention, q_proj/k_proj/v_proj otherwise), PyTorch's own forward back after.
* K-FAC is exact where a projection has one input row per sample: G ⊗ A equals its block of
  the true Fisher from per-class gradients (autograd on the parameters). Where the key and
  value projections see several positions (the key projection has no gradient with one), A
  and G equal K-FAC's definition with each position's δ recovered from the same per-class
  parameter gradients (X = Σₜ δₜ āₜᵀ with independent āₜ).
* The optimizer preconditions each row partition of the packed weight with its own damped
  inverse, and the rows' state survives state_dict.
* With need_weights=True (the module's default) natgrad's forward returns PyTorch's
  attention weights too. Calls natgrad does not take over (unbatched inputs) run PyTorch's
  forward, and the optimizer names the layers it did not see.
* PyTorch's TransformerEncoderLayer (with and without a key padding mask),
  TransformerDecoderLayer (self- and cross-attention) and an attention with kdim/vdim get
  blocks for everything and train with KFAC's and EKFAC's defaults.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import natgrad
from conftest import DTYPE, RTOL_EXACT, rel_err, train_losses
from natgrad.layers.capture import LayerCapture, find_layers

E, H, L, S, B = 8, 2, 4, 5, 3
KDIM, VDIM = 5, 3
KINDS = ("self", "cross-kv", "cross", "separate")


class Attention(nn.Module):
    """One MultiheadAttention called as ``kind`` says: self-attention, cross-attention with
    key is value, with three different tensors, or with separate kdim/vdim weights."""

    def __init__(self, kind: str, batch_first: bool = True, flat: bool = False) -> None:
        super().__init__()
        dims = dict(kdim=KDIM, vdim=VDIM) if kind == "separate" else {}
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **dims)
        self.kind, self.flat = kind, flat

    def forward(self, x, key=None, value=None, **kwargs):
        kwargs.setdefault("need_weights", False)
        if self.kind == "self":
            key = value = x
        elif self.kind == "cross-kv":
            value = key
        out = self.mha(x, key, value, **kwargs)[0]
        return out.flatten(1) if self.flat else out


def make_inputs(kind, batch=B, length=L, source=S, batch_first=True, seed=1):
    """(query, key, value) for ``kind`` (self-attention: the query alone)."""
    gen = torch.Generator().manual_seed(seed)
    shape = lambda n, d: (batch, n, d) if batch_first else (n, batch, d)  # noqa: E731
    query = torch.randn(*shape(length, E), dtype=DTYPE, generator=gen)
    if kind == "self":
        return (query,)
    kdim, vdim = (KDIM, VDIM) if kind == "separate" else (E, E)
    key = torch.randn(*shape(source, kdim), dtype=DTYPE, generator=gen)
    value = torch.randn(*shape(source, vdim), dtype=DTYPE, generator=gen)
    return (query, key) if kind == "cross-kv" else (query, key, value)


def make_mask(name, length, source):
    """Keyword arguments of one mask setting (no query row has every key masked)."""
    future = torch.ones(length, source, dtype=torch.bool).triu(1)
    additive = torch.zeros(length, source, dtype=DTYPE).masked_fill(future, float("-inf"))
    padding = torch.zeros(B, source, dtype=torch.bool)
    padding[0, -1] = padding[2, -2:] = True
    padding_float = torch.zeros(B, source, dtype=DTYPE).masked_fill(padding, float("-inf"))
    gen = torch.Generator().manual_seed(7)
    return {
        "none": {},
        "additive": dict(attn_mask=additive),
        "bool": dict(attn_mask=future),
        "causal-hint": dict(attn_mask=additive, is_causal=True),
        "3d": dict(attn_mask=torch.randn(B * H, length, source, dtype=DTYPE, generator=gen)),
        "padding": dict(key_padding_mask=padding),
        "padding+bool": dict(key_padding_mask=padding, attn_mask=future),
        "padding-float+causal-hint": dict(key_padding_mask=padding_float, attn_mask=additive,
                                          is_causal=True),
    }[name]


def projection_names(kind, prefix="mha"):
    roles = ["in"] if kind == "self" else ["q", "k", "v"]
    return {f"{prefix}.{r}_proj" for r in [*roles, "out"]}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "additive", "bool", "causal-hint", "3d", "padding",
                                  "padding+bool", "padding-float+causal-hint"])
def test_natgrads_forward_equals_pytorchs(kind, batch_first, mask):
    torch.manual_seed(0)
    model = Attention(kind, batch_first).to(DTYPE)
    inputs = make_inputs(kind, source=L if kind == "self" else S, batch_first=batch_first)
    kwargs = make_mask(mask, L, L if kind == "self" else S)
    expected = model(*inputs, **kwargs)
    with LayerCapture(model, find_layers(model).handlers) as capture:
        got = model(*inputs, **kwargs)
        calls = {name: len(c) for name, c in capture.records[-1].calls.items()}
    assert torch.isfinite(expected).all()
    assert rel_err(got, expected) <= RTOL_EXACT
    assert calls == dict.fromkeys(projection_names(kind), 1)
    assert "forward" not in model.mha.__dict__  # PyTorch's forward is back


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask", ["none", "additive", "bool", "causal-hint", "3d", "padding",
                                  "padding+bool", "padding-float+causal-hint"])
def test_natgrads_forward_with_attention_weights_equals_pytorchs(kind, mask):
    torch.manual_seed(0)
    model = Attention(kind, batch_first=mask != "3d").to(DTYPE)
    inputs = make_inputs(kind, source=L if kind == "self" else S, batch_first=mask != "3d")
    kwargs = make_mask(mask, L, L if kind == "self" else S)
    kwargs.update(need_weights=True, average_attn_weights=mask in ("none", "bool", "padding"))
    expected = model.mha(*model_args(model, inputs), **kwargs)
    with LayerCapture(model, find_layers(model).handlers) as capture:
        got = model.mha(*model_args(model, inputs), **kwargs)
        calls = {name: len(c) for name, c in capture._current.items()}
    assert rel_err(got[0], expected[0]) <= RTOL_EXACT
    assert got[1].shape == expected[1].shape and rel_err(got[1], expected[1]) <= RTOL_EXACT
    assert calls == dict.fromkeys(projection_names(kind), 1)


def model_args(model, inputs):
    """(query, key, value) of ``model``'s attention call on ``inputs``."""
    query, *rest = inputs
    if model.kind == "self":
        return query, query, query
    return (query, rest[0], rest[0]) if model.kind == "cross-kv" else (query, *rest)


def test_a_copy_of_a_watched_attention_runs_pytorchs_forward_and_reports_nothing():
    torch.manual_seed(0)
    model = Attention("cross").to(DTYPE)
    inputs = make_inputs("cross")
    expected = model(*inputs)
    with LayerCapture(model, find_layers(model).handlers) as capture:
        model(*inputs)
        twin = copy.deepcopy(model)  # a copy computes with its own weights, reports nothing
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(0.5)
        before = len(capture.records)
        assert rel_err(twin(*inputs), expected) > 1e-3
        twin_expected = type(twin.mha).forward(twin.mha, *inputs, need_weights=False)[0]
        assert rel_err(twin(*inputs), twin_expected) <= RTOL_EXACT
        assert len(capture.records) == before and not capture._current


def test_a_packed_attention_feeds_its_row_blocks_once_it_has_had_a_cross_call():
    torch.manual_seed(0)
    model = Attention("cross-kv").to(DTYPE)
    x, memory = make_inputs("cross-kv", source=L)
    mha = model.mha
    with LayerCapture(model, find_layers(model).handlers) as capture:
        first = mha(x, x, x, need_weights=False)[0]
        mha(x, memory, memory, need_weights=False)
        again = mha(x, x, x, need_weights=False)[0]
        calls = {name: len(c) for name, c in capture._current.items()}
    assert rel_err(first, again) <= RTOL_EXACT
    assert rel_err(again, mha(x, x, x, need_weights=False)[0]) <= RTOL_EXACT
    assert calls == {"mha.in_proj": 1, "mha.q_proj": 2, "mha.k_proj": 2, "mha.v_proj": 2,
                     "mha.out_proj": 3}


def test_layers_of_each_kind_of_attention():
    for kind, names in (("cross", {"in", "q", "k", "v", "out"}), ("separate", {"q", "k", "v",
                                                                                "out"})):
        layers = find_layers(Attention(kind))
        assert set(layers.handlers) == {f"mha.{n}_proj" for n in names}, kind
        assert layers.fallback == {} and layers.shared == {}, kind
    frozen = Attention("separate")
    frozen.mha.k_proj_weight.requires_grad_(False)
    assert set(find_layers(frozen).fallback) == {  # the module falls back as a whole
        "mha.q_proj_weight", "mha.v_proj_weight", "mha.in_proj_bias", "mha.out_proj.weight",
        "mha.out_proj.bias"}


# --- exactness against the Fisher --------------------------------------------------------------
def test_kfac_is_exact_for_self_attention_with_one_position():
    torch.manual_seed(2)
    model = Attention("self", flat=True).to(DTYPE)
    mha = model.mha
    x = torch.randn(1, 1, E, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    factors = natgrad.kfac_factors(model, x, likelihood="categorical")
    logits = model(x)[0]
    probs = logits.softmax(-1).detach()
    pieces = {"mha.in_proj": (mha.in_proj_weight, mha.in_proj_bias),
              "mha.out_proj": (mha.out_proj.weight, mha.out_proj.bias)}
    for name, (weight, bias) in pieces.items():
        blocks = []
        for y in range(logits.shape[0]):
            gw, gb = torch.autograd.grad(logits.log_softmax(-1)[y], [weight, bias],
                                         retain_graph=True)
            g = torch.cat([gw, gb.unsqueeze(1)], dim=1).reshape(-1)
            blocks.append(probs[y] * torch.outer(g, g))
        A, G = factors[name]
        assert rel_err(torch.kron(G, A), torch.stack(blocks).sum(0)) <= RTOL_EXACT, name


def _projections(model, inputs):
    """Block name → (weight, its rows or None, its rows of in_proj_bias, input rows [T, d])."""
    mha, rows = model.mha, [slice(i * E, (i + 1) * E) for i in range(3)]
    query, key = inputs[0][0], inputs[1][0]
    value = inputs[-1][0]
    if model.kind == "separate":
        weights = [(mha.q_proj_weight, None), (mha.k_proj_weight, None),
                   (mha.v_proj_weight, None)]
    else:
        weights = [(mha.in_proj_weight, r) for r in rows]
    out = {f"mha.{role}_proj": (w, r, rows[i], x) for i, (role, (w, r), x)
           in enumerate(zip("qkv", weights, (query, key, value), strict=True))}
    head_inputs = None  # out_proj's input row is checked through the Fisher (one position)
    out["mha.out_proj"] = (mha.out_proj.weight, None, slice(None), head_inputs)
    return out


@pytest.mark.parametrize("kind", ["cross-kv", "cross", "separate"])
@pytest.mark.parametrize("source", [1, 3])
def test_kfac_of_each_projection_against_per_class_gradients(kind, source):
    """One query position: q_proj and out_proj have one input row per sample, K-FAC is their
    exact Fisher block. k_proj and v_proj see ``source`` positions: with one, v_proj's block
    is exact too (q_proj and k_proj have no gradient: softmax over one key); with three, A
    and G are K-FAC's definition with the per-position δₜ recovered from the parameter
    gradients."""
    torch.manual_seed(2)
    model = Attention(kind, flat=True).to(DTYPE)
    inputs = make_inputs(kind, batch=1, length=1, source=source, seed=3)
    factors = natgrad.kfac_factors(model, inputs, likelihood="categorical")
    assert set(factors) == projection_names(kind)
    logits = model(*inputs)[0]
    probs = logits.softmax(-1).detach()
    checked_fisher = []
    for name, (weight, rows, bias_rows, x) in _projections(model, inputs).items():
        bias = model.mha.out_proj.bias if name.endswith("out_proj") else model.mha.in_proj_bias
        grads = []
        for y in range(logits.shape[0]):  # X_y = [∇W | ∇b] of log p(y), the projection's rows
            gw, gb = torch.autograd.grad(logits.log_softmax(-1)[y], [weight, bias],
                                         retain_graph=True)
            gw = gw if rows is None else gw[rows]
            grads.append(torch.cat([gw, gb[bias_rows].unsqueeze(1)], dim=1))
        A, G = factors[name]
        if x is None or x.shape[0] == 1:  # one input row: the Fisher block itself
            fisher = sum(p * torch.outer(g.reshape(-1), g.reshape(-1))
                         for p, g in zip(probs, grads, strict=True))
            if source == 1 and name[-6] in "qk":  # softmax over one key: q, k don't count
                assert fisher.norm() == 0 and G.norm() == 0, name
                continue
            assert fisher.norm() > 0
            assert rel_err(torch.kron(G, A), fisher) <= RTOL_EXACT, name
            checked_fisher.append(name)
            continue
        rows_in = torch.cat([x, torch.ones(x.shape[0], 1, dtype=DTYPE)], dim=1)  # āₜ, [T, d+1]
        solve = rows_in.T @ torch.linalg.inv(rows_in @ rows_in.T)  # X = Σₜ δₜāₜᵀ → [δₜ]
        deltas = [g @ solve for g in grads]  # [E, T] per class
        for g, d in zip(grads, deltas, strict=True):
            assert rel_err(d @ rows_in, g) <= RTOL_EXACT  # X_y has the K-FAC form
        expected_G = sum(p * d @ d.T for p, d in zip(probs, deltas, strict=True))
        assert expected_G.norm() > 0
        assert rel_err(A, rows_in.T @ rows_in / x.shape[0]) <= RTOL_EXACT, name
        assert rel_err(G, expected_G) <= RTOL_EXACT, name
    expected = {"mha.v_proj", "mha.out_proj"} if source == 1 else {"mha.q_proj",
                                                                     "mha.out_proj"}
    assert set(checked_fisher) == expected


# --- the optimizer ------------------------------------------------------------------------------
DAMPING = 1e-2


def _damped_inverse_direction(state, matrix):
    """(G + √λ/π I)⁻¹ X (A + π√λ I)⁻¹ from a block's A and G, written out."""
    A, G = state["input_cov"], state["grad_cov"]
    pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
    root = math.sqrt(DAMPING)
    inv_a = torch.linalg.inv(A + pi * root * torch.eye(A.shape[0], dtype=DTYPE))
    inv_g = torch.linalg.inv(G + root / pi * torch.eye(G.shape[0], dtype=DTYPE))
    return inv_g @ matrix @ inv_a


def _kfac(model):
    return natgrad.KFAC(model, loss=nn.CrossEntropyLoss(), lr=1.0, damping=DAMPING,
                        momentum=0.0, kl_clip=None, stat_decay=0.0, inv_every=1, stat_every=1)


def _step(opt, model, inputs, seed=4):
    targets = torch.randint(E, (B, L), generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    out = model(*inputs)
    nn.functional.cross_entropy(out.reshape(-1, E), targets.reshape(-1)).backward()
    opt.step()


def _check_rows(model, blocks, grads, directions):
    """Each of q, k, v: its rows of the weight (or its own weight) and of in_proj_bias are
    (G + √λ/π I)⁻¹ [∇W | ∇b] (A + π√λ I)⁻¹ with its own block's A and G."""
    mha = model.mha
    packed = mha._qkv_same_embed_dim
    for i, role in enumerate("qkv"):
        rows = slice(i * E, (i + 1) * E)
        weight = mha.in_proj_weight if packed else getattr(mha, f"{role}_proj_weight")
        weight_rows = rows if packed else slice(None)
        matrix = torch.cat([grads[weight][weight_rows],
                            grads[mha.in_proj_bias][rows].unsqueeze(1)], dim=1)
        expected = _damped_inverse_direction(blocks[f"mha.{role}_proj"].state, matrix)
        assert rel_err(directions[weight][weight_rows], expected[:, :-1]) <= RTOL_EXACT, role
        assert rel_err(directions[mha.in_proj_bias][rows], expected[:, -1]) <= RTOL_EXACT, role


def _random_grads(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randn(p.shape, dtype=DTYPE, generator=gen) for p in model.parameters()}


@pytest.mark.parametrize("kind", ["cross", "separate"])
def test_each_row_partition_gets_its_own_damped_inverse(kind):
    torch.manual_seed(0)
    model = Attention(kind).to(DTYPE)
    opt = _kfac(model)
    _step(opt, model, make_inputs(kind))
    grads = _random_grads(model)
    directions = opt.preconditioner.apply(grads)
    blocks = opt.blocks
    _check_rows(model, blocks, grads, directions)
    if kind == "cross":  # each partition has its own input factor; the packed block no call
        covs = [blocks[f"mha.{r}_proj"].state["input_cov"] for r in "qkv"]
        assert rel_err(covs[1], covs[0]) > 1e-3 and rel_err(covs[2], covs[1]) > 1e-3
        assert not blocks["mha.in_proj"].ready
    assert opt.fallback == []
    twin = copy.deepcopy(model)  # the rows' state travels with state_dict
    loaded = _kfac(twin)
    loaded.load_state_dict(opt.state_dict())
    names = dict(model.named_parameters())
    twin_directions = loaded.preconditioner.apply(
        {q: grads[names[n]] for n, q in twin.named_parameters()})
    for n, q in twin.named_parameters():
        assert torch.equal(twin_directions[q], directions[names[n]]), n


def test_a_packed_attention_with_cross_calls_is_preconditioned_by_its_rows_only():
    """Steps with self-attention calls refresh the packed [3E, E+1] block; once a
    cross-attention call has refreshed the row blocks, the direction and the quadratic form
    are theirs (the packed block is not counted twice)."""
    torch.manual_seed(0)
    model = Attention("cross-kv").to(DTYPE)
    x, memory = make_inputs("cross-kv")
    opt = _kfac(model)
    model.kind = "self"
    _step(opt, model, (x,))
    blocks, pre = opt.blocks, opt.preconditioner
    grads = _random_grads(model)
    packed = blocks["mha.in_proj"]
    assert packed.refreshed and not blocks["mha.q_proj"].ready
    matrix = packed.handler.gather(grads)
    expected = _damped_inverse_direction(packed.state, matrix)
    assert rel_err(pre.apply(grads)[model.mha.in_proj_weight], expected[:, :-1]) <= RTOL_EXACT
    model.kind = "cross-kv"
    _step(opt, model, (x, memory), seed=6)
    assert packed.refreshed and all(blocks[f"mha.{r}_proj"].refreshed for r in "qkv")
    _check_rows(model, blocks, grads, pre.apply(grads))
    parts = sum(float(blocks[n].quadratic(blocks[n].handler.gather(grads)))
                for n in ("mha.q_proj", "mha.k_proj", "mha.v_proj", "mha.out_proj"))
    assert abs(pre.quadratic(grads) - parts) <= RTOL_EXACT * abs(parts)


def test_calls_natgrad_does_not_take_over_run_pytorchs_forward_and_are_named():
    torch.manual_seed(0)
    model = Attention("self").to(DTYPE)
    x = torch.randn(L, E, dtype=DTYPE)  # unbatched
    expected = model(x)
    opt = natgrad.KFAC(model, likelihood="gaussian", stat_every=1)
    assert rel_err(model(x), expected) <= RTOL_EXACT
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        opt.zero_grad()
        model(x).square().sum().div(L).backward()
        opt.step()
    messages = [str(r.message) for r in records if issubclass(r.category, RuntimeWarning)]
    assert messages == ["these layers were not called in the model's forward, their parameters "
                        "take plain gradient steps until they are: mha.in_proj, mha.k_proj, "
                        "mha.out_proj, mha.q_proj, mha.v_proj"]


# --- PyTorch's transformer layers train ---------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, padding: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, E)
        self.layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(E, 7)
        self.padding = padding

    def forward(self, tokens):
        mask = None
        if self.padding:  # the last two positions of every other sample are padding
            mask = torch.zeros(tokens.shape, dtype=torch.bool)
            mask[::2, -2:] = True
        return self.head(self.layer(self.embed(tokens), src_key_padding_mask=mask))


class Decoder(nn.Module):
    """A TransformerDecoderLayer (causal self-attention, cross-attention to a memory of the
    first S tokens with a memory padding mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.source = nn.Embedding(7, E), nn.Embedding(7, E)
        self.layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=16, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(E, 7)

    def forward(self, tokens):
        length = tokens.shape[1]
        memory = self.source(tokens[:, :S])
        padding = torch.zeros(tokens.shape[0], S, dtype=torch.bool)
        padding[1::2, -1] = True
        causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=memory.dtype)
        out = self.layer(self.embed(tokens), memory, tgt_mask=causal, tgt_is_causal=True,
                         memory_key_padding_mask=padding)
        return self.head(out)


class KdimVdim(nn.Module):
    """Queries from the tokens, keys and values from two narrower embeddings (the module's
    default call, which computes the attention weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, E)
        self.keys, self.values = nn.Embedding(7, KDIM), nn.Embedding(7, VDIM)
        self.mha = nn.MultiheadAttention(E, H, kdim=KDIM, vdim=VDIM, batch_first=True)
        self.head = nn.Linear(E, 7)

    def forward(self, tokens):
        source = tokens.flip(1)
        x = self.embed(tokens)
        out = self.mha(x, self.keys(source), self.values(source))[0]  # need_weights=True
        return self.head(x + out)


MODELS = {
    "encoder": (lambda: Encoder(False), {"layer.self_attn"}),
    "encoder-padding": (lambda: Encoder(True), {"layer.self_attn"}),
    "decoder": (Decoder, {"layer.self_attn", "layer.multihead_attn"}),
    "kdim-vdim": (KdimVdim, {"mha"}),
}


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("name", list(MODELS))
def test_pytorchs_transformer_layers_get_blocks_and_train(optimizer, name):
    factory, attentions = MODELS[name]
    torch.manual_seed(0)
    model = factory().to(DTYPE)
    tokens = torch.randint(7, (B, 2 * L), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback, no uncalled layer
        opt = getattr(natgrad, optimizer)(model, loss=nn.CrossEntropyLoss(), stat_every=1)
        losses = train_losses(opt, model, tokens, torch.roll(tokens, -1, 1), 10)
    assert opt.fallback == []
    for attention in attentions:
        kind = "self" if attention.endswith("self_attn") else "cross"
        names = projection_names(kind, attention)
        assert names <= set(opt.blocks)
        assert all(opt.blocks[n].refreshed for n in names), names  # the blocks that were fed
    assert losses[-1] < 0.7 * losses[0], losses


class _TwoRanks:
    """Rank 0 of two, recording the broadcasts (what the owner placement sends)."""

    active, world_size, rank = True, 2, 0

    def __init__(self) -> None:
        self.broadcasts: list[tuple[int, list[int]]] = []

    def broadcast(self, tensors, src):
        self.broadcasts.append((src, [id(t) for t in tensors]))


def test_owner_placement_gives_an_attentions_blocks_over_one_parameter_one_owner():
    """inverse_placement="owner": the packed block and the row blocks of in_proj_weight get
    one owner (the parameter's direction is assembled on that rank), each parameter is
    broadcast once, by its owner."""
    from natgrad.distributed.kfac import FactorSync

    torch.manual_seed(0)
    model = nn.Sequential(Attention("cross"), nn.Linear(E, E), nn.Linear(E, E)).to(DTYPE)
    opt = _kfac(model)
    comm = _TwoRanks()
    sync = FactorSync(comm, "owner")
    owners = sync.owners(opt.blocks)
    rows = {owners[f"0.mha.{r}_proj"] for r in ("in", "q", "k", "v")}
    assert len(rows) == 1 and set(owners.values()) == {0, 1}  # still spread over both ranks
    directions = {p: p.detach().clone() for p in model.parameters()}
    sync.share_directions(opt.blocks, directions)
    owned = {src: {id(p): p for n, b in opt.blocks.items() if owners[n] == src
                   for p in b.handler.params} for src in (0, 1)}
    assert [(src, len(ids)) for src, ids in comm.broadcasts] == [
        (src, len(owned[src])) for src in (0, 1)]
    assert comm.broadcasts[0][1] == [id(directions[p]) for p in owned[0].values()]
    assert sum(len(o) for o in owned.values()) == len(directions)  # each parameter once


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_from_an_owner_checkpoint(tmp_path):
    """A decoder layer and a kdim/vdim attention on two gloo ranks (half of each batch)
    under every inverse placement end where one process on the whole batch ends; under
    "owner" (each row block's state on one rank) a checkpoint resumes on one process."""
    import importlib.util

    import attention_ranks as ranks

    path = Path(__file__).parents[1] / "distributed" / "dist_launch.py"
    spec = importlib.util.spec_from_file_location("dist_launch", path)
    dist_launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dist_launch)
    dist_launch.launch([str(Path(ranks.__file__)), str(tmp_path)])
    for placement in ranks.PLACEMENTS:
        two = torch.load(tmp_path / f"{placement}.pt")
        assert rel_err(two, ranks.run(placement)) <= RTOL_EXACT, placement
    resumed = ranks.run("owner", resume=str(tmp_path / "checkpoint.pt"))
    assert rel_err(resumed, torch.load(tmp_path / "owner.pt")) <= RTOL_EXACT
