"""The optimizers people pick instead of Adam, set up the way their documentation recommends.

* :func:`muon`: ``torch.optim.Muon`` (ships with torch) on the hidden weight matrices — every
  2-D ``nn.Linear`` weight except the first layer's and the last's — and ``torch.optim.AdamW``
  on everything else (embeddings, the input and output layers, biases, norms, convolution
  kernels, which torch's Muon does not take), as Muon's documentation recommends. Both use
  one lr: Muon's update is rescaled to AdamW's RMS (``adjust_lr_fn="match_rms_adamw"``), so
  that one grid serves both. No weight decay (the benchmark compares training losses).

:class:`Combined` steps several torch optimizers as one, so that the benchmark's loop drives
them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["Combined", "hidden_matrices", "muon"]


class Combined:
    """Several optimizers over disjoint parameters, stepped and zeroed together (the
    ``step``/``zero_grad``/``state_dict`` of a torch optimizer, by duck typing).

    ``param_groups`` is the concatenation of the parts' groups (the same dicts).
    """

    def __init__(self, parts: list[Optimizer]) -> None:
        self.parts = parts
        self.param_groups = [g for part in parts for g in part.param_groups]
        self.state: dict[Any, Any] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)


def hidden_matrices(model: nn.Module) -> list[Tensor]:
    """The 2-D weights of the model's hidden ``nn.Linear`` layers: all but the output layer
    (the last) and the input layer (the first, unless an ``nn.Embedding`` reads the input,
    as in a transformer, whose first Linear is then hidden)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    embedded = any(isinstance(m, nn.Embedding) for m in model.modules())
    hidden = linears[:-1] if embedded else linears[1:-1]
    return [m.weight for m in hidden if m.weight.requires_grad]


def muon(model: nn.Module, lr: float = 0.02) -> Combined:
    """Muon on :func:`hidden_matrices`, AdamW on the rest, one lr (see module doc)."""
    hidden = hidden_matrices(model)
    chosen = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    parts: list[Optimizer] = []
    if hidden:
        parts.append(torch.optim.Muon(hidden, lr=lr, weight_decay=0.0,
                                      adjust_lr_fn="match_rms_adamw"))
    if rest:
        parts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=0.0))
    return Combined(parts)
