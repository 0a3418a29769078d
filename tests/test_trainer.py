"""MFTCTrainer: warm-up before the optimiser, training, evaluation, checkpoints with the selection, resume."""

import json

import pytest
import torch
from peft import get_peft_model
from tiny_models import CASES_BY_NAME, VOCAB
from transformers import TrainingArguments

import mftc_peft
from mftc_peft import MFTCConfig

trainer_module = pytest.importorskip("mftc_peft.trainer")


def examples(n, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 9), generator=generator)
    labels = (ids[:, 0] % 3).tolist()  # learnable: the label is a function of the first token
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def make_trainer(tmp_path, max_steps, **config):
    model = get_peft_model(
        CASES_BY_NAME["bert"].model(),
        MFTCConfig(task_type="SEQ_CLS", budget=0.1, warmup_steps=4, dsca_every=2, n_clusters=4, embed_dim=6, **config),
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-2,
        save_steps=2, save_strategy="steps", logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
        seed=0,
    )
    return mftc_peft.MFTCTrainer(
        model=model, args=args, train_dataset=examples(64, 0), eval_dataset=examples(16, 1)
    )


def test_trainer_warms_up_trains_evaluates_and_resumes(tmp_path, monkeypatch):
    calls = []
    real_warmup = trainer_module.warmup
    monkeypatch.setattr(trainer_module, "warmup", lambda *a, **k: calls.append(1) or real_warmup(*a, **k))

    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.train()
    assert len(calls) == 1 and trainer.warmup_report is not None
    selection = trainer.warmup_report.selection
    assert selection
    # the optimiser holds exactly the selected deltas and the head
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert optimised == trainable
    deltas = sum(p.numel() for n, p in trainer.model.named_parameters() if "mftc_delta" in n and p.requires_grad)
    assert deltas == trainer.warmup_report.trainable_elements
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    checkpoint = tmp_path / "checkpoint-4"
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    assert saved["block_selection"] == selection

    resumed = make_trainer(tmp_path, max_steps=6)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert len(calls) == 1, "resuming must not run the warm-up again"
    assert resumed.warmup_report is None
    assert resumed.model.base_model.block_selection() == selection
    assert resumed.model.peft_config["default"].block_selection == selection
    assert resumed.state.global_step == 6


def test_trainer_applies_spectral_coordination(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, spectral_filter=0.5, spectral_reg=0.1)
    trainer.train()
    assert trainer.spectral is not None
    assert trainer.spectral.beta == 0.5 and trainer.spectral.lam == 0.1


def test_trainer_needs_an_mftc_model(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="must be a PEFT model with an MFTC adapter"):
        mftc_peft.MFTCTrainer(model=torch.nn.Linear(2, 2), args=args)
