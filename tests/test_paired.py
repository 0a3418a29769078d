"""The method lab's paired statistics (benchmarks/harness/paired.py) on hand-made records with known answers."""

import math
import sys
from pathlib import Path

import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness import paired  # noqa: E402


def records(variant, by_lr):
    return [{"status": "ok", "variant": variant, "lr": lr, "seed": seed, "val_accuracy": value}
            for lr, values in by_lr.items() for seed, value in enumerate(values)]


def test_each_variant_gets_its_best_rate_and_edges_are_flagged():
    rows = records("a", {1e-3: [0.70, 0.72], 2e-3: [0.75, 0.77], 4e-3: [0.60, 0.62]})
    rows += records("b", {1e-3: [0.70, 0.70], 2e-3: [0.71, 0.71], 4e-3: [0.72, 0.74]})
    picks = paired.pick_variants(rows, "val_accuracy")
    assert picks["a"].lr == 2e-3 and not picks["a"].on_edge and picks["a"].by_seed == {0: 0.75, 1: 0.77}
    assert picks["b"].lr == 4e-3 and picks["b"].on_edge
    lower = paired.pick_variants(rows, "val_accuracy", higher_is_better=False)
    assert lower["a"].lr == 4e-3


def test_a_bracket_swept_on_fewer_seeds_picks_on_them_and_compares_on_every_seed_at_the_pick():
    rows = records("a", {1e-3: [0.70], 2e-3: [0.75, 0.77, 0.60], 4e-3: [0.71]})
    rows += records("b", {2e-3: [0.74, 0.70, 0.65]})
    pick = paired.pick_variants(rows, "val_accuracy")["a"]
    assert pick.lr == 2e-3 and not pick.on_edge and pick.pick_seeds == 1
    assert pick.lr_means == {1e-3: 0.70, 2e-3: 0.75, 4e-3: 0.71}  # seed 0 only: the seeds that ran every rate
    assert pick.by_seed == {0: 0.75, 1: 0.77, 2: 0.60}
    text = paired.paired_table(paired.pick_variants(rows, "val_accuracy"), ("b",))
    assert "(picked on 1 seed)" in text and "| a | 0.002 |" in text and "| 3 |" in text


def test_paired_difference_is_a_t_interval_over_seed_differences():
    a = {0: 0.80, 1: 0.78, 2: 0.81, 3: 0.79}
    b = {0: 0.76, 1: 0.77, 2: 0.78, 3: 0.75, 4: 0.99}  # seed 4 has no partner: left out
    d = paired.paired_difference(a, b)
    diffs = [0.04, 0.01, 0.03, 0.04]
    half = stats.t.ppf(0.975, 3) * stats.tstd(diffs) / math.sqrt(4)
    assert d.n == 4 and d.mean == pytest.approx(0.03)
    assert (d.low, d.high) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
    assert d.verdict == "better"
    assert paired.paired_difference(b, a).verdict == "worse"
    noisy = paired.paired_difference({0: 0.8, 1: 0.7}, {0: 0.75, 1: 0.75})
    assert noisy.low < 0 < noisy.high and noisy.verdict == "within noise"
    assert paired.paired_difference({0: 0.8}, {0: 0.7}).verdict == "too few seeds"


def test_table_names_the_verdict_against_each_reference():
    rows = records("mine", {1e-3: [0.70, 0.71, 0.72], 2e-3: [0.80, 0.81, 0.83], 4e-3: [0.6, 0.6, 0.6]})
    rows += records("random_blocks", {1e-3: [0.70, 0.70, 0.70], 2e-3: [0.75, 0.76, 0.77], 4e-3: [0.7, 0.7, 0.7]})
    text = paired.paired_table(paired.pick_variants(rows, "val_accuracy"), ("random_blocks", "lora"))
    mine = next(line for line in text.splitlines() if line.startswith("| mine |"))
    assert "+5.33 [" in mine and mine.endswith("ahead |")
    assert "vs lora" not in text  # a reference that did not run gets no column


def test_a_lower_loss_is_called_ahead_in_a_loss_table():
    rows = [r | {"val_loss": 1.0 - r.pop("val_accuracy")} for r in
            records("mine", {1e-3: [0.70, 0.71, 0.72], 2e-3: [0.80, 0.81, 0.83], 4e-3: [0.6, 0.6, 0.6]})
            + records("random_blocks", {1e-3: [0.7, 0.7, 0.7], 2e-3: [0.75, 0.76, 0.77], 4e-3: [0.7, 0.7, 0.7]})]
    picks = paired.pick_variants(rows, "val_loss", higher_is_better=False)
    text = paired.paired_table(picks, ("random_blocks", "mine"), scale=1.0, unit="loss", higher_is_better=False,
                              digits=3)
    lines = [line for line in text.splitlines() if line.startswith("| mine |") or line.startswith("| random")]
    assert lines[0].startswith("| mine |")  # best (lowest loss) first
    assert "-0.053 [" in lines[0] and lines[0].endswith("ahead | - |")
    assert lines[1].endswith("behind |")
