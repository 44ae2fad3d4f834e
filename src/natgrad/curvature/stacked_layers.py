"""The derivatives :class:`natgrad.curvature.stacked.StackedTangents` applies to k tangents:
the layers' functions (linear maps, embeddings, norms, softmax, activations, dropout,
attention). Conventions as in :mod:`natgrad.curvature.stacked_rules`.

Measured on the bench's char-gpt (one thread, k = 2, timed inside the pass): a linear
layer's tangents cost about 4× its forward (ẋ Wᵀ for the k·M rows and x Ẇᵀ are each two
forwards' worth of products), attention's about 2.6×, a LayerNorm's about 5× (eight
elementwise passes; PyTorch's fused ``native_layer_norm_backward`` for the normalisation's
part was within noise of it, so the formula is written out).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from natgrad.curvature.forward_rules import attention_plan
from natgrad.curvature.stacked_rules import (
    Rule,
    Unsupported,
    arg,
    call_name,
    check_keywords,
    lift,
    methods,
    shift,
    slope,
    tag,
)
from natgrad.layers.recurrent import cell_step, masked_step, recurrence

__all__ = ["RULES"]

_aten = torch.ops.aten


def _linear(mode, func, args, kwargs):
    """y = x Wᵀ + b: ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ, each for all k at once."""
    check_keywords(kwargs, ("weight", "bias"), "linear")
    x, weight = args[0], arg(args, kwargs, 1, "weight")
    bias = arg(args, kwargs, 2, "bias")
    if weight.dim() != 2:
        raise Unsupported("linear with a 1-d weight")
    out = func(*args, **kwargs)
    dx, dw = mode.tangent(x), mode.tangent(weight)
    db = None if bias is None else mode.tangent(bias)
    k, d_in, d_out = mode.k, weight.shape[1], weight.shape[0]
    rows = x.reshape(-1, d_in)  # [M, d_in]
    tangent = None  # [k, M, d_out]
    if dx is not None:  # ẋ Wᵀ: one product for the k·M rows
        tangent = (dx.reshape(-1, d_in) @ weight.T).view(k, -1, d_out)
    if dw is not None:  # x Ẇᵀ: [M, d_in] @ [k, d_in, d_out]
        if tangent is None:
            tangent = torch.matmul(rows, dw.mT)
        else:
            tangent = tangent.baddbmm_(rows.expand(k, *rows.shape), dw.mT)
    if tangent is not None:
        tangent = tangent.view(k, *out.shape)
    if db is not None:
        db = lift(db, out.dim())
        tangent = db if tangent is None else tangent.add_(db)
    return tag(mode, out, tangent)


def _addmm(mode, func, args, kwargs):
    """y = c + A B (GPT-2's Conv1D): ẏ = ċ + Ȧ B + A Ḃ."""
    check_keywords(kwargs, ("beta", "alpha"), "addmm")
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        raise Unsupported("addmm with beta or alpha")
    c, a, b = args
    out = func(*args, **kwargs)
    dc, da, db = mode.tangent(c), mode.tangent(a), mode.tangent(b)
    tangent = None
    if da is not None:
        tangent = (da.reshape(-1, a.shape[-1]) @ b).view(mode.k, *out.shape)
    if db is not None:
        tangent = torch.matmul(a, db) if tangent is None else tangent.baddbmm_(
            a.expand(mode.k, *a.shape), db)
    if dc is not None:
        dc = lift(dc, 2)
        tangent = dc if tangent is None else tangent.add_(dc)
    return tag(mode, out, tangent)


def _matmul(mode, func, args, kwargs):
    """a @ b with matrices (or batches of them): ẏ = ȧ b + a ḃ."""
    check_keywords(kwargs, (), "matmul")
    a, b = args
    if a.dim() < 2 or b.dim() < 2:
        raise Unsupported("matmul with a vector")
    out = func(a, b)
    da, db = mode.tangent(a), mode.tangent(b)
    tangent = None if da is None else torch.matmul(lift(da, out.dim()), b)
    if db is not None:
        product = torch.matmul(a, lift(db, out.dim()))
        tangent = product if tangent is None else tangent.add_(product)
    if tangent.shape != (mode.k, *out.shape):
        raise Unsupported("matmul with broadcast batch dimensions")
    return tag(mode, out, tangent)


def _embedding(mode, func, args, kwargs):
    """y = W[i]: ẏ = Ẇ[:, i]."""
    check_keywords(kwargs, ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                             "sparse"), "embedding")
    indices, weight = args[0], arg(args, kwargs, 1, "weight")
    if arg(args, kwargs, 3, "max_norm") is not None:
        raise Unsupported("embedding with max_norm (it renormalises the weight in place)")
    out = func(*args, **kwargs)
    tangent = mode.tangent(weight)
    if tangent is None:
        return out
    rows = tangent.index_select(1, indices.reshape(-1))
    return tag(mode, out, rows.view(mode.k, *out.shape))


