"""Paired statistics for the method lab and the benchmark's tables: each variant at its own best learning rate, paired
differences over seeds.

A seed fixes the data order and the head initialisation for every variant, so variant A and variant B at seed s saw
the same batches; the difference A(s) - B(s) removes that shared noise. The 95% interval is Student's t over the
seeds' differences. "Best" learning rate: the best mean over seeds on the validation split; a best rate at the edge of
its bracket is flagged, because the variant's true best may lie outside it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class VariantPick:
    variant: str
    lr: float
    on_edge: bool  # the best rate is the smallest or largest of the bracket
    by_seed: dict[int, float]  # the metric at the picked rate, per seed (every seed that ran it)
    lr_means: dict[float, float]  # mean at every rate of the bracket, over the seeds that ran all of them
    pick_seeds: int = 0  # how many seeds ran the whole bracket (the pick's evidence)

    @property
    def mean(self) -> float:
        return statistics.mean(self.by_seed.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.by_seed.values()) if len(self.by_seed) > 1 else math.nan


@dataclass(frozen=True)
class PairedDifference:
    n: int
    mean: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        if self.n < 2 or math.isnan(self.low):
            return "too few seeds"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "within noise"


def standing(d: PairedDifference, *, higher_is_better: bool = True) -> str:
    """Where A stands against B in the metric's own direction, for tables that must never call noise a win: "ahead"
    or "behind" only when the 95% interval of A - B excludes 0, "within noise" when it covers 0, "too few seeds"
    below two pairs."""
    verdict = d.verdict  # "better" / "worse" in higher-is-better terms
    if verdict not in ("better", "worse"):
        return verdict
    return "ahead" if (verdict == "better") == higher_is_better else "behind"


def pick_variants(records: list[dict], metric: str, *, higher_is_better: bool = True) -> dict[str, VariantPick]:
    """Each variant's best learning rate by mean `metric` over the seeds that ran at every rate of its bracket; the
    pick then carries every seed that ran at that rate, so that a bracket swept on a few seeds can be compared at its
    picked rate on all of them (the table says how many seeds the pick rests on)."""
    values: dict[str, dict[float, dict[int, float]]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get(metric) is not None:
            values.setdefault(r["variant"], {}).setdefault(float(r["lr"]), {})[int(r["seed"])] = float(r[metric])
    picks = {}
    for variant, by_lr in values.items():
        common = set.intersection(*(set(seeds) for seeds in by_lr.values()))
        if not common:
            continue
        means = {lr: statistics.mean(by_lr[lr][s] for s in common) for lr in sorted(by_lr)}
        best = (max if higher_is_better else min)(means, key=means.get)
        rates = sorted(means)
        on_edge = len(rates) < 3 or best in (rates[0], rates[-1])
        picks[variant] = VariantPick(variant, best, on_edge, dict(sorted(by_lr[best].items())), means, len(common))
    return picks


def paired_difference(a: dict[int, float], b: dict[int, float], *, confidence: float = 0.95) -> PairedDifference:
    """Mean of a(s) - b(s) over the seeds both have, with a Student-t interval."""
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    n = len(diffs)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan)
    mean = statistics.mean(diffs)
    if n < 2:
        return PairedDifference(n, mean, math.nan, math.nan)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half)


def paired_table(picks: dict[str, VariantPick], references: tuple[str, ...], *, scale: float = 100.0,
                 unit: str = "pt", higher_is_better: bool = True, digits: int = 2) -> str:
    """Markdown: every variant at its picked rate, and its paired difference against each reference present.
    The verdict follows the metric's direction (`standing`): a lower loss is "ahead"."""
    refs = [r for r in references if r in picks]
    head = ["variant", "picked lr", "bracket", "seeds", "mean", "std"] + [f"vs {r} ({unit}, 95% CI)" for r in refs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sign = 1.0 if higher_is_better else -1.0
    for pick in sorted(picks.values(), key=lambda p: -sign * p.mean):
        bracket = ", ".join(f"{lr:g}" for lr in pick.lr_means) + (" (best on edge)" if pick.on_edge else "")
        if pick.pick_seeds < len(pick.by_seed):
            bracket += f" (picked on {pick.pick_seeds} seed{'s' if pick.pick_seeds > 1 else ''})"
        row = [pick.variant, f"{pick.lr:g}", bracket, str(len(pick.by_seed)), f"{pick.mean:.4f}", f"{pick.std:.4f}"]
        for ref in refs:
            if ref == pick.variant:
                row.append("-")
                continue
            d = paired_difference(pick.by_seed, picks[ref].by_seed)
            verdict = standing(d, higher_is_better=higher_is_better)
            row.append(f"{scale * d.mean:+.{digits}f} [{scale * d.low:+.{digits}f}, {scale * d.high:+.{digits}f}] "
                       f"{verdict}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def lr_table(picks: dict[str, VariantPick]) -> str:
    """Markdown: every variant's mean at every rate of its bracket, over the seeds that ran all of them (the curve
    the pick was made from)."""
    rates = sorted({lr for p in picks.values() for lr in p.lr_means})
    lines = ["| variant | " + " | ".join(f"{lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]
    for pick in sorted(picks.values(), key=lambda p: p.variant):
        cells = [f"**{pick.lr_means[lr]:.4f}**" if lr == pick.lr else
                 (f"{pick.lr_means[lr]:.4f}" if lr in pick.lr_means else "") for lr in rates]
        lines.append(f"| {pick.variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
