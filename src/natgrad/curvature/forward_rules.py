"""Forward-mode rules written out where PyTorch's own are slow: attention, constant operands.

Inside natgrad's forward-mode products (:meth:`natgrad.curvature.model.FunctionalModel.jvp`
one tangent at a time, for a model that the stacked pass of :mod:`natgrad.curvature.stacked`
does not take) :class:`ForwardRules` sends two kinds of calls
through rules of its own; :func:`attention_plan` is shared with the stacked pass.

Attention (``F.scaled_dot_product_attention``): PyTorch's math kernel (the only one with
forward-mode AD) builds the causal mask, adds it and takes a "safe" softmax through
operations whose forward-mode rules are slow. Here, with s = q kᵀ·c + B (c the scale, B the
additive mask, −∞ where masked) and P = softmax(s) (a row masked everywhere: 0, as PyTorch's
safe softmax),

    out = P v,   ṡ = (q̇ kᵀ + q k̇ᵀ)·c + Ḃ,   Ṗ = P ⊙ (ṡ − rowsum(P ⊙ ṡ)),   out̂ = Ṗ v + P v̇.

Binary operations with one operand that has no tangent (x·c, x ± c, c − x, x / c with c a
Python number; x·C, x ± C, C − x with C a tensor without tangent: GPT-2's tanh GELU, rotary
embeddings, masks, ε in a norm): PyTorch's rules give the constant a zero tangent whose shape
a Python meta function works out, about 0.4 ms per operation against 7 µs when both operands
have tangents. Here a number goes to the operation's ``.Scalar`` overload (the same kernel,
whose rule scales or passes the tangent) and a constant tensor through :class:`_Product` /
:class:`_Sum` (ẏ = ẋ·C, ẏ = ±ẋ).

Measured on one thread (median CPU time, ``benchmarks/jvp_cost.py --hugging-face``), the
product for two tangents costs 13.2 ms instead of 16.1 on the bench's char-gpt (attention is
the whole gain there), 17.8 instead of 24.3 on a two-layer Hugging Face Llama and 22.7
instead of 27.6 on GPT-2 (width 64, 16 × 32 tokens).

Anything else (dropout, a mask together with ``is_causal``, mixed dtypes, autocast, nested
tensors or tensor subclasses, keyword arguments such as ``alpha``) calls PyTorch's function
unchanged, so its results and errors are PyTorch's; the values are PyTorch's up to the order
of floating-point operations. Measured and left out: ``F.linear`` (ẋWᵀ + xẆᵀ + ḃ summed by
two ``addmm`` into one buffer: within noise of PyTorch's rule on these models) and
``F.layer_norm`` (by hand, 14 operations instead of PyTorch's 32: 144 µs each either way;
fused, ``native_layer_norm_backward`` for ẋ and ``native_layer_norm`` with weight ẇ and bias
ḃ: 117 µs instead of 127, under 1% of the product).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["ForwardRules", "attention_plan"]

_SDPA = F.scaled_dot_product_attention


class _Attention(torch.autograd.Function):
    """softmax(q kᵀ·scale + bias) v, rows in ``empty`` set to zero; tangent in the module doc.
    q, k, v share their batch dimensions ``[*B]``; bias and ``empty`` broadcast to
    ``[*B, L, S]``. Batched matrix products on ``[prod(B), ·, ·]`` views, the additions folded
    into them. Forward-mode only (natgrad's products run without a graph)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                empty: Tensor | None, scale: float) -> Tensor:
        ctx.set_materialize_grads(False)  # no tangent: None, not zeros
        *batch, length, width = q.shape
        source = k.shape[-2]
        q, k, v = q.reshape(-1, length, width), k.reshape(-1, source, width), \
            v.reshape(-1, source, v.shape[-1])
        if bias is not None and bias.dim() == 2:  # s = q kᵀ·c + B in one product
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
        else:
            scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
            if bias is not None:
                scores.view(*batch, length, source).add_(bias)
        probs = torch.softmax(scores, dim=-1)
        if empty is not None:  # rows masked everywhere: 0, as PyTorch's safe softmax
            probs.view(*batch, length, source).masked_fill_(empty, 0.0)
        ctx.save_for_forward(q, k, v, probs)
        ctx.scale, ctx.batch = scale, batch
        return torch.bmm(probs, v).view(*batch, length, v.shape[-1])

    @staticmethod
    def jvp(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None,
            dbias: Tensor | None, _empty: None, _scale: None) -> Tensor | None:
        q, k, v, probs = ctx.saved_tensors
        scores_shape = (*ctx.batch, *probs.shape[1:])
        dscores = None  # ṡ = (q̇ kᵀ + q k̇ᵀ)·c + Ḃ
        if dq is not None:
            dscores = torch.bmm(dq.reshape(q.shape), k.transpose(1, 2))
        if dk is not None:
            dk = dk.reshape(k.shape).transpose(1, 2)
            dscores = torch.bmm(q, dk) if dscores is None else dscores.baddbmm_(q, dk)
        if dscores is not None:
            dscores.mul_(ctx.scale)
        if dbias is not None and dscores is not None:
            dscores.view(scores_shape).add_(dbias)
        elif dbias is not None:
            dscores = dbias.expand(scores_shape).reshape(probs.shape)
        out = None
        if dscores is not None:  # Ṗ = P ⊙ (ṡ − rowsum(P ⊙ ṡ)), then Ṗ v
            weighted = probs * dscores
            dprobs = weighted.addcmul_(probs, weighted.sum(-1, keepdim=True), value=-1)
            out = torch.bmm(dprobs, v)
        if dv is not None:
            dv = dv.reshape(v.shape)
            out = torch.bmm(probs, dv) if out is None else out.baddbmm_(probs, dv)
        return None if out is None else out.view(*ctx.batch, probs.shape[1], v.shape[-1])

    @staticmethod
    def backward(ctx, *grads: Tensor):  # pragma: no cover - products run without a graph
        raise RuntimeError("natgrad's attention rule is forward-mode only")


AttentionPlan = tuple[int, Tensor | None, Tensor | None, float]


def attention_plan(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> AttentionPlan | None:
    """How natgrad's rules compute ``F.scaled_dot_product_attention`` on these arguments:
    ``(groups, bias, empty, scale)``, with keys and values repeated ``groups`` times along
    dimension −3 (grouped-query attention), s = q kᵀ·scale + bias (``bias`` broadcasts to
    ``[*B, L, S]``, None: no mask) and the rows in ``empty`` (``[*B, L, 1]``) zero; None
    where the call goes to PyTorch's function (the module doc's exceptions, or keys, values
    or mask that do not broadcast over the queries' batch)."""
    dtype = query.dtype
    plain = (
        dropout_p == 0.0
        and not (is_causal and attn_mask is not None)
        and _plain(query, key, value, attn_mask)
        and key.dtype == value.dtype == dtype and dtype.is_floating_point
        and query.dim() >= 2 and query.dim() == key.dim() == value.dim()
        and (attn_mask is None or attn_mask.dtype in (torch.bool, dtype))
        and not torch.is_autocast_enabled(query.device.type)
    )
    if not plain:
        return None
    groups, key_shape, value_shape = 1, key.shape, value.shape
    if enable_gqa and query.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        groups, rest = divmod(query.shape[-3], key.shape[-3])
        if rest != 0 or key.shape[-3] != value.shape[-3]:
            return None
        # each key/value head serves `groups` query heads
        key_shape = (*key.shape[:-3], query.shape[-3], *key.shape[-2:])
        value_shape = (*value.shape[:-3], query.shape[-3], *value.shape[-2:])
    length, source = query.shape[-2], key.shape[-2]
    # keys, values and mask broadcast over the queries' batch (not the other way)
    scores = (*query.shape[:-2], length, source)
    shapes = [(*key_shape[:-2], length, source), (*value_shape[:-2], length, source)]
    shapes += [] if attn_mask is None else [attn_mask.shape]
    if not all(_broadcasts(shape, scores) for shape in shapes):
        return None
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    bias = empty = None
    if is_causal:  # query i sees keys 0..i (top left aligned), never an empty row
        bias = torch.full((length, source), -math.inf, dtype=dtype,
                          device=query.device).triu_(1)
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=dtype, device=query.device).masked_fill_(
            attn_mask.logical_not(), -math.inf)
        empty = attn_mask.logical_not().all(-1, keepdim=True)
    elif attn_mask is not None:
        bias = attn_mask
        empty = torch.isneginf(attn_mask).all(-1, keepdim=True)
    return groups, bias, empty, scale


def _attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` through :class:`_Attention` where it applies."""
    plan = attention_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if plan is None:
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                     is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    groups, bias, empty, scale = plan
    if groups > 1:
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    batch = query.shape[:-2]  # keys and values broadcast over the queries' batch
    key = key.expand(*batch, *key.shape[-2:])
    value = value.expand(*batch, *value.shape[-2:])
    return _Attention.apply(query, key, value, bias, empty, scale)


def _broadcasts(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` (and not beyond it)."""
    return len(shape) <= len(target) and all(
        a == b or a == 1 for a, b in zip(reversed(shape), reversed(target), strict=False))


def _plain(*tensors: Tensor | None) -> bool:
    """Whether every tensor is an ordinary dense one (no subclass such as ``DTensor``)."""
    return all(t is None or (type(t) in (Tensor, nn.Parameter) and not t.is_nested)
               for t in tensors)


class _Product(torch.autograd.Function):
    """a ⊙ b (broadcast) with the tangent ȧ ⊙ b + a ⊙ ḃ (forward-mode only)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)  # no tangent: None, not zeros
        ctx.save_for_forward(a, b)
        return a * b

    @staticmethod
    def jvp(ctx, da: Tensor | None, db: Tensor | None) -> Tensor:
        a, b = ctx.saved_tensors
        if da is None:
            return a * db
        return da * b if db is None else da * b + a * db

    @staticmethod
    def backward(ctx, *grads: Tensor):  # pragma: no cover - products run without a graph
        raise RuntimeError("natgrad's product rule is forward-mode only")


