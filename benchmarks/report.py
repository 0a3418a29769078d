"""Tables and plots of the side-by-side benchmark, generated from the JSON lines (never typed by hand).

    python benchmarks/report.py [--out benchmarks/results]

For every `<profile>.jsonl` in the folder (PROFILE_ORDER): `<profile>.md` and plots `<profile>_<task>_vs_params.png` /
`<profile>_<task>_vs_wall.png`; and `README.md`, which collects the profiles' tables (full first). Per task and
budget: mean +- std over seeds per method, next to MFTC's paired difference against it (95% t-interval over the
seeds both ran; "within noise" when the interval covers 0, never a win), parameters, wall time incl. warm-up,
memory, adapter size, the learning-rate sweep and picks; then the issues' targets, and with several budgets how each
method gains from one budget to the next. The plots draw one line per method through its budgets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import comparisons  # noqa: E402
from harness.profiles import ALL_METHODS, rank_for  # noqa: E402
from harness.report_plots import plot  # noqa: E402
from harness.summary import budgets, load, picked_test_runs, summarise  # noqa: E402, F401 (load: tests, callers)

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE_ORDER = ("full", "gpu", "cpu", "cpu_budget", "quick", "smoke", "gpu_smoke", "cpu_budget_smoke")
TASK_TITLES = {
    "cls": "Sequence classification: all-MiniLM-L6-v2 on Rotten Tomatoes (test accuracy, higher is better)",
    "lm": "Causal LM: SmolLM2-135M on Hamlet, acts I-IV -> act V (held-out perplexity, lower is better). The weights "
          "come from a 4-bit (Q4_1) GGUF dequantised to float32, so they carry 4-bit rounding noise.",
}
PROFILE_NOTES = {
    "quick": "**Quick profile (CPU, one seed, small subsets, one epoch, fixed learning rates: NOT swept).** It proves "
             "the harness end to end; its numbers are not a comparison of the methods.",
    "cpu": "**CPU profile (2 CPU cores)**: a test set of 1,000 snippets and a validation split of 1,000 (the "
           "protocol holds out 250; 200 could not tell learning rates apart) for a learning-rate sweep per method "
           "(two points, four for AdaLoRA; first seed), but 1,000 training snippets x 2 epochs instead of 1,750 x 3. "
           "MFTC, LoRA, AdaLoRA, PiSSA, random blocks and top-energy blocks run 3 seeds; the other peers and "
           "ablations run the first seed only (their std is then 0 and means little).",
    "smoke": "**Smoke profile: tiny random models and random data.** A test of the harness only.",
    "gpu_smoke": "**Smoke twin of the gpu profile: tiny random models and random data on the CPU.** A test of the "
                 "harness only.",
    "cpu_budget_smoke": "**Smoke twin of the budget sweep: tiny random models and random data.** A test of the harness "
                        "only; the tiny model cannot hold 4x, so its top budget is 2x.",
    "cpu_budget": "**Budget sweep (issue 16), cpu profile's sizes on 2 CPU cores**: MFTC, LoRA, random blocks and "
                  "SHiRA at 1/4x, 1x and 4x LoRA r=8's trainable count (LoRA r=2/8/32 with alpha = 2r; SHiRA at the "
                  "same rank, which is LoRA's count; MFTC's budget is LoRA's count; random blocks matched to MFTC's), "
                  "learning rate swept per method and budget on the validation split (first seed, edges extended, "
                  "then one rate between the best and its better neighbour where they are more than 3x apart), "
                  "3 seeds on the test split.",
    "gpu": "**GPU profile**: the protocol's sizes (2,000 training snippets x 3 epochs; 120 language-modelling steps), "
           "every method, learning rate swept per method on the validation split (3 points, first seed, edges "
           "extended), 3 seeds on the test split, several runs side by side on one GPU (wall times are measured "
           "under that sharing).",
    "full": "**Full profile**: learning rate per method swept on the validation split (first seed), then every seed on "
            "the test split.",
}


def _mb(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def _params(s: dict) -> str:
    low, high = s["params_range"]
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


PAIRED_NOTE = ("MFTC - method: MFTC's test metric minus the method's, averaged over the seeds both ran (a seed fixes "
               "the data order and the head for every method), with a 95% Student-t interval; \"within noise\" when "
               "the interval covers 0. Accuracy in points, perplexity in perplexity.")


def method_table(summary: dict) -> list[str]:
    lines = ["| method | lr | seeds | test metric (mean ± std) | MFTC - method (95% CI) | trainable (no head) | "
             "trainable (with head) | wall s (incl. warm-up) | warm-up s | train s | peak RSS MiB | CUDA peak MiB | "
             "adapter bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        swept = "" if s["lr_swept"] else " (not swept)"
        lines.append(
            f"| {method} | {s['lr']:g}{swept} | {s['n']} | {s['mean']:.4f} ± {s['std']:.4f} | "
            f"{comparisons.mftc_cell(summary, method)} | {_params(s)} | {s['params_all']:,} | {s['wall']:.1f} | "
            f"{s['warmup']:.1f} | {s['train']:.1f} | {_mb(s['rss'])} | {_mb(s['cuda'])} | {s['bytes']:,.0f} |"
        )
    return lines


def sweep_table(records: list[dict], task: str, budget: float = 1.0) -> list[str]:
    sweep = [r for r in records if r["task"] == task and r["phase"] == "sweep"
             and float(r.get("budget_multiple", 1.0)) == budget]
    if not sweep:
        return ["No learning-rate sweep in this profile: each method used the fixed learning rate shown above "
                "(recorded with `lr_swept: false`)."]
    picked = {m: runs[0] for m in ALL_METHODS if (runs := picked_test_runs(records, task, m, budget))}
    picks = {m: _pick(run) for m, run in picked.items()}
    lines = ["| method | learning rate -> validation metric (* added past the bracket's edge, + between two rates) "
             "| pick |",
             "|---|---|---|"]
    for method in ALL_METHODS:
        runs = sorted((r for r in sweep if r["method"] == method), key=lambda r: r["lr"])
        if runs:
            cells = ", ".join(
                f"{r['lr']:g}{'*' if r.get('lr_extended') else '+' if r.get('lr_refined') else ''} -> "
                + (f"{r['val_' + r['metric']]:.4f}" if r.get("status") == "ok" else str(r.get("status")))
                for r in runs)
            lines.append(f"| {method} | {cells} | {picks.get(method, 'n/a')} |")
        elif method in picked and picked[method].get("lr_source"):
            lines.append(f"| {method} | no sweep in this profile | {picks[method]} |")
    return lines


def _pick(run: dict) -> str:
    """The test runs' rate, with where it came from when that was not this profile's own sweep (`lr_source`)."""
    return f"{run['lr']:g}" + (f" (from {run['lr_source']})" if run.get("lr_source") else "")


def _verdict(ok: bool | None, text: str) -> str:
    return f"- {'n/a' if ok is None else 'MET' if ok else 'missed'}: {text}"


def _value(summary: dict, method: str, key: str, spec: str) -> str:
    return "n/a" if method not in summary else format(summary[method][key], spec)


def _compare(summary: dict, method: str, key: str, test) -> bool | None:
    return None if method not in summary else bool(test(summary[method][key]))


def targets(summary: dict, task: str) -> list[str]:
    """Issue 6's targets, each MET / missed / n/a (a method needed for it did not run). Quality targets go by the
    paired difference: "at or above" by its mean, "above" only when its interval excludes 0."""
    m = summary.get("mftc")
    if m is None:
        return ["- n/a: MFTC did not run"]
    if task == "cls":
        lines = [comparisons.target_line(summary, k, strict=False) for k in ("lora", "adalora", "pissa")]
        lines += [comparisons.target_line(summary, k, strict=True) for k in ("random_blocks", "top_energy")]
    else:
        lines = [comparisons.target_line(summary, "lora", strict=False)]
    lora = summary.get("lora")
    if lora is not None:
        lines.append(_verdict(m["wall"] <= 1.15 * lora["wall"],
                              f"MFTC wall time incl. warm-up {m['wall']:.1f} s <= 1.15 x LoRA's {lora['wall']:.1f} s "
                              f"(ratio {m['wall'] / lora['wall']:.2f})"))
        key = "cuda" if m["cuda"] is not None and lora["cuda"] is not None else "rss"
        lines.append(_verdict(None if m[key] is None or lora[key] is None else m[key] <= 1.05 * lora[key],
                              f"MFTC peak memory ({key}) {_mb(m[key])} MiB <= LoRA's {_mb(lora[key])} MiB + 5%"))
        lines.append(f"- parameters: MFTC trains {_params(m)} elements outside the head, LoRA {_params(lora)}")
    else:
        lines.append("- n/a: the wall-time and memory targets need a LoRA run")
    lines.append(_verdict(_compare(summary, "shira", "bytes", lambda v: m["bytes"] <= v / 2.5),
                          f"MFTC adapter {m['bytes']:,.0f} bytes <= SHiRA's / 2.5 "
                          f"(SHiRA: {_value(summary, 'shira', 'bytes', ',.0f')} bytes)"))
    return lines


def budget_targets(by_budget: dict[float, dict]) -> list[str]:
    """Issue 16: MFTC at or above LoRA at every budget, above random blocks at 1x and above."""
    lines = []
    for budget, summary in sorted(by_budget.items()):
        where = f" at {budget:g}x"
        lines.append(comparisons.target_line(summary, "lora", strict=False, where=where))
        if budget >= 1.0:
            lines.append(comparisons.target_line(summary, "random_blocks", strict=True, where=where))
    return lines


def scaling_table(by_budget: dict[float, dict]) -> list[str]:
    """Each method's mean at every budget and its paired gain from one budget to the next (a plateau: a gain within
    noise)."""
    order = sorted(by_budget)
    steps = [f"{hi:g}x - {lo:g}x (95% CI)" for lo, hi in zip(order, order[1:])]
    lines = ["| method | " + " | ".join(f"{b:g}x" for b in order) + " | " + " | ".join(steps) + " |",
             "|---|" + "---|" * (len(order) + len(steps))]
    for method in ALL_METHODS:
        cells = comparisons.scaling_rows(by_budget, method)
        if cells is not None:
            cells += [""] * (len(order) + len(steps) - len(cells))  # a method absent at some budget has fewer gains
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def other_runs(records: list[dict]) -> list[str]:
    bad = [r for r in records if r.get("status") != "ok"]
    return [f"- {r['phase']} {r['task']} {r['method']} seed {r['seed']}"
            f"{'' if r.get('budget_multiple', 1.0) == 1.0 else ' at %gx' % r['budget_multiple']}: {r.get('status')}: "
            f"{str(r.get('reason', '')).splitlines()[0][:300] if r.get('reason') else ''}" for r in bad]


def session_lines(profile: str, out: Path) -> list[str]:
    """Each invocation's wall time (`<profile>_sessions.jsonl`, written by run.py); the gpu profile's 8-minute target
    is checked on invocations that ran everything (no --resume)."""
    path = out / f"{profile}_sessions.jsonl"
    if not path.exists():
        return []
    lines = ["Invocations of `benchmarks/run.py` (wall time of the whole invocation, model loading included):", ""]
    for line in filter(str.strip, path.read_text().splitlines()):
        session = json.loads(line)
        minutes = session["elapsed_seconds"] / 60
        how = ("long-lived worker processes" if session.get("reuse_processes") else
               "in one process" if session.get("in_process") else "one subprocess per run")
        text = (f"{session['started']}: {minutes:.1f} min, {session['workers']} at a time ({how}), device "
                f"{session['device']}, {session['executed']} runs executed, {session['reused']} reused (--resume)")
        if profile == "gpu" and not session.get("resume"):
            lines.append(_verdict(minutes <= 8.0, f"whole gpu profile in <= 8 minutes: {text}"))
        else:
            lines.append(f"- {text}")
    return lines + [""]


def task_markdown(profile: str, task: str, records: list[dict], out: Path) -> list[str]:
    by_budget = {b: summary for b in budgets(records, task) if (summary := summarise(records, task, b))}
    if not by_budget:
        return []
    several = len(by_budget) > 1
    first = next(iter(next(iter(by_budget.values())).values()))
    r = next(r for r in records if r["task"] == task and r.get("status") == "ok" and r["phase"] == "test")
    matched_to = "MFTC" if any(v["budget_source"] == "mftc" for s in by_budget.values() for v in s.values()) else "LoRA"
    lines = [f"{r['n_train']} training examples/chunks, {r['n_eval']} test examples/chunks, batch {r['batch_size']} "
             f"x {r['max_length']} tokens, {first['steps']} steps (AdamW, linear decay), same data order per seed for "
             f"every method. Ablations are matched to {matched_to}'s count.", "", PAIRED_NOTE, ""]
    for budget, summary in sorted(by_budget.items()):
        if several:
            count = next(x["lora_budget"] for x in records if x["task"] == task
                         and float(x.get("budget_multiple", 1.0)) == budget)
            lines += [f"#### {budget:g}x LoRA r=8's count: LoRA r={rank_for(budget)}, {count:,} trainable "
                      f"parameters outside the head", ""]
        lines += [*method_table(summary), "", "Learning rates:", "", *sweep_table(records, task, budget), ""]
    if 1.0 in by_budget:
        lines += ["Targets (issue 6)" + ("" if profile in ("full", "cpu", "gpu", "cpu_budget") else
                                         ", checked mechanically; outside the full profiles they are not evidence "
                                         "either way") + (", at 1x:" if several else ":"), "",
                  *targets(by_budget[1.0], task), ""]
    if several:
        lines += ["Budget targets (issue 16):", "", *budget_targets(by_budget), "",
                  "How each method gains with its budget (paired over seeds: a gain within noise is a plateau):", "",
                  *scaling_table(by_budget), ""]
    names = [p.name for p in plot(by_budget, task, out / f"{profile}_{task}")]
    return lines + [" ".join(f"![{n}]({n})" for n in names), ""]


def profile_markdown(profile: str, records: list[dict], out: Path) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    first = (ok or records)[0]
    lines = [f"## Profile `{profile}`", "", PROFILE_NOTES.get(profile, ""), "",
             f"Generated by `python benchmarks/report.py` from `{profile}.jsonl` ({len(records)} runs; device "
             f"{first.get('device')} = {first.get('device_name')}; versions {json.dumps(first.get('versions'))}).", "",
             *session_lines(profile, out)]
    for task in ("cls", "lm"):
        section = task_markdown(profile, task, [r for r in records if r["task"] == task], out)
        if section:
            lines += [f"### {TASK_TITLES[task]}", "", *section]
    extra = other_runs(records)
    if extra:
        lines += ["Runs without a result:", "", *extra, ""]
    return "\n".join(lines)


def write_reports(out: Path = RESULTS) -> list[Path]:
    written, sections = [], []
    for profile in PROFILE_ORDER:
        path = out / f"{profile}.jsonl"
        if not path.exists():
            continue
        text = profile_markdown(profile, load(path), out)
        md = out / f"{profile}.md"
        md.write_text(f"# Side-by-side benchmark, {profile} profile\n\n{text}")
        written.append(md)
        sections.append(text)
    if sections:
        readme = out / "README.md"
        readme.write_text(
            "# Side-by-side benchmark results (issues 6 and 16)\n\nGenerated by `python benchmarks/report.py` from the "
            "JSON lines of `benchmarks/run.py`; do not edit by hand. Protocol: `benchmark-protocol.md`.\n\n"
            + "\n".join(sections))
        written.append(readme)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder holding <profile>.jsonl")
    args = parser.parse_args(argv)
    for path in write_reports(args.out):
        print(path)


if __name__ == "__main__":
    main()
