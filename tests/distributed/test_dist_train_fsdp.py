"""``natgrad train --nproc 2 --fsdp``: the model sharded with FSDP2 trains as under DDP.

Two gloo processes, float64, KFAC's defaults (sampled labels): the final training loss with
``--fsdp`` (whose default placement is ``owner``) equals the DDP run's with
``--inverse-placement owner`` (natgrad's FSDP2 path is lossless; ``owner`` and ``balanced``
differ by rounding, which the reported loss, a float32 value, can show as one ulp), on the
autoencoder and on the tied-embedding language model (its tied weight stays in the root's
FSDP unit); and a sharded run checkpointed at step 4 and resumed to step 6 equals the
uninterrupted run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dist_launch import TIMEOUT, worker_env


def _train(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "natgrad.cli", "train", "--optimizer", "kfac", "--dtype",
         "float64", "--nproc", "2", *args],
        env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("problem", "steps"), [("digits-autoencoder", "6"), ("char-gpt", "12")])
def test_fsdp_run_equals_the_ddp_run(problem: str, steps: str) -> None:
    ddp = _train("--problem", problem, "--steps", steps, "--inverse-placement", "owner")
    fsdp = _train("--problem", problem, "--steps", steps, "--fsdp")
    assert (ddp["sharding"], fsdp["sharding"]) == ("ddp", "fsdp")
    assert fsdp["final_train_loss"] == pytest.approx(ddp["final_train_loss"], rel=1e-10)


def test_fsdp_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    args = ("--problem", "digits-autoencoder", "--fsdp")
    straight = _train(*args, "--steps", "6")
    path = str(tmp_path / "run.pt")
    _train(*args, "--steps", "4", "--checkpoint", path)
    resumed = _train(*args, "--steps", "6", "--checkpoint", path)
    assert resumed["start_step"] == 4
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-10)
