"""One step's batch: the forwards backpropagated since the last step, on the canonical scale.

The capture hands over what it observed (:class:`natgrad.layers.capture.ForwardRecord`: each
forward's inputs, outputs, the loss's gradient with respect to them, layer calls); the
:class:`natgrad.losses.LossSpec` says how the user's loss relates to the canonical objective
J = (1/N) Σₙ Σ_valid −log p (see :mod:`natgrad.losses`). :class:`StepBatch` puts the two
together: which positions count, each forward's sum scale sₘ (∂Lₘ/∂f = sₘ ∂(Σ nll)/∂f, with
the 1/k of k accumulated micro-batches), the factor that turns the accumulated gradient into
∇J, and the targets recovered from the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad._calls import CallLayout
from natgrad.layers.capture import ForwardRecord, batch_inputs
from natgrad.losses import LossSpec

__all__ = ["StepBatch"]


class StepBatch:
    """The forwards of one step (one or several micro-batches) and their scales.

    Attributes:
        records: the forwards whose backward ran since the last step.
        spec: how the loss is normalised.
        valid: per record, ``[Nₘ, ...]`` bool of the positions that count, or None (all).
        scales: per record, sₘ such that the accumulated loss holds sₘ · Σ nll of forward m
            (each forward's loss taken as divided by the number of forwards k).
        rows: N, the rows of all forwards together.
    """

    def __init__(self, records: list[ForwardRecord], spec: LossSpec) -> None:
        self.records = records
        self.spec = spec
        k = len(records)
        self.valid = [spec.valid(r.output, r.output_grad) for r in records]
        self.scales = [
            spec.sum_scale(r.output, v) / k for r, v in zip(records, self.valid, strict=True)
        ]
        # Σₘ Nₘsₘ, summed from the exact per-forward Nₘsₘ (1 for one batch-mean forward)
        self._grad_scale = sum(spec.fisher_scale(r.output, v)
                               for r, v in zip(records, self.valid, strict=True)) / k if k else 1.0
        self.rows = sum(r.batch_size for r in records)
        self._inputs: tuple[Tensor, ...] | None = None
        self._valid_rows: Tensor | None = None
        self._outputs: Tensor | None = None
        self._targets: Tensor | None = None

    def __bool__(self) -> bool:
        return bool(self.records)

    @property
    def grad_scale(self) -> float:
        """Σₘ Nₘ sₘ: the accumulated gradient divided by it is ∇J (exact when every forward
        has the same sₘ, e.g. equal micro-batches; a row-weighted mean of the sₘ otherwise).
        1 when there is no forward (the gradient is then taken as it is)."""
        return self._grad_scale

    def inputs(self) -> tuple[Tensor, ...]:
        """The model's inputs of all forwards, concatenated along the batch (once a step)."""
        if self._inputs is None:
            self._inputs = batch_inputs(self.records)
        return self._inputs

    @property
    def layout(self) -> CallLayout | None:
        """How :meth:`inputs` map onto the model's arguments (None: no forward)."""
        return self.records[0].layout if self.records else None

    def valid_rows(self) -> Tensor | None:
        """The positions that count for all forwards together, ``[N, ...]``, or None."""
        if self._valid_rows is None and any(v is not None for v in self.valid):
            self._valid_rows = torch.cat([
                torch.ones(r.output.shape[:-1], dtype=torch.bool, device=r.output.device)
                if v is None else v
                for r, v in zip(self.records, self.valid, strict=True)
            ])
        return self._valid_rows

    def outputs(self) -> Tensor:
        """The model's outputs of all forwards (detached), ``[N, ...]``, in at least float32
        (a forward under autocast records half-precision outputs); formed once a step (a
        language model's logits are the step's largest tensors), not to be modified."""
        if self._outputs is None:
            parts = [_wide(r.output) for r in self.records]
            self._outputs = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._outputs

    def targets(self) -> Tensor:
        """The (soft) targets recovered from the loss's gradient, ``[N, ...]``: per forward
        y = mean(f) − (∂L/∂f) / sₘ, exact for every supported loss (label smoothing
        included); ignored positions get mean(f) and are masked wherever used. Formed once a
        step, not to be modified."""
        if self._targets is None:
            likelihood = self.spec.likelihood
            self._targets = torch.cat([
                likelihood.targets_from_grad(_wide(r.output), _wide(r.output_grad), s)
                for r, s in zip(self.records, self.scales, strict=True)])
        return self._targets

    def loss_rows(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Σ over each row's valid positions of −log p(y | f), ``[N]`` (canonical units)."""
        return self.spec.likelihood.cross_entropy(_wide(outputs), targets, self.valid_rows())


def _wide(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 if it is in a half-precision type (bf16/fp16 autocast)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