def _normalized_tangent(dx: Tensor, normalized: Tensor, rstd: Tensor,
                        dims: tuple[int, ...]) -> Tensor:
    """r·(ẋ − mean(ẋ) − x̂·mean(x̂ ⊙ ẋ)), the means over ``dims`` of ẋ (k first)."""
    centred = dx - dx.mean(dims, keepdim=True)
    return centred.sub_(normalized * (normalized * dx).mean(dims, keepdim=True)).mul_(rstd)


def _layer_norm(mode, func, args, kwargs):
    """y = x̂ ⊙ w + b, x̂ = (x − μ)·r: ẏ = r·(ẋ − mean(ẋ) − x̂·mean(x̂ ⊙ ẋ)) ⊙ w + x̂ ⊙ ẇ + ḃ."""
    check_keywords(kwargs, ("normalized_shape", "weight", "bias", "eps"), "layer_norm")
    x, shape = args[0], arg(args, kwargs, 1, "normalized_shape")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    eps = arg(args, kwargs, 4, "eps", 1e-5)
    out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
    normalized = (x - mean) * rstd  # x̂
    dims = tuple(range(-len(shape), 0))
    dx = mode.tangent(x)
    tangent = None
    if dx is not None:
        tangent = _normalized_tangent(dx, normalized, rstd, dims)
        if weight is not None:
            tangent = tangent.mul_(weight)
    tangent = _weight_tangent(mode, tangent, normalized, weight)
    db = None if bias is None else mode.tangent(bias)
    if db is not None:
        tangent = lift(db, x.dim()) if tangent is None else tangent.add_(lift(db, x.dim()))
    return tag(mode, out, tangent)


def _weight_tangent(mode, tangent, normalized, weight):
    """``tangent`` plus x̂ ⊙ ẇ, the elementwise weight's part of a normalisation's tangent
    (``tangent`` updated in place; None when neither part has a tangent)."""
    dw = None if weight is None else mode.tangent(weight)
    if dw is None:
        return tangent
    dw = lift(dw, normalized.dim())
    return normalized * dw if tangent is None else tangent.addcmul_(normalized, dw)


def _rms_norm(mode, func, args, kwargs):
    """y = x̂ ⊙ w, x̂ = x·r, r = (mean(x²) + ε)^(−½): ẏ = r·(ẋ − x̂·mean(x̂ ⊙ ẋ)) ⊙ w + x̂ ⊙ ẇ."""
    check_keywords(kwargs, ("normalized_shape", "weight", "eps"), "rms_norm")
    x, shape = args[0], arg(args, kwargs, 1, "normalized_shape")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    weight, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "eps")
    out = func(*args, **kwargs)
    if x.dtype != out.dtype:
        raise Unsupported("rms_norm in mixed precision")
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    dims = tuple(range(-len(shape), 0))
    rstd = (x.square().mean(dims, keepdim=True) + eps).rsqrt()
    normalized = x * rstd
    dx = mode.tangent(x)
    tangent = None
    if dx is not None:
        tangent = (dx - normalized * (normalized * dx).mean(dims, keepdim=True)).mul_(rstd)
        if weight is not None:
            tangent = tangent.mul_(weight)
    tangent = _weight_tangent(mode, tangent, normalized, weight)
    return tag(mode, out, tangent)


