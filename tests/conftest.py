"""Shared float64 set-up for natgrad's tests: tolerances, random models, brute-force references.

Every reference here is computed by a *different route* than the library: per-sample loops
with ordinary autograd on ``torch.distributions`` log-likelihoods, explicit enumeration of
all outcomes (categorical classes, Bernoulli bit patterns) or Gaussian sigma points, and
``torch.autograd.functional.jacobian`` of the full-batch outputs for the Gauss–Newton form.
Nothing here calls into natgrad.

Tolerances are set once here. Any looser than ``RTOL_EXACT`` carries a comment saying why.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

DTYPE = torch.float64

# --- tolerances -------------------------------------------------------------------------------
# Exact identities computed by two different float64 routes (relative Frobenius error).
RTOL_EXACT = 1e-10
# PSD: the smallest eigenvalue may dip below zero by rounding, relative to the largest.
PSD_RTOL = 1e-12
# Looser: the invariance check solves with F (condition number up to ~1e5 on its range for
# the small MLP) and with A, so rounding is amplified by cond(F)·cond(A)² (≈3e-12 observed).
RTOL_INVARIANT = 1e-8
# Eigenvalues of F below this fraction of the largest count as its null space (the logit
# shift of the categorical likelihood); the rest span its range.
RANGE_RTOL = 1e-9

# Statistical tolerances (fixed seeds, so the tests are deterministic).
MC_SEED = 1234
MC_FEW = 1
MC_MANY = 400
# Looser: a Monte-Carlo estimate with 400 draws per input has relative error ~ 1/√400 times
# a model-dependent constant (≈0.05 observed on the test models); 0.15 leaves room for it.
MC_RTOL_MANY = 0.15
# The error must shrink by at least this factor from MC_FEW to MC_MANY draws (√400 = 20
# expected).
MC_MIN_SHRINK = 5.0
# Sampling checks: the empirical mean must be within this many standard errors.
SAMPLE_DRAWS = 20_000
SAMPLE_Z = 5.0
# The empirical Fisher must differ from the true one by at least this relative amount.
EMPIRICAL_MIN_REL_DIFF = 0.05
# KL / (½ ε² dᵀ F d) − 1 at the smallest ε (the gap is O(ε)).
KL_EPSILONS = (1e-1, 1e-2, 1e-3)
KL_RTOL_SMALLEST = 1e-2

# --- problems ---------------------------------------------------------------------------------
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")
ARCHS = ("mlp", "mlp_nobias", "cnn", "seq")
BATCH = 6
OUT = 3  # classes / output dimensions per position
POSITIONS = 2  # positions per sample in the "seq" problem


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A small random float64 model; ``seq`` maps ``[N, T, 4]`` to ``[N, T, OUT]``."""
    torch.manual_seed(seed)
    if arch in ("mlp", "seq"):
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, OUT))
    elif arch == "mlp_nobias":
        model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, OUT, bias=False))
    elif arch == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 2, kernel_size=3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, OUT)
        )
    else:  # pragma: no cover - test table typo
        raise ValueError(arch)
    model = model.to(DTYPE)
    with torch.no_grad():  # larger weights so that predictive distributions are far from uniform
        for p in model.parameters():
            p.mul_(2.0)
    return model


