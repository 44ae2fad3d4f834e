"""The stacked products (:mod:`natgrad.curvature.stacked` and its rules) against
``torch.autograd.functional.jvp``, in float64.

The reference is PyTorch's double-backward route (J·t as the gradient of ⟨Jᵀu, t⟩ with
respect to u), one tangent at a time; natgrad's route is one pass carrying all k tangents.
Checked: every rule on its own (shapes, arithmetic with numbers, constants and broadcasting,
reductions, linear layers, embeddings, norms, softmax, activations, attention in every form
the rule takes); the calls the pass must refuse, so that the products go one tangent at a
time (in-place updates, random dropout, custom ``autograd.Function``s, ``torch.func``
transforms, tensor subclasses, autocast, functions without a rule); and whole models through
:meth:`FunctionalModel.jvp`: random GPTs (SDPA, tied embedding, LayerNorm, GELU, dropout
off), a model the pass does not take (it falls back, once for good, with the right
products), a straight-through ``autograd.Function`` (its own derivative, not its forward's),
autocast, frozen buffers and a subset of the parameters.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import DTYPE, RTOL_EXACT, rel_err
from natgrad.curvature import model as model_module
from natgrad.curvature.model import FunctionalModel, reverse_only, unstacked_reason
from natgrad.curvature.stacked import StackedTangents, Unsupported
from natgrad.layers.recurrent import recurrence

K = 3  # tangents per test: more than the quadratic model's 2, so k is not confused with 2


def _rand(*shape: int, seed: int = 0, positive: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    return x.abs() + 0.5 if positive else x


def _stacked(fn, primals: list[torch.Tensor], tangents: list[torch.Tensor]):
    """fn's output and its K tangents ``[K, *out.shape]`` by the stacked pass."""
    mode = StackedTangents(K)
    inputs = [p.clone() for p in primals]
    for x, t in zip(inputs, tangents, strict=True):
        mode.seed(x, t)
    with torch.no_grad(), mode:
        out = fn(*inputs)
        tangent = mode.tangent(out)
    return out, tangent


def _check(fn, *primals: torch.Tensor) -> None:
    """Each of the K stacked tangents against ``torch.autograd.functional.jvp``."""
    tangents = [_rand(K, *p.shape, seed=10 + i) for i, p in enumerate(primals)]
    out, stacked = _stacked(fn, list(primals), tangents)
    with sdpa_kernel([SDPBackend.MATH]):
        expected_out = fn(*primals)
        assert rel_err(out, expected_out) <= RTOL_EXACT
        assert stacked is not None and stacked.shape == (K, *out.shape)
        assert stacked.dtype == out.dtype
        for i in range(K):
            _, expected = torch.autograd.functional.jvp(
                fn, tuple(primals), tuple(t[i] for t in tangents))
            assert rel_err(stacked[i], expected) <= RTOL_EXACT, i


def _consumers(x: torch.Tensor) -> torch.Tensor:
    """Rules that write in place into tensors of their own, all reading x's tangent: none may
    write into it (x's own term, added after them, checks it)."""
    return (F.layer_norm(x, (5,)) + F.rms_norm(x, (5,)) + x.softmax(-1) + F.gelu(x)
            + torch.matmul(x, x.mT).sum(-1, keepdim=True) + x)


X = _rand(3, 4, 5)
W = _rand(6, 5, seed=1)
B = _rand(6, seed=2)
C = _rand(4, 1, seed=3)  # a constant that broadcasts
IDX = torch.tensor([[0, 2, 5], [1, 1, 3]])

