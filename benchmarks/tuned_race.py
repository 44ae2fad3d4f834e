"""The race the outside benchmarks share: a torch.optim baseline tuned on an lr grid sets the
target, then natgrad's defaults train until they reach it (imported by ``outside_rnn.py`` and
``outside_conv_ae.py``).

For one seed: the baseline runs the budget with every lr of the grid on the same initial
weights and batches; the target is the best held-out loss at the end (evaluated every
``eval_every`` steps); the best lr runs again until it reaches its own final loss (its
seconds), and ``natgrad.KFAC(model, loss=..., **hparams)`` runs until the target, at most twice
the budget. Seconds count the optimizer steps only (zero_grad, forward, backward, step).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import natgrad

LRS = (1e-3, 3e-3, 1e-2, 3e-2)
HEADER = ("| {name} | seed | {baseline} lr | {baseline} loss | KFAC steps | "
          "KFAC s ÷ {baseline}'s | step ms {baseline} | step ms KFAC |")


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options every race takes: ``--seeds``, ``--steps`` (the budget), ``--hparams``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hparams", default="{}", type=json.loads,
                        help="natgrad.KFAC arguments on top of the defaults (JSON)")
    return parser


def quiet_single_thread() -> None:
    """One thread, natgrad's warnings off (the races' setting)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=RuntimeWarning)


@dataclass
class Race:
    """One problem: ``build()`` a model, ``loss(model, batch)`` a batch's training loss,
    ``held_out(model)`` the evaluation loss, batches of ``batch`` rows drawn from ``train``."""

    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Tensor], Tensor]
    held_out: Callable[[nn.Module], float]
    train: Tensor
    batch: int
    loss_module: nn.Module  # natgrad's ``loss=``
    eval_every: int = 10

    def run(self, seed: int, make: Callable[[nn.Module], torch.optim.Optimizer], steps: int,
            target: float | None) -> tuple[float, int | None, float, int]:
        """Train from ``seed``'s weights and batches; returns the last held-out loss, the first
        evaluated step at or below ``target``, the optimizer-step seconds until then (or in
        all) and the number of steps they cover."""
        torch.manual_seed(seed)
        model = self.build()
        opt = make(model)
        generator = torch.Generator().manual_seed(seed)
        seconds, loss = 0.0, float("inf")
        for step in range(steps + 1):
            if step % self.eval_every == 0:
                with torch.no_grad():
                    loss = self.held_out(model)
                if target is not None and loss <= target:
                    return loss, step, seconds, step
                if loss != loss:  # diverged
                    return float("inf"), None, seconds, step
            if step == steps:
                break
            rows = self.train[torch.randint(0, len(self.train), (self.batch,),
                                            generator=generator)]
            begin = time.perf_counter()
            opt.zero_grad()
            self.loss(model, rows).backward()
            opt.step()
            seconds += time.perf_counter() - begin
        return loss, None, seconds, steps

    def row(self, seed: int, baseline: type[torch.optim.Optimizer], steps: int,
            hparams: dict) -> str:
        """The table's cells for one seed (see module doc)."""
        finals = {}
        for lr in LRS:
            finals[lr], *_ = self.run(seed, lambda m, lr=lr: baseline(m.parameters(), lr=lr),
                                      steps, None)
        best = min(finals, key=finals.get)
        target = finals[best]
        _, _, base_seconds, base_done = self.run(
            seed, lambda m: baseline(m.parameters(), lr=best), steps, target)
        _, reached, seconds, done = self.run(
            seed, lambda m: natgrad.KFAC(m, loss=self.loss_module, **hparams), 2 * steps,
            target)
        ratio = "–" if reached is None else f"{seconds / base_seconds:.2f}"
        return (f"{seed} | {best:g} | {target:.4g} | {'–' if reached is None else reached} | "
                f"{ratio} | {1e3 * base_seconds / max(base_done, 1):.1f} | "
                f"{1e3 * seconds / max(done, 1):.1f} |")