def make_inputs(arch: str, n: int = BATCH, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = {"cnn": (n, 1, 5, 5), "seq": (n, POSITIONS, 4)}.get(arch, (n, 4))
    return torch.randn(shape, generator=gen, dtype=DTYPE)


def make_targets(likelihood: str, outputs: Tensor, seed: int = 2) -> Tensor:
    """Observed labels in the likelihood's convention, independent of the model."""
    gen = torch.Generator().manual_seed(seed)
    if likelihood == "categorical":
        return torch.randint(0, outputs.shape[-1], outputs.shape[:-1], generator=gen)
    if likelihood == "gaussian":
        return torch.randn(outputs.shape, generator=gen, dtype=outputs.dtype)
    return torch.randint(0, 2, outputs.shape, generator=gen).to(outputs.dtype)


def make_problem(arch: str, likelihood: str) -> tuple[nn.Module, Tensor, Tensor]:
    """(model, inputs, targets) for one row of the test table."""
    model = make_model(arch)
    inputs = make_inputs(arch)
    with torch.no_grad():
        targets = make_targets(likelihood, model(inputs))
    return model, inputs, targets


# --- reference pieces (no natgrad) ------------------------------------------------------------
def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ (Frobenius)."""
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


def distribution(likelihood: str, outputs: Tensor) -> torch.distributions.Distribution:
    """``torch.distributions`` object matching natgrad's convention for ``outputs``."""
    if likelihood == "categorical":
        return torch.distributions.Categorical(logits=outputs)
    if likelihood == "gaussian":
        return torch.distributions.Normal(outputs, torch.ones_like(outputs))
    if likelihood == "bernoulli":
        return torch.distributions.Bernoulli(logits=outputs)
    raise ValueError(likelihood)  # pragma: no cover


def reference_log_prob(likelihood: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """log p(y | f) of one sample's outputs, summed over all positions (a scalar)."""
    return distribution(likelihood, outputs).log_prob(targets).sum()


def outcomes(likelihood: str, outputs: Tensor) -> Iterator[tuple[Tensor, float]]:
    """(y, weight) pairs for one sample's outputs with Σ w·g(y) = E_y[g(y)] for every g that is
    quadratic in the score: all outcomes with their probabilities (categorical, Bernoulli), or
    the 2K Gaussian sigma points f ± √K eₖ (unit variance, so exact second moments)."""
    outputs = outputs.detach()
    if likelihood == "categorical":
        classes = outputs.shape[-1]
        probs = outputs.softmax(-1).reshape(-1, classes)
        for labels in itertools.product(range(classes), repeat=probs.shape[0]):
            weight = math.prod(probs[t, c].item() for t, c in enumerate(labels))
            yield torch.tensor(labels).reshape(outputs.shape[:-1]), weight
    elif likelihood == "bernoulli":
        probs = torch.sigmoid(outputs).reshape(-1)
        for bits in itertools.product((0, 1), repeat=probs.numel()):
            pairs = zip(probs.tolist(), bits, strict=True)
            weight = math.prod(p if b else 1 - p for p, b in pairs)
            yield torch.tensor(bits, dtype=outputs.dtype).reshape(outputs.shape), weight
    elif likelihood == "gaussian":
        k = outputs.numel()
        for index, sign in itertools.product(range(k), (1.0, -1.0)):
            shift = torch.zeros(k, dtype=outputs.dtype)
            shift[index] = sign * math.sqrt(k)
            yield outputs + shift.reshape(outputs.shape), 1.0 / (2 * k)
    else:  # pragma: no cover
        raise ValueError(likelihood)


def enumerated_output_fisher(likelihood: str, outputs: Tensor) -> Tensor:
    """Λₙ = E_y[r rᵀ] with r = autograd of the torch.distributions log-likelihood, [N, K, K]."""
    blocks = []
    for row in outputs.detach():
        k = row.numel()
        fisher = torch.zeros(k, k, dtype=row.dtype)
        for y, weight in outcomes(likelihood, row):
            f = row.clone().requires_grad_(True)
            (r,) = torch.autograd.grad(reference_log_prob(likelihood, f, y), f)
            fisher += weight * torch.outer(r.reshape(-1), r.reshape(-1))
        blocks.append(fisher)
    return torch.stack(blocks)


def closed_form_output_fisher(likelihood: str, outputs: Tensor) -> Tensor:
    """Λₙ from the textbook formulas, [N, K, K] (block diagonal over categorical positions)."""
    blocks = []
    for row in outputs.detach():
        if likelihood == "categorical":
            probs = row.softmax(-1).reshape(-1, row.shape[-1])
            per_position = [torch.diag(p) - torch.outer(p, p) for p in probs]
            blocks.append(torch.block_diag(*per_position))
        elif likelihood == "bernoulli":
            p = torch.sigmoid(row).reshape(-1)
            blocks.append(torch.diag(p * (1 - p)))
        else:
            blocks.append(torch.eye(row.numel(), dtype=row.dtype))
    return torch.stack(blocks)


def per_sample_grad(model: nn.Module, logp: Tensor, retain_graph: bool = True) -> Tensor:
    grads = torch.autograd.grad(logp, trainable(model), retain_graph=retain_graph)
    return torch.cat([g.reshape(-1) for g in grads])


def brute_force_fisher(model: nn.Module, inputs: Tensor, likelihood: str) -> Tensor:
    """(1/N) Σₙ Σ_y w(y) gₙ(y) gₙ(y)ᵀ, one autograd call per sample and outcome."""
    num = sum(p.numel() for p in trainable(model))
    fisher = torch.zeros(num, num, dtype=DTYPE)
    for n in range(inputs.shape[0]):
        out = model(inputs[n : n + 1])[0]
        for y, weight in outcomes(likelihood, out):
            g = per_sample_grad(model, reference_log_prob(likelihood, out, y))
            fisher += weight * torch.outer(g, g)
    return fisher / inputs.shape[0]


def brute_force_empirical_fisher(
    model: nn.Module, inputs: Tensor, likelihood: str, targets: Tensor
) -> Tensor:
    """(1/N) Σₙ gₙ gₙᵀ with gₙ the gradient of log p(yₙ | xₙ) for the observed yₙ."""
    num = sum(p.numel() for p in trainable(model))
    fisher = torch.zeros(num, num, dtype=DTYPE)
    for n in range(inputs.shape[0]):
        model.zero_grad()
        logp = reference_log_prob(likelihood, model(inputs[n : n + 1])[0], targets[n])
        logp.backward()
        g = torch.cat([p.grad.reshape(-1) for p in trainable(model)])
        fisher += torch.outer(g, g)
    model.zero_grad()
    return fisher / inputs.shape[0]


def full_jacobian(model: nn.Module, inputs: Tensor) -> Tensor:
    """J = ∂ vec(f(X)) / ∂θ of the full-batch outputs, [N·K, P]."""
    params = trainable(model)
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def outputs(*ps: Tensor) -> Tensor:
        params = dict(zip(names, ps, strict=True))
        return torch.func.functional_call(model, params, (inputs,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(outputs, tuple(p.detach() for p in params))
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


def gauss_newton(model: nn.Module, inputs: Tensor, likelihood: str) -> Tensor:
    """Jᵀ Λ J / N with J from ``torch.autograd.functional.jacobian`` and Λ in closed form."""
    jac = full_jacobian(model, inputs)
    with torch.no_grad():
        lam = torch.block_diag(*closed_form_output_fisher(likelihood, model(inputs)))
    return jac.T @ lam @ jac / inputs.shape[0]


def assert_psd(matrix: Tensor) -> None:
    eigvals = torch.linalg.eigvalsh(matrix)
    scale = eigvals.abs().max().item()
    assert eigvals.min().item() >= -PSD_RTOL * scale, (eigvals.min().item(), scale)


# === Added for the K-FAC / EKFAC / layer-handler / optimizer tests ============================
# --- tolerances -------------------------------------------------------------------------------
# A KL-clipped step must satisfy lr²·vᵀFv ≤ kl_clip; this relative slack is float64 rounding.
KL_CLIP_SLACK = 1e-10
# Looser: float32 models (factor_dtype / inverse_dtype checks) carry float32 rounding (~1e-7).
FLOAT32_RTOL = 1e-5
# Looser than RTOL_EXACT: parameter *changes* θ_new − θ_old lose the leading digits of θ
# (|θ| ~ 1 against steps ~ 1e-2), so the difference carries ≈ 1e-14 relative error; the
# EMA / step bookkeeping adds a few more roundings. Still far below any real discrepancy.
RTOL_STEP = 1e-9
# Loss-decrease checks: after ~20 steps the loss must have dropped below this fraction.
LOSS_DECREASE_FACTOR = 0.9


# --- problems ---------------------------------------------------------------------------------
VOCAB = 6  # tokens of the embedding problem
EMBED_DIM = 4


def make_embedding_model(seed: int = 0) -> nn.Module:
    """Embedding(VOCAB, EMBED_DIM) → Tanh → Linear: maps tokens ``[N, T]`` to ``[N, T, OUT]``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(VOCAB, EMBED_DIM), nn.Tanh(), nn.Linear(EMBED_DIM, OUT))
    return model.to(DTYPE)


def make_tokens(n: int = BATCH, positions: int = POSITIONS, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, positions), generator=gen)


def mean_nll(likelihood: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """−(1/N) Σₙ log p(yₙ | fₙ) (summed over positions): the batch-mean negative
    log-likelihood that ``kind="empirical"`` assumes is the loss (cross_entropy for
    categorical, ½‖f − y‖² + const for gaussian, BCE-with-logits summed for bernoulli)."""
    return -distribution(likelihood, outputs).log_prob(targets).sum() / outputs.shape[0]


# --- hand-written convolution patches ---------------------------------------------------------
def conv_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of ``conv``, worked out from its arguments."""
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    if conv.padding == "same":  # total d·(k−1), the smaller half first (PyTorch's convention)
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    if conv.padding == "valid":
        return 0, 0, 0, 0
    ph, pw = conv.padding
    return pw, pw, ph, ph


def hand_patches(conv: nn.Conv2d, image: Tensor) -> Tensor:
    """One sample's input patches, ``[H_out·W_out, C_in·kh·kw]``, by a loop over output
    locations (row-major), each patch flattened in (C_in, kh, kw) order; no ``F.unfold``."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = torch.nn.functional.pad(image.unsqueeze(0), conv_pads(conv), mode=mode)[0]
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    rows = []
    for i in range(0, padded.shape[1] - span_h + 1, sh):
        for j in range(0, padded.shape[2] - span_w + 1, sw):
            rows.append(padded[:, i : i + span_h : dh, j : j + span_w : dw].reshape(-1))
    return torch.stack(rows)


# --- per-layer references ---------------------------------------------------------------------
KRONECKER_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)


def kronecker_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers natgrad gives Kronecker factors (Linear, ungrouped Conv2d, Embedding)."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, KRONECKER_TYPES) and getattr(m, "groups", 1) == 1
    }


def input_rows(module: nn.Module, sample_input: Tensor) -> Tensor:
    """ā for every position of ONE sample's layer input, ``[T, d_in]`` (bias column last);
    for an Embedding the one-hot rows ``[T, V]``."""
    if isinstance(module, nn.Embedding):
        return torch.eye(module.num_embeddings, dtype=DTYPE)[sample_input.reshape(-1)]
    if isinstance(module, nn.Conv2d):
        rows = hand_patches(module, sample_input)
    else:
        rows = sample_input.reshape(-1, module.in_features)
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
    return rows


def grad_rows(module: nn.Module, sample_grad: Tensor) -> Tensor:
    """δ for every position of ONE sample's layer output gradient, ``[T, d_out]``."""
    if isinstance(module, nn.Conv2d):
        return sample_grad.permute(1, 2, 0).reshape(-1, module.out_channels)
    return sample_grad.reshape(-1, sample_grad.shape[-1])


class _LayerTaps:
    """Forward hooks that keep each watched layer's last input and (attached) output."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.inputs[name], self.outputs[name] = args[0].detach(), output

        return hook

    def __enter__(self) -> _LayerTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def label_draws(likelihood: str, out: Tensor, kind: str, target: Tensor | None):
    """(y, weight) pairs: every outcome for ``kind="true"``, the observed one otherwise."""
    if kind == "true":
        return list(outcomes(likelihood, out))
    return [(target, 1.0)]


def brute_force_kfac(
    model: nn.Module, inputs: Tensor, likelihood: str, kind: str = "true",
    targets: Tensor | None = None, reduce: bool = False,
) -> dict[str, tuple[Tensor, Tensor]]:
    """{name: (A, G)} with A = (1/(N·T)) Σ āāᵀ (full matrix, also for Embedding) and
    G = (1/N) Σₙ Σ_y w Σₜ δδᵀ, δ from autograd of one sample's log-likelihood with respect to
    the layer's output (one forward per sample, one backward per outcome). With ``reduce``
    (K-FAC-reduce; not for Embedding) each sample's rows are averaged (A) or summed (G) first:
    A = (1/N) Σ āₙāₙᵀ, G = (1/N) Σₙ Σ_y w δₙδₙᵀ."""
    layers = kronecker_layers(model)
    a_sums = {n: 0.0 for n in layers}
    g_sums = {n: 0.0 for n in layers}
    rows_seen = dict.fromkeys(layers, 0)
    for n in range(inputs.shape[0]):
        with _LayerTaps(layers) as taps:
            out = model(inputs[n : n + 1])[0]
        for name, module in layers.items():
            rows = input_rows(module, taps.inputs[name][0])
            if reduce:
                rows = rows.mean(0, keepdim=True)
            a_sums[name] = a_sums[name] + rows.T @ rows
            rows_seen[name] += rows.shape[0]
        target = None if targets is None else targets[n]
        for y, weight in label_draws(likelihood, out, kind, target):
            logp = reference_log_prob(likelihood, out, y)
            deltas = torch.autograd.grad(logp, [taps.outputs[k] for k in layers], retain_graph=True)
            for (name, module), delta in zip(layers.items(), deltas, strict=True):
                d = grad_rows(module, delta[0])
                if reduce:
                    d = d.sum(0, keepdim=True)
                g_sums[name] = g_sums[name] + weight * d.T @ d
    return {
        name: (a_sums[name] / rows_seen[name], g_sums[name] / inputs.shape[0]) for name in layers
    }


def grad_matrix(module: nn.Module, grads: dict[Tensor, Tensor]) -> Tensor:
    """natgrad's gradient matrix X of a layer from its parameter gradients: [∇W | ∇b]
    (Conv2d W reshaped ``[C_out, C_in·kh·kw]``; Embedding: ∇Wᵀ, ``[D, V]``)."""
    if isinstance(module, nn.Embedding):
        return grads[module.weight].T
    weight = grads[module.weight].reshape(module.weight.shape[0], -1)
    if module.bias is None:
        return weight
    return torch.cat([weight, grads[module.bias].unsqueeze(1)], dim=1)


def per_sample_grad_matrices(
    model: nn.Module, inputs: Tensor, likelihood: str, module: nn.Module, kind: str = "true",
    targets: Tensor | None = None,
) -> list[tuple[int, float, Tensor]]:
    """(sample index, weight, Xₙ(y)) with Xₙ(y) the layer's gradient matrix of log p(y | xₙ),
    from autograd with respect to the layer's parameters (not via δ and ā)."""
    params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
    result = []
    for n in range(inputs.shape[0]):
        out = model(inputs[n : n + 1])[0]
        target = None if targets is None else targets[n]
        for y, weight in label_draws(likelihood, out, kind, target):
            logp = reference_log_prob(likelihood, out, y)
            grads = torch.autograd.grad(logp, params, retain_graph=True)
            result.append((n, weight, grad_matrix(module, dict(zip(params, grads, strict=True)))))
    return result


def exact_block(
    model: nn.Module, inputs: Tensor, likelihood: str, module: nn.Module, kind: str = "true",
    targets: Tensor | None = None,
) -> Tensor:
    """The layer's Fisher block on vec(X) (row-major): (1/N) Σₙ Σ_y w vec(Xₙ) vec(Xₙ)ᵀ."""
    draws = per_sample_grad_matrices(model, inputs, likelihood, module, kind, targets)
    size = draws[0][2].numel()
    block = torch.zeros(size, size, dtype=DTYPE)
    for _, weight, x in draws:
        block += weight * torch.outer(x.reshape(-1), x.reshape(-1))
    return block / inputs.shape[0]


def block_indices(model: nn.Module, module: nn.Module) -> Tensor:
    """Indices into ``model.parameters()`` order of vec(X) (row-major): F[idx][:, idx] is the
    layer's block in natgrad's X layout, with the bias interleaved as X's last column."""
    offsets, start = {}, 0
    for p in trainable(model):
        offsets[id(p)] = start
        start += p.numel()
    w = module.weight
    if isinstance(module, nn.Embedding):  # X[d, v] = W[v, d]
        vocab, dim = w.shape
        base = offsets[id(w)]
        return torch.tensor([base + v * dim + d for d in range(dim) for v in range(vocab)])
    d_out, d_in = w.shape[0], w[0].numel()
    index = []
    for i in range(d_out):
        index += [offsets[id(w)] + i * d_in + j for j in range(d_in)]
        if module.bias is not None:
            index.append(offsets[id(module.bias)] + i)
    return torch.tensor(index)


def kron_full(grad_factor: Tensor, input_factor: Tensor) -> Tensor:
    """G ⊗ A as a dense matrix (a vector A is a diagonal)."""
    if input_factor.dim() == 1:
        input_factor = torch.diag(input_factor)
    return torch.kron(grad_factor.contiguous(), input_factor.contiguous())


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run a test with one intra-op thread: the tests' tensors are tiny, and with several
    threads each op pays a synchronisation that dominates (≈30× slower on a loaded 2-core
    machine). Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_losses(opt, model: nn.Module, inputs: Tensor, targets: Tensor, steps: int) -> list[float]:
    """``steps`` steps of the unchanged loop on one batch with the (token-mean) cross-entropy
    of the model's logits; the losses before each step."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
