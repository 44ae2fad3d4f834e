"""KFAC, EKFAC and NGDCG on models sharded with FSDP2 (``fully_shard``): 2 gloo processes.

One launch (module fixture) runs the ``fsdp-`` scenarios of :mod:`dist_worker` (every Linear
and the model wrapped with ``fully_shard``, parameters DTensors sharded on dim 0), the DDP
scenarios they mirror, a sharded checkpoint and its resumption, and the optimizers' errors
for sharded models they do not support. Checked: the ranks' whole (all-gathered) parameters
are bit-identical; the runs equal one process on the concatenated batch (float64, relative
error ≤ RTOL_EXACT) where the run is deterministic, and the DDP run of the same scenario in
every case (the true Fisher's sampled labels included: both draw with seed + rank); natgrad's
own traffic is DDP's plus two all-gathers of the padded shards per step and one more per
step that has a momentum δ₀, of which each rank keeps only its rows (also after loading any
of the checkpoints below, and in a DCP checkpoint, which every rank writes its rows of); with
``inverse_placement="owner"`` each block's factors and inverses are on exactly one rank; a
run resumed from its ranks' own state dicts continues bit for bit; natgrad's checkpoint (the
sharded model saved whole) moves between one process and two sharded ones; a DCP checkpoint
(:mod:`natgrad.distributed.dcp`) resumes on two ranks bit for bit (the true Fisher's label
streams included) and on one process equal to it, each owner reading only its own blocks.
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
    FSDP_SCENARIOS,
    STEPS,
    build_model,
    dcp_folder,
    flat,
    one_process,
)

from conftest import RTOL_EXACT, rel_err

pytestmark = pytest.mark.usefixtures("single_thread")

SHARDED = [name for name, s in FSDP_SCENARIOS.items() if not s.hsdp]  # HSDP: 4 ranks
EXACT = [name for name in SHARDED if FSDP_SCENARIOS[name].exact]
# sharded scenario -> the DDP scenario it must equal
MIRRORED = {"fsdp-kfac-empirical-auto": "kfac-empirical-auto",
            "fsdp-kfac-true-auto": "kfac-true-auto",
            "fsdp-kfac-owner-true-auto": "kfac-true-auto"}
WORLD = 2
DCP_SAME = "fsdp-kfac-owner-true-auto"  # DCP: resumed on the same world size, bit for bit
DCP = (DCP_SAME, FSDP_CHECKPOINTED, "kfac-empirical-auto", "ekfac-empirical-auto-inv3")
# EKFAC saved under DDP ("balanced": no eigenbasis versions) continued under FSDP2 ("owner"),
# starting on a statistics step without a refresh
DCP_ACROSS = f"dcp-resume-w{WORLD}-ekfac-empirical-auto-inv3@fsdp-ekfac-empirical-auto-inv3"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the two-rank results (and of a one-process checkpoint they resume)."""
    out = tmp_path_factory.mktemp("dist_fsdp")
    one_process(FSDP_CHECKPOINTED, save_at=(CHECKPOINT_STEP, out / "checkpoint-w1.pt"))
    ddp = sorted(set(MIRRORED.values()))
    launch([str(HERE / "dist_worker.py"), str(out), *SHARDED, *ddp, "fsdp-checkpoint",
            "fsdp-resume", "fsdp-save", "fsdp-resume-w1", "fsdp-errors",
            *(f"dcp-save-{name}" for name in DCP), f"dcp-resume-w{WORLD}-{DCP_SAME}",
            DCP_ACROSS],
           world=WORLD)
    return out


def _ranks(out: Path, name: str) -> tuple[Any, ...]:
    return tuple(torch.load(out / f"{name}-w{WORLD}-r{r}.pt", weights_only=False)
                 for r in range(WORLD))


