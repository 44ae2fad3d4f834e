"""Layer handlers as the optimizers use them: normalisation layers' dense blocks against
per-sample brute force, the fallback for unsupported modules, and ``exclude``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import natgrad
from conftest import (
    DTYPE,
    MC_MANY,
    MC_RTOL_MANY,
    OUT,
    RTOL_EXACT,
    RTOL_STEP,
    brute_force_fisher,
    make_inputs,
    make_model,
    make_targets,
    mean_nll,
    reference_log_prob,
    rel_err,
    train_losses,
)

pytestmark = pytest.mark.usefixtures("single_thread")

OPTIMIZERS = {"KFAC": natgrad.KFAC, "EKFAC": natgrad.EKFAC}
DAMPING = 1e-2


def randomise(model: nn.Module, seed: int = 3) -> nn.Module:
    """Non-trivial affine parameters and running statistics (the defaults are 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                shape = module.running_mean.shape
                module.running_mean.copy_(0.3 * torch.randn(shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=gen))
    return model


def norm_problem(arch: str, training: bool = False):
    """(model, norm layer, inputs, targets) for a small model around one normalisation layer."""
    torch.manual_seed(0)
    if arch == "batchnorm1d":
        layers = [nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, OUT)]
        inputs = make_inputs("mlp")
    elif arch == "batchnorm2d":
        layers = [nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(),
                  nn.Linear(18, OUT)]
        inputs = make_inputs("cnn")
    elif arch == "layernorm":
        layers = [nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, OUT)]
        inputs = make_inputs("mlp")
    elif arch == "layernorm_seq":  # [N, T, d]: the parameters are shared over positions
        layers = [nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, OUT)]
        inputs = make_inputs("seq")
    elif arch == "groupnorm":
        layers = [nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                  nn.Linear(36, OUT)]
        inputs = make_inputs("cnn")
    else:  # pragma: no cover
        raise ValueError(arch)
    model = randomise(nn.Sequential(*layers).to(DTYPE))
    model.train(training)
    with torch.no_grad():
        targets = make_targets("categorical", model(inputs))
    return model, model[1], inputs, targets


def one_step(opt_type, model, inputs, targets, likelihood="categorical", **options):
    settings = dict(
        lr=1.0, damping=DAMPING, momentum=0.0, kl_clip=None, kind="empirical", stat_decay=0.0,
        inv_every=1, stat_every=1, likelihood=likelihood,
    )
    settings.update(options)
    opt = opt_type(model, **settings)
    opt.zero_grad()
    mean_nll(likelihood, model(inputs), targets).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    opt.step()
    return opt, grads


def per_sample_norm_grads(model, norm, inputs, targets) -> torch.Tensor:
    """gₙ = ∂ log p(yₙ | xₙ)/∂(γ, β), one forward and backward per sample (eval-mode models)."""
    rows = []
    for n in range(inputs.shape[0]):
        logp = reference_log_prob("categorical", model(inputs[n : n + 1])[0], targets[n])
        grads = torch.autograd.grad(logp, [norm.weight, norm.bias])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def batchnorm_train_grads(model, norm, inputs, targets) -> torch.Tensor:
    """Training-mode BatchNorm couples samples through the batch statistics, so no per-sample
    loop exists; the handler's claim is gₙ = [Σ δₙ ⊙ x̂ₙ, Σ δₙ] with x̂ from the batch
    statistics and δₙ = ∂ log p(yₙ)/∂(layer output)ₙ. Rebuilt by hand here."""
    seen = {}
    handle = norm.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), out=o))
    try:
        outputs = model(inputs)
    finally:
        handle.remove()
    logp = sum(
        reference_log_prob("categorical", outputs[n], targets[n]) for n in range(len(inputs))
    )
    (delta,) = torch.autograd.grad(logp, seen["out"], retain_graph=True)
    x = seen["x"]
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)  # biased, as BatchNorm normalises
    normalised = (x - mean) / torch.sqrt(var + norm.eps)
    flat = lambda t: t.reshape(t.shape[0], t.shape[1], -1).sum(2)  # noqa: E731
    rows = torch.cat([flat(delta * normalised), flat(delta)], dim=1)
    # the rows sum to the batch gradient, whatever the coupling: check against autograd
    total = torch.autograd.grad(logp, [norm.weight, norm.bias])
    assert rel_err(rows.sum(0), torch.cat(total)) <= RTOL_EXACT
    return rows


