"""Outside the bench: natgrad's defaults on a convolutional autoencoder of photo patches.

    python benchmarks/outside_conv_ae.py [--seeds 0,1,2] [--steps 300] [--hparams JSON]

Data: 16×16 RGB patches cut at random (fixed) places from the two photographs scikit-learn
ships (``load_sample_images``: china.jpg, flower.jpg), pixels in [0, 1]; 4,096 for training,
512 held out. Model (9.9k parameters): Conv2d(3, 16, 3, stride 2) → ReLU → Conv2d(16, 32, 3,
stride 2) → ReLU → ConvTranspose2d(32, 16, 3, stride 2, output padding 1) → ReLU →
ConvTranspose2d(16, 3, 3, stride 2, output padding 1), ``nn.MSELoss()``, batch 64, one
thread. For each seed, the race of ``tuned_race.py``: Adam's best of {1e-3, 3e-3, 1e-2, 3e-2}
over the budget sets the target (its held-out loss), ``natgrad.KFAC(model, loss=nn.MSELoss())``
(plus ``--hparams``) trains until it reaches it (at most twice the budget). Printed: Adam's best
lr and loss, natgrad's steps to the target (– never), its seconds ÷ Adam's to the same loss,
and the mean step time of each.
"""

from __future__ import annotations

import torch
from torch import nn
from tuned_race import HEADER, Race, arguments, quiet_single_thread

PATCH, TRAIN, TEST, BATCH = 16, 4096, 512, 64


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


def main() -> None:
    parser = arguments(__doc__)
    args = parser.parse_args()
    quiet_single_thread()
    train, test = patches()
    loss_fn = nn.MSELoss()
    race = Race(autoencoder, lambda m, rows: loss_fn(m(rows), rows),
                lambda m: float(loss_fn(m(test), test)), train, BATCH, loss_fn)
    print(HEADER.format(name="problem", baseline="Adam"))
    print("|---" * 8 + "|")
    for seed in (int(s) for s in args.seeds.split(",")):
        print(f"| photo patches | {race.row(seed, torch.optim.Adam, args.steps, args.hparams)}",
              flush=True)


if __name__ == "__main__":
    main()
