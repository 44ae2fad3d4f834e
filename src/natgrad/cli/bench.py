"""``natgrad bench``: compare the optimizers on problems whose data ships with the install.

The arguments become a :class:`natgrad.bench.BenchConfig`; its validation errors (an unknown
problem, a CUDA device that is not there, ...) are reported like argparse's own: one
``error:`` line and exit status 2.

Output: a progress bar per run on stderr (only on a terminal, and not with ``--quiet``),
one table per problem on stdout, ``results.json`` and two PNG plots per problem in
``--out``, and one JSON summary line printed last. With ``--tune`` the hyper-parameter
grids run instead, and ``tuned.json`` (the chosen values) and ``tuning.json`` (every
trial) are written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from natgrad.bench import OPTIMIZERS, PROBLEMS, REFERENCE, BenchConfig
from natgrad.bench.optimizers import NGD_MAX_JACOBIAN, save_tuned
from natgrad.cli.args import positive_int, seed

__all__ = ["add_parser", "run"]

DESCRIPTION = f"""\
Train every problem with every optimizer and compare them.

Each problem's target loss is the full-training-set loss that {REFERENCE} (with its tuned
learning rate) reaches at the end of its step budget in the same run; {REFERENCE} is
therefore always run. Time to target counts only the optimizer steps (forward, backward,
step), not the periodic evaluations. Every optimizer of a problem starts from the same
weights and sees the same minibatches; a fixed --seed reproduces the losses on one machine
(timings vary). The default run takes about six and a half minutes on two CPU cores without
the optional peers (--quick: about one minute).
"""


def _epilog() -> str:
    lines = ["problems:"]
    lines += [f"  {name:<20} {p.description} ({p.steps} steps)" for name, p in PROBLEMS.items()]
    lines.append("optimizers:")
    for name, spec in OPTIMIZERS.items():
        note = "" if spec.available else (
            " [not installed: pip install 'natgrad[peers]']" if spec.requires
            else " [not in this natgrad install]"
        )
        lines.append(f"  {name:<20} {spec.description}{note}")
    lines.append(
        f"ngd runs only where batch*outputs*parameters <= {NGD_MAX_JACOBIAN:.0e} (exact Fisher)."
    )
    lines.append("Hyper-parameters come from natgrad/bench/tuned.json (see --tune, --tuned).")
    return "\n".join(lines)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return names


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``natgrad`` parser's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="compare the optimizers on bundled data (table, results.json, plots)",
        description=DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--problems", type=_names, metavar="LIST",
                        help="comma-separated problems to run (default: all, listed below)")
    parser.add_argument("--optimizers", type=_names, metavar="LIST",
                        help=f"comma-separated optimizers (default: all available, listed "
                        f"below); {REFERENCE} is always added, it defines the target")
    parser.add_argument("--steps", type=positive_int, metavar="N",
                        help="step budget of every problem (default: each problem's own; "
                        "tuned values were chosen for those)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="seeds the train/test split, initial weights and minibatch order "
                        "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a tenth of each step budget: the whole run in about a minute")
    parser.add_argument("--threads", type=positive_int, default=1, metavar="N",
                        help="torch.set_num_threads for every run (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device to train on (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="floating-point type of models and data (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("natgrad-bench"), metavar="DIR",
                        help="folder for results.json and the PNG plots "
                        "(default: %(default)s)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or messages on stderr (the table and the "
                        "JSON line are still printed)")
    parser.add_argument("--tune", action="store_true",
                        help="run every optimizer's hyper-parameter grid instead and write "
                        "the chosen values to DIR/tuned.json (on 2 CPU cores: ~8 minutes for "
                        "sgd,adam,adadelta,ngd; the K-FAC-type grids add ~30)")
    parser.add_argument("--tuned", type=Path, metavar="FILE",
                        help="read hyper-parameters from FILE (a tuned.json written by --tune) "
                        "instead of the one shipped with natgrad")
    parser.set_defaults(handler=run, subparser=parser)
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` described by parsed ``natgrad bench`` arguments."""
    return BenchConfig(
        problems=args.problems if args.problems is not None else tuple(PROBLEMS),
        optimizers=args.optimizers,
        steps=args.steps,
        seed=args.seed,
        quick=args.quick,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        out=args.out,
        quiet=args.quiet,
        tune=args.tune,
        tuned=args.tuned,
    )


def _note(config: BenchConfig, message: str) -> None:
    if not config.quiet:
        print(message, file=sys.stderr)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``natgrad bench`` with parsed arguments; the exit status."""
    from natgrad.bench import format_table, run_bench, run_tuning, summary_line, write_report
    from natgrad.bench.report import format_tuning

    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as err:
        parser.error(str(err))
    missing = [name for name, spec in OPTIMIZERS.items()
               if spec.requires is not None and not spec.available]
    if missing and config.optimizers is None:
        _note(config, f"not installed, left out: {', '.join(missing)} "
              "(pip install 'natgrad[peers]')")
    if config.tune:
        tuned, log = run_tuning(config)
        path = save_tuned(tuned, config.out / "tuned.json")
        save_tuned(log, config.out / "tuning.json")
        _note(config, f"wrote {path} and {config.out / 'tuning.json'}; copy tuned.json to "
              "src/natgrad/bench/tuned.json to make these values the defaults")
        print(format_tuning(tuned, config.problems))
        print()
        print(json.dumps({"tuned": str(path), "wall_seconds": round(log["wall_seconds"], 2),
                          "values": {p: tuned["values"].get(p, {}) for p in config.problems}}))
        return 0
    results = run_bench(config)
    paths = write_report(results, config.out)
    _note(config, f"wrote {len(paths)} files to {config.out}")
    print(format_table(results))
    print()
    print(summary_line(results, config.out))
    return 0