@pytest.mark.parametrize("name", [*SHARDED, "fsdp-resume", "fsdp-resume-w1"])
def test_ranks_take_identical_steps(runs: Path, name: str) -> None:
    first, second = _ranks(runs, name)
    for a, b in zip(first["params"], second["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", EXACT)
def test_equals_one_process_on_concatenated_batch(runs: Path, name: str) -> None:
    expected = flat(one_process(name)["params"])
    start = flat(one_process(name, steps=0)["params"])
    assert rel_err(expected, start) > 0.1  # the runs went somewhere
    for result in _ranks(runs, name):
        assert rel_err(flat(result["params"]), expected) <= RTOL_EXACT


@pytest.mark.parametrize("name", MIRRORED)
def test_equals_ddp(runs: Path, name: str) -> None:
    for sharded, replicated in zip(_ranks(runs, name), _ranks(runs, MIRRORED[name]),
                                   strict=True):
        assert rel_err(flat(sharded["params"]), flat(replicated["params"])) <= RTOL_EXACT


def test_traffic_is_ddp_plus_the_all_gathers(runs: Path) -> None:
    # each step all-gathers the gradient and the parameters, and each step with a δ₀ the
    # momentum (its rows on each rank): every parameter's dim-0 shard padded to ⌈d₀/W⌉ rows,
    # float64; the rest (statistics, inverses, the quadratic model's terms) is the
    # data-parallel exchange, byte for byte (with DDP's default placement)
    shard = sum(math.ceil(p.shape[0] / WORLD) * p[0].numel() for p in build_model().parameters())
    sharded, _ = _ranks(runs, "fsdp-kfac-balanced-empirical-auto")
    replicated, _ = _ranks(runs, "kfac-empirical-auto")
    assert sharded["momentum_steps"] == replicated["momentum_steps"] >= STEPS // 2
    gathers = 2 * STEPS + sharded["momentum_steps"]
    assert sharded["bytes"] - replicated["bytes"] == gathers * shard * 8
    assert sharded["calls"] - replicated["calls"] == gathers


def _momentum_bytes() -> int:
    """Bytes of a δ₀ for every parameter of build_model (float64)."""
    return sum(p.numel() for p in build_model().parameters()) * 8


@pytest.mark.parametrize("name", ["fsdp-kfac-empirical-fixed", "fsdp-kfac-empirical-auto",
                                  "fsdp-odd-kfac-empirical-auto", "fsdp-kfac-owner-true-auto"])
def test_momentum_is_sharded_like_the_parameters(runs: Path, name: str) -> None:
    # each rank keeps its rows of δ₀ (uneven for the odd model: 4 + 3 of 7): together the
    # one-process δ₀, each row once
    whole = one_process(name)["momentum_bytes"]
    assert whole > 0
    held = [r["momentum_bytes"] for r in _ranks(runs, name)]
    assert sum(held) == whole and all(0 < b < whole for b in held)


@pytest.mark.parametrize("name", ["fsdp-resume", "fsdp-resume-w1",
                                  f"dcp-resume-w{WORLD}-{DCP_SAME}", DCP_ACROSS])
def test_loaded_momentum_is_each_ranks_rows(runs: Path, name: str) -> None:
    # checkpoints after CHECKPOINT_STEP steps (every parameter has a δ₀), saved by the ranks
    # themselves (their rows), by one process or by DDP (whole), loaded by two sharded ranks
    loaded = [r["loaded_momentum_bytes"] for r in _ranks(runs, name)]
    assert sum(loaded) == _momentum_bytes() and all(0 < b < _momentum_bytes() for b in loaded)


def test_dcp_checkpoint_holds_each_ranks_momentum_rows(runs: Path) -> None:
    import torch.distributed.checkpoint as dcp

    def chunks(name: str) -> list[int]:
        metadata = dcp.FileSystemReader(dcp_folder(runs, name, WORLD)).read_metadata()
        return [len(md.chunks) for key, md in metadata.state_dict_metadata.items()
                if key.endswith("/previous_update")]

    params = len(list(build_model().parameters()))
    assert chunks(DCP_SAME) == [WORLD] * params  # FSDP2: each rank wrote its rows
    assert chunks("kfac-empirical-auto") == [1] * params  # DDP: the whole, once


def test_owner_placement_trades_inverse_broadcasts_for_directions(runs: Path) -> None:
    # "owner" (FSDP2's default): every step the owners broadcast their blocks' directions
    # (every parameter with a block: all but Scale's), instead of the inverses at each refresh
    # (K-FAC: A⁻¹ and G⁻¹ of both Linear layers and the LayerNorm's (F + λI)⁻¹); the
    # statistics (every step here) go to their owners, one reduce per owning rank, the
    # counts and one finiteness flag per block (3 blocks) in an all-reduce: the same bytes
    # but the flags, sent once each instead of twice by a ring all-reduce
    model = build_model()
    with_block = sum(p.numel() for p in model.parameters()) - model[4].weight.numel()
    inverses = 7 * 7 + 8 * 8 + 16 * 16 + 9 * 9 + 4 * 4
    owner, _ = _ranks(runs, "fsdp-kfac-empirical-auto")
    balanced, _ = _ranks(runs, "fsdp-kfac-balanced-empirical-auto")
    assert owner["placement"] == "owner" and balanced["placement"] == "balanced"
    saved = STEPS * (with_block + 3) * 8 - (owner["bytes"] - balanced["bytes"])
    refreshes, rest = divmod(saved, inverses * 8)
    assert rest == 0 and 1 <= refreshes <= STEPS
    # calls per step: 2 reduces (both ranks own blocks) and 2 direction broadcasts; per
    # refresh 2 inverse broadcasts fewer
    assert owner["calls"] - balanced["calls"] == STEPS * 4 - refreshes * 2


@pytest.mark.parametrize("name", ["fsdp-kfac-empirical-auto", "fsdp-ekfac-empirical-auto"])
def test_owner_placement_holds_each_block_once(runs: Path, name: str) -> None:
    # "owner": every block's factors and inverses (EKFAC: eigenbases and scaling) on exactly
    # one rank, none elsewhere; "balanced": every block on every rank
    whole = one_process(name)["block_bytes"]
    assert whole > 0
    owned = [r["block_bytes"] for r in _ranks(runs, name)]
    assert sum(owned) == whole and all(0 < b < whole for b in owned)
    if name.startswith("fsdp-kfac"):
        balanced = _ranks(runs, "fsdp-kfac-balanced-empirical-auto")
        assert all(r["block_bytes"] == whole for r in balanced)


def test_ekfac_owner_caches_other_ranks_eigenbases(runs: Path) -> None:
    # EKFAC's scaling statistics project every rank's samples onto the eigenbases: each rank
    # caches those of the blocks it does not own (Linear(6, 8): 8² + 7², Linear(8, 4): 4² + 9²)
    ranks = _ranks(runs, "fsdp-ekfac-empirical-auto")
    assert [r["placement"] for r in ranks] == ["owner", "owner"]
    assert sorted(r["cached_bytes"] for r in ranks) == sorted([0, (64 + 49 + 16 + 81) * 8])


def test_sharded_checkpoint_resumes_bit_for_bit(runs: Path) -> None:
    uninterrupted, _ = _ranks(runs, "fsdp-checkpoint")
    for resumed in _ranks(runs, "fsdp-resume"):
        assert torch.equal(flat(resumed["params"]), flat(uninterrupted["params"]))


def test_whole_checkpoint_moves_between_one_process_and_sharded(runs: Path) -> None:
    expected = flat(one_process(FSDP_CHECKPOINTED)["params"])
    # two sharded ranks saved whole after CHECKPOINT_STEP steps; one process continues
    resumed = one_process(FSDP_CHECKPOINTED, steps=STEPS - CHECKPOINT_STEP,
                           resume=runs / "fsdp-whole.pt")
    assert rel_err(flat(resumed["params"]), expected) <= RTOL_EXACT
    assert resumed["loaded_momentum_bytes"] == _momentum_bytes()  # gathered whole
    # one process saved; two sharded ranks continue
    for result in _ranks(runs, "fsdp-resume-w1"):
        assert rel_err(flat(result["params"]), expected) <= RTOL_EXACT


def test_unsupported_sharded_models_are_named(runs: Path) -> None:
    messages, _ = _ranks(runs, "fsdp-errors")
    assert messages["NaturalGradient"].startswith("TypeError: NaturalGradient does not")
    assert messages["dim1"].startswith("ValueError: model: parameter")
    assert "Shard(dim=1)" in messages["dim1"] and "HSDP" in messages["dim1"]


def test_dcp_checkpoint_resumes_bit_for_bit(runs: Path) -> None:
    # saved after CHECKPOINT_STEP steps of an uninterrupted run with sampled labels (each
    # rank's label stream in the checkpoint); resumed on as many ranks
    for uninterrupted, resumed in zip(_ranks(runs, f"dcp-save-{DCP_SAME}"),
                                      _ranks(runs, f"dcp-resume-w{WORLD}-{DCP_SAME}"),
                                      strict=True):
        assert torch.equal(flat(resumed["params"]), flat(uninterrupted["params"]))
    # "owner": each rank read only its own blocks, together every block once
    loaded = [r["loaded_block_bytes"] for r in _ranks(runs, f"dcp-resume-w{WORLD}-{DCP_SAME}")]
    whole = one_process(DCP_SAME, steps=CHECKPOINT_STEP)["block_bytes"]
    assert sum(loaded) == whole and all(0 < b < whole for b in loaded)


@pytest.mark.parametrize("name", [FSDP_CHECKPOINTED, "kfac-empirical-auto"])
def test_dcp_checkpoint_resumes_onone_process(runs: Path, name: str) -> None:
    # two ranks (sharded with owner placement, or DDP) saved; one process continues
    expected = flat(one_process(name)["params"])
    resumed = one_process(name, steps=STEPS - CHECKPOINT_STEP,
                           resume=dcp_folder(runs, name, WORLD))
    assert rel_err(flat(resumed["params"]), expected) <= RTOL_EXACT
    assert resumed["loaded_momentum_bytes"] == _momentum_bytes()  # the ranks' rows, whole


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_fsdp_matchesone_process(tmp_path: Path) -> None:
    # FSDP2 on two GPUs over NCCL (owner placement by default), and a DCP checkpoint resumed
    # on them
    saved = f"dcp-save-{FSDP_CHECKPOINTED}"
    names = ["fsdp-ekfac-empirical-auto", saved, f"dcp-resume-w{WORLD}-{FSDP_CHECKPOINTED}"]
    launch([str(HERE / "dist_worker.py"), str(tmp_path), *names], DIST_BACKEND="nccl")
    for name in names[:2]:
        expected = flat(one_process(name.removeprefix("dcp-save-"))["params"])
        for result in _ranks(tmp_path, name):
            # looser: the reference runs on the CPU, whose float64 kernels sum in another order
            assert rel_err(flat(result["params"]), expected) <= 1e-8
    for uninterrupted, resumed in zip(_ranks(tmp_path, saved), _ranks(tmp_path, names[2]),
                                      strict=True):
        assert torch.equal(flat(resumed["params"]), flat(uninterrupted["params"]))


def test_dcp_checkpoint_of_ddp_resumes_under_fsdp(runs: Path) -> None:
    # EKFAC saved by two DDP ranks ("balanced") continues on two FSDP2 ranks ("owner": the
    # owners broadcast their eigenbases at the first statistics step), equal to one process
    expected = flat(one_process("ekfac-empirical-auto-inv3")["params"])
    for result in _ranks(runs, DCP_ACROSS):
        assert result["placement"] == "owner"
        assert rel_err(flat(result["params"]), expected) <= RTOL_EXACT
