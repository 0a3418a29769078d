"""Plots of a `WarmupReport` (matplotlib, an optional extra: `pip install mftc-peft[plot]`)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'mftc-peft[plot]'") from error
    return plt


def module_map_positions(layers) -> tuple[list[int], list[int]]:
    """(x, y) of every block: y its layer, x its running position among that layer's blocks (in node order)."""
    seen = defaultdict(int)
    xs, ys = [], []
    for layer in layers:
        xs.append(seen[layer])
        ys.append(layer)
        seen[layer] += 1
    return xs, ys


def plot_report(report, directory: Path) -> list[Path]:
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = directory / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    if report.nodes:
        layers = report.diagnostics.get("node_layers") or [0] * len(report.nodes)
        xs, ys = module_map_positions(layers)
        selected = {(b["module"], b["block"]) for b in report.selected_blocks}
        fig, ax = plt.subplots(figsize=(10, 1.5 + 0.35 * (max(ys) + 1)))
        labels = report.labels or [0] * len(xs)
        ax.scatter(xs, ys, c=labels, cmap="tab20", s=14, marker="s", linewidths=0)
        marked = [i for i, node in enumerate(report.nodes) if tuple(node) in selected]
        ax.scatter([xs[i] for i in marked], [ys[i] for i in marked], s=40, facecolors="none", edgecolors="black",
                   linewidths=1.0, label="selected")
        ax.set(xlabel="block (target weights of the layer, in order)", ylabel="layer",
               title="Module map: colour = DSCA module, circles = selected blocks")
        ax.invert_yaxis()
        ax.legend(loc="upper right", fontsize=8)
        save(fig, "module_map.png")

    eigenvalues = report.diagnostics.get("eigenvalues")
    if eigenvalues:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(range(1, len(eigenvalues) + 1), eigenvalues, "o-")
        ax.set(xlabel="index", ylabel="eigenvalue", title="Smallest eigenvalues of the normalised Laplacian")
        save(fig, "laplacian_spectrum.png")

    per_layer = report.elements_per_layer()
    if per_layer:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        layers = sorted(per_layer)
        ax.bar([str(layer) for layer in layers], [per_layer[layer] for layer in layers])
        ax.set(xlabel="layer", ylabel="trainable elements", title="Trainable parameters per layer")
        save(fig, "trainable_per_layer.png")
    return written
