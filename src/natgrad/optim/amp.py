"""Loss scaling (``torch.amp.GradScaler``) seen from natgrad's step.

Under fp16 autocast a GradScaler multiplies the loss by a scale S before backward, so every
gradient the backward produces is S times too large: the parameters' gradients, and also
what natgrad records on the way — the loss's gradient with respect to the model's output
(from which it recovers the targets) and, for the empirical Fisher, each layer's output
gradient δ. natgrad's optimizers declare ``_step_supports_amp_scaling``, so
``scaler.step(opt)`` hands the scale and the overflow flag to ``opt.step()`` (as the
attributes ``grad_scale`` and ``found_inf``) instead of unscaling and skipping by itself;
the step then divides the parameters' gradients and the records by S, and skips (and
counts) a step whose gradients overflowed. If the gradients were already unscaled by
``scaler.unscale_(opt)`` (to clip them), the scaler no longer passes its scale: hand the
scaler to the optimizer (``grad_scaler=scaler``) so that natgrad reads S from it.
Labels natgrad draws for the sampled Fisher are backpropagated unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["LossScaling", "check_grad_scaler", "loss_scaling"]


@dataclass(frozen=True)
class LossScaling:
    """The scales of one step's gradients.

    Attributes:
        records: S, the scale of the loss gradients natgrad recorded (1: none).
        grads: the scale the parameters' gradients still carry (None: none, or unscaled).
        found_inf: the scaler found an inf/NaN gradient (the step must be skipped).
    """

    records: float = 1.0
    grads: Tensor | None = None
    found_inf: bool = False


def check_grad_scaler(grad_scaler: Any) -> Any:
    """Validate the optimizer's ``grad_scaler`` argument (None or a GradScaler)."""
    if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
        raise TypeError("grad_scaler must be a torch.amp.GradScaler or None, got "
                        f"{type(grad_scaler).__name__}")
    return grad_scaler


def loss_scaling(opt: Any) -> LossScaling:
    """The scales of ``opt``'s current step, from what ``GradScaler.step`` handed over
    (``opt.grad_scale``, ``opt.found_inf``) and the scaler given to the optimizer."""
    grad_scale = getattr(opt, "grad_scale", None)
    found_inf = getattr(opt, "found_inf", None)
    scaler = getattr(opt, "grad_scaler", None)
    if scaler is not None and scaler.is_enabled():
        scale = float(scaler.get_scale())
    elif grad_scale is not None:
        scale = float(grad_scale)
    elif found_inf is not None:  # inside scaler.step after scaler.unscale_(opt)
        raise RuntimeError(
            f"{type(opt).__name__}: the gradients were unscaled by scaler.unscale_() before "
            "scaler.step(), so the loss's scale is no longer handed to the optimizer; pass "
            "the scaler to it (grad_scaler=scaler) so that natgrad can unscale the output "
            "gradients it recorded"
        )
    else:
        return LossScaling()
    return LossScaling(
        records=scale,
        grads=grad_scale,
        found_inf=found_inf is not None and bool(found_inf.item()),
    )
