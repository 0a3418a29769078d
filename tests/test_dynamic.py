"""Dynamic selection (`reselect_every`): block swaps inside a weight, the optimiser state that follows them, the
adapter staying valid (count, save / load) at every step, and the Trainer callback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from test_trainer import make_trainer
from test_warmup import token_batches
from tiny_models import CASES_BY_NAME, outputs

import mftc_peft
import mftc_peft.dynamic
from mftc_peft import MFTCConfig

QUERY = "bert.encoder.layer.0.attention.self.query"
UP = "bert.encoder.layer.1.intermediate.dense"


def _model(selection, *, init_weights=False):
    case = CASES_BY_NAME["bert"]
    config = MFTCConfig(**{**case.config_kwargs, "block_selection": selection}, init_weights=init_weights)
    return case, get_peft_model(case.model(), config)


def _layer(model, name):
    return dict(model.base_model.mftc_layers())[name]


def test_swap_keeps_the_parameter_and_the_kept_lines_and_starts_new_blocks_at_zero():
    case, model = _model({QUERY: [0, 2, 3]})
    layer = _layer(model, QUERY)
    delta = layer.mftc_delta["default"]
    width = layer.mftc_grid["default"].width
    before = delta.detach().clone()
    source = layer.swap_blocks("default", drop=[2], grow=[1])
    assert layer.mftc_delta["default"] is delta and delta.shape == before.shape
    assert layer.block_ids("default") == [0, 1, 3]
    lines = torch.arange(width)
    assert torch.equal(delta[lines], before[lines])  # block 0 stays where it was
    assert torch.equal(delta[2 * width + lines], before[2 * width + lines])  # block 3 too
    assert torch.equal(delta[width + lines], torch.zeros(width, delta.shape[1]))  # block 1 is new
    assert source.tolist() == [*range(width), *[-1] * width, *range(2 * width, 3 * width)]
    # the layer computes exactly what a fresh adapter with that selection and those values computes
    _, fresh = _model({QUERY: [0, 1, 3]})
    with torch.no_grad():
        _layer(fresh, QUERY).mftc_delta["default"].copy_(delta)
    fresh.base_model.model.classifier.load_state_dict(model.base_model.model.classifier.state_dict())
    inputs = case.inputs()
    assert torch.allclose(outputs(model.eval(), inputs), outputs(fresh.eval(), inputs), atol=1e-6)


@pytest.mark.parametrize("drop, grow, match", [
    ([1], [2], r"`drop` must be selected blocks and `grow` as many unselected ones"),
    ([0], [3], r"`drop` must be selected blocks and `grow` as many unselected ones"),
    ([0], [], r"`drop` must be selected blocks"),
    ([0], [99], r"`grow` block ids must lie in"),
])
def test_swap_errors(drop, grow, match):
    _, model = _model({QUERY: [0, 3]})
    with pytest.raises(ValueError, match=match):
        _layer(model, QUERY).swap_blocks("default", drop=drop, grow=grow)
    assert _layer(model, QUERY).block_ids("default") == [0, 3]


def test_reselection_drops_the_deltas_that_did_not_move_and_moves_the_optimizer_state(tmp_path, monkeypatch):
    measured = mftc_peft.dynamic._energy_per_element

    def energies(*args):  # the real measurement, with free block 3 of the query made the clear newcomer
        energy = measured(*args)
        energy[QUERY][3] = 10 * energy[QUERY].max()
        return energy

    monkeypatch.setattr(mftc_peft.dynamic, "_energy_per_element", energies)
    case, model = _model({QUERY: [0, 1, 2], UP: [0, 1]}, init_weights=False)
    layer = _layer(model, QUERY)
    width = layer.mftc_grid["default"].width
    with torch.no_grad():
        layer.mftc_delta["default"][width : 2 * width] = 0.0  # block 1 never moved: the one to drop
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    outputs(model, case.inputs()).pow(2).mean().backward()
    optimizer.step()
    with torch.no_grad():
        layer.mftc_delta["default"][width : 2 * width] = 0.0
    state = optimizer.state[layer.mftc_delta["default"]]
    moments = {k: v.clone() for k, v in state.items() if v.shape == layer.mftc_delta["default"].shape}
    count = model.base_model.selected_numel()
    report = mftc_peft.reselect_blocks(model, token_batches(2), fraction=0.4, optimizer=optimizer)
    assert report.swaps[QUERY] == [(1, 3)]  # 0.4 x 3 blocks: one swap, the block that never moved for the free one
    assert report.n_swapped == sum(map(len, report.swaps.values()))
    ids = layer.block_ids("default")
    assert ids == [0, 2, 3] and model.base_model.selected_numel() == count
    assert model.peft_config["default"].block_selection == model.base_model.block_selection()
    position = ids.index(3) * width
    for key, old in moments.items():
        new = state[key]
        assert torch.equal(new[position : position + width], torch.zeros_like(new[:width]))
        assert torch.equal(new[:width], old[:width])  # block 0 kept its moments
    optimizer.step()  # the optimiser still works on the same Parameter
    # valid at every step: save, load into a fresh base, same outputs
    model.eval()
    expected = outputs(model, case.inputs())
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.model(), tmp_path).eval()
    assert torch.allclose(outputs(reloaded, case.inputs()), expected, atol=1e-6)


def test_trainer_reselects_every_k_steps_and_keeps_the_count(tmp_path, monkeypatch):
    trainer_module = pytest.importorskip("mftc_peft.trainer")
    calls = []

    def spy(model, batches, **kwargs):
        calls.append((trainer.state.global_step, len(batches), kwargs["fraction"], kwargs["optimizer"]))
        return mftc_peft.reselect_blocks(model, batches, **kwargs)

    monkeypatch.setattr(trainer_module, "reselect_blocks", spy)
    trainer = make_trainer(tmp_path, max_steps=4, reselect_every=2, reselect_fraction=0.5, reselect_batches=3)
    trainer.train()
    # steps 2 and 4 are due; 4 is the last, where a swap would only discard trained blocks
    assert [(step, n, fraction) for step, n, fraction, _ in calls] == [(2, 3, 0.5)]
    assert all(optimizer is trainer.optimizer for *_, optimizer in calls)
    warm = trainer.warmup_report.selection
    assert sum(map(len, trainer.model.base_model.block_selection().values())) == sum(map(len, warm.values()))
    calls.clear()
    make_trainer(tmp_path / "plain", max_steps=4).train()
    assert calls == []  # off by default


def test_reselection_judges_a_block_by_the_change_it_applied_not_its_raw_delta(monkeypatch):
    """Under step scales a block's raw delta is not what it moved: block 0 below holds the largest raw delta but,
    scaled by 0.01, changed the weight least, so it is the one dropped."""
    measured = mftc_peft.dynamic._energy_per_element

    def energies(*args):
        energy = measured(*args)
        energy[QUERY][3] = 10 * energy[QUERY].max()
        return energy

    monkeypatch.setattr(mftc_peft.dynamic, "_energy_per_element", energies)
    case = CASES_BY_NAME["bert"]
    config = MFTCConfig(**case.config_kwargs, step_scale="energy", reselect_every=1)
    model = get_peft_model(case.model(), config)
    model.base_model.set_block_selection({QUERY: [0, 1, 2]}, step_scales={QUERY: [0.01, 1.0, 1.0]})
    layer = _layer(model, QUERY)
    width = layer.mftc_grid["default"].width
    with torch.no_grad():
        delta = layer.mftc_delta["default"]
        delta[:width], delta[width:] = 1.0, 0.1  # raw: block 0 largest; applied: block 0 = 0.01, blocks 1-2 = 0.1
    report = mftc_peft.reselect_blocks(model, token_batches(2), fraction=0.4)
    assert report.swaps[QUERY] == [(0, 3)]


def test_reselection_swaps_where_weights_hold_one_block_each_and_keeps_the_total_fraction(monkeypatch):
    """The proportional allocation gives most weights one block or none; a cap of `fraction` per weight alone would
    round every swap to zero. The cap is over all selected blocks, the largest energy ratios first."""
    key, value = QUERY.replace("query", "key"), QUERY.replace("query", "value")
    # (selected block 0, free block 1): ratios 100, 20, 50 and 0.5; by the newcomer alone UP and the query would win
    energy_of = {QUERY: (1.0, 100.0), UP: (10.0, 200.0), key: (0.1, 5.0), value: (1.0, 0.5)}

    def energies(peft_model, layers, *args):
        return {name: np.array([*energy_of.get(name, (0.0, 0.0)), *[0.0] * (layer.mftc_grid["default"].n_blocks - 2)])
                for name, layer in layers.items()}

    monkeypatch.setattr(mftc_peft.dynamic, "_energy_per_element", energies)
    _, model = _model({QUERY: [0], UP: [0], key: [0], value: [0]}, init_weights=False)
    count = model.base_model.selected_numel()
    report = mftc_peft.reselect_blocks(model, token_batches(1), fraction=0.5)
    assert report.swaps == {QUERY: [(0, 1)], key: [(0, 1)]}  # 0.5 x 4 blocks: the two largest ratios
    assert model.base_model.block_selection() == {QUERY: [1], UP: [0], key: [1], value: [0]}
    assert model.base_model.selected_numel() == count
    assert mftc_peft.reselect_blocks(model, token_batches(1), fraction=0.2).n_swapped == 0  # 0.2 x 4 < 1


def test_reselection_ranks_swaps_from_gradient_free_blocks_by_the_newcomer():
    """A dropped block without gradient makes every ratio infinite: the stronger newcomer goes first, not model
    order."""
    offers = {"first": [(0, 1, (2.0, 0.0))], "second": [(0, 3, (9.0, 0.0))], "third": [(0, 2, (50.0, 1.0))]}
    assert mftc_peft.dynamic._best_swaps(offers, 1) == {"second": [(0, 3, (9.0, 0.0))]}
    assert set(mftc_peft.dynamic._best_swaps(offers, 2)) == {"first", "second"}  # both infinite ratios before 50


@pytest.mark.parametrize("completed, every, total, due", [
    (8, 8, 40, True), (16, 8, 40, True), (9, 8, 40, False), (40, 8, 40, False), (8, 0, 40, False),
])
def test_reselection_is_due_every_k_steps_but_not_after_the_last(completed, every, total, due):
    assert mftc_peft.reselection_due(completed, every, total) is due
