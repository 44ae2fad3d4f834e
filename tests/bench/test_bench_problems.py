"""Every problem's data loads offline; losses are the likelihoods' batch-mean NLL."""

from __future__ import annotations

import math
import socket

import pytest
import torch

from natgrad.bench import PROBLEMS
from natgrad.bench.data import batch_indices, split_indices
from natgrad.losses import LossSpec

EXPECTED = {  # input shape, target shape (per example), likelihood
    "digits-mlp": ((64,), (), "categorical"),
    "digits-autoencoder": ((64,), (64,), "bernoulli"),
    "digits-cnn": ((1, 8, 8), (), "categorical"),
    "mnist-autoencoder": ((784,), (784,), "bernoulli"),
    "regression": ((10,), (1,), "gaussian"),
    "char-gpt": ((32,), (32,), "categorical"),
}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark's data must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_registry_matches_expected_problems() -> None:
    assert set(PROBLEMS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_loads_offline(name: str, offline: None) -> None:
    problem = PROBLEMS[name]
    x_shape, y_shape, likelihood = EXPECTED[name]
    assert problem.likelihood == likelihood
    data = problem.load(0)
    assert data.x_train.shape[1:] == x_shape and data.y_train.shape[1:] == y_shape
    assert data.x_test.shape[1:] == x_shape and data.y_test.shape[1:] == y_shape
    assert data.num_train >= problem.batch_size
    assert 0.15 < data.x_test.shape[0] / (data.num_train + data.x_test.shape[0]) < 0.25
    for tensor in (data.x_train, data.y_train, data.x_test, data.y_test):
        assert torch.isfinite(tensor.double()).all()
    if name == "char-gpt":  # characters in, next characters out
        assert data.x_train.dtype == data.y_train.dtype == torch.int64
        assert 0 <= data.x_train.min() and data.x_train.max() < 97
        assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])
    elif likelihood != "gaussian":  # images scaled to [0, 1]
        assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    if likelihood == "categorical" and name != "char-gpt":
        assert data.y_train.dtype == torch.int64
        assert set(data.y_train.tolist()) == set(range(10))
    else:
        # standardised with train statistics
        if likelihood == "gaussian":
            assert data.x_train.mean(0).abs().max() < 1e-4
            assert abs(float(data.y_train.std()) - 1.0) < 0.01
    # the model accepts the data and gives outputs the loss takes
    model = problem.build_model()
    with torch.no_grad():
        loss = problem.compute_loss(model(data.x_train[:8]), data.y_train[:8])
        if name == "char-gpt":  # the token mean, as language-model scripts write it
            logits = model(data.x_train[:8])
            expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97),
                                                         data.y_train[:8].reshape(-1))
            assert torch.equal(loss, expected)
    assert loss.shape == () and math.isfinite(float(loss))


def test_split_is_fixed_by_the_seed() -> None:
    a_train, a_test = split_indices(100, seed=3)
    b_train, b_test = split_indices(100, seed=3)
    c_train, _ = split_indices(100, seed=4)
    assert (a_train == b_train).all() and (a_test == b_test).all()
    assert not (a_train == c_train).all()
    assert sorted(a_train.tolist() + a_test.tolist()) == list(range(100))
    first = PROBLEMS["digits-mlp"].load(7)
    again = PROBLEMS["digits-mlp"].load(7)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)


def test_batch_indices_are_seeded_epochs() -> None:
    batches = batch_indices(10, 3, steps=7, seed=1)
    assert batches.shape == (7, 3)
    assert torch.equal(batches, batch_indices(10, 3, steps=7, seed=1))
    # each epoch's 3 batches have no repeated example
    for epoch in range(2):
        part = batches[3 * epoch : 3 * epoch + 3].reshape(-1)
        assert part.unique().numel() == 9
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(10, 11, steps=1, seed=0)


def test_losses_are_torch_modules_natgrad_takes_as_loss() -> None:
    """Each problem trains on a torch loss module as users write it (torch's mean
    reductions), one that natgrad's ``loss=`` represents; its value is the mean NLL per
    example (classifiers), per pixel (autoencoders) or twice it (MSE, per output)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (5,), generator=gen)
    bits = torch.randint(0, 2, (5, 4), generator=gen).double()
    targets = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    for name, problem in PROBLEMS.items():
        LossSpec.from_module(problem.loss)  # raises if natgrad cannot represent it
        if problem.likelihood == "categorical":
            nll = -torch.distributions.Categorical(logits=logits).log_prob(labels).mean()
            assert torch.allclose(problem.loss(logits, labels), nll), name
        elif problem.likelihood == "bernoulli":
            nll = -torch.distributions.Bernoulli(logits=logits).log_prob(bits).mean()
            assert torch.allclose(problem.loss(logits, bits), nll), name
        else:
            nll = -torch.distributions.Normal(logits, 1.0).log_prob(targets).mean()
            constant = 0.5 * math.log(2 * math.pi)
            assert torch.allclose(problem.loss(logits, targets), 2 * (nll - constant)), name


def test_dataset_loss_is_the_mean_over_chunks() -> None:
    problem = PROBLEMS["regression"]
    data = problem.load(0)
    torch.manual_seed(0)
    model = problem.build_model()
    with torch.no_grad():
        whole = float(problem.loss(model(data.x_train), data.y_train))
    assert problem.dataset_loss(model, data.x_train, data.y_train) == pytest.approx(whole, 1e-5)
    metric = problem.test_metric(model, data)
    assert metric > 0 and not problem.higher_is_better
    assert PROBLEMS["digits-mlp"].higher_is_better
