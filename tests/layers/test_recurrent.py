"""nn.RNN / nn.GRU / nn.LSTM and their cells: Kronecker blocks for their input and recurrent
projections.

* While natgrad watches a recurrent layer, the module runs natgrad's unrolled forward: the
  same outputs and final states as PyTorch's fused kernel (float64), for every cell type,
  batch_first or not, one or two directions, two layers, with and without an initial state;
  packed sequences of several lengths too; PyTorch's forward comes back after, runs every
  call natgrad does not take over (unbatched inputs) or that records nothing, and runs a deep
  copy's calls.
* K-FAC's factors of every projection equal the definition (K-FAC-expand over time steps,
  over the steps that exist for packed sequences):
  A = (1/(N·T)) Σ āāᵀ over the steps' inputs, G = (1/N) Σₙ E_y[Σₜ δₜδₜᵀ], with each step's δₜ
  recovered from per-class gradients of PyTorch's own (fused) layer: X_y = Σₜ δₜ āₜᵀ.
* The quadratic model's Jacobian-vector products through a watched recurrent model take the
  stacked pass (one rule per layer and direction) and equal forward-mode AD through PyTorch's
  own fused layer.
* KFAC's and EKFAC's defaults train a tagger and a classifier built on each cell type with no
  fallback and no uncalled layer; an LSTM with proj_size falls back, with its reason.
* A run resumed from state_dict is bit-identical to an uninterrupted one.
* Cells (nn.RNNCell, GRUCell, LSTMCell) called once per step by the model's own loop: the same
  outputs as PyTorch's, natgrad's forward only while recording; each call is one step of both
  blocks (A, G against the definition as above); loops of each cell train.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import natgrad
from conftest import DTYPE, RTOL_EXACT, rel_err, train_losses
from natgrad.curvature.model import FunctionalModel, mark_unstacked, unstacked_reason
from natgrad.layers.capture import LayerCapture, find_layers

D, H, T, B, C = 5, 4, 4, 3, 3
KINDS = {"rnn-tanh": ("RNN", {}), "rnn-relu": ("RNN", {"nonlinearity": "relu"}),
         "gru": ("GRU", {}), "lstm": ("LSTM", {})}


def _factory(type_name, options):
    return lambda **kw: getattr(nn, type_name)(D, H, **options, **kw)


CELLS = {name: _factory(type_name, options) for name, (type_name, options) in KINDS.items()}
# the cells of the same kinds ("gru-cell": nn.GRUCell), called once per step
CELL_MODULES = {f"{name}-cell": _factory(f"{type_name}Cell", options)
                for name, (type_name, options) in KINDS.items()}


class Classifier(nn.Module):
    """A recurrent layer (from a fixed random initial state, or zeros), then a linear head on
    the last step's output: logits ``[B, C]``."""

    def __init__(self, cell: str, bidirectional: bool = False, bias: bool = True,
                 initial: bool = False) -> None:
        super().__init__()
        self.rnn = CELLS[cell](batch_first=True, bidirectional=bidirectional, bias=bias)
        self.head = nn.Linear(H * (2 if bidirectional else 1), C)
        self.initial = _initial_state(self.rnn, 1) if initial else None

    def forward(self, x):
        hx = None
        if self.initial is not None:
            hx = tuple(s.expand(-1, x.shape[0], -1) for s in self.initial) if isinstance(
                self.initial, tuple) else self.initial.expand(-1, x.shape[0], -1)
        return self.head(self.rnn(x, hx)[0][:, -1])


def _initial_state(rnn, batch, seed=2):
    gen = torch.Generator().manual_seed(seed)
    shape = (rnn.num_layers * (2 if rnn.bidirectional else 1), batch, H)
    h0 = torch.randn(*shape, dtype=DTYPE, generator=gen)
    return (h0, torch.randn(*shape, dtype=DTYPE, generator=gen)) if isinstance(
        rnn, nn.LSTM) else h0


