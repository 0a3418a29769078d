"""MFTCTrainer: warm-up before the optimiser, training, evaluation, checkpoints with the selection, resume."""

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from peft import get_peft_model
from tiny_models import CASES_BY_NAME, VOCAB
from transformers import Trainer, TrainingArguments

import mftc_peft
from mftc_peft import MFTCConfig

trainer_module = pytest.importorskip("mftc_peft.trainer")


def examples(n, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 9), generator=generator)
    labels = (ids[:, 0] % 3).tolist()  # learnable: the label is a function of the first token
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def make_trainer(tmp_path, max_steps, training_args=None, **config):
    model = get_peft_model(
        CASES_BY_NAME["bert"].model(),
        MFTCConfig(task_type="SEQ_CLS", budget=0.1, warmup_steps=4, dsca_every=2, n_clusters=4, embed_dim=6, **config),
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-2,
        save_steps=2, save_strategy="steps", logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
        seed=0, **(training_args or {}),
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


def block_lines(model):
    """(module name, block id) -> (module name, first line, end line) of the block in the module's delta."""
    lines = {}
    for name, layer in model.base_model.mftc_layers("default"):
        ids = layer.block_ids("default")
        offset = 0
        for block, width in zip(ids, layer.mftc_grid["default"].widths(ids)):
            lines[(name, block)] = (name, offset, offset + width)
            offset += width
    return lines


def coordination_groups(trainer, deltas):
    """The groups that `mftc_peft.spectral` documents, computed here from the warm-up's block graph: the selected
    blocks of one delta shape (when at least two), with A = D^-1/2 W D^-1/2 over W restricted to them, diagonal 0."""
    graph = trainer.warmup_report.block_graph()
    affinity = graph.affinity.toarray()
    row = {tuple(node): i for i, node in enumerate(graph.nodes)}
    by_shape = defaultdict(list)
    for node, (name, start, stop) in block_lines(trainer.model).items():
        by_shape[tuple(deltas[name][start:stop].shape)].append((node, (name, start, stop)))
    groups = []
    for members in by_shape.values():
        if len(members) < 2:
            continue
        rows = [row[node] for node, _ in members]
        within = affinity[np.ix_(rows, rows)].copy()
        np.fill_diagonal(within, 0.0)
        degrees = within.sum(axis=1)
        inv_sqrt = np.where(degrees > 0, 1 / np.sqrt(np.where(degrees > 0, degrees, 1.0)), 0.0)
        groups.append(([place for _, place in members], torch.as_tensor(inv_sqrt[:, None] * within * inv_sqrt)))
    return groups


def stack(tensors, places):
    """The blocks at `places` of the per-module tensors, one flattened float64 row per block."""
    return torch.stack([tensors[name][start:stop].reshape(-1).double() for name, start, stop in places])


def train_and_record(tmp_path, monkeypatch, **spectral):
    """Train 2 steps (no gradient clipping) and record, per optimiser step: the deltas' gradients as backward left
    them ("raw") and as the optimiser steps with them ("stepped"), the deltas, and the loss of the plain `Trainer`
    ("plain_loss") next to the loss `MFTCTrainer` backpropagates ("loss")."""
    trainer = make_trainer(tmp_path, max_steps=2, training_args={"max_grad_norm": 0.0}, **spectral)
    record = {"raw": [], "stepped": [], "deltas": [], "plain_loss": [], "loss": []}
    raw = {}

    def deltas():
        layers = trainer.model.base_model.mftc_layers("default")
        return {name: layer.mftc_delta["default"] for name, layer in layers if layer.mftc_delta["default"].numel()}

    def before_step(*_):
        record["raw"].append(dict(raw))
        record["stepped"].append({name: d.grad.detach().clone() for name, d in deltas().items()})
        record["deltas"].append({name: d.detach().clone() for name, d in deltas().items()})

    def keep_raw(name):
        return lambda delta: raw.__setitem__(name, delta.grad.detach().clone())

    real_create_optimizer = trainer.create_optimizer

    def create_optimizer(*args, **kwargs):  # the warm-up has injected the deltas by now
        optimizer = real_create_optimizer(*args, **kwargs)
        for name, delta in deltas().items():
            delta.register_post_accumulate_grad_hook(keep_raw(name))
        optimizer.register_step_pre_hook(before_step)
        return optimizer

    real_plain_loss = Trainer.compute_loss

    def plain_loss(self, *args, **kwargs):
        loss = real_plain_loss(self, *args, **kwargs)
        record["plain_loss"].append(float(loss.detach()))
        return loss

    def mftc_loss(*args, **kwargs):
        loss = type(trainer).compute_loss(trainer, *args, **kwargs)
        record["loss"].append(float(loss.detach()))
        return loss

    trainer.create_optimizer = create_optimizer
    trainer.compute_loss = mftc_loss
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "compute_loss", plain_loss)
        trainer.train()
    assert len(record["stepped"]) == len(record["loss"]) == len(record["plain_loss"]) == 2
    return trainer, record


