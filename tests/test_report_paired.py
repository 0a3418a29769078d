"""Issue 16 item 2: MFTC's paired differences in the benchmark's generated tables, on hand-computed examples.

Two hand-made comparisons over 3 seeds (t(0.975, 2) = 4.302653):
- "noisy": MFTC - peer = 0.04, 0.01, 0.03 -> mean 0.026667, sd 0.015275, half-width 0.037946 -> [-0.011279, +0.064613]:
  the interval covers 0, "within noise".
- "clear": MFTC - peer = 0.04, 0.03, 0.05 -> mean 0.04, sd 0.01, half-width 0.024841 -> [+0.015159, +0.064841]: MFTC
  ahead.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import report  # noqa: E402
from harness import comparisons, paired  # noqa: E402

MFTC = {0: 0.80, 1: 0.79, 2: 0.83}
NOISY_PEER = {0: 0.76, 1: 0.78, 2: 0.80}  # differences 0.04, 0.01, 0.03
CLEAR_PEER = {0: 0.76, 1: 0.76, 2: 0.78}  # differences 0.04, 0.03, 0.05
NOISY_TEXT = "+2.67 [-1.13, +6.46] pt (3 seeds): within noise"
CLEAR_TEXT = "+4.00 [+1.52, +6.48] pt (3 seeds): MFTC ahead (interval excludes 0)"


def test_hand_computed_intervals():
    noisy = paired.paired_difference(MFTC, NOISY_PEER)
    assert noisy.mean == pytest.approx(0.026667, abs=1e-6)
    assert (noisy.low, noisy.high) == (pytest.approx(-0.011279, abs=1e-6), pytest.approx(0.064613, abs=1e-6))
    clear = paired.paired_difference(MFTC, CLEAR_PEER)
    assert (clear.low, clear.high) == (pytest.approx(0.015159, abs=1e-6), pytest.approx(0.064841, abs=1e-6))


def test_standing_follows_the_interval_and_the_metric_direction():
    noisy, clear = paired.paired_difference(MFTC, NOISY_PEER), paired.paired_difference(MFTC, CLEAR_PEER)
    assert paired.standing(noisy) == "within noise"
    assert paired.standing(noisy, higher_is_better=False) == "within noise"
    assert paired.standing(clear) == "ahead"
    assert paired.standing(paired.paired_difference(CLEAR_PEER, MFTC)) == "behind"
    # Perplexity: MFTC's being 0.04 higher is MFTC behind.
    assert paired.standing(clear, higher_is_better=False) == "behind"
    assert paired.standing(paired.paired_difference({0: 0.8}, {0: 0.7})) == "too few seeds"


def test_difference_text_in_points_and_in_perplexity():
    assert comparisons.difference_text(paired.paired_difference(MFTC, NOISY_PEER), "accuracy") == NOISY_TEXT
    assert comparisons.difference_text(paired.paired_difference(MFTC, CLEAR_PEER), "accuracy") == CLEAR_TEXT
    lower = comparisons.difference_text(paired.paired_difference(CLEAR_PEER, MFTC), "perplexity")
    assert lower == "-0.04 [-0.06, -0.02] ppl (3 seeds): MFTC ahead (interval excludes 0)"
    assert comparisons.difference_text(paired.paired_difference({0: 0.8}, {0: 0.7}), "accuracy") == (
        "+10.00 pt: one seed: no interval")


def _records(method: str, by_seed: dict, *, metric: str = "accuracy") -> list[dict]:
    return [{"task": "cls", "method": method, "phase": "test", "status": "ok", "metric": metric, "seed": seed,
             "lr": 1e-3, f"test_{metric}": value, "trainable_params_no_head": 100, "trainable_params": 102,
             "steps": 4, "wall_seconds": 1.0, "warmup_seconds": 0.0, "train_seconds": 1.0, "peak_rss_bytes": 2**20,
             "cuda_peak_allocated_bytes": None, "adapter_bytes": 400, "date": "2026-01-01T00:00:00"}
            for seed, value in by_seed.items()]


@pytest.fixture
def summary():
    records = (_records("mftc", MFTC) + _records("lora", NOISY_PEER) + _records("random_blocks", CLEAR_PEER)
               + _records("shira", {0: 0.75}))
    return report.summarise(records, "cls")


def test_method_table_puts_the_paired_difference_next_to_mean_and_std(summary):
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.method_table(summary)[2:]}
    assert " | 0.7800 ± 0.0200 | " + NOISY_TEXT + " | " in rows["lora"]
    assert " | 0.7667 ± 0.0115 | " + CLEAR_TEXT + " | " in rows["random_blocks"]
    assert "+5.00 pt: one seed: no interval" in rows["shira"]
    assert " | - | " in rows["mftc"]
    for line in rows.values():
        assert "win" not in line.lower() and "better" not in line.lower()


def test_targets_call_only_an_interval_that_excludes_zero_above(summary):
    noisy_strict = comparisons.target_line(summary, "lora", strict=True)
    assert noisy_strict == f"- missed: MFTC above lora: MFTC - lora = {NOISY_TEXT}"
    assert comparisons.target_line(summary, "random_blocks", strict=True).startswith("- MET: MFTC above random_blocks")
    # "At or above" goes by the mean difference; the interval still says "within noise".
    assert comparisons.target_line(summary, "lora", strict=False) == (
        f"- MET: MFTC at or above lora: MFTC - lora = {NOISY_TEXT}")
    assert comparisons.target_line(summary, "shira", strict=True).startswith("- n/a: MFTC above shira")
    assert comparisons.target_line(summary, "pissa", strict=False).startswith("- n/a:")


def test_perplexity_targets_follow_lower_is_better():
    records = [r | {"task": "lm"} for r in _records("mftc", {0: 30.0, 1: 31.0, 2: 29.0}, metric="perplexity")
               + _records("lora", {0: 32.0, 1: 33.5, 2: 31.0}, metric="perplexity")]
    summary = report.summarise(records, "lm")
    line = comparisons.target_line(summary, "lora", strict=True)
    assert line.startswith("- MET: MFTC above lora") and "MFTC ahead (interval excludes 0)" in line


def test_the_learning_rate_table_names_a_pick_made_elsewhere():
    def run(method, phase, lr, **extra):
        return {"task": "lm", "method": method, "phase": phase, "lr": lr, "status": "ok", "metric": "perplexity",
                "val_perplexity": 40.0, "date": "2026-12-02", "seed": 0, **extra}

    source = "selection_study.md (validation, 5 seeds)"
    records = [run("lora", "sweep", 1e-3), run("lora", "sweep", 3e-3), run("lora", "test", 3e-3),
               run("lora", "test", 5e-3, lr_source=source, date="2026-12-03"),
               run("mftc", "test", 5e-3, lr_source=source), run("shira", "sweep", 1e-2), run("shira", "test", 1e-2)]
    table = "\n".join(report.sweep_table(records, "lm"))
    assert f"| lora | 0.001 -> 40.0000, 0.003 -> 40.0000 | 0.005 (from {source}) |" in table
    assert f"| mftc | no sweep in this profile | 0.005 (from {source}) |" in table
    assert "| shira | 0.01 -> 40.0000 | 0.01 |" in table
