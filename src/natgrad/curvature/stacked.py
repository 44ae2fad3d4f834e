"""Jacobian-vector products for k tangents in one forward pass, the tangents stacked.

Forward-mode AD (``torch.autograd.forward_ad``) carries one tangent per pass: k directions
cost k forwards, each recomputing the primal, and every operation on a dual tensor pays
PyTorch's dispatch for both halves. :class:`StackedTangents` instead runs the model once on
ordinary tensors and keeps, beside every tensor x that depends on the parameters, its k
tangents stacked in one tensor ẋ of shape ``[k, *x.shape]``; each operation computes its
primal as usual and all k tangents with one call of its derivative
(:mod:`natgrad.curvature.stacked_rules`, :mod:`natgrad.curvature.stacked_layers`), e.g.

    linear:    y = x Wᵀ + b,         ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ      (two matrix products for k)
    attention: P = softmax(s), y = P v,   ẏ = Ṗ v + P v̇,   Ṗ = P ⊙ (ṡ − rowsum(P ⊙ ṡ)).

The mode sees every call through ``__torch_function__``. A call none of whose arguments has
a tangent runs unchanged (its result has none: masks, positions, rotary tables). A call on a
tensor with tangents runs through its rule, or, for a query that returns no tensor (``size``,
``shape``, ``dtype``), unchanged; anything else raises :class:`Unsupported` and the caller
falls back to forward-mode AD one tangent at a time. So are refused: functions without a
rule, in-place operations and ``out=`` on tensors with tangents, keyword arguments a rule does
not know, random dropout, tensor subclasses (``DTensor``), autocast, ``torch.func``
transforms (their wrapped tensors are unwrapped to find tangents), and every call made inside
a custom ``torch.autograd.Function`` (PyTorch turns forward-mode AD off there: the tangent
must be the function's own ``jvp``, or its backward, not the derivative of the operations it
happens to run). Operations that reach PyTorch's dispatcher without a Python torch function
(TorchScript, C++ extensions, code that turns torch functions off) are seen by a dispatch
mode, :class:`_Watch`, which refuses them on tensors with tangents; a raw pointer
(``data_ptr``, a Triton kernel's argument) is refused too. What remains unseen is what
forward-mode AD misses as well: a kernel that writes a tensor through a pointer it was handed
in C++.

The tangents are the same numbers as forward-mode AD's up to the order of floating-point
operations (the rules use the same formulas; float64 tests in
``tests/curvature/test_stacked.py`` hold them to 1e-10 of ``torch.autograd.functional.jvp``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch._C import _functorch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from natgrad.curvature import stacked_layers, stacked_rules
from natgrad.curvature.stacked_rules import Rule, Unsupported, call_name

__all__ = ["StackedTangents", "Unsupported"]

_TANGENT = "_natgrad_stacked_tangent"

# calls that read a tensor's metadata or values without returning a tensor
_QUERIES = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset",
    "is_contiguous", "is_floating_point", "is_complex", "is_signed", "element_size",
    "get_device", "__len__", "__bool__", "item", "tolist", "__int__",
    "__float__", "__index__", "__format__", "__repr__", "__hash__",
})
_PROPERTIES = frozenset({
    "shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_cpu", "is_mps", "is_meta",
    "is_sparse", "is_quantized", "is_nested", "requires_grad", "names", "itemsize",
    "nbytes", "grad_fn", "is_leaf", "grad",
})
_PLAIN = (Tensor, nn.Parameter)


class StackedTangents(TorchFunctionMode):
    """Within this context, tensors that depend on the seeded ones carry their k tangents.

    Args:
        k: the number of tangents.

    Use :meth:`seed` for the inputs of the function (the parameters' values), run it inside
    the context, then read the output's tangents with :meth:`tangent` before leaving.
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self._tagged: list[weakref.ref] = []
        self._watch = _Watch(self)
        self.refusal: str | None = None  # why the pass stopped (an error may wrap ours)

    def refuse(self, message: str) -> Unsupported:
        """The error that stops the pass (recorded: TorchScript replaces it by its own)."""
        self.refusal = message
        return Unsupported(message)

    def __enter__(self) -> StackedTangents:
        super().__enter__()
        self._watch.__enter__()
        return self

    def tangent(self, x: Any) -> Tensor | None:
        """The stacked tangents ``[k, *x.shape]`` of ``x`` in this pass (None: all zero)."""
        entry = getattr(x, _TANGENT, None)
        return entry[1] if entry is not None and entry[0] is self else None

    def seed(self, x: Tensor, tangents: Tensor | None) -> None:
        """Give ``x`` the stacked tangents ``[k, *x.shape]`` (None: none)."""
        if tangents is not None and tangents.shape != (self.k, *x.shape):
            raise ValueError(f"tangents of shape {tuple(tangents.shape)} for a tensor of "
                             f"shape {tuple(x.shape)} and k = {self.k}")
        self.set(x, tangents)

    def set(self, x: Tensor, tangents: Tensor | None) -> None:
        """:meth:`seed` for a rule's result, whose tangents have the right shape."""
        if tangents is None or not (x.is_floating_point() or x.is_complex()):
            return
        setattr(x, _TANGENT, (self, tangents))
        self._tagged.append(weakref.ref(x))

    def __exit__(self, *exc: object) -> None:
        self._watch.__exit__(*exc)
        super().__exit__(*exc)
        for ref in self._tagged:  # tensors that outlive the pass drop their tangents
            x = ref()
            if x is not None and getattr(x, _TANGENT, (None,))[0] is self:
                delattr(x, _TANGENT)
        self._tagged.clear()

    def _scan(self, values: Iterable[Any]) -> int:
        """1 if a tensor in ``values`` (or in lists, tuples, dicts among them) has tangents in
        this pass, 2 if one is a tensor subclass, 3 for both, 0 for neither."""
        found = 0
        for v in values:
            if isinstance(v, Tensor):
                if type(v) not in _PLAIN or v.is_nested:
                    found |= 2
                entry = getattr(v, _TANGENT, None)
                if entry is not None and entry[0] is self:
                    found |= 1
            elif isinstance(v, (list, tuple)):
                found |= self._scan(v)
            elif isinstance(v, dict):
                found |= self._scan(v.values())
        return found

    def _wrapped(self, values: Iterable[Any]) -> bool:
        """Whether a tensor in ``values`` wraps (``torch.func``'s batched or grad-tracking
        tensors) one that has tangents in this pass."""
        for v in values:
            if isinstance(v, (list, tuple)):
                if self._wrapped(v):
                    return True
            elif isinstance(v, Tensor):
                while _functorch.is_functorch_wrapped_tensor(v):
                    v = _functorch.get_unwrapped(v)
                if self.tangent(v) is not None:
                    return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # the watch sees only what does not come through here (see _Watch)
        depth = torch._C._len_torch_dispatch_stack()
        if depth and torch._C._get_dispatch_stack_at(depth - 1) is self._watch:
            torch._C._pop_torch_dispatch_stack(None)
            try:
                return self._handle(func, args, kwargs or {})
            finally:
                torch._C._push_on_torch_dispatch_stack(self._watch)
        return self._handle(func, args, kwargs or {})

    def _handle(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        found = self._scan(args) | (self._scan(kwargs.values()) if kwargs else 0)
        if torch._C._are_functorch_transforms_active() and (
                found & 1 or self._wrapped(args) or self._wrapped(kwargs.values())):
            # vmap, grad, ... wrap the tensors: their tangents would be lost
            raise self.refuse(f"{call_name(func)} inside a torch.func transform")
        if not found & 1:
            return func(*args, **kwargs)
        if not torch._C._is_fwd_grad_enabled():
            raise self.refuse(f"{call_name(func)} inside a custom autograd.Function (or with "
                              "forward AD disabled)")
        rule = RULES.get(func)
        if rule is None:
            name = call_name(func)
            if name in (_PROPERTIES if getattr(func, "__name__", "") == "__get__" else _QUERIES):
                return func(*args, **kwargs)
            raise self.refuse(f"no stacked rule for {name}")
        if found & 2 or "out" in kwargs or torch._C._is_any_autocast_enabled():
            why = "a tensor subclass" if found & 2 else "out=" if "out" in kwargs else "autocast"
            raise self.refuse(f"{call_name(func)} with {why}")
        return rule(self, func, args, kwargs)


class _Watch(TorchDispatchMode):
    """Sees the operations that reach PyTorch's dispatcher without passing through
    :meth:`StackedTangents.__torch_function__` (which hides this mode while it runs): the
    operations of TorchScript code, of C++ extensions, of code that turns torch functions
    off. One of them on a tensor with tangents would leave its result without them: it is
    refused."""

    def __init__(self, mode: StackedTangents) -> None:
        super().__init__()
        self.mode = mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.mode._scan(args) & 1 or (kwargs and self.mode._scan(kwargs.values()) & 1):
            raise self.mode.refuse(f"{func} reached the dispatcher outside torch "
                                   "functions (TorchScript, a C++ extension)")
        return func(*args, **kwargs)


RULES: dict[Callable, Rule] = {**stacked_rules.RULES, **stacked_layers.RULES}
