"""Memory and time natgrad spends per layer type, against Adam's (docs/transformers.md).

    python benchmarks/layer_cost.py [--width 256] [--steps 60] [--threads 1]

One model per layer type, each a single layer of width ``--width`` (tokens 8×32 for the
sequence layers) trained on a squared-error loss to random targets. Printed per layer type:
the parameters P; the floats natgrad's state holds (factors, inverses or eigenbases,
EKFAC's scalings, momentum) as a multiple of P (Adam's is 2P); and the median step time
(forward + backward + step, with the defaults: statistics every 5 steps, inverses every 10)
as a ratio to Adam's, measured round-robin in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

import natgrad


class Tied(nn.Module):
    """Embedding tied to a linear head (V = 4·width)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(4 * width, width)
        self.head = nn.Linear(width, 4 * width, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embedding(tokens))


class SelfAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, 4, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


class Conv1dSequence(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel_size=5, padding=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


def layers(width: int) -> dict[str, tuple[Callable[[], nn.Module], Tensor]]:
    """Per layer type: a builder of the one-layer model and its inputs."""
    gen = torch.Generator().manual_seed(0)
    seq = torch.randn(8, 32, width, generator=gen)
    return {
        "Linear": (lambda: nn.Linear(width, width), seq),
        "Conv1d (k=5)": (lambda: Conv1dSequence(width), seq),
        "LayerNorm": (lambda: nn.LayerNorm(width), seq),
        "MultiheadAttention": (lambda: SelfAttention(width), seq),
        "Embedding + tied head": (lambda: Tied(width),
                                  torch.randint(0, 4 * width, (8, 32), generator=gen)),
    }


def state_floats(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        if isinstance(state, dict):
            total += sum(v.numel() for v in state.values()
                         if isinstance(v, Tensor) and v.is_floating_point() and v.dim() > 0)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    factories = {
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        "kfac": lambda m: natgrad.KFAC(m, loss=nn.MSELoss()),
        "ekfac": lambda m: natgrad.EKFAC(m, loss=nn.MSELoss()),
    }
    print("| layer | P | KFAC state ÷ P | EKFAC state ÷ P | KFAC step ÷ Adam's | "
          "EKFAC step ÷ Adam's |")
    print("|---|---|---|---|---|---|")
    for name, (build, inputs) in layers(args.width).items():
        runs = {}
        for key, factory in factories.items():
            torch.manual_seed(0)
            model = build()
            with torch.no_grad():
                targets = torch.randn_like(model(inputs))
            runs[key] = (model, factory(model), [], targets)
        for _ in range(0, args.steps, 10):
            for model, opt, times, targets in runs.values():
                for _ in range(10):
                    begin = time.perf_counter()
                    opt.zero_grad()
                    nn.functional.mse_loss(model(inputs), targets).backward()
                    opt.step()
                    times.append(time.perf_counter() - begin)
        params = sum(p.numel() for p in runs["adam"][0].parameters())
        median = {k: statistics.median(r[2][10:]) for k, r in runs.items()}
        print(f"| {name} | {params} | {state_floats(runs['kfac'][1]) / params:.1f} | "
              f"{state_floats(runs['ekfac'][1]) / params:.1f} | "
              f"{median['kfac'] / median['adam']:.1f} | {median['ekfac'] / median['adam']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
