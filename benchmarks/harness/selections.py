"""Block selections of the ablations, on the same block grid and warm-up batches as MFTC.

The gradient measurement is MFTC's own (`mftc_peft.measure_blocks`: the same signature collector, DSCA
and seeds on the same micro-batches), so the ablations differ from MFTC only in the stage they remove:

- `random_selection`: random blocks (seeded), no gradients at all.
- `top_energy_selection`: the blocks with the largest accumulated squared gradient (a Fisher-style ranking), no
  clustering, no search.
- `no_search_selection`: DSCA's modules, taken whole in order of mean block energy (blocks inside a module by energy)
  until the budget is filled: clustering without the search.
- `no_cluster_selection`: MFTC's search (taylor probe, constrained selection) over a library without DSCA: for every
  transformer layer the group of all its blocks and one group per target weight, each offered by the search space at
  its usual energy truncations.

Baselines of the selection study only (benchmarks/selection_study.py): `round_robin_selection` (one block per DSCA
module in turn), `adam_gain_selection`, `energy_sampled_selection`, `proportional_top_selection`,
`proportional_band_selection` and
`bottom_energy_selection`.

Every selection fills at most `budget` elements (greedily; never more).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from mftc_peft.allocation import proportional_quotas, proportional_selection, take_in_order
from mftc_peft.measure import measure_blocks
from mftc_peft.predictor import models_from_probes
from mftc_peft.probes import taylor_probe
from mftc_peft.search import BlockTable, build_search_space, share_levels_up_to
from mftc_peft.selection import select_candidates


@dataclass
class Measurement:
    table: BlockTable  # one row per block, energy = accumulated squared gradient over the warm-up
    projections: np.ndarray | None  # (T, blocks): the taylor probe's input (None unless measured with them)
    library: list[list[int]]  # DSCA modules as rows of `table`
    seconds: float  # the whole measurement (signatures + DSCA)
    dsca_seconds: float  # of which DSCA (ablations without clustering leave it out of their warm-up time)


def measure(peft_model, batches, *, projections: bool = False) -> Measurement:
    """MFTC's warm-up measurement (head fit, signatures, DSCA) on `batches`; the model is left as it was.
    `projections=True` also collects the taylor probe's gradient sketches (for selections that read them)."""
    start = time.perf_counter()
    measured = measure_blocks(peft_model, batches, keep_projections=projections)
    return Measurement(
        table=measured.table, projections=measured.projections, library=measured.library,
        seconds=time.perf_counter() - start, dsca_seconds=measured.timings.get("dsca", 0.0),
    )


_fill = take_in_order  # the product's greedy fill: blocks in order while they fit the budget


def grid_table(grids: dict) -> BlockTable:
    """A block table of `grids` with zero energy (for selections that need no gradients)."""
    names, ids, sizes = [], [], []
    for name, grid in grids.items():
        for block, size in enumerate(grid.block_numels()):
            names.append(name), ids.append(block), sizes.append(size)
    return BlockTable(module_names=tuple(names), block_ids=np.array(ids, dtype=np.int64),
                      sizes=np.array(sizes, dtype=np.int64), energy=np.zeros(len(names)))


def random_selection(grids: dict, budget: int, seed: int) -> dict[str, list[int]]:
    table = grid_table(grids)
    return _fill(table, np.random.default_rng(seed).permutation(len(table)), budget)


def top_energy_selection(measurement: Measurement, budget: int) -> dict[str, list[int]]:
    table = measurement.table
    return _fill(table, np.argsort(-table.energy, kind="stable"), budget)


def no_search_selection(measurement: Measurement, budget: int) -> dict[str, list[int]]:
    table = measurement.table
    modules = [np.asarray(rows, dtype=np.int64) for rows in measurement.library if len(rows)]
    modules.sort(key=lambda rows: -float(table.energy[rows].mean()))  # stable: ties keep DSCA's order
    rows = [int(r) for m in modules for r in m[np.argsort(-table.energy[m], kind="stable")]]
    return _fill(table, rows, budget)


def round_robin_selection(measurement: Measurement, budget: int, seed: int | None = None) -> dict[str, list[int]]:
    """One block per DSCA module in turn (modules by total energy), each module's blocks by energy, or in a seeded
    random order when `seed` is given: the clusters as redundancy groups, sampled for coverage."""
    table, rng = measurement.table, None if seed is None else np.random.default_rng(seed)
    modules = [np.asarray(rows, dtype=np.int64) for rows in measurement.library if len(rows)]
    modules.sort(key=lambda rows: -float(table.energy[rows].sum()))
    queues = [m[np.argsort(-table.energy[m], kind="stable")] if rng is None else rng.permutation(m) for m in modules]
    depth = max((len(q) for q in queues), default=0)
    rows = [int(q[i]) for i in range(depth) for q in queues if i < len(q)]
    return _fill(table, list(dict.fromkeys(rows)), budget)


