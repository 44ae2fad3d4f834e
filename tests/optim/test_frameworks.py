"""natgrad inside the training frameworks people train transformers with.

* ``transformers.Trainer`` with ``optimizers=(natgrad.KFAC(...), None)``: Trainer's own
  loop, its loss (the model's shifted, ``-100``-ignoring cross-entropy, summed over tokens
  and divided by the batch's token count), its gradient clipping and learning-rate
  schedule; natgrad takes every step and the training loss falls.
* Lightning: ``configure_optimizers`` returns natgrad's optimizer, Lightning calls
  ``step(closure)`` (automatic optimisation).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import natgrad

transformers = pytest.importorskip("transformers")

VOCAB, T, ROWS = 19, 8, 32


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _texts() -> list[dict[str, torch.Tensor]]:
    """Sequences of a repeating pattern with a random start, some right-padded."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(ROWS):
        start = int(torch.randint(1, VOCAB, (1,), generator=generator))
        ids = (start + 3 * torch.arange(T)) % (VOCAB - 1) + 1
        mask = torch.ones(T, dtype=torch.long)
        if i % 4 == 0:
            mask[-3:] = 0
        rows.append({"input_ids": ids, "attention_mask": mask,
                     "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def _full_loss(model: nn.Module, rows: list[dict[str, torch.Tensor]]) -> float:
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        return model(**batch).loss.item()


def test_transformers_trainer_trains_with_kfac(tmp_path):
    torch.manual_seed(0)
    model, rows = _gpt2(), _texts()
    before = _full_loss(model, rows)
    opt = natgrad.KFAC(model, loss=nn.CrossEntropyLoss())
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   optimizers=(opt, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback, no uncalled layer
        trainer.train()
    steps = {int(state["step"]) for state in opt.state.values() if "step" in state}
    assert steps == {12}, steps  # natgrad took every one of Trainer's steps
    assert _full_loss(model, rows) < before - 0.3, (before, _full_loss(model, rows))


def test_lightning_trains_with_kfac_through_step_closure():
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _gpt2()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return natgrad.KFAC(self.model, loss=nn.CrossEntropyLoss())

    torch.manual_seed(0)
    module, rows = Module(), _texts()
    before = _full_loss(module.model, rows)
    loader = torch.utils.data.DataLoader(rows, batch_size=8, shuffle=False)
    trainer = lightning.Trainer(
        max_steps=12, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging
        trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert isinstance(opt, natgrad.KFAC)
    steps = {int(state["step"]) for state in opt.state.values() if "step" in state}
    assert steps == {12}, steps
    assert _full_loss(module.model, rows) < before - 0.3
