"""``natgrad train`` on one process: table and JSON, checkpoint and resume, usage errors.

The data-parallel runs (``--nproc 2``, ``--fsdp``, ``torchrun``) are in tests/distributed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from natgrad.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

FLAGS = ("--problem", "--optimizer", "--steps", "--batch-size", "--nproc", "--seed",
         "--device", "--dtype", "--backend", "--threads", "--checkpoint",
         "--checkpoint-every", "--inverse-placement", "--tuned", "--fsdp")
QUICK = ["--problem", "regression", "--optimizer", "kfac", "--dtype", "float64"]


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert main(["train", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("natgrad train: regression, kfac, 1 process")
    assert "final train loss" in lines[1] and "bytes/step" in lines[1]
    return json.loads(lines[-1])  # one JSON line last


def test_help_lists_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in text
    assert "torchrun" in text


def test_one_process_run(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run([*QUICK, "--steps", "5"], capsys)
    assert (result["processes"], result["steps"], result["start_step"]) == (1, 5, 0)
    assert result["natgrad_bytes_per_step"] == result["ddp_bytes_per_step"] == 0
    assert result["final_train_loss"] > 0 and result["median_step_seconds"] > 0


def test_checkpoint_resumes_where_it_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.pt"
    straight = _run([*QUICK, "--steps", "9"], capsys)
    _run([*QUICK, "--steps", "6", "--checkpoint", str(path), "--checkpoint-every", "4"], capsys)
    assert torch.load(path, weights_only=False)["step"] == 6  # the last step is saved too
    resumed = _run([*QUICK, "--steps", "9", "--checkpoint", str(path)], capsys)
    assert resumed["start_step"] == 6
    assert resumed["final_train_loss"] == straight["final_train_loss"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--problem", "nope"], "invalid choice"),
        (["--nproc", "0"], "positive integer"),
        (["--steps", "x"], "positive integer"),
        ([*QUICK, "--nproc", "3", "--batch-size", "64"], "divisible"),
        (["--problem", "regression", "--optimizer", "ngd", "--nproc", "2"],
         "does not support data parallelism"),
        (["--backend", "nccl"], "needs --device cuda"),
        (["--inverse-placement", "nowhere"], "invalid choice"),
        ([*QUICK, "--fsdp"], "--fsdp shards the model over processes"),
    ],
)
def test_usage_errors_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]


def test_checkpoint_of_another_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.pt"
    _run([*QUICK, "--steps", "2", "--checkpoint", str(path)], capsys)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--problem", "digits-mlp", "--checkpoint", str(path)])
    assert exit_info.value.code == 2
    assert "was written with problem 'regression'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
