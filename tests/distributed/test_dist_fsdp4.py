"""FSDP2 and HSDP on 4 gloo processes: one launch, tiny models, each run checked against one
process.

The launch (module fixture) trains, on 4 ranks of 4 rows each and with the default placement
under sharding (``"owner"``): KFAC and EKFAC under ``fully_shard`` over all 4 ranks, and KFAC
under HSDP (a 2 × 2 mesh: shards within pairs of ranks, replicated over the pairs). Each run
saves a DCP checkpoint (:mod:`natgrad.distributed.dcp`) half way and is resumed from it on
the 4 ranks; a DCP checkpoint that one process saved is resumed too. Checked: the ranks'
whole parameters are bit-identical; each run equals one process on the concatenated batch
(float64, relative error ≤ RTOL_EXACT); the 4-rank checkpoints resume on 4 ranks bit for bit
(EKFAC's cached eigenbases rebuilt from the owners) and on one process equal to it; each
owner reads only its own blocks; each rank keeps (and loads) only its rows of the momentum,
HSDP's within its shard group; HSDP's all-gathers span its shard group of 2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_launch import HERE, launch
from dist_worker import (
    CHECKPOINT_STEP,
    FSDP_CHECKPOINTED,
    STEPS,
    build_model,
    dcp_folder,
    flat,
    one_process,
)

from conftest import RTOL_EXACT, rel_err

pytestmark = pytest.mark.usefixtures("single_thread")

WORLD = 4
HSDP = "hsdp-kfac-empirical-auto"
# KFAC (inverse_placement="owner" given), EKFAC and HSDP KFAC (owner by default); automatic
# lr, momentum and damping; the empirical Fisher (deterministic)
SAVED = (FSDP_CHECKPOINTED, "fsdp-ekfac-empirical-auto", HSDP)
FROM_ONE = f"dcp-resume-w1-{FSDP_CHECKPOINTED}"
RUNS = [*(f"dcp-save-{n}" for n in SAVED), *(f"dcp-resume-w{WORLD}-{n}" for n in SAVED),
        FROM_ONE]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the four-rank results (and of the one-process checkpoint they resume)."""
    out = tmp_path_factory.mktemp("dist_fsdp4")
    one_process(FSDP_CHECKPOINTED, save_at=(CHECKPOINT_STEP, dcp_folder(out, FSDP_CHECKPOINTED,
                                                                         1)), dcp=True)
    launch([str(HERE / "dist_worker.py"), str(out), *RUNS], world=WORLD)
    return out


def _ranks(out: Path, name: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{name}-w{WORLD}-r{r}.pt", weights_only=False)
            for r in range(WORLD)]


@pytest.mark.parametrize("name", RUNS)
def test_ranks_take_identical_steps(runs: Path, name: str) -> None:
    first, *others = _ranks(runs, name)
    assert first["placement"] == "owner"
    for other in others:
        assert torch.equal(flat(first["params"]), flat(other["params"]))


@pytest.mark.parametrize("name", [*SAVED, FROM_ONE])
def test_equals_one_process_on_concatenated_batch(runs: Path, name: str) -> None:
    scenario = FSDP_CHECKPOINTED if name == FROM_ONE else name
    expected = flat(one_process(scenario)["params"])
    assert rel_err(expected, flat(one_process(scenario, steps=0)["params"])) > 0.1
    run = name if name == FROM_ONE else f"dcp-save-{name}"
    for result in _ranks(runs, run):
        assert rel_err(flat(result["params"]), expected) <= RTOL_EXACT


@pytest.mark.parametrize("name", SAVED)
def test_dcp_checkpoint_resumes_bit_for_bit(runs: Path, name: str) -> None:
    uninterrupted = _ranks(runs, f"dcp-save-{name}")
    resumed = _ranks(runs, f"dcp-resume-w{WORLD}-{name}")
    for before, after in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(flat(after["params"]), flat(before["params"]))
    # each owner read its own blocks only: together every block once
    loaded = [r["loaded_block_bytes"] for r in resumed]
    whole = one_process(name, steps=CHECKPOINT_STEP)["block_bytes"]
    assert sum(loaded) == whole and max(loaded) < whole


def test_dcp_checkpoint_of_four_ranks_resumes_onone_process(runs: Path) -> None:
    expected = flat(one_process(FSDP_CHECKPOINTED)["params"])
    resumed = one_process(FSDP_CHECKPOINTED, steps=STEPS - CHECKPOINT_STEP,
                           resume=dcp_folder(runs, FSDP_CHECKPOINTED, WORLD))
    assert rel_err(flat(resumed["params"]), expected) <= RTOL_EXACT
    whole = sum(p.numel() for p in build_model().parameters()) * 8
    assert resumed["loaded_momentum_bytes"] == whole  # the 4 ranks' rows of δ₀, read whole


def test_hsdp_gathers_within_its_shard_group(runs: Path) -> None:
    # HSDP all-gathers the gradient and the parameters over its 2 shards (⌈d₀/2⌉ rows of each
    # parameter), FSDP2 over all 4 ranks (⌈d₀/4⌉); the rest of natgrad's exchange (statistics,
    # owners, directions over all 4 ranks) is the same, byte for byte
    def rows(shards: int) -> int:
        return sum(math.ceil(p.shape[0] / shards) * p[0].numel()
                   for p in build_model().parameters())

    hsdp = _ranks(runs, f"dcp-save-{HSDP}")[0]
    fsdp = _ranks(runs, f"dcp-save-{FSDP_CHECKPOINTED}")[0]
    # two all-gathers per step, and one of the momentum per step with a δ₀
    assert hsdp["momentum_steps"] == fsdp["momentum_steps"] >= STEPS // 2
    gathers = 2 * STEPS + hsdp["momentum_steps"]
    assert hsdp["bytes"] - fsdp["bytes"] == gathers * (rows(2) - rows(4)) * 8
    assert hsdp["calls"] == fsdp["calls"] > 0


@pytest.mark.parametrize("name", [*(f"dcp-resume-w{WORLD}-{n}" for n in SAVED), FROM_ONE])
def test_momentum_is_each_ranks_rows(runs: Path, name: str) -> None:
    # after loading (from 4 ranks' rows, or from one process's whole δ₀) and at the end:
    # FSDP2's 4 ranks hold one δ₀ together, HSDP's shard groups (ranks 0, 1 and 2, 3) each one
    whole = sum(p.numel() for p in build_model().parameters()) * 8
    groups = [[0, 1], [2, 3]] if HSDP in name else [[0, 1, 2, 3]]
    ranks = _ranks(runs, name)
    for key in ("loaded_momentum_bytes", "momentum_bytes"):
        for group in groups:
            held = [ranks[r][key] for r in group]
            assert sum(held) == whole and all(0 < b < whole for b in held)
