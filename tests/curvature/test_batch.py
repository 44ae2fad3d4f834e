"""StepBatch: the scale that turns the accumulated gradient into ∇J."""

from __future__ import annotations

import pytest
import torch

from natgrad.curvature.batch import StepBatch
from natgrad.layers.capture import ForwardRecord
from natgrad.losses import LossSpec


def record(n: int) -> ForwardRecord:
    return ForwardRecord((torch.randn(n, 2),), {}, n, output=torch.randn(n, 3),
                         output_grad=torch.randn(n, 3))


@pytest.mark.parametrize("sizes", [[49], [98], [7, 49], [3, 5, 8]])
def test_a_batch_mean_loss_needs_no_rescaling(sizes):
    """likelihood= (the batch mean, each micro-batch's loss / k): ∇J is the gradient itself,
    exactly 1 even where N·(1/N) rounds (N = 49, 98)."""
    assert StepBatch([record(n) for n in sizes], LossSpec("categorical")).grad_scale == 1.0


def test_grad_scale_of_a_sum_and_of_a_mean_over_elements():
    records = [record(4), record(4)]
    assert StepBatch(records, LossSpec("gaussian", "sum", factor=2.0)).grad_scale == 8.0
    # mean over 4·3 elements, times 2 for (f−y)²: N·s = 4 · 2/12 per forward, / k = 2 each
    mean = StepBatch(records, LossSpec("gaussian", "mean", factor=2.0)).grad_scale
    assert mean == pytest.approx(2.0 / 3.0, rel=1e-15)


def test_inputs_are_concatenated_once_per_step():
    batch = StepBatch([record(2), record(3)], LossSpec("categorical"))
    assert batch.inputs() is batch.inputs() and batch.inputs()[0].shape == (5, 2)
