"""The learning-rate sweep's decisions: which rate a method's sweep picks, and when its bracket must grow.

Protocol: each method gets its own rate, picked on the validation split; "if the best sits on an edge, extend the
bracket". Pure functions of the sweep's records, so that run.py only schedules runs.
"""

from __future__ import annotations

import math


def score(record: dict) -> tuple[float, float]:
    """Higher is better: validation accuracy (ties: lower validation loss), or minus validation perplexity; failures
    and skips rank last."""
    value = record.get(f"val_{record.get('metric')}") if record.get("status") == "ok" else None
    if value is None or not math.isfinite(value):
        return -math.inf, -math.inf
    return (value if record["metric"] == "accuracy" else -value), -record.get("val_loss", math.inf)


def best(records: list[dict]) -> dict:
    """The sweep record with the best score (the first of equals, in the order given)."""
    return max(records, key=score)


def edge_extension(records: list[dict]) -> float | None:
    """The next rate past the bracket's edge when the best rate sits on it, else None.

    The step is the ratio between the edge and its neighbour (2e-3, 5e-3, 1e-2 with 1e-2 best -> 2e-2), so the
    bracket keeps its spacing. None too when the bracket has one rate (no spacing to copy) or nothing scored (a
    method that fails or is skipped at every rate is not chased further).
    """
    top = best(records)
    rates = sorted({float(r["lr"]) for r in records})
    if len(rates) < 2 or score(top) == (-math.inf, -math.inf):
        return None
    lr = float(top["lr"])
    if lr == rates[-1]:
        return float(f"{lr * lr / rates[-2]:.3g}")  # 3 significant digits: 1e-3 x 1e-3 / 3e-3 -> 0.000333
    if lr == rates[0]:
        return float(f"{lr * lr / rates[1]:.3g}")
    return None


def refinement(records: list[dict], max_ratio: float) -> float | None:
    """A rate between the best one and its better neighbour when the two are more than `max_ratio` apart (their
    geometric mean, 2 significant digits), else None.

    A coarse grid can hide a method's best rate and not another's: on the LM, LoRA's 1e-3 / 3e-3 / 1e-2 picked 3e-3
    (38.27 validation perplexity), while 5e-3 gave 36.94 (NOTES 87). One midpoint where the spacing is wide gives
    every method the same resolution near its pick. None too when nothing scored or the best has no scored neighbour.
    """
    top = best(records)
    if score(top) == (-math.inf, -math.inf):
        return None
    by_rate = {float(r["lr"]): r for r in records}  # one record per rate in a sweep
    rates = sorted(by_rate)
    i = rates.index(float(top["lr"]))
    neighbours = [by_rate[rates[j]] for j in (i - 1, i + 1) if 0 <= j < len(rates)]
    scored = [r for r in neighbours if score(r) != (-math.inf, -math.inf)]
    if not scored:
        return None
    other = float(best(scored)["lr"])
    lr = float(top["lr"])
    if max(lr, other) / min(lr, other) <= max_ratio:
        return None
    middle = float(f"{math.sqrt(lr * other):.2g}")
    return None if middle in by_rate else middle
