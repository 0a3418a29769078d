"""Module search: the search space (nodes x candidate modules) that the probes value and the selection chooses from.

The search space is built by a pure function from two inputs:

- a `BlockTable`: one row per block of the block grid (the graph nodes DSCA clusters) with its module name, block id,
  transformer-layer index, trainable-parameter count and gradient energy;
- the module library: DSCA's modules, each a list of rows of that table.

Each search node (default: one transformer layer) gets as candidates the library modules restricted to its blocks,
ranked by gradient energy, plus "none" at index 0. The arrays it exports feed `select_candidates`, and a chosen
candidate per node turns back into a `block_selection` for `MFTCConfig`.
"""

from __future__ import annotations

import logging
import numbers
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .checks import is_int

logger = logging.getLogger(__name__)

GROUPINGS = ("layer", "module")
# `encoder.layer.3.`, `model.layers.3.`, GPT-2 `transformer.h.3.`, T5 `encoder.block.3.`
_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


def layer_index(module_name: str) -> int | None:
    """Transformer-layer index in a module name (`...layer.3...`, `...layers.3...`, `...h.3...`), else None."""
    match = _LAYER_PATTERN.search(module_name)
    return None if match is None else int(match.group(1))


@dataclass(frozen=True)
class BlockTable:
    """One row per block: `module_names[r]`, `block_ids[r]`, `sizes[r]` (trainable parameters), `energy[r]`
    (accumulated squared gradient, or any non-negative importance) and `layers[r]` (-1 when the block belongs to no
    transformer layer). `layers` defaults to `layer_index` of the module name. Encoder-decoder models repeat layer
    indices across stacks: pass `layers` explicitly (e.g. decoder offset by the encoder depth) to keep them apart.
    """

    module_names: tuple[str, ...]
    block_ids: np.ndarray
    sizes: np.ndarray
    energy: np.ndarray
    layers: np.ndarray | None = None

    def __post_init__(self):
        names = tuple(self.module_names)
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"`module_names` must be strings, got {self.module_names!r}")
        n = len(names)
        layers = [-1 if (k := layer_index(m)) is None else k for m in names] if self.layers is None else self.layers
        columns = {"block_ids": self.block_ids, "sizes": self.sizes, "layers": layers}
        fixed = {}
        for name, values in columns.items():
            array = np.asarray(values)
            if array.shape != (n,) or (n and not np.issubdtype(array.dtype, np.integer)):
                raise ValueError(f"`{name}` must be an integer array of length {n} (one per block), got {values!r}")
            fixed[name] = array.astype(np.int64)
        if np.any(fixed["block_ids"] < 0) or np.any(fixed["sizes"] < 0) or np.any(fixed["layers"] < -1):
            raise ValueError("`block_ids` and `sizes` must be non-negative and `layers` >= -1 (-1: no layer)")
        energy = np.asarray(self.energy, dtype=float)
        if energy.shape != (n,) or not np.all(np.isfinite(energy)) or np.any(energy < 0):
            raise ValueError(f"`energy` must be a finite non-negative array of length {n}, got {self.energy!r}")
        pairs = set(zip(names, fixed["block_ids"].tolist()))
        if len(pairs) != n:
            raise ValueError("every (module name, block id) pair must appear once in the block table")
        object.__setattr__(self, "module_names", names)
        object.__setattr__(self, "energy", energy)
        for name, array in fixed.items():
            object.__setattr__(self, name, array)

    def __len__(self) -> int:
        return len(self.module_names)

    @classmethod
    def from_grids(cls, grids: Mapping, energy: Mapping[str, Sequence[float]]) -> "BlockTable":
        """Table of every block of `grids` ({module name: BlockGrid}, e.g. `MFTCModel.block_grids()`), in that order,
        with `energy[module name]` giving one value per block id."""
        names, ids, sizes, values = [], [], [], []
        for name, grid in grids.items():
            numels = grid.block_numels()
            e = np.asarray(energy[name], dtype=float)
            if e.shape != (len(numels),):
                raise ValueError(f"`energy[{name!r}]` must hold one value per block ({len(numels)}), got {e.shape}")
            names += [name] * len(numels)
            ids += range(len(numels))
            sizes += numels
            values.append(e)
        stacked = np.concatenate(values) if values else np.zeros(0)
        return cls(tuple(names), np.array(ids, dtype=np.int64), np.array(sizes, dtype=np.int64), stacked)


