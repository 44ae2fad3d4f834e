"""Outside the bench: natgrad's defaults on recurrent character models (nn.GRU, nn.LSTM).

    python benchmarks/outside_rnn.py [--seeds 0,1,2] [--cells gru,lstm] [--steps 300]
                                     [--hparams JSON]

A character language model, Embedding(97, 32) → a one-layer GRU or LSTM (hidden 64) → Linear
(64, 97), 7k–31k parameters, on standard-library files the bench's char-gpt does not use
(inspect.py, typing.py), 32-character windows, a held-out fifth, batch 32, one thread, the
token-mean ``nn.CrossEntropyLoss`` as LM scripts write it. For each cell and seed, the race of
``tuned_race.py``: AdamW's best of {1e-3, 3e-3, 1e-2, 3e-2} over the budget sets the target
(its held-out loss), ``natgrad.KFAC(model, loss=nn.CrossEntropyLoss())`` (plus ``--hparams``)
trains until it reaches it. Printed: AdamW's best lr and loss, natgrad's steps to the target
(– never within twice the budget), its seconds ÷ AdamW's to the same loss, and the mean step
time of each.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch import nn
from tuned_race import HEADER, Race, arguments, quiet_single_thread

FILES = ("inspect.py", "typing.py")
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
LENGTH, BATCH = 32, 32


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


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--cells", default="gru,lstm")
    args = parser.parse_args()
    quiet_single_thread()
    train, test = windows()
    loss_fn = nn.CrossEntropyLoss()

    def loss(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())

    print(HEADER.format(name="cell", baseline="AdamW"))
    print("|---" * 8 + "|")
    for cell in args.cells.split(","):
        race = Race(lambda cell=cell: CharRNN(cell), loss, lambda m: float(loss(m, test)),
                    train, BATCH, loss_fn)
        for seed in (int(s) for s in args.seeds.split(",")):
            row = race.row(seed, torch.optim.AdamW, args.steps, args.hparams)
            print(f"| {cell} | {row}", flush=True)


if __name__ == "__main__":
    main()
