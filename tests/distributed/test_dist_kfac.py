"""KFAC, EKFAC and NGDCG under DistributedDataParallel: 2 gloo processes on 127.0.0.1.

One launch (module fixture) runs every scenario of :mod:`dist_worker` on two ranks, each
taking half of every global batch; the references are one-process runs on the whole
(concatenated) batch in this process. Checked: parameters are bit-identical on the ranks,
equal to the one-process run (float64, relative error ≤ RTOL_EXACT) where the run is
deterministic (empirical Fisher; fixed or automatic lr/momentum/damping), and checkpoints
move between world sizes 1 and 2.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_launch import HERE, launch
from dist_worker import (
    CHECKPOINT_STEP,
    CHECKPOINTED,
    SCENARIOS,
    STEPS,
    run_scenario,
)

import natgrad.likelihoods
from conftest import RTOL_EXACT, rel_err

pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = [name for name, s in SCENARIOS.items() if s.exact]


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Two-rank results in a folder, and the one-process references by scenario."""
    out = tmp_path_factory.mktemp("dist_kfac")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback notice
        # the checkpoint the two ranks resume from: one process, CHECKPOINT_STEP steps
        save_at = (CHECKPOINT_STEP, out / "checkpoint-w1.pt")
        checkpointed = run_scenario(CHECKPOINTED, save_at=save_at)
        launch([str(HERE / "dist_worker.py"), str(out), *SCENARIOS, "checkpoint", "resume"])
        references = {name: run_scenario(name) for name in SCENARIOS if name != CHECKPOINTED}
    references[CHECKPOINTED] = checkpointed
    torch.set_num_threads(threads)
    return out, references


def _ranks(out: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return tuple(torch.load(out / f"{name}-w2-r{r}.pt", weights_only=False) for r in (0, 1))


@pytest.mark.parametrize("name", [*SCENARIOS, "checkpoint", "resume"])
def test_parameters_identical_on_all_ranks(runs: tuple[Path, dict], name: str) -> None:
    first, second = _ranks(runs[0], name)
    for a, b in zip(first["params"], second["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", EXACT)
def test_equals_one_process_on_concatenated_batch(runs: tuple[Path, dict], name: str) -> None:
    out, references = runs
    expected = _flat(references[name]["params"])
    start = _flat(run_scenario(name, steps=0)["params"])
    assert rel_err(expected, start) > 0.1  # the runs went somewhere
    for result in _ranks(out, name):
        assert rel_err(_flat(result["params"]), expected) <= RTOL_EXACT
        assert result["bytes"] > 0  # natgrad communicated ...
    assert references[name]["bytes"] == 0  # ... and did not on one process


def test_sampled_labels_differ_between_ranks(runs: tuple[Path, dict]) -> None:
    # the true Fisher's labels come from seed + rank: each rank's first draw is what a
    # generator seeded with seed + rank draws for its outputs, and not what the other rank's
    # seed would draw for them
    for name in ("kfac-true-auto", "ekfac-true-fixed-everywhere"):
        ranks = _ranks(runs[0], name)
        assert [r["seed"] for r in ranks] == [0, 1]
        likelihood = natgrad.likelihoods.Categorical()
        for rank, result in enumerate(ranks):
            [(outputs, labels)] = result["draws"]
            own = likelihood.sample(outputs, torch.Generator().manual_seed(rank))
            other = likelihood.sample(outputs, torch.Generator().manual_seed(1 - rank))
            assert torch.equal(labels, own)
            assert not torch.equal(labels, other)


def test_one_all_reduce_per_statistics_step(runs: tuple[Path, dict]) -> None:
    # statistics every step, inverses every 2: "everywhere" makes exactly one collective per
    # step (all layers' factors and counts in one float64 buffer); "balanced" adds one
    # broadcast per owning rank (both own a block here) per refresh
    balanced, _ = _ranks(runs[0], "kfac-empirical-fixed")
    everywhere, _ = _ranks(runs[0], "kfac-empirical-fixed-everywhere")
    assert everywhere["calls"] == STEPS
    assert balanced["calls"] == STEPS + 2 * (STEPS // 2)
    assert everywhere["bytes"] < balanced["bytes"]


def test_overflowing_statistics_skip_the_step_on_every_rank(runs: tuple[Path, dict]) -> None:
    # "owner": the block whose Σ āāᵀ overflows on one rank is summed on its owner alone; its
    # flag makes every rank skip the step, as one process does (then they carry on together)
    out, references = runs
    name = "kfac-overflow-empirical-auto-owner"
    assert references[name]["skipped"] == 1
    assert [r["skipped"] for r in _ranks(out, name)] == [1, 1]


def test_checkpoint_of_one_process_resumes_on_two(runs: tuple[Path, dict]) -> None:
    out, references = runs
    expected = _flat(references[CHECKPOINTED]["params"])
    first, second = _ranks(out, "resume")
    assert rel_err(_flat(first["params"]), expected) <= RTOL_EXACT
    # rank 1 forked a label stream of its own from rank 0's checkpointed one
    assert not torch.equal(first["rng"], second["rng"])


def test_checkpoint_of_two_processes_resumes_on_one(runs: tuple[Path, dict]) -> None:
    out, references = runs
    resumed = run_scenario(CHECKPOINTED, STEPS - CHECKPOINT_STEP, resume=out / "checkpoint-w2.pt")
    expected = _flat(references[CHECKPOINTED]["params"])
    assert rel_err(_flat(resumed["params"]), expected) <= RTOL_EXACT


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_matches_one_process(tmp_path: Path) -> None:
    names = ["kfac-empirical-fixed", "ekfac-empirical-auto"]
    launch([str(HERE / "dist_worker.py"), str(tmp_path), *names], DIST_BACKEND="nccl")
    for name in names:
        expected = _flat(run_scenario(name)["params"])
        for result in _ranks(tmp_path, name):
            # looser: the reference runs on the CPU, whose float64 kernels sum in another order
            assert rel_err(_flat(result["params"]), expected) <= 1e-8