def _max_diff(a, b):
    if isinstance(a, tuple):
        return max(_max_diff(x, y) for x, y in zip(a, b, strict=True))
    return float(
        ((a - b).abs().max() / b.abs().max()).detach())


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_natgrads_forward_equals_pytorchs(cell, batch_first, bidirectional):
    torch.manual_seed(0)
    rnn = CELLS[cell](num_layers=2, batch_first=batch_first, bidirectional=bidirectional,
                      dropout=0.0).to(DTYPE)
    model = nn.Sequential(rnn)  # the capture watches a model; its output is not used here
    x = torch.randn(B, T, D, dtype=DTYPE)
    x = x if batch_first else x.transpose(0, 1)
    hx = _initial_state(rnn, B)
    expected = [rnn(x), rnn(x, hx)]
    layers = find_layers(model)
    assert layers.fallback == {}
    suffixes = ("", "_reverse") if bidirectional else ("",)
    assert set(layers.handlers) == {f"0.{k}_l{i}{s}" for k in ("ih", "hh") for i in (0, 1)
                                    for s in suffixes}
    with LayerCapture(model, layers.handlers):
        assert "forward" in rnn.__dict__  # natgrad's forward runs
        got = [rnn(x), rnn(x, hx)]
    assert "forward" not in rnn.__dict__
    for g, e in zip(got, expected, strict=True):
        assert _max_diff(g[0], e[0]) <= RTOL_EXACT
        assert _max_diff(g[1], e[1]) <= RTOL_EXACT


def test_calls_that_record_nothing_run_pytorchs_kernel(monkeypatch):
    """Between statistics steps, without gradients and while natgrad evaluates the loss
    itself, the layer runs PyTorch's fused forward (the same outputs)."""
    torch.manual_seed(0)
    model = Classifier("lstm", bidirectional=True).to(DTYPE)
    x = torch.randn(B, T, D, dtype=DTYPE)
    expected = model(x)
    kernels = _spy_on_pytorchs_forward(model.rnn, monkeypatch)
    with LayerCapture(model, find_layers(model).handlers) as capture:
        assert rel_err(model(x), expected) <= RTOL_EXACT and not kernels  # recording: unrolled
        capture.gathering = False
        assert rel_err(model(x), expected) <= RTOL_EXACT
        capture.gathering = True
        with torch.no_grad():
            model(x)
        with capture.paused():
            model(x)
    assert len(kernels) == 3


def _spy_on_pytorchs_forward(rnn, monkeypatch):
    """The list that each call of PyTorch's own forward of ``rnn``'s class appends to."""
    calls, original = [], type(rnn).forward
    monkeypatch.setattr(type(rnn), "forward",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_natgrads_forward_of_packed_sequences_equals_pytorchs(cell, bidirectional, monkeypatch):
    """Unsorted lengths, two layers, with and without an initial state: the packed output
    (data, batch sizes, sort order) and the final states."""
    torch.manual_seed(0)
    rnn = CELLS[cell](num_layers=2, batch_first=True, bidirectional=bidirectional).to(DTYPE)
    model = nn.Sequential(rnn)
    x = torch.randn(B, T + 2, D, dtype=DTYPE)
    packed = pack_padded_sequence(x, [4, 6, 2], batch_first=True, enforce_sorted=False)
    hx = _initial_state(rnn, B)
    expected = [rnn(packed), rnn(packed, hx)]
    kernels = _spy_on_pytorchs_forward(rnn, monkeypatch)
    with LayerCapture(model, find_layers(model).handlers):
        got = [rnn(packed), rnn(packed, hx)]
    assert not kernels
    for (out, final), (out_e, final_e) in zip(got, expected, strict=True):
        assert rel_err(out.data, out_e.data) <= RTOL_EXACT
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            assert torch.equal(getattr(out, field), getattr(out_e, field))
        assert _max_diff(final, final_e) <= RTOL_EXACT


def test_each_projection_is_reported_once_per_forward_and_once_per_step():
    torch.manual_seed(0)
    model = Classifier("gru", bidirectional=True).to(DTYPE)
    x = torch.randn(B, T, D, dtype=DTYPE)
    with LayerCapture(model, find_layers(model).handlers) as capture:
        model(x)
        calls = capture.records[-1].calls
    assert {n: len(c) for n, c in calls.items()} == {
        "rnn.ih_l0": 1, "rnn.hh_l0": T, "rnn.ih_l0_reverse": 1, "rnn.hh_l0_reverse": T,
        "head": 1,
    }
    assert calls["rnn.ih_l0"][0].inputs.shape == (B, T, D)
    assert calls["rnn.hh_l0"][0].inputs.norm() == 0  # h₀ = 0: the first step's input
    assert [tuple(c.inputs.shape) for c in calls["rnn.hh_l0"]] == [(B, H)] * T


def test_calls_natgrad_does_not_take_over_run_pytorchs_forward_and_are_named():
    torch.manual_seed(0)
    model = Classifier("lstm").to(DTYPE)
    model.forward = lambda x: model.head(torch.stack(  # unbatched inputs, one per sequence
        [model.rnn(sequence)[0][-1] for sequence in x]))
    x = torch.randn(B, T, D, dtype=DTYPE)
    expected = model(x)
    opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss(), stat_every=1)
    assert rel_err(model(x), expected) <= RTOL_EXACT
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.zeros(B, dtype=torch.long)).backward()
        opt.step()
    messages = [str(r.message) for r in records if issubclass(r.category, RuntimeWarning)]
    assert messages == ["these layers were not called in the model's forward, their parameters "
                        "take plain gradient steps until they are: rnn.hh_l0, rnn.ih_l0"]


