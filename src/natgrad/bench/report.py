"""Reports of a benchmark run: a table for people, ``results.json``, PNG plots, a JSON line.

Everything here reads the ``results.json`` object returned by
:func:`natgrad.bench.runner.run_bench` (or read back from disk), so a saved run can be
re-reported without re-running it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_FILE",
    "format_table",
    "format_tuning",
    "plot_problem",
    "summary_line",
    "write_report",
    "write_results",
]

RESULTS_FILE = "results.json"
COLUMNS = (
    "optimizer",
    "steps",
    "final train loss",
    "{metric}",
    "median step ms",
    "steps to target",
    "s to target",
    "s / adam's",
)


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [
        line(row) for row in rows
    ]


def format_table(results: Mapping[str, Any]) -> str:
    """One Markdown table per problem: rows are optimizers, columns the measured quantities.

    Columns: steps run, final full-training-set loss, the test metric (accuracy or test
    loss), median step time in milliseconds, steps and optimizer-step seconds until the
    training loss first reaches the target, and those seconds divided by Adam's ("-" where
    a value does not exist, e.g. a run that never reaches the target).
    """
    blocks = []
    for name, problem in results["problems"].items():
        metric = problem.get("test_metric_name", "test metric")
        target = _number(problem["target_loss"])
        title = (
            f"## {name} ({problem.get('loss', '?')}, "
            f"{problem.get('steps', '?')} steps of batch {problem.get('batch_size', '?')}; "
            f"target loss {target} = Adam's final train loss)"
        )
        header = [c.format(metric=metric) for c in COLUMNS]
        rows = []
        for opt, run in problem["runs"].items():
            metric_value = run["test_metric"]
            shown = _number(metric_value * 100, 4) + " %" if (
                metric == "accuracy" and metric_value is not None
            ) else _number(metric_value)
            step_ms = run["step_time_median_s"]
            rows.append([
                opt + (" (diverged)" if run.get("diverged") else ""),
                str(run.get("steps", "?")),
                _number(run["final_train_loss"]),
                shown,
                _number(None if step_ms is None else step_ms * 1e3, 3),
                "-" if run["steps_to_target"] is None else str(run["steps_to_target"]),
                _number(run["seconds_to_target"], 3),
                _number(run["seconds_to_target_ratio"], 3),
            ])
        lines = [title, "", *_markdown(header, rows)]
        for opt, reason in problem.get("skipped", {}).items():
            lines.append(f"skipped {opt}: {reason}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_tuning(tuned: Mapping[str, Any], problems: Sequence[str]) -> str:
    """The chosen hyper-parameters of ``natgrad bench --tune`` as one Markdown table."""
    rows = []
    for problem in problems:
        for opt, values in tuned.get("values", {}).get(problem, {}).items():
            shown = (f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in values.items())
            rows.append([problem, opt, ", ".join(shown)])
    return "\n".join(_markdown(["problem", "optimizer", "chosen hyper-parameters"], rows))


def write_results(results: Mapping[str, Any], out: Path) -> Path:
    """Write ``results`` as ``out/results.json`` (indented; None for missing numbers)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def plot_problem(name: str, problem: Mapping[str, Any], out: Path) -> list[Path]:
    """Two PNGs for one problem: training loss vs steps and vs optimizer-step seconds.

    The loss axis is logarithmic; Adam's final loss (the target) is a dashed line.

    Returns:
        The paths written: ``out/NAME-loss-vs-steps.png`` and ``out/NAME-loss-vs-seconds.png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    unit = problem.get("loss", "loss")
    paths = []
    for axis, label in (("steps", "optimizer steps"),
                        ("seconds", "wall-clock seconds of optimizer steps (s)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for opt, run in problem["runs"].items():
            curve = run.get("curve")
            if not curve:
                continue
            points = [(x, y) for x, y in zip(curve[axis], curve["train_loss"], strict=True)
                      if x is not None and y is not None and y > 0]
            if points:
                ax.plot(*zip(*points, strict=True), label=opt, linewidth=1.5)
        if problem.get("target_loss") is not None and problem["target_loss"] > 0:
            ax.axhline(problem["target_loss"], color="grey", linestyle="--", linewidth=1,
                       label="target (Adam's final loss)")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"full training-set loss ({unit})")
        ax.set_title(f"{name}: training loss vs {axis}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{name}-loss-vs-{axis}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(results: Mapping[str, Any], out: Path) -> list[Path]:
    """Write ``results.json`` and every problem's plots into ``out``; the paths written."""
    paths = [write_results(results, out)]
    for name, problem in results["problems"].items():
        paths.extend(plot_problem(name, problem, out))
    return paths


def summary_line(results: Mapping[str, Any], out: Path) -> str:
    """One JSON line: where the results are, the wall time, and each seconds-to-target ratio.

    Example line: ``{"results": "natgrad-bench/results.json", "wall_seconds": 140.2,
    "target_loss": {"digits-mlp": 0.0031}, "seconds_to_target_ratio": {"digits-mlp":
    {"adam": 1.0, "sgd": null}}}``.
    """
    problems = results["problems"]
    summary = {
        "results": str(out / RESULTS_FILE),
        "wall_seconds": round(results.get("wall_seconds", math.nan), 2),
        "target_loss": {name: p["target_loss"] for name, p in problems.items()},
        "seconds_to_target_ratio": {
            name: {opt: (None if run["seconds_to_target_ratio"] is None
                         else round(run["seconds_to_target_ratio"], 4))
                   for opt, run in p["runs"].items()}
            for name, p in problems.items()
        },
    }
    return json.dumps(summary, allow_nan=False)
