"""FSDP2 on 4 gloo processes: one launch, tiny models, each run checked against one process.

The launch (module fixture) trains KFAC with owner placement and EKFAC under ``fully_shard``
on 4 ranks of 4 rows each, saves a DCP checkpoint (:mod:`natgrad.distributed.dcp`) half way
and resumes it on the 4 ranks, and resumes a DCP checkpoint that one process saved. Checked:
the ranks' whole parameters are bit-identical; each run equals one process on the concatenated
batch (float64, relative error ≤ RTOL_EXACT); the 4-rank checkpoint resumes on 4 ranks bit for
bit and on one process equal to it; each owner reads only its own blocks from it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_launch import HERE, launch
from dist_worker import CHECKPOINT_STEP, FSDP_CHECKPOINTED, STEPS, dcp_folder, run_scenario

from conftest import RTOL_EXACT, rel_err

pytestmark = pytest.mark.usefixtures("single_thread")

WORLD = 4
SAVED = FSDP_CHECKPOINTED  # KFAC, inverse_placement="owner", empirical Fisher, automatic
TRAINED = ("fsdp-ekfac-empirical-auto",)
SAVE, RESUME, FROM_ONE = (f"dcp-save-{SAVED}", f"dcp-resume-w{WORLD}-{SAVED}",
                          f"dcp-resume-w1-{SAVED}")


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params])


def _one_process(name: str, **kwargs: Any) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback notice
        result = run_scenario(name, **kwargs)
    torch.set_num_threads(threads)
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the four-rank results (and of the one-process checkpoint they resume)."""
    out = tmp_path_factory.mktemp("dist_fsdp4")
    _one_process(SAVED, save_at=(CHECKPOINT_STEP, dcp_folder(out, SAVED, 1)), dcp=True)
    launch([str(HERE / "dist_worker.py"), str(out), SAVE, RESUME, FROM_ONE, *TRAINED],
           world=WORLD)
    return out


def _ranks(out: Path, name: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{name}-w{WORLD}-r{r}.pt", weights_only=False)
            for r in range(WORLD)]


@pytest.mark.parametrize("name", [SAVE, RESUME, FROM_ONE, *TRAINED])
def test_ranks_take_identical_steps(runs: Path, name: str) -> None:
    first, *others = _ranks(runs, name)
    for other in others:
        assert torch.equal(_flat(first["params"]), _flat(other["params"]))


@pytest.mark.parametrize("name", [SAVE, FROM_ONE, *TRAINED])
def test_equals_one_process_on_concatenated_batch(runs: Path, name: str) -> None:
    scenario = SAVED if name != TRAINED[0] else name
    expected = _flat(_one_process(scenario)["params"])
    assert rel_err(expected, _flat(_one_process(scenario, steps=0)["params"])) > 0.1
    for result in _ranks(runs, name):
        assert rel_err(_flat(result["params"]), expected) <= RTOL_EXACT


def test_dcp_checkpoint_resumes_bit_for_bit(runs: Path) -> None:
    for uninterrupted, resumed in zip(_ranks(runs, SAVE), _ranks(runs, RESUME), strict=True):
        assert torch.equal(_flat(resumed["params"]), _flat(uninterrupted["params"]))
    # each owner read its own blocks only: together every block once
    loaded = [r["loaded_block_bytes"] for r in _ranks(runs, RESUME)]
    whole = _one_process(SAVED, steps=CHECKPOINT_STEP)["block_bytes"]
    assert sum(loaded) == whole and max(loaded) < whole


def test_dcp_checkpoint_of_four_ranks_resumes_on_one_process(runs: Path) -> None:
    expected = _flat(_one_process(SAVED)["params"])
    resumed = _one_process(SAVED, steps=STEPS - CHECKPOINT_STEP,
                           resume=dcp_folder(runs, SAVED, WORLD))
    assert rel_err(_flat(resumed["params"]), expected) <= RTOL_EXACT