def _softmax_tangent(dx: Tensor, probs: Tensor, dim: int) -> Tensor:
    """Ṗ = P ⊙ (ẋ − Σ P ⊙ ẋ) along ``dim`` of ẋ."""
    weighted = probs * dx
    return weighted.addcmul_(probs, weighted.sum(dim, keepdim=True), value=-1)


def _softmax(mode, func, args, kwargs):
    check_keywords(kwargs, ("dim", "dtype", "_stacklevel"), "softmax")
    dim = arg(args, kwargs, 1, "dim")
    dtype = arg(args, kwargs, 3, "dtype") if func is F.softmax else arg(args, kwargs, 2,
                                                                            "dtype")
    if dim is None or dtype is not None:
        raise Unsupported("softmax without dim or with a dtype")
    out = func(*args, **kwargs)
    return tag(mode, out, _softmax_tangent(mode.tangent(args[0]), out, shift(dim)))


def _log_softmax(mode, func, args, kwargs):
    """y = x − logsumexp(x): ẏ = ẋ − Σ softmax(x) ⊙ ẋ."""
    check_keywords(kwargs, ("dim", "dtype", "_stacklevel"), "log_softmax")
    dim = arg(args, kwargs, 1, "dim")
    dtype = arg(args, kwargs, 3, "dtype") if func is F.log_softmax else arg(
        args, kwargs, 2, "dtype")
    if dim is None or dtype is not None:
        raise Unsupported("log_softmax without dim or with a dtype")
    out = func(*args, **kwargs)
    dx, dim = mode.tangent(args[0]), shift(dim)
    return tag(mode, out, dx - (out.exp() * dx).sum(dim, keepdim=True))




def _activation(backward: Callable[..., Tensor], *, from_output: bool = False) -> Rule:
    """σ(x) elementwise (F.silu, F.relu, Tensor.relu): ẏ = σ'(x) ⊙ ẋ, σ' from PyTorch's
    ``*_backward`` kernel at x (at y where ``from_output``)."""

    def rule(mode, func, args, kwargs):
        check_keywords(kwargs, ("inplace",), call_name(func))
        if arg(args, kwargs, 1, "inplace", False):
            raise Unsupported(f"{call_name(func)} in place")
        out = func(*args, **kwargs)
        return tag(mode, out, mode.tangent(args[0]) * slope(
            backward, out if from_output else args[0]))

    return rule


def _gelu(mode, func, args, kwargs):
    """GELU (exact or tanh): ẏ = gelu'(x) ⊙ ẋ by ``gelu_backward``."""
    check_keywords(kwargs, ("approximate",), "gelu")
    out = func(*args, **kwargs)
    approximate = arg(args, kwargs, 1, "approximate", "none")
    return tag(mode, out, mode.tangent(args[0]) * slope(_aten.gelu_backward, args[0],
                                                         approximate=approximate))




def _dropout(training_default: bool) -> Rule:
    """Dropout of any kind (``F.dropout``, ``dropout1d/2d/3d``, alpha dropout) that drops
    nothing (p = 0 or evaluation; ``training`` defaults to ``training_default``, as in the
    function): the identity."""

    def rule(mode, func, args, kwargs):
        check_keywords(kwargs, ("p", "training", "inplace"), call_name(func))
        p = arg(args, kwargs, 1, "p", 0.5)
        if arg(args, kwargs, 2, "training", training_default) and p > 0:
            raise Unsupported(f"random {call_name(func)}")
        if arg(args, kwargs, 3, "inplace", False):
            raise Unsupported(f"{call_name(func)} in place")
        return tag(mode, func(*args, **kwargs), mode.tangent(args[0]))

    return rule






