"""A worker lost mid-run under torchrun's elastic restart: nothing is lost (DDP and FSDP2).

``natgrad train`` on two gloo processes (DDP, or with ``--fsdp`` the model sharded by
``fully_shard`` and K-FAC's blocks on their owners) checkpoints every 4 steps; under
``torchrun --max-restarts=1`` rank 1 dies abruptly after step 10 on the first attempt
(:mod:`elastic_worker`). torchrun restarts both ranks, which resume from the step-8
checkpoint and finish. The result must equal, bit for bit, an uninterrupted run started by
``natgrad train --nproc 2`` (``torch.multiprocessing``): the checkpoint restores parameters,
optimizer state (factors, inverses, momentum, the adaptive damping) and each rank's own
label stream (``kfac`` samples labels for the true Fisher).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_launch import HERE, TIMEOUT, worker_env

ARGS = ["--problem", "digits-autoencoder", "--optimizer", "kfac", "--steps", "12",
        "--batch-size", "128", "--checkpoint-every", "4"]
KILL_STEP = 10


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _params(path: Path) -> list[torch.Tensor]:
    return list(torch.load(path, weights_only=False)["model"].values())


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_killed_worker_resumes_from_checkpoint(tmp_path: Path, sharding: list[str]) -> None:
    args = [*ARGS, *sharding]
    plain = subprocess.run(
        [sys.executable, "-m", "natgrad.cli", "train", *args, "--nproc", "2",
         "--checkpoint", str(tmp_path / "plain.pt")],
        env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert plain.returncode == 0, plain.stderr
    # torch shares its rendezvous store with the workers unless told not to; restarted
    # workers could then read the dead attempt's addresses (pytorch/pytorch#135712)
    marker = tmp_path / "killed"
    env = worker_env(NATGRAD_TEST_KILL_STEP=str(KILL_STEP), NATGRAD_TEST_KILL_MARKER=str(marker),
                     TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    elastic = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
         "--nproc-per-node=2", "--max-restarts=1", "--monitor-interval=0.2",
         str(HERE / "elastic_worker.py"), *args, "--checkpoint", str(tmp_path / "elastic.pt")],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert elastic.returncode == 0, elastic.stdout + elastic.stderr
    # the worker did die (torchrun reports whichever rank failed first: the killed one's
    # exit code 17, or the survivor's abort when its collective lost the peer) ...
    assert marker.read_text() == str(KILL_STEP)
    assert "failed (exitcode:" in elastic.stderr
    restarted = _summary(elastic.stdout)
    assert restarted["start_step"] == 8  # ... and the run resumed at the last checkpoint
    assert restarted["processes"] == 2
    assert restarted.get("sharding") == ("fsdp" if sharding else "ddp")
    expected = _summary(plain.stdout)
    assert restarted["final_train_loss"] == expected["final_train_loss"]
    for a, b in zip(_params(tmp_path / "plain.pt"), _params(tmp_path / "elastic.pt"), strict=True):
        assert torch.equal(a, b)
