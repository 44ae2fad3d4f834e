"""``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` and their cells: Kronecker blocks for their input and
recurrent weights.

PyTorch runs a recurrent layer as one fused kernel, so its gate pre-activations never pass
through a module that hooks can watch. While natgrad watches a recurrent layer, the module runs
:func:`recurrent_forward` instead, which on statistics steps and inside Jacobian-vector products
runs the same recurrence unrolled over time in PyTorch operations (PyTorch's gate order and
formulas, every layer and direction, dropout between layers, a given initial state) and
otherwise PyTorch's fused kernel. The unrolled recurrence reports to the capture, for layer k and
direction suffix ``""`` or ``"_reverse"``:

* block ``ih_l{k}{suffix}``, the input projection: one call per forward, inputs xₜ
  ``[B, T, d_in]``, output W_ih xₜ + b_ih ``[B, T, g·H]`` (g = 1, 3, 4 gates for RNN, GRU,
  LSTM);
* block ``hh_l{k}{suffix}``, the recurrent projection: one call per time step, inputs hₜ₋₁
  ``[B, H]``, output W_hh hₜ₋₁ + b_hh ``[B, g·H]``.

Each is a Linear block over [W | b] (``[g·H, d + 1]``). The weights are shared over the time
steps, and K-FAC factors them as it factors any layer shared over positions ("expand": A the
mean of āāᵀ over samples and steps, G the sum of δδᵀ over steps averaged over samples), which
is Martens, Ba & Grosse's (ICLR 2018) approximation that treats the steps' contributions as
independent (it drops the correlations between steps). The blocks count every step, also those
the loss ignores (a step's input still shapes the later states). With ``kfac_approx="reduce"``
the input projection's steps are reduced; the recurrent projection's steps, being separate
calls, are expanded.

Cells (``nn.RNNCell``, ``nn.GRUCell``, ``nn.LSTMCell``), called once per step by the model's
own loop, get the same two blocks, ``ih`` and ``hh``: each call reports one step of both
(:func:`cell_forward`), and K-FAC expands over the calls as over a layer's steps.

Supported calls: a batched input (``[B, T, d]`` with ``batch_first``, else ``[T, B, d]``) or
a ``PackedSequence`` (sequences of several lengths: the steps beyond a sequence's end are
masked, their rows left out of A), with or without an initial state. Any other call (an
unbatched input) runs PyTorch's forward; its blocks then see no call and natgrad warns. LSTMs with
``proj_size`` have no blocks (their parameters take the fallback).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.overrides import handle_torch_function, has_torch_function

from natgrad.layers.base import LayerHandler
from natgrad.layers.linear import LinearHandler

__all__ = [
    "RECURRENT_TYPES",
    "RecurrentHandler",
    "CELL_TYPES",
    "cell_forward",
    "cell_step",
    "masked_step",
    "recurrence",
    "recurrent_forward",
    "recurrent_handlers",
]

CELL_TYPES = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)
RECURRENT_TYPES = (nn.RNN, nn.GRU, nn.LSTM, *CELL_TYPES)
Record = Callable[[str, Tensor, Tensor, Tensor | None], None]
Recurrent = nn.RNNBase | nn.RNNCellBase


class RecurrentHandler(LinearHandler):
    """One projection of a recurrent layer (``kind`` ``"ih"`` or ``"hh"``, layer ``layer``,
    direction ``suffix``; a cell has neither) as a Linear layer: X = [W | b], ``[g·H, d + 1]``."""

    def __init__(self, module: Recurrent, kind: str, layer: int | None = None,
                 suffix: str = "") -> None:
        super().__init__(module)
        self.recurrent = module
        # also its block name's last part: "ih_l0", "hh_l1_reverse"; a cell's "ih", "hh"
        self.key = kind if layer is None else f"{kind}_l{layer}{suffix}"

    @property
    def weight(self) -> Tensor:
        return getattr(self.module, f"weight_{self.key}")

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, f"bias_{self.key}") if self.module.bias else None

    def positions(self, inputs: Tensor) -> None:
        return None  # every step counts (see module doc)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if getattr(module, "proj_size", 0) > 0:
            return "proj_size"
        return None


def recurrent_handlers(
    name: str, module: Recurrent
) -> tuple[dict[str, LayerHandler], str | None]:
    """The blocks of the recurrent layer or cell ``name`` by block name (those whose weight
    is trained), or why it has none."""
    reason = RecurrentHandler.unsupported_reason(module)
    if reason is not None:
        return {}, reason
    if isinstance(module, CELL_TYPES):
        found = [RecurrentHandler(module, kind) for kind in ("ih", "hh")]
    else:
        found = [RecurrentHandler(module, kind, layer, suffix)
                 for layer in range(module.num_layers)
                 for suffix in (("", "_reverse") if module.bidirectional else ("",))
                 for kind in ("ih", "hh")]
    return {f"{name}.{h.key}": h for h in found if h.weight.requires_grad}, None


def _supported(rnn: nn.RNNBase, x: Any, hx: Any) -> bool:
    """Whether natgrad's forward takes the call (PyTorch's forward raises its own errors)."""
    if isinstance(x, PackedSequence):
        if x.data.dim() != 2 or x.data.shape[-1] != rnn.input_size:
            return False
        batch = int(x.batch_sizes[0])
    elif not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != rnn.input_size:
        return False
    else:
        batch = x.shape[0 if rnn.batch_first else 1]
    shape = (rnn.num_layers * (2 if rnn.bidirectional else 1), batch, rnn.hidden_size)
    return _states_fit(hx, rnn.mode == "LSTM", shape)


def _states_fit(hx: Any, lstm: bool, shape: tuple[int, ...]) -> bool:
    """Whether an initial state (None, h, or (h, c) for an LSTM) has ``shape``."""
    if hx is None:
        return True
    states = hx if isinstance(hx, tuple) else (hx,)
    if len(states) != (2 if lstm else 1):
        return False
    return all(isinstance(s, Tensor) and tuple(s.shape) == shape for s in states)


def _reporter(record: Record, names: dict[str, str]) -> Callable[..., None]:
    """``report(key, inputs, output, valid)``: one call of the block ``names[key]``, for the
    blocks the optimizer holds."""

    def report(key: str, inputs: Tensor, output: Tensor, valid: Tensor | None) -> None:
        if key in names:
            record(names[key], inputs, output, valid)

    return report


Tangents = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


def cell_step(
    mode: str, gates_in: Tensor, gates_h: Tensor, h: Tensor, c: Tensor | None,
    tangents: Tangents | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One step of PyTorch's recurrence ``mode`` (``"RNN_TANH"``, ``"RNN_RELU"``, ``"GRU"``,
    ``"LSTM"``) from the two projections ``[B, g·H]`` (gates in PyTorch's order) and the state
    h, c (``[B, H]``; c for LSTM only). Returns the new h, c and, given ``tangents`` (the
    stacked tangents ``[k, ...]`` of gates_in, gates_h, h, c), the new h's and c's tangents
    (else None, None)."""
    d_in, d_h, dh, dc = tangents if tangents is not None else (None,) * 4
    if mode == "GRU":  # r, z, n
        r_in, z_in, n_in = gates_in.chunk(3, -1)
        r_h, z_h, n_h = gates_h.chunk(3, -1)
        r, z = torch.sigmoid(r_in + r_h), torch.sigmoid(z_in + z_h)
        n = torch.tanh(n_in + r * n_h)
        new_h = n + z * (h - n)
        if tangents is None:
            return new_h, None, None, None
        dr_in, dz_in, dn_in = d_in.chunk(3, -1)
        dr_h, dz_h, dn_h = d_h.chunk(3, -1)
        dr, dz = r * (1 - r) * (dr_in + dr_h), z * (1 - z) * (dz_in + dz_h)
        dn = (1 - n * n) * (dn_in + dr * n_h + r * dn_h)
        return new_h, None, dn + dz * (h - n) + z * (dh - dn), None
    if mode == "LSTM":  # i, f, g, o
        i, f, g, o = (gates_in + gates_h).chunk(4, -1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        new_c = f * c + i * g
        squashed = torch.tanh(new_c)
        new_h = o * squashed
        if tangents is None:
            return new_h, new_c, None, None
        di, df, dg, do = (d_in + d_h).chunk(4, -1)
        d_c = f * (1 - f) * df * c + f * dc + i * (1 - i) * di * g + i * (1 - g * g) * dg
        return new_h, new_c, o * (1 - o) * do * squashed + o * (1 - squashed.square()) * d_c, d_c
    pre = gates_in + gates_h
    new_h = torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)
    if tangents is None:
        return new_h, None, None, None
    slope = 1 - new_h * new_h if mode == "RNN_TANH" else (new_h > 0).to(new_h.dtype)
    return new_h, None, slope * (d_in + d_h), None


