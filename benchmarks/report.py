"""Tables and plots of the side-by-side benchmark, generated from the JSON lines (never typed by hand).

    python benchmarks/report.py [--out benchmarks/results]

For every `<profile>.jsonl` (full, quick, smoke) in the folder: `<profile>.md` (mean +- std over seeds per task x
method, parameters, wall time incl. warm-up, memory, adapter size, the learning-rate sweep and picks, the issue's
targets) and plots `<profile>_<task>_vs_params.png` / `<profile>_<task>_vs_wall.png`; and `README.md`, which
collects the profiles' tables (full first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.profiles import ALL_METHODS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE_ORDER = ("full", "cpu", "quick", "smoke")
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
    "full": "**Full profile**: learning rate per method swept on the validation split (first seed), then every seed on "
            "the test split.",
}


def load(path: Path) -> list[dict]:
    """Records of a JSONL file, the last one kept per (phase, task, method, seed, lr)."""
    latest = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[tuple(r.get(k) for k in ("phase", "task", "method", "seed", "lr"))] = r
    return list(latest.values())


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def picked_test_runs(records: list[dict], task: str, method: str) -> list[dict]:
    """The method's 'ok' test runs at its current pick: the learning rate of its latest test run (a re-run with a
    wider sweep may pick another rate; the runs at the old pick stay in the file but leave the table)."""
    runs = [r for r in records if r["task"] == task and r["method"] == method and r["phase"] == "test"
            and r.get("status") == "ok"]
    if not runs:
        return []
    lr = max(runs, key=lambda r: r.get("date") or "")["lr"]
    return [r for r in runs if r["lr"] == lr]


def summarise(records: list[dict], task: str) -> dict[str, dict]:
    """Per method: mean/std of the test metric and the means of the cost columns over its 'ok' test runs."""
    out = {}
    for method in ALL_METHODS:
        runs = picked_test_runs(records, task, method)
        if not runs:
            continue
        metric = runs[0]["metric"]
        mean, std = _mean_std([r[f"test_{metric}"] for r in runs])
        def avg(key):
            values = [r.get(key) for r in runs]
            return None if any(v is None for v in values) else statistics.fmean(values)

        out[method] = {
            "metric": metric, "mean": mean, "std": std, "n": len(runs), "lr": runs[0]["lr"],
            "lr_swept": runs[0].get("lr_swept"), "params": runs[0]["trainable_params_no_head"],
            "params_all": runs[0]["trainable_params"],
            "params_range": (min(r["trainable_params_no_head"] for r in runs),
                             max(r["trainable_params_no_head"] for r in runs)),
            "wall": avg("wall_seconds"), "warmup": avg("warmup_seconds"), "train": avg("train_seconds"),
            "rss": avg("peak_rss_bytes"), "cuda": avg("cuda_peak_allocated_bytes"), "bytes": avg("adapter_bytes"),
            "budget_source": runs[0].get("budget_source"), "steps": runs[0]["steps"],
        }
    return out


def _mb(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def _params(s: dict) -> str:
    low, high = s["params_range"]
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def method_table(summary: dict) -> list[str]:
    lines = ["| method | lr | seeds | test metric (mean ± std) | trainable (no head) | trainable (with head) | "
             "wall s (incl. warm-up) | warm-up s | train s | peak RSS MiB | CUDA peak MiB | adapter bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        swept = "" if s["lr_swept"] else " (not swept)"
        lines.append(
            f"| {method} | {s['lr']:g}{swept} | {s['n']} | {s['mean']:.4f} ± {s['std']:.4f} | {_params(s)} | "
            f"{s['params_all']:,} | {s['wall']:.1f} | {s['warmup']:.1f} | {s['train']:.1f} | {_mb(s['rss'])} | "
            f"{_mb(s['cuda'])} | {s['bytes']:,.0f} |"
        )
    return lines


def sweep_table(records: list[dict], task: str) -> list[str]:
    sweep = [r for r in records if r["task"] == task and r["phase"] == "sweep"]
    if not sweep:
        return ["No learning-rate sweep in this profile: each method used the fixed learning rate shown above "
                "(recorded with `lr_swept: false`)."]
    picks = {m: runs[0]["lr"] for m in ALL_METHODS if (runs := picked_test_runs(records, task, m))}
    lines = ["| method | learning rate -> validation metric | pick |", "|---|---|---|"]
    for method in ALL_METHODS:
        runs = sorted((r for r in sweep if r["method"] == method), key=lambda r: r["lr"])
        if runs:
            cells = ", ".join(
                f"{r['lr']:g} -> {r['val_' + r['metric']]:.4f}" if r.get("status") == "ok"
                else f"{r['lr']:g} -> {r.get('status')}" for r in runs)
            lines.append(f"| {method} | {cells} | {picks.get(method, 'n/a')} |")
    return lines


def _verdict(ok: bool | None, text: str) -> str:
    return f"- {'n/a' if ok is None else 'MET' if ok else 'missed'}: {text}"


def _value(summary: dict, method: str, key: str, spec: str) -> str:
    return "n/a" if method not in summary else format(summary[method][key], spec)


def _compare(summary: dict, method: str, key: str, test) -> bool | None:
    return None if method not in summary else bool(test(summary[method][key]))


def targets(summary: dict, task: str) -> list[str]:
    """The issue's targets, each MET / missed / n/a (a method needed for it did not run)."""
    m = summary.get("mftc")
    if m is None:
        return ["- n/a: MFTC did not run"]
    lines = []
    if task == "cls":
        peers = {k: summary[k]["mean"] for k in ("lora", "adalora", "pissa") if k in summary}
        listed = ", ".join(f"{k} {v:.4f}" for k, v in peers.items()) or "none ran"
        lines.append(_verdict(m["mean"] >= max(peers.values()) if peers else None,
                              f"MFTC accuracy {m['mean']:.4f} >= best of LoRA/AdaLoRA/PiSSA ({listed})"))
        for k in ("random_blocks", "top_energy"):
            lines.append(_verdict(_compare(summary, k, "mean", lambda v: m["mean"] > v),
                                  f"MFTC accuracy > {k} ({_value(summary, k, 'mean', '.4f')})"))
    else:
        lines.append(_verdict(_compare(summary, "lora", "mean", lambda v: m["mean"] <= v),
                              f"MFTC perplexity {m['mean']:.3f} <= LoRA's ({_value(summary, 'lora', 'mean', '.3f')})"))
    lora = summary.get("lora")
    if lora is not None:
        lines.append(_verdict(m["wall"] <= 1.15 * lora["wall"],
                              f"MFTC wall time incl. warm-up {m['wall']:.1f} s <= 1.15 x LoRA's {lora['wall']:.1f} s "
                              f"(ratio {m['wall'] / lora['wall']:.2f})"))
        key = "cuda" if m["cuda"] is not None and lora["cuda"] is not None else "rss"
        lines.append(_verdict(m[key] <= 1.05 * lora[key],
                              f"MFTC peak memory ({key}) {_mb(m[key])} MiB <= LoRA's {_mb(lora[key])} MiB + 5%"))
        lines.append(f"- parameters: MFTC trains {_params(m)} elements outside the head, LoRA {_params(lora)}")
    else:
        lines.append("- n/a: the wall-time and memory targets need a LoRA run")
    lines.append(_verdict(_compare(summary, "shira", "bytes", lambda v: m["bytes"] <= v / 2.5),
                          f"MFTC adapter {m['bytes']:,.0f} bytes <= SHiRA's / 2.5 "
                          f"(SHiRA: {_value(summary, 'shira', 'bytes', ',.0f')} bytes)"))
    return lines


