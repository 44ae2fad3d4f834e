"""One conformance suite over every natgrad optimizer (torch's test_optim.py pattern).

``OPTIMIZERS`` is the single table: ``(name, factory)`` with ``factory(model, params=None,
**overrides)`` returning a ready optimizer with settings that train the small float64 problems
below. Adding an optimizer is one line in it; add its name to ``LAYERWISE`` if its curvature
is per-layer blocks that replace the Fisher (``exclude`` then means a plain gradient step, and
unsupported modules are named in one warning). Optimizers appear twice where they have both
fixed and automatic (``"auto"``) lr / momentum / damping: the two take different code paths.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from conftest import (
    DTYPE,
    LOSS_DECREASE_FACTOR,
    OUT,
    RTOL_STEP,
    make_inputs,
    make_model,
    make_targets,
    rel_err,
)

pytestmark = pytest.mark.usefixtures("single_thread")

Factory = Callable[..., torch.optim.Optimizer]


def make_factory(cls: type, **defaults) -> Factory:
    """``factory(model, params=None, **overrides)`` for ``cls`` with these defaults."""

    def make(model: nn.Module, params=None, **overrides) -> torch.optim.Optimizer:
        return cls(model, params, **{"likelihood": "categorical", **defaults, **overrides})

    return make


_FIXED = dict(lr=0.2, damping=1e-2, momentum=0.5)
_BLOCKS = dict(kl_clip=None, stat_every=1, inv_every=2, stat_decay=0.9, seed=0)
_AUTO = dict(lr="auto", damping="auto", momentum="auto")

OPTIMIZERS: list[tuple[str, Factory]] = [
    ("NaturalGradient", make_factory(natgrad.NaturalGradient, **{**_FIXED, "lr": 0.5})),
    ("NaturalGradient-auto", make_factory(natgrad.NaturalGradient, **_AUTO)),
    ("KFAC", make_factory(natgrad.KFAC, **_FIXED, **_BLOCKS)),
    ("KFAC-auto", make_factory(natgrad.KFAC, **_AUTO, **_BLOCKS)),
    ("EKFAC", make_factory(natgrad.EKFAC, **_FIXED, **_BLOCKS)),
    ("EKFAC-auto", make_factory(natgrad.EKFAC, **_AUTO, **_BLOCKS)),
    ("NGDCG", make_factory(natgrad.NGDCG, **_AUTO, stat_every=1, inv_every=2, seed=0)),
]
LAYERWISE = {"KFAC", "KFAC-auto", "EKFAC", "EKFAC-auto"}

ALL = [pytest.param(f, id=name) for name, f in OPTIMIZERS]
LAYERWISE_ONLY = [pytest.param(f, id=name) for name, f in OPTIMIZERS if name in LAYERWISE]
WITH_ARCH = [pytest.param(f, "mlp", id=f"{name}-mlp") for name, f in OPTIMIZERS] + [
    pytest.param(f, "cnn", id=f"{name}-cnn") for name, f in OPTIMIZERS if name in LAYERWISE
]
N = 16


def batch(arch: str, seed: int = 1):
    inputs = make_inputs(arch, N, seed=seed)
    with torch.no_grad():
        targets = make_targets("categorical", make_model(arch, seed=5)(inputs), seed=seed + 1)
    return inputs, targets


def train(opt, model, batches) -> list[float]:
    """The unchanged loop; returns the losses."""
    losses = []
    for inputs, targets in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs).reshape(-1, OUT), targets.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def natgrad_warnings(records) -> list[str]:
    """The library's own warnings (RuntimeWarning), not torch's deprecation notices."""
    return [str(w.message) for w in records if issubclass(w.category, RuntimeWarning)]


def applied_lr(opt) -> float:
    """The step size of the last step along −Δ: the group lr, or the automatic α·lr."""
    return opt.state["natgrad"]["lr"]


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same_state(a, b, skip=("rng_state",)):
    """Recursive equality of (optimizer) state: tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b), (set(a), set(b))
        for key in a:
            if key not in skip:
                assert_same_state(a[key], b[key], skip)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y, skip)
    else:
        assert a == b, (a, b)


# --- training -------------------------------------------------------------------------------
@pytest.mark.parametrize(("factory", "arch"), WITH_ARCH)
def test_loss_decreases(factory, arch):
    model = make_model(arch)
    opt = factory(model)
    data = batch(arch)
    losses = train(opt, model, [data] * 20)
    model.eval()
    with torch.no_grad():
        final = F.cross_entropy(model(data[0]), data[1]).item()
    assert final < LOSS_DECREASE_FACTOR * losses[0], (losses[0], final)
    assert opt.state["natgrad"]["step"] == 20
    assert opt.state["natgrad"]["skipped_steps"] == 0