ONE_INPUT = {  # functions of x = X (with tangents); constants and numbers have none
    "view": lambda x: x.view(12, 5),
    "reshape-flatten-unflatten": lambda x: x.reshape(3, 20).flatten().unflatten(0, (6, 10)),
    "squeeze-unsqueeze": lambda x: x.unsqueeze(1).unsqueeze(-1).squeeze(-1).squeeze(1),
    "view-as-contiguous-clone": lambda x: x.transpose(0, 1).contiguous().clone().view_as(x),
    "expand": lambda x: x[:, :1].expand(2, 3, 4, 5) + x.expand_as(x).broadcast_to(3, 4, 5),
    "transpose-permute-movedim": lambda x: x.transpose(0, -1).permute(2, 0, 1).movedim(
        0, -1).swapaxes(1, 2),
    "t-T-mT": lambda x: x[0].t() @ x[1] + x[2].T @ x[0].mT.mT + x.mT.sum(0) @ x[1],
    "unbind-split-chunk": lambda x: torch.cat([p.reshape(-1) for p in (
        *x.unbind(1), *x.split(2, dim=-1), *x.split([1, 4], -1), *x.chunk(2, 0),
        *torch.tensor_split(x, 3, 2), *torch.split(x, 2, dim=0))]),
    "getitem": lambda x: x[1:, ..., None, ::2][..., 0] + x[-1, :3, 1:3].sum(),
    "getitem-mask-index": lambda x: x[x > 0].sum() + x[:, torch.tensor([3, 0, 0])].sum()
    + x[torch.tensor([True, False, True])].sum(),
    "cat-stack": lambda x: torch.cat([x, torch.ones(3, 4, 2, dtype=DTYPE), x.exp()], -1)
    .sum() + torch.stack([x, x * 2, torch.zeros_like(x)], dim=-2),
    "cat-legacy-empty": lambda x: torch.cat([torch.tensor([], dtype=DTYPE), x, x], 1),
    "numbers": lambda x: (2.5 * x + 1) - (3 - x) / 4 + (x - 2.0) * x.sub(1, alpha=2)
    + 1.5 / (x.abs() + 1) + torch.rsub(x, 2.0),
    "constants": lambda x: x * C - C / (1 + x * x) + torch.mul(C, x) + C - x + x.sub(C),
    "broadcast-both": lambda x: x * x[0] + x[1] - x[:, :1] / (2 + x[0, 0].square()),
    "alpha": lambda x: torch.add(x, x.square(), alpha=-0.5) + torch.sub(C, x, alpha=3),
    "pow": lambda x: x ** 2 + torch.pow(x, 3.0) + (x.abs() + 1).pow(0.5) + x.pow(0)
    + (x.abs() + 1) ** -1.5,
    "exp-log-sqrt-rsqrt": lambda x: x.exp() + (x.abs() + 1).log() + torch.sqrt(x.abs() + 1)
    + torch.rsqrt(x.abs() + 1),
    "neg-sin-cos": lambda x: -x.sin() + torch.cos(x) + torch.neg(x) * x.negative(),
    "reciprocal-square": lambda x: (x.abs() + 1).reciprocal() + x.square(),
    "tanh-sigmoid": lambda x: x.tanh() + torch.sigmoid(x) + F.tanh(x) * F.sigmoid(x),
    "sum-mean": lambda x: x.sum() + x.mean(-1, keepdim=True) + x.sum((0, 2)).mean(0)
    + torch.sum(x, dim=1, dtype=DTYPE).mean(dim=[0, 1]) + x[0, 0, 0].sum(),
    "linear-weight-constant": lambda x: F.linear(x, W, B),
    "linear-vector": lambda x: F.linear(x[0, 0], W),
    "addmm": lambda x: torch.addmm(B, x.reshape(12, 5), W.T),
    "matmul": lambda x: torch.matmul(x, W.T) + (x @ x.mT).sum(-1, keepdim=True)
    + torch.bmm(x, x.mT)[..., :1] + torch.mm(x[0], W.T)[0, 0],
    "matmul-broadcast": lambda x: torch.matmul(x[:, None], x[None].mT).sum((0, 1)),
    "softmax": lambda x: F.softmax(x, dim=-1) + x.softmax(0) + torch.softmax(x, 1),
    "log-softmax": lambda x: F.log_softmax(x, dim=-1) + x.log_softmax(1),
    "activations": lambda x: F.gelu(x) + F.gelu(x, approximate="tanh") + F.silu(x)
    + F.relu(x) + x.relu(),
    "dropout-off": lambda x: F.dropout(x, 0.3, training=False) + F.dropout(x, 0.0),
    "where": lambda x: torch.where(x > 0, x, x.square()) + torch.where(x < 0, x, 0.0)
    + x.where(x > 1, C) + torch.where(x > 0, C, x),
    "masked-fill": lambda x: x.masked_fill(x > 0.5, -1.0) + torch.masked_fill(
        x, torch.tensor([True, False, True, False, False]), 2.0),
    "casts": lambda x: x.float().double() + x.to(torch.float32).to(DTYPE) + x.type_as(x),
    "detach-data": lambda x: x * x.detach() + x.data,
    "comparisons": lambda x: x * (x > 0) + x.argmax(-1, keepdim=True) + torch.zeros_like(x),
    "shared-tangents": lambda x: _consumers(x.contiguous()) + _consumers(x) + x.clone(),
    "queries": lambda x: x.view(x.size(0), -1, x.shape[-1])[: len(x)] * float(
        x.numel() > 0) * (2.0 if bool(x[0, 0, 0] > -100) else 1.0),
}


@pytest.mark.parametrize("name", list(ONE_INPUT))
def test_rules_match_the_double_backward_reference(name):
    _check(ONE_INPUT[name], X)


def test_tangents_do_not_outlive_the_pass():
    """A tensor kept after the pass (a cache, the output) loses its tangents on exit."""
    mode = StackedTangents(K)
    x = X.clone()
    mode.seed(x, _rand(K, *X.shape))
    with torch.no_grad(), mode:
        kept = x * 2
        assert mode.tangent(kept) is not None
    assert mode.tangent(kept) is None and not hasattr(kept, "_natgrad_stacked_tangent")
    assert not hasattr(x, "_natgrad_stacked_tangent")