NORM_CASES = [
    ("batchnorm1d", False), ("batchnorm1d", True), ("batchnorm2d", False),
    ("batchnorm2d", True), ("layernorm", False), ("layernorm_seq", False), ("groupnorm", False),
]


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize(("arch", "training"), NORM_CASES)
def test_norm_fisher_block_matches_brute_force(arch, training, opt_name):
    model, norm, inputs, targets = norm_problem(arch, training)
    reference = copy.deepcopy(model)
    ref_norm = reference[1]
    if training:
        rows = batchnorm_train_grads(reference, ref_norm, inputs, targets)
    else:
        rows = per_sample_norm_grads(reference, ref_norm, inputs, targets)
    expected = rows.T @ rows / inputs.shape[0]
    opt, grads = one_step(OPTIMIZERS[opt_name], model, inputs, targets)
    state = opt.state[norm.weight]
    assert state["fisher_block"].shape == expected.shape
    assert rel_err(state["fisher_block"], expected) <= RTOL_EXACT
    # its update: −lr (F + λI)⁻¹ g on (γ, β)
    g = torch.cat([grads[norm.weight], grads[norm.bias]])
    step = -torch.linalg.solve(expected + DAMPING * torch.eye(len(g), dtype=DTYPE), g)
    change = torch.cat(
        [(p.detach() - r.detach()).reshape(-1) for p, r in
         zip((norm.weight, norm.bias), (ref_norm.weight, ref_norm.bias), strict=True)]
    )
    assert rel_err(change, step) <= RTOL_STEP
    assert "input_cov" not in state


# --- fallback -------------------------------------------------------------------------------
class Scale(nn.Module):
    """A learnable output scale: a raw parameter used in forward (no supported layer type)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, 1.0], dtype=DTYPE))

    def forward(self, x):
        return x * self.scale


class Deconv(nn.Module):
    """A transposed convolution written with ``F.conv_transpose2d`` on its own parameters (a
    layer type natgrad does not know)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 4, 3, 3) / 3)
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return torch.nn.functional.conv_transpose2d(x, self.weight, self.bias)


def fallback_problem():
    torch.manual_seed(0)
    model = nn.Sequential(
        Deconv(), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 7 * 7, OUT),
        Scale(),
    ).to(DTYPE)
    inputs = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    with torch.no_grad():
        targets = make_targets("categorical", model(inputs))
    return model, inputs, targets


def fallback_warnings(records) -> list[str]:
    return [str(w.message) for w in records if "diagonal-Fisher" in str(w.message)]


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_unsupported_layer_and_custom_parameter_use_fallback_with_one_warning(opt_name):
    model, inputs, targets = fallback_problem()
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        opt = OPTIMIZERS[opt_name](
            model, lr=0.1, damping=DAMPING, momentum=0.0, stat_every=1, likelihood="categorical"
        )
        for _ in range(3):
            opt.zero_grad()
            mean_nll("categorical", model(inputs), targets).backward()
            opt.step()
    messages = fallback_warnings(records)
    assert len(messages) == 1, messages
    assert len([w for w in records if issubclass(w.category, RuntimeWarning)]) == 1
    assert "0 (Deconv is not a supported layer type" in messages[0]
    assert "4 (Scale" in messages[0]
    assert "3 (" not in messages[0]  # the Linear layer has its own block
    assert list(opt.blocks) == ["3"]
    conv, scale = model[0], model[4].scale
    assert {id(p) for p in opt.fallback} == {id(conv.weight), id(conv.bias), id(scale)}
    for p in opt.fallback:
        assert opt.state[p]["fisher_diag"].shape == p.shape
    for p, old in zip(model.parameters(), before, strict=True):
        assert not torch.equal(p, old)


