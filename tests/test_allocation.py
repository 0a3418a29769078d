"""Proportional allocation (`MFTCConfig.allocation="proportional"`): quotas by block count, the highest-energy blocks
inside each weight, the warm-up that uses them, and the fields it refuses."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_warmup import token_batches, warm_model

import mftc_peft
from mftc_peft import MFTCConfig
from mftc_peft.allocation import proportional_quotas, proportional_selection
from mftc_peft.context import stage_seeds
from mftc_peft.search import BlockTable


def _table(names, energy, sizes=None):
    ids = [sum(1 for m in names[:i] if m == n) for i, n in enumerate(names)]
    sizes = [10] * len(names) if sizes is None else sizes
    return BlockTable(tuple(names), np.array(ids), np.array(sizes), np.array(energy, dtype=float))


def test_quotas_follow_block_counts_and_sum_to_the_budget_in_blocks():
    table = _table(["a"] * 6 + ["b"] * 3 + ["c"] * 1, np.ones(10))
    quotas = {table.module_names[rows[0]]: k for rows, k in proportional_quotas(table, budget=50)}
    # 5 blocks over counts 6 : 3 : 1 -> exact 3, 1.5, 0.5; the remainder goes to the first of the tied remainders
    assert quotas == {"a": 3, "b": 2, "c": 0}
    quotas = {table.module_names[rows[0]]: k for rows, k in proportional_quotas(table, budget=10_000)}
    assert quotas == {"a": 6, "b": 3, "c": 1}  # never more than a weight has


def test_each_weight_takes_its_highest_energy_blocks_not_the_globally_highest():
    # Weight "a" holds the four strongest blocks overall; a global top-4 would take all of them.
    energy = [9.0, 8.0, 7.0, 6.0, 0.1, 0.3, 0.2, 0.4]
    table = _table(["a"] * 4 + ["b"] * 4, energy)
    assert proportional_selection(table, budget=40) == {"a": [0, 1], "b": [1, 3]}


def test_blocks_larger_than_the_median_are_dropped_rather_than_exceed_the_budget():
    table = _table(["a", "a", "b", "b"], [1.0, 0.5, 4.0, 3.0], sizes=[10, 10, 30, 30])
    selection = proportional_selection(table, budget=30)  # 1 block by the median (20); "a" and "b" tie, "a" first
    assert selection == {"a": [0]}
    table = _table(["a", "a", "b", "b"], [1.0, 0.5, 4.0, 3.0], sizes=[10, 10, 10, 30])
    selection = proportional_selection(table, budget=25)  # 2 blocks: a0 and b0, the strongest first
    used = sum(10 if (n, b) != ("b", 1) else 30 for n, ids in selection.items() for b in ids)
    assert selection == {"a": [0], "b": [0]} and used <= 25


def test_warmup_spreads_the_budget_like_the_quotas_and_ranks_by_energy_inside():
    # 32-wide FFN groups, the size of a tiny BERT head: every quota block then fits the element budget (on a finer
    # grid a head costs several median blocks, and the budget drops the weakest quota heads; other tests cover that)
    _, model = warm_model(allocation="proportional", quota_rounding="largest_remainder", block_size=32)
    batches = token_batches(6)
    table = mftc_peft.measure_blocks(model, batches).table
    report = mftc_peft.warmup(model, batches, progress=False)
    assert report.selection == proportional_selection(table, report.budget_elements)
    counts = Counter({name: len(ids) for name, ids in report.selection.items()})
    names = np.array(table.module_names)
    quotas = {table.module_names[rows[0]]: k for rows, k in proportional_quotas(table, report.budget_elements)}
    assert counts == Counter({name: k for name, k in quotas.items() if k})
    for name, ids in report.selection.items():  # inside a weight, no unselected block has more energy
        rows = np.flatnonzero(names == name)
        chosen = np.isin(table.block_ids[rows], ids)
        assert table.energy[rows][chosen].min() >= table.energy[rows][~chosen].max(initial=0.0)
    assert report.solver == {} and report.candidates == []
    assert 0 < report.trainable_elements <= report.budget_elements
    # The module search on the same batches concentrates the budget differently.
    _, searched = warm_model(allocation="search")
    assert mftc_peft.warmup(searched, batches, progress=False).selection != report.selection


@pytest.mark.parametrize("field, value", [("probe", "finetune"), ("block_score", "consistency"),
                                          ("loss_threshold", 1.0), ("confidence", 1.0)])
def test_proportional_allocation_refuses_the_search_fields_it_would_ignore(field, value):
    with pytest.raises(ValueError, match=rf"allocation='proportional'.*{field}.*{value!r}"):
        MFTCConfig(allocation="proportional", **{field: value})


def test_an_unknown_allocation_is_refused_by_name():
    with pytest.raises(ValueError, match=r"`allocation` must be one of \('search', 'proportional'\), got 'spread'"):
        MFTCConfig(allocation="spread")


def test_a_config_saved_before_allocation_existed_loads_as_the_search_it_was_made_with(tmp_path):
    MFTCConfig(allocation="search", probe="finetune").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    fields = json.loads(path.read_text())
    del fields["allocation"]  # what an adapter saved by an earlier version holds
    path.write_text(json.dumps(fields))
    loaded = MFTCConfig.from_pretrained(tmp_path)
    assert loaded.allocation == "search" and loaded.probe == "finetune"
    MFTCConfig().save_pretrained(tmp_path / "new")
    assert MFTCConfig.from_pretrained(tmp_path / "new").allocation == MFTCConfig().allocation == "proportional"


def test_an_old_adapter_config_with_search_fields_loads_through_every_peft_route(tmp_path):
    """`PeftConfig.from_pretrained` and `AutoPeftModel` build the config without MFTCConfig's `check_kwargs`: a saved
    adapter (its selection made) must still load, whatever warm-up fields it records."""
    from peft import PeftConfig

    MFTCConfig(allocation="search", probe="finetune", block_selection={"q": [0]}).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    fields = json.loads(path.read_text())
    del fields["allocation"]
    path.write_text(json.dumps(fields))
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MFTCConfig) and loaded.probe == "finetune" and loaded.block_selection == {"q": [0]}


def test_the_warmup_refuses_search_fields_set_after_construction():
    _, model = warm_model()
    model.peft_config["default"].probe = "finetune"
    selection = dict(model.peft_config["default"].block_selection)
    with pytest.raises(ValueError, match=r"allocation='proportional' runs no module search.*'probe': 'finetune'"):
        mftc_peft.warmup(model, token_batches(6), progress=False)
    assert model.peft_config["default"].block_selection == selection


def test_proportional_warmup_sketches_no_gradients(monkeypatch):
    """The taylor probe's gradient sketches serve only the module search: the default allocation collects none (they
    cost a copy of every weight gradient per micro-batch), `allocation="search"` with the taylor probe does, and a
    study can ask for them."""
    from mftc_peft import signatures

    made = []
    original = signatures.SignatureCollector.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self.keep_history)

    monkeypatch.setattr(signatures.SignatureCollector, "__init__", spy)
    _, model = warm_model()
    assert model.peft_config["default"].allocation == "proportional"
    assert mftc_peft.measure_blocks(model, token_batches(6)).projections is None
    report = mftc_peft.warmup(model, token_batches(6), progress=False)
    assert report.selection and made == [False, False]
    forced = mftc_peft.measure_blocks(model, token_batches(6), keep_projections=True)
    assert forced.projections.shape == (6, len(forced.table))
    _, searching = warm_model(allocation="search")
    assert mftc_peft.measure_blocks(searching, token_batches(6)).projections is not None
    assert made == [False, False, True, True]


def test_systematic_rounding_gives_each_weight_its_fraction_and_sums_exactly():
    # 5 blocks over counts 6 : 3 : 1 -> exact 3, 1.5, 0.5: "b" and "c" each round up half the time, never together
    table = _table(["a"] * 6 + ["b"] * 3 + ["c"] * 1, np.ones(10))
    seen = Counter()
    for seed in range(400):
        quotas = {table.module_names[rows[0]]: k for rows, k in
                  proportional_quotas(table, budget=50, rounding="systematic", seed=seed)}
        assert sum(quotas.values()) == 5 and quotas["a"] == 3 and quotas["b"] in (1, 2) and quotas["c"] in (0, 1)
        seen[quotas["c"]] += 1
    assert 160 < seen[1] < 240  # largest remainders never give "c" a block (first test)


def test_systematic_rounding_spaces_the_rounded_up_weights_evenly_along_the_model():
    # 20 weights in model order, each a third of a block: largest remainders give the first 6 a block, systematic
    # sampling one in every three.
    names = [f"layer{i:02d}" for i in range(20) for _ in range(3)]
    table = _table(names, np.ones(len(names)))
    for rounding, seed in [("largest_remainder", 0)] + [("systematic", s) for s in range(5)]:
        got = [i for i, (_, k) in enumerate(proportional_quotas(table, 60, rounding, seed)) if k]
        assert len(got) == 6
        if rounding == "largest_remainder":
            assert got == [0, 1, 2, 3, 4, 5]
        else:
            assert np.all(np.diff(got) >= 3), got


def test_mixed_systematic_rounding_keeps_one_pick_per_layer_and_varies_the_role():
    # 6 layers x 6 roles, a sixth of a block each: picks one layer apart. In model order they alias with the
    # period and all land on one role; with each layer's roles shuffled they still take one per layer.
    roles = ["q", "k", "v", "o", "ffn_in", "ffn_out"]
    names = [f"layer.{i}.{role}" for i in range(6) for role in roles]
    table = _table(names, np.ones(len(names)))
    distinct = {}
    for rounding in ("systematic", "systematic_mixed"):
        distinct[rounding] = []
        for seed in range(20):
            got = [names[rows[0]] for rows, k in proportional_quotas(table, 60, rounding, seed) if k]
            assert sorted(int(n.split(".")[1]) for n in got) == list(range(6)), got
            distinct[rounding].append(len({n.split(".")[2] for n in got}))
    assert set(distinct["systematic"]) == {1}
    assert np.mean(distinct["systematic_mixed"]) > 3  # 6 draws from 6 roles: about 4 distinct


def test_spread_remainder_keeps_the_largest_shares_first_and_spreads_the_tied_ones_along_the_layers():
    # 12 layers, each an "ffn" weight of 4 blocks and an "attn" weight of 1: 9 blocks over 60 give each ffn weight 0.6
    # of a block and each attn weight 0.15. Largest remainders give the 9 ffn weights of layers 0-8 a block; the
    # spread keeps ffn first but takes 9 of the 12 layers evenly, so the last third gets its share.
    names = [f"layer.{i}.{role}" for i in range(12) for role in ["ffn"] * 4 + ["attn"]]
    table = _table(names, np.ones(len(names)))
    for rounding, seed in [("largest_remainder", 0)] + [("spread_remainder", s) for s in range(10)]:
        got = [names[rows[0]] for rows, k in proportional_quotas(table, 90, rounding, seed) if k]
        assert len(got) == 9 and all(n.endswith("ffn") for n in got), got
        layers = [int(n.split(".")[1]) for n in got]
        if rounding == "largest_remainder":
            assert layers == list(range(9))
        else:
            assert sum(layer >= 8 for layer in layers) >= 3 and max(np.diff(sorted(layers))) <= 2, layers
    # Shares above the cut are always taken: 6 blocks over 37 give 5 ffn weights 0.81 each, all taken before the 12
    # attn weights (0.16 each, tied at the cut), which share the one block left
    names = [f"layer.{i}.ffn" for i in range(5) for _ in range(5)] + [f"layer.{i}.attn" for i in range(12)]
    table = _table(names, np.ones(len(names)))
    for seed in range(5):
        quotas = {table.module_names[rows[0]]: k
                  for rows, k in proportional_quotas(table, 60, "spread_remainder", seed)}
        assert all(quotas[f"layer.{i}.ffn"] == 1 for i in range(5)) and sum(quotas.values()) == 6, quotas


def test_warmup_rounds_quotas_as_the_config_says_from_its_own_seed():
    batches = token_batches(6)
    selections = {}
    for rounding, seed in [("largest_remainder", 0), ("systematic", 0), ("systematic", 1), ("systematic_mixed", 1),
                           ("spread_remainder", 2)]:
        # 32-wide groups: on a finer grid two of these roundings happen to agree on this tiny model
        _, model = warm_model(allocation="proportional", quota_rounding=rounding, seed=seed, block_size=32)
        table = mftc_peft.measure_blocks(model, batches).table
        report = mftc_peft.warmup(model, batches, progress=False)
        stream = stage_seeds(seed)["allocation"]
        assert report.selection == proportional_selection(table, report.budget_elements, rounding, stream)
        selections[rounding, seed] = report.selection
    assert len({json.dumps(s, sort_keys=True) for s in selections.values()}) == 5


def test_quota_rounding_is_checked_and_refused_where_no_quotas_are_set():
    with pytest.raises(ValueError, match=r"quota_rounding.*'even'"):
        MFTCConfig(quota_rounding="even")
    with pytest.raises(ValueError, match=r"quota_rounding.*allocation='search'"):
        MFTCConfig(allocation="search", quota_rounding="systematic")


def test_the_default_rounding_is_resolved_at_construction_and_old_files_keep_theirs(tmp_path):
    assert MFTCConfig().quota_rounding == "spread_remainder"  # resolved, so a saved adapter records what it did
    assert MFTCConfig(allocation="search").quota_rounding is None
    MFTCConfig(allocation="proportional", budget=0.01).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    fields = json.loads(path.read_text())
    del fields["quota_rounding"]  # what an adapter saved before the field existed holds
    path.write_text(json.dumps(fields))
    assert MFTCConfig.from_pretrained(tmp_path).quota_rounding == "largest_remainder"
    # a search config saved while largest remainders were the default still loads
    assert MFTCConfig(allocation="search", quota_rounding="largest_remainder").allocation == "search"
