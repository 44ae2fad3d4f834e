"""Outside the bench: natgrad's defaults on a Hugging Face Llama and text natgrad does not ship.

    python benchmarks/outside_llama.py [--steps 150] [--seeds 0,1,2] [--hparams JSON]

A tiny ``LlamaForCausalLM`` built from a config (hidden 64, 2 layers, grouped-query attention,
RMSNorm, rotary embeddings, SDPA, untied head; 97 characters) on standard-library files
(inspect.py and typing.py, which the bench's char-gpt does not use, and dataclasses.py, which
it does), 64-character
windows, a held-out fifth; the loss Llama computes from ``labels``. ``natgrad.KFAC`` with only
``loss=nn.CrossEntropyLoss()`` against AdamW (lr 3e-3), batch 16, one thread. Printed per
seed: held-out loss after the budget and the wall-clock seconds of the training loop.
``--hparams`` adds ``natgrad.KFAC`` arguments (e.g. ``'{"initial_damping": 1e-2}'``).
Needs the ``integrations`` extra (transformers).
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
import transformers
from torch import nn

import natgrad

FILES = ("inspect.py", "typing.py", "dataclasses.py")
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
LENGTH = 64


def windows() -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / name).read_text(encoding="utf-8") for name in FILES)
    index = {c: i for i, c in enumerate(CHARS)}
    ids = torch.tensor([index.get(c, 0) for c in text])
    n = len(ids) // LENGTH
    rows = ids[: n * LENGTH].view(n, LENGTH)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return rows[perm[: n * 4 // 5]], rows[perm[n * 4 // 5 :]][:256]


def llama(seed: int) -> nn.Module:
    """The tiny Llama, initialised from ``seed``."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(CHARS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def run(model: nn.Module, name: str, seed: int, steps: int, train: torch.Tensor,
        test: torch.Tensor, hparams: dict, batch_size: int = 16) -> tuple[float, float]:
    """Train a Hugging Face causal LM with ``name`` ("kfac": natgrad's defaults plus
    ``hparams``; else AdamW, lr 3e-3) on batches of ``train`` windows drawn from ``seed``, with
    the loss it computes from ``labels``; returns the held-out loss on ``test`` and the
    training loop's seconds."""
    opt = (natgrad.KFAC(model, loss=nn.CrossEntropyLoss(), **hparams) if name == "kfac"
           else torch.optim.AdamW(model.parameters(), lr=3e-3))
    generator = torch.Generator().manual_seed(seed)
    begin = time.perf_counter()
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (batch_size,), generator=generator)]
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    seconds = time.perf_counter() - begin
    with torch.no_grad():
        return model(input_ids=test, labels=test).loss.item(), seconds


def table(build: Callable[[int], nn.Module], seeds: str, steps: int, train: torch.Tensor,
          test: torch.Tensor, hparams: dict, batch_size: int = 16) -> None:
    """Print held-out loss and seconds of AdamW and natgrad's KFAC for every seed."""
    print("| seed | optimizer | held-out loss | seconds |")
    print("|---|---|---|---|")
    for seed in (int(s) for s in seeds.split(",")):
        for name in ("adamw", "kfac"):
            loss, seconds = run(build(seed), name, seed, steps, train, test, hparams,
                                batch_size)
            print(f"| {seed} | {name} | {loss:.3f} | {seconds:.1f} |", flush=True)


def arguments(doc: str, steps: int) -> argparse.ArgumentParser:
    """The outside benchmarks' options: ``--steps``, ``--seeds``, ``--hparams``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--hparams", default="{}", type=json.loads,
                        help="natgrad.KFAC arguments on top of the defaults (JSON)")
    return parser


def quiet_single_thread() -> None:
    """No warnings, no transformers logging, one thread (the benchmarks' setting)."""
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)


def main() -> None:
    args = arguments(__doc__, 150).parse_args()
    quiet_single_thread()
    train, test = windows()
    table(llama, args.seeds, args.steps, train, test, args.hparams)


if __name__ == "__main__":
    main()
