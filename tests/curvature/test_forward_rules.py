"""natgrad's attention rule against PyTorch's own forward-mode AD through the math kernel.

The reference route is PyTorch's: ``F.scaled_dot_product_attention`` on the math kernel with
dual inputs (its mask, safe softmax and the forward-mode formulas of every operation inside),
in float64; natgrad's route is the tangent written out in
:mod:`natgrad.curvature.forward_rules`.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import DTYPE, RTOL_EXACT, rel_err
from natgrad.curvature import forward_rules
from natgrad.curvature.forward_rules import ForwardRules

N, HEADS, L, S, E = 3, 4, 5, 6, 8


def _masks(gen: torch.Generator) -> dict[str, torch.Tensor]:
    keep = torch.rand(N, 1, L, S, generator=gen) > 0.4
    keep[0, 0, 1] = False  # a query that sees no key: PyTorch's safe softmax gives it 0
    additive = torch.randn(N, HEADS, L, S, dtype=DTYPE, generator=gen)
    additive[1, 2, 3] = -torch.inf  # an additive mask that hides a whole row
    additive[2, :, :, 0] = -torch.inf
    matrix = torch.rand(L, S, generator=gen) > 0.3
    return {"bool": keep, "float": additive, "matrix": matrix, "wide": additive}


CASES = {
    "none": {},
    "causal": {"is_causal": True},
    "causal-square": {"is_causal": True, "square": True},
    "bool-mask": {"mask": "bool"},
    "float-mask": {"mask": "float"},
    "float-mask-with-tangent": {"mask": "float", "mask_tangent": True},
    "scale": {"scale": 0.3},
    "grouped-query": {"gqa": 2, "is_causal": True},
    "keys-broadcast": {"kv_batch": 1, "mask": "float"},
    "matrix-mask": {"mask": "matrix"},
    "mask-wider-than-queries": {"mask": "wide", "q_batch": 1},  # PyTorch's function
}


def _inputs(case: dict):
    gen = torch.Generator().manual_seed(0)
    source = L if case.get("square") else S
    kv_heads = HEADS // case.get("gqa", 1)

    def rand(*shape):
        return torch.randn(*shape, dtype=DTYPE, generator=gen)

    q_batch, kv_batch = case.get("q_batch", N), case.get("kv_batch", N)
    primals = [rand(q_batch, HEADS, L, E), rand(kv_batch, kv_heads, source, E),
               rand(kv_batch, kv_heads, source, 5)]
    tangents = [torch.randn_like(p) for p in primals]
    mask = _masks(gen)[case["mask"]] if "mask" in case else None
    mask_tangent = rand(*mask.shape) if case.get("mask_tangent") else None
    kwargs = {"is_causal": case.get("is_causal", False), "scale": case.get("scale"),
              "enable_gqa": "gqa" in case}
    return primals, tangents, mask, mask_tangent, kwargs


def _attention_jvp(primals, tangents, mask, mask_tangent, kwargs, rules: bool):
    with fwAD.dual_level(), sdpa_kernel([SDPBackend.MATH]):
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
        if mask is not None and mask_tangent is not None:
            mask = fwAD.make_dual(mask, mask_tangent)
        if rules:
            with ForwardRules():
                out = F.scaled_dot_product_attention(*duals, attn_mask=mask, **kwargs)
        else:
            out = F.scaled_dot_product_attention(*duals, attn_mask=mask, **kwargs)
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


@pytest.mark.parametrize("name", list(CASES))
def test_attention_rule_matches_pytorch_forward_mode(name, monkeypatch):
    calls = []
    monkeypatch.setattr(forward_rules._Attention, "forward", _counting(calls))
    inputs = _inputs(CASES[name])
    out, tangent = _attention_jvp(*inputs, rules=True)
    ref_out, ref_tangent = _attention_jvp(*inputs, rules=False)
    assert bool(calls) == (name != "mask-wider-than-queries"), "the rule ran or did not"
    assert torch.isfinite(out).all() and torch.isfinite(tangent).all()
    assert rel_err(out, ref_out) <= RTOL_EXACT
    assert rel_err(tangent, ref_tangent) <= RTOL_EXACT


def _counting(calls: list):
    original = forward_rules._Attention.forward

    def forward(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    return staticmethod(forward)


def test_fully_masked_rows_are_zero_like_pytorch():
    """Negative control for the safe softmax: the masked row is really all-masked, so a plain
    softmax would give NaN there; both routes give 0."""
    primals, tangents, mask, _, kwargs = _inputs(CASES["bool-mask"])
    assert not mask[0, 0, 1].any()
    out, tangent = _attention_jvp(primals, tangents, mask, None, kwargs, rules=True)
    assert (out[0, :, 1] == 0).all() and (tangent[0, :, 1] == 0).all()


def test_other_calls_are_pytorch_unchanged(monkeypatch):
    """Dropout, and a mask together with ``is_causal`` (an error in PyTorch), go to PyTorch's
    function: same error, and the rule does not run."""
    calls = []
    monkeypatch.setattr(forward_rules._Attention, "forward", _counting(calls))
    primals, _, mask, _, _ = _inputs(CASES["float-mask"])
    with ForwardRules():
        with pytest.raises(RuntimeError) as ours:
            F.scaled_dot_product_attention(*primals, attn_mask=mask, is_causal=True)
        torch.manual_seed(0)
        dropped = F.scaled_dot_product_attention(*primals, dropout_p=0.5)
    with pytest.raises(RuntimeError) as theirs:
        F.scaled_dot_product_attention(*primals, attn_mask=mask, is_causal=True)
    torch.manual_seed(0)
    assert torch.equal(dropped, F.scaled_dot_product_attention(*primals, dropout_p=0.5))
    assert str(ours.value) == str(theirs.value)
    assert not calls


def test_rule_needs_no_math_kernel():
    """With the rule, forward-mode AD passes attention even where PyTorch would pick a fused
    kernel without forward-mode AD (the training forward's default)."""
    primals, tangents, _, _, kwargs = _inputs(CASES["causal"])
    with fwAD.dual_level(), ForwardRules():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
        out = F.scaled_dot_product_attention(*duals, **kwargs)
        assert fwAD.unpack_dual(out).tangent is not None


_C = torch.randn(1, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
BINARY_CASES = {  # x has a tangent, _C (broadcast) and the numbers have none
    "times-number": lambda x: x * 2.5,
    "number-times": lambda x: 3 * x,
    "plus-number": lambda x: x + 1.5,
    "number-plus": lambda x: 1 + x,
    "minus-number": lambda x: x - 2,
    "number-minus": lambda x: 2.0 - x,
    "over-number": lambda x: x / 3,
    "times-constant": lambda x: x * _C,
    "constant-times": lambda x: torch.mul(_C, x),
    "plus-constant": lambda x: x + _C,
    "constant-minus": lambda x: _C - x,
    "minus-constant": lambda x: x.sub(_C),
    "constant-times-float32": lambda x: x * _C.float(),  # promotes to float64 either way
    "both-tangents": lambda x: x * x[0] + x[1] - x,
    "gelu-tanh": lambda x: 0.5 * x * (1.0 + torch.tanh(0.79 * (x + 0.044715 * x ** 3))),
    "rotary": lambda x: x * _C.cos() + torch.cat([-x[:, 2:], x[:, :2]], -1) * _C.sin(),
    "keyword-alpha": lambda x: torch.add(x, _C, alpha=2.0),
}


@pytest.mark.parametrize("name", list(BINARY_CASES))
def test_binary_rules_match_pytorch_forward_mode(name):
    """Binary operations where one operand has no tangent: equal values (the same kernels)
    and tangents as PyTorch's own rules, in the same dtype."""
    fn = BINARY_CASES[name]
    gen = torch.Generator().manual_seed(6)
    x, t = (torch.randn(3, 4, dtype=DTYPE, generator=gen) for _ in range(2))

    def run(rules: bool):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, t)
            if rules:
                with ForwardRules():
                    return fwAD.unpack_dual(fn(dual))
            return fwAD.unpack_dual(fn(dual))

    (out, tangent), (ref_out, ref_tangent) = run(True), run(False)
    assert torch.equal(out, ref_out)
    assert tangent.dtype == ref_tangent.dtype and tangent.shape == ref_tangent.shape
    assert rel_err(tangent, ref_tangent) <= RTOL_EXACT


def test_binary_rules_skip_pytorch_zero_tangents(monkeypatch):
    """Negative control for what the rules are for: PyTorch's own rule for x·C with C
    without tangent goes through Python reference code (``torch._refs``), natgrad's does
    not."""
    import torch._refs as refs

    calls = []
    original = refs._maybe_broadcast
    monkeypatch.setattr(refs, "_maybe_broadcast",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(3, 4, dtype=DTYPE), torch.randn(3, 4, dtype=DTYPE))
        with ForwardRules():
            x * _C + 2.0 * x
        assert not calls
        x * _C
    assert calls
