"""Outside the bench: natgrad's defaults on a convolutional autoencoder of photo patches.

    python benchmarks/outside_conv_ae.py [--seeds 0,1,2] [--steps 300] [--hparams JSON]

Data: 16×16 RGB patches cut at random (fixed) places from the two photographs scikit-learn
ships (``load_sample_images``: china.jpg, flower.jpg), pixels in [0, 1]; 4,096 for training,
512 held out. Model (9.9k parameters): Conv2d(3, 16, 3, stride 2) → ReLU → Conv2d(16, 32, 3,
stride 2) → ReLU → ConvTranspose2d(32, 16, 3, stride 2, output padding 1) → ReLU →
ConvTranspose2d(16, 3, 3, stride 2, output padding 1), ``nn.MSELoss()``, batch 64, one
thread. For each seed Adam runs the budget with every lr of {1e-3, 3e-3, 1e-2, 3e-2} on the
same initial weights and batches; the target is the best held-out loss at the end (evaluated
every 10 steps). Then ``natgrad.KFAC(model, loss=nn.MSELoss())`` (plus ``--hparams``) trains
until the held-out loss reaches it (at most twice the budget). Printed: Adam's best lr and
loss, natgrad's steps to the target (– never), its seconds (optimizer steps only) ÷ Adam's to
the same loss, and the mean step time of each.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import natgrad

PATCH, TRAIN, TEST, BATCH, EVAL_EVERY = 16, 4096, 512, 64, 10
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def patches() -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out patches ``[n, 3, 16, 16]`` in [0, 1]."""
    from sklearn.datasets import load_sample_images

    images = [torch.as_tensor(i, dtype=torch.float32).permute(2, 0, 1) / 255
              for i in load_sample_images().images]
    gen = torch.Generator().manual_seed(0)
    cut = []
    for index in range(TRAIN + TEST):
        image = images[index % len(images)]
        top = int(torch.randint(0, image.shape[1] - PATCH, (1,), generator=gen))
        left = int(torch.randint(0, image.shape[2] - PATCH, (1,), generator=gen))
        cut.append(image[:, top:top + PATCH, left:left + PATCH])
    data = torch.stack(cut)
    return data[:TRAIN], data[TRAIN:]


def autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(16, 3, 3, stride=2, padding=1, output_padding=1),
    )


def run(seed: int, make: Callable[[nn.Module], torch.optim.Optimizer], steps: int,
        target: float | None, train: torch.Tensor,
        test: torch.Tensor) -> tuple[float, int | None, float, int]:
    """Train from ``seed``'s weights and batches; returns the last held-out loss, the first
    evaluated step at or below ``target``, the optimizer-step seconds until then (or in all)
    and the number of steps they cover."""
    torch.manual_seed(seed)
    model = autoencoder()
    opt = make(model)
    loss_fn = nn.MSELoss()
    generator = torch.Generator().manual_seed(seed)
    seconds, loss = 0.0, float("inf")
    for step in range(steps + 1):
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                loss = float(loss_fn(model(test), test))
            if target is not None and loss <= target:
                return loss, step, seconds, step
            if loss != loss:  # diverged
                return float("inf"), None, seconds, step
        if step == steps:
            break
        batch = train[torch.randint(0, len(train), (BATCH,), generator=generator)]
        begin = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(batch), batch).backward()
        opt.step()
        seconds += time.perf_counter() - begin
    return loss, None, seconds, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hparams", default="{}", type=json.loads,
                        help="natgrad.KFAC arguments on top of the defaults (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    train, test = patches()
    print("| seed | Adam lr | Adam loss | KFAC steps | KFAC s ÷ Adam's | step ms Adam | "
          "step ms KFAC |")
    print("|---|---|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        finals = {}
        for lr in ADAM_LRS:
            finals[lr], *_ = run(seed, lambda m, lr=lr: torch.optim.Adam(
                m.parameters(), lr=lr), args.steps, None, train, test)
        best = min(finals, key=finals.get)
        target = finals[best]
        _, _, adam_seconds, adam_done = run(
            seed, lambda m, lr=best: torch.optim.Adam(m.parameters(), lr=lr), args.steps,
            target, train, test)
        _, steps, seconds, done = run(
            seed, lambda m: natgrad.KFAC(m, loss=nn.MSELoss(), **args.hparams),
            2 * args.steps, target, train, test)
        ratio = "–" if steps is None else f"{seconds / adam_seconds:.2f}"
        print(f"| {seed} | {best:g} | {target:.4f} | {'–' if steps is None else steps} | "
              f"{ratio} | {1e3 * adam_seconds / max(adam_done, 1):.1f} | "
              f"{1e3 * seconds / max(done, 1):.1f} |", flush=True)


if __name__ == "__main__":
    main()
