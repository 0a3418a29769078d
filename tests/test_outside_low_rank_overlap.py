"""benchmarks/outside_low_rank_overlap.py on a tiny model: both measurements, their comparison and the table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import outside_low_rank_overlap as bench  # noqa: E402


def test_both_measurements_are_compared_on_one_task():
    record = bench.measure_task("cls", 0, tiny=True)
    assert record["chosen"] > 0 and 0.0 <= record["overlap"] <= 1.0
    # what the part leaves is a part of each block's energy, and not all of it overall
    assert 0.0 < record["outside_share_all"] < 1.0
    assert 0.0 <= record["outside_share_chosen_by_total"] <= 1.0 + 1e-6
    assert record["seconds_total"] > 0 and record["seconds_outside"] > 0
    assert f"| cls | 0 | {record['chosen']} | {record['overlap']:.2f} |" in bench.table([record])
