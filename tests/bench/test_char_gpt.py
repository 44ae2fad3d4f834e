"""The ``char-gpt`` problem: Python's standard-library source as characters, a nanoGPT-style
transformer with a tied embedding, trained by natgrad without a fallback."""

from __future__ import annotations

import sysconfig
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import natgrad
from natgrad.bench import PROBLEMS
from natgrad.bench.data import (
    CHAR_LENGTH,
    CHAR_VOCAB,
    CHAR_VOCAB_SIZE,
    STDLIB_FILES,
    _stdlib_windows,
    decode_chars,
    encode_chars,
    load_stdlib_text,
    split_indices,
    stdlib_text,
)
from natgrad.bench.problems import CausalLM

PROBLEM = PROBLEMS["char-gpt"]


def test_the_text_is_the_fixed_list_of_stdlib_files() -> None:
    assert list(STDLIB_FILES) == sorted(STDLIB_FILES) and len(set(STDLIB_FILES)) == 23
    root = Path(sysconfig.get_paths()["stdlib"])
    text = stdlib_text()
    assert text == "".join((root / name).read_text(encoding="utf-8") for name in STDLIB_FILES)
    assert 0.9e6 < len(text) < 1.4e6  # about 1 MB on every CPython 3.10+
    assert "class ArgumentParser(" in text and "def dataclass(" in text


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "argparse.py").write_text("import os\n")
    with pytest.raises(FileNotFoundError) as info:
        stdlib_text(tmp_path)
    message = str(info.value)
    assert "calendar.py" in message and "urllib/parse.py" in message and str(tmp_path) in message
    assert "argparse.py" not in message


def test_the_vocabulary_is_newline_printable_ascii_and_other() -> None:
    assert CHAR_VOCAB_SIZE == 97 and CHAR_VOCAB[0] == "\n" and CHAR_VOCAB[1:] == "".join(
        chr(c) for c in range(32, 127))
    text = "def f(x):\n    return x ~ 1  # ok\n"
    tokens = encode_chars(text)
    assert tokens.dtype == np.int64 and decode_chars(tokens) == text
    assert tokens[0] == CHAR_VOCAB.index("d")
    other = encode_chars("a\tb\u00e9\r\U0001f600z")  # tab, é, CR and an emoji: "other"
    assert other.tolist() == [CHAR_VOCAB.index("a"), 96, CHAR_VOCAB.index("b"), 96, 96, 96,
                              CHAR_VOCAB.index("z")]
    assert decode_chars(other) == "a\ufffdb\ufffd\ufffd\ufffdz"
    counts = np.bincount(encode_chars(stdlib_text()), minlength=CHAR_VOCAB_SIZE)
    assert counts[96] < 1e-3 * counts.sum()  # the stdlib's source is nearly all ASCII
    assert counts[CHAR_VOCAB.index(" ")] == counts.max()


def test_windows_cut_the_text_and_the_split_partitions_them() -> None:
    windows = _stdlib_windows()
    tokens = encode_chars(stdlib_text())
    assert windows.shape == ((len(tokens) - 1) // CHAR_LENGTH, CHAR_LENGTH + 1)
    # consecutive windows overlap in one character: together they are the text
    assert np.array_equal(
        np.concatenate([windows[:, :-1].reshape(-1), windows[-1, -1:]]),
        tokens[: windows.shape[0] * CHAR_LENGTH + 1],
    )
    data = load_stdlib_text(0)
    train, test = split_indices(len(windows), 0)
    assert np.intersect1d(train, test).size == 0 and train.size + test.size == len(windows)
    assert torch.equal(data.x_train, torch.from_numpy(windows[train, :-1]))
    assert torch.equal(data.y_test, torch.from_numpy(windows[test, 1:]))
    assert data.x_train.shape[1:] == data.y_train.shape[1:] == (CHAR_LENGTH,)
    assert data.x_test.shape[0] == round(0.2 * len(windows))


def test_the_data_is_a_fixed_function_of_the_seed() -> None:
    first, again, other = load_stdlib_text(3), load_stdlib_text(3), load_stdlib_text(4)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    assert first.num_train == other.num_train
    assert not torch.equal(first.x_train, other.x_train)


def test_the_model_ties_its_embedding_to_its_head() -> None:
    torch.manual_seed(0)
    model = PROBLEM.build_model()
    assert isinstance(model, CausalLM)
    assert model.head.weight is model.tokens.weight and model.head.bias is None
    assert model.tokens.weight.shape == (CHAR_VOCAB_SIZE, 32) and len(model.blocks) == 2
    names = [name for name, _ in model.named_parameters()]
    assert "tokens.weight" in names and "head.weight" not in names  # one parameter
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CHAR_VOCAB_SIZE, (3, CHAR_LENGTH), generator=generator)
    targets = torch.randint(0, CHAR_VOCAB_SIZE, (3, CHAR_LENGTH), generator=generator)
    logits = model(tokens)
    assert logits.shape == (3, CHAR_LENGTH, CHAR_VOCAB_SIZE)
    # GPT-2's initialisation: near-uniform predictions at the start
    loss = PROBLEM.compute_loss(logits, targets).item()
    assert abs(loss - np.log(CHAR_VOCAB_SIZE)) < 0.1
    # causal: the logits at position t do not depend on later tokens
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % CHAR_VOCAB_SIZE
    with torch.no_grad():
        assert torch.allclose(model(changed)[:, :20], logits[:, :20].detach(), atol=1e-6)
    # the gradient of the tied weight is the sum of both uses'
    logits.sum().backward()
    assert model.tokens.weight.grad is not None


def test_training_loss_is_evaluated_on_a_fixed_subset_the_test_loss_on_all() -> None:
    data = PROBLEM.load(0)
    torch.manual_seed(0)
    model = PROBLEM.build_model()
    assert PROBLEM.eval_examples is not None and data.num_train > PROBLEM.eval_examples
    stride = -(-data.num_train // PROBLEM.eval_examples)
    x, y = data.x_train[::stride], data.y_train[::stride]
    assert x.shape[0] <= PROBLEM.eval_examples
    with torch.no_grad():
        expected = float(PROBLEM.compute_loss(model(x), y))
    assert PROBLEM.dataset_loss(model, data.x_train, data.y_train) == pytest.approx(expected,
                                                                                   rel=1e-5)
    with torch.no_grad():
        whole_test = float(PROBLEM.compute_loss(model(data.x_test), data.y_test))
    assert PROBLEM.test_metric(model, data) == pytest.approx(whole_test, rel=1e-5)


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
def test_natgrad_trains_it_without_a_fallback(optimizer: str) -> None:
    data = PROBLEM.load(0)
    torch.manual_seed(0)
    model = PROBLEM.build_model()
    batches = data.x_train[:8 * 32].reshape(8, 32, -1), data.y_train[:8 * 32].reshape(8, 32, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no skipped step, no other warning
        opt = getattr(natgrad, optimizer)(model, loss=PROBLEM.loss)
        assert "tokens+head" in opt.blocks and opt.fallback == []
        before = PROBLEM.compute_loss(model(batches[0][0]), batches[1][0]).item()
        for x, y in zip(*batches, strict=True):
            opt.zero_grad()
            loss = PROBLEM.compute_loss(model(x), y)
            loss.backward()
            opt.step()
        after = PROBLEM.compute_loss(model(batches[0][0]), batches[1][0]).item()
    assert opt.state["natgrad"]["skipped_steps"] == 0
    assert after < before - 0.5, (before, after)
    assert model.head.weight is model.tokens.weight

