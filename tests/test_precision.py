"""Reduced-precision bases: PEFT's convention (trainable deltas in fp32 on a bf16/fp16 base unless
`autocast_adapter_dtype=False`) on every path that creates a delta, forward in the input's dtype, exact
merge/unmerge."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.overrides import TorchFunctionMode
from tiny_models import CASES_BY_NAME, VOCAB, outputs

import mftc_peft
from mftc_peft import MFTCConfig, MFTCLayer

WARMUP = dict(warmup_steps=4, dsca_every=2, n_clusters=4, embed_dim=6, budget=0.1)
LLAMA = CASES_BY_NAME["llama_gqa"]


def causal_batches(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, VOCAB, (4, 9), generator=generator) for _ in range(n)]
    return [{"input_ids": i, "labels": i.clone()} for i in ids]


def explicit_model(dtype, **kwargs):
    config = MFTCConfig(**copy.deepcopy(LLAMA.config_kwargs), init_weights=False)
    return get_peft_model(LLAMA.model().to(dtype), config, **kwargs)


def warm_model(dtype, *, config=None, **kwargs):
    """The path the issue found: the warm-up injects the blocks after PEFT's own dtype cast."""
    config = config or MFTCConfig(task_type="CAUSAL_LM", **WARMUP)
    model = get_peft_model(LLAMA.model().to(dtype), config, **kwargs)
    mftc_peft.warmup(model, causal_batches(4), progress=False)
    assert model.base_model.selected_numel() > 0
    return model


def deltas(model):
    return [p for n, p in model.named_parameters() if "mftc_delta" in n and p.numel()]


def layers(model):
    return [m for m in model.modules() if isinstance(m, MFTCLayer)]


@pytest.mark.parametrize("build", [explicit_model, warm_model], ids=["block_selection", "warmup"])
@pytest.mark.parametrize("autocast", [True, False])
def test_deltas_follow_autocast_adapter_dtype(build, autocast):
    model = build(torch.bfloat16, autocast_adapter_dtype=autocast)
    expected = torch.float32 if autocast else torch.bfloat16
    assert {p.dtype for p in deltas(model)} == {expected}
    assert all(p.requires_grad for p in deltas(model))
    assert all(layer.base_layer.weight.dtype == torch.bfloat16 for layer in layers(model))


def test_step_scales_follow_the_delta_dtype():
    model = warm_model(torch.bfloat16, config=MFTCConfig(task_type="CAUSAL_LM", step_scale="energy", **WARMUP))
    scales = [layer.mftc_scale["default"] for layer in layers(model) if layer.mftc_delta["default"].numel()]
    assert scales and {s.dtype for s in scales} == {torch.float32}


def test_step_scales_keep_their_unrounded_values_on_a_bf16_base():
    model = explicit_model(torch.bfloat16, autocast_adapter_dtype=True)
    name, layer = next((n, m) for n, m in model.base_model.mftc_layers() if m.mftc_delta["default"].numel())
    ids = layer.block_ids("default")
    model.peft_config["default"].step_scale = "energy"
    model.base_model.set_block_selection({name: ids}, step_scales={name: [0.7371] * len(ids)})
    scale = layer.mftc_scale["default"]
    assert scale.dtype == torch.float32 and torch.all(scale == torch.tensor(0.7371))  # bf16 would give 0.73828125


def test_safe_merge_checks_the_sum_as_written_in_the_base_dtype():
    """On an fp16 base a finite fp32 sum can overflow when written: safe_merge must refuse it and write nothing."""
    model = explicit_model(torch.float16, autocast_adapter_dtype=True)
    layer = next(m for m in layers(model) if m.mftc_delta["default"].numel())
    with torch.no_grad():
        layer.mftc_delta["default"].fill_(1e5)  # finite in fp32, past fp16's 65504
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_a_step_too_small_for_bf16_still_changes_the_delta():
    model = warm_model(torch.bfloat16).train()
    trained = deltas(model)
    with torch.no_grad():
        for p in trained:
            p.fill_(1.0)  # bf16 resolves 1.0 +- 2**-8 at best: every step below ~0.4% is lost in bf16
    model(**causal_batches(1, seed=3)[0]).loss.backward()
    largest = max(float(p.grad.abs().max()) for p in trained)
    assert largest > 0
    lr = 1e-3 / largest
    torch.optim.SGD(trained, lr=lr).step()  # every element moves by at most 1e-3
    moved = sum(int((p != 1.0).sum()) for p in trained)
    # fp32 resolves steps of 2**-23 at 1.0; those must all land (in bf16 none would), and they must be most of them
    resolvable = sum(int((lr * p.grad.abs() >= 2**-23).sum()) for p in trained)
    nonzero = sum(int((p.grad != 0).sum()) for p in trained)
    assert moved >= resolvable > 0.9 * nonzero > 0


