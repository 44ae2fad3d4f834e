"""A forward under bf16 autocast trains with every optimizer's defaults (issue: the modern loop).

float32 parameters, the forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``, the
loss in float32: natgrad keeps its statistics and the quadratic model in the parameters'
precision (traced half-precision activations and outputs are widened), takes every step and
ends near the float32 run's loss. (The fp16 + GradScaler path and the CUDA check are not done.)
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
