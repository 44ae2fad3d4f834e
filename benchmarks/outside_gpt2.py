"""Outside the bench: natgrad's defaults on a word-level GPT-2 with a 10,000-token vocabulary.

    python benchmarks/outside_gpt2.py [--steps 100] [--seeds 0,1,2] [--vocab 10000]
                                      [--hparams JSON]

A tiny Hugging Face ``GPT2LMHeadModel`` built from a config (width 64, 2 layers, 4 heads, the
input embedding tied to the head, as GPT-2 does) on word-level tokens of standard-library
files the bench does not use (``\\w+``, single punctuation marks and newlines; the
``--vocab`` − 1 most frequent, the rest one unknown token), 32-token windows, a held-out
fifth, batch 16, one thread; the loss GPT-2 computes from ``labels``. With a vocabulary
above ``max_factor_size`` (8192) the tied weight (V × 64, most of the model) takes the
diagonal Fisher, the other layers their Kronecker blocks. ``natgrad.KFAC`` with only
``loss=nn.CrossEntropyLoss()`` (``--hparams`` adds arguments) against
``torch.optim.AdamW(lr=3e-3)``; printed per seed: held-out loss after the budget and the
training loop's seconds. Needs the ``integrations`` extra (transformers).
"""

from __future__ import annotations

import collections
import re
import sysconfig
from functools import partial
from pathlib import Path

import torch
import transformers
from outside_llama import arguments, quiet_single_thread, table  # the same loop and table
from torch import nn

FILES = ("inspect.py", "typing.py", "enum.py", "tarfile.py", "subprocess.py", "ast.py",
         "optparse.py", "pydoc.py", "mailbox.py", "smtplib.py")  # none of them in char-gpt's
LENGTH = 32
BATCH = 16


def windows(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out windows of word-level token ids, ``[n, LENGTH]`` each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / name).read_text(encoding="utf-8") for name in FILES)
    words = re.findall(r"\w+|[^\w\s]|\n", text)
    common = [w for w, _ in collections.Counter(words).most_common(vocab - 1)]
    index = {w: i + 1 for i, w in enumerate(common)}  # 0: unknown
    ids = torch.tensor([index.get(w, 0) for w in words])
    n = len(ids) // LENGTH
    rows = ids[: n * LENGTH].view(n, LENGTH)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return rows[perm[: n * 4 // 5]], rows[perm[n * 4 // 5:]][:256]


def gpt2(seed: int, vocab: int) -> nn.Module:
    """The tiny GPT-2 with a ``vocab``-token vocabulary, initialised from ``seed``."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=LENGTH, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def main() -> None:
    parser = arguments(__doc__, 100)
    parser.add_argument("--vocab", type=int, default=10000)
    args = parser.parse_args()
    quiet_single_thread()
    train, test = windows(args.vocab)
    print(f"vocabulary {args.vocab}, {len(train)} training windows of {LENGTH} tokens")
    table(partial(gpt2, vocab=args.vocab), args.seeds, args.steps, train, test, args.hparams,
          BATCH)


if __name__ == "__main__":
    main()
