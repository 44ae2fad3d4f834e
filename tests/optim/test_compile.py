"""natgrad with a ``torch.compile``d model, in float64: the same steps as the eager model.

natgrad's hooks run eagerly between the compiled pieces of the forward (graph breaks at
the watched layers), and natgrad's own products run on the uncompiled module. Checked:

* every optimizer, both Fisher kinds (NaturalGradient: its exact Fisher), automatic
  settings: the parameters after a few steps equal the eager run's (the compiler may
  reorder float operations, so equality up to rounding);
* ``torch.compile(model)`` handed to the optimizer, ``model.compile()`` in place, the
  ``max-autotune-no-cudagraphs`` mode; ``fullgraph=True`` is an error naming the reason;
* nn.TransformerEncoderLayer (natgrad's MultiheadAttention forward) compiled;
* a negative control: hooks traced into the graph (as before) change the steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from conftest import DTYPE, rel_err
from natgrad.layers.capture import LayerCapture

STEPS = 4
RTOL_COMPILED = 1e-10  # float64; the compiled graph may sum in another order


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                         nn.Linear(12, 4)).to(DTYPE)


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(24, 6, dtype=DTYPE, generator=generator), torch.randint(
        0, 4, (24,), generator=generator)


def _train(build_opt, how: str, model_fn=_mlp, data=_data) -> torch.Tensor:
    model = model_fn()
    if how == "eager":
        forward = target = model
    elif how == "handed":
        forward = target = torch.compile(model)
    elif how == "in-place":
        model.compile()
        forward = target = model
    elif how == "autotune":
        forward, target = torch.compile(model, mode="max-autotune-no-cudagraphs"), model
    elif how == "fullgraph":
        forward, target = torch.compile(model, fullgraph=True), model
    else:
        forward, target = torch.compile(model), model
    opt = build_opt(target)
    x, y = data()
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(forward(x).reshape(-1, 4), y.reshape(-1)).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()  # each test compiles anew (no recompile-limit fallback to eager)
    yield
    torch._dynamo.reset()


def _compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


CASES = {
    "KFAC-mc": lambda m: natgrad.KFAC(m, loss=nn.CrossEntropyLoss()),
    "KFAC-empirical": lambda m: natgrad.KFAC(m, loss=nn.CrossEntropyLoss(), kind="empirical"),
    "EKFAC-mc": lambda m: natgrad.EKFAC(m, loss=nn.CrossEntropyLoss()),
    "EKFAC-empirical": lambda m: natgrad.EKFAC(m, loss=nn.CrossEntropyLoss(),
                                               kind="empirical"),
    "NGDCG-mc": lambda m: natgrad.NGDCG(m, loss=nn.CrossEntropyLoss()),
    "NGDCG-empirical": lambda m: natgrad.NGDCG(m, loss=nn.CrossEntropyLoss(), kind="empirical"),
    "NaturalGradient": lambda m: natgrad.NaturalGradient(m, loss=nn.CrossEntropyLoss()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_forward_takes_the_eager_steps(case):
    eager = _train(CASES[case], "eager")
    compiled = _train(CASES[case], "compiled")
    assert _compiled_graphs() > 0  # the forward really was compiled
    assert rel_err(compiled, eager) <= RTOL_COMPILED


@pytest.mark.parametrize("how", ["handed", "in-place", "autotune"])
def test_every_way_of_compiling_takes_the_eager_steps(how):
    eager = _train(CASES["KFAC-mc"], "eager")
    assert rel_err(_train(CASES["KFAC-mc"], how), eager) <= RTOL_COMPILED


def test_fullgraph_is_a_clear_error_at_the_first_forward():
    """natgrad's hooks must break the graph; fullgraph=True forbids breaks, so the first
    forward fails with natgrad's reason instead of training with a changed curvature."""
    with pytest.raises(torch._dynamo.exc.Unsupported, match="compile without fullgraph"):
        _train(CASES["KFAC-mc"], "fullgraph")


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(9, 8),
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True),
        nn.Linear(8, 4),
    ).to(DTYPE)


def _tokens():
    generator = torch.Generator().manual_seed(2)
    return (torch.randint(0, 9, (6, 5), generator=generator),
            torch.randint(0, 4, (6, 5), generator=generator))


def test_compiled_transformer_layer_takes_the_eager_steps():
    eager = _train(CASES["KFAC-mc"], "eager", _encoder, _tokens)
    compiled = _train(CASES["KFAC-mc"], "compiled", _encoder, _tokens)
    assert _compiled_graphs() > 0
    assert rel_err(compiled, eager) <= RTOL_COMPILED


def test_negative_control_hooks_traced_into_the_graph_change_the_steps(monkeypatch):
    eager = _train(CASES["KFAC-mc"], "eager")
    monkeypatch.setattr(torch.compiler, "disable", lambda fn=None, **_: fn)
    monkeypatch.setattr(LayerCapture, "_record_call", LayerCapture._record_call.__wrapped__)
    traced = _train(CASES["KFAC-mc"], "compiled")
    assert rel_err(traced, eager) > 1e-3
