"""One rank of the data-parallel attention test (a script, and a module the test imports).

A TransformerDecoderLayer (packed self- and cross-attention) and a kdim/vdim attention,
trained with KFAC on each rank's half of every batch (DDP over gloo) under each inverse
placement; under ``"owner"`` a checkpoint after ``CHECKPOINT_STEP`` steps. Run as
``python attention_ranks.py OUT`` on every rank of a launch; rank 0 writes the parameters.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.distributed.checkpoint import load_checkpoint, save_checkpoint

E, H, S, V = 8, 2, 5, 7
BATCH, LENGTH, STEPS, CHECKPOINT_STEP = 8, 8, 6, 3
PLACEMENTS = ("balanced", "everywhere", "owner")


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.source = nn.Embedding(V, E), nn.Embedding(V, E)
        self.layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=16, dropout=0.0,
                                                batch_first=True)
        self.keys, self.values = nn.Embedding(V, 5), nn.Embedding(V, 3)
        self.mha = nn.MultiheadAttention(E, H, kdim=5, vdim=3, batch_first=True)
        self.head = nn.Linear(E, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = self.source(tokens[:, :S])
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1],
                                                                dtype=memory.dtype)
        x = self.layer(self.embed(tokens), memory, tgt_mask=causal, tgt_is_causal=True)
        flipped = tokens.flip(1)
        return self.head(x + self.mha(x, self.keys(flipped), self.values(flipped))[0])


def batches() -> torch.Tensor:
    return torch.randint(V, (STEPS, BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(placement: str, world: int = 1, rank: int = 0, checkpoint: str | None = None,
        resume: str | None = None) -> torch.Tensor:
    """Parameters after training (from ``resume``'s step on the whole batch, if given)."""
    torch.manual_seed(0)
    model = Model().double()
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = natgrad.KFAC(wrapped, likelihood="categorical", kind="empirical", stat_every=1,
                       inv_every=2, lr=0.1, damping=0.1, momentum=0.5, kl_clip=1e-2,
                       inverse_placement=placement)
    start = 0
    if resume is not None:
        start = load_checkpoint(resume, opt.communicator, model, opt)["step"]
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    tokens = batches()
    for step in range(start, STEPS):
        opt.zero_grad()
        x = tokens[step, rows]
        F.cross_entropy(wrapped(x).reshape(-1, V), torch.roll(x, -1, 1).reshape(-1)).backward()
        opt.step()
        if checkpoint is not None and step + 1 == CHECKPOINT_STEP:
            save_checkpoint(checkpoint, opt.communicator, model, opt, step=step + 1)
    assert opt.fallback == []
    return flat(model)


if __name__ == "__main__":
    import torch.distributed as dist

    out = sys.argv[1]
    dist.init_process_group("gloo", init_method="env://")
    world, rank = dist.get_world_size(), dist.get_rank()
    for placement in PLACEMENTS:
        checkpoint = os.path.join(out, "checkpoint.pt") if placement == "owner" else None
        params = run(placement, world, rank, checkpoint=checkpoint)
        if rank == 0:
            torch.save(params, os.path.join(out, f"{placement}.pt"))
    dist.destroy_process_group()