TWO_INPUTS = {  # functions of x and a parameter-like w, both with tangents
    "linear": (lambda x, w: F.linear(x, w), (X, W)),
    "linear-bias": (lambda x, b: F.linear(x, W, b), (X, B)),
    "linear-all": (lambda x, w, b: F.linear(x, w, b), (X, W, B)),
    "linear-weight-only": (lambda w: F.linear(X, w), (W,)),
    "addmm-all": (lambda b, x, w: torch.addmm(b, x, w), (B, X.reshape(12, 5), W.T)),
    "embedding": (lambda w: F.embedding(IDX, w), (W,)),
    "layer-norm": (lambda x, w, b: F.layer_norm(x, (5,), w, b, 1e-5),
                   (X, _rand(5, seed=4), _rand(5, seed=5))),
    "layer-norm-2d": (lambda x, w: F.layer_norm(x, (4, 5), w), (X, _rand(4, 5, seed=4))),
    "layer-norm-weight-only": (lambda w, b: F.layer_norm(X, [5], w, b),
                               (_rand(5, seed=4), _rand(5, seed=5))),
    "layer-norm-plain": (lambda x: F.layer_norm(x, (5,), eps=1e-3), (X,)),
    "rms-norm": (lambda x, w: F.rms_norm(x, (5,), w, 1e-6), (X, _rand(5, seed=6))),
    "rms-norm-default-eps": (lambda x: F.rms_norm(x, [4, 5]), (X,)),
    "product-of-both": (lambda x, w: x @ w.T * F.linear(x, w).tanh(), (X, W)),
}


@pytest.mark.parametrize("name", list(TWO_INPUTS))
def test_rules_of_several_inputs(name):
    fn, primals = TWO_INPUTS[name]
    _check(fn, *primals)


CONVOLUTIONS = {  # function, input shape, weight shape, keyword arguments
    "conv1d-stride-dilation": (F.conv1d, (2, 4, 9), (6, 4, 3), dict(stride=2, dilation=2)),
    "conv2d-same": (F.conv2d, (2, 4, 5, 6), (6, 4, 3, 2), dict(padding="same")),
    "conv2d-groups-unbatched": (F.conv2d, (4, 5, 6), (6, 2, 3, 3), dict(groups=2, padding=1)),
    "conv3d": (F.conv3d, (2, 2, 3, 4, 3), (3, 2, 2, 2, 2), {}),
    "conv-transpose1d": (F.conv_transpose1d, (2, 4, 5), (4, 3, 3),
                         dict(stride=2, padding=1, output_padding=1)),
    "conv-transpose2d-groups": (F.conv_transpose2d, (2, 4, 3, 4), (4, 3, 3, 2),
                                dict(stride=(2, 1), groups=2, dilation=2)),
    "conv-transpose3d-unbatched": (F.conv_transpose3d, (2, 2, 3, 2), (2, 3, 2, 2, 2),
                                   dict(stride=2)),
}


@pytest.mark.parametrize("name", list(CONVOLUTIONS))
def test_convolutions(name):
    """Tangents of the input, the weight and the bias (channels from the weight's layout)."""
    fn, x_shape, w_shape, options = CONVOLUTIONS[name]
    transposed = "transpose" in name
    out_channels = w_shape[1] * options.get("groups", 1) if transposed else w_shape[0]
    _check(lambda x, w, b: fn(x, w, b, **options), _rand(*x_shape, seed=1),
           _rand(*w_shape, seed=2), _rand(out_channels, seed=3))
    _check(lambda x, w: fn(x, w, **options), _rand(*x_shape, seed=4), _rand(*w_shape, seed=5))


PADS = {  # input shape, widths, mode, value
    "constant-value": ((2, 3, 4), (1, 2), "constant", 0.5),
    "constant-two-dims": ((2, 3, 4, 5), (1, 0, 2, 1), "constant", None),
    "reflect-2d": ((2, 3, 4, 5), (1, 2, 2, 1), "reflect", None),
    "replicate-1d": ((2, 3, 4), (2, 1), "replicate", None),
    "circular-3d": ((2, 2, 3, 4, 3), (1, 1, 2, 0, 1, 1), "circular", None),
    "reflect-unbatched": ((3, 4, 5), (1, 1, 2, 2), "reflect", None),
}


@pytest.mark.parametrize("name", list(PADS))
def test_pad(name):
    shape, widths, how, value = PADS[name]
    options = {} if value is None else {"value": value}
    _check(lambda x: F.pad(x.tanh(), widths, how, **options), _rand(*shape, seed=1))


