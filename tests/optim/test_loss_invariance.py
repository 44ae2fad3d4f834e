"""The step does not depend on how the same loss is normalised (issue: the loss as users write it).

Every optimizer, with its automatic settings and with fixed ones, takes the same steps (float64,
several steps, ≤ ``RTOL_INVARIANT_STEPS``) for:
- torch's mean over every element (``nn.MSELoss()``, ``nn.BCEWithLogitsLoss()``) and the
  documented batch-mean sum (``likelihood=``), and the sum reductions;
- a token mean over ``[B, T, V]`` logits flattened to tokens and the sum over tokens averaged
  over sequences;
- positions with ``ignore_index`` and the same data without those positions;
- k micro-batches with ``loss / k`` and one ``step()``, and one step on the concatenated batch
  (exactly with ``kind="empirical"``; with sampled labels the categorical sampler's uniforms
  come from the generator in order, so the micro-batches draw the very labels of the
  concatenated batch and the steps are equal too).
The references are the same optimizers driven by differently written losses: each pair is
two routes to one step, so any scale natgrad gets wrong shows up as a difference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from conftest import DTYPE, MC_MANY, MC_RTOL_MANY, OUT, RTOL_EXACT, make_model, rel_err

pytestmark = pytest.mark.usefixtures("single_thread")

# Several automatic steps multiply rounding through the quadratic model and the LM
# damping; 1e-6 is the bound, observed differences are ~1e-13.
RTOL_INVARIANT_STEPS = 1e-6
STEPS = 4
B, T = 6, 3

_AUTO = dict(stat_every=1, inv_every=2, seed=0)
_FIXED = dict(lr=0.3, damping=1e-2, momentum=0.5, kl_clip=None, stat_every=1, inv_every=2,
              seed=0)
OPTIMIZERS = [
    pytest.param(lambda m, **k: natgrad.KFAC(m, **_AUTO, **k), id="KFAC-auto"),
    pytest.param(lambda m, **k: natgrad.KFAC(m, **_FIXED, **k), id="KFAC"),
    pytest.param(lambda m, **k: natgrad.KFAC(m, **_AUTO, kfac_approx="reduce", **k),
                 id="KFAC-reduce"),
    pytest.param(lambda m, **k: natgrad.EKFAC(m, **_AUTO, **k), id="EKFAC-auto"),
    pytest.param(lambda m, **k: natgrad.NGDCG(m, **_AUTO, **k), id="NGDCG"),
    pytest.param(lambda m, **k: natgrad.NaturalGradient(m, lr="auto", damping="auto",
                                                        momentum="auto", **k),
                 id="NaturalGradient-auto"),
]
KINDS = ["mc", "empirical"]


def _kind(factory, kind: str) -> dict:
    """NaturalGradient has no empirical kind (it never sees targets): 'mc' there too."""
    name = factory.__code__.co_names
    if "NaturalGradient" in name and kind == "empirical":
        return {"kind": "mc"}
    return {"kind": kind}


def run(factory: Callable, model: nn.Module, batches, loss_fn, micro: int = 1, **kw):
    """The unchanged loop (``micro`` micro-batches with loss / micro per step); parameters."""
    model = copy.deepcopy(model)
    opt = factory(model, **kw)
    for inputs, targets in batches:
        opt.zero_grad()
        for x, y in zip(inputs.chunk(micro), targets.chunk(micro), strict=True):
            (loss_fn(model(x), y) / micro).backward()
        opt.step()
    assert opt.state["natgrad"]["skipped_steps"] == 0
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def regression_batches(likelihood: str, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        x = torch.randn(B, 4, generator=gen, dtype=DTYPE)
        if likelihood == "gaussian":
            y = torch.randn(B, OUT, generator=gen, dtype=DTYPE)
        else:
            y = torch.bernoulli(torch.full((B, OUT), 0.4, dtype=DTYPE), generator=gen)
        out.append((x, y))
    return out


def sequence_batches(positions: int = T, seed: int = 3, ignore: int | None = None):
    """[B, positions, 4] inputs, [B, positions] labels; the last position ignored if asked."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        x = torch.randn(B, positions, 4, generator=gen, dtype=DTYPE)
        y = torch.randint(OUT, (B, positions), generator=gen)
        if ignore is not None:
            y[:, -1] = ignore
        out.append((x, y))
    return out


def half_sq(out, y):  # the documented gaussian loss: ½ Σ (f − y)² / N
    return 0.5 * (out - y).square().sum() / out.shape[0]


def bce_batch_mean(out, y):
    return F.binary_cross_entropy_with_logits(out, y, reduction="sum") / out.shape[0]


def token_mean(out, y, **kw):
    return F.cross_entropy(out.reshape(-1, OUT), y.reshape(-1), **kw)