@dataclass(frozen=True)
class Candidate:
    """One option at a node: a library module restricted to the node's blocks, or "none" (`module is None`).

    `blocks` is {module name: sorted block ids}; treat it as read-only.
    """

    blocks: dict[str, tuple[int, ...]]
    size: int
    energy: float
    module: int | None
    rows: tuple[int, ...] = field(repr=False)


@dataclass(frozen=True)
class SearchNode:
    name: str
    rows: tuple[int, ...] = field(repr=False)
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class SearchSpace:
    """Nodes x candidates; candidate 0 of every node is "none"."""

    nodes: tuple[SearchNode, ...]

    @property
    def n_candidates_per_node(self) -> tuple[int, ...]:
        return tuple(len(node.candidates) for node in self.nodes)

    def sizes(self) -> list[np.ndarray]:
        """Per node, the candidates' trainable-parameter counts: the `sizes` argument of `select_candidates`."""
        return [np.array([c.size for c in node.candidates], dtype=float) for node in self.nodes]

    def energies(self) -> list[np.ndarray]:
        return [np.array([c.energy for c in node.candidates]) for node in self.nodes]

    def selection(self, chosen: Sequence[int]) -> dict[str, list[int]]:
        """The `block_selection` ({module name: sorted block ids}) of one chosen candidate index per node."""
        chosen = list(chosen)
        counts = self.n_candidates_per_node
        if len(chosen) != len(counts) or not all(
            isinstance(c, numbers.Integral) and 0 <= c < k for c, k in zip(chosen, counts)
        ):
            raise ValueError(
                f"`chosen` must hold one candidate index per node ({len(counts)} nodes with {counts} candidates), "
                f"got {chosen!r}"
            )
        merged: dict[str, set[int]] = {}
        for node, c in zip(self.nodes, chosen):
            for name, ids in node.candidates[c].blocks.items():
                merged.setdefault(name, set()).update(ids)
        return {name: sorted(ids) for name, ids in merged.items()}


# Truncation sizes offered per module, as multiples of a node's fair share of the budget.
SHARE_LEVELS = (0.5, 1.0, 2.0)


def share_levels_up_to(max_share: float) -> tuple[float, ...]:
    """The standard truncation levels below `max_share`, and `max_share` itself (the most one node may take)."""
    return tuple(sorted({level for level in SHARE_LEVELS if level < max_share} | {float(max_share)}))


def build_search_space(
    library: Sequence[Sequence[int]],
    table: BlockTable,
    *,
    grouping: str | int = "layer",
    max_candidates: int | None = 8,
    budget: int | None = None,
    share_levels: Sequence[float] = SHARE_LEVELS,
) -> SearchSpace:
    """Nodes and their candidate modules from a module library over the rows of `table`.

    Parameters
    ----------
    library : sequence of sequences of int
        Each module as rows of `table` (DSCA's modules; they may overlap).
    grouping : "layer", "module" or int
        "layer": one node per transformer layer; "module": one per target module; k: k consecutive layers per node.
        Blocks with no layer index (`layers == -1`) get one node per module name under "layer" and k.
    max_candidates : int or None
        Module candidates kept per node (besides "none"), the highest gradient energy first; None keeps all.
    budget : int or None
        The search's parameter budget. When given, every kept module is also offered truncated to its highest-energy
        blocks at `share_levels` times the node's fair share (budget / number of nodes), so that modules larger than
        the budget can still be trained in part and the search can move budget between nodes. Modules are then only
        offered truncated, so no node takes more than max(share_levels) times its fair share. Each truncation keeps
        at least one block; identical block sets are offered once.

    Per node, each module is cut down to the node's blocks; empty results are dropped and identical block sets kept
    once (the lower library index). Nodes that no module reaches are left out.
    """
    if not isinstance(table, BlockTable):
        raise ValueError(f"`table` must be a BlockTable, got {type(table).__name__}")
    if not (grouping in GROUPINGS or (is_int(grouping) and grouping >= 1)):
        raise ValueError(f"`grouping` must be one of {GROUPINGS} or a positive integer, got {grouping!r}")
    if max_candidates is not None and not (is_int(max_candidates) and max_candidates >= 1):
        raise ValueError(f"`max_candidates` must be a positive integer or None, got {max_candidates!r}")
    modules = []
    for m, rows in enumerate(library):
        rows = np.unique(np.asarray(list(rows), dtype=np.int64))
        if rows.size and (rows[0] < 0 or rows[-1] >= len(table)):
            raise ValueError(f"`library[{m}]` rows must lie in 0..{len(table) - 1} (the block table), got {rows!r}")
        modules.append(rows)
    if budget is not None and not (isinstance(budget, numbers.Real) and budget > 0):
        raise ValueError(f"`budget` must be a positive number or None, got {budget!r}")
    if not share_levels or any(not (isinstance(x, numbers.Real) and x > 0) for x in share_levels):
        raise ValueError(f"`share_levels` must be a non-empty sequence of positive numbers, got {share_levels!r}")
    return _build_search_space(modules, table, grouping, max_candidates, budget, tuple(share_levels))


