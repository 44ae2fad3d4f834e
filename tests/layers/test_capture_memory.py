"""The optimizers' hooks must not keep a step's graph alive (no reference cycles)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad

FACTORIES = {
    "kfac-true": lambda m: natgrad.KFAC(m, stat_every=1),
    "kfac-empirical": lambda m: natgrad.KFAC(m, kind="empirical", stat_every=1),
    "ekfac": lambda m: natgrad.EKFAC(m, stat_every=1),
    "ngd": lambda m: natgrad.NaturalGradient(m, lr="auto", damping="auto"),
    "ngdcg": lambda m: natgrad.NGDCG(m, preconditioner="diagonal"),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_outputs_and_graphs_are_freed_without_the_garbage_collector(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = FACTORIES[name](model)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    gc.collect()
    gc.disable()
    try:
        refs = []
        for _ in range(3):
            opt.zero_grad()
            out = model(x)
            refs.append(weakref.ref(out))
            F.cross_entropy(out, y).backward()
            opt.step()
            del out
        with torch.no_grad():  # an evaluation forward must not be kept either
            model(x)
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


def test_unused_forward_is_released_at_the_next_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = natgrad.KFAC(model, stat_every=1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    gc.disable()
    try:
        stray = model(x)  # a forward with gradients that is never backpropagated
        ref = weakref.ref(stray)
        del stray
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_replaced_optimizer_leaves_no_hooks_and_draws_no_labels(name):
    """A second optimizer on the same model, the first deleted: one set of hooks, and the
    step equals that of a model that never had the first optimizer (one label stream)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    fresh = copy.deepcopy(model)

    def hooks(m):
        return [len(mod._forward_hooks) for mod in m.modules()]

    kept = FACTORIES[name](copy.deepcopy(model))
    alone = hooks(kept.model)
    assert sum(alone) > 0
    first = FACTORIES[name](model)
    del first
    gc.collect()
    second = FACTORIES[name](model)
    assert hooks(model) == alone
    reference = FACTORIES[name](fresh)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for m, opt in ((model, second), (fresh, reference)):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_capture_removed_during_a_forward_is_not_called():
    """A dropped optimizer's finalizer can run inside another forward of its model (a garbage
    collection there): PyTorch still calls the hooks of that call's snapshot, the removed
    capture's model hook without the keyword arguments it was registered with. It must do
    nothing, not fail."""
    from natgrad.layers.capture import LayerCapture, find_layers

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    capture = LayerCapture(model, find_layers(model).handlers)
    model.register_forward_hook(lambda *args: capture.remove(), prepend=True)
    model(torch.randn(5, 4, requires_grad=True))
    assert capture.records == []
