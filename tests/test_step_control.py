"""Step control per block (`MFTCConfig.step_scale`): the scales, the layer that applies them, the warm-up that sets
them, and save / load / merge with them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import CASES_BY_NAME, outputs
from test_warmup import token_batches, warm_model

import mftc_peft
from mftc_peft import MFTCConfig
from mftc_peft.search import BlockTable
from mftc_peft.step_control import energy_step_scales

QUERY = "bert.encoder.layer.0.attention.self.query"
VALUE = "bert.encoder.layer.1.attention.self.value"


def test_energy_scales_shrink_the_blocks_above_the_median_per_element_energy():
    table = BlockTable(("a", "a", "a", "b"), np.array([0, 1, 2, 0]), np.array([10, 10, 10, 40]),
                       np.array([10.0, 40.0, 0.0, 160.0]))  # per element: 1, 4, 0, 4
    scales = energy_step_scales(table, {"a": [1, 0], "b": [0]}, power=0.5)
    # median per-element energy of the selected blocks (4, 1, 4) is 4: the two at 4 keep 1, the one at 1 keeps 1
    assert scales == {"a": [1.0, 1.0], "b": [1.0]}
    scales = energy_step_scales(table, {"a": [0, 2, 1]}, power=0.5)  # median of (1, 0, 4) is 1
    assert scales["a"] == [1.0, 1.0, pytest.approx(0.5)]  # 4x the energy: half the step; no gradient: full step
    assert energy_step_scales(table, {"a": [0, 1]}, power=1.0)["a"] == [1.0, pytest.approx(2.5 / 4)]


def _scaled_model(scale: float, *, init_weights=False):
    case = CASES_BY_NAME["bert"]
    config = MFTCConfig(**case.config_kwargs, init_weights=init_weights, step_scale="energy")
    model = get_peft_model(case.model(), config)
    model.base_model.set_block_selection({QUERY: [1, 0], VALUE: [2]}, init_weights=init_weights,
                                         step_scales={QUERY: [scale, 1.0], VALUE: [scale]})
    return case, model


def test_a_scaled_block_contributes_scale_times_its_delta_and_takes_a_scaled_adam_step():
    case, half = _scaled_model(0.5)
    _, full = _scaled_model(1.0)
    layer = dict(half.base_model.mftc_layers())[QUERY]
    grid = layer.mftc_grid["default"]
    expected = torch.cat([torch.full((grid.width,), 1.0), torch.full((grid.width,), 0.5)])  # ids sorted: 0, then 1
    assert torch.equal(layer.mftc_scale["default"], expected)
    dense_half = layer.get_delta_weight("default")
    dense_full = dict(full.base_model.mftc_layers())[QUERY].get_delta_weight("default")  # same random theta
    rows = grid.feature_index([1])
    assert torch.allclose(dense_half[rows], 0.5 * dense_full[rows]) and dense_half[rows].abs().sum() > 0
    assert torch.equal(dense_half[grid.feature_index([0])], dense_full[grid.feature_index([0])])
    # One Adam step from zero deltas moves theta by about lr per element whatever its gradient's size, so the applied
    # delta of a block with scale 0.5 moves half as far as without scales; the unscaled block moves the same.
    moved = {}
    for scale in (0.5, 1.0):
        _, model = _scaled_model(scale, init_weights=True)
        # eps far below the tiny model's gradients: the first Adam step is exactly lr * sign(gradient)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-30)
        outputs(model, case.inputs()).pow(2).mean().backward()
        optimizer.step()
        moved[scale] = dict(model.base_model.mftc_layers())[QUERY].get_delta_weight("default").detach()
    assert moved[1.0][rows].abs().max() > 5e-4
    assert torch.allclose(moved[0.5][rows], 0.5 * moved[1.0][rows], atol=1e-7)
    assert torch.allclose(moved[0.5][grid.feature_index([0])], moved[1.0][grid.feature_index([0])], atol=1e-7)


def test_scales_survive_save_load_and_merge_is_exact(tmp_path):
    case, model = _scaled_model(0.25)
    model.eval()
    inputs = case.inputs()
    expected = outputs(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.model(), tmp_path).eval()
    assert torch.allclose(outputs(reloaded, inputs), expected, atol=1e-6)
    layer = dict(reloaded.base_model.mftc_layers())[QUERY]
    assert layer.mftc_scale["default"].min().item() == 0.25
    base_weight = layer.get_base_layer().weight.detach().clone()
    reloaded.base_model.merge_adapter()
    assert torch.allclose(outputs(reloaded, inputs), expected, atol=1e-5)
    reloaded.base_model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, base_weight)


def test_the_warmup_sets_energy_scales_only_when_asked():
    _, plain = warm_model()
    report = mftc_peft.warmup(plain, token_batches(6), progress=False)
    assert report.step_scales is None
    assert all(len(layer.mftc_scale) == 0 for _, layer in plain.base_model.mftc_layers())
    _, scaled = warm_model(step_scale="energy")
    report = mftc_peft.warmup(scaled, token_batches(6), progress=False)
    assert report.selection and set(report.step_scales) == set(report.selection)
    values = [s for scales in report.step_scales.values() for s in scales]
    assert all(0 < s <= 1 for s in values) and min(values) < 1.0 and values.count(1.0) >= len(values) // 2
    for name, layer in scaled.base_model.mftc_layers():
        if name in report.selection:
            grid = layer.mftc_grid["default"]
            by_id = dict(zip(report.selection[name], report.step_scales[name]))
            ids = layer.block_ids("default")
            expected = torch.tensor([by_id[b] for b in ids]).repeat_interleave(torch.tensor(grid.widths(ids)))
            assert torch.allclose(layer.mftc_scale["default"], expected)


def test_set_block_selection_checks_the_scales_before_changing_anything():
    _, model = _scaled_model(0.5)
    before = model.base_model.block_selection()
    with pytest.raises(ValueError, match=r"`step_scales\['.*query'\]` must hold one scale per selected block \(2\)"):
        model.base_model.set_block_selection({QUERY: [0, 1]}, step_scales={QUERY: [1.0]})
    with pytest.raises(ValueError, match=r"must be positive finite numbers, got \[1.0, -1.0\]"):
        model.base_model.set_block_selection({QUERY: [0, 1]}, step_scales={QUERY: [1.0, -1.0]})
    assert model.base_model.block_selection() == before
    case = CASES_BY_NAME["bert"]
    plain = get_peft_model(case.model(), MFTCConfig(**case.config_kwargs))
    with pytest.raises(ValueError, match=r"`step_scales` need an adapter whose config has `step_scale` set"):
        plain.base_model.set_block_selection({QUERY: [0]}, step_scales={QUERY: [0.5]})


# ----- block_step_scale: one scale for every block, next to the low-rank part's unscaled rate -----

def _uniform_model(block_step_scale: float, **overrides):
    case = CASES_BY_NAME["bert"]
    kwargs = case.config_kwargs | {"block_selection": {QUERY: [0, 1], VALUE: [2]}}
    config = MFTCConfig(**kwargs, block_step_scale=block_step_scale, low_rank=2, **overrides)
    return case, get_peft_model(case.model(), config)


def test_a_block_step_scale_scales_the_blocks_adam_step_and_leaves_the_low_rank_part_alone():
    moved = {}
    for scale in (0.25, 1.0):
        case, model = _uniform_model(scale)
        layer = dict(model.base_model.mftc_layers())[QUERY]
        if scale != 1.0:
            assert torch.equal(layer.mftc_scale["default"], torch.full((2 * layer.mftc_grid["default"].width,), scale))
        else:
            assert len(layer.mftc_scale) == 0  # no scales asked for: no buffer
        torch.manual_seed(0)
        # eps far below the tiny model's gradients: the first Adam step is exactly lr * sign(gradient)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-30)
        outputs(model, case.inputs()).pow(2).mean().backward()
        optimizer.step()
        moved[scale] = {"blocks": layer.applied_delta("default").detach().clone(),
                        "B": layer.mftc_lora_B["default"].detach().clone()}
    assert moved[1.0]["blocks"].abs().max() > 5e-4
    assert torch.allclose(moved[0.25]["blocks"], 0.25 * moved[1.0]["blocks"], atol=1e-7)
    # B starts at 0 and gets the same gradient in both (zero block deltas): its step is the optimiser's rate itself
    assert moved[1.0]["B"].abs().max() > 5e-4
    assert torch.equal(moved[0.25]["B"], moved[1.0]["B"])


def test_the_warmup_multiplies_every_blocks_scale_by_the_block_step_scale():
    _, uniform = warm_model(block_step_scale=0.3)
    report = mftc_peft.warmup(uniform, token_batches(6), progress=False)
    assert report.selection and set(report.step_scales) == set(report.selection)
    assert {s for scales in report.step_scales.values() for s in scales} == {0.3}
    for name, layer in uniform.base_model.mftc_layers():
        if name in report.selection:
            assert torch.allclose(layer.mftc_scale["default"], torch.tensor(0.3))
    _, energy = warm_model(step_scale="energy")
    _, both = warm_model(step_scale="energy", block_step_scale=0.3)
    by_energy = mftc_peft.warmup(energy, token_batches(6), progress=False).step_scales
    by_both = mftc_peft.warmup(both, token_batches(6), progress=False).step_scales
    assert by_both.keys() == by_energy.keys()
    for name in by_energy:
        assert by_both[name] == pytest.approx([0.3 * s for s in by_energy[name]])


def _warmed_uniform_model(block_step_scale: float):
    """A warmed-up hybrid with `block_step_scale` and random (non-zero) block deltas and B: its config lists the
    warm-up's selection, which the test removes when it wants the checkpoint's selection to be the one loaded."""
    _, model = warm_model(block_step_scale=block_step_scale, low_rank=1)
    mftc_peft.warmup(model, token_batches(6), progress=False)
    with torch.no_grad():
        for _, layer in model.base_model.mftc_layers():
            for container in (layer.mftc_delta, layer.mftc_lora_B):
                container["default"].normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.parametrize("listed", [True, False])
def test_a_block_step_scale_survives_save_and_load_and_merges_exactly(tmp_path, listed):
    model = _warmed_uniform_model(0.5)
    inputs = token_batches(1)[0]["input_ids"]
    expected = model(input_ids=inputs).logits
    name, layer = next((n, layer) for n, layer in model.base_model.mftc_layers() if layer.block_ids("default"))
    saved_scales = layer.mftc_scale["default"].clone()
    with torch.no_grad():
        layer.mftc_scale["default"].fill_(1.0)
        assert not torch.allclose(model(input_ids=inputs).logits, expected, atol=1e-4)  # the scales matter
        layer.mftc_scale["default"].copy_(saved_scales)
    if not listed:
        model.peft_config["default"].block_selection = {}  # the reload takes the checkpoint's blocks
    model.save_pretrained(tmp_path)
    case, _ = warm_model()
    reloaded = PeftModel.from_pretrained(case.model(), tmp_path).eval()
    assert reloaded.peft_config["default"].block_step_scale == 0.5
    assert torch.equal(dict(reloaded.base_model.mftc_layers())[name].mftc_scale["default"], saved_scales)
    assert torch.allclose(reloaded(input_ids=inputs).logits, expected, atol=1e-6)
    reloaded.base_model.merge_adapter()
    assert torch.allclose(reloaded(input_ids=inputs).logits, expected, atol=1e-5)


@pytest.mark.parametrize("saved, loaded", [(0.5, 1.0), (1.0, 0.5)])
def test_a_checkpoint_and_a_config_that_disagree_on_step_scales_are_refused(tmp_path, saved, loaded):
    model = _warmed_uniform_model(saved)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["block_step_scale"] = loaded
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    case, _ = warm_model()
    with pytest.raises(ValueError, match=r"mftc_scale.*the config and the saved tensors disagree"):
        PeftModel.from_pretrained(case.model(), tmp_path)


def test_blocks_grown_by_a_reselection_take_the_block_step_scale():
    case = CASES_BY_NAME["bert"]
    config = MFTCConfig(**case.config_kwargs, block_step_scale=0.5, reselect_every=1)
    model = get_peft_model(case.model(), config)
    model.base_model.set_block_selection({QUERY: [0, 1, 2]})
    report = mftc_peft.reselect_blocks(model, token_batches(2), fraction=1.0)
    assert report.n_swapped > 0
    layer = dict(model.base_model.mftc_layers())[QUERY]
    assert torch.equal(layer.mftc_scale["default"], torch.full_like(layer.mftc_scale["default"], 0.5))
