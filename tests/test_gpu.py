"""On CUDA (skipped without it): the layer, the warm-up (signatures, DSCA, search), save/load and merge, a bf16 base
with fp32 deltas, and training steps that never wait on the host (`torch.cuda.set_sync_debug_mode("error")`).

    python -m pytest -q tests/test_gpu.py        # scripts/gpu_check.sh runs it, then short real fine-tunes
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import CASES, CASES_BY_NAME, VOCAB, outputs

import mftc_peft
from mftc_peft import MFTCConfig, MFTCLayer
from mftc_peft.measure import weight_gradients_only
from mftc_peft.signatures import SignatureCollector
from mftc_peft.spectral import SpectralCoordinator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
WARMUP = dict(warmup_steps=6, dsca_every=2, n_clusters=4, embed_dim=6, budget=0.1)


@contextlib.contextmanager
def host_syncs():
    """Records every device-to-host synchronisation inside (`.item()`, `.cpu()`, masks, blocking copies) as a warning
    attributed to the Python line that caused it; transformers' own syncs are not ours to fix, so callers filter."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.cuda.set_sync_debug_mode("default")


def ours(caught) -> list[str]:
    """The synchronisations that MFTC's own code caused (file:line)."""
    return [f"{w.filename}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message) and f"{os.sep}mftc_peft{os.sep}" in w.filename]


def test_layer_forward_and_backward_without_host_sync():
    for case in CASES:
        model = get_peft_model(case.model().to(CUDA), MFTCConfig(**copy.deepcopy(case.config_kwargs))).train()
        for layer in [m for m in model.modules() if isinstance(m, MFTCLayer)]:
            x = torch.randn(4, layer.in_features, device=CUDA, requires_grad=True)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # nothing but MFTC's layer runs here: any sync raises
            try:
                layer(x).square().mean().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")


def causal_batches(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, VOCAB, (8, 9), generator=generator) for _ in range(n)]
    return [{"input_ids": i.to(CUDA), "labels": i.clone().to(CUDA)} for i in ids]


def on_cuda(inputs):
    return {k: v.to(CUDA) for k, v in inputs.items()}


def deltas(model):
    return [p for n, p in model.named_parameters() if "mftc_delta" in n and p.numel()]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_merge_and_save_load_on_cuda(case, dtype, tmp_path):
    config = MFTCConfig(**copy.deepcopy(case.config_kwargs), init_weights=False)
    model = get_peft_model(case.model().to(CUDA, dtype), config).eval()
    assert deltas(model) and all(p.device.type == CUDA.type and p.dtype == torch.float32 for p in deltas(model))
    inputs = on_cuda(case.inputs())
    if dtype != torch.float32:
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "mftc_" not in n}
    with torch.no_grad():
        unmerged = outputs(model, inputs)
        model.merge_adapter()
        merged = outputs(model, inputs)
        model.unmerge_adapter()
    assert unmerged.dtype == dtype
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=1e-4 if dtype == torch.float32 else 5e-2, rtol=0)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "mftc_" not in n)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.model().to(CUDA, dtype), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(outputs(reloaded, inputs), unmerged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("step_scale", ["none", "energy"])
def test_warmup_then_training_steps_without_host_sync(dtype, step_scale, tmp_path):
    case = CASES_BY_NAME["llama_gqa"]
    config = MFTCConfig(task_type="CAUSAL_LM", step_scale=step_scale, **WARMUP)
    model = get_peft_model(case.model().to(CUDA, dtype), config)
    report = mftc_peft.warmup(model, causal_batches(6), progress=False)
    assert report.trainable_elements > 0
    assert all(p.device.type == CUDA.type and p.dtype == torch.float32 for p in deltas(model))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = causal_batches(1, seed=3)[0]
    for step in range(3):  # the first step allocates the optimiser state; every step is checked
        with host_syncs() as caught:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert ours(caught) == [], f"step {step}"
    assert torch.isfinite(loss).item()
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.model().to(CUDA, dtype), tmp_path).eval()
    inputs = on_cuda(case.inputs())
    with torch.no_grad():
        assert torch.equal(outputs(reloaded, inputs), outputs(model, inputs))


