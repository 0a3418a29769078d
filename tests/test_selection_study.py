"""The selection study's baselines (benchmarks/harness/selections.py) on hand-made measurements, and the study script
end to end on the smoke profile (tiny random model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from harness import selections  # noqa: E402
from mftc_peft.search import BlockTable  # noqa: E402


def measurement(energy, projections=None, library=None, size=10):
    n = len(energy)
    table = BlockTable(module_names=tuple(f"encoder.layer.0.w{i}" for i in range(n)),
                       block_ids=np.zeros(n, dtype=np.int64), sizes=np.full(n, size), energy=np.asarray(energy, float))
    projections = np.ones((4, n)) if projections is None else np.asarray(projections, float)
    return selections.Measurement(table=table, projections=projections, library=library or [list(range(n))],
                                  seconds=0.0, dsca_seconds=0.0)


def chosen(selection) -> list[int]:
    return sorted(int(name.rsplit("w", 1)[1]) for name in selection)


def test_round_robin_takes_one_block_per_module_in_turn():
    m = measurement([5, 4, 3, 9, 1, 0.5], library=[[0, 1, 2], [3, 4, 5]])
    # module [3, 4, 5] has the larger total energy: its top block first, then module [0, 1, 2]'s, then the second ones
    assert chosen(selections.round_robin_selection(m, budget=40)) == [0, 1, 3, 4]
    assert chosen(selections.round_robin_selection(m, budget=20)) == [0, 3]
    seeded = chosen(selections.round_robin_selection(m, budget=20, seed=0))
    assert len(seeded) == 2 and len({b // 3 for b in seeded}) == 2  # still one block from each module


def test_bottom_energy_is_the_reverse_of_top_energy():
    m = measurement([5, 4, 3, 9])
    assert chosen(selections.top_energy_selection(m, budget=20)) == [0, 3]
    assert chosen(selections.bottom_energy_selection(m, budget=20)) == [1, 2]


def test_adam_gain_prefers_consistent_gradients_over_noisy_ones():
    # Equal accumulated energy; block 0's gradient is consistent (its mean carries all of it), block 1's is noise.
    m = measurement([8.0, 8.0], projections=[[2.0, 0.1]] * 4)
    assert chosen(selections.adam_gain_selection(m, budget=10)) == [0]
    # The same signal with a smaller second moment (less noise) wins as well.
    m = measurement([8.0, 2.0], projections=[[1.0, 1.0]] * 4)
    assert chosen(selections.adam_gain_selection(m, budget=10)) == [1]


def test_energy_sampling_is_seeded_and_never_prefers_dead_blocks():
    m = measurement([0.0, 1.0, 2.0, 3.0, 0.0, 5.0])
    draws = [chosen(selections.energy_sampled_selection(m, budget=30, seed=seed)) for seed in range(20)]
    assert draws[0] == chosen(selections.energy_sampled_selection(m, budget=30, seed=0))
    assert all(set(d) <= {1, 2, 3, 5} and len(d) == 3 for d in draws)  # zero-energy blocks come last
    assert len({tuple(d) for d in draws}) > 1  # and it is a sample, not a ranking


def test_study_runs_variants_on_the_validation_split(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "selection_study.py"), "--profile", "smoke", "--variants",
               "node_share_1,random_blocks,cluster_round_robin,down_only,lora_lr_warmup,low_rank_4", "--seeds", "1",
               "--lr", "1e-3", "--workers", "2", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=300)
    records = [json.loads(line) for line in (tmp_path / "selection_study.jsonl").read_text().splitlines()]
    variants = ["cluster_round_robin", "down_only", "lora_lr_warmup", "low_rank_4", "node_share_1", "random_blocks"]
    assert sorted(r["variant"] for r in records) == variants
    for r in records:
        assert r["status"] == "ok", r.get("reason")
        assert r["eval_split"] == "val" and r["val_accuracy"] is not None
    configs = {r["variant"]: r["mftc_config"] for r in records}
    assert configs["node_share_1"] == {"block_size": 32, "low_rank_share": 0.0, "allocation": "search",
                                       "max_node_share": 1.0}
    assert "| node_share_1 |" in (tmp_path / "selection_study.md").read_text()
    # a variant's `target_modules` replaces the task's targets: every block on the FFN down-projection (role 'ffn_in')
    down_only = next(r for r in records if r["variant"] == "down_only")
    assert {key.split(":")[1] for key in down_only["blocks_by_layer_role"]} == {"ffn_in"}
    # a variant's run settings reach the training loop: the ramp's steps (a tenth of 3, at least 1) for that one only
    assert {r["variant"]: r["lr_warmup_steps"] for r in records} == {v: int(v == "lora_lr_warmup") for v in variants}
    # a low-rank part (rank 4 on every target) trains inside LoRA r=8's count, next to the blocks it leaves room for
    hybrid = next(r for r in records if r["variant"] == "low_rank_4")
    assert hybrid["low_rank_elements"] == hybrid["lora_budget"] // 2 and hybrid["selected_blocks"] > 0
    assert hybrid["low_rank_elements"] < hybrid["trainable_params_no_head"] <= hybrid["lora_budget"]
    assert hybrid["warmup_steps"] == 4  # the record says how many micro-batches the warm-up measured (smoke's)


def test_the_down_only_targets_are_the_ffn_down_projections_of_both_lab_models():
    import selection_study

    matches = lambda name: re.fullmatch(selection_study.FFN_DOWN_TARGETS, name) is not None  # noqa: E731  PEFT's rule
    assert matches("model.layers.3.mlp.down_proj") and matches("bert.encoder.layer.0.output.dense")
    assert not any(map(matches, ["model.layers.3.mlp.up_proj", "bert.encoder.layer.0.attention.output.dense",
                                 "bert.encoder.layer.0.intermediate.dense", "model.layers.3.self_attn.o_proj"]))


def test_proportional_top_spreads_like_random_and_picks_by_energy_inside():
    names = ["encoder.layer.0.ffn"] * 6 + ["encoder.layer.0.query"] * 2 + ["encoder.layer.1.ffn"] * 4
    table = BlockTable(module_names=tuple(names), block_ids=np.array([*range(6), *range(2), *range(4)]),
                       sizes=np.full(12, 10), energy=np.array([1, 9, 2, 8, 3, 0, 50, 40, 7, 1, 6, 2], float))
    m = selections.Measurement(table=table, projections=np.ones((2, 12)), library=[list(range(12))], seconds=0.0,
                               dsca_seconds=0.0)
    # 6 blocks over 12: quotas 3 / 1 / 2 by block count, each weight's highest-energy blocks (query gets only one
    # although both of its blocks beat every FFN block)
    assert selections.proportional_top_selection(m, budget=60) == {
        "encoder.layer.0.ffn": [1, 3, 4], "encoder.layer.0.query": [0], "encoder.layer.1.ffn": [0, 2]}


def test_middle_band_keeps_random_spread_and_draws_inside_the_energy_band():
    # one weight of 8 blocks whose energy rank is its id, one of 4 ranked in reverse; budget 6 blocks -> quotas 4 / 2
    names = ["encoder.layer.0.ffn"] * 8 + ["encoder.layer.0.query"] * 4
    table = BlockTable(module_names=tuple(names), block_ids=np.array([*range(8), *range(4)]),
                       sizes=np.full(12, 10), energy=np.array([*range(8), 4, 3, 2, 1], float))
    m = selections.Measurement(table=table, projections=np.ones((2, 12)), library=[list(range(12))], seconds=0.0,
                               dsca_seconds=0.0)
    for seed in range(20):
        chosen = selections.proportional_band_selection(m, budget=60, seed=seed)
        # ranks [0.25, 0.75) of 8 blocks are ids 2..5, all four drawn; of the query's 4 blocks ranks 1..2: ids 1, 2
        assert chosen == {"encoder.layer.0.ffn": [2, 3, 4, 5], "encoder.layer.0.query": [1, 2]}
    narrow = selections.proportional_band_selection(m, budget=20, seed=0, band=(0.0, 0.5))
    assert sum(len(v) for v in narrow.values()) == 2
    assert set(narrow.get("encoder.layer.0.ffn", [])) <= {0, 1, 2, 3}


def test_a_profile_bracket_overrides_the_task_bracket_and_lr_overrides_both():
    import selection_study

    long = selection_study.parse_args(["--profile", "lab_long", "--variants", "search,lora"])
    assert selection_study.bracket(long, "search") == (1e-3, 2e-3, 5e-3, 1e-2)
    assert selection_study.bracket(long, "lora") == (5e-4, 1e-3, 2e-3)
    assert selection_study.bracket(long, "proportional_top") == selection_study.DEFAULT_BRACKET["cls"]
    short = selection_study.parse_args(["--variants", "search"])
    assert selection_study.bracket(short, "search") == selection_study.BRACKETS["cls"]["search"]
    assert selection_study.bracket(selection_study.parse_args(["--lr", "1e-3"]), "search") == (1e-3,)


def test_language_model_verdicts_follow_perplexity_direction():
    import selection_study

    rows = [{"status": "ok", "profile": "cpu", "task": "lm", "variant": variant, "lr": lr, "seed": seed, "steps": 40,
             "val_perplexity": value + seed * 0.1 + (lr == 3e-3) * -1.0}
            for variant, value in (("default", 42.0), ("random_blocks", 41.0), ("lora", 39.0))
            for lr in (1e-3, 3e-3, 1e-2) for seed in range(3)]
    text = selection_study.tables(rows)
    line = {}
    for row in text.splitlines():  # the paired table's row of each variant (the rate table repeats the names)
        if row.startswith("| "):
            line.setdefault(row.split(" | ")[0].strip("| "), row)
    # default is 1 perplexity point above random blocks on every seed: behind, not ahead
    assert "+1.00 [+1.00, +1.00] behind" in line["default"] and "-2.00 [-2.00, -2.00] ahead" in line["lora"]
    assert text.index("| lora |") < text.index("| default |")  # best (lowest perplexity) first


def test_a_budget_multiple_sets_lora_rank_and_gets_its_own_table_section():
    import selection_study

    args = selection_study.parse_args(["--task", "lm", "--variants", "systematic,lora", "--budget-multiple", "0.25"])
    specs = selection_study.specs(args, lora_budget=610)
    assert {(s["budget_multiple"], s["lora_rank"], s["lora_budget"]) for s in specs} == {(0.25, 2, 610)}
    rows = [{"status": "ok", "profile": "cpu", "task": "lm", "variant": variant, "lr": lr, "seed": seed, "steps": 40,
             "val_perplexity": value + seed + lr, **extra}
            for variant, value in (("systematic", 40.0), ("lora", 39.0)) for lr in (1e-3, 3e-3, 1e-2)
            for seed in range(2) for extra in ({}, {"budget_multiple": 0.25})]
    text = selection_study.tables(rows)
    # records without a multiple are 1x; the two budgets are paired and picked apart, never mixed
    assert text.count("## cpu profile, lm") == 2 and "## cpu profile, lm at 0.25x LoRA r=8's count" in text
    try:
        selection_study.parse_args(["--budget-multiple", "0.3"])
    except SystemExit:
        pass
    else:
        raise AssertionError("a multiple that is not a whole LoRA rank must be refused")



def test_lab_variants_keep_the_warmup_their_records_measured_unless_they_name_one():
    import selection_study

    def warmups(argv):
        specs = selection_study.specs(selection_study.parse_args(argv), lora_budget=610)
        return {s["variant"]: s["mftc_config"].get("warmup_steps") for s in specs}

    lm = warmups(["--task", "lm", "--variants", "hybrid,hybrid_warmup_4,lora,random_hybrid"])
    assert lm == {"hybrid": 8, "hybrid_warmup_4": 4, "lora": None, "random_hybrid": 8}
    long = warmups(["--profile", "lab_long", "--variants", "low_rank_4,hybrid_warmup_4"])
    assert long == {"low_rank_4": 16, "hybrid_warmup_4": 4}
    assert warmups(["--variants", "block_8,random_blocks"]) == {"block_8": 16, "random_blocks": 16}
    # the tiny smoke profile is not pinned: its own settings decide
    assert warmups(["--profile", "smoke", "--variants", "hybrid"]) == {"hybrid": None}
