"""The derivatives :class:`natgrad.curvature.stacked.StackedTangents` applies to k tangents:
shapes, arithmetic, reductions (the layers' are in :mod:`natgrad.curvature.stacked_layers`).

Every rule takes ``(mode, func, args, kwargs)``, computes ``func(*args, **kwargs)`` (the
primal, on ordinary tensors) and gives each result its tangents ``[k, *result.shape]``, the
tangent dimension first. Rules raise :class:`Unsupported` for arguments they do not take (an
unknown keyword, an exponent with a tangent, indices that move dimensions).

Notation: ẋ is the stacked tangent of x; a tangent of a broadcast operand is first given the
output's number of dimensions (:func:`lift`) so that it broadcasts behind the k dimension.
Rules write in place only into tensors they have just made: a tangent, once given, is never
changed (views and identities share it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from natgrad.curvature.stacked import StackedTangents

__all__ = ["RULES", "Rule", "Unsupported", "arg", "call_name", "check_keywords", "lift",
           "methods", "shift", "slope", "tag"]

_aten = torch.ops.aten
Rule = Callable[["StackedTangents", Callable, tuple, dict], Any]


class Unsupported(RuntimeError):
    """A call the stacked pass cannot take; the products fall back to one pass per tangent."""


def call_name(func: Callable) -> str:
    """The name of a torch function, or of the property for ``Tensor.shape.__get__`` & co."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name``, passed at position ``index`` or by keyword."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def check_keywords(kwargs: dict, allowed: Sequence[str], name: str) -> None:
    """Refuse a call with a keyword its rule does not know."""
    unknown = set(kwargs) - set(allowed)
    if unknown:
        raise Unsupported(f"{name} with keyword(s) {sorted(unknown)}")


def shift(dim: int) -> int:
    """A dimension of x as a dimension of ẋ (the k dimension comes first)."""
    return dim + 1 if dim >= 0 else dim


def lift(tangent: Tensor, ndim: int) -> Tensor:
    """ẋ ``[k, *s]`` viewed as ``[k, 1, …, 1, *s]`` with ``ndim`` dimensions after k."""
    extra = ndim - (tangent.dim() - 1)
    return tangent if extra <= 0 else tangent[(slice(None),) + (None,) * extra]


def _full(mode: StackedTangents, tangent: Tensor, out: Tensor) -> Tensor:
    """ẋ broadcast to the output's shape, ``[k, *out.shape]`` (a view)."""
    shape = (mode.k, *out.shape)
    return tangent if tangent.shape == shape else lift(tangent, out.dim()).expand(shape)


def tag(mode: StackedTangents, out: Any, tangent: Tensor | None) -> Any:
    """Give ``out`` the tangents ``tangent`` (broadcast to its shape, in its dtype)."""
    if tangent is not None and isinstance(out, Tensor):
        if tangent.dtype != out.dtype:  # a promoted operation: the tangent is promoted too
            tangent = tangent.to(out.dtype)
        mode.set(out, _full(mode, tangent, out))
    return out


def slope(backward: Callable[..., Tensor], x: Tensor, **options: Any) -> Tensor:
    """σ'(x) by PyTorch's own ``*_backward`` kernel applied to ones (once, not k times; the
    kernels do not all broadcast: oneDNN's GELU refuses a stacked gradient)."""
    return backward(torch.ones_like(x), x, **options)


def methods(*names: str) -> list[Callable]:
    """``Tensor.name`` and ``torch.name`` for each name that exists."""
    found = []
    for name in names:
        found += [getattr(owner, name) for owner in (Tensor, torch) if hasattr(owner, name)]
    return found


def _zeros_like(mode: StackedTangents, x: Tensor) -> Tensor:
    return x.new_zeros(()).expand(mode.k, *x.shape)


# --- shapes: the same operation on ẋ, shifted past the k dimension --------------------------