@pytest.mark.parametrize(("factory", "arch"), WITH_ARCH)
def test_state_dict_round_trip_steps_in_lockstep(factory, arch):
    batches = [batch(arch, seed=s) for s in range(7)]
    model = make_model(arch)
    opt = factory(model)
    train(opt, model, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh = make_model(arch, seed=9)  # different weights until loaded
    fresh.load_state_dict(saved["model"])
    fresh_opt = factory(fresh)
    fresh_opt.load_state_dict(saved["opt"])
    train(opt, model, batches[3:])
    train(fresh_opt, fresh, batches[3:])
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same_state(opt.state_dict(), fresh_opt.state_dict(), skip=())


@pytest.mark.parametrize("factory", ALL)
def test_lr_scheduler_changes_lr_and_step_size(factory):
    data = batch("mlp")
    model = make_model("mlp")
    plain, scheduled = copy.deepcopy(model), copy.deepcopy(model)
    opt_plain, opt_scheduled = factory(plain), factory(scheduled)
    scheduler = torch.optim.lr_scheduler.StepLR(opt_scheduled, step_size=1, gamma=0.1)
    lr = opt_plain.param_groups[0]["lr"]
    train(opt_plain, plain, [data])
    train(opt_scheduled, scheduled, [data])
    scheduler.step()
    assert opt_scheduled.param_groups[0]["lr"] == pytest.approx(0.1 * lr)
    before = params_of(plain)
    train(opt_plain, plain, [data])
    train(opt_scheduled, scheduled, [data])
    for p0, p, q in zip(before, plain.parameters(), scheduled.parameters(), strict=True):
        assert rel_err(q - p0, 0.1 * (p - p0)) <= RTOL_STEP


@pytest.mark.parametrize("factory", ALL)
def test_step_without_gradients_changes_nothing(factory):
    model = make_model("mlp")
    opt = factory(model)
    inputs, _ = batch("mlp")
    opt.zero_grad()
    assert opt.step() is None  # fresh optimizer, no gradients
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), make_model("mlp")
                                                 .parameters(), strict=True))
    train(opt, model, [batch("mlp")] * 2)
    opt.zero_grad()  # grads are None
    model(inputs)  # a forward without backward does not make a gradient either
    before, state = params_of(model), copy.deepcopy(opt.state_dict())
    assert opt.step() is None
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same_state(state, opt.state_dict(), skip=())
    assert opt.state["natgrad"]["step"] == 2 and opt.state["natgrad"]["skipped_steps"] == 0


@pytest.mark.parametrize("factory", ALL)
def test_param_group_lr_is_respected(factory):
    data = batch("mlp")
    model = make_model("mlp")
    single, grouped = copy.deepcopy(model), copy.deepcopy(model)
    # K-FAC's λ starts at 1e-2 (not 1e-4), where neither run's step check intervenes on
    # this batch (asserted below)
    start = {"initial_damping": 1e-2} if isinstance(factory(model), natgrad.KFAC) else {}
    opt_single = factory(single, **start)
    lr = opt_single.param_groups[0]["lr"]
    opt_grouped = factory(
        grouped,
        [{"params": list(grouped[0].parameters())},
         {"params": list(grouped[2].parameters()), "lr": 0.2 * lr}],
        **start,
    )
    train(opt_single, single, [data])
    train(opt_grouped, grouped, [data])
    # the step check (ρ) sees the whole update, which the groups' lr changes: a comparison
    # holds only where both runs took their step as chosen (not backtracked or rejected)
    counts = [{k: o.state["natgrad"].get(k, 0) for k in ("backtracked_steps", "rejected_steps")}
              for o in (opt_single, opt_grouped)]
    assert counts[0] == counts[1] == {"backtracked_steps": 0, "rejected_steps": 0}, counts
    for index, factor in ((0, 1.0), (2, 0.2)):
        for p0, p, q in zip(model[index].parameters(), single[index].parameters(),
                            grouped[index].parameters(), strict=True):
            ratio = ((q - p0).norm() / (p - p0).norm()).item()
            err = rel_err(q - p0, factor * (p - p0))
            assert err <= RTOL_STEP, f"layer {index}: step is {ratio:.3g}x the one-group step"