X4 = _rand(2, 4, 6, 6, seed=6)
CONVNET_OPS = {  # functions of a [2, 4, 6, 6] x through a nonlinearity (so ẋ is not constant)
    "avg-pools": lambda x: F.avg_pool2d(x, 2).sum() + F.avg_pool1d(x[0], 3, 2, 1).sum()
    + F.avg_pool3d(x.unsqueeze(1), 2).sum() + F.avg_pool2d(x[0], 3, stride=2),
    "adaptive-avg-pools": lambda x: F.adaptive_avg_pool2d(x, (2, 3)).sum()
    + F.adaptive_avg_pool1d(x[:, 0], 4).sum() + F.adaptive_avg_pool3d(x, 1).sum(),
    "max-pools": lambda x: F.max_pool2d(x, 2).sum() + F.max_pool2d(x, 3, 2, 1)[0]
    + F.max_pool1d(x[0], 2).sum() + F.max_pool3d(x.unsqueeze(1), 2, return_indices=True)[0]
    .sum() + F.max_pool2d(x[0], 2, dilation=2).sum(),
    "adaptive-max-pools": lambda x: F.adaptive_max_pool2d(x, 3).sum()
    + F.adaptive_max_pool1d(x[:, 1], 2, return_indices=True)[0].sum()
    + F.adaptive_max_pool3d(x, (1, 2, 2)).sum(),
    "interpolate": lambda x: F.interpolate(x, scale_factor=2).sum((2, 3))
    + F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=False).mean((2, 3))
    + F.interpolate(x, scale_factor=0.5, mode="bicubic").sum((2, 3))
    + F.interpolate(x[:, :, 0], size=9, mode="linear").sum(-1),
    "pixel-shuffle": lambda x: F.pixel_shuffle(x, 2).sum((1, 2, 3)) + F.pixel_unshuffle(
        x, 2).sum((1, 2, 3)),
    "activations-with-options": lambda x: F.leaky_relu(x, 0.2) + F.leaky_relu(x) + F.elu(
        x, 0.7) + F.selu(x) + F.softplus(x, beta=2.0, threshold=1.0) + F.hardtanh(
        x, -0.5, 0.8) + F.relu6(3 * x) + F.hardswish(2 * x) + F.mish(x) + F.celu(x, 0.5)
    + F.logsigmoid(x) + F.softsign(x) + F.tanhshrink(x),
    "glu": lambda x: F.glu(x, 1).sum((1, 2, 3)) + F.glu(x).sum((1, 2, 3)),
    "dropout-off": lambda x: F.dropout2d(x, 0.5, training=False) + F.dropout1d(x[0], 0.0)
    + F.dropout3d(x, training=False) + F.alpha_dropout(x, 0.5) + F.feature_alpha_dropout(x),
    "unfold-fold-shuffle": lambda x: F.fold(F.unfold(x, 2, stride=2), (6, 6), 2, stride=2)
    + F.channel_shuffle(x, 2) + F.unfold(x, 3, padding=1).sum(-1).view(2, 4, 9).sum(-1)[
        ..., None, None],
}


@pytest.mark.parametrize("name", list(CONVNET_OPS))
def test_convnet_operations(name):
    _check(lambda x: CONVNET_OPS[name](x.tanh()), X4)


def test_hardsigmoid_as_forward_mode():
    """(Its backward has no derivative: the reference is forward-mode AD.)"""
    x = X4.tanh()
    out, stacked = _stacked(lambda v: F.hardsigmoid(4 * v), [x], [_rand(K, *x.shape, seed=3)])
    for i in range(K):
        expected = torch.func.jvp(lambda v: F.hardsigmoid(4 * v), (x,),
                                  (_rand(K, *x.shape, seed=3)[i],))[1]
        assert rel_err(stacked[i], expected) <= RTOL_EXACT


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(training):
    """Batch statistics (training) or running ones; tangents of x, weight and bias."""
    mean, var = _rand(4, seed=7), _rand(4, seed=8, positive=True)

    def fn(x, w, b):
        return F.batch_norm(x.tanh(), mean.clone(), var.clone(), w, b, training, 0.1, 1e-3)

    _check(fn, X4, _rand(4, seed=9), _rand(4, seed=10))
    _check(lambda x: F.batch_norm(x.sin(), None, None, training=True), X4)
    _check(lambda x: F.batch_norm(x[:, :, 0].sin(), mean, var, training=training), X4)


def test_instance_norm():
    _check(lambda x, w, b: F.instance_norm(x.tanh(), weight=w, bias=b, eps=1e-3), X4,
           _rand(4, seed=9), _rand(4, seed=10))
    _check(lambda x: F.instance_norm(x.sin()[:, :, 0]), X4)


def test_prelu():
    """A weight per channel, and one for all."""
    _check(lambda x, w: F.prelu(x.sin(), w), X4, _rand(4, seed=11))
    _check(lambda x, w: F.prelu(x.sin(), w), X4, _rand(1, seed=12))


def test_random_channel_dropout_is_refused():
    mode = StackedTangents(K)
    x = X4.clone()
    mode.seed(x, _rand(K, *x.shape, seed=2))
    with torch.no_grad(), mode, pytest.raises(Unsupported, match="random dropout2d"):
        F.dropout2d(x, 0.5)


def test_group_norm():
    _check(lambda x, w, b: F.group_norm(x.tanh(), 2, w, b, 1e-3), X4, _rand(4, seed=9),
           _rand(4, seed=10))
    _check(lambda x: F.group_norm(x.sin()[:, :, 0], 4), X4)


RECURRENCES = {  # mode, gates per step, bias, reverse, initial state with tangents
    "rnn-tanh": ("RNN_TANH", 1, True, False, True),
    "rnn-relu-reverse": ("RNN_RELU", 1, True, True, True),
    "gru": ("GRU", 3, True, False, True),
    "gru-reverse-no-bias": ("GRU", 3, False, True, True),
    "lstm": ("LSTM", 4, True, False, True),
    "lstm-reverse-zero-state": ("LSTM", 4, True, True, False),
}