def _reshaped(mode, func, args, kwargs):
    """view, reshape, flatten, squeeze, …: row-major order is kept, so ẏ = ẋ reshaped."""
    if func is Tensor.view and any(isinstance(a, torch.dtype) for a in (*args, *kwargs.values())):
        raise Unsupported("view as another dtype")
    out = func(*args, **kwargs)
    tangent = mode.tangent(args[0])  # None for x.view_as(y) where only y has tangents
    return tag(mode, out, None if tangent is None else tangent.reshape(mode.k, *out.shape))


def _identity(mode, func, args, kwargs):
    """contiguous, clone, alias: ẏ = ẋ."""
    check_keywords(kwargs, ("memory_format",), call_name(func))
    return tag(mode, func(*args, **kwargs), mode.tangent(args[0]))


def _cast(mode, func, args, kwargs):
    """to, float, double, half, type, cpu, cuda: ẏ = ẋ in the result's dtype and device."""
    out = func(*args, **kwargs)
    tangent = mode.tangent(args[0])  # None for x.to(y) where only y has tangents
    if tangent is None or not isinstance(out, Tensor) or not (
            out.is_floating_point() or out.is_complex()):
        return out
    return tag(mode, out, tangent.to(dtype=out.dtype, device=out.device))


def _detached(mode, func, args, kwargs):
    """detach, x.data: no tangent (as forward-mode AD)."""
    return func(*args, **kwargs)


def _transpose(mode, func, args, kwargs):
    check_keywords(kwargs, ("dim0", "dim1"), "transpose")
    out = func(*args, **kwargs)
    dim0, dim1 = arg(args, kwargs, 1, "dim0"), arg(args, kwargs, 2, "dim1")
    return tag(mode, out, mode.tangent(args[0]).transpose(shift(dim0), shift(dim1)))