def adam_gain_selection(measurement: Measurement, budget: int) -> dict[str, list[int]]:
    """Blocks by the first-order loss decrease of one Adam step, lr * sum_i gbar_i^2 / rms_i, with a block's rms
    taken as uniform: ||gbar_b||^2 / sqrt(E_b / (T n_b)), per parameter (Adam moves every trained element ~lr)."""
    table, p = measurement.table, measurement.projections
    t = p.shape[0]
    signal = np.clip(p.mean(axis=0)[: len(table)], 0.0, None)
    rms = np.sqrt(table.energy / (t * np.maximum(table.sizes, 1)))
    gain = np.divide(signal, rms, out=np.zeros_like(signal), where=rms > 0)
    return _fill(table, np.argsort(-gain / np.maximum(table.sizes, 1), kind="stable"), budget)


def energy_sampled_selection(measurement: Measurement, budget: int, seed: int, power: float = 1.0):
    """Blocks drawn without replacement with probability proportional to energy ** power (Efraimidis-Spirakis keys
    u ** (1 / w)): random spread, tilted towards the blocks the gradients favour."""
    table = measurement.table
    weight = np.maximum(table.energy, 1e-300) ** power
    keys = np.log(np.random.default_rng(seed).random(len(table))) / (weight / weight.max())
    return _fill(table, np.argsort(-keys, kind="stable"), budget)


def proportional_top_selection(measurement: Measurement, budget: int) -> dict[str, list[int]]:
    """Random blocks' spread with the gradients' choice inside it: the product's `allocation="proportional"`
    (`mftc_peft.allocation`) on this measurement. Tests whether MFTC loses by where it puts the budget or by which
    blocks."""
    return proportional_selection(measurement.table, budget)


def proportional_band_selection(measurement: Measurement, budget: int, seed: int,
                                band: tuple[float, float] = (0.25, 0.75)) -> dict[str, list[int]]:
    """Random blocks' spread, each weight's quota drawn uniformly from the blocks whose energy rank (0 = weakest,
    1 = strongest, within the weight) lies in `band`: neither the dead tail nor the top that overfits (NOTES 14)."""
    table = measurement.table
    rng = np.random.default_rng(seed)
    rows = []
    for mine, k in proportional_quotas(table, budget):
        ranked = mine[np.argsort(table.energy[mine], kind="stable")]  # weakest first
        low, high = int(np.floor(band[0] * len(ranked))), int(np.ceil(band[1] * len(ranked)))
        inside = ranked[low:max(high, low + k)]
        rows += rng.permutation(inside)[:k].tolist()
    return _fill(table, rows, budget)


def bottom_energy_selection(measurement: Measurement, budget: int) -> dict[str, list[int]]:
    table = measurement.table
    return _fill(table, np.argsort(table.energy, kind="stable"), budget)


def layer_and_weight_library(table: BlockTable) -> list[list[int]]:
    """Per transformer layer: all its blocks, and the blocks of each of its target weights."""
    library = []
    names = np.array(table.module_names)
    for layer in sorted(set(table.layers.tolist())):
        in_layer = np.flatnonzero(table.layers == layer)
        library.append(in_layer.tolist())
        for name in dict.fromkeys(names[in_layer]):
            library.append(in_layer[names[in_layer] == name].tolist())
    return library


def no_cluster_selection(measurement: Measurement, budget: int, config) -> dict[str, list[int]]:
    table = measurement.table
    space = build_search_space(
        layer_and_weight_library(table), table, grouping=config.node_grouping, max_candidates=config.max_candidates,
        budget=budget, share_levels=share_levels_up_to(config.max_node_share),
    )
    results = taylor_probe(space, measurement.projections, lr=1.0)
    gain, _ = models_from_probes(results, space.n_candidates_per_node, base_accuracy=0.0, base_loss=0.0)
    chosen = select_candidates(
        gain.deltas, space.sizes(), budget=budget, spread=gain.spread, confidence=config.confidence,
        method=config.search_method,
    ).chosen
    return space.selection(chosen)