@pytest.mark.parametrize("name", list(RECURRENCES))
def test_a_recurrent_layers_loop_has_one_rule(name):
    """The whole loop of :func:`recurrence` (4 steps of batch 2, hidden 3) against forward-mode
    AD through its operations: outputs, last h and last c, with tangents on the input
    projection, the recurrent weight and bias and (or not) the initial state."""
    mode, gates, bias, reverse, initial = RECURRENCES[name]
    lstm = mode == "LSTM"
    gates_in, weight = _rand(2, 4, gates * 3, seed=1), _rand(gates * 3, 3, seed=2)
    b, h, c = _rand(gates * 3, seed=3), _rand(2, 3, seed=4), _rand(2, 3, seed=5)

    def fn(gates_in, weight, *rest):
        rest = list(rest)
        b_ = rest.pop(0) if bias else None
        h_, c_ = (rest + [None])[:2] if initial else (torch.zeros(2, 3, dtype=DTYPE),
                                                      torch.zeros(2, 3, dtype=DTYPE))
        out, last_h, last_c = recurrence(mode, gates_in, weight, b_, h_, c_ if lstm else None,
                                         reverse)
        parts = [out.flatten(), last_h.flatten()] + ([last_c.flatten()] if lstm else [])
        return torch.cat(parts)

    primals = [gates_in, weight] + ([b] if bias else []) + ([h] + ([c] if lstm else [])
                                                           if initial else [])
    _check(fn, *primals)


def test_embedding_padding_row_as_forward_mode():
    """``padding_idx`` only stops the row's gradient: forward-mode AD (natgrad's per-tangent
    route) and the stacked pass keep its tangent, the double-backward route drops it."""
    tangents = _rand(K, *W.shape, seed=9)
    _, stacked = _stacked(lambda w: F.embedding(IDX, w, padding_idx=1), [W], [tangents])
    for i in range(K):
        with fwAD.dual_level():
            dual = fwAD.make_dual(W, tangents[i])
            expected = fwAD.unpack_dual(F.embedding(IDX, dual, padding_idx=1)).tangent
        assert torch.equal(stacked[i], expected)


N, HEADS, L, S, E = 2, 4, 5, 6, 3
ATTENTION = {  # (options, shapes), the cases of natgrad's forward-mode attention rule
    "none": ({}, {}),
    "causal": ({"is_causal": True}, {}),
    "causal-square": ({"is_causal": True}, {"source": L}),
    "scale": ({"scale": 0.3}, {}),
    "grouped-query": ({"is_causal": True, "enable_gqa": True}, {"kv_heads": 2}),
    "keys-broadcast": ({}, {"kv_batch": 1}),
}


def _attention_inputs(shapes: dict) -> list[torch.Tensor]:
    source, kv = shapes.get("source", S), shapes.get("kv_heads", HEADS)
    batch = shapes.get("kv_batch", N)
    return [_rand(N, HEADS, L, E, seed=20), _rand(batch, kv, source, E, seed=21),
            _rand(batch, kv, source, 7, seed=22)]


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention(name):
    options, shapes = ATTENTION[name]
    _check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **options),
           *_attention_inputs(shapes))


def test_attention_masks():
    """A boolean mask with a query that sees no key (0, as PyTorch's safe softmax), a float
    mask with a tangent (a learned bias) and one without."""
    keep = torch.rand(N, 1, L, S, generator=torch.Generator().manual_seed(7)) > 0.4
    keep[0, 0, 1] = False
    q, k, v = _attention_inputs({})
    bias = _rand(HEADS, L, S, seed=8)
    bias[1, 2] = -torch.inf
    _check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep), q, k, v)
    out, _ = _stacked(lambda q: F.scaled_dot_product_attention(q, k, v, attn_mask=keep), [q],
                      [_rand(K, *q.shape)])
    assert (out[0, :, 1] == 0).all()
    _check(lambda q, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b), q, bias)
    _check(lambda v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), v)


