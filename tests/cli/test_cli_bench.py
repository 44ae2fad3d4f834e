"""The ``natgrad`` command: help, smoke runs of ``bench`` and ``bench --tune``, usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from natgrad.bench import OPTIMIZERS
from natgrad.cli import main

BENCH_FLAGS = ("--problems", "--optimizers", "--steps", "--seed", "--quick", "--threads",
               "--device", "--dtype", "--out", "--quiet", "--tune")


def test_help_lists_commands_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in BENCH_FLAGS:
        assert flag in text
    for name in ("digits-mlp", "mnist-autoencoder", "regression", "adam", "ngd"):
        assert name in text


def test_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    status = main(["bench", "--quick", "--problems", "regression", "--optimizers", "adam,sgd",
                   "--steps", "6", "--out", str(out), "--quiet", "--seed", "3"])
    assert status == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(stdout[-1])  # one JSON line last
    assert set(summary["seconds_to_target_ratio"]["regression"]) == {"adam", "sgd"}
    assert any(line.startswith("| adam") for line in stdout)

    results = json.loads((out / "results.json").read_text())
    problem = results["problems"]["regression"]
    assert isinstance(problem["target_loss"], float)
    assert set(problem["runs"]) == {"adam", "sgd"}
    for run in problem["runs"].values():
        assert isinstance(run["final_train_loss"], float)
        assert isinstance(run["test_metric"], float)
        assert isinstance(run["step_time_median_s"], float) and run["step_time_median_s"] > 0
        assert run["steps_to_target"] is None or isinstance(run["steps_to_target"], int)
        assert run["seconds_to_target"] is None or isinstance(run["seconds_to_target"], float)
    assert problem["runs"]["adam"]["steps_to_target"] is not None
    for axis in ("steps", "seconds"):
        png = out / f"regression-loss-vs-{axis}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_tune_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["bench", "--tune", "--problems", "regression", "--optimizers", "adam",
                   "--steps", "3", "--out", str(tmp_path), "--quiet"])
    assert status == 0
    tuned = json.loads((tmp_path / "tuned.json").read_text())
    assert set(tuned["values"]["regression"]["adam"]) == {"lr"}
    trials = json.loads((tmp_path / "tuning.json").read_text())
    grid = OPTIMIZERS["adam"].configs()
    assert len(trials["problems"]["regression"]["trials"]["adam"]) == len(grid)
    assert tuned["values"]["regression"]["adam"] in grid
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tuned"]


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--no-such-flag"],
        ["bench", "--steps", "0"],
        ["bench", "--steps", "ten"],
        ["bench", "--seed", "-1"],
        ["bench", "--threads", "0"],
        ["bench", "--device", "tpu"],
        ["bench", "--dtype", "float16"],
        ["bench", "--problems", "digits-mlp,nope"],
        ["bench", "--problems", "digits-mlp,"],
        ["bench", "--optimizers", "lbfgs"],
        ["bench", "--tuned", "/no/such/file.json"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("natgrad") and "error:" in err[-1]
    assert sum("error:" in line for line in err) == 1


def test_console_script_exit_status() -> None:
    script = Path(sys.executable).with_name("natgrad")
    if not script.exists():
        pytest.skip("natgrad console script not installed next to this Python")
    done = subprocess.run([str(script), "bench", "--problems", "nope"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown problem 'nope'" in done.stderr
