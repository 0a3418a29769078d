"""Table-driven adapter suite: every tiny model goes through the life cycle a LoRA user expects."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import CASES, outputs

import mftc_peft  # noqa: F401
from mftc_peft import MFTCConfig, MFTCLayer

TESTS_DIR = Path(__file__).parent
MERGE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}


def make_peft_model(case, **overrides):
    kwargs = {**copy.deepcopy(case.config_kwargs), "init_weights": False, **overrides}
    return get_peft_model(case.model(), MFTCConfig(**kwargs))


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "mftc_" not in n}


def adapter_layers(model):
    return [m for m in model.modules() if isinstance(m, MFTCLayer)]


def selected_numel(model, adapter="default") -> int:
    total = 0
    for layer in adapter_layers(model):
        grid = layer.mftc_grid[adapter]
        total += grid.numel(layer.block_ids(adapter))
    return total


def modules_to_save_numel(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad)


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request):
    return request.param


def test_trainable_parameters_are_the_selected_blocks(case):
    model = make_peft_model(case)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert selected_numel(model) > 0
    assert trainable == selected_numel(model) + modules_to_save_numel(model)
    # the deltas hold exactly the selected lines of each weight
    for layer in adapter_layers(model):
        grid = layer.mftc_grid["default"]
        delta = layer.mftc_delta["default"]
        assert delta.numel() == grid.numel(layer.block_ids("default"))


def test_one_step_changes_outputs_and_leaves_base_weights(case):
    model = make_peft_model(case, init_weights=True)
    inputs = case.inputs()
    before = base_weights(model)
    model.train()
    out0 = outputs(model, inputs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out0.square().mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(outputs(model, inputs), out0.detach())
    after = base_weights(model)
    changed = [n for n in before if not torch.equal(before[n], after[n]) and "modules_to_save" not in n]
    assert changed == []


def test_save_and_reload_in_fresh_process_is_bit_identical(case, tmp_path):
    model = make_peft_model(case).eval()
    inputs = case.inputs()
    with torch.no_grad():
        expected = outputs(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    weights_file = tmp_path / "adapter" / "adapter_model.safetensors"
    assert weights_file.exists() and not (tmp_path / "adapter" / "adapter_model.bin").exists()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out_path = tmp_path / "logits.safetensors"
    subprocess.run(
        [sys.executable, str(TESTS_DIR / "reload_in_fresh_process.py"), case.name, str(tmp_path / "adapter"),
         str(out_path)],
        check=True, env=env, cwd=TESTS_DIR.parent,
    )
    assert torch.equal(load_file(out_path)["logits"], expected)


def test_adapter_file_holds_about_four_bytes_per_trained_element(case, tmp_path):
    model = make_peft_model(case)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    # Tiny models: compare the tensor payload; the JSON header (a few KB) is measured on a larger model elsewhere.
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    payload = path.stat().st_size - 8 - header_length
    assert payload <= 4 * selected_numel(model) * 1.02 + 4 * modules_to_save_numel(model)


def test_merge_is_close_and_unmerge_restores_base_bit_exactly(case):
    model = make_peft_model(case).eval()
    inputs = case.inputs()
    before = base_weights(model)
    with torch.no_grad():
        unmerged = outputs(model, inputs)
        model.merge_adapter()
        merged = outputs(model, inputs)
        changed = [n for n in _targeted(model) if not torch.equal(base_weights(model)[n], before[n])]
        assert changed == _targeted(model)
        model.unmerge_adapter()
    torch.testing.assert_close(merged, unmerged, atol=MERGE_ATOL[torch.float32], rtol=0)
    after = base_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def _targeted(model) -> list[str]:
    """Parameter names of the base weights that hold at least one selected block."""
    return [
        f"{name}.base_layer.weight"
        for name, module in model.named_modules()
        if isinstance(module, MFTCLayer) and module.block_ids("default")
    ]


def test_disable_adapter_gives_base_outputs_exactly(case):
    inputs = case.inputs()
    with torch.no_grad():
        base_out = outputs(case.model(), inputs)
        model = make_peft_model(case, modules_to_save=None).eval()
        assert not torch.equal(outputs(model, inputs), base_out)
        with model.disable_adapter():
            disabled = outputs(model, inputs)
    assert torch.equal(disabled, base_out)


def test_two_adapters_set_and_delete(case):
    model = make_peft_model(case).eval()
    inputs = case.inputs()
    other = {**copy.deepcopy(case.config_kwargs), "init_weights": False, "seed": 7}
    model.add_adapter("other", MFTCConfig(**other))
    with torch.no_grad():
        out_default = outputs(model, inputs)
        model.set_adapter("other")
        out_other = outputs(model, inputs)
    assert not torch.equal(out_default, out_other)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "mftc_" in n}
    assert trainable and all(n.endswith(".other") for n in trainable)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert all("other" not in n for n in model.state_dict())
    with torch.no_grad():
        assert torch.equal(outputs(model, inputs), out_default)


def test_merge_and_unload_returns_the_plain_model(case):
    model = make_peft_model(case).eval()
    inputs = case.inputs()
    with torch.no_grad():
        expected = outputs(model, inputs)
        plain = model.merge_and_unload()
        assert type(plain) is type(case.model())
        assert not any(isinstance(m, MFTCLayer) for m in plain.modules())
        torch.testing.assert_close(outputs(plain, inputs), expected, atol=MERGE_ATOL[torch.float32], rtol=0)


def test_config_round_trips_through_json(case, tmp_path):
    model = make_peft_model(case)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MFTC"
    assert saved["block_selection"] == case.config_kwargs["block_selection"]
