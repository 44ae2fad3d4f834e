"""The communicator: no-ops on one process, bucketed collectives on two (gloo, 127.0.0.1)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_launch import HERE, launch
from dist_worker import build_model, global_batches
from torch import nn

import natgrad
from natgrad.distributed import Communicator, count_ddp_bytes, mean_operator, unwrap_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """A gloo process group of this process alone."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _check_inactive(comm: Communicator) -> None:
    assert not comm.active
    assert (comm.rank, comm.world_size) == (0, 1)
    tensors = [torch.ones(3), torch.arange(4.0, dtype=torch.float64)]
    before = [t.clone() for t in tensors]
    comm.all_reduce(tensors)
    comm.reduce(tensors, dst=0)
    comm.broadcast(tensors, src=0)
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t, b)
    assert comm.sum_values([2, 3.5]) == [2.0, 3.5]
    assert comm.all_gather(tensors[0])[0] is tensors[0]
    operator = torch.neg
    assert mean_operator(comm, operator, 7) is operator
    assert (comm.bytes, comm.calls) == (0, 0)


def test_no_process_group_is_a_no_op() -> None:
    assert not dist.is_initialized()
    _check_inactive(Communicator())


def test_world_size_one_is_a_no_op(world_of_one: None) -> None:
    _check_inactive(Communicator())


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 4) -> list:
    inputs, labels = global_batches(steps)
    for step in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs[step]), labels[step]).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
def test_world_size_one_changes_nothing(world_of_one: None, optimizer: str) -> None:
    # DDP at world size 1, and natgrad's hooks: bit for bit the plain single-process run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = build_model()
        plain = _train(model, getattr(natgrad, optimizer)(model, stat_every=1, inv_every=2))
        model = build_model()
        wrapped = nn.parallel.DistributedDataParallel(model)
        opt = getattr(natgrad, optimizer)(wrapped, stat_every=1, inv_every=2)
        assert opt.model is model and unwrap_model(wrapped) is model
        counter = count_ddp_bytes(wrapped)
        distributed = _train(wrapped, opt)
    for a, b in zip(plain, distributed, strict=True):
        assert torch.equal(a, b)
    assert opt.communicator.bytes == 0
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert counter.bytes == 4 * param_bytes  # DDP's own gradient all-reduce, counted


def test_collectives_on_two_processes(tmp_path: Path) -> None:
    launch([str(HERE / "dist_worker.py"), str(tmp_path), "comm"])
    results = [torch.load(tmp_path / f"comm-w2-r{r}.pt", weights_only=False) for r in (0, 1)]
    for result in results:
        reduced = result["all_reduce"]
        assert torch.equal(reduced[0], torch.full((2, 3), 3.0, dtype=torch.float64))
        assert torch.equal(reduced[1], torch.arange(4, dtype=torch.float64) * 3)
        assert torch.equal(reduced[2], torch.full((5,), 2.0))
        # one call per dtype (float64, float32), payload 10 float64 + 5 float32
        assert result["after_reduce"] == (2, 10 * 8 + 5 * 4)
        shared = result["broadcast"]  # from rank 1
        assert torch.equal(shared[0], torch.ones(3))
        assert torch.equal(shared[1], torch.full((2, 2), 11.0))
        assert result["sum_values"] == [1.0, 5.0]
        assert [t.tolist() for t in result["all_gather"]] == [[0, 0], [1, 7]]
        # an optimizer without data-parallel support says so
        assert any("drift apart" in message for message in result["ngd_warning"])
    # reduce to rank 1: the sum there, rank 0's tensors untouched; one call per dtype
    first, second = (result["reduce"] for result in results)
    assert torch.equal(first[0], torch.full((2,), 1.0, dtype=torch.float64))
    assert torch.equal(first[1], torch.full((3,), 1.0))
    assert torch.equal(second[0], torch.full((2,), 3.0, dtype=torch.float64))
    assert torch.equal(second[1], torch.full((3,), 3.0))
    assert [r["reduce_counts"] for r in results] == [(2, 2 * 8 + 3 * 4)] * 2
