"""Plots of a `WarmupReport` (matplotlib, an optional extra: `pip install mftc-peft[plot]`).

The helpers that decide what is drawn (positions, weight starts, labels, per-layer counts) are pure functions, so
that they can be tested without drawing.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

# Short names of BERT-family weights (their suffixes after the layer index); other architectures' names are short.
_SHORT_NAMES = {
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.output.dense": "o", "intermediate.dense": "FFN in", "output.dense": "FFN out",
}
_LAYER_PREFIX = re.compile(r"^.*?\b(?:layer|layers|h)\.\d+\.")
MODULE_COLOURS = "tab20"


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


def short_weight_name(module_name: str) -> str:
    """'bert.encoder.layer.3.attention.self.query' -> 'q'; 'model.layers.0.self_attn.q_proj' -> 'self_attn.q_proj'."""
    suffix = _LAYER_PREFIX.sub("", module_name)
    return _SHORT_NAMES.get(suffix, suffix)


def weight_starts(nodes, layers) -> list[tuple[int, str]]:
    """(x, short name) where each target weight begins on the module map, read off the layer with the most blocks
    (every layer of a transformer has the same weights, in the same order)."""
    if not nodes:
        return []
    xs, _ = module_map_positions(layers)
    widest = max(set(layers), key=lambda layer: (layers.count(layer), -layer))
    starts, previous = [], None
    for (module, _), x, layer in zip(nodes, xs, layers):
        if layer == widest and module != previous:
            starts.append((x, short_weight_name(module)))
            previous = module
    return starts


def per_layer_counts(per_layer: dict, layers) -> dict[int, int]:
    """Trainable elements of every layer that has target blocks, 0 where none was selected."""
    return {layer: per_layer.get(layer, 0) for layer in sorted(set(layers) | set(per_layer))}


def plot_report(report, directory: Path) -> list[Path]:
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = directory / name
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    layers = report.diagnostics.get("node_layers") or [0] * len(report.nodes)
    if report.nodes:
        save(_module_map(plt, report, layers), "module_map.png")

    eigenvalues = report.diagnostics.get("eigenvalues")
    if eigenvalues:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(range(1, len(eigenvalues) + 1), eigenvalues, "o-")
        ax.set(xlabel="index", ylabel="eigenvalue", title="Smallest eigenvalues of the normalised Laplacian")
        save(fig, "laplacian_spectrum.png")

    counts = per_layer_counts(report.elements_per_layer(), layers if report.nodes else [])
    if counts:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([str(layer) for layer in counts], list(counts.values()))
        ax.set(xlabel="layer", ylabel="trainable elements", title="Trainable parameters per layer (0: none selected)")
        save(fig, "trainable_per_layer.png")
    return written


def _module_map(plt, report, layers):
    """Blocks as squares (x: position inside the layer, y: layer), coloured by DSCA module; selected ones circled."""
    from matplotlib.lines import Line2D

    xs, ys = module_map_positions(layers)
    labels = report.labels or [0] * len(xs)
    cmap = plt.get_cmap(MODULE_COLOURS)
    fig, ax = plt.subplots(figsize=(12, 1.8 + 0.4 * (max(ys) + 1)))
    ax.scatter(xs, ys, c=[cmap(label % cmap.N) for label in labels], s=14, marker="s", linewidths=0)
    selected = {(b["module"], b["block"]) for b in report.selected_blocks}
    marked = [i for i, node in enumerate(report.nodes) if tuple(node) in selected]
    ax.scatter([xs[i] for i in marked], [ys[i] for i in marked], s=40, facecolors="none", edgecolors="black",
               linewidths=1.0)
    starts = weight_starts(report.nodes, layers)
    for x, _ in starts[1:]:
        ax.axvline(x - 0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xticks([x for x, _ in starts], [name for _, name in starts], rotation=45, ha="left", fontsize=8)
    ax.set_xticks(range(max(xs) + 1), minor=True)
    ax.set_yticks(sorted(set(ys)))
    width = report.config.get("block_size", "block_size")  # a report saved before the field existed has none
    ax.set(xlabel=f"block: from each tick, head 0, 1, ... of q/k/v/o, or {width}-unit group 0, 1, ... of the FFN",
           ylabel="layer", title="Module map: colour = DSCA module, circle = selected block")
    ax.invert_yaxis()
    handles = [Line2D([], [], marker="s", linestyle="", color=cmap(label % cmap.N), label=f"module {label}")
               for label in sorted(set(labels))]
    handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="black",
                          label="selected"))
    # Outside the axes, so that it covers no layer.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
              ncol=1 + len(handles) // 16)
    return fig