class _Straight(torch.autograd.Function):
    """round(x) with the straight-through derivative 1 (forward and backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, grad):
        return grad

    @staticmethod
    def jvp(ctx, tangent):
        return tangent


class _Tagged(torch.Tensor):
    """A tensor subclass (as DTensor is one)."""


REFUSED = {  # calls the stacked pass must not take: the products go one tangent at a time
    "in-place": lambda x: x.mul_(2),
    "augmented": lambda x: x.__iadd__(1.0),
    "write-into-a-constant": lambda x: torch.zeros(3, 4, 5, dtype=DTYPE).__setitem__(0, x[0]),
    "no-rule": lambda x: torch.cumsum(x, 0),
    "out": lambda x: torch.exp(x, out=torch.empty(3, 4, 5, dtype=DTYPE)),
    "random-dropout": lambda x: F.dropout(x, 0.5, training=True),
    "custom-function": lambda x: _Straight.apply(x),
    "vmap": lambda x: torch.vmap(torch.sin)(x),
    "grad": lambda x: torch.func.grad(lambda y: y.square().sum())(x),
    "vmap-closure": lambda x: torch.vmap(lambda c: c * x[0])(C),
    "subclass": lambda x: x * torch.ones(5, dtype=DTYPE).as_subclass(_Tagged),
    "autocast": lambda x: _autocast(x),
    "embedding-max-norm": lambda x: F.embedding(IDX, x[0], max_norm=1.0),
    "two-advanced-indices": lambda x: x[torch.tensor([0, 1]), :, torch.tensor([0, 1])],
    "softmax-dtype": lambda x: x.softmax(-1, dtype=torch.float32),
    "wide-attention-mask": lambda x: F.scaled_dot_product_attention(
        x[:1, None], x[:1, None], x[:1, None], attn_mask=torch.zeros(2, 1, 4, 4, dtype=DTYPE)),
}


def _autocast(x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return x + 1


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_calls(name):
    with pytest.raises(Unsupported):
        _stacked(REFUSED[name], [X], [_rand(K, *X.shape)])


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)

    @torch.jit.script
    def _scripted_swish(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def _torch_functions_off(x: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunction():
        return x * 2


ESCAPES = {  # operations that do not pass through __torch_function__, and a raw pointer
    "torchscript": _scripted_swish,
    "torch-functions-off": _torch_functions_off,
    "raw-pointer": lambda x: x + float(x.data_ptr() > 0),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_operations_outside_torch_functions_are_refused(name):
    """Negative control first: the operation really escapes the mode's ``__torch_function__``
    (its result would have no tangent); the pass's dispatcher-level watch refuses it."""
    if name != "raw-pointer":
        mode = StackedTangents(K)
        x = X.clone()
        mode.seed(x, _rand(K, *X.shape))
        mode._watch = contextlib.nullcontext()  # no watch
        with torch.no_grad(), mode:
            assert mode.tangent(ESCAPES[name](x)) is None
    mode = StackedTangents(K)
    x = X.clone()
    mode.seed(x, _rand(K, *X.shape))
    with pytest.raises(RuntimeError), torch.no_grad(), mode:  # TorchScript wraps Unsupported
        ESCAPES[name](x)
    assert "outside torch functions" in mode.refusal or "data_ptr" in mode.refusal


def test_seed_checks_the_shape():
    with pytest.raises(ValueError, match="k = 3"):
        StackedTangents(K).seed(X.clone(), _rand(2, *X.shape))


class _GPT(nn.Module):
    """A random GPT: token and position embeddings, pre-norm blocks (LayerNorm, causal or
    padding-masked SDPA, a GELU MLP, dropout modules that drop nothing here), a final
    LayerNorm and a head tied to the token embedding, optionally a buffer counted in place."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, length: int,
                 approximate: str = "none", bias: bool = True) -> None:
        super().__init__()
        self.heads, self.approximate = heads, approximate
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(width, bias=bias), qkv=nn.Linear(width, 3 * width, bias=bias),
            proj=nn.Linear(width, width, bias=bias), norm2=nn.LayerNorm(width),
            up=nn.Linear(width, 2 * width), down=nn.Linear(2 * width, width),
            drop=nn.Dropout(0.2),
        )) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1  # an in-place update of a buffer (without tangent)
        b, t = tokens.shape
        h = self.tokens(tokens) + self.positions(torch.arange(t))
        options = {"is_causal": True} if mask is None else {
            "attn_mask": torch.ones(t, t, dtype=torch.bool).tril() & mask[:, None, None, :]}
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](h)).view(b, t, 3, self.heads, -1).unbind(2)
            attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2), **options)
            h = h + block["drop"](block["proj"](attended.transpose(1, 2).reshape(b, t, -1)))
            hidden = F.gelu(block["up"](block["norm2"](h)), approximate=self.approximate)
            h = h + F.dropout(block["down"](hidden), 0.0, self.training)
        return self.head(self.norm(h))


def _reference(model: nn.Module, inputs: tuple, tangent: list[torch.Tensor],
               names: list[str] | None = None) -> torch.Tensor:
    """J·t by ``torch.autograd.functional.jvp`` (double backward) on the math kernel."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names

    def outputs(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), inputs)

    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.jvp(outputs, tuple(named[n].detach() for n in names),
                                             tuple(tangent))[1]


def _tangents(params, k: int, seed: int = 2) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, dtype=DTYPE, generator=gen) for p in params]
            for _ in range(k)]


GPTS = {  # vocab, width, heads, layers, length, GELU, biases, padding, training mode
    "small": (7, 8, 2, 1, 5, "none", True, False, False),
    "two-blocks-tanh-gelu": (11, 12, 3, 2, 6, "tanh", True, False, True),
    "padded-no-bias": (9, 8, 4, 2, 7, "none", False, True, False),
}


