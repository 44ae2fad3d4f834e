"""``nn.MultiheadAttention``: Kronecker blocks for its input projections and out_proj.

MultiheadAttention applies its weights functionally (``F.multi_head_attention_forward``), so
the projections' inputs and outputs never pass through a module that hooks can watch. While
natgrad watches a MultiheadAttention, the module runs :func:`attention_forward` instead: the
same computation — in-projections, the merged masks, ``F.scaled_dot_product_attention``,
out-projection — with each projection's inputs and outputs reported to the capture. Its
blocks are those of Linear layers:

* packed weights (``in_proj_weight`` ``[3E, E]``, ``in_proj_bias`` ``[3E]``), self-attention
  (``query is key is value``): one block ``in_proj`` over [W_q; W_k; W_v | b], ``[3E, E+1]``,
  inputs x — its ``[3E, 3E]`` output factor keeps the correlations between the q, k and v
  outputs of the same input;
* packed weights, cross-attention (query differs from key or value): one block per row
  partition, ``q_proj``, ``k_proj``, ``v_proj`` over [W_q | b_q] (rows 0:E), [W_k | b_k]
  (E:2E), [W_v | b_v] (2E:3E), each with the input factor of its own input (query, key,
  value). Both kinds of block exist for a packed module; each call feeds one kind, and once
  the module has had a cross-attention call, its self-attention calls feed the partition too;
* separate weights (``kdim``/``vdim`` ≠ E: ``q_proj_weight`` ``[E, E]``, ``k_proj_weight``
  ``[E, kdim]``, ``v_proj_weight`` ``[E, vdim]``): blocks ``q_proj``, ``k_proj``, ``v_proj``,
  each over its weight and its rows of the shared ``in_proj_bias``;
* ``out_proj``: inputs the heads' concatenated outputs.

A block over rows of a parameter (:meth:`LayerHandler.row_slice`) preconditions only those
rows; the optimizer assembles the parameter's direction from its blocks.

Supported calls: batched inputs (``[B, L, E]`` with ``batch_first``, else ``[L, B, E]``),
``need_weights`` either way (False, what ``nn.TransformerEncoderLayer`` and
``nn.TransformerDecoderLayer`` pass, runs ``F.scaled_dot_product_attention``; True, the
module's default, PyTorch's explicit softmax and the weights, averaged over heads or not),
an optional ``attn_mask`` (``[L, S]`` or ``[B·H, L, S]``, bool or additive), an
optional ``key_padding_mask`` (``[B, S]``, bool or additive; merged into the attention mask
as PyTorch does — padded keys are still rows of the k and v projections' inputs), the
causal hint. Modules with ``add_bias_kv`` or ``add_zero_attn`` have no blocks; any other
call (unbatched inputs) runs PyTorch's own forward, its layers then see no call, and natgrad
warns.
"""

from __future__ import annotations

import math
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.layers.base import LayerHandler
from natgrad.layers.linear import LinearHandler

__all__ = [
    "ATTENTION_HANDLERS",
    "AttentionOutputHandler",
    "InProjectionHandler",
    "ProjectionHandler",
    "attention_forward",
    "attention_handlers",
]

Record = Callable[[str, Tensor, Tensor], None]
ROLES = ("q", "k", "v")


class InProjectionHandler(LinearHandler):
    """MultiheadAttention's packed in-projection as a Linear(E, 3E) layer (self-attention)."""

    role = "in"

    def __init__(self, module: nn.MultiheadAttention) -> None:
        super().__init__(module)
        self.attention = module

    @property
    def weight(self) -> Tensor:
        return self.module.in_proj_weight

    @property
    def bias(self) -> Tensor | None:
        return self.module.in_proj_bias

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv or add_zero_attn"
        weights = ([module.in_proj_weight] if module._qkv_same_embed_dim else
                   [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight])
        return None if all(w.requires_grad for w in weights) else "its weight is frozen"