def _attention(mode, func, args, kwargs):
    """softmax(q kᵀ·c + B) v (natgrad's attention rule, :mod:`forward_rules`), all k at once:
    ṡ = (q̇ kᵀ + q k̇ᵀ)·c + Ḃ, Ṗ = P ⊙ (ṡ − rowsum(P ⊙ ṡ)), ẏ = Ṗ v + P v̇."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
             "enable_gqa")
    check_keywords(kwargs, names[1:], "scaled_dot_product_attention")
    bound = dict(zip(names, args, strict=False)) | kwargs
    query, key, value = bound["query"], bound["key"], bound["value"]
    mask = bound.get("attn_mask")
    plan = attention_plan(query, key, value, mask, bound.get("dropout_p", 0.0),
                          bound.get("is_causal", False), bound.get("scale"),
                          bound.get("enable_gqa", False))
    if plan is None:
        raise Unsupported("attention that natgrad's rule does not take")
    groups, bias, empty, scale = plan
    dq, dk, dv = mode.tangent(query), mode.tangent(key), mode.tangent(value)
    if groups > 1:  # grouped-query attention: every key/value head serves `groups` queries
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
        dk = None if dk is None else dk.repeat_interleave(groups, -3)
        dv = None if dv is None else dv.repeat_interleave(groups, -3)
    scores = torch.matmul(query, key.mT).mul_(scale)
    if bias is not None:
        scores = scores.add_(bias)
    probs = torch.softmax(scores, dim=-1)
    if empty is not None:  # rows masked everywhere: 0, as PyTorch's safe softmax
        probs = probs.masked_fill_(empty, 0.0)
    out = torch.matmul(probs, value)
    n = scores.dim()
    dscores = None  # ṡ, [k, *B, L, S]
    if dq is not None:
        dscores = torch.matmul(dq, key.mT)
    if dk is not None:
        product = torch.matmul(query, lift(dk, n).mT)
        dscores = product if dscores is None else dscores.add_(product)
    if dscores is not None:
        dscores = dscores.mul_(scale)
    dbias = None if mask is None or bias is not mask else mode.tangent(mask)
    if dbias is not None:
        dscores = lift(dbias, n) if dscores is None else dscores.add_(lift(dbias, n))
    tangent = None
    if dscores is not None:
        tangent = torch.matmul(_softmax_tangent(dscores, probs, -1), value)
    if dv is not None:
        product = torch.matmul(probs, lift(dv, n))
        tangent = product if tangent is None else tangent.add_(product)
    return tag(mode, out, tangent)


_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_TRANSPOSE_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "output_padding",
                             "groups", "dilation")


def _convolution(names: tuple[str, ...]) -> Rule:
    """y = conv(x, W) + b (or a transposed convolution; ``names``: its arguments in order):
    ẏ = conv(ẋ, W) + conv(x, Ẇ) + ḃ, the k tangents of x as k·N samples of one call, Ẇ one
    call per tangent."""

    def rule(mode, func, args, kwargs):
        check_keywords(kwargs, names[1:], call_name(func))
        x, weight = args[0], arg(args, kwargs, 1, "weight")
        bias = arg(args, kwargs, 2, "bias")
        options = {name: arg(args, kwargs, i, name) for i, name in enumerate(names) if i >= 3}
        options = {name: value for name, value in options.items() if value is not None}
        out = func(*args, **kwargs)
        dx, dw = mode.tangent(x), mode.tangent(weight)
        db = None if bias is None else mode.tangent(bias)
        k, batched = mode.k, x.dim() == weight.dim()
        tangent = None
        if dx is not None:  # an unbatched input's k tangents are a batch of k
            rows = dx.flatten(0, 1) if batched else dx
            tangent = func(rows, weight, None, **options).view(k, *out.shape)
        if dw is not None:
            part = torch.stack([func(x, dw[j], None, **options) for j in range(k)])
            tangent = part if tangent is None else tangent.add_(part)
        if db is not None:  # [k, C_out] along the channel axis
            spatial = out.dim() - (2 if batched else 1)
            db = db.view(k, *((1,) if batched else ()), -1, *(1,) * spatial)
            tangent = db if tangent is None else tangent.add_(db)
        return tag(mode, out, tangent)

    return rule


def _pad(mode, func, args, kwargs):
    """y = pad(x) (linear in x; a constant fills with 0 in the tangent): ẏ = pad(ẋ), the k
    tangents as k·N samples where the mode needs the input's rank (reflect, replicate,
    circular)."""
    check_keywords(kwargs, ("pad", "mode", "value"), "pad")
    x, widths = args[0], arg(args, kwargs, 1, "pad")
    how = arg(args, kwargs, 2, "mode", "constant")
    out = func(*args, **kwargs)
    dx = mode.tangent(x)
    if dx is None:
        return out
    if how == "constant":
        tangent = F.pad(dx, widths)
    else:
        tangent = F.pad(dx.flatten(0, 1), widths, how).view(mode.k, *out.shape)
    return tag(mode, out, tangent)


def _batched_linear(mode, func, args, kwargs):
    """An operation linear in its input alone that keeps dimension 0 a batch (average
    pooling, interpolation, pixel shuffle): ẏ = f(ẋ), the k tangents as k·N samples."""
    out = func(*args, **kwargs)
    dx = mode.tangent(args[0])
    if dx is None:
        return out
    tangent = func(dx.flatten(0, 1), *args[1:], **kwargs)
    return tag(mode, out, tangent.view(mode.k, *out.shape))


def _max_pool(with_indices: Callable, options: int, dims: int) -> Rule:
    """Max pooling over ``dims`` spatial dimensions (``options`` positional options after the
    input, return_indices next; ``with_indices`` itself returns them always): ẏ = ẋ at the
    maxima, gathered at the flat indices PyTorch returns per channel."""

    def rule(mode, func, args, kwargs):
        x = args[0]
        want = func is with_indices or arg(args, kwargs, options + 1, "return_indices", False)
        rest = {k: v for k, v in kwargs.items() if k != "return_indices"}
        out, indices = with_indices(x, *args[1:options + 1], **rest)
        dx = mode.tangent(x)
        if dx is not None:
            picked = indices.flatten(-dims).expand(mode.k, *indices.shape[:-dims], -1)
            tag(mode, out, dx.flatten(-dims).gather(-1, picked).view(mode.k, *out.shape))
        return (out, indices) if want else out

    return rule


def _affine_tangent(mode, tangent, normalized, weight, bias, shape):
    """``tangent`` ⊙ w + x̂ ⊙ ẇ + ḃ for per-channel w, b viewed as ``shape``."""
    if tangent is not None and weight is not None:
        tangent = tangent.mul_(weight.view(shape))
    dw = None if weight is None else mode.tangent(weight)
    if dw is not None:
        part = normalized * dw.view(mode.k, *shape)
        tangent = part if tangent is None else tangent.add_(part)
    db = None if bias is None else mode.tangent(bias)
    if db is not None:
        db = db.view(mode.k, *shape)
        tangent = db if tangent is None else tangent.add_(db)
    return tangent


def _batch_norm(mode, func, args, kwargs):
    """Per channel (dimension 1): with batch statistics (training, or no running ones) the
    layer norm's tangent over the batch and spatial dimensions; with running statistics
    ẏ = ẋ·r; then ⊙ w + x̂ ⊙ ẇ + ḃ."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps")
    check_keywords(kwargs, names[1:], "batch_norm")
    x, mean, var, weight, bias = (arg(args, kwargs, i, n) for i, n in enumerate(names[:5]))
    training, eps = arg(args, kwargs, 5, "training", False), arg(args, kwargs, 7, "eps", 1e-5)
    if mode.tangent(mean) is not None or mode.tangent(var) is not None:
        raise Unsupported("batch_norm with running statistics that have tangents")
    out = func(*args, **kwargs)
    shape = (1, -1, *(1,) * (x.dim() - 2))
    dims = (0, *range(2, x.dim()))
    batch_statistics = training or mean is None
    if batch_statistics:
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = mean.view(shape), var.view(shape)
    rstd = (var + eps).rsqrt()
    normalized = (x - mean) * rstd
    dx = mode.tangent(x)
    tangent = None
    if dx is not None:
        tangent = (_normalized_tangent(dx, normalized, rstd, tuple(d + 1 for d in dims))
                   if batch_statistics else dx * rstd)
    return tag(mode, out, _affine_tangent(mode, tangent, normalized, weight, bias, shape))