@pytest.mark.parametrize("name", list(GPTS))
@pytest.mark.parametrize("k", [2, 3])
def test_random_gpts_take_the_stacked_pass(name, k, monkeypatch):
    vocab, width, heads, layers, length, approximate, bias, padded, training = GPTS[name]
    torch.manual_seed(len(name))
    model = _GPT(vocab, width, heads, layers, length, approximate, bias).to(DTYPE)
    model.train(training)  # train mode: dropout modules of p > 0 would be refused
    if training:
        for block in model.blocks:
            block["drop"].p = 0.0
    tokens = torch.randint(vocab, (3, length), generator=torch.Generator().manual_seed(1))
    inputs = (tokens,)
    if padded:  # left padding: the first query of row 0 sees no key
        mask = torch.ones(3, length, dtype=torch.bool)
        mask[0, :2] = False
        inputs = (tokens, mask)
    fmodel = FunctionalModel(model)
    tangents = _tangents(fmodel.params, k)
    calls = []
    monkeypatch.setattr(FunctionalModel, "_jvp_forward", lambda *a: calls.append(1))
    outputs, products = fmodel.jvp(inputs, tangents)
    assert not calls and unstacked_reason(model) is None and not reverse_only(model)
    assert int(model.calls) == 0  # the buffer the forward counts in place is a copy
    with torch.no_grad():
        assert rel_err(outputs, model(*inputs)) <= RTOL_EXACT
    for tangent, product in zip(tangents, products, strict=True):
        assert rel_err(product, _reference(model, inputs, tangent)) <= RTOL_EXACT
    assert not hasattr(outputs, "_natgrad_stacked_tangent")  # no tangents left behind


class _ConvNet(nn.Module):
    """Convolutions with batch or group norm, pooling, upsampling and assorted activations,
    a residual connection and a reflection pad: what image models are built from."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8) if norm == "batch" else nn.GroupNorm(2, 8)
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                                   nn.LeakyReLU(0.2))
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4 + 8, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.norm(self.stem(x))), 2)
        h = h + self.block(h)
        up = F.hardswish(self.up(F.interpolate(h, scale_factor=0.5, mode="bilinear")))
        pooled = torch.cat([F.adaptive_avg_pool2d(up, 1), F.adaptive_max_pool2d(h, 1)], 1)
        return self.head(F.elu(pooled.flatten(1)))


@pytest.mark.parametrize("norm,training", [("batch", True), ("batch", False),
                                           ("group", True)])
def test_convnets_take_the_stacked_pass(norm, training, monkeypatch):
    torch.manual_seed(0)
    model = _ConvNet(norm).to(DTYPE).train(training)
    x = _rand(4, 3, 8, 8, seed=1)
    fmodel = FunctionalModel(model)
    tangents = _tangents(fmodel.params, 2)
    calls = []
    monkeypatch.setattr(FunctionalModel, "_jvp_forward", lambda *a: calls.append(1))
    outputs, products = fmodel.jvp((x,), tangents)
    assert not calls and unstacked_reason(model) is None
    with torch.no_grad():
        assert rel_err(outputs, model(x)) <= RTOL_EXACT
    for tangent, product in zip(tangents, products, strict=True):
        assert rel_err(product, _reference(model, (x,), tangent)) <= RTOL_EXACT


def test_a_subset_of_the_parameters():
    torch.manual_seed(0)
    model = _GPT(7, 8, 2, 1, 5).to(DTYPE)
    tokens = torch.randint(7, (3, 5), generator=torch.Generator().manual_seed(1))
    model.eval()  # its dropout drops nothing
    names = ["blocks.0.qkv.weight", "tokens.weight", "norm.bias"]
    named = dict(model.named_parameters())
    fmodel = FunctionalModel(model, params=[named[n] for n in names])
    tangents = _tangents(fmodel.params, 2)
    _, products = fmodel.jvp((tokens,), tangents)
    assert unstacked_reason(model) is None
    for tangent, product in zip(tangents, products, strict=True):
        assert rel_err(product, _reference(model, (tokens,), tangent, names)) <= RTOL_EXACT


class _Cumulative(nn.Module):
    """A model with a call the stacked pass has no rule for (a cumulative sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(5, 4), nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cumsum(F.gelu(self.embed(tokens)), dim=1))


class _Scripted(nn.Module):
    """A linear layer and a TorchScript activation (its operations bypass Python)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(_scripted_swish(self.first(x)))


class _StraightThrough(nn.Module):
    """A linear layer, then round() with the straight-through derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(_Straight.apply(3 * self.first(x)))


def test_one_tangent_takes_the_stacked_pass_too(monkeypatch):
    """k = 1 shares nothing, but the stacked pass spares the first forward-mode pass's
    one-time set-up: no forward-mode pass, the reference's product."""
    torch.manual_seed(0)
    model = _GPT(7, 8, 2, 1, 5).to(DTYPE).eval()
    tokens = torch.randint(7, (3, 5), generator=torch.Generator().manual_seed(1))
    fmodel = FunctionalModel(model)
    calls = []
    monkeypatch.setattr(FunctionalModel, "_jvp_forward", lambda *a: calls.append(1))
    (tangent,) = _tangents(fmodel.params, 1)
    _, (product,) = fmodel.jvp((tokens,), [tangent])
    assert not calls and unstacked_reason(model) is None
    assert rel_err(product, _reference(model, (tokens,), tangent)) <= RTOL_EXACT


