"""benchmarks/warmup_sketch_cost.py: one measurement per variant on a tiny model, and the table of medians."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import warmup_sketch_cost as bench  # noqa: E402
from test_warmup import token_batches, warm_model  # noqa: E402


def test_measure_once_runs_with_and_without_the_sketches():
    _, model = warm_model()
    records = [bench.measure_once(model, token_batches(6), keep) for keep in (False, True)]
    assert [r["keep_projections"] for r in records] == [False, True]
    assert all(r["seconds"] > 0 and r["signature_seconds"] > 0 and r["blocks"] > 0 for r in records)


def test_table_compares_the_medians_of_each_variant():
    records = [{"task": "cls", "micro_batches": 16, "keep_projections": keep, "seconds": seconds}
               for keep, seconds in ((False, 1.0), (True, 2.0), (False, 9.0), (True, 4.0), (False, 1.5), (True, 1.0))]
    assert "| cls | 16 | 1.50 | 2.00 | 25.0% |" in bench.table(records)
