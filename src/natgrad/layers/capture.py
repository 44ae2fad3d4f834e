"""Find the supported layers of a model and capture their inputs and output-gradients.

Forward hooks on every supported layer record the layer's input (detached) and its output
(attached, so that gradients with respect to it can be taken); a forward hook on the model
groups one forward's layer calls into a :class:`ForwardRecord` and hooks the model's output
tensor, so that ``on_backward`` runs when the loss's backward reaches it — while the graph is
still alive. Hooks are removed by :meth:`LayerCapture.remove` or on leaving the ``with`` block.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from natgrad._calls import CallLayout, model_output, record_call
from natgrad.layers.attention import (
    ATTENTION_HANDLERS,
    attention_forward,
    attention_handlers,
)
from natgrad.layers.base import KroneckerHandler, LayerHandler
from natgrad.layers.conv import CONV_TRANSPOSE_TYPES, CONV_TYPES, ConvHandler, ConvTransposeHandler
from natgrad.layers.embedding import EmbeddingHandler
from natgrad.layers.huggingface import huggingface_handler, loss_keywords
from natgrad.layers.linear import LinearHandler
from natgrad.layers.norm import NORM_TYPES, NormHandler
from natgrad.layers.recurrent import (
    CELL_TYPES,
    RECURRENT_TYPES,
    RecurrentHandler,
    cell_forward,
    recurrent_forward,
    recurrent_handlers,
)

__all__ = ["Call", "ForwardRecord", "LayerCapture", "LayerMap", "batch_inputs", "find_layers"]

HANDLERS: tuple[tuple[type | tuple[type, ...], type[LayerHandler]], ...] = (
    (nn.Linear, LinearHandler),
    (CONV_TYPES, ConvHandler),
    (CONV_TRANSPOSE_TYPES, ConvTransposeHandler),
    (nn.Embedding, EmbeddingHandler),
    (NORM_TYPES, NormHandler),
)
_MAX_PENDING = 64  # forwards kept between two steps (bounded memory)
OPAQUE_TYPES = (nn.MultiheadAttention,)  # call F.linear on their submodules' weights
# why natgrad's hooks break torch.compile's graphs (shown by fullgraph=True's error)
_EAGER = ("natgrad records each watched layer's inputs and output gradients eagerly, "
          "between compiled pieces of the forward; compile without fullgraph=True")


@dataclass
class LayerMap:
    """Which parameters get which treatment."""

    handlers: dict[str, LayerHandler]  # module name -> handler (curvature block)
    fallback: dict[str, str]  # parameter name -> why its module is not supported
    excluded: list[str]  # names of parameters in excluded modules
    # parameter name -> {module name: handler} of two Kronecker layers that share the weight
    shared: dict[str, dict[str, LayerHandler]] = field(default_factory=dict)


def _matches(name: str, module: nn.Module, exclude: Iterable[str | type]) -> bool:
    for rule in exclude:
        if isinstance(rule, str) and (name == rule or name.startswith(rule + ".")):
            return True
        if isinstance(rule, type) and isinstance(module, rule):
            return True
    return False


def _handler_type(module: nn.Module) -> type[LayerHandler] | None:
    """The handler of ``module``'s layer type: PyTorch's layers, then Hugging Face's."""
    for types, handler_type in HANDLERS:
        if isinstance(module, types):
            return handler_type
    return huggingface_handler(module)


