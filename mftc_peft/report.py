"""`WarmupReport`: what the warm-up measured, clustered, predicted and chose; how it is built, its JSON and plots.

The report is plain data (lists, dicts, floats), so `to_json` needs no custom encoder and a saved report can be
re-read and re-plotted without the model (`WarmupReport.from_json`).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .search import layer_index


class BlockGraph(NamedTuple):
    nodes: list[tuple[str, int]]
    affinity: Any  # scipy sparse (m, m)


@dataclass
class WarmupReport:
    """Everything the warm-up decided, and why.

    Attributes
    ----------
    selection : module name -> selected block ids (what the adapter now trains).
    trainable_elements / budget_elements : selected delta elements and the budget they had to fit (what the
        low-rank part, if any, left of the config's `budget`).
    low_rank_elements : elements of the adapter's low-rank part (`low_rank`), trained next to the blocks; 0 without.
    target_elements : elements of all target weights (the denominator of a float budget).
    nodes : (module name, block id) of every block, in the order of `labels` and the graph.
    labels : DSCA module label of every block after the last update.
    modules : the module library (blocks, size, energy, stability per module).
    candidates : per search node, its candidates with size, predicted gain / loss delta and spread (empty with
        `allocation="proportional"`, which runs no module search).
    solver : objective, LP bound, gap, method and status of the constrained selection (empty likewise).
    diagnostics : energy concentration kappa(r), stability (ARI/NMI), subspace drift, eigengap, eigenvalues.
    timings : seconds per stage ('signatures', 'dsca', 'probe', 'search', 'inject', 'total').
    selected_blocks : one record per selected block: module, block, layer (-1 if unknown), size, DSCA label.
    config : the MFTC config fields the warm-up ran with.
    step_scales : per selected module, the step scale of each block (in `selection` order); None when the config
        asks for none (`step_scale="none"` and `block_step_scale=1`; `step_control.py`).
    """

    selection: dict[str, list[int]]
    trainable_elements: int
    budget_elements: int
    target_elements: int
    nodes: list[list[Any]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    modules: list[dict] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    solver: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    selected_blocks: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    step_scales: dict | None = None
    low_rank_elements: int = 0

    def attach_graph(self, affinity) -> None:
        """Keep the block graph (scipy sparse, rows = `nodes`) for spectral coordination; it is not written to JSON."""
        self._affinity = affinity

    def block_graph(self) -> BlockGraph:
        affinity = getattr(self, "_affinity", None)
        if affinity is None:
            raise ValueError("this report holds no block graph (reports read from JSON do not keep it)")
        return BlockGraph([tuple(node) for node in self.nodes], affinity)

    def to_dict(self) -> dict:
        return _finite(asdict(self))

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "WarmupReport":
        data = json.loads(Path(path).read_text())
        data.pop("fidelity", None)  # written (always None) by reports of version 0.1.0 before it was dropped
        return cls(**data)

    def summary(self) -> str:
        """A few lines for a terminal or a log."""
        per_layer = self.elements_per_layer()
        lines = [
            f"selected {sum(map(len, self.selection.values()))} blocks in {len(self.selection)} weights: "
            f"{self.trainable_elements:,} trainable elements (budget {self.budget_elements:,}, "
            f"{100 * self.trainable_elements / max(self.target_elements, 1):.2f}% of the target weights)",
            *([f"plus a low-rank part of {self.low_rank_elements:,} trainable elements"] if self.low_rank_elements
              else []),
            "per layer: " + ", ".join(f"{layer}: {count:,}" for layer, count in sorted(per_layer.items())),
        ]
        if self.solver:
            lines.append(
                f"search: objective {self.solver.get('objective', float('nan')):.4g}, bound "
                f"{self.solver.get('bound', float('nan')):.4g}, gap {self.solver.get('gap', float('nan')):.3g} "
                f"({self.solver.get('method')}, {self.solver.get('status')})"
            )
        if self.timings:
            lines.append("warm-up seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()))
        return "\n".join(lines)

    def elements_per_layer(self) -> dict[int, int]:
        sizes = defaultdict(int)
        for block in self.selected_blocks:
            sizes[block["layer"]] += block["size"]
        return dict(sizes)

    def plot(self, directory: str | Path) -> list[Path]:
        """Write the module map, Laplacian spectrum and per-layer plots (needs matplotlib)."""
        from . import plots

        return plots.plot_report(self, Path(directory))


def build_report(*, selection, measurement, space, result, gain_model, loss_model, grids, budget, target_elements,
                 config) -> WarmupReport:
    """The report of one warm-up, from its measurement (`BlockMeasurement`), search space, predictor models and
    solver result; it keeps DSCA's graph for spectral coordination."""
    dsca, table = measurement.dsca, measurement.table
    nodes = list(zip(table.module_names, table.block_ids.tolist()))
    row_of = {node: row for row, node in enumerate(nodes)}
    report = WarmupReport(
        selection=selection,
        trainable_elements=sum(grids[n].numel(ids) for n, ids in selection.items()),
        budget_elements=budget,
        target_elements=target_elements,
        nodes=[list(node) for node in nodes],
        labels=[int(label) for label in dsca.labels_],
        modules=[_module_record(module, nodes) for module in dsca.modules_],
        # Without a module search (`allocation="proportional"`) there are no candidates and no solver result.
        candidates=[] if space is None else _candidate_records(space, gain_model, loss_model),
        solver={} if result is None else _solver_record(result),
        diagnostics=_diagnostics(dsca) | {"node_layers": [_layer(name) for name, _ in nodes]},
        selected_blocks=[
            {"module": name, "block": b, "layer": _layer(name), "size": grids[name].numel([b]),
             "label": int(dsca.labels_[row_of[(name, b)]])}
            for name, ids in selection.items() for b in ids
        ],
        config={k: v for k, v in config.to_dict().items() if k != "block_selection"},
    )
    report.attach_graph(dsca.affinity_)
    return report


def _solver_record(result) -> dict:
    return {k: v for k, v in asdict(result).items() if k != "chosen"} | {"chosen": list(result.chosen)}


def _module_record(module, nodes) -> dict:
    return {
        "label": int(module.label),
        "blocks": [list(nodes[i]) for i in module.nodes.tolist()],
        "n_params": module.n_params,
        "mean_energy": module.mean_energy,
        "stability": module.stability,
    }


def _candidate_records(space, gain_model, loss_model) -> list[dict]:
    records = []
    for n, node in enumerate(space.nodes):
        for c, candidate in enumerate(node.candidates):
            records.append({
                "node": node.name, "candidate": c, "module": candidate.module, "size": int(candidate.size),
                "blocks": {k: list(v) for k, v in candidate.blocks.items()},
                "predicted_gain": float(gain_model.deltas[n][c]),
                "predicted_loss_delta": float(loss_model.deltas[n][c]),
                "spread": None if gain_model.spread is None else float(gain_model.spread[n][c]),
            })
    return records


def _diagnostics(dsca) -> dict:
    last = dsca.history_[-1] if dsca.history_ else {}
    return {
        "eigenvalues": [float(v) for v in dsca.eigenvalues_],
        "energy_concentration": last.get("energy_concentration"),
        "stability_ari": last.get("ari_previous"),
        "stability_nmi": last.get("nmi_previous"),
        "subspace_drift": last.get("subspace_drift"),
        "eigengap": last.get("eigengap"),
        "history": dsca.history_,
    }


def _layer(name: str) -> int:
    index = layer_index(name)
    return -1 if index is None else index


def _finite(value):
    """JSON-safe: NaN/inf as None, sets as sorted lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_finite(v) for v in value)
    return value
