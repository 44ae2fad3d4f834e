"""The optimizer registry, the configuration, training runs and the whole benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from natgrad.bench import (
    OPTIMIZERS,
    PROBLEMS,
    REFERENCE,
    BenchConfig,
    available_optimizers,
    run_bench,
    train_run,
)
from natgrad.bench.optimizers import load_tuned, save_tuned
from natgrad.bench.runner import model_size

REGRESSION = PROBLEMS["regression"]


@pytest.fixture(scope="module")
def regression_data():
    return REGRESSION.load(0)


def test_grid_is_the_cartesian_product() -> None:
    ngd = OPTIMIZERS["ngd"]
    configs = ngd.configs()
    assert len(configs) == math.prod(len(v) for v in ngd.grid.values())
    assert {"lr", "damping", "momentum"} == set(configs[0])
    assert len({tuple(sorted(c.items())) for c in configs}) == len(configs)


def test_ngd_size_rule(regression_data) -> None:
    ngd = OPTIMIZERS["ngd"]
    params, outputs = model_size(REGRESSION, regression_data)
    assert outputs == 1
    assert ngd.skip_reason(params, REGRESSION.batch_size, outputs) is None
    mlp = PROBLEMS["digits-mlp"]
    params, outputs = model_size(mlp, mlp.load(0))
    assert (params, outputs) == (26122, 10)
    assert "exceeds" in ngd.skip_reason(params, mlp.batch_size, outputs)
    assert OPTIMIZERS["adam"].skip_reason(params, mlp.batch_size, outputs) is None


def test_shipped_tuned_values_are_valid() -> None:
    tuned = load_tuned()
    assert tuned["source"] is not None, "natgrad/bench/tuned.json is not installed"
    for problem, by_optimizer in tuned["values"].items():
        assert problem in PROBLEMS
        for name, values in by_optimizer.items():
            assert name in OPTIMIZERS
            assert set(values) <= set(OPTIMIZERS[name].grid)
    assert OPTIMIZERS["adam"].hparams("no-such-problem", tuned) == OPTIMIZERS["adam"].defaults


def test_tuned_file_round_trip_and_errors(tmp_path: Path) -> None:
    tuned = {"values": {"regression": {"adam": {"lr": 0.01}}}}
    path = save_tuned(tuned | {"source": "dropped"}, tmp_path / "t.json")
    assert "source" not in json.loads(path.read_text())
    assert OPTIMIZERS["adam"].hparams("regression", load_tuned(path)) == {"lr": 0.01}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tuned values"):
        load_tuned(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        load_tuned(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"problems": ("nope",)}, "unknown problem 'nope'"),
        ({"problems": ()}, "no problems"),
        ({"optimizers": ("lbfgs",)}, "unknown optimizer 'lbfgs'"),
        ({"steps": 0}, "steps"),
        ({"seed": -1}, "seed"),
        ({"threads": 0}, "threads"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "float16"}, "dtype"),
        ({"tuned": Path("/no/such/tuned.json")}, "cannot read"),
    ],
)
def test_config_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchConfig(**changes).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_config_rejects_missing_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        BenchConfig(device="cuda").validate()


def test_reference_is_always_run_first() -> None:
    assert BenchConfig(optimizers=("sgd",)).optimizer_names() == [REFERENCE, "sgd"]
    assert BenchConfig(optimizers=("sgd", "adam")).optimizer_names() == [REFERENCE, "sgd"]
    assert BenchConfig().optimizer_names()[0] == REFERENCE
    assert set(BenchConfig().optimizer_names()) == set(available_optimizers())


def test_budgets() -> None:
    mlp = PROBLEMS["digits-mlp"]
    assert BenchConfig().budget(mlp) == (mlp.steps, mlp.eval_every(mlp.steps))
    steps, every = BenchConfig(quick=True).budget(mlp)
    assert steps == mlp.steps // 10 and 1 <= every <= steps
    assert BenchConfig(steps=3, quick=True).budget(mlp) == (3, 1)
    assert OPTIMIZERS["ngdcg"].budget(2000, 20) == (200, 2)
    assert OPTIMIZERS["adam"].budget(2000, 20) == (2000, 20)


def test_progress_bars_off_when_quiet() -> None:
    assert BenchConfig(quiet=True).progress is False


@pytest.mark.parametrize("name", available_optimizers())
def test_every_optimizer_runs_the_unchanged_loop(name: str, regression_data) -> None:
    spec = OPTIMIZERS[name]
    result = train_run(REGRESSION, regression_data, spec, spec.hparams("regression", load_tuned()),
                       steps=6, eval_every=2, seed=0)
    assert result.curve.steps == [0, 2, 4, 6]
    assert len(result.step_times) == 6 and all(t > 0 for t in result.step_times)
    assert math.isfinite(result.final_train_loss) and not result.diverged
    assert result.curve.seconds == sorted(result.curve.seconds)


def test_fixed_seed_reproduces_losses(regression_data) -> None:
    spec = OPTIMIZERS["sgd"]
    runs = [train_run(REGRESSION, regression_data, spec, {"lr": 0.05, "momentum": 0.9},
                      steps=10, eval_every=5, seed=seed) for seed in (1, 1, 2)]
    assert runs[0].curve.losses == runs[1].curve.losses
    assert runs[0].test_metric == runs[1].test_metric
    assert runs[0].curve.losses != runs[2].curve.losses


def test_divergence_stops_the_run(regression_data) -> None:
    spec = OPTIMIZERS["sgd"]
    result = train_run(REGRESSION, regression_data, spec, {"lr": 1e6, "momentum": 0.9},
                       steps=200, eval_every=1, seed=0)
    assert result.diverged and len(result.step_times) < 200
    assert math.isnan(result.test_metric)


def test_stop_at_ends_the_run_at_the_first_evaluation_at_or_below(regression_data) -> None:
    spec = OPTIMIZERS["sgd"]
    hparams = {"lr": 0.05, "momentum": 0.9}
    full = train_run(REGRESSION, regression_data, spec, hparams, steps=20, eval_every=2, seed=0)
    target = full.curve.losses[5]  # reached at step 10 (or earlier: the first loss ≤ it)
    first = next(i for i, loss in enumerate(full.curve.losses) if loss <= target)
    stopped = train_run(REGRESSION, regression_data, spec, hparams, steps=20, eval_every=2,
                        seed=0, stop_at=target)
    assert stopped.curve.steps == full.curve.steps[: first + 1]
    assert stopped.curve.losses == full.curve.losses[: first + 1]
    assert len(stopped.step_times) == stopped.curve.steps[-1] and not stopped.diverged


def test_natgrad_step_counters_are_reported(regression_data) -> None:
    kfac = train_run(REGRESSION, regression_data, OPTIMIZERS["kfac"], {}, steps=4,
                     eval_every=2, seed=0)
    assert set(kfac.counters) >= {"skipped_steps"}
    assert all(isinstance(v, int) and v >= 0 for v in kfac.counters.values())
    sgd = train_run(REGRESSION, regression_data, OPTIMIZERS["sgd"], {"lr": 0.01}, steps=2,
                    eval_every=2, seed=0)
    assert sgd.counters == {}


def test_run_bench_shape() -> None:
    config = BenchConfig(problems=("regression", "digits-mlp"), optimizers=("sgd", "ngd"),
                         steps=4, threads=1, quiet=True)
    results = run_bench(config)
    json.dumps(results, allow_nan=False)
    assert torch.get_num_threads() >= 1
    regression = results["problems"]["regression"]
    assert set(regression["runs"]) == {"adam", "sgd", "ngd"}
    assert regression["target_loss"] == regression["runs"]["adam"]["final_train_loss"]
    assert regression["runs"]["adam"]["seconds_to_target_ratio"] == 1.0
    mlp = results["problems"]["digits-mlp"]
    assert set(mlp["runs"]) == {"adam", "sgd"} and set(mlp["skipped"]) == {"ngd"}
    assert results["config"]["optimizers"] == ["adam", "sgd", "ngd"]
    assert results["tuned_values_file"].endswith("tuned.json")