def find_layers(model: nn.Module, exclude: Iterable[str | type] = ()) -> LayerMap:
    """Assign every trainable parameter of ``model`` to a curvature block, the fallback or
    the excluded set. ``exclude`` holds module names (their submodules too) or module types."""
    exclude = list(exclude)
    for rule in exclude:
        if not isinstance(rule, (str, type)):
            raise TypeError(f"exclude must hold module names (str) or types, got {rule!r}")
    handlers: dict[str, LayerHandler] = {}
    excluded_modules: list[str] = []
    opaque: list[str] = []  # modules that use their submodules' parameters functionally
    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(m + ".") or m == "" for m in excluded_modules)
        if inside or _matches(name, module, exclude):
            excluded_modules.append(name)
            continue
        if any(name.startswith(m + ".") for m in opaque):
            # e.g. MultiheadAttention's out_proj: its forward is never called
            reasons[name] = f"{type(module).__name__} used functionally by its parent"
            continue
        if isinstance(module, OPAQUE_TYPES):
            opaque.append(name)
        if isinstance(module, nn.MultiheadAttention):
            found, reason = attention_handlers(name, module)
            if reason is not None:
                reasons[name] = f"MultiheadAttention with {reason}"
            handlers.update(found)
            continue
        if isinstance(module, RECURRENT_TYPES):
            found, reason = recurrent_handlers(name, module)
            if reason is not None:
                reasons[name] = f"{type(module).__name__} with {reason}"
            handlers.update(found)
            continue
        handler_type = _handler_type(module)
        if handler_type is not None:
            reason = handler_type.unsupported_reason(module)
            if reason is None:
                handlers[name] = handler_type(module)
            else:
                reasons[name] = f"{type(module).__name__} with {reason}"
    # a parameter in several layers (a tied embedding and output head): two Kronecker layers
    # whose only parameter it is get one shared block (natgrad.curvature.shared); for any
    # other pattern the fallback's diagonal accounts for every use
    owners: dict[int, list[str]] = {}
    for name, handler in handlers.items():
        for p in handler.params:
            if handler.row_slice(p) is None:  # (row slices: disjoint rows of one layer's)
                owners.setdefault(id(p), []).append(name)
    by_id = {id(p): n for n, p in model.named_parameters()}
    shared: dict[str, dict[str, LayerHandler]] = {}
    for pid, names in owners.items():
        if len(names) < 2:
            continue
        uses = {n: handlers.pop(n) for n in names if n in handlers}
        if len(uses) == 2 and all(
            isinstance(h, KroneckerHandler) and [id(q) for q in h.params] == [pid]
            for h in uses.values()
        ):
            shared[by_id[pid]] = uses
            continue
        for name, handler in uses.items():
            others = ", ".join(n for n in names if n != name)
            reasons[name] = (f"{type(handler.module).__name__} sharing a parameter with "
                             f"{others} (tied weights)")
    covered = {id(p) for h in handlers.values() for p in h.params}
    covered |= {id(p) for uses in shared.values() for h in uses.values() for p in h.params}
    fallback: dict[str, str] = {}
    excluded: list[str] = []
    for pname, p in model.named_parameters():
        if not p.requires_grad or id(p) in covered:
            continue
        owner = pname.rsplit(".", 1)[0] if "." in pname else ""
        if any(owner == m or owner.startswith(m + ".") or m == "" for m in excluded_modules):
            excluded.append(pname)
        else:
            kind = type(model.get_submodule(owner)).__name__
            fallback[pname] = reasons.get(owner, f"{kind} is not a supported layer type")
    return LayerMap(handlers, fallback, excluded, shared)


@dataclass
class Call:
    """One call of a layer: its input, its output (while needed) and δ's from backward."""

    inputs: Tensor
    output: Tensor | None
    grads: list[Tensor] = field(default_factory=list)
    valid: Tensor | None = None  # which of its rows' positions are real (packed sequences)


@dataclass
class ForwardRecord:
    """One forward of the model: its inputs, output, the output's gradient, layer calls."""

    inputs: tuple[Tensor, ...]  # batched along dimension 0; ``layout`` maps them to arguments
    calls: dict[str, list[Call]]
    batch_size: int
    layout: CallLayout = field(default_factory=lambda: CallLayout(0))
    output: Tensor | None = None  # detached, set when the backward reaches it
    output_grad: Tensor | None = None  # ∂loss/∂output
    stats: bool = False  # recorded on a statistics step (layer calls were captured)
    attached_output: Tensor | None = None  # the output with its graph, until backward
    trace: list[Tensor] | None = None  # outputs of a Sequential model's children
    used: bool = False
    sampled_param_grads: list[list[Tensor]] = field(default_factory=list)