def test_reselection_keeps_the_delta_dtype_and_parameter(monkeypatch):
    measured = mftc_peft.dynamic._energy_per_element

    def energies(peft_model, layers, adapter_name, *rest):  # the real measurement, unselected blocks made the newcomers
        energy = measured(peft_model, layers, adapter_name, *rest)
        for name, layer in layers.items():
            unselected = np.setdiff1d(np.arange(energy[name].size), layer.block_ids(adapter_name))
            energy[name][unselected] += 1.0 + 10 * energy[name].max()
        return energy

    monkeypatch.setattr(mftc_peft.dynamic, "_energy_per_element", energies)
    model = warm_model(torch.bfloat16)
    before = {id(p) for p in deltas(model)}
    report = mftc_peft.reselect_blocks(model, causal_batches(2, seed=4), fraction=1.0)
    assert report.n_swapped > 0
    assert {id(p) for p in deltas(model)} == before
    assert {p.dtype for p in deltas(model)} == {torch.float32}


class MatmulDtypes(TorchFunctionMode):
    """Records the operand dtypes of every matrix product run inside it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "linear"):
            self.seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_computes_in_the_input_dtype(dtype):
    model = explicit_model(dtype)
    checked = 0
    for layer in layers(model):
        if not layer.mftc_delta["default"].numel():
            continue
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        with torch.no_grad(), MatmulDtypes() as products:
            got = layer(x)
        with torch.no_grad():
            expected = layer.base_layer(x) + (x @ layer.get_delta_weight("default").to(dtype).T).to(dtype)
        assert got.dtype == dtype
        assert len(products.seen) == 2 and all(seen == {dtype} for seen in products.seen)  # base and block product
        torch.testing.assert_close(got, expected, atol=5e-2, rtol=0)
        checked += 1
    assert checked > 0


def test_merge_writes_the_base_dtype_and_unmerge_restores_it_bit_identically():
    model = warm_model(torch.bfloat16).train()
    optimizer = torch.optim.AdamW(deltas(model), lr=1e-2)
    model(**causal_batches(1, seed=3)[0]).loss.backward()
    optimizer.step()
    model.eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "mftc_" not in n}
    inputs = LLAMA.inputs()
    with torch.no_grad():
        unmerged = outputs(model, inputs)
        model.merge_adapter()
        for layer in layers(model):
            weight = layer.base_layer.weight
            assert weight.dtype == torch.bfloat16
            expected = (weights_of(weights, layer, model).float() + layer.get_delta_weight("default")).bfloat16()
            assert torch.equal(weight, expected)  # added in fp32, rounded once to the base dtype
        merged = outputs(model, inputs)
        model.unmerge_adapter()
    assert unmerged.dtype == merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=5e-2, rtol=0)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "mftc_" not in n)


def weights_of(weights, layer, model):
    name = next(n for n, m in model.named_modules() if m is layer)
    return weights[f"{name}.base_layer.weight"]


@pytest.mark.parametrize("autocast", [True, False])
def test_reload_of_a_warm_adapter_keeps_the_convention(tmp_path, autocast):
    """A regression guard: PEFT's `load_adapter` casts again after loading, so this holds through PEFT too."""
    model = warm_model(torch.bfloat16, autocast_adapter_dtype=autocast).eval()
    with torch.no_grad():
        for p in deltas(model):
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    # Without the selection in the config, the layers take their shapes from the checkpoint (re-created deltas).
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "block_selection": {}}))
    reloaded = PeftModel.from_pretrained(
        LLAMA.model().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast
    ).eval()
    assert {p.dtype for p in deltas(reloaded)} == {torch.float32 if autocast else torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(outputs(reloaded, LLAMA.inputs()), outputs(model, LLAMA.inputs()))
