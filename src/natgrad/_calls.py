"""How natgrad calls a model again: the arguments of a recorded forward and its output.

natgrad re-evaluates the model on a step's inputs (the quadratic model's products, the
per-step check, per-sample Jacobians). Models are called the way their users call them:
positionally (``model(x)``) or with keywords (Hugging Face: ``model(input_ids=...,
attention_mask=..., labels=...)``). A recorded forward keeps its tensors batched along
dimension 0 as one flat tuple — positional arguments first, then the batched keyword
tensors — which natgrad slices, concatenates and maps over like plain inputs; a
:class:`CallLayout` says how that tuple goes back onto the model's arguments, and holds the
keyword arguments that are not batched (flags, ``None``, scalars, a shared mask) as they were.

The likelihood's parameters are read off the model's output by ``output_fn``; without one, a
Tensor output is taken as it is, and an output with a ``logits`` Tensor (Hugging Face's
``ModelOutput``, a dict) gives its logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["CallLayout", "model_output", "record_call"]


@dataclass(frozen=True)
class CallLayout:
    """How a flat tuple of batched tensors maps onto a model's arguments.

    Attributes:
        positional: how many leading tensors are positional arguments.
        keywords: names of the keyword arguments that follow, in order.
        constants: keyword arguments passed unchanged (not batched along dimension 0).
    """

    positional: int
    keywords: tuple[str, ...] = ()
    constants: Mapping[str, Any] = field(default_factory=dict)

    def call(self, fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> Any:
        """``fn`` applied to ``inputs`` laid out as the recorded call's arguments."""
        return fn(*inputs[: self.positional], **self.keywords_of(inputs))

    def keywords_of(self, inputs: tuple[Tensor, ...]) -> dict[str, Any]:
        """The keyword arguments of a call on ``inputs`` (batched ones, then constants)."""
        batched = dict(zip(self.keywords, inputs[self.positional :], strict=True))
        return {**batched, **self.constants}

    def matches(self, other: CallLayout) -> bool:
        """Whether two forwards can be concatenated: same arguments, same constants."""
        if (self.positional, self.keywords) != (other.positional, other.keywords):
            return False
        if self.constants.keys() != other.constants.keys():
            return False
        return all(_same(v, other.constants[k]) for k, v in self.constants.items())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and bool(torch.equal(a, b)))
    try:
        return bool(a is b or a == b)
    except (RuntimeError, ValueError, TypeError):  # objects without a plain equality
        return False


def record_call(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], batch_size: int
) -> tuple[tuple[Any, ...], CallLayout]:
    """The flat inputs (detached) and layout of one call ``model(*args, **kwargs)``.

    Keyword tensors with ``batch_size`` rows are batched inputs; other keyword arguments
    are constants. Positional arguments are kept as they are (natgrad checks that they are
    batched tensors when it needs them).
    """
    inputs = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    batched = {k: v.detach() for k, v in kwargs.items()
               if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch_size}
    constants = {k: v for k, v in kwargs.items() if k not in batched}
    return inputs + tuple(batched.values()), CallLayout(len(args), tuple(batched), constants)


def model_output(raw: Any, output_fn: Callable[[Any], Tensor] | None) -> Any:
    """The likelihood's parameters in the model's raw output (see the module docstring)."""
    if output_fn is not None:
        return output_fn(raw)
    if isinstance(raw, Tensor):
        return raw
    logits = raw.get("logits") if isinstance(raw, Mapping) else getattr(raw, "logits", None)
    return logits if isinstance(logits, Tensor) else raw