@pytest.mark.parametrize("keep_history", [False, True], ids=["energy", "sketches"])
def test_warmup_backward_passes_without_host_sync(keep_history):
    """The warm-up's hooks reduce each weight gradient on the device; only `end_micro_batch` copies to the host. (The
    first micro-batch moves the collector's index tensors to the device once, so the second one is checked.)"""
    case = CASES_BY_NAME["llama_gqa"]
    model = get_peft_model(case.model().to(CUDA), MFTCConfig(task_type="CAUSAL_LM", **WARMUP))
    layers = dict(model.base_model.mftc_layers("default"))
    grids = {name: layer.mftc_grid["default"] for name, layer in layers.items()}
    batches = causal_batches(2)
    with SignatureCollector(weight_gradients_only(model, layers, grids), keep_history=keep_history) as collector:
        for index, batch in enumerate(batches):
            loss = model(**batch).loss
            with host_syncs() as caught:
                loss.backward()
            assert index == 0 or ours(caught) == []
            assert collector.end_micro_batch()
    assert collector.block_energy().sum() > 0


def test_signatures_of_targets_on_two_devices_match_one_device():
    """Targets on the GPU and on the CPU (a model split by a device_map): each device's reductions are copied once and
    put back in target order, giving what the same weights give on one device."""
    from mftc_peft.blocks import BlockGrid

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(7, 10, generator=generator), torch.randn(6, 7, generator=generator)]
    inputs = [torch.randn(5, 10, generator=generator) for _ in range(2)]
    grids = [BlockGrid("out", in_features=10, out_features=7, width=3), BlockGrid("in", in_features=7, out_features=6,
                                                                                  width=4)]

    def collect(devices):
        first, second = (w.clone().to(d).requires_grad_(True) for w, d in zip(weights, devices))
        targets = {"a": (first, grids[0], False), "b": (second, grids[1], False)}
        with SignatureCollector(targets, keep_history=True) as collector:
            for x in inputs:
                hidden = x.to(devices[0]) @ first.T
                (hidden.to(devices[1]) @ second.T).pow(2).sum().backward()
                assert collector.end_micro_batch()
        return collector.block_energy(), collector.history()

    split, single = collect([CUDA, torch.device("cpu")]), collect([torch.device("cpu")] * 2)
    for got, expected in zip(split, single):
        assert got.shape == expected.shape
        assert torch.allclose(torch.as_tensor(got), torch.as_tensor(expected), rtol=1e-4, atol=1e-6)


def test_spectral_coordination_without_host_sync():
    case = CASES_BY_NAME["llama_gqa"]
    model = get_peft_model(case.model().to(CUDA), MFTCConfig(task_type="CAUSAL_LM", **WARMUP))
    report = mftc_peft.warmup(model, causal_batches(6), progress=False)
    graph = report.block_graph()
    coordinator = SpectralCoordinator(model, graph.nodes, graph.affinity, beta=0.5, lam=0.1)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = causal_batches(1, seed=3)[0]
    with host_syncs() as caught:
        loss = model(**batch).loss + coordinator.regularization()
        loss.backward()
        coordinator.filter_gradients()
        optimizer.step()
    assert ours(caught) == []
    assert all(group.adjacency.device.type == CUDA.type for group in coordinator.groups)


def test_mftc_trainer_on_cuda(tmp_path):
    from transformers import TrainingArguments

    case = CASES_BY_NAME["llama_gqa"]
    model = get_peft_model(case.model().to(torch.bfloat16), MFTCConfig(task_type="CAUSAL_LM", **WARMUP))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (64, 9), generator=generator)
    data = [{"input_ids": ids[i], "labels": ids[i].clone()} for i in range(64)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[],
        disable_tqdm=True, seed=0, save_strategy="no", gradient_checkpointing=True, bf16=True,
    )
    trainer = mftc_peft.MFTCTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.warmup_report.trainable_elements > 0
    assert {p.device.type for p in deltas(trainer.model)} == {CUDA.type}
    assert {p.dtype for p in deltas(trainer.model)} == {torch.float32}
