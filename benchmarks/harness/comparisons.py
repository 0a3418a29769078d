"""MFTC against each peer in the generated tables: the mean paired difference over the seeds both ran, with its 95%
t-interval, and words that never call a difference a win unless that interval excludes 0 (benchmark protocol).

A seed fixes the data order and the head initialisation for every method, so MFTC and a peer at seed s saw the same
batches and their difference removes that shared noise. Accuracy differences are in points (x 100), perplexity
differences in perplexity. Every function takes summaries from `summary.summarise` (each with `metric`, `by_seed`).
"""

from __future__ import annotations

from .paired import PairedDifference, paired_difference, standing

UNITS = {"accuracy": (100.0, "pt"), "perplexity": (1.0, "ppl")}
HIGHER_IS_BETTER = {"accuracy": True, "perplexity": False}
WORDS = {"ahead": "MFTC ahead (interval excludes 0)", "behind": "MFTC behind (interval excludes 0)",
         "within noise": "within noise", "too few seeds": "one seed: no interval"}


def versus(a: dict, b: dict) -> PairedDifference:
    """a - b over the seeds both ran."""
    return paired_difference(a["by_seed"], b["by_seed"])


def difference_text(d: PairedDifference, metric: str, *, subject: str = "MFTC") -> str:
    """"+1.20 [-0.85, +3.25] pt: within noise" (the subject minus the other, in the metric's unit)."""
    if d.n == 0:
        return "no seed in common"
    scale, unit = UNITS[metric]
    words = WORDS[standing(d, higher_is_better=HIGHER_IS_BETTER[metric])].replace("MFTC", subject)
    if d.n < 2:
        return f"{scale * d.mean:+.2f} {unit}: {words}"
    return f"{scale * d.mean:+.2f} [{scale * d.low:+.2f}, {scale * d.high:+.2f}] {unit} ({d.n} seeds): {words}"


def mftc_cell(summary: dict, method: str) -> str:
    """The table cell of `method`'s row: MFTC minus this method ("-" on MFTC's own row or without MFTC)."""
    if method == "mftc" or "mftc" not in summary:
        return "-"
    return difference_text(versus(summary["mftc"], summary[method]), summary[method]["metric"])


def target_line(summary: dict, peer: str, *, strict: bool, where: str = "") -> str:
    """One target line, MET / missed / n/a, with the paired difference written out.

    `strict` ("MFTC above the peer") is a claim of a win: MET only when the interval excludes 0 in MFTC's favour.
    Otherwise ("at or above") the mean difference decides and the interval says how sure that is.
    """
    relation = "above" if strict else "at or above"
    if "mftc" not in summary or peer not in summary:
        return f"- n/a: MFTC {relation} {peer}{where} (a method did not run)"
    metric = summary[peer]["metric"]
    d = versus(summary["mftc"], summary[peer])
    if d.n == 0:
        return f"- n/a: MFTC {relation} {peer}{where} (no seed in common)"
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    verdict = standing(d, higher_is_better=HIGHER_IS_BETTER[metric])
    if strict:
        status = "MET" if verdict == "ahead" else ("n/a" if verdict == "too few seeds" else "missed")
    else:
        status = "MET" if sign * d.mean >= 0 else "missed"
    return f"- {status}: MFTC {relation} {peer}{where}: MFTC - {peer} = {difference_text(d, metric)}"


def scaling_rows(by_budget: dict[float, dict], method: str) -> list[str] | None:
    """Cells of `method`'s row in the budget-scaling table: its mean at each budget, then the paired gain from each
    budget to the next (same seeds, same data order), so that a plateau shows as a gain within noise."""
    present = [b for b in sorted(by_budget) if method in by_budget[b]]
    if len(present) < 2:
        return None
    metric = by_budget[present[0]][method]["metric"]
    means = [f"{by_budget[b][method]['mean']:.4f} ± {by_budget[b][method]['std']:.4f}" if b in present else ""
             for b in sorted(by_budget)]
    gains = [difference_text(versus(by_budget[hi][method], by_budget[lo][method]), metric, subject="larger budget")
             for lo, hi in zip(present, present[1:])]
    return means + gains