def _node_assignment(table: BlockTable, grouping) -> tuple[np.ndarray, list[str]]:
    """Node index of every row and the node names, nodes ordered by layer, then unlayered modules by appearance."""
    if grouping == "module":
        names = list(dict.fromkeys(table.module_names))
        position = {n: i for i, n in enumerate(names)}
        return np.array([position[n] for n in table.module_names], dtype=np.int64), names
    width = 1 if grouping == "layer" else int(grouping)
    layers = sorted(set(table.layers.tolist()) - {-1})
    groups = [layers[i : i + width] for i in range(0, len(layers), width)]
    names = [f"layer {g[0]}" if len(g) == 1 else f"layers {g[0]}-{g[-1]}" for g in groups]
    position = {layer: i for i, g in enumerate(groups) for layer in g}
    unlayered = list(dict.fromkeys(n for n, k in zip(table.module_names, table.layers) if k == -1))
    position.update({name: len(groups) + i for i, name in enumerate(unlayered)})
    keys = [name if k == -1 else k for name, k in zip(table.module_names, table.layers.tolist())]
    return np.array([position[key] for key in keys], dtype=np.int64), names + unlayered


def _candidate(table: BlockTable, rows: np.ndarray, module: int | None) -> Candidate:
    blocks: dict[str, list[int]] = {}
    for r in rows.tolist():
        blocks.setdefault(table.module_names[r], []).append(int(table.block_ids[r]))
    return Candidate(
        blocks={name: tuple(sorted(ids)) for name, ids in blocks.items()},
        size=int(table.sizes[rows].sum()),
        energy=float(table.energy[rows].sum()),
        module=module,
        rows=tuple(rows.tolist()),
    )


def _truncations(table: BlockTable, rows: np.ndarray, caps: Sequence[float]) -> list[np.ndarray]:
    """The module's highest-energy blocks that fit each cap (at least one block), smallest cap first."""
    order = rows[np.argsort(-table.energy[rows], kind="stable")]
    cumulative = np.cumsum(table.sizes[order])
    return [np.sort(order[: max(1, int(np.searchsorted(cumulative, cap, side="right")))]) for cap in sorted(caps)]


def _build_search_space(
    modules: list[np.ndarray], table: BlockTable, grouping, max_candidates, budget, share_levels
) -> SearchSpace:
    node_of, names = _node_assignment(table, grouping)
    present = len(set(node_of.tolist()))
    caps = [budget / present * level for level in share_levels] if budget is not None else []
    none = _candidate(table, np.zeros(0, dtype=np.int64), None)
    nodes = []
    for k, name in enumerate(names):
        options, seen = [], set()
        for m, rows in enumerate(modules):
            inside = rows[node_of[rows] == k]
            if inside.size and (key := inside.tobytes()) not in seen:
                seen.add(key)
                options.append(_candidate(table, inside, m))
        if not options:
            continue
        # Stable sort: equal energies keep library order, so the ranking is deterministic.
        options.sort(key=lambda c: -c.energy)
        options = options[:max_candidates]
        if caps:
            expanded, offered = [], set()
            for option in options:
                # No untruncated module above the largest cap: one node may take at most max(share_levels) times its
                # fair share, so the budget spreads over layers instead of piling onto the highest-gradient ones.
                parts = _truncations(table, np.asarray(option.rows, dtype=np.int64), caps)
                for rows in parts:
                    candidate = _candidate(table, rows, option.module)
                    if (key := np.asarray(candidate.rows, dtype=np.int64).tobytes()) not in offered:
                        offered.add(key)
                        expanded.append(candidate)
            options = expanded
        nodes.append(SearchNode(name, tuple(np.flatnonzero(node_of == k).tolist()), (none, *options)))
    logger.info("search space: %d nodes, %d candidates", len(nodes), sum(len(n.candidates) for n in nodes))
    return SearchSpace(tuple(nodes))