def test_trainer_applies_spectral_coordination(tmp_path, monkeypatch):
    """Training with `spectral_filter` / `spectral_reg` filters the gradients the optimiser steps with and adds the
    Laplacian penalty to the loss it backpropagates, as `mftc_peft.spectral` defines them; with both 0, neither."""
    beta, lam = 0.5, 0.1
    plain, off = train_and_record(tmp_path / "off", monkeypatch)
    filtered, on = train_and_record(tmp_path / "filter", monkeypatch, spectral_filter=beta)
    regularised, reg = train_and_record(tmp_path / "reg", monkeypatch, spectral_reg=lam)
    assert plain.spectral is None and filtered.spectral is not None and regularised.spectral is not None
    assert filtered.warmup_report.selection == regularised.warmup_report.selection == plain.warmup_report.selection
    groups = coordination_groups(plain, off["deltas"][0])
    assert groups, "the selection must hold same-shape blocks for the coordination to couple"
    grouped = {place for places, _ in groups for place in places}
    loose = [place for place in block_lines(plain.model).values() if place not in grouped]

    # off: the optimiser steps with backward's gradients, and the loss is the model's
    for step in range(2):
        assert off["stepped"][step].keys() == off["raw"][step].keys() == off["deltas"][step].keys()
        assert all(torch.equal(off["stepped"][step][n], off["raw"][step][n]) for n in off["raw"][step])
    assert off["loss"] == off["plain_loss"]

    # filter: G <- (1 - beta) G + beta A G within each group, other blocks untouched; the loss is the model's
    for step in range(2):
        raw, stepped = on["raw"][step], on["stepped"][step]
        for places, adjacency in groups:
            expected = (1 - beta) * stack(raw, places) + beta * adjacency @ stack(raw, places)
            torch.testing.assert_close(stack(stepped, places), expected, rtol=1e-5, atol=1e-8)
            assert not torch.allclose(stack(stepped, places), stack(raw, places), rtol=1e-2, atol=0)
        assert all(torch.equal(stack(stepped, [place]), stack(raw, [place])) for place in loose)
    assert on["loss"] == on["plain_loss"]

    # regulariser: the loss is the model's + lam tr(Delta^T L Delta), L = I - A, and backward adds 2 lam L Delta
    for step in range(2):
        assert all(torch.equal(reg["stepped"][step][n], reg["raw"][step][n]) for n in reg["raw"][step])
        deltas = reg["deltas"][step]
        penalty = sum(
            float((stack(deltas, places) * (stack(deltas, places) - adjacency @ stack(deltas, places))).sum())
            for places, adjacency in groups
        )
        assert reg["loss"][step] - reg["plain_loss"][step] == pytest.approx(lam * penalty, rel=1e-4, abs=1e-6)
    assert reg["loss"][1] - reg["plain_loss"][1] > 1e-3  # the deltas are no longer zero at the second step
    # step 1 starts from zero deltas, where the penalty is flat, so at step 2 both runs hold the same deltas
    assert all(torch.equal(reg["deltas"][1][n], off["deltas"][1][n]) for n in off["deltas"][1])
    deltas = off["deltas"][1]
    for places, adjacency in groups:
        extra = stack(reg["raw"][1], places) - stack(off["raw"][1], places)
        expected = 2 * lam * (stack(deltas, places) - adjacency @ stack(deltas, places))
        torch.testing.assert_close(extra, expected, rtol=1e-3, atol=1e-6)
        assert expected.abs().max() > 1e-4
    assert all(torch.equal(stack(reg["raw"][1], [place]), stack(off["raw"][1], [place])) for place in loose)


def test_trainer_needs_an_mftc_model(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="must be a PEFT model with an MFTC adapter"):
        mftc_peft.MFTCTrainer(model=torch.nn.Linear(2, 2), args=args)
