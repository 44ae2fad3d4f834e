"""Calling a model again as its user called it: keyword arguments and structured outputs.

* A recorded call splits into batched tensors (positional, then keyword tensors with the
  batch's rows) and constants; its layout calls the model exactly as the user did.
* The functional model's Jacobian-vector products on a keyword call equal
  ``torch.autograd.functional.jvp`` of the same call (float64).
* Forwards of one step with different constants cannot be concatenated (TypeError).
* A Hugging Face-style output gives its logits without ``output_fn``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import natgrad
from conftest import DTYPE, RTOL_EXACT, rel_err
from natgrad._calls import model_output, record_call
from natgrad.curvature.model import FunctionalModel
from natgrad.layers.capture import ForwardRecord, batch_inputs


@dataclass
class Output:
    logits: Tensor
    loss: Tensor | None = None


class KeywordModel(nn.Module):
    """f(x, mask=..., scale=...) → Output(logits); ``mask`` zeroes rows of positions."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))

    def forward(self, x: Tensor, mask: Tensor | None = None, scale: float = 1.0,
                offset: Tensor | None = None) -> Output:
        h = x if mask is None else x * mask.unsqueeze(-1)
        out = self.inner(h) * scale
        return Output(out if offset is None else out + offset)


def test_record_call_splits_batched_tensors_from_constants():
    x, mask, offset = torch.randn(2, 6, 3), torch.ones(2, 6), torch.randn(4)
    inputs, layout = record_call((x,), {"mask": mask, "scale": 2.0, "offset": offset}, 2)
    assert layout.positional == 1 and layout.keywords == ("mask",)
    assert set(layout.constants) == {"scale", "offset"}
    assert inputs[0] is not x and torch.equal(inputs[0], x) and torch.equal(inputs[1], mask)
    model = KeywordModel()
    expected = model(x, mask=mask, scale=2.0, offset=offset).logits
    assert torch.equal(layout.call(model, inputs).logits, expected)


def test_functional_jvp_on_a_keyword_call_equals_autograds():
    torch.manual_seed(0)
    model = KeywordModel().to(DTYPE)
    x = torch.randn(3, 6, 3, dtype=DTYPE)
    mask = (torch.rand(3, 6) > 0.3).to(DTYPE)
    inputs, layout = record_call((), {"x": x, "mask": mask, "scale": 0.5}, 3)
    fmodel = FunctionalModel(model, None, layout=layout)
    tangent = [torch.randn_like(p) for p in fmodel.params]
    outputs, (product,) = fmodel.jvp(inputs, [tangent])

    def f(*params):
        tensors = dict(zip(fmodel.names, params, strict=True))
        return torch.func.functional_call(model, tensors, (), {"x": x, "mask": mask,
                                                               "scale": 0.5}).logits

    expected_out, expected = torch.autograd.functional.jvp(
        f, tuple(p.detach() for p in fmodel.params), tuple(tangent)
    )
    assert rel_err(outputs, expected_out) <= RTOL_EXACT
    assert rel_err(product, expected) <= RTOL_EXACT
    assert rel_err(fmodel.frozen_forward(inputs), expected_out) <= RTOL_EXACT


def test_forwards_with_different_constants_are_not_concatenated():
    x = torch.randn(2, 3)
    records = []
    for scale in (1.0, 2.0):
        inputs, layout = record_call((x,), {"scale": scale}, 2)
        records.append(ForwardRecord(inputs, {}, 2, layout))
    assert len(batch_inputs(records[:1])) == 1
    with pytest.raises(TypeError, match="different arguments"):
        batch_inputs(records)
    same = []
    for _ in range(2):
        inputs, layout = record_call((x,), {"scale": 1.0, "mask": torch.ones(2)}, 2)
        same.append(ForwardRecord(inputs, {}, 2, layout))
    joined = batch_inputs(same)
    assert [t.shape[0] for t in joined] == [4, 4]


def test_outputs_with_logits_need_no_output_fn():
    logits = torch.randn(2, 3)
    assert model_output(Output(logits), None) is logits
    assert model_output({"logits": logits, "loss": None}, None) is logits
    assert model_output(logits, None) is logits
    assert model_output((logits, 1), lambda o: o[0]) is logits


def test_kfac_trains_a_keyword_model_with_micro_batches():
    torch.manual_seed(0)
    model = KeywordModel().to(DTYPE)
    opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss())
    x = torch.randn(8, 3, dtype=DTYPE)
    y = torch.randint(0, 4, (8,))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        total = 0.0
        for part in (slice(0, 4), slice(4, 8)):  # two micro-batches, each loss / 2
            out = model(x=x[part], mask=torch.ones(4, dtype=DTYPE), scale=1.0)
            loss = nn.functional.cross_entropy(out.logits, y[part]) / 2
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    assert losses[-1] < losses[0], losses
