"""The bench's peers: torch.optim.Muon on the hidden matrices, AdamW on the rest."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import train_losses
from natgrad.bench.peers import Combined, hidden_matrices, muon


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def test_hidden_matrices_are_the_inner_linear_weights():
    m = model()
    assert [id(p) for p in hidden_matrices(m)] == [id(m[2].weight), id(m[4].weight)]


def test_after_an_embedding_the_first_linear_is_hidden():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 10))
    assert [id(p) for p in hidden_matrices(m)] == [id(m[1].weight)]


def test_muon_steps_each_part_as_its_own_optimizer_would():
    m, reference = model(), model()
    opt = muon(m, lr=0.01)
    assert isinstance(opt, Combined)
    hidden = hidden_matrices(reference)
    rest = [p for p in reference.parameters() if all(p is not q for q in hidden)]
    muon_ref = torch.optim.Muon(hidden, lr=0.01, weight_decay=0.0,
                                adjust_lr_fn="match_rms_adamw")
    adamw_ref = torch.optim.AdamW(rest, lr=0.01, weight_decay=0.0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(3):
        for net, opts in ((m, [opt]), (reference, [muon_ref, adamw_ref])):
            for o in opts:
                o.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            for o in opts:
                o.step()
    for p, q in zip(m.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    state = copy.deepcopy(opt.state_dict())
    assert len(state["parts"]) == 2
    fresh = muon(copy.deepcopy(m), lr=0.01)
    fresh.load_state_dict(state)
    assert len(fresh.param_groups) == 2


def test_peers_from_packages_are_optional(monkeypatch):
    """Without HeavyBall, soap/shampoo/psgd-kron are unavailable and the default run goes on
    without them; with it, they are available."""
    import importlib.util

    from natgrad.bench.optimizers import OPTIMIZERS, available_optimizers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "heavyball" else real(name, *a))
    names = available_optimizers()
    assert "muon" in names and not {"soap", "shampoo", "psgd-kron"} & set(names)
    for name in ("soap", "shampoo", "psgd-kron"):
        assert OPTIMIZERS[name].requires == "heavyball"


@pytest.mark.parametrize("name", ["soap", "shampoo", "psgd-kron"])
def test_heavyball_peers_train_when_installed(name):
    pytest.importorskip("heavyball")
    from natgrad.bench.optimizers import OPTIMIZERS

    m = model()
    opt = OPTIMIZERS[name].build(m, nn.CrossEntropyLoss(), {"lr": 3e-3})
    losses = train_losses(opt, m, torch.randn(32, 4), torch.randint(0, 3, (32,)), 30)
    assert losses[-1] < losses[0]
