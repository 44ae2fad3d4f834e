"""Capture of a whole model's inputs and outputs, for optimizers that re-run the model.

The optimizer is driven by an unchanged training loop, so it never sees the batch: a forward
hook records each forward's inputs, and a hook on the output tensor marks the forward as
*used* once the loss's backward reaches it. At ``step()`` the optimizer takes the used
forwards since the last step (several with gradient accumulation) and drops the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModelCapture"]

_MAX_PENDING = 64  # forwards kept between two steps (bounded memory)


class ModelCapture:
    """Records the (detached) positional inputs of ``model``'s forwards that were backpropagated.

    Args:
        model: the module whose forward is watched.
        output_fn: maps the module's output to the likelihood's parameters (a Tensor).
    """

    def __init__(self, model: nn.Module, output_fn: Callable[[Any], Tensor] | None = None) -> None:
        self.output_fn = output_fn
        self._pending: list[dict[str, Any]] = []
        self._paused = False
        self._handle = model.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._paused or not torch.is_grad_enabled():
            return
        out = output if self.output_fn is None else self.output_fn(output)
        if not isinstance(out, Tensor) or not out.requires_grad:
            return
        record: dict[str, Any] = {"inputs": args, "used": False}

        def mark_used(grad: Tensor) -> None:
            record["used"] = True

        out.register_hook(mark_used)
        # keep only references: the inputs are the user's tensors, detached when taken
        self._pending.append(record)
        del self._pending[:-_MAX_PENDING]

    def take(self) -> list[tuple[Tensor, ...]]:
        """The inputs of the used forwards since the last call, each a tuple of Tensors."""
        used = [r["inputs"] for r in self._pending if r["used"]]
        self._pending.clear()
        taken = []
        for args in used:
            if not args or not all(isinstance(a, Tensor) for a in args):
                raise TypeError(
                    "natgrad needs the model's forward to take only Tensor positional arguments "
                    "batched along dimension 0"
                )
            taken.append(tuple(a.detach() for a in args))
        return taken

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore forwards inside this block (the optimizer's own re-runs of the model)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def remove(self) -> None:
        """Remove the hook (the optimizer stops seeing forwards)."""
        self._handle.remove()
        self._pending.clear()