def test_a_copy_of_a_watched_recurrent_layer_runs_pytorchs_forward_and_reports_nothing():
    torch.manual_seed(0)
    model = Classifier("gru").to(DTYPE)
    x = torch.randn(B, T, D, dtype=DTYPE)
    with LayerCapture(model, find_layers(model).handlers) as capture:
        twin = copy.deepcopy(model)
        assert rel_err(twin(x), model(x)) <= RTOL_EXACT
        assert len(capture.records) == 1 and set(capture.records[0].calls) >= {"rnn.ih_l0"}


def test_an_lstm_with_proj_size_falls_back_with_its_reason():
    model = nn.Sequential(nn.LSTM(D, H, proj_size=2))
    layers = find_layers(model)
    assert layers.handlers == {}
    assert set(layers.fallback.values()) == {"LSTM with proj_size"}


# --- the factors against the definition ---------------------------------------------------------
def _step_inputs(model, x):
    """Block name → the rows ā of its steps for one sample, ``[T, d(+1)]``, from PyTorch's own
    layer: the input projection's xₜ, the recurrent projection's hₜ₋₁ (hₜ₊₁ in reverse)."""
    rnn = model.rnn
    initial = model.initial[0] if isinstance(model.initial, tuple) else model.initial
    out = rnn(x, model.initial)[0][0].detach()  # [T, H·directions]
    rows = {}
    for index, suffix in enumerate(("", "_reverse") if rnn.bidirectional else ("",)):
        first = torch.zeros(1, H, dtype=DTYPE) if initial is None else initial[index]
        states = (torch.cat([out[1:, H:], first]) if suffix else torch.cat([first, out[:-1, :H]]))
        rows[f"rnn.ih_l0{suffix}"] = x[0]
        rows[f"rnn.hh_l0{suffix}"] = states
    if rnn.bias:
        ones = torch.ones(x.shape[1], 1, dtype=DTYPE)
        rows = {n: torch.cat([r, ones], 1) for n, r in rows.items()}
    return rows


def _add_definition(sums, module, rows, logp):
    """Add one sample's Σ āāᵀ and Σ_y p(y) Σₜ δₜδₜᵀ to ``sums[block]`` for every block in
    ``rows`` (its steps' āₜ, ``[T, d(+1)]``): X_y = [∇W | ∇b] of log p(y) (autograd on
    ``module``'s ``weight_<key>``, ``bias_<key>``) must have the form Σₜ δₜāₜᵀ, and with
    independent āₜ the δₜ follow."""
    probs = logp.exp().detach()
    for name, rows_in in rows.items():
        key = name.split(".")[1]
        params = [getattr(module, f"weight_{key}")]
        if module.bias:
            params.append(getattr(module, f"bias_{key}"))
        solve = rows_in.T @ torch.linalg.inv(rows_in @ rows_in.T)  # X = Σₜ δₜāₜᵀ → [δₜ]
        entry = sums.setdefault(name, [0, 0])
        entry[0] = entry[0] + rows_in.T @ rows_in
        for y in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[y], params, retain_graph=True)
            X = torch.cat([grads[0], grads[1].unsqueeze(1)], 1) if module.bias else grads[0]
            deltas = X @ solve  # [g·H, T]
            assert rel_err(deltas @ rows_in, X) <= RTOL_EXACT, name  # the K-FAC form
            entry[1] = entry[1] + probs[y] * deltas @ deltas.T


