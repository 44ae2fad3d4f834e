"""Labels drawn from the model, backpropagated inside the loss's backward (the true Fisher).

K-FAC's statistics for the true Fisher need δ = ∂ log p(ŷ | f)/∂s for labels ŷ drawn from the
model's own predictive distribution, at every watched layer output s. The capture calls
:class:`LabelSampler` when the loss's backward reaches the model's output, while the forward's
graph is still alive: one extra backward per draw from the output to the layer outputs (and to
the parameters that have no Kronecker block, whose diagonal Fisher uses the same draws).
Positions the loss ignores get no label: their score is zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from natgrad.curvature.model import sampled_score
from natgrad.layers.capture import ForwardRecord
from natgrad.losses import LossSpec

__all__ = ["LabelSampler"]


class LabelSampler:
    """Draws ``mc_samples`` labels per input from the model and backpropagates their scores.

    Args:
        spec: the loss (its likelihood samples; its ``ignore_index`` masks positions).
        generator: the random source (its state belongs in the optimizer's ``state_dict``).
        mc_samples: labels per input.
        extra_targets: parameters (no Kronecker block) whose sampled-label gradients are
            kept in ``record.sampled_param_grads``.
    """

    def __init__(
        self,
        spec: LossSpec,
        generator: torch.Generator,
        mc_samples: int = 1,
        extra_targets: Sequence[Tensor] = (),
    ) -> None:
        self.spec = spec
        self.generator = generator
        self.mc_samples = mc_samples
        self.extra_targets = list(extra_targets)

    def __call__(self, record: ForwardRecord, output: Tensor) -> None:
        """Append δ of each draw to every captured call of ``record`` (graph still alive)."""
        calls = [call for calls in record.calls.values() for call in calls]
        if not calls and not self.extra_targets:
            return
        likelihood = self.spec.likelihood
        detached = output.detach()
        valid = self.spec.valid(detached, record.output_grad)
        targets = [c.output for c in calls] + self.extra_targets
        for _ in range(self.mc_samples):
            # ∂ Σ log p(ŷ) / ∂ output, zero (and no draw) at ignored positions
            score = sampled_score(likelihood, detached, self.generator, valid)
            grads = torch.autograd.grad(
                output, targets, score, retain_graph=True, allow_unused=True
            )
            for call, grad in zip(calls, grads, strict=False):
                call.grads.append(torch.zeros_like(call.output) if grad is None else grad)
            record.sampled_param_grads.append(list(grads[len(calls):]))
