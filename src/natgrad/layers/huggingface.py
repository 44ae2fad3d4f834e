"""Hugging Face transformers' own layers: GPT-2's ``Conv1D`` and the RMSNorm family.

natgrad does not import ``transformers``: a layer is recognised when a model built with it
is handed over (its classes are then loaded).

* ``transformers.pytorch_utils.Conv1D(nf, nx)`` (GPT-2, GPT, ...) is a Linear layer with a
  transposed weight ``[nx, nf]``: y = x W + b. Its block is Linear's, G ⊗ A on the gradient
  matrix X = [∇Wᵀ | ∇b], ``[nf, nx+1]``.
* The RMSNorm classes (``LlamaRMSNorm``, ``Qwen3RMSNorm``, ``Gemma3RMSNorm``, ...) compute
  y = x̂ ⊙ w (Llama) or y = x̂ ⊙ (1 + w) (Gemma) with x̂ = x / √(mean(x²) + ε) over the last
  dimension; either way ∂y/∂w = x̂, so the per-sample gradient of w is Σ_positions δ ⊙ x̂ and
  the block is the exact dense one of :class:`natgrad.layers.norm.NormHandler`. A class is
  taken only after a probe forward confirms that form (there are some 200 RMSNorm classes
  in transformers, a few with gates or other inputs); any other takes the fallback.
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.layers.base import LayerHandler
from natgrad.layers.linear import LinearHandler
from natgrad.layers.norm import NormHandler

__all__ = ["Conv1DHandler", "RMSNormHandler", "huggingface_handler", "loss_keywords"]


def _conv1d_type() -> type | None:
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


class Conv1DHandler(LinearHandler):
    """GPT-2's Conv1D(nf, nx): weight ``[nx, nf]``; X = [∇Wᵀ | ∇b], ``[nf, nx+1]``."""

    def gather(self, grads: dict[Tensor, Tensor]) -> Tensor:
        weight = grads[self.weight].T
        if not self.has_bias:
            return weight
        return torch.cat([weight, grads[self.bias].unsqueeze(1)], dim=1)

    def scatter(self, matrix: Tensor) -> dict[Tensor, Tensor]:
        if not self.has_bias:
            return {self.weight: matrix.T}
        return {self.weight: matrix[:, :-1].T, self.bias: matrix[:, -1]}


class RMSNormHandler(NormHandler):
    """A Hugging Face RMSNorm over the last dimension (weight ``[d]``, no bias)."""

    @property
    def normalized_shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)

    def _normalised(self, inputs: Tensor) -> Tensor:
        # computed in at least float32, as the layers themselves do
        wide = inputs.to(torch.promote_types(inputs.dtype, torch.float32))
        return F.rms_norm(wide, self.normalized_shape, eps=_epsilon(self.module))

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if not module.weight.requires_grad:
            return "its weight is frozen"
        return None


def _epsilon(module: nn.Module) -> float | None:
    """The layer's ε (``variance_epsilon`` in the Llama family, ``eps`` in others), if any."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _is_plain_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an RMSNorm of the form y = x̂ ⊙ w or x̂ ⊙ (1 + w) (checked on a
    probe input, in float64 where the layer allows it)."""
    if not type(module).__name__.endswith("RMSNorm"):
        return False
    params = dict(module.named_parameters())
    weight = params.get("weight")
    if list(params) != ["weight"] or weight is None or weight.dim() != 1:
        return False
    eps = _epsilon(module)
    if eps is None:
        return False
    try:
        if len(inspect.signature(module.forward).parameters) != 1:
            return False
        generator = torch.Generator(device="cpu").manual_seed(0)
        probe = torch.randn(3, weight.shape[0], generator=generator, dtype=torch.float64)
        with torch.no_grad():
            out = module(probe.to(device=weight.device, dtype=weight.dtype))
    except (TypeError, RuntimeError, ValueError):
        return False
    if not isinstance(out, Tensor) or out.shape != probe.shape:
        return False
    x_hat = F.rms_norm(probe, (weight.shape[0],), eps=eps)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    out = out.detach().to(device="cpu", dtype=torch.float64)
    tol = 16 * torch.finfo(weight.dtype).eps  # the layer computes in its own precision
    return any(torch.allclose(out, x_hat * scale, rtol=tol, atol=tol) for scale in (w, 1 + w))


def huggingface_handler(module: nn.Module) -> type[LayerHandler] | None:
    """The handler type for a Hugging Face layer, or None if ``module`` is not one."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return Conv1DHandler
    if _is_plain_rms_norm(module):
        return RMSNormHandler
    return None


def loss_keywords(model: nn.Module) -> frozenset[str]:
    """Keyword arguments of ``model``'s forward that only add a loss to its output.

    A decoder-only or encoder-only Hugging Face model (``PreTrainedModel`` whose config is not
    encoder-decoder) computes the same logits with or without ``labels``; ``labels`` only
    adds the loss, a log-softmax over the vocabulary and its forward-mode tangent in every
    evaluation natgrad makes of the model again (the quadratic model's products, the
    per-step check). An encoder-decoder model (T5, BART) builds its decoder inputs from
    ``labels`` when it is given no ``decoder_input_ids``, so nothing is left out there.
    """
    module = sys.modules.get("transformers.modeling_utils")
    base = getattr(module, "PreTrainedModel", None)
    if base is None or not isinstance(model, base):
        return frozenset()
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return frozenset()
    return frozenset({"labels"})