def recurrence(
    mode: str, gates_in: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor,
    c: Tensor | None, reverse: bool, mask: Tensor | None = None,
    report: Callable[[Tensor, Tensor, Tensor | None], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction of a recurrent layer over its input projection ``gates_in``
    (``[B, T, g·H]``) with the recurrent weight ``[g·H, H]`` and bias ``[g·H]``, from the
    state h (and c) ``[B, H]``, the steps in reverse order if ``reverse``. ``mask``
    (``[B, T]`` bool, None: all) marks the steps that exist (sequences of several lengths):
    elsewhere the state passes unchanged and the output is 0, as PyTorch's packed sequences
    have it. Returns the outputs ``[B, T, H]`` and the last h and c; ``report(h, W h + b,
    mask of the step)`` sees every step's recurrent projection.

    A torch function (it takes part in ``__torch_function__``): natgrad's stacked
    Jacobian-vector products give it one rule for the whole loop
    (:mod:`natgrad.curvature.stacked_layers`) instead of one dispatch per operation."""
    tensors = tuple(t for t in (gates_in, weight, bias, h, c) if t is not None)
    if has_torch_function(tensors):
        return handle_torch_function(recurrence, tensors, mode, gates_in, weight, bias, h, c,
                                     reverse, mask, report)
    steps = gates_in.shape[1]
    per_step = gates_in.unbind(1)
    out: list[Tensor] = [h] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        gates_h = F.linear(h, weight, bias)
        if report is not None:
            report(h, gates_h, None if mask is None else mask[:, t])
        new_h, new_c, _, _ = cell_step(mode, per_step[t], gates_h, h, c)
        h, c, out[t] = masked_step(mask, t, (new_h, new_c), (h, c))
    return torch.stack(out, 1), h, c


def masked_step(
    mask: Tensor | None, t: int, new: tuple[Tensor, Tensor | None],
    old: tuple[Tensor, Tensor | None],
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The state (h, c) after step ``t`` and its output, where ``mask[:, t]`` says which rows
    took the step (the others keep ``old`` and output 0); works on stacked tangents
    ``[k, B, H]`` too."""
    if mask is None:
        return new[0], new[1], new[0]
    took = mask[:, t, None]
    h = torch.where(took, new[0], old[0])
    c = None if new[1] is None else torch.where(took, new[1], old[1])
    return h, c, torch.where(took, new[0], 0.0)


def _differentiated(weight: Tensor) -> bool:
    """Whether the call is part of a Jacobian-vector product or a ``torch.func`` transform:
    natgrad's stacked pass (a torch function mode), forward-mode AD (dual weights), vmap,
    grad... — these need the unrolled recurrence (fused kernels have no forward-mode AD on
    CUDA, and the stacked pass has one rule for :func:`recurrence`)."""
    return (torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()
            or fwAD.unpack_dual(weight).tangent is not None)


def recurrent_forward(
    rnn: nn.RNNBase, record: Record, names: dict[str, str], recording: Callable[[], bool],
) -> Callable[..., Any]:
    """The recurrent layer's forward with its projections reported to ``record`` under
    ``names`` (handler key such as ``"ih_l0"`` → block name; see module doc), bound to
    ``rnn``. The unrolled recurrence runs while ``recording()`` says the calls are wanted
    (a statistics step) and inside derivative passes; every other call — the steps between
    statistics, the optimizer's own loss evaluations, calls natgrad does not support and
    every call of a copy of ``rnn`` — runs PyTorch's (fused) forward: the same outputs to
    rounding, 1.5-2× faster."""
    target = weakref.ref(rnn)
    report = _reporter(record, names)

    def forward(self: nn.RNNBase, input: Any, hx: Any = None) -> tuple[Tensor, Any]:  # noqa: A002
        if (self is not target() or not _supported(self, input, hx)
                or not (recording() or _differentiated(self.weight_hh_l0))):
            return type(self).forward(self, input, hx)
        lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        mask = None
        if packed:  # padded [B, T, d] in the caller's order, the steps of each sequence
            x, lengths = pad_packed_sequence(input, batch_first=True)
            mask = torch.arange(x.shape[1]) < lengths.unsqueeze(1)
            mask = mask.to(x.device)
        else:
            x = input if self.batch_first else input.transpose(0, 1)  # [B, T, d]
        batch = x.shape[0]
        directions = ("", "_reverse") if self.bidirectional else ("",)
        if hx is None:
            zeros = x.new_zeros(self.num_layers * len(directions), batch, self.hidden_size)
            h0, c0 = zeros, zeros
        else:
            h0, c0 = hx if lstm else (hx, None)
        last_h, last_c = [], []
        for layer in range(self.num_layers):
            outputs = []
            for index, suffix in enumerate(directions):
                key = f"l{layer}{suffix}"
                weights = [getattr(self, f"weight_{k}_{key}") for k in ("ih", "hh")]
                biases = ([getattr(self, f"bias_{k}_{key}") for k in ("ih", "hh")]
                          if self.bias else [None, None])
                gates_in = F.linear(x, weights[0], biases[0])  # [B, T, g·H], all steps at once
                report(f"ih_{key}", x, gates_in, mask)
                state = layer * len(directions) + index
                out, h, c = recurrence(
                    self.mode, gates_in, weights[1], biases[1], h0[state],
                    c0[state] if lstm else None, bool(suffix), mask,
                    lambda h, gates_h, valid, key=key: report(f"hh_{key}", h, gates_h, valid),
                )
                outputs.append(out)
                last_h.append(h)
                last_c.append(c)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        if packed:  # PyTorch's packed output: every step's rows in the input's sorted order
            ordered = x if input.sorted_indices is None else x[input.sorted_indices]
            output = PackedSequence(
                torch.cat([ordered[:size, t] for t, size in
                           enumerate(input.batch_sizes.tolist())]),
                input.batch_sizes, input.sorted_indices, input.unsorted_indices,
            )
        else:
            output = x if self.batch_first else x.transpose(0, 1)
        h_n = torch.stack(last_h)
        return (output, (h_n, torch.stack(last_c))) if lstm else (output, h_n)

    return types.MethodType(forward, rnn)


def _cell_mode(cell: nn.RNNCellBase) -> str:
    """The recurrence of a cell, in :func:`cell_step`'s names."""
    if isinstance(cell, nn.GRUCell):
        return "GRU"
    if isinstance(cell, nn.LSTMCell):
        return "LSTM"
    return "RNN_TANH" if cell.nonlinearity == "tanh" else "RNN_RELU"


def _cell_supported(cell: nn.RNNCellBase, x: Any, hx: Any) -> bool:
    """Whether natgrad's forward takes a cell's call: a batched input ``[B, d]`` and, if
    given, states ``[B, H]`` (PyTorch's forward raises its own errors)."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != cell.input_size:
        return False
    return _states_fit(hx, isinstance(cell, nn.LSTMCell), (x.shape[0], cell.hidden_size))


def cell_forward(
    cell: nn.RNNCellBase, record: Record, names: dict[str, str], recording: Callable[[], bool],
) -> Callable[..., Any]:
    """A cell's forward (``nn.RNNCell``, ``GRUCell``, ``LSTMCell``: one step, called once per
    step by the user's loop) with its projections reported to ``record`` under ``names``
    (``"ih"``, ``"hh"`` → block name): each call is one step of both blocks, which K-FAC
    expands over the calls as over a recurrent layer's steps. As :func:`recurrent_forward`,
    only while ``recording()`` or inside derivative passes; PyTorch's forward otherwise, for
    unbatched calls and for a copy's calls."""
    target = weakref.ref(cell)
    mode = _cell_mode(cell)
    report = _reporter(record, names)

    def forward(self: nn.RNNCellBase, input: Any, hx: Any = None) -> Any:  # noqa: A002
        if (self is not target() or not _cell_supported(self, input, hx)
                or not (recording() or _differentiated(self.weight_hh))):
            return type(self).forward(self, input, hx)
        if hx is None:
            zeros = input.new_zeros(input.shape[0], self.hidden_size)
            h, c = zeros, (zeros if mode == "LSTM" else None)
        else:
            h, c = hx if mode == "LSTM" else (hx, None)
        gates_in = F.linear(input, self.weight_ih, self.bias_ih)
        gates_h = F.linear(h, self.weight_hh, self.bias_hh)
        report("ih", input, gates_in, None)
        report("hh", h, gates_h, None)
        new_h, new_c, _, _ = cell_step(mode, gates_in, gates_h, h, c)
        return (new_h, new_c) if mode == "LSTM" else new_h

    return types.MethodType(forward, cell)
