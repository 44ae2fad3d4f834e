"""``nn.MultiheadAttention``: Kronecker blocks for its packed input projection and out_proj.

MultiheadAttention applies its weights functionally (``F.multi_head_attention_forward``), so
the projections' inputs and outputs never pass through a module that hooks can watch. While
natgrad watches a MultiheadAttention, the module runs :func:`attention_forward` instead: the
same computation — packed in-projection, ``F.scaled_dot_product_attention``, out-projection —
with the two projections' inputs and outputs reported to the capture. Its blocks are then
those of two Linear layers: ``in_proj`` ([W_q; W_k; W_v | b], ``[3E, E+1]``, inputs x) and
``out_proj`` (inputs the heads' concatenated outputs).

Supported calls: self-attention (``query is key is value``), ``need_weights=False`` (what
``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``'s self-attention pass), no
``key_padding_mask``, an optional 2-D ``attn_mask`` (bool or additive), batched inputs. Any
other call runs PyTorch's own forward; its layers then see no call, and natgrad warns.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.layers.linear import LinearHandler

__all__ = ["AttentionOutputHandler", "InProjectionHandler", "attention_forward"]

Record = Callable[[str, Tensor, Tensor], None]


class InProjectionHandler(LinearHandler):
    """MultiheadAttention's packed in-projection as a Linear(E, 3E) layer."""

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
        if not module._qkv_same_embed_dim or module.in_proj_weight is None:
            return "separate kdim/vdim projections"
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv or add_zero_attn"
        return None if module.in_proj_weight.requires_grad else "its weight is frozen"


class AttentionOutputHandler(LinearHandler):
    """MultiheadAttention's out_proj (a Linear its parent applies with ``F.linear``)."""

    def __init__(self, module: nn.Linear, attention: nn.MultiheadAttention) -> None:
        super().__init__(module)
        self.attention = attention


def _supported(
    mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
    key_padding_mask: Tensor | None, need_weights: bool, attn_mask: Tensor | None,
    is_causal: bool,
) -> bool:
    return (query is key and key is value and query.dim() == 3 and not need_weights
            and key_padding_mask is None and (attn_mask is None or attn_mask.dim() == 2)
            and not (is_causal and attn_mask is None))


def attention_forward(
    mha: nn.MultiheadAttention, record: Record, in_name: str, out_name: str
) -> Callable[..., Any]:
    """MultiheadAttention's forward with its projections reported to ``record`` (see module
    doc), bound to ``mha``; PyTorch's forward runs every call it does not support, and every
    call of a copy of ``mha`` (``copy.deepcopy`` copies the bound method with the module)."""
    target = weakref.ref(mha)

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
        x = query if mha.batch_first else query.transpose(0, 1)  # [B, L, E]
        batch, length, width = x.shape
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        record(in_name, x, qkv)
        q, k, v = qkv.view(batch, length, 3, mha.num_heads, -1).permute(2, 0, 3, 1, 4)
        mask = attn_mask
        if is_causal:  # PyTorch's MultiheadAttention: the causal hint replaces the mask
            mask = None
        elif mask is not None and mask.dtype == torch.bool:
            mask = ~mask  # MultiheadAttention: True = masked; SDPA: True = attend
        heads = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=mha.dropout if mha.training else 0.0,
            is_causal=is_causal,
        )
        joined = heads.transpose(1, 2).reshape(batch, length, width)
        out = F.linear(joined, mha.out_proj.weight, mha.out_proj.bias)
        record(out_name, joined, out)
        return (out if mha.batch_first else out.transpose(0, 1)), None

    return types.MethodType(forward, mha)