class ProjectionHandler(LinearHandler):
    """One of MultiheadAttention's q, k, v projections as a Linear layer: X = [W | b],
    ``[E, d_in + 1]``, with W the ``role``'s rows of ``in_proj_weight`` (packed) or its own
    weight (separate), b its rows of ``in_proj_bias``; d_in = E, kdim or vdim."""

    def __init__(self, module: nn.MultiheadAttention, role: str) -> None:
        super().__init__(module)
        self.attention = module
        self.role = role
        index, width = ROLES.index(role), module.embed_dim
        self.rows = slice(index * width, (index + 1) * width)  # its rows of the packed tensors
        self.packed = module._qkv_same_embed_dim

    @property
    def weight(self) -> Tensor:
        m = self.module
        return m.in_proj_weight if self.packed else getattr(m, f"{self.role}_proj_weight")

    @property
    def bias(self) -> Tensor | None:
        return self.module.in_proj_bias

    def row_slice(self, param: Tensor) -> slice | None:
        return None if param is self.weight and not self.packed else self.rows

    def gather(self, grads: dict[Tensor, Tensor]) -> Tensor:
        weight = grads[self.weight]
        weight = weight[self.rows] if self.packed else weight
        if not self.has_bias:
            return weight
        return torch.cat([weight, grads[self.bias][self.rows].unsqueeze(1)], dim=1)


class AttentionOutputHandler(LinearHandler):
    """MultiheadAttention's out_proj (a Linear its parent applies with ``F.linear``)."""

    role = "out"

    def __init__(self, module: nn.Linear, attention: nn.MultiheadAttention) -> None:
        super().__init__(module)
        self.attention = attention


ATTENTION_HANDLERS = (InProjectionHandler, ProjectionHandler, AttentionOutputHandler)


def attention_handlers(
    name: str, module: nn.MultiheadAttention
) -> tuple[dict[str, LayerHandler], str | None]:
    """The blocks of the MultiheadAttention ``name`` (see module doc) by block name, or why
    it has none."""
    reason = InProjectionHandler.unsupported_reason(module)
    if reason is not None:
        return {}, reason
    handlers: dict[str, LayerHandler] = {}
    projections = {f"{name}.{r}_proj": ProjectionHandler(module, r) for r in ROLES}
    if module._qkv_same_embed_dim:  # one block for self-attention calls, three for the others
        handlers[f"{name}.in_proj"] = InProjectionHandler(module)
        handlers[f"{name}.in_proj"].alternatives = tuple(projections)
        for handler in projections.values():
            handler.alternatives = (f"{name}.in_proj",)
    handlers.update(projections)
    if module.out_proj.weight.requires_grad:
        handlers[f"{name}.out_proj"] = AttentionOutputHandler(module.out_proj, module)
    return handlers, None


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = masked) as an additive one (−inf where masked)."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _supported(
    mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
    key_padding_mask: Tensor | None, need_weights: bool, attn_mask: Tensor | None,
    is_causal: bool,
) -> bool:
    """Whether natgrad's forward takes the call (shapes PyTorch would reject are not taken:
    its forward raises its own error)."""
    if not all(t.dim() == 3 for t in (query, key, value)):
        return False
    if is_causal and attn_mask is None:
        return False
    masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
    if not all(m.dtype == torch.bool or m.is_floating_point() for m in masks):
        return False
    batch_dim = 0 if mha.batch_first else 1
    batch, length, source = (query.shape[batch_dim], query.shape[1 - batch_dim],
                             key.shape[1 - batch_dim])
    widths = (mha.embed_dim, mha.kdim, mha.vdim)
    if tuple(t.shape[-1] for t in (query, key, value)) != widths:
        return False
    if key.shape[:2] != value.shape[:2] or key.shape[batch_dim] != batch:
        return False
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, source):
        return False
    heads = batch * mha.num_heads
    return attn_mask is None or tuple(attn_mask.shape) in ((length, source),
                                                           (heads, length, source))


