"""Half precision trains with every optimizer's defaults (issue: the modern loop).

* float32 parameters, the forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``, the
  loss in float32: natgrad keeps its statistics and the quadratic model in the parameters'
  precision (traced half-precision activations and outputs are widened), takes every step
  and ends near the float32 run's loss.
* bf16 parameters (``model.to(torch.bfloat16)``): the Kronecker factors and their inverses
  are kept in float32 by default (``factor_dtype``/``inverse_dtype`` set them), and training
  ends near the float32 run's loss.
(fp16 with a GradScaler: tests/optim/test_amp.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad

pytestmark = pytest.mark.usefixtures("single_thread")

FACTORIES = {
    "KFAC": lambda m: natgrad.KFAC(m, loss=nn.CrossEntropyLoss(), stat_every=1),
    "EKFAC": lambda m: natgrad.EKFAC(m, loss=nn.CrossEntropyLoss(), stat_every=1),
    "NGDCG": lambda m: natgrad.NGDCG(m, loss=nn.CrossEntropyLoss(), stat_every=1),
    "NaturalGradient": lambda m: natgrad.NaturalGradient(
        m, loss=nn.CrossEntropyLoss(), lr="auto", damping="auto", momentum="auto"),
}


def train(name: str, autocast: bool) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    opt = FACTORIES[name](model)
    for _ in range(15):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item(), opt.state["natgrad"]


@pytest.mark.parametrize("name", list(FACTORIES))
def test_bf16_autocast_forward_trains_like_float32(name):
    full, _ = train(name, autocast=False)
    mixed, state = train(name, autocast=True)
    assert state["skipped_steps"] == 0
    start = torch.log(torch.tensor(4.0)).item()  # about the loss at initialisation
    assert mixed < 0.8 * start
    assert abs(mixed - full) <= 0.1 * start  # bf16 rounding, not a different algorithm


def train_bf16_params(name: str, dtype: torch.dtype, **kwargs) -> tuple[float, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 4))
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=gen).to(dtype), torch.randint(0, 4, (64,), generator=gen)
    opt = getattr(natgrad, name)(model, loss=nn.CrossEntropyLoss(), stat_every=1, **kwargs)
    for _ in range(15):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.state["natgrad"]["skipped_steps"] == 0
    with torch.no_grad():
        return F.cross_entropy(model(x).float(), y).item(), opt


@pytest.mark.parametrize("name", ["KFAC", "EKFAC", "NGDCG"])
def test_bf16_parameters_train_like_float32_with_float32_factors(name):
    full, _ = train_bf16_params(name, torch.float32)
    half, opt = train_bf16_params(name, torch.bfloat16)
    start = torch.log(torch.tensor(4.0)).item()
    assert half < 0.8 * start
    assert abs(half - full) <= 0.1 * start
    first = opt.param_groups[0]["params"][0]
    assert first.dtype == torch.bfloat16
    factors = [v for state in opt.state.values() if isinstance(state, dict)
               for k, v in state.items() if k in ("input_cov", "grad_cov")]
    if name != "NGDCG":  # (NGDCG's inner K-FAC keeps its own state)
        assert factors and all(f.dtype == torch.float32 for f in factors)


def test_bf16_parameters_factor_dtype_is_settable():
    _, opt = train_bf16_params("KFAC", torch.bfloat16, factor_dtype=torch.float64)
    factors = [v for state in opt.state.values() if isinstance(state, dict)
               for k, v in state.items() if k in ("input_cov", "grad_cov")]
    assert factors and all(f.dtype == torch.float64 for f in factors)