def test_other_unsupported_modules_are_named():
    torch.manual_seed(0)
    frozen = nn.Linear(3, 3)
    frozen.weight.requires_grad_(False)
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), frozen, nn.Linear(3, OUT)).to(DTYPE)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        opt = natgrad.KFAC(model, likelihood="categorical")
    (message,) = fallback_warnings(records)
    assert "0 (Embedding with sparse=True" in message
    assert "1 (Linear with its weight is frozen)" in message
    assert list(opt.blocks) == ["2"]


def test_fallback_update_is_diagonal_fisher_step_empirical():
    """kind="empirical": the per-sample gradients of a fallback parameter are not captured,
    so diag F is estimated as N ḡ² from the batch-mean gradient ḡ (the batch-summed gradient
    squared, over N), and Δ = ḡ / (diag F + λ); the step is −lr Δ."""
    model, inputs, targets = fallback_problem()
    before = model[4].scale.detach().clone()
    with pytest.warns(RuntimeWarning, match="diagonal-Fisher"):
        opt, grads = one_step(natgrad.KFAC, model, inputs, targets, lr=0.5)
    scale, n = model[4].scale, inputs.shape[0]
    g = grads[scale]
    assert rel_err(opt.state[scale]["fisher_diag"], n * g.square()) <= RTOL_EXACT
    expected = -0.5 * g / (n * g.square() + DAMPING)
    assert rel_err(scale.detach() - before, expected) <= RTOL_STEP


def test_fallback_diagonal_true_kind_estimates_diagonal_fisher():
    """kind="mc": diag F from sampled-label gradients converges to the exact diagonal."""
    model, inputs, targets = fallback_problem()
    exact = brute_force_fisher(model, inputs, "categorical").diagonal()
    with pytest.warns(RuntimeWarning, match="diagonal-Fisher"):
        opt, _ = one_step(
            natgrad.KFAC, model, inputs, targets, kind="mc", mc_samples=MC_MANY
        )
    offsets, start = {}, 0
    for p in model.parameters():
        offsets[id(p)] = (start, start + p.numel())
        start += p.numel()
    for p in opt.fallback:
        lo, hi = offsets[id(p)]
        err = rel_err(opt.state[p]["fisher_diag"].reshape(-1), exact[lo:hi])
        assert err <= MC_RTOL_MANY, err


# --- exclude --------------------------------------------------------------------------------
def excluded_step(model, inputs, targets, exclude, lr=0.3):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, grads = one_step(natgrad.KFAC, model, inputs, targets, lr=lr, exclude=exclude)
    named = dict(model.named_parameters())
    changes = {n: named[n].detach() - before[n] for n in named}
    plain = {n: -lr * grads[named[n]] for n in named}
    return opt, changes, plain


def test_exclude_by_name_gives_plain_gradient_step():
    model = make_model("mlp")
    inputs = make_inputs("mlp")
    with torch.no_grad():
        targets = make_targets("categorical", model(inputs))
    opt, changes, plain = excluded_step(model, inputs, targets, exclude=["2"])
    assert list(opt.blocks) == ["0"]
    assert "input_cov" not in opt.state[model[2].weight]
    for name in ("2.weight", "2.bias"):
        assert rel_err(changes[name], plain[name]) <= RTOL_STEP
    assert rel_err(changes["0.weight"], plain["0.weight"]) > 1e-3  # preconditioned