def attention_forward(
    mha: nn.MultiheadAttention, record: Record, names: dict[str, str]
) -> Callable[..., Any]:
    """MultiheadAttention's forward with its projections reported to ``record`` under
    ``names`` (role → block name: ``"in"``, ``"q"``, ``"k"``, ``"v"``, ``"out"``; see module
    doc), bound to ``mha``. PyTorch's forward runs every call it does not support, and every
    call of a copy of ``mha`` (``copy.deepcopy`` copies the bound method with the module)."""
    target = weakref.ref(mha)
    seen = {"cross": False}  # a cross-attention call switches the packed blocks to the rows

    def report(role: str, inputs: Tensor, output: Tensor) -> None:
        if role in names:  # (a block the optimizer holds)
            record(names[role], inputs, output)

    def forward(
        self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
        key_padding_mask: Tensor | None = None, need_weights: bool = True,
        attn_mask: Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        mha = self
        if self is not target() or not _supported(
            mha, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
        ):
            return type(self).forward(
                self, query, key, value, key_padding_mask=key_padding_mask,
                need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        inputs = [t if mha.batch_first else t.transpose(0, 1) for t in (query, key, value)]
        batch, length, width = inputs[0].shape
        heads = mha.num_heads
        bias = mha.in_proj_bias
        packed = mha._qkv_same_embed_dim
        if packed and query is key and key is value and not seen["cross"]:
            qkv = F.linear(inputs[0], mha.in_proj_weight, bias)
            report("in", inputs[0], qkv)
            q, k, v = qkv.unflatten(-1, (3, width)).unbind(-2)
        else:
            seen["cross"] = seen["cross"] or packed
            projected = []
            for index, (role, x) in enumerate(zip(ROLES, inputs, strict=True)):
                rows = slice(index * width, (index + 1) * width)
                weight = mha.in_proj_weight[rows] if packed else getattr(mha, f"{role}_proj_weight")
                out = F.linear(x, weight, None if bias is None else bias[rows])
                report(role, x, out)
                projected.append(out)
            q, k, v = projected
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, H, ·, d]
        source = k.shape[2]
        mask = _merged_mask(mha, batch, length, source, key_padding_mask, attn_mask,
                            is_causal and not need_weights, query.dtype)
        dropout = mha.dropout if mha.training else 0.0
        weights = None
        if need_weights:  # PyTorch's explicit softmax(q kᵀ/√d + mask) v, weights returned
            q, k, v = (t.reshape(batch * heads, -1, t.shape[-1]) for t in (q, k, v))
            scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
            if mask is None:
                scores = torch.bmm(scaled, k.transpose(1, 2))
            else:
                mask = mask.expand(batch, heads, length, source).reshape(-1, length, source)
                scores = torch.baddbmm(mask, scaled, k.transpose(1, 2))
            weights = scores.softmax(-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            heads_out = torch.bmm(weights, v).view(batch, heads, length, -1)
            weights = weights.view(batch, heads, length, source)
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            heads_out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None,
            )
        joined = heads_out.transpose(1, 2).reshape(batch, length, width)
        out = F.linear(joined, mha.out_proj.weight, mha.out_proj.bias)
        report("out", joined, out)
        return (out if mha.batch_first else out.transpose(0, 1)), weights

    return types.MethodType(forward, mha)


def _merged_mask(
    mha: nn.MultiheadAttention, batch: int, length: int, source: int,
    key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool,
    dtype: torch.dtype,
) -> Tensor | None:
    """The additive mask ``[B or 1, H or 1, L, S]`` that PyTorch's MultiheadAttention passes
    to SDPA: the causal hint alone replaces ``attn_mask``; a key padding mask
    (``[B, S]``) is added to it."""
    if is_causal and key_padding_mask is None:
        return None
    mask = _additive(attn_mask, dtype)
    if mask is not None:
        mask = mask.view(1, 1, length, source) if mask.dim() == 2 else mask.view(
            batch, mha.num_heads, length, source)
    padding = _additive(key_padding_mask, dtype)
    if padding is None:
        return mask
    padding = padding.view(batch, 1, 1, source)
    return padding if mask is None else mask + padding