def test_a_model_the_pass_does_not_take_falls_back_for_good(monkeypatch):
    torch.manual_seed(0)
    model = _Cumulative().to(DTYPE)
    tokens = torch.randint(5, (3, 6), generator=torch.Generator().manual_seed(1))
    fmodel = FunctionalModel(model)
    tangents = _tangents(fmodel.params, 2)
    _, products = fmodel.jvp((tokens,), tangents)
    assert "cumsum" in unstacked_reason(model)
    for tangent, product in zip(tangents, products, strict=True):
        assert rel_err(product, _reference(model, (tokens,), tangent)) <= RTOL_EXACT
    tried = []
    monkeypatch.setattr(FunctionalModel, "jvp_stacked", lambda *a: tried.append(1))
    _, again = fmodel.jvp((tokens,), tangents)
    assert not tried  # the second call went straight to the per-tangent pass
    for product, other in zip(products, again, strict=True):
        assert rel_err(other, product) <= RTOL_EXACT


def test_torchscript_inside_a_model_falls_back():
    torch.manual_seed(0)
    model = _Scripted().to(DTYPE)
    x = _rand(5, 4, seed=3)
    fmodel = FunctionalModel(model)
    tangents = _tangents(fmodel.params, 2)
    _, products = fmodel.jvp((x,), tangents)
    assert "outside torch functions" in unstacked_reason(model)
    for tangent, product in zip(tangents, products, strict=True):
        assert rel_err(product, _reference(model, (x,), tangent)) <= RTOL_EXACT


def test_a_custom_function_keeps_its_own_derivative():
    """Straight-through round(): the products use the Function's jvp (PyTorch's forward-mode
    route), not the derivative of the operations its forward runs (0 for round)."""
    torch.manual_seed(0)
    model = _StraightThrough().to(DTYPE)
    x = _rand(5, 4, seed=3)
    fmodel = FunctionalModel(model)
    tangents = _tangents(fmodel.params, 2)
    _, products = fmodel.jvp((x,), tangents)
    assert "autograd.Function" in unstacked_reason(model)
    assert not reverse_only(model)  # it has a jvp: forward-mode AD one tangent at a time
    for tangent, product in zip(tangents, products, strict=True):
        expected = _reference(model, (x,), tangent)
        assert expected.norm() > 0  # negative control: round's own derivative would give 0
        assert rel_err(product, expected) <= RTOL_EXACT


def test_autocast_stands_aside_for_the_call_only():
    """Under autocast the products go one tangent at a time (PyTorch's casts inside the
    forward-mode pass) without ruling the stacked pass out for later calls."""
    torch.manual_seed(0)
    model = _GPT(7, 8, 2, 1, 5).eval()
    tokens = torch.randint(7, (3, 5), generator=torch.Generator().manual_seed(1))
    fmodel = FunctionalModel(model)
    tangents = _tangents(fmodel.params, 2)
    tangents = [[t.float() for t in tangent] for tangent in tangents]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, products = fmodel.jvp((tokens,), tangents)
        _, expected = fmodel._jvp_forward((tokens,), tangents)
    assert unstacked_reason(model) is None
    for product, other in zip(products, expected, strict=True):
        assert product.dtype == torch.bfloat16 and torch.equal(product, other)


def test_bfloat16_parameters_as_accurate_as_forward_mode():
    """A bfloat16 model (no autocast) takes the stacked pass; against the float64 reference
    on the same weights its products are as accurate as forward-mode AD's in bfloat16."""
    torch.manual_seed(0)
    model = _GPT(7, 16, 2, 2, 5).eval()
    reference_model = _GPT(7, 16, 2, 2, 5).eval()
    model.to(torch.bfloat16)
    reference_model.load_state_dict({n: t.to(DTYPE) for n, t in model.state_dict().items()})
    reference_model.to(DTYPE)
    tokens = torch.randint(7, (3, 5), generator=torch.Generator().manual_seed(1))
    fmodel = FunctionalModel(model)
    tangents = [[t.to(torch.bfloat16) for t in tangent]
                for tangent in _tangents(fmodel.params, 2)]
    _, stacked = fmodel.jvp((tokens,), tangents)
    _, forward_mode = fmodel._jvp_forward((tokens,), tangents)
    assert unstacked_reason(model) is None
    for tangent, ours, theirs in zip(tangents, stacked, forward_mode, strict=True):
        expected = _reference(reference_model, (tokens,), [t.to(DTYPE) for t in tangent])
        assert ours.dtype == torch.bfloat16
        # bfloat16 keeps 8 bits: both routes are off by ~7e-3; ours by at most twice theirs
        assert rel_err(ours.to(DTYPE), expected) <= 2 * rel_err(theirs.to(DTYPE), expected)


def test_an_unforeseen_error_falls_back(monkeypatch):
    """An error inside the stacked pass that is not a refusal (memory for k tangents at once,
    say) is not the model's: the per-tangent pass gives the products."""
    torch.manual_seed(0)
    model = _GPT(7, 8, 2, 1, 5).to(DTYPE).eval()
    tokens = torch.randint(7, (3, 5), generator=torch.Generator().manual_seed(1))

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setitem(model_module.StackedTangents.__init__.__globals__["RULES"],
                        F.layer_norm, fail)
    fmodel = FunctionalModel(model)
    tangents = _tangents(fmodel.params, 2)
    _, products = fmodel.jvp((tokens,), tangents)
    assert "out of memory" in unstacked_reason(model)
    for tangent, product in zip(tangents, products, strict=True):
        assert rel_err(product, _reference(model, (tokens,), tangent)) <= RTOL_EXACT
