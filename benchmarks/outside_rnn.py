"""Outside the bench: natgrad's defaults on recurrent character models (nn.GRU, nn.LSTM).

    python benchmarks/outside_rnn.py [--seeds 0,1,2] [--cells gru,lstm] [--steps 300]
                                     [--hparams JSON]

A character language model, Embedding(97, 32) → a one-layer GRU or LSTM (hidden 64) → Linear
(64, 97), 7k–31k parameters, on standard-library files the bench's char-gpt does not use
(inspect.py, typing.py), 32-character windows, a held-out fifth, batch 32, one thread, the
token-mean ``nn.CrossEntropyLoss`` as LM scripts write it. For each cell and seed AdamW runs
the budget with every lr of {1e-3, 3e-3, 1e-2, 3e-2} on the same initial weights and batches;
the target is the best held-out loss at the end (evaluated every 10 steps). Then
``natgrad.KFAC(model, loss=nn.CrossEntropyLoss())`` (plus ``--hparams``) trains until the
held-out loss reaches it. Printed: AdamW's best lr and loss, natgrad's steps to the target
(– never within twice the budget), its seconds (optimizer steps only) ÷ AdamW's for its
budget's steps to the same loss, and the mean step time of each.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import natgrad

FILES = ("inspect.py", "typing.py")
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
LENGTH, BATCH, EVAL_EVERY = 32, 32, 10
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def windows() -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out windows ``[n, LENGTH + 1]`` of character ids (512 held out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / name).read_text(encoding="utf-8") for name in FILES)
    index = {c: i for i, c in enumerate(CHARS)}
    ids = torch.tensor([index.get(c, 0) for c in text])
    n = len(ids) // (LENGTH + 1)
    rows = ids[: n * (LENGTH + 1)].view(n, LENGTH + 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return rows[perm[: n * 4 // 5]], rows[perm[n * 4 // 5:]][:512]


class CharRNN(nn.Module):
    """Embedding → GRU or LSTM → Linear: logits ``[B, T, 97]``."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(CHARS), 32)
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(32, 64, batch_first=True)
        self.head = nn.Linear(64, len(CHARS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def run(cell: str, seed: int, make: Callable[[nn.Module], torch.optim.Optimizer],
        steps: int, target: float | None, train: torch.Tensor,
        test: torch.Tensor) -> tuple[float, int | None, float, int]:
    """Train from ``seed``'s weights and batches; returns the last held-out loss, the first
    evaluated step at or below ``target``, the optimizer-step seconds until then (or in all)
    and the number of steps those seconds cover."""
    torch.manual_seed(seed)
    model = CharRNN(cell)
    opt = make(model)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    seconds, loss = 0.0, float("inf")
    for step in range(steps + 1):
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                loss = float(loss_fn(model(test[:, :-1]).flatten(0, 1), test[:, 1:].flatten()))
            if target is not None and loss <= target:
                return loss, step, seconds, step
            if loss != loss:  # diverged
                return float("inf"), None, seconds, step
        if step == steps:
            break
        batch = train[torch.randint(0, len(train), (BATCH,), generator=generator)]
        begin = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        seconds += time.perf_counter() - begin
    return loss, None, seconds, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cells", default="gru,lstm")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hparams", default="{}", type=json.loads,
                        help="natgrad.KFAC arguments on top of the defaults (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    train, test = windows()
    print("| cell | seed | AdamW lr | AdamW loss | KFAC steps | KFAC s ÷ AdamW's | "
          "step ms AdamW | step ms KFAC |")
    print("|---|---|---|---|---|---|---|---|")
    for cell in args.cells.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            finals = {}
            for lr in ADAM_LRS:
                finals[lr], *_ = run(cell, seed, lambda m, lr=lr: torch.optim.AdamW(
                    m.parameters(), lr=lr), args.steps, None, train, test)
            best = min(finals, key=finals.get)
            target = finals[best]
            _, adam_steps, adam_seconds, adam_done = run(
                cell, seed, lambda m, lr=best: torch.optim.AdamW(m.parameters(), lr=lr),
                args.steps, target, train, test)
            _, steps, seconds, done = run(
                cell, seed, lambda m: natgrad.KFAC(m, loss=nn.CrossEntropyLoss(),
                                                   **args.hparams),
                2 * args.steps, target, train, test)
            ratio = "–" if steps is None else f"{seconds / adam_seconds:.2f}"
            print(f"| {cell} | {seed} | {best:g} | {target:.3f} | "
                  f"{'–' if steps is None else steps} | {ratio} | "
                  f"{1e3 * adam_seconds / max(adam_done, 1):.1f} | "
                  f"{1e3 * seconds / max(done, 1):.1f} |", flush=True)


if __name__ == "__main__":
    main()