# --- parameters outside the blocks ----------------------------------------------------------
class Scale(nn.Module):
    """A learnable output scale: a raw parameter used in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, 1.0], dtype=DTYPE))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize(("name", "factory"), OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_fallback_parameters_are_updated_with_one_warning(name, factory):
    model = nn.Sequential(*make_model("mlp"), Scale())
    before = params_of(model)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        opt = factory(model)
        train(opt, model, [batch("mlp")] * 3)
    for p, q in zip(before, model.parameters(), strict=True):
        assert not torch.equal(p, q)
    messages = natgrad_warnings(records)
    if name in LAYERWISE:
        assert len(messages) == 1, messages
        assert "3 (Scale" in messages[0]
    else:  # the exact Fisher covers every parameter (at most a note on the preconditioner)
        assert len(messages) <= 1, messages


@pytest.mark.parametrize("factory", LAYERWISE_ONLY)
def test_excluded_modules_get_the_plain_gradient(factory):
    model = make_model("mlp")
    inputs, targets = batch("mlp")
    opt = factory(model, exclude=["2"])
    before = params_of(model)
    opt.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    lr = applied_lr(opt)
    for i, (p0, p, g) in enumerate(zip(before, model.parameters(), grads, strict=True)):
        if i >= 2:  # model[2]: excluded
            assert rel_err(p - p0, -lr * g) <= RTOL_STEP
        else:
            assert rel_err(p - p0, -lr * g) > 1e-3


# --- faults and closures --------------------------------------------------------------------
@pytest.mark.parametrize("factory", ALL)
def test_non_finite_loss_is_skipped(factory):
    """NaN input: nothing changes, the skip is counted and warned about once; the next
    finite batch trains normally."""
    model = make_model("mlp")
    opt = factory(model)
    data = batch("mlp")
    train(opt, model, [data] * 2)
    bad = data[0].clone()
    bad[0, 0] = float("nan")
    before, state = params_of(model), copy.deepcopy(opt.state_dict())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        train(opt, model, [(bad, data[1])])
    assert len(natgrad_warnings(records)) == 1, natgrad_warnings(records)
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.state["natgrad"]["skipped_steps"] == 1
    assert opt.state["natgrad"]["step"] == 2
    # the label draws for the NaN batch may have advanced the RNG; everything else is equal
    state["state"]["natgrad"]["skipped_steps"] = 1
    assert_same_state(state, opt.state_dict())
    # the bad batch leaves nothing behind: the next finite step is taken
    train(opt, model, [data])
    assert opt.state["natgrad"]["skipped_steps"] == 1, "the step after a skipped one was skipped"
    assert opt.state["natgrad"]["step"] == 3
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("factory", ALL)
def test_a_step_skipped_after_the_curvature_update_changes_no_state(factory, monkeypatch):
    """The step's curvature is computed before the update is decided; when the decision
    fails (a non-finite quadratic model, forced here) the statistics, inverses, warm starts
    and momentum are exactly those before the step."""
    import natgrad.optim.base

    model = make_model("mlp")
    opt = factory(model)
    data = [batch("mlp", seed=s) for s in range(3)]
    train(opt, model, data[:2])
    before, state = params_of(model), copy.deepcopy(opt.state_dict())
    monkeypatch.setattr(natgrad.optim.base, "decide", lambda control, problem: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(opt, model, data[2:])
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q)
    state["state"]["natgrad"]["skipped_steps"] += 1
    assert_same_state(state, opt.state_dict())


def test_kind_true_is_the_deprecated_name_of_mc():
    model, twin = make_model("mlp"), make_model("mlp")
    with pytest.warns(DeprecationWarning, match="kind='mc'"):
        old = natgrad.KFAC(model, kind="true", **_BLOCKS)
    new = natgrad.KFAC(twin, kind="mc", **_BLOCKS)
    data = [batch("mlp", seed=s) for s in range(3)]
    train(old, model, data)
    train(new, twin, data)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="kind must be one of"):
        natgrad.KFAC(make_model("mlp"), kind="exact")


@pytest.mark.parametrize("factory", ALL)
def test_step_with_closure_returns_the_loss(factory):
    model = make_model("mlp")
    manual, closed = copy.deepcopy(model), copy.deepcopy(model)
    opt_manual, opt_closed = factory(manual), factory(closed)
    inputs, targets = batch("mlp")
    losses = train(opt_manual, manual, [(inputs, targets)] * 3)

    def closure():
        opt_closed.zero_grad()
        loss = F.cross_entropy(closed(inputs), targets)
        loss.backward()
        return loss

    for expected in losses:
        loss = opt_closed.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.item() == expected
    for p, q in zip(manual.parameters(), closed.parameters(), strict=True):
        assert torch.equal(p, q)