def other_runs(records: list[dict]) -> list[str]:
    bad = [r for r in records if r.get("status") != "ok"]
    return [f"- {r['phase']} {r['task']} {r['method']} seed {r['seed']}: {r.get('status')}: "
            f"{str(r.get('reason', '')).splitlines()[0][:300] if r.get('reason') else ''}" for r in bad]


def plot(summary: dict, task: str, stem: Path) -> list[Path]:
    """Quality vs trainable parameters and vs wall time incl. warm-up (mean +- std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    metric = next(iter(summary.values()))["metric"]
    for key, label, suffix, log in (("params", "trainable parameters (no head)", "vs_params", True),
                                    ("wall", "wall seconds incl. warm-up", "vs_wall", False)):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for method, s in summary.items():
            x = max(s[key], 1) if log else s[key]
            ax.errorbar([x], [s["mean"]], yerr=[s["std"]], fmt="o", capsize=3, label=method)
            ax.annotate(method, (x, s["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{stem.name.split('_')[0]} profile, {task}: {metric} vs {label}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def profile_markdown(profile: str, records: list[dict], out: Path) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    first = (ok or records)[0]
    lines = [f"## Profile `{profile}`", "", PROFILE_NOTES.get(profile, ""), "",
             f"Generated by `python benchmarks/report.py` from `{profile}.jsonl` ({len(records)} runs; device "
             f"{first.get('device')} = {first.get('device_name')}; versions {json.dumps(first.get('versions'))}).", ""]
    for task in ("cls", "lm"):
        task_records = [r for r in records if r["task"] == task]
        summary = summarise(task_records, task)
        if not task_records:
            continue
        lines += [f"### {TASK_TITLES[task]}", ""]
        if summary:
            s = next(iter(summary.values()))
            r = next(r for r in task_records if r.get("status") == "ok" and r["phase"] == "test")
            lines += [f"{r['n_train']} training examples/chunks, {r['n_eval']} test examples/chunks, batch "
                      f"{r['batch_size']} x {r['max_length']} tokens, {s['steps']} steps (AdamW, linear decay), same "
                      f"data order per seed for every method. Ablations are matched to "
                      f"{'MFTC' if any(v['budget_source'] == 'mftc' for v in summary.values()) else 'LoRA'}'s count.",
                      "", *method_table(summary), "", "Learning rates:", "", *sweep_table(records, task), "",
                      "Targets (issue 6)" + (
                          "" if profile in ("full", "cpu") else
                          ", checked mechanically; outside the full profile they are not evidence either way") + ":",
                      "", *targets(summary, task), ""]
            names = [p.name for p in plot(summary, task, out / f"{profile}_{task}")]
            lines += [" ".join(f"![{n}]({n})" for n in names), ""]
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
            "# Side-by-side benchmark results (issue 6)\n\nGenerated by `python benchmarks/report.py` from the JSON "
            "lines of `benchmarks/run.py`; do not edit by hand. Protocol: `benchmark-protocol.md`.\n\n"
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