def _t(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    tangent = mode.tangent(args[0])
    return tag(mode, out, tangent.transpose(1, 2) if out.dim() == 2 else tangent)


def _matrix_transpose(mode, func, args, kwargs):
    """x.T (reversed dimensions) and x.mT (last two swapped)."""
    out = func(*args, **kwargs)
    tangent = mode.tangent(args[0])
    if call_name(func) == "mT":
        return tag(mode, out, tangent.mT)
    return tag(mode, out, tangent.permute(0, *range(tangent.dim() - 1, 0, -1)))


def _permute(mode, func, args, kwargs):
    check_keywords(kwargs, ("dims",), "permute")
    out = func(*args, **kwargs)
    x, dims = args[0], arg(args, kwargs, 1, "dims")
    if isinstance(dims, int):  # x.permute(2, 0, 1)
        dims = args[1:]
    return tag(mode, out, mode.tangent(x).permute(0, *(d % x.dim() + 1 for d in dims)))


def _movedim(mode, func, args, kwargs):
    check_keywords(kwargs, ("source", "destination"), "movedim")
    out = func(*args, **kwargs)
    x = args[0]
    ends = [arg(args, kwargs, 1, "source"), arg(args, kwargs, 2, "destination")]
    source, destination = ([d % x.dim() + 1 for d in ([e] if isinstance(e, int) else e)]
                           for e in ends)
    return tag(mode, out, mode.tangent(x).movedim(source, destination))


def _pieces(mode, func, args, kwargs):
    """unbind, split, chunk, tensor_split: the same pieces of ẋ along the shifted dim."""
    name = call_name(func)
    check_keywords(kwargs, ("dim", "split_size", "split_size_or_sections", "chunks",
                            "sections", "indices", "indices_or_sections"), name)
    outs = func(*args, **kwargs)
    tangent = mode.tangent(args[0])
    if name == "unbind":
        pieces = tangent.unbind(shift(arg(args, kwargs, 1, "dim", 0)))
    else:
        how = args[1] if len(args) > 1 else next(v for key, v in kwargs.items() if key != "dim")
        pieces = getattr(tangent, name)(how, shift(arg(args, kwargs, 2, "dim", 0)))
    if len(pieces) != len(outs):
        raise Unsupported(f"{name}: the tangent's pieces differ")
    for out, piece in zip(outs, pieces, strict=True):
        tag(mode, out, piece)
    return outs


def _expand(mode, func, args, kwargs):
    """expand, expand_as, broadcast_to: ẋ broadcast the same way."""
    return tag(mode, func(*args, **kwargs), mode.tangent(args[0]))


def _getitem(mode, func, args, kwargs):
    """x[index]: ẋ[:, index], unless advanced indices would move the k dimension."""
    x, index = args
    out = func(*args, **kwargs)
    items = index if isinstance(index, tuple) else (index,)
    advanced = [i for i in items if isinstance(i, (Tensor, list))]
    if len(advanced) > 1 or (advanced and any(type(i) is int for i in items)):
        raise Unsupported("indexing with several advanced indices")
    tangent = mode.tangent(x)[(slice(None), *items)]
    if tangent.shape != (mode.k, *out.shape):
        raise Unsupported("indexing that moves dimensions")
    return tag(mode, out, tangent)


def _join(mode, func, args, kwargs):
    """cat, stack: the tangents joined along the shifted dim (zeros for constants)."""
    check_keywords(kwargs, ("dim", "axis"), call_name(func))
    tensors = arg(args, kwargs, 0, "tensors")
    dim = arg(args, kwargs, 1, "dim", kwargs.get("axis", 0))
    out = func(*args, **kwargs)
    stack = call_name(func) == "stack"
    if not stack:  # cat skips 1-d empty tensors (an empty cache, say)
        tensors = [t for t in tensors if t.dim() != 1 or t.shape[0] != 0] or tensors
    tangents = [mode.tangent(t) for t in tensors]
    tangents = [_zeros_like(mode, t) if d is None else d
                for t, d in zip(tensors, tangents, strict=True)]
    return tag(mode, out, (torch.stack if stack else torch.cat)(tangents, dim=shift(dim)))


# --- arithmetic and reductions ----------------------------------------------------------------

def _tangent_of(mode: StackedTangents, x: Any) -> Tensor | None:
    return mode.tangent(x) if isinstance(x, Tensor) else None


def _sum_rule(sign: float) -> Rule:
    """a + α·b (sign 1) and a − α·b (sign −1): ẏ = ȧ ± α·ḃ."""

    def rule(mode, func, args, kwargs):
        check_keywords(kwargs, ("alpha",), "add")
        a, b = args
        alpha = sign * kwargs.get("alpha", 1)
        out = func(*args, **kwargs)
        da, db = _tangent_of(mode, a), _tangent_of(mode, b)
        if db is None:
            return tag(mode, out, da)
        db = lift(db, out.dim())
        if da is None:
            return tag(mode, out, db if alpha == 1 else db * alpha)
        return tag(mode, out, torch.add(lift(da, out.dim()), db, alpha=alpha))

    return rule


def _rsub(mode, func, args, kwargs):
    """c − α·x: ẏ = ċ − α·ẋ."""
    check_keywords(kwargs, ("alpha",), "rsub")
    out = func(*args, **kwargs)
    dx, dc = mode.tangent(args[0]), _tangent_of(mode, args[1])
    tangent = None if dx is None else lift(dx, out.dim()) * -kwargs.get("alpha", 1)
    if dc is not None:
        tangent = lift(dc, out.dim()) if tangent is None else tangent + lift(dc, out.dim())
    return tag(mode, out, tangent)


def _mul(mode, func, args, kwargs):
    """a·b: ẏ = ȧ·b + a·ḃ."""
    check_keywords(kwargs, (), "mul")
    a, b = args
    out = func(a, b)
    da, db = _tangent_of(mode, a), _tangent_of(mode, b)
    n = out.dim()
    if da is None:
        return tag(mode, out, a * lift(db, n))
    tangent = lift(da, n) * b
    if db is not None:  # two roundings, as PyTorch's rule (not one fused addcmul)
        tangent = tangent + a * lift(db, n)
    return tag(mode, out, tangent)


def _div(mode, func, args, kwargs):
    """a / b: ẏ = (ȧ − y·ḃ) / b."""
    check_keywords(kwargs, (), "div")
    a, b = args
    out = func(a, b)
    da, db = _tangent_of(mode, a), _tangent_of(mode, b)
    n = out.dim()
    if db is None:
        return tag(mode, out, lift(da, n) / b)
    numerator = -out * lift(db, n) if da is None else lift(da, n) - out * lift(db, n)
    return tag(mode, out, numerator / b)


def _rdiv(mode, func, args, kwargs):
    """c / x: ẏ = −y/x·ẋ."""
    if _tangent_of(mode, args[1]) is not None:
        raise Unsupported("reflected division by a tensor with tangents")
    out = func(*args, **kwargs)
    x = args[0]
    return tag(mode, out, mode.tangent(x) * (-out / x))


def _pow(mode, func, args, kwargs):
    """xᵉ with a number e: ẏ = e·xᵉ⁻¹·ẋ."""
    check_keywords(kwargs, ("exponent",), "pow")
    x, exponent = args[0], arg(args, kwargs, 1, "exponent")
    if not isinstance(x, Tensor) or isinstance(exponent, Tensor):
        raise Unsupported("pow with a tensor exponent")
    out = func(*args, **kwargs)
    if exponent == 0:
        return out
    derivative = x * 2 if exponent == 2 else x.pow(exponent - 1) * exponent
    return tag(mode, out, mode.tangent(x) * derivative)


def _unary(derivative: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Rule:
    """y = f(x) elementwise: ẏ = ``derivative(ẋ, x, y)``."""

    def rule(mode, func, args, kwargs):
        out = func(*args, **kwargs)
        return tag(mode, out, derivative(mode.tangent(args[0]), args[0], out))

    return rule


def _reduction(mode, func, args, kwargs):
    """sum, mean over ``dim`` (None: all): the same reduction of ẋ."""
    name = call_name(func)
    check_keywords(kwargs, ("dim", "keepdim", "dtype", "axis"), name)
    dim = arg(args, kwargs, 1, "dim", kwargs.get("axis"))
    keepdim = arg(args, kwargs, 2, "keepdim", False)
    if isinstance(dim, torch.dtype):  # x.sum(dtype) positionally
        raise Unsupported("reduction with a positional dtype")
    out = func(*args, **kwargs)
    tangent = mode.tangent(args[0])
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        dims = tuple(range(1, tangent.dim()))
    else:
        dims = tuple(shift(d) for d in ([dim] if isinstance(dim, int) else dim))
    if not dims:  # a 0-d tensor: the reduction is the identity
        return tag(mode, out, tangent)
    return tag(mode, out, getattr(torch, name)(tangent, dim=dims, keepdim=keepdim,
                                               dtype=kwargs.get("dtype")))


def _where(mode, func, args, kwargs):
    """where(c, a, b): ẏ = where(c, ȧ, ḃ)."""
    check_keywords(kwargs, (), "where")
    if len(args) != 3:
        raise Unsupported("where with one argument")
    a, condition, b = args if func is Tensor.where else (args[1], args[0], args[2])
    out = func(*args)
    n = out.dim()
    da, db = _tangent_of(mode, a), _tangent_of(mode, b)
    if da is None and db is None:
        return out
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    return tag(mode, out, torch.where(condition, zero if da is None else lift(da, n),
                                      0.0 if db is None else lift(db, n)))


def _masked_fill(mode, func, args, kwargs):
    """x with the masked entries set to a constant: ẏ = ẋ with them zero."""
    check_keywords(kwargs, ("mask", "value"), "masked_fill")
    x, mask, value = args[0], arg(args, kwargs, 1, "mask"), arg(args, kwargs, 2, "value")
    if _tangent_of(mode, value) is not None:
        raise Unsupported("masked_fill with a value that has a tangent")
    out = func(*args, **kwargs)
    tangent = mode.tangent(x)
    return tag(mode, out, None if tangent is None else tangent.masked_fill(mask, 0))


def _constant(mode, func, args, kwargs):
    """Comparisons, indices of extremes, new tensors shaped like x: no tangent."""
    return func(*args, **kwargs)


# --- the table --------------------------------------------------------------------------------

_DERIVATIVES = {  # y = f(x): ẏ from (ẋ, x, y)
    ("exp",): lambda dx, x, y: dx * y,
    ("log",): lambda dx, x, y: dx / x,
    ("sqrt",): lambda dx, x, y: dx / (2 * y),
    ("rsqrt",): lambda dx, x, y: dx * (y.pow(3) * -0.5),  # d x^(−½) = −½ y³
    ("neg", "negative", "__neg__"): lambda dx, x, y: -dx,
    ("sin",): lambda dx, x, y: dx * x.cos(),
    ("cos",): lambda dx, x, y: dx * -x.sin(),
    ("reciprocal",): lambda dx, x, y: dx * -(y * y),
    ("square",): lambda dx, x, y: dx * (2 * x),
    ("abs", "__abs__"): lambda dx, x, y: dx * x.sgn(),  # 0 at 0, as PyTorch's rule
    ("tanh",): lambda dx, x, y: dx * slope(_aten.tanh_backward, y),
    ("sigmoid",): lambda dx, x, y: dx * slope(_aten.sigmoid_backward, y),
}


def _table() -> dict[Callable, Rule]:
    """The torch functions (``Tensor`` methods, ``torch`` and ``F`` functions) → rule."""
    rules: dict[Callable, Rule] = {}

    def add(funcs: list[Callable], rule: Rule) -> None:
        rules.update(dict.fromkeys(funcs, rule))

    add(methods("view", "reshape", "view_as", "reshape_as", "flatten", "unflatten",
                "squeeze", "unsqueeze"), _reshaped)
    add(methods("contiguous", "clone", "alias"), _identity)
    add(methods("to", "float", "double", "half", "bfloat16", "type", "type_as", "cpu",
                "cuda"), _cast)
    add([*methods("detach"), Tensor.data.__get__], _detached)
    add(methods("transpose", "swapaxes", "swapdims"), _transpose)
    add(methods("t"), _t)
    add([Tensor.T.__get__, Tensor.mT.__get__], _matrix_transpose)
    add(methods("permute"), _permute)
    add(methods("movedim", "moveaxis"), _movedim)
    add(methods("unbind", "split", "chunk", "tensor_split"), _pieces)
    add(methods("expand", "expand_as", "broadcast_to"), _expand)
    add([Tensor.__getitem__], _getitem)
    add(methods("cat", "concat", "concatenate", "stack"), _join)
    add(methods("add", "__add__", "__radd__"), _sum_rule(1.0))
    add(methods("sub", "subtract", "__sub__"), _sum_rule(-1.0))
    add(methods("__rsub__", "rsub"), _rsub)
    add(methods("mul", "multiply", "__mul__", "__rmul__"), _mul)
    add(methods("div", "divide", "true_divide", "__truediv__"), _div)
    add(methods("__rdiv__", "__rtruediv__"), _rdiv)
    add(methods("pow", "__pow__"), _pow)
    for names, derivative in _DERIVATIVES.items():
        add(methods(*names), _unary(derivative))
    add([F.tanh], _unary(_DERIVATIVES["tanh",]))
    add([F.sigmoid], _unary(_DERIVATIVES["sigmoid",]))
    add(methods("sum", "mean"), _reduction)
    add(methods("where"), _where)
    add(methods("masked_fill"), _masked_fill)
    add(methods("eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__",
                "__gt__", "__ge__", "isnan", "isinf", "isfinite", "isneginf", "isposinf",
                "argmax", "argmin", "new_zeros", "new_ones", "new_empty", "new_full",
                "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
                "randn_like"), _constant)
    return rules


RULES = _table()
