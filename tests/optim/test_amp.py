"""Loss scaling with ``torch.amp.GradScaler``: natgrad takes the unscaled steps.

Scaling by a power of two is exact in floating point, so a run whose loss is scaled by a
GradScaler must take the same steps as the run without one — for every optimizer and both
Fisher kinds — whether ``scaler.step(opt)`` hands the scale over, or the gradients were
unscaled first (``scaler.unscale_(opt)``, for clipping) and the optimizer holds the scaler.
A step whose gradients overflowed is skipped and counted; fp16 autocast trains.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from conftest import DTYPE, rel_err

STEPS = 4


def _model(dtype: torch.dtype = DTYPE) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).to(dtype)


def _data(dtype: torch.dtype = DTYPE):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(24, 6, generator=generator).to(dtype),
            torch.randint(0, 4, (24,), generator=generator))


CASES = {
    "KFAC-mc": lambda m, **kw: natgrad.KFAC(m, loss=nn.CrossEntropyLoss(), **kw),
    "KFAC-empirical": lambda m, **kw: natgrad.KFAC(m, loss=nn.CrossEntropyLoss(),
                                                   kind="empirical", **kw),
    "EKFAC-empirical": lambda m, **kw: natgrad.EKFAC(m, loss=nn.CrossEntropyLoss(),
                                                     kind="empirical", **kw),
    "NGDCG": lambda m, **kw: natgrad.NGDCG(m, loss=nn.CrossEntropyLoss(), **kw),
    "NaturalGradient": lambda m, **kw: natgrad.NaturalGradient(m, loss=nn.CrossEntropyLoss(),
                                                               **kw),
}


def _run(case: str, how: str) -> torch.Tensor:
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=how != "plain")
    opt = CASES[case](model, **({"grad_scaler": scaler} if how == "unscaled-first" else {}))
    x, y = _data()
    for _ in range(STEPS):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if how == "unscaled-first":
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)  # (no clipping)
        scaler.step(opt)
        scaler.update()
    assert opt.state_dict()["state"]["natgrad"]["skipped_steps"] == 0
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("how", ["scaler-step", "unscaled-first"])
def test_scaled_loss_takes_the_unscaled_steps(case, how):
    assert rel_err(_run(case, how), _run(case, "plain")) <= 1e-12


def test_unscaled_first_without_the_scaler_is_a_clear_error():
    model = _model()
    scaler = torch.amp.GradScaler("cpu")
    opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss())
    x, y = _data()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        scaler.step(opt)


def test_grad_scaler_argument_is_checked():
    with pytest.raises(TypeError, match="grad_scaler"):
        natgrad.KFAC(_model(), loss=nn.CrossEntropyLoss(), grad_scaler=2.0)


def test_overflowing_step_is_skipped_and_counted():
    model = _model(torch.float32)
    x, y = _data(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss())
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y) * 4).backward()  # S · loss overflows
    scaler.step(opt)
    scaler.update()
    assert opt.state_dict()["state"]["natgrad"]["skipped_steps"] == 1
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**27  # the scaler saw the overflow and backed off
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    assert opt.state_dict()["state"]["natgrad"]["skipped_steps"] == 1
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_fp16_autocast_with_a_grad_scaler_trains():
    model = _model(torch.float32)
    x, y = _data(torch.float32)
    scaler = torch.amp.GradScaler("cpu")
    opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss())
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert opt.state_dict()["state"]["natgrad"]["skipped_steps"] == 0
    assert losses[-1] < 0.7 * losses[0], losses