@pytest.mark.parametrize("cell,bidirectional,bias,initial", [
    ("rnn-tanh", True, True, False), ("rnn-relu", False, True, False),
    ("gru", True, True, False), ("gru", True, False, True), ("lstm", True, True, True),
    ("lstm", False, True, False),
])
def test_kfac_factors_of_every_projection_equal_the_definition(cell, bidirectional, bias,
                                                               initial):
    """Per sample, X_y = [∇W | ∇b] of log p(y) from PyTorch's fused layer has the form
    Σₜ δₜāₜᵀ; with independent āₜ the δₜ follow, and A, G are checked against them (without
    a bias the first step's input must not be zero: a random initial state)."""
    torch.manual_seed(3)
    model = Classifier(cell, bidirectional, bias, initial).to(DTYPE)
    if cell == "rnn-relu":  # no all-zero state (its row would repeat h₀'s)
        model.rnn.bias_ih_l0.data.add_(1.0)
    x = torch.randn(2, T, D, dtype=DTYPE)
    factors = natgrad.kfac_factors(model, x, likelihood="categorical")
    names = set(_step_inputs(model, x[:1]))
    assert set(factors) == names | {"head"}
    expected: dict[str, list] = {}  # Σ āāᵀ, Σ E_y[Σ δδᵀ]
    for sample in range(x.shape[0]):
        xs = x[sample:sample + 1]
        _add_definition(expected, model.rnn, _step_inputs(model, xs), model(xs)[0].log_softmax(-1))
    for name in names:
        A, G = factors[name]
        assert expected[name][1].norm() > 0
        assert rel_err(A, expected[name][0] / (x.shape[0] * T)) <= RTOL_EXACT, name
        assert rel_err(G, expected[name][1] / x.shape[0]) <= RTOL_EXACT, name


class PackedClassifier(nn.Module):
    """Sequences of ``lengths`` packed into a recurrent layer, a linear head on the final
    states (both directions): logits ``[B, C]``."""

    def __init__(self, cell: str, bidirectional: bool, lengths: list[int]) -> None:
        super().__init__()
        self.rnn = CELLS[cell](batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(H * (2 if bidirectional else 1), C)
        self.lengths, self.initial = lengths, None

    def forward(self, x):
        packed = pack_padded_sequence(x, self.lengths, batch_first=True, enforce_sorted=False)
        final = self.rnn(packed)[1]
        final = final[0] if isinstance(final, tuple) else final  # [directions, B, H]
        return self.head(final.transpose(0, 1).flatten(1))


@pytest.mark.parametrize("cell,bidirectional", [("gru", True), ("lstm", True),
                                                ("rnn-tanh", False)])
def test_kfac_factors_of_packed_sequences_equal_the_definition(cell, bidirectional):
    """Sequences of lengths 4, 2 and 3: A over the steps that exist, G over the samples; the
    per-step δ recovered as above from PyTorch's layer run on each sequence alone."""
    torch.manual_seed(5)
    lengths = [4, 2, 3]
    model = PackedClassifier(cell, bidirectional, lengths).to(DTYPE)
    x = torch.randn(3, T, D, dtype=DTYPE)
    factors = natgrad.kfac_factors(model, x, likelihood="categorical")
    expected: dict[str, list] = {}
    for sample, length in enumerate(lengths):
        xs = x[sample:sample + 1, :length]
        model.lengths = [length]
        _add_definition(expected, model.rnn, _step_inputs(model, xs), model(xs)[0].log_softmax(-1))
    assert set(factors) == set(expected) | {"head"}
    for name, (sum_a, sum_g) in expected.items():
        A, G = factors[name]
        assert rel_err(A, sum_a / sum(lengths)) <= RTOL_EXACT, name
        assert rel_err(G, sum_g / len(lengths)) <= RTOL_EXACT, name


# --- the optimizers train -----------------------------------------------------------------------
class Tagger(nn.Module):
    """Tokens → Embedding → a two-layer bidirectional recurrent layer (dropout between) →
    logits per token ``[B, T, V]``."""

    def __init__(self, cell: str, vocab: int = 7, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, D)
        self.rnn = CELLS[cell](num_layers=2, bidirectional=True, batch_first=True,
                               dropout=dropout)
        self.head = nn.Linear(2 * H, vocab)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])


