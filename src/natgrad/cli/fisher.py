"""``natgrad fisher``: how close each approximation comes to the exact natural gradient.

Trains nothing: on a batch of sklearn digits and a small model (float64), it forms the exact
Fisher and compares the diagonal, K-FAC, EKFAC and k-step CG natural gradients with the
exact one (see :mod:`natgrad.bench.approximations`), as a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from natgrad.bench.approximations import compare_approximations

__all__ = ["add_parser", "run"]

MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10)),
    "cnn": lambda: nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 10),
    ),
}


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _iterations(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"iterations must be >= 1, got {text!r}")
    return values


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fisher",
        help="compare Fisher approximations with the exact natural gradient",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp",
                        help="the model: an MLP 64-24-10 or a one-conv CNN (default: mlp)")
    parser.add_argument("--samples", type=_positive(int), default=128,
                        help="digits in the batch (default: 128)")
    parser.add_argument("--damping", type=_positive(float), default=1e-3,
                        help="damping λ added to every approximation (default: 1e-3)")
    parser.add_argument("--cg-iterations", type=_iterations, default=(1, 5, 20),
                        help="CG iteration counts, comma-separated (default: 1,5,20)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    parser.set_defaults(handler=run, subparser=parser)
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sklearn.datasets import load_digits

    inputs, labels = load_digits(return_X_y=True)
    x = torch.tensor(inputs[: args.samples] / 16.0, dtype=torch.float64)
    y = torch.tensor(labels[: args.samples])
    torch.manual_seed(args.seed)
    model = MODELS[args.model]().double()
    rows = compare_approximations(
        model, x, y, "categorical", damping=args.damping, cg_iterations=args.cg_iterations
    )
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params} parameters, {len(x)} digits, damping {args.damping:g}")
    print(f"{'method':<22} {'Fisher rel. error':>18} {'cosine to NG':>13} {'NG rel. error':>14}")
    for r in rows:
        fisher = "-" if r.fisher_error is None else f"{r.fisher_error:.3e}"
        print(f"{r.method:<22} {fisher:>18} {r.cosine:>13.4f} {r.direction_error:>14.3e}")
    print(json.dumps({"model": args.model, "params": params, "damping": args.damping,
                      "rows": [asdict(r) for r in rows]}))
    return 0
