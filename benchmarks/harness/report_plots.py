"""The benchmark's plots: test metric against trainable parameters (log scale) and against wall time incl. warm-up,
one line per method through its budgets, error bars = standard deviation over seeds."""

from __future__ import annotations

from pathlib import Path

AXES = (  # summary key, axis label, file suffix, log scale
    ("params", "trainable parameters (no head)", "vs_params", True),
    ("wall", "wall seconds incl. warm-up", "vs_wall", False),
)

MARKERS = "os^vD<>pP*Xhd"


def method_lines(by_budget: dict[float, dict], key: str) -> dict[str, tuple[list, list, list]]:
    """Per method: (x, mean, std) over the budgets it ran, in budget order; methods without the x value are left
    out of that plot."""
    lines: dict[str, tuple[list, list, list]] = {}
    for budget in sorted(by_budget):
        for method, s in by_budget[budget].items():
            if s.get(key) is None:
                continue
            xs, ys, errs = lines.setdefault(method, ([], [], []))
            xs.append(max(s[key], 1))  # a log axis cannot show 0 parameters
            ys.append(s["mean"])
            errs.append(s["std"])
    return lines


def plot(by_budget: dict[float, dict], task: str, stem: Path) -> list[Path]:
    """`<stem>_vs_params.png` and `<stem>_vs_wall.png`; a profile with one budget gets one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(s["metric"] for summary in by_budget.values() for s in summary.values())
    paths = []
    for key, label, suffix, log in AXES:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        lines = method_lines(by_budget, key)
        colours = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20").colors  # no colour twice (13 methods)
        for i, (method, (xs, ys, errs)) in enumerate(lines.items()):
            ax.errorbar(xs, ys, yerr=errs, fmt=MARKERS[i % len(MARKERS)] + "-", color=colours[i % len(colours)],
                        capsize=3, label=method)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric}")
        budgets = ", ".join(f"{b:g}x" for b in sorted(by_budget))
        ax.set_title(f"{stem.name.rsplit('_', 1)[0]} profile, {task}: {metric} vs {label} (budgets {budgets} "
                     f"LoRA r=8)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: points cluster at 1x
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