# --- the quadratic model's products -------------------------------------------------------------
@pytest.mark.parametrize("model_kind", ["tagger", "packed", "cell-loop"])
@pytest.mark.parametrize("route", ["stacked", "forward-mode"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_products_through_a_watched_layer(cell, route, model_kind, monkeypatch):
    """Stacked (one rule per layer and direction) or, for a model the stacked pass does not
    take, by forward-mode AD through the unrolled recurrence; both against forward-mode AD
    through PyTorch's own layer. Packed: sequences of lengths 4, 2, 3 (the final states); a
    cell loop: the cell of the same kind called once per step."""
    torch.manual_seed(1)
    inputs = torch.randn(3, T, D, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    if model_kind == "packed":
        model = PackedClassifier(cell, True, [4, 2, 3]).to(DTYPE)
    elif model_kind == "cell-loop":
        model = CellLoop(cell + "-cell").to(DTYPE)
    else:
        model = Tagger(cell, dropout=0.0).to(DTYPE)
        inputs = torch.randint(7, (3, T), generator=torch.Generator().manual_seed(2))
    tokens = inputs
    fused = copy.deepcopy(model)  # not watched: PyTorch's kernel
    gen = torch.Generator().manual_seed(3)
    with LayerCapture(model, find_layers(model).handlers):
        fmodel = FunctionalModel(model)
        tangents = [[torch.randn(p.shape, dtype=DTYPE, generator=gen) for p in fmodel.params]
                    for _ in range(2)]
        layer = model.cell if model_kind == "cell-loop" else model.rnn
        kernels = _spy_on_pytorchs_forward(layer, monkeypatch)
        if route == "forward-mode":
            mark_unstacked(model, "the test asks for forward-mode AD")
        outputs, products = fmodel.jvp((tokens,), tangents)
        monkeypatch.undo()
    assert not kernels  # the unrolled recurrence
    assert (unstacked_reason(model) is None) == (route == "stacked")
    names = [n for n, p in fused.named_parameters()]

    def function(*params):
        return torch.func.functional_call(fused, dict(zip(names, params, strict=True)),
                                          (tokens,))

    params = tuple(p.detach() for p in fused.parameters())
    assert rel_err(outputs, function(*params)) <= RTOL_EXACT
    for tangent, product in zip(tangents, products, strict=True):
        expected = torch.autograd.functional.jvp(function, params, tuple(tangent))[1]
        assert rel_err(product, expected) <= RTOL_EXACT


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
def test_packed_sequences_train(optimizer):
    torch.manual_seed(0)
    model = PackedClassifier("lstm", True, [6, 2, 5, 3, 6, 1]).to(DTYPE)
    x = torch.randn(6, 6, D, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback, no uncalled layer
        opt = getattr(natgrad, optimizer)(model, loss=nn.CrossEntropyLoss(), stat_every=1)
        losses = train_losses(opt, model, x, torch.arange(6) % C, 10)
    assert opt.fallback == [] and all(b.refreshed for b in opt.blocks.values())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_recurrent_models_get_blocks_and_train(optimizer, cell):
    torch.manual_seed(0)
    model = Tagger(cell).to(DTYPE)
    tokens = torch.randint(7, (4, 2 * T), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback, no uncalled layer
        opt = getattr(natgrad, optimizer)(model, loss=nn.CrossEntropyLoss(), stat_every=1)
        losses = train_losses(opt, model, tokens, torch.roll(tokens, -1, 1), 10)
    assert opt.fallback == []
    rnn_blocks = [n for n in opt.blocks if n.startswith("rnn.")]
    assert len(rnn_blocks) == 8 and all(opt.blocks[n].refreshed for n in rnn_blocks)
    assert losses[-1] < 0.7 * losses[0], losses


# --- cells: one step per call, the user's loop over time ----------------------------------------
class CellLoop(nn.Module):
    """A cell applied step by step by a loop in forward (a decoder's pattern), from zeros; a
    linear head on the last state: logits ``[B, C]``."""

    def __init__(self, cell: str, bias: bool = True) -> None:
        super().__init__()
        self.cell = CELL_MODULES[cell](bias=bias)
        self.head = nn.Linear(H, C)

    def states(self, x):
        """h after each step, ``[B, T, H]``."""
        state, hs = None, []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            hs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(hs, 1)

    def forward(self, x):
        return self.head(self.states(x)[:, -1])


@pytest.mark.parametrize("cell", list(CELL_MODULES))
def test_natgrads_cell_forward_equals_pytorchs(cell, monkeypatch):
    torch.manual_seed(0)
    model = CellLoop(cell).to(DTYPE)
    x = torch.randn(B, T, D, dtype=DTYPE)
    h = torch.randn(B, H, dtype=DTYPE)
    hx = (h, -h) if cell == "lstm-cell" else h
    expected = [model.states(x), model.cell(x[:, 0], hx)]
    layers = find_layers(model)
    assert set(layers.handlers) == {"cell.ih", "cell.hh", "head"} and layers.fallback == {}
    kernels = _spy_on_pytorchs_forward(model.cell, monkeypatch)
    with LayerCapture(model, layers.handlers) as capture:
        got = [model.states(x), model.cell(x[:, 0], hx)]
        assert not kernels  # recording: natgrad's forward
        with capture.paused():
            model.cell(x[:, 0], hx)
        assert len(kernels) == 1
        model.cell(x[0, 0], h[0] if cell != "lstm-cell" else (h[0], h[0]))  # unbatched
        assert len(kernels) == 2
    for g, e in zip(got, expected, strict=True):
        assert _max_diff(g, e) <= RTOL_EXACT


@pytest.mark.parametrize("cell,bias", [("gru-cell", True), ("lstm-cell", True),
                                       ("rnn-tanh-cell", True)])
def test_kfac_factors_of_a_cell_loop_equal_the_definition(cell, bias):
    """Each call is a step of both blocks: A over the calls' inputs, G over their δ's, per
    sample recovered from the per-class gradients of PyTorch's own cell (X = Σₜ δₜāₜᵀ)."""
    torch.manual_seed(4)
    model = CellLoop(cell, bias).to(DTYPE)
    x = torch.randn(2, T, D, dtype=DTYPE)
    factors = natgrad.kfac_factors(model, x, likelihood="categorical")
    assert set(factors) == {"cell.ih", "cell.hh", "head"}
    sums: dict[str, list] = {}
    ones = torch.ones(T, 1, dtype=DTYPE)
    for sample in range(x.shape[0]):
        xs = x[sample:sample + 1]
        states = model.states(xs)[0].detach()  # PyTorch's cell (nothing watches it here)
        rows = {"cell.ih": torch.cat([xs[0], ones], 1),
                "cell.hh": torch.cat([torch.cat([torch.zeros(1, H, dtype=DTYPE),
                                                 states[:-1]]), ones], 1)}
        _add_definition(sums, model.cell, rows, model(xs)[0].log_softmax(-1))
    assert set(sums) == {"cell.ih", "cell.hh"}
    for name, (sum_a, sum_g) in sums.items():
        A, G = factors[name]
        assert rel_err(A, sum_a / (x.shape[0] * T)) <= RTOL_EXACT, name
        assert rel_err(G, sum_g / x.shape[0]) <= RTOL_EXACT, name


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("cell", list(CELL_MODULES))
def test_cell_loops_get_blocks_and_train(optimizer, cell, monkeypatch):
    torch.manual_seed(0)
    model = CellLoop(cell).to(DTYPE)
    x = torch.randn(8, T, D, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback, no uncalled layer
        opt = getattr(natgrad, optimizer)(model, loss=nn.CrossEntropyLoss(), stat_every=1)
        losses = train_losses(opt, model, x, torch.arange(8) % C, 10)
    assert opt.fallback == [] and all(b.refreshed for b in opt.blocks.values())
    assert unstacked_reason(model) is None  # the products took the stacked pass
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
def test_a_resumed_run_is_bit_identical(optimizer):
    """12 steps in one go against 5, state_dict through torch.save, and 7 more (statistics
    steps in the unrolled recurrence, the others in PyTorch's kernel, as in one run)."""
    batches = [torch.randint(7, (8, 10), generator=torch.Generator().manual_seed(i))
               for i in range(12)]

    def run(steps, state=None):
        torch.manual_seed(0)
        model = Tagger("lstm", dropout=0.0).to(DTYPE)
        opt = getattr(natgrad, optimizer)(model, loss=nn.CrossEntropyLoss())
        if state is not None:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        for tokens in steps:
            opt.zero_grad()
            logits = model(tokens)
            nn.functional.cross_entropy(logits.reshape(-1, 7), tokens.roll(-1, 1).reshape(-1)
                                        ).backward()
            opt.step()
        return model, opt

    whole, _ = run(batches)
    first, opt = run(batches[:5])
    buffer = io.BytesIO()
    torch.save((first.state_dict(), opt.state_dict()), buffer)
    buffer.seek(0)
    resumed, _ = run(batches[5:], torch.load(buffer, weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters(),
                                                 strict=True))
