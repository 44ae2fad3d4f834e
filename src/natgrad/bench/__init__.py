"""natgrad's benchmark: optimizers compared on problems whose data ships with the install.

Modules: ``data`` (bundled data sets and splits), ``problems`` (models, likelihoods, losses,
budgets), ``optimizers`` (the optimizer registry and tuned values), ``runner`` (training
runs and :class:`BenchConfig`), ``results`` (target, steps and seconds to target),
``report`` (table, ``results.json``, plots) and ``tune`` (hyper-parameter grids). Nothing
here parses arguments: the ``natgrad bench`` command builds a :class:`BenchConfig`.

Example:
    >>> from natgrad.bench import BenchConfig, run_bench, format_table
    >>> results = run_bench(BenchConfig(problems=("regression",), quick=True))
    >>> print(format_table(results))
"""

from natgrad.bench.optimizers import OPTIMIZERS, REFERENCE, OptimizerSpec, available_optimizers
from natgrad.bench.problems import PROBLEMS, Problem
from natgrad.bench.report import format_table, summary_line, write_report
from natgrad.bench.runner import BenchConfig, run_bench, train_run
from natgrad.bench.tune import run_tuning

__all__ = [
    "OPTIMIZERS",
    "PROBLEMS",
    "REFERENCE",
    "BenchConfig",
    "OptimizerSpec",
    "Problem",
    "available_optimizers",
    "format_table",
    "run_bench",
    "run_tuning",
    "summary_line",
    "train_run",
    "write_report",
]