def test_exclude_by_type_and_by_container_name():
    model = make_model("cnn")
    inputs = make_inputs("cnn")
    with torch.no_grad():
        targets = make_targets("categorical", model(inputs))
    opt, changes, plain = excluded_step(copy.deepcopy(model), inputs, targets, [nn.Linear])
    assert list(opt.blocks) == ["0"]
    for name in ("3.weight", "3.bias"):
        assert rel_err(changes[name], plain[name]) <= RTOL_STEP
    assert rel_err(changes["0.weight"], plain["0.weight"]) > 1e-3

    torch.manual_seed(0)
    nested = nn.Sequential(
        nn.Linear(4, 5), nn.Sequential(nn.Tanh(), nn.Linear(5, 5)), nn.Tanh(), nn.Linear(5, OUT)
    ).to(DTYPE)
    with torch.no_grad():
        targets = make_targets("categorical", nested(make_inputs("mlp")))
    opt, changes, plain = excluded_step(nested, make_inputs("mlp"), targets, ["1"])
    assert list(opt.blocks) == ["0", "3"]
    for name in ("1.1.weight", "1.1.bias"):
        assert rel_err(changes[name], plain[name]) <= RTOL_STEP


def test_exclude_rejects_other_values():
    with pytest.raises(TypeError, match="exclude"):
        natgrad.KFAC(make_model("mlp"), exclude=[3])


# --- parameters shared by modules, layers called functionally --------------------------------
class TiedLM(nn.Module):
    """Input embedding tied to the output head (GPT-2's tie)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_a_weight_shared_beyond_two_kronecker_layers_falls_back_with_a_warning():
    """Two Kronecker layers of one weight get a shared block (tests/curvature/test_tied.py);
    a weight a third layer uses too (or a use with a bias of its own) has no factored
    block: the diagonal Fisher, one warning naming the modules, and it trains."""
    from natgrad.layers.capture import find_layers

    class Thrice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.c.weight = self.a.weight

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model = Thrice().to(DTYPE)
    layers = find_layers(model)
    assert layers.shared == {} and set(layers.handlers) == set()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss(), stat_every=1)
    messages = [str(r.message) for r in records if issubclass(r.category, RuntimeWarning)]
    assert len(messages) == 1 and "a (Linear sharing a parameter with b, c (tied weights))" in (
        messages[0])
    losses = train_losses(opt, model, torch.randn(8, 4, dtype=DTYPE), torch.arange(8) % 4, 10)
    assert "fisher_diag" in opt.state[model.a.weight]
    assert losses[-1] < losses[0]


def test_a_layer_that_is_never_called_is_named_in_a_warning():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return nn.functional.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)

    model = Functional().to(DTYPE)
    opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss(), stat_every=1)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(5, 3, dtype=DTYPE)),
                                    torch.arange(5) % 2).backward()
        opt.step()
    messages = [str(r.message) for r in records if issubclass(r.category, RuntimeWarning)]
    assert messages == ["these layers were not called in the model's forward, their "
                        "parameters take plain gradient steps until they are: b"]


@pytest.mark.parametrize("layer", [nn.Linear(5, 3), nn.Conv1d(2, 3, 3)], ids=["linear", "conv1d"])
def test_a_model_that_is_one_layer_gets_its_statistics(layer):
    """The root module's name is "": its calls were dropped (no statistics, plain gradient
    steps and an empty "not called" warning)."""
    torch.manual_seed(0)
    model = copy.deepcopy(layer).to(DTYPE)
    x = torch.randn(6, *( (5,) if isinstance(layer, nn.Linear) else (2, 7)), dtype=DTYPE)
    opt = natgrad.KFAC(model, likelihood="gaussian", stat_every=1, inv_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):
            opt.zero_grad()
            model(x).square().sum().div(6).backward()
            opt.step()
    A, G = natgrad.kfac_factors(model, x, likelihood="gaussian")[""]
    state = next(s for s in opt.state.values() if isinstance(s, dict) and "input_cov" in s)
    assert state["input_cov"].shape == A.shape and state["grad_cov"].shape == G.shape