class _Sum(torch.autograd.Function):
    """a + s·b (s = ±1, broadcast) with the tangent ȧ + s·ḃ (forward-mode only)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, sign: int) -> Tensor:
        ctx.set_materialize_grads(False)  # no tangent: None, not zeros
        out = a + b if sign > 0 else a - b
        ctx.sign, ctx.like = sign, (out.shape, out.dtype, out.device)
        return out

    @staticmethod
    def jvp(ctx, da: Tensor | None, db: Tensor | None, _sign: None) -> Tensor:
        shape, dtype, device = ctx.like
        out = torch.zeros(shape, dtype=dtype, device=device)
        if da is not None:
            out.add_(da)
        if db is not None:
            out.sub_(db) if ctx.sign < 0 else out.add_(db)
        return out

    @staticmethod
    def backward(ctx, *grads: Tensor):  # pragma: no cover - products run without a graph
        raise RuntimeError("natgrad's sum rule is forward-mode only")


def _has_tangent(t: Tensor, level: int) -> bool:
    return torch._VF._unpack_dual(t, level)[1] is not None


def _binary_rule(func: Callable, scalar: torch._ops.OpOverload, commutes: bool,
                 kind: str) -> Callable:
    """``func`` (e.g. ``Tensor.mul``) with the forward-mode rule that skips PyTorch's zero
    tangent for an operand without one: with a Python number, its ``.Scalar`` overload (the
    same kernel); with a tensor that has no tangent beside one that has, :class:`_Product`
    or :class:`_Sum` (``kind``: ``"mul"``, ``"add"``, ``"sub"``; ``""``: numbers only)."""

    def rule(*args, **kwargs):
        if kwargs or len(args) != 2:
            return func(*args, **kwargs)
        a, b = args
        if type(b) in (int, float) and isinstance(a, Tensor) and _plain(a):
            return scalar(a, b)
        if commutes and type(a) in (int, float) and isinstance(b, Tensor) and _plain(b):
            return scalar(b, a)
        level = fwAD._current_level
        if (kind and level >= 0 and isinstance(a, Tensor) and isinstance(b, Tensor)
                and _plain(a, b) and _has_tangent(a, level) != _has_tangent(b, level)):
            if kind == "mul":
                return _Product.apply(a, b)
            return _Sum.apply(a, b, 1 if kind == "add" else -1)
        return func(*args, **kwargs)

    return rule


_aten = torch.ops.aten
RULES: dict[Callable, Callable] = {
    _SDPA: _attention,
    # x·y, x ± y with y a Python number or a tensor without tangent: PyTorch's rules give y
    # a zero tangent, whose shape a Python meta function works out (~0.4 ms each)
    **{func: _binary_rule(func, op, commutes, kind) for func, op, commutes, kind in (
        (Tensor.mul, _aten.mul.Scalar, True, "mul"), (torch.mul, _aten.mul.Scalar, True, "mul"),
        (Tensor.add, _aten.add.Scalar, True, "add"), (torch.add, _aten.add.Scalar, True, "add"),
        (Tensor.sub, _aten.sub.Scalar, False, "sub"), (torch.sub, _aten.sub.Scalar, False, "sub"),
        (Tensor.__rsub__, _aten.rsub.Scalar, False, ""),
        (Tensor.div, _aten.div.Scalar, False, ""), (torch.div, _aten.div.Scalar, False, ""),
    )},
}


class ForwardRules(TorchFunctionMode):
    """Within this context, the functions in ``rules`` (default :data:`RULES`: attention and
    the binary operations of the module doc) run through natgrad's rules where they apply."""

    def __init__(self, rules: dict[Callable, Callable] | None = None) -> None:
        super().__init__()
        self.rules = RULES if rules is None else rules

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rule = self.rules.get(func)
        return (rule or func)(*args, **(kwargs or {}))