class LayerCapture:
    """Hooks that record one :class:`ForwardRecord` per forward of the model.

    Every forward with gradients enabled records the model's inputs; layer calls are
    recorded only while :attr:`gathering` is True (statistics steps).

    Args:
        model: the model.
        handlers: module name -> handler, the layers to watch.
        output_fn: maps the model's output to the likelihood's parameters.
        on_backward: called as ``on_backward(record, output)`` when the backward of a
            forward recorded while gathering reaches the model's output (graph still alive).
        grad_hooks: also record the gradient arriving at each layer output (the loss's own
            δ, for the empirical Fisher).
        trace: record every child's output of a ``Sequential`` model in each forward
            (:mod:`natgrad.curvature.tangents` propagates tangents through them).
    """

    def __init__(
        self,
        model: nn.Module,
        handlers: dict[str, LayerHandler],
        output_fn: Callable[[Any], Tensor] | None = None,
        on_backward: Callable[[ForwardRecord, Tensor], None] | None = None,
        grad_hooks: bool = False,
        trace: bool = False,
    ) -> None:
        self.gathering = True  # record layer calls (a statistics step)
        self.records: list[ForwardRecord] = []
        self._output_fn = output_fn
        self._on_backward = on_backward
        self._grad_hooks = grad_hooks
        self._handlers = handlers  # "" too when the model itself is one layer
        self._removed = False
        self._current: dict[str, list[Call]] = {}
        self._in_backward = False
        self._paused = False
        self._trace: list[Tensor] | None = [] if trace else None
        self._loss_only = loss_keywords(model)  # left out of natgrad's own calls of the model
        # hooks are plain functions that act only for the modules they were registered on:
        # copy.deepcopy(model) copies them by reference (not this capture and its pending
        # forwards), and a copy's forwards are not reported to this capture
        self._handles = [
            model.register_forward_hook(_for(model, self._model_hook, self._live),
                                        with_kwargs=True)
        ]
        attention: dict[int, tuple[nn.MultiheadAttention, dict[str, str]]] = {}
        recurrent: dict[int, tuple[nn.Module, dict[str, str]]] = {}
        for name, handler in handlers.items():
            if isinstance(handler, ATTENTION_HANDLERS):  # a MultiheadAttention's projection
                roles = attention.setdefault(id(handler.attention), (handler.attention, {}))[1]
                roles[handler.role] = name
                continue
            if isinstance(handler, RecurrentHandler):  # a recurrent layer's projection
                keys = recurrent.setdefault(id(handler.recurrent), (handler.recurrent, {}))[1]
                keys[handler.key] = name
                continue
            self._handles.append(handler.module.register_forward_hook(
                _for(handler.module, self._layer_hook(name), self._live),
                prepend=True,  # before the model's hook when the model itself is the layer
            ))
        self._patched: list[nn.Module] = []
        for mha, names in attention.values():  # reports its projections (layers/attention.py)
            mha.forward = attention_forward(  # type: ignore[method-assign]
                mha, self._record_call, names
            )
            self._patched.append(mha)
        for rnn, keys in recurrent.values():  # reports its projections (layers/recurrent.py)
            patch = cell_forward if isinstance(rnn, CELL_TYPES) else recurrent_forward
            rnn.forward = patch(  # type: ignore[method-assign]
                rnn, self._record_call, keys, self._recording
            )
            self._patched.append(rnn)
        if trace:
            for child in model.children():
                self._handles.append(child.register_forward_hook(
                    _for(child, self._trace_hook, self._live)))

    def _trace_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if not self._paused and torch.is_grad_enabled():
            self._trace.append(output.detach())

    def _layer_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if args:
                self._record_call(name, args[0], output)

        return hook

    def _recording(self) -> bool:
        """Whether a layer call now would be recorded (a statistics step's forward)."""
        return self.gathering and not self._paused and torch.is_grad_enabled()

    @torch.compiler.disable(reason=_EAGER)  # MultiheadAttention's, RNNs' forwards call it
    def _record_call(
        self, name: str, inputs: Tensor, output: Tensor, valid: Tensor | None = None
    ) -> None:
        """One call of the layer ``name``: its input and its output (with its graph); ``valid``
        marks the input rows' positions that exist (None: all)."""
        if not self._recording():
            return
        if not (isinstance(output, Tensor) and isinstance(inputs, Tensor)
                and name in self._handlers):
            return
        call = Call(self._handlers[name].call_input(inputs.detach(), output), output,
                    valid=valid)
        if self._grad_hooks and output.requires_grad:
            grads = call.grads  # the hook must not reach `output` itself (see _model_hook)
            output.register_hook(lambda grad: grads.append(grad.detach()))
        self._current.setdefault(name, []).append(call)

    def _model_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        calls, self._current = self._current, {}
        trace = None
        if self._trace is not None:
            trace, self._trace = self._trace, []
        if self._paused or not torch.is_grad_enabled():
            return
        out = model_output(output, self._output_fn)
        if not isinstance(out, Tensor):
            raise TypeError(
                "the model's output is not a Tensor (nor has it a 'logits' Tensor); pass "
                f"output_fn to say how to get the likelihood's parameters from a "
                f"{type(output).__name__}"
            )
        if not out.requires_grad:
            return
        kept = {k: v for k, v in kwargs.items() if k not in self._loss_only}
        inputs, layout = record_call(args, kept, out.shape[0])
        record = ForwardRecord(inputs, calls, out.shape[0], layout, stats=self.gathering,
                               trace=trace)
        self.records.append(record)
        del self.records[:-_MAX_PENDING]
        record.attached_output = out
        # A hook that refers to its own tensor (directly or through the record or this
        # capture) makes a cycle through autograd's C++ graph that Python's garbage collector
        # cannot break: every step's graph and activations would leak. Weak references only.
        capture_ref, record_ref = weakref.ref(self), weakref.ref(record)
        out.register_hook(lambda grad: _reached(capture_ref, record_ref, grad))

    def _reached(self, record: ForwardRecord, grad: Tensor) -> None:
        if self._in_backward:  # our own re-entrant backward passes through here too
            return
        out, record.attached_output = record.attached_output, None
        if out is None:
            return
        record.used = True
        record.output, record.output_grad = out.detach(), grad.detach()
        if self._on_backward is None or not record.stats:
            return
        self._in_backward = True
        try:
            self._on_backward(record, out)
        finally:
            self._in_backward = False
        for calls in record.calls.values():
            for call in calls:
                call.output = None  # the statistics need only δ from here on

    def unscale(self, records: list[ForwardRecord], scale: float) -> None:
        """Divide what ``records`` hold of the loss's backward by a loss scale (a
        GradScaler's S): the output gradients and, recorded with ``grad_hooks``, the layers'
        δ's (natgrad's own sampled-label δ's were never scaled)."""
        if scale == 1:
            return
        for record in records:
            if record.output_grad is not None:
                record.output_grad = record.output_grad / scale
            if self._grad_hooks:
                for calls in record.calls.values():
                    for call in calls:
                        call.grads = [g / scale for g in call.grads]

    def take(self) -> list[ForwardRecord]:
        """Records whose backward ran since the last call (others are dropped)."""
        used = [r for r in self.records if r.used]
        self.records.clear()
        return used

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore forwards inside this block (the optimizer's own re-runs of the model)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _live(self) -> bool:
        return not self._removed

    def remove(self) -> None:
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched.clear()
        self.records.clear()

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _for(
    module: nn.Module, hook: Callable[..., None], live: Callable[[], bool]
) -> Callable[..., None]:
    """``hook`` as a forward hook of ``module`` only (a deep copy's calls are ignored) while
    ``live()``; registered ``with_kwargs=True`` it also receives the call's keyword arguments.

    A capture removed during a call of the module (a dropped optimizer's finalizer, run by a
    garbage collection inside the forward) is still in the call's snapshot of the module's
    hooks, and PyTorch calls it as if it had been registered without keyword arguments: off
    once removed, it does nothing.

    Under ``torch.compile`` the hook runs eagerly, between the compiled pieces of the
    forward (a graph break at each watched layer): it records real tensors and registers
    real gradient hooks, so the statistics and steps are those of the eager model.
    """
    target = weakref.ref(module)

    def forward_hook(called: nn.Module, *arguments: Any) -> None:
        if called is target() and live():
            hook(called, *arguments)

    return torch.compiler.disable(forward_hook, reason=_EAGER)


def _reached(
    capture_ref: weakref.ref[LayerCapture], record_ref: weakref.ref[ForwardRecord], grad: Tensor
) -> None:
    capture, record = capture_ref(), record_ref()
    if capture is not None and record is not None:
        capture._reached(record, grad)


def batch_inputs(records: list[ForwardRecord]) -> tuple[Tensor, ...]:
    """The inputs of several forwards concatenated along the batch (micro-batches), laid
    out as ``records[0].layout`` says."""
    for record in records:
        if not record.inputs or not all(isinstance(a, Tensor) for a in record.inputs):
            raise TypeError(
                "natgrad needs the model's forward to take Tensor arguments batched along "
                "dimension 0 (positional, or keyword tensors with the batch's rows)"
            )
        if not record.layout.matches(records[0].layout):
            raise TypeError(
                "the forwards of one step call the model with different arguments "
                f"({records[0].layout} and {record.layout}); natgrad concatenates them"
            )
    if len(records) == 1:
        return records[0].inputs
    return tuple(torch.cat(parts) for parts in zip(*(r.inputs for r in records), strict=True))
