"""Coupled FFN neuron groups (`MFTCConfig.ffn_coupling="neurons"`): a layer's gate/up_proj row groups and down_proj
column groups fill their quotas from one ranking of the neuron groups; the config checks; a warm-up on a tiny Llama."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from test_warmup import token_batches, warm_model

import mftc_peft
from mftc_peft import BlockGrid, MFTCConfig
from mftc_peft.allocation import ffn_units, proportional_quotas, proportional_selection
from mftc_peft.context import stage_seeds
from mftc_peft.search import BlockTable

HIDDEN, NEURONS, WIDTH = 16, 32, 8  # 4 neuron groups of 8; every FFN block holds 8 x 16 = 128 elements
BLOCK = WIDTH * HIDDEN


def _grids(layer, *, down_width=WIDTH, down_axis="in"):
    prefix = f"model.layers.{layer}"
    return {
        f"{prefix}.self_attn.q_proj": BlockGrid(axis="out", in_features=HIDDEN, out_features=HIDDEN, width=WIDTH),
        f"{prefix}.mlp.gate_proj": BlockGrid(axis="out", in_features=HIDDEN, out_features=NEURONS, width=WIDTH),
        f"{prefix}.mlp.up_proj": BlockGrid(axis="out", in_features=HIDDEN, out_features=NEURONS, width=WIDTH),
        f"{prefix}.mlp.down_proj": BlockGrid(axis=down_axis, in_features=NEURONS, out_features=HIDDEN,
                                             width=down_width),
    }


# Per layer: each weight's own strongest group differs from the group with the largest summed energy
# (layer 0: sums [5, 8, 9, 2], group 2 then 1; layer 1: sums [4, 0, 3, 6], group 3 then 0).
ENERGY = {
    0: {"q_proj": [1.0, 2.0], "gate_proj": [5.0, 0.0, 3.0, 1.0], "up_proj": [0.0, 4.0, 3.0, 1.0],
        "down_proj": [0.0, 4.0, 3.0, 0.0]},
    1: {"q_proj": [2.0, 1.0], "gate_proj": [0.0, 0.0, 1.0, 6.0], "up_proj": [2.0, 0.0, 1.0, 0.0],
        "down_proj": [2.0, 0.0, 1.0, 0.0]},
}


def _table(grids):
    energy = {}
    for name, grid in grids.items():
        values = ENERGY[int(name.split(".")[2])][name.rsplit(".", 1)[1]]
        energy[name] = values if len(values) == grid.n_blocks else np.ones(grid.n_blocks)
    return BlockTable.from_grids(grids, energy)


def _short(selection):
    return {f"{name.split('.')[2]}.{name.rsplit('.', 1)[1]}": ids for name, ids in selection.items()}


def test_coupled_fill_takes_the_groups_with_the_largest_summed_energy_in_each_layer():
    grids = {**_grids(0), **_grids(1)}
    table = _table(grids)
    budget = 8 * BLOCK  # 28 blocks: every FFN weight a quota of 1 (exact 1.14), each q_proj the remainder (0.57)
    assert all(k == 1 for _, k in proportional_quotas(table, budget))
    independent = {"0.q_proj": [1], "0.gate_proj": [0], "0.up_proj": [1], "0.down_proj": [1],
                   "1.q_proj": [0], "1.gate_proj": [3], "1.up_proj": [0], "1.down_proj": [0]}
    assert _short(proportional_selection(table, budget)) == independent
    assert _short(proportional_selection(table, budget, ffn_coupling="none", grids=grids)) == independent
    coupled = _short(proportional_selection(table, budget, ffn_coupling="neurons", grids=grids))
    assert coupled == {"0.q_proj": [1], "0.gate_proj": [2], "0.up_proj": [2], "0.down_proj": [2],
                       "1.q_proj": [0], "1.gate_proj": [3], "1.up_proj": [3], "1.down_proj": [3]}


def test_a_larger_quota_takes_the_next_groups_of_the_same_ranking():
    grids = _grids(0)
    table = _table(grids)
    budget = 6 * BLOCK  # 14 blocks: quotas gate 2, up 2, down 1, q 1 (largest remainders, ties to the first)
    quotas = {table.module_names[rows[0]].rsplit(".", 1)[1]: k for rows, k in proportional_quotas(table, budget)}
    assert quotas == {"q_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 1}
    assert _short(proportional_selection(table, budget)) == {
        "0.q_proj": [1], "0.gate_proj": [0, 2], "0.up_proj": [1, 2], "0.down_proj": [1]}
    assert _short(proportional_selection(table, budget, ffn_coupling="neurons", grids=grids)) == {
        "0.q_proj": [1], "0.gate_proj": [1, 2], "0.up_proj": [1, 2], "0.down_proj": [2]}


def test_a_layer_that_cannot_couple_fills_independently_with_a_warning():
    grids = {**_grids(0), **_grids(1, down_width=2 * WIDTH)}  # layer 1: down_proj's blocks span two neuron groups
    table = _table(grids)
    with pytest.warns(RuntimeWarning, match=r"filled independently.*: layer 1: \(neurons, block width\) .*down_proj: \(32, 16\)"):
        selection = _short(proportional_selection(table, 8 * BLOCK, ffn_coupling="neurons", grids=grids))
    assert selection["0.gate_proj"] == selection["0.up_proj"] == selection["0.down_proj"] == [2]
    assert selection["1.gate_proj"] == [3] and selection["1.up_proj"] == [0]  # each its own strongest


@pytest.mark.parametrize("grids, found", [
    ({**_grids(0, down_axis="out"), **_grids(1, down_axis="out")}, r"got layer 0: block axes .*down_proj: out; layer 1: block axes"),
    ({n: g for n, g in _grids(0).items() if "down_proj" not in n}, r"got layer 0: 2 producer\(s\) \(.*gate_proj, .*up_proj\) and 0 consumer\(s\) \(none\)"),
    ({n: g for n, g in _grids(0).items() if "q_proj" in n}, r"got no FFN weight among the 1 target weights"),
])
def test_coupling_that_finds_nothing_to_couple_raises(grids, found):
    table = _table(grids)
    with pytest.raises(ValueError, match=r"`ffn_coupling='neurons'` needs a layer whose FFN weights can be coupled "
                                         rf"\(a transformer layer's FFN weights are coupled when .*\); none can, {found}"):
        proportional_selection(table, 4 * BLOCK, ffn_coupling="neurons", grids=grids)


def test_ffn_units_find_the_ffn_weights_by_role():
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.output.dense",
             "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"]
    shapes = [("out", 16, 16), ("in", 16, 16), ("out", 16, 32), ("in", 32, 16)]
    grids = {n: BlockGrid(axis=a, in_features=i, out_features=o, width=WIDTH) for n, (a, i, o) in zip(names, shapes)}
    table = BlockTable.from_grids(grids, {n: np.ones(g.n_blocks) for n, g in grids.items()})
    assert ffn_units(table, grids) == ([names[2:]], {})


def test_ffn_coupling_is_checked_by_name():
    with pytest.raises(ValueError, match=r"`ffn_coupling` must be one of \('none', 'neurons'\), got 'neuron'"):
        MFTCConfig(ffn_coupling="neuron")
    with pytest.raises(ValueError, match=r"`ffn_coupling` only applies to allocation='proportional'.*"
                                         r"got ffn_coupling='neurons' with allocation='search'"):
        MFTCConfig(allocation="search", ffn_coupling="neurons")
    with pytest.raises(ValueError, match=r"`ffn_coupling='neurons'` needs block_axis='auto'.*got block_axis='in'"):
        MFTCConfig(ffn_coupling="neurons", block_axis="in")
    assert MFTCConfig().ffn_coupling == "none"


def test_ffn_coupling_is_saved_with_the_adapter_and_old_files_load_uncoupled(tmp_path):
    MFTCConfig(ffn_coupling="neurons").save_pretrained(tmp_path)
    assert MFTCConfig.from_pretrained(tmp_path).ffn_coupling == "neurons"
    path = tmp_path / "adapter_config.json"
    fields = json.loads(path.read_text())
    del fields["ffn_coupling"]  # what an adapter saved before the field existed holds
    path.write_text(json.dumps(fields))
    assert MFTCConfig.from_pretrained(tmp_path).ffn_coupling == "none"


def test_warmup_on_a_tiny_llama_trains_the_same_neuron_groups_in_gate_up_and_down():
    # 16-wide neuron groups, the size of a head here: every quota block fits the element budget, none is dropped
    _, model = warm_model("llama_gqa", budget=0.3, block_size=16, ffn_coupling="neurons")
    batches = token_batches(6, causal=True)
    table = mftc_peft.measure_blocks(model, batches).table
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # every layer couples
        report = mftc_peft.warmup(model, batches, progress=False)
    grids = model.base_model.block_grids()
    rounding, seed = model.peft_config["default"].quota_rounding, stage_seeds(0)["allocation"]
    assert report.selection == proportional_selection(table, report.budget_elements, rounding, seed,
                                                      ffn_coupling="neurons", grids=grids)
    names = np.array(table.module_names)
    for layer in (0, 1):
        ffn = [f"model.layers.{layer}.mlp.{w}" for w in ("gate_proj", "up_proj", "down_proj")]
        score = sum(table.energy[names == name][np.argsort(table.block_ids[names == name])] for name in ffn)
        ranking = np.argsort(-score, kind="stable").tolist()
        chosen = [report.selection.get(name, []) for name in ffn]
        assert all(chosen), chosen
        # each weight's groups are the top of the layer's one ranking: identical where the quotas are equal
        assert all(sorted(ranking[: len(ids)]) == ids for ids in chosen), (chosen, ranking)
    independent = proportional_selection(table, report.budget_elements, rounding, seed)
    assert independent != report.selection  # the gradients here make the two fills differ
