"""Reading the benchmark's JSON lines: one key per run, the runs a table uses, and their means per method and budget.

A run's budget is its `budget_multiple` (x LoRA r=8's trainable count); lines written before budget sweeps existed
have none and count as 1x.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .profiles import ALL_METHODS

KEY_FIELDS = ("phase", "task", "method", "seed", "lr")


def budget_of(record: dict) -> float:
    return float(record.get("budget_multiple", 1.0))


def record_key(record: dict) -> tuple:
    """What makes a run unique in a profile's file: a later line with the same key replaces an earlier one."""
    return tuple(record.get(k) for k in KEY_FIELDS) + (budget_of(record),)


def load(path: Path) -> list[dict]:
    """Records of a JSONL file, the last one kept per key."""
    latest = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[record_key(r)] = r
    return list(latest.values())


def budgets(records: list[dict], task: str) -> list[float]:
    return sorted({budget_of(r) for r in records if r["task"] == task})


def picked_test_runs(records: list[dict], task: str, method: str, budget: float = 1.0) -> list[dict]:
    """The method's 'ok' test runs at its current pick: the learning rate of its latest test run (a re-run with a
    wider sweep may pick another rate; the runs at the old pick stay in the file but leave the table)."""
    runs = [r for r in records if r["task"] == task and r["method"] == method and r["phase"] == "test"
            and r.get("status") == "ok" and budget_of(r) == budget]
    if not runs:
        return []
    lr = max(runs, key=lambda r: r.get("date") or "")["lr"]
    return [r for r in runs if r["lr"] == lr]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _average(runs: list[dict], key: str) -> float | None:
    values = [r.get(key) for r in runs]
    return None if any(v is None for v in values) else statistics.fmean(values)


def summarise(records: list[dict], task: str, budget: float = 1.0) -> dict[str, dict]:
    """Per method at `budget`: mean/std of the test metric, the metric per seed (for paired differences) and the means
    of the cost columns over its 'ok' test runs."""
    out = {}
    for method in ALL_METHODS:
        runs = picked_test_runs(records, task, method, budget)
        if not runs:
            continue
        metric = runs[0]["metric"]
        mean, std = _mean_std([r[f"test_{metric}"] for r in runs])
        # A worker process that ran several runs reports its own high-water mark, not the run's: no per-run RSS then.
        shared_rss = any(r.get("peak_rss_scope") for r in runs)
        out[method] = {
            "metric": metric, "mean": mean, "std": std, "n": len(runs), "lr": runs[0]["lr"],
            "by_seed": {int(r["seed"]): float(r[f"test_{metric}"]) for r in runs},
            "lr_swept": runs[0].get("lr_swept"), "params": _average(runs, "trainable_params_no_head"),
            "params_all": runs[0]["trainable_params"],
            "params_range": (min(r["trainable_params_no_head"] for r in runs),
                             max(r["trainable_params_no_head"] for r in runs)),
            "wall": _average(runs, "wall_seconds"), "warmup": _average(runs, "warmup_seconds"),
            "train": _average(runs, "train_seconds"), "rss": None if shared_rss else _average(runs, "peak_rss_bytes"),
            "cuda": _average(runs, "cuda_peak_allocated_bytes"), "bytes": _average(runs, "adapter_bytes"),
            "budget_source": runs[0].get("budget_source"), "steps": runs[0]["steps"],
        }
    return out
