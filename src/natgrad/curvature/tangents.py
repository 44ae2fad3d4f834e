"""Jacobian-vector products of ``nn.Sequential`` models from the activations of the forward.

The quadratic model (:mod:`natgrad.optim.control`) needs J·t for two parameter directions
each step. For a ``Sequential`` of Linear layers and elementwise activations, the forward
that produced the loss already holds every layer's input āₗ and activation output hₗ, so the
tangents propagate without recomputing the forward:

    Linear:      t ← t Wᵀ + ā Dᵀ (+ D_b)        (D: the direction's weight part)
    Conv2d:      t ← conv(t, W) + conv(ā, D) (+ D_b)
    activation:  t ← σ'(s) ⊙ t, with σ' read off the activation's output h
                 (tanh: 1 − h², sigmoid: h(1 − h), ReLU: [h > 0])

and both directions go through each matmul together. This costs about one forward; forward-
mode AD through the module (the generic path) costs several.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["supports_trace", "sequential_jvp"]

_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Flatten)


def _traceable_conv(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros")


def supports_trace(model: nn.Module) -> bool:
    """True if ``model`` is a Sequential of Linear layers, Conv2d layers (groups=1, zero
    padding) and supported activations."""
    return (
        isinstance(model, nn.Sequential)
        and len(model) > 0
        and all(isinstance(m, (nn.Linear, *_ACTIVATIONS)) or _traceable_conv(m) for m in model)
        and all(m.start_dim >= 1 for m in model if isinstance(m, nn.Flatten))
        and any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model)
    )


def _derivative(module: nn.Module, output: Tensor) -> Tensor | None:
    """σ'(s) from the activation's output h (None: the identity)."""
    if isinstance(module, nn.Tanh):
        return 1 - output.square()
    if isinstance(module, nn.Sigmoid):
        return output * (1 - output)
    if isinstance(module, nn.ReLU):  # [h > 0] is sign(h) for h ≥ 0, one kernel instead of two
        return output.sign()
    return None


def sequential_jvp(
    model: nn.Sequential,
    inputs: Tensor,
    outputs: Sequence[Tensor],
    tangents: Sequence[dict[int, Tensor]],
) -> list[Tensor]:
    """J·t of ``model`` at the traced forward, for each tangent.

    Args:
        model: a Sequential accepted by :func:`supports_trace`.
        inputs: the model's input ``[N, ...]``.
        outputs: each child's output in that forward (detached), ``len(model)`` tensors.
        tangents: per direction, ``{id(parameter): direction}``; missing parameters have
            zero direction.

    Returns:
        The output tangents, one ``[N, ...]`` tensor per direction.
    """
    k = len(tangents)
    current: Tensor | None = None  # the running activation's tangents, [N, k, ...]
    layer_input = inputs
    for module, output in zip(model, outputs, strict=True):
        if isinstance(module, nn.Linear):
            current = _linear_tangent(module, layer_input, current, tangents)
        elif isinstance(module, nn.Conv2d):
            current = _conv_tangent(module, layer_input, output, current, tangents)
        elif isinstance(module, nn.Flatten):
            if current is not None:  # the k directions sit at dim 1
                current = current.flatten(module.start_dim + 1, module.end_dim)
        elif current is not None:
            derivative = _derivative(module, output)
            if derivative is not None:
                current = current * derivative.unsqueeze(1)
        layer_input = output
    if current is None:
        return [torch.zeros_like(outputs[-1]) for _ in range(k)]
    current = current.expand(outputs[-1].shape[0], k, *outputs[-1].shape[1:])
    return [current[:, i] for i in range(k)]


def _joined_directions(
    tangents: Sequence[dict[int, Tensor]], param: Tensor | None, join: Callable[..., Tensor]
) -> Tensor | None:
    """Every direction's part for ``param`` joined by ``join`` (``torch.cat`` or
    ``torch.stack``), zeros where a direction leaves it alone; None if all do (or no param)."""
    parts = [None if param is None else t.get(id(param)) for t in tangents]
    if all(part is None for part in parts):
        return None
    return join([torch.zeros_like(param) if part is None else part for part in parts])


def _linear_tangent(
    module: nn.Linear,
    layer_input: Tensor,
    current: Tensor | None,
    tangents: Sequence[dict[int, Tensor]],
) -> Tensor | None:
    """t_out = t_in Wᵀ + ā Dᵀ (+ D_b) for k directions at once, layout ``[N, k, ..., d_out]``."""
    k, d_out = len(tangents), module.out_features
    total = None
    stacked = _joined_directions(tangents, module.weight, torch.cat)  # [k·d_out, d_in]
    if stacked is not None:  # every direction in one matmul
        local = (layer_input @ stacked.T).reshape(*layer_input.shape[:-1], k, d_out)
        total = local if layer_input.dim() == 2 else local.movedim(-2, 1)
    bias = _joined_directions(tangents, module.bias, torch.stack)
    if bias is not None:
        bias = bias.reshape(1, k, *([1] * (layer_input.dim() - 2)), d_out)
        total = bias if total is None else total + bias
    if current is not None:  # 2-D matmul: [N·k·…, d_in] @ [d_in, d_out]
        propagated = (current.reshape(-1, current.shape[-1]) @ module.weight.detach().T)
        propagated = propagated.reshape(*current.shape[:-1], d_out)
        total = propagated if total is None else total + propagated
    return total


def _conv_tangent(
    module: nn.Conv2d,
    layer_input: Tensor,
    output: Tensor,
    current: Tensor | None,
    tangents: Sequence[dict[int, Tensor]],
) -> Tensor | None:
    """t_out = conv(t_in, W) + conv(ā, D) (+ D_b) for k directions, layout ``[N, k, C, H, W]``."""
    k, c_out = len(tangents), module.out_channels

    def conv(x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation)

    total = None
    stacked = _joined_directions(tangents, module.weight, torch.cat)  # [k·C_out, C_in, kh, kw]
    bias = _joined_directions(tangents, module.bias, torch.cat)  # [k·C_out]
    if stacked is not None:  # every direction in one convolution, D_b as its bias
        local = F.conv2d(layer_input, stacked, bias, module.stride, module.padding,
                         module.dilation)
        total = local.reshape(local.shape[0], k, c_out, *local.shape[2:])
    elif bias is not None:
        total = bias.reshape(1, k, c_out, 1, 1)
    if current is not None:  # the k directions folded into the batch
        current = current.expand(layer_input.shape[0], *current.shape[1:])
        propagated = conv(current.reshape(-1, *current.shape[2:]), module.weight.detach())
        propagated = propagated.reshape(current.shape[0], k, *propagated.shape[1:])
        total = propagated if total is None else propagated.add_(total)  # (a new tensor)
    if total is not None:  # a bias-only tangent is constant over the map: give it its shape
        total = total.expand(output.shape[0], k, *output.shape[1:])
    return total