def token_sum_over_sequences(out, y):
    return F.cross_entropy(out.reshape(-1, OUT), y.reshape(-1), reduction="sum") / out.shape[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("factory", OPTIMIZERS)
@pytest.mark.parametrize(
    "likelihood, module, functional, canonical",
    [
        ("gaussian", nn.MSELoss(), F.mse_loss, half_sq),
        ("gaussian", nn.MSELoss(reduction="sum"),
         lambda o, y: F.mse_loss(o, y, reduction="sum"), half_sq),
        ("bernoulli", nn.BCEWithLogitsLoss(), F.binary_cross_entropy_with_logits,
         bce_batch_mean),
        ("bernoulli", nn.BCEWithLogitsLoss(reduction="sum"),
         lambda o, y: F.binary_cross_entropy_with_logits(o, y, reduction="sum"),
         bce_batch_mean),
    ],
    ids=["mse-mean", "mse-sum", "bce-mean", "bce-sum"],
)
def test_elementwise_reductions_take_the_documented_step(
    factory, kind, likelihood, module, functional, canonical
):
    model = make_model("mlp", seed=4)
    batches = regression_batches(likelihood)
    kw = _kind(factory, kind)
    expected = run(factory, model, batches, canonical, likelihood=likelihood, **kw)
    got = run(factory, model, batches, functional, loss=module, **kw)
    assert rel_err(got, expected) <= RTOL_INVARIANT_STEPS
    assert rel_err(expected, torch.cat([p.reshape(-1) for p in model.parameters()])) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("factory", OPTIMIZERS)
def test_token_mean_takes_the_step_of_the_sum_over_tokens(factory, kind):
    model = make_model("seq", seed=4)
    batches = sequence_batches()
    kw = _kind(factory, kind)
    expected = run(factory, model, batches, token_sum_over_sequences,
                   likelihood="categorical", **kw)
    got = run(factory, model, batches, token_mean, loss=nn.CrossEntropyLoss(), **kw)
    assert rel_err(got, expected) <= RTOL_INVARIANT_STEPS
    summed = run(factory, model, batches,
                 lambda o, y: F.cross_entropy(o.reshape(-1, OUT), y.reshape(-1), reduction="sum"),
                 loss=nn.CrossEntropyLoss(reduction="sum"), **kw)
    assert rel_err(summed, expected) <= RTOL_INVARIANT_STEPS


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("factory", OPTIMIZERS)
def test_ignored_positions_count_nowhere(factory, kind, smoothing):
    """The model acts on each position alone, so the padded data's valid positions see the
    same outputs as the data without the padding: every statistic, sampled label, Fisher
    term and ρ must then be the same. The padded positions' inputs are random, not zero."""
    model = make_model("seq", seed=4)
    padded = sequence_batches(T, ignore=-100)
    trimmed = [(x[:, :-1], y[:, :-1]) for x, y in padded]
    loss = nn.CrossEntropyLoss(label_smoothing=smoothing)
    kw = _kind(factory, kind)

    def token_mean_smoothed(out, y):
        return token_mean(out, y, label_smoothing=smoothing)

    expected = run(factory, model, trimmed, token_mean_smoothed, loss=loss, **kw)
    got = run(factory, model, padded, token_mean_smoothed, loss=loss, **kw)
    assert rel_err(got, expected) <= RTOL_INVARIANT_STEPS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("factory", OPTIMIZERS)
@pytest.mark.parametrize("micro", [2, 3])
def test_gradient_accumulation_takes_the_concatenated_batch_step(factory, kind, micro):
    model = make_model("seq", seed=4)
    batches = sequence_batches()
    kw = _kind(factory, kind)
    loss = nn.CrossEntropyLoss()
    expected = run(factory, model, batches, token_mean, loss=loss, **kw)
    got = run(factory, model, batches, token_mean, micro=micro, loss=loss, **kw)
    assert rel_err(got, expected) <= RTOL_INVARIANT_STEPS


def test_gradient_accumulation_of_the_elementwise_mean_empirical():
    model = make_model("mlp", seed=4)
    batches = regression_batches("gaussian")
    factory = OPTIMIZERS[0].values[0]
    kw = dict(loss=nn.MSELoss(), kind="empirical")
    expected = run(factory, model, batches, F.mse_loss, **kw)
    got = run(factory, model, batches, F.mse_loss, micro=2, **kw)
    assert rel_err(got, expected) <= RTOL_INVARIANT_STEPS


def test_gradient_accumulation_with_sampled_gaussian_labels_in_distribution():
    """Gaussian draws of two micro-batches are not those of the whole batch (torch's randn
    fills pairs): the statistics agree in distribution. With MC_MANY draws per input the
    output-gradient factors agree to Monte-Carlo precision, the input factors exactly."""
    model = make_model("mlp", seed=4)
    x, y = regression_batches("gaussian")[0]
    factors = []
    for micro in (1, 2):
        m = copy.deepcopy(model)
        opt = natgrad.KFAC(m, loss=nn.MSELoss(), mc_samples=MC_MANY, lr=0.1, damping=1e-2,
                           momentum=0.0, kl_clip=None, stat_every=1, seed=micro)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (F.mse_loss(m(xs), ys) / micro).backward()
        opt.step()
        factors.append([(opt.state[m[i].weight]["input_cov"], opt.state[m[i].weight]["grad_cov"])
                        for i in (0, 2)])
    for (a1, g1), (a2, g2) in zip(*factors, strict=True):
        assert rel_err(a2, a1) <= RTOL_EXACT
        assert rel_err(g2, g1) <= MC_RTOL_MANY
        assert rel_err(g2, g1) > 0  # the draws did differ: this is not the exact case


def test_the_wrong_normalisation_is_not_the_same_step():
    """Negative control: telling natgrad the loss is the batch-mean sum while the loop
    takes torch's mean over elements gives a different step."""
    model = make_model("mlp", seed=4)
    batches = regression_batches("gaussian")
    factory = OPTIMIZERS[0].values[0]
    right = run(factory, model, batches, F.mse_loss, loss=nn.MSELoss())
    wrong = run(factory, model, batches, F.mse_loss, likelihood="gaussian")
    assert rel_err(wrong, right) > 1e-3
