"""Tangents of Sequential models from traced activations equal forward-mode AD."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import RTOL_EXACT, rel_err
from natgrad.curvature.tangents import sequential_jvp, supports_trace

DTYPE = torch.float64


def _models() -> dict[str, nn.Sequential]:
    torch.manual_seed(0)
    return {
        "tanh": nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                              nn.Linear(5, 3)),
        "relu_nobias": nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(),
                                     nn.Linear(6, 3, bias=False)),
        "sigmoid_linear_code": nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 6), nn.Sigmoid(),
                                             nn.Linear(6, 4), nn.Identity()),
        "flatten": nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 2)),
        "cnn": nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1), nn.Tanh(),
                             nn.Conv2d(4, 2, 2, bias=False, padding="same", dilation=2),
                             nn.Flatten(), nn.Linear(2 * 3 * 3, 3)),
    }


def _reference(model: nn.Module, x: torch.Tensor, tangent: list[torch.Tensor]) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))

    return torch.autograd.functional.jvp(f, params, tuple(tangent))[1]


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("partial", [False, True])
def test_sequential_jvp_matches_forward_mode(name, partial):
    model = _models()[name].double()
    assert supports_trace(model)
    shape = {"flatten": (7, 2, 4), "cnn": (7, 2, 5, 5)}.get(name, (7, 4))
    x = torch.randn(shape, dtype=DTYPE)
    outputs, h = [], x
    for child in model:
        h = child(h)
        outputs.append(h.detach())
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    tangents = [[torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in params]
                for _ in range(2)]
    if partial:  # a direction that leaves the first parameter alone
        tangents[1][0] = torch.zeros_like(params[0])
    directions = [
        {id(p): t for p, t in zip(params, tangent, strict=True)
         if not (partial and p is params[0] and tangent is tangents[1])}
        for tangent in tangents
    ]
    products = sequential_jvp(model, x, outputs, directions)
    for product, tangent in zip(products, tangents, strict=True):
        assert rel_err(product, _reference(model, x, tangent)) <= RTOL_EXACT


def test_unsupported_models_are_rejected():
    assert not supports_trace(nn.Sequential(nn.Linear(2, 2), nn.GELU()))
    assert not supports_trace(nn.Sequential(nn.Conv2d(2, 2, 1, groups=2)))
    assert not supports_trace(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1,
                                                      padding_mode="reflect")))
    assert supports_trace(nn.Sequential(nn.Conv2d(1, 1, 1)))
    assert not supports_trace(nn.Linear(2, 2))
    assert not supports_trace(nn.Sequential(nn.ReLU()))


def test_conv_tangent_with_only_bias_directions():
    """No direction moves the first convolution's weight: its tangent is the bias alone,
    constant over the map, and must still reach the next convolution with its full shape."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 2), nn.Flatten(),
                          nn.Linear(2 * 2 * 2, 2)).double()
    x = torch.randn(3, 1, 5, 5, dtype=DTYPE)
    outputs, h = [], x
    for child in model:
        h = child(h)
        outputs.append(h.detach())
    gen = torch.Generator().manual_seed(2)
    tangent = [torch.zeros_like(p) if i == 0 else torch.randn(p.shape, generator=gen,
                                                                dtype=DTYPE)
               for i, p in enumerate(model.parameters())]
    direction = {id(p): t for i, (p, t) in enumerate(zip(model.parameters(), tangent,
                                                          strict=True)) if i != 0}
    (product,) = sequential_jvp(model, x, outputs, [direction])
    assert rel_err(product, _reference(model, x, tangent)) <= RTOL_EXACT