def _group_norm(mode, func, args, kwargs):
    """Per sample and group of channels, the layer norm's tangent; then ⊙ w + x̂ ⊙ ẇ + ḃ per
    channel."""
    check_keywords(kwargs, ("num_groups", "weight", "bias", "eps"), "group_norm")
    x, groups = args[0], arg(args, kwargs, 1, "num_groups")
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    eps = arg(args, kwargs, 4, "eps", 1e-5)
    out = func(*args, **kwargs)
    grouped = x.reshape(x.shape[0], groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    rstd = (grouped.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    normalized = (grouped - mean) * rstd
    dx = mode.tangent(x)
    tangent = None
    if dx is not None:
        tangent = _normalized_tangent(dx.reshape(mode.k, *grouped.shape), normalized, rstd,
                                      (-1,)).view(mode.k, *x.shape)
    shape = (1, -1, *(1,) * (x.dim() - 2))
    return tag(mode, out, _affine_tangent(mode, tangent, normalized.view_as(x), weight, bias,
                                          shape))


def _activation_with(options: tuple[tuple[str, object], ...],
                     derivative: Callable[..., Tensor]) -> Rule:
    """σ(x; options) elementwise (leaky_relu, elu, softplus, hardtanh, ...): ẏ = σ'(x) ⊙ ẋ,
    ``derivative(x, *options)`` from PyTorch's ``*_backward`` kernel; in place refused."""
    names = [name for name, _ in options]

    def rule(mode, func, args, kwargs):
        check_keywords(kwargs, (*names, "inplace"), call_name(func))
        values = [arg(args, kwargs, i + 1, n, d) for i, (n, d) in enumerate(options)]
        if arg(args, kwargs, len(options) + 1, "inplace", False):
            raise Unsupported(f"{call_name(func)} in place")
        out = func(*args, **kwargs)
        return tag(mode, out, mode.tangent(args[0]) * derivative(args[0], *values))

    return rule


_SELU = (1.6732632423543772, 1.0507009873554805)  # α, scale


def _max_pools() -> dict[Callable, Rule]:
    """The rules of F.max_pool1d/2d/3d (5 options), F.adaptive_max_pool1d/2d/3d (1 option)
    and of their ``*_with_indices`` functions, which ``return_indices=True`` calls."""
    rules: dict[Callable, Rule] = {}
    for dims in (1, 2, 3):
        for name, options in ((f"max_pool{dims}d", 5), (f"adaptive_max_pool{dims}d", 1)):
            with_indices = getattr(F, f"{name}_with_indices")
            rule = _max_pool(with_indices, options, dims)
            rules[getattr(F, name)] = rules[with_indices] = rule
    return rules


def _instance_norm(mode, func, args, kwargs):
    """Per sample and channel over the spatial dimensions (input statistics, the module's
    default), the layer norm's tangent; then ⊙ w + x̂ ⊙ ẇ + ḃ per channel."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats",
             "momentum", "eps")
    check_keywords(kwargs, names[1:], "instance_norm")
    x, weight, bias = args[0], arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    if not arg(args, kwargs, 5, "use_input_stats", True):
        raise Unsupported("instance_norm with running statistics")
    eps = arg(args, kwargs, 7, "eps", 1e-5)
    out = func(*args, **kwargs)
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    rstd = (x.var(dims, unbiased=False, keepdim=True) + eps).rsqrt()
    normalized = (x - mean) * rstd
    dx = mode.tangent(x)
    tangent = None if dx is None else _normalized_tangent(dx, normalized, rstd,
                                                          tuple(d + 1 for d in dims))
    shape = (1, -1, *(1,) * (x.dim() - 2))
    return tag(mode, out, _affine_tangent(mode, tangent, normalized, weight, bias, shape))


def _prelu(mode, func, args, kwargs):
    """y = max(0, x) + w·min(0, x), w per channel (dimension 1) or one: ẏ = ẋ·(1 or w) +
    ẇ·min(0, x)."""
    check_keywords(kwargs, ("weight",), "prelu")
    x, weight = args[0], arg(args, kwargs, 1, "weight")
    out = func(*args, **kwargs)
    shape = (-1,) if x.dim() < 2 else (1, -1, *(1,) * (x.dim() - 2))
    w = weight.view(shape) if weight.numel() > 1 else weight.reshape(())
    dx, dw = mode.tangent(x), mode.tangent(weight)
    tangent = None
    if dx is not None:
        tangent = dx * torch.where(x > 0, torch.ones_like(w), w)
    if dw is not None:
        part = x.clamp_max(0) * (dw.view(mode.k, *shape) if weight.numel() > 1
                                 else dw.view(mode.k, *(1,) * x.dim()))
        tangent = part if tangent is None else tangent.add_(part)
    return tag(mode, out, tangent)


def _glu(mode, func, args, kwargs):
    """y = a ⊙ σ(b), (a, b) the halves along ``dim``: ẏ = ȧ ⊙ σ(b) + a ⊙ σ'(b) ⊙ ḃ."""
    check_keywords(kwargs, ("dim",), "glu")
    x, dim = args[0], arg(args, kwargs, 1, "dim", -1)
    out = func(*args, **kwargs)
    dx = mode.tangent(x)
    if dx is None:
        return out
    a, b = x.chunk(2, dim)
    da, db = dx.chunk(2, shift(dim))
    gate = torch.sigmoid(b)
    return tag(mode, out, da * gate + a * gate * (1 - gate) * db)


def _recurrence(mode, func, args, kwargs):
    """A recurrent layer's loop (:func:`natgrad.layers.recurrent.recurrence`), step by step:
    ġₕ = ḣ Wᵀ + h Ẇᵀ + ḃ, then the cell's tangents (:func:`cell_step`), all k at once. One
    dispatch for the loop instead of one per operation and step."""
    check_keywords(kwargs, (), "recurrence")
    cell, gates_in, weight, bias, h, c, reverse = args[:7]
    mask = args[7] if len(args) > 7 else None
    k = mode.k
    zeros = lambda x: x.new_zeros(k, *x.shape)  # noqa: E731
    d_in = mode.tangent(gates_in)
    d_in = zeros(gates_in) if d_in is None else d_in
    dw, db = mode.tangent(weight), None if bias is None else mode.tangent(bias)
    dh = mode.tangent(h)
    dh = zeros(h) if dh is None else dh
    dc = None if c is None else mode.tangent(c)
    dc = zeros(c) if c is not None and dc is None else dc
    steps = gates_in.shape[1]
    per_step, d_per_step = gates_in.unbind(1), d_in.unbind(2)
    out: list[Tensor] = [h] * steps
    d_out: list[Tensor] = [dh] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        gates_h = F.linear(h, weight, bias)
        d_h = dh @ weight.T  # [k, B, g·H]
        if dw is not None:
            d_h = d_h.baddbmm_(h.expand(k, *h.shape), dw.mT)
        if db is not None:
            d_h = d_h + db.unsqueeze(1)
        new_h, new_c, new_dh, new_dc = cell_step(cell, per_step[t], gates_h, h, c,
                                                 (d_per_step[t], d_h, dh, dc))
        h, c, out[t] = masked_step(mask, t, (new_h, new_c), (h, c))
        dh, dc, d_out[t] = masked_step(mask, t, (new_dh, new_dc), (dh, dc))
    outputs = tag(mode, torch.stack(out, 1), torch.stack(d_out, 2))
    return outputs, tag(mode, h, dh), None if c is None else tag(mode, c, dc)


RULES: dict[Callable, Rule] = {
    F.linear: _linear,
    **dict.fromkeys(methods("addmm"), _addmm),
    **dict.fromkeys(methods("matmul", "__matmul__", "bmm", "mm"), _matmul),
    F.embedding: _embedding,
    F.layer_norm: _layer_norm,
    F.rms_norm: _rms_norm,
    **dict.fromkeys([F.softmax, *methods("softmax")], _softmax),
    **dict.fromkeys([F.log_softmax, *methods("log_softmax")], _log_softmax),
    F.gelu: _gelu,
    F.silu: _activation(_aten.silu_backward),
    **dict.fromkeys([F.relu, *methods("relu")], _activation(
        lambda ones, y: _aten.threshold_backward(ones, y, 0), from_output=True)),
    **dict.fromkeys([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d], _dropout(True)),
    **dict.fromkeys([F.alpha_dropout, F.feature_alpha_dropout], _dropout(False)),
    F.scaled_dot_product_attention: _attention,
    recurrence: _recurrence,
    **dict.fromkeys([F.pad, torch._C._nn.pad], _pad),
    **dict.fromkeys([F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                     F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.interpolate,
                     F.pixel_shuffle, F.pixel_unshuffle], _batched_linear),
    **_max_pools(),
    F.batch_norm: _batch_norm,
    F.group_norm: _group_norm,
    F.leaky_relu: _activation_with((("negative_slope", 0.01),), lambda x, s: slope(
        _aten.leaky_relu_backward, x, negative_slope=s, self_is_result=False)),
    F.elu: _activation_with((("alpha", 1.0),), lambda x, a: slope(
        lambda g, v: _aten.elu_backward(g, a, 1, 1, False, v), x)),
    F.selu: _activation_with((), lambda x: slope(
        lambda g, v: _aten.elu_backward(g, _SELU[0], _SELU[1], 1, False, v), x)),
    F.softplus: _activation_with((("beta", 1.0), ("threshold", 20.0)), lambda x, b, t: slope(
        _aten.softplus_backward, x, beta=b, threshold=t)),
    F.hardtanh: _activation_with((("min_val", -1.0), ("max_val", 1.0)), lambda x, lo, hi: slope(
        _aten.hardtanh_backward, x, min_val=lo, max_val=hi)),
    F.relu6: _activation_with((), lambda x: slope(
        _aten.hardtanh_backward, x, min_val=0.0, max_val=6.0)),
    F.hardswish: _activation(_aten.hardswish_backward),
    F.hardsigmoid: _activation(_aten.hardsigmoid_backward),
    F.mish: _activation(_aten.mish_backward),
    F.celu: _activation_with((("alpha", 1.0),), lambda x, a: slope(
        lambda g, v: _aten.elu_backward(g, a, 1, 1 / a, False, v), x)),
    F.logsigmoid: _activation_with((), lambda x: torch.sigmoid(-x)),
    F.softsign: _activation_with((), lambda x: (1 + x.abs()).square().reciprocal()),
    F.tanhshrink: _activation_with((), lambda x: x.tanh().square()),
    F.instance_norm: _instance_norm,
    F.prelu: _prelu,
    F.glu: _glu,
    **dict.fromkeys([F.unfold, F.fold, F.channel_shuffle, torch.channel_shuffle,
                     F.native_channel_shuffle], _batched_linear),
    **dict.fromkeys([F.conv1d, F.conv2d, F.conv3d], _convolution(_CONV_ARGUMENTS)),
    **dict.fromkeys([F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d],
                    _convolution(_CONV_TRANSPOSE_ARGUMENTS)),
}
