"""The ``natgrad`` command: a parser with one subcommand per module of this package.

Each subcommand module provides ``add_parser(subparsers)``, which registers its parser and
sets its ``handler`` (a function of the parsed arguments and the subparser, returning the
exit status). Usage errors, including invalid values found after parsing, go through
``parser.error``: one ``error:`` line on stderr after the usage, and exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib import metadata

from natgrad.cli import bench, fisher, train

__all__ = ["build_parser", "main"]

COMMANDS = (bench, fisher, train)

DESCRIPTION = """\
natgrad: natural-gradient optimizers for PyTorch (exact Fisher, K-FAC, EKFAC, matrix-free CG).

The command line runs natgrad's benchmark: `natgrad bench` trains small models on data
that ships with the install and compares natgrad's optimizers with SGD, Adam and Adadelta
by the wall-clock seconds they need to reach the training loss that tuned Adam reaches.
"""


def _version() -> str:
    try:
        return metadata.version("natgrad")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``natgrad`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="natgrad",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `natgrad COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, title="commands"
    )
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``natgrad`` console script.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success). Usage errors exit with status 2 via SystemExit.

    Example:
        >>> main(["bench", "--quick", "--problems", "regression", "--quiet"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args, args.subparser))
