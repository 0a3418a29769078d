"""Proportional allocation (`MFTCConfig.allocation="proportional"`): where the budget goes is fixed by the weights'
sizes, which blocks by the gradients.

Each target weight gets a number of blocks proportional to how many blocks it has (uniformly random blocks get that
in expectation); its quota is then filled with its highest-energy blocks. On the LM lab the module search put two
thirds of the budget into one role (attention-out column groups) and lost to random blocks, while this rule did not
(benchmarks/results/NOTES.md, entries 21, 25 and 26).

Where shares fall below one block, the rounding decides (`MFTCConfig.quota_rounding`):
- "largest_remainder" (the default until NOTES 56; measured in NOTES 26-28): the remainders go to the weights seen
  first on ties, so with many weights and a small budget the early layers get one block more than the late ones (with
  fewer blocks than weights, all of them), and weights whose share is under half a block (attention weights, which
  hold few blocks) may get none;
- "systematic": each weight's share is rounded up with probability equal to its fraction (systematic sampling along
  the weights in model order, seeded): every weight gets random blocks' expected count, and the rounded-up weights
  are spaced evenly along the layers; where the spacing between picks is a whole number of layers, they all land on
  one role (the frame is periodic);
- "systematic_mixed": the same, with each layer's weights in a seeded random order, so picks still spread evenly
  along the layers and the roles vary between them;
- "spread_remainder" (the default since NOTES 56): largest remainders, so the weights with the largest fractional
  shares (on the models measured, the FFN weights) still come first, but the weights tied at the cut share its
  blocks evenly along the layers (systematic sampling over them in a mixed layer order) instead of going to the
  first layers.
The budget in blocks uses the median block size, so where larger blocks (heads, row groups) are in the quotas the
element budget drops the lowest-energy quota blocks.

How the quotas are filled (`MFTCConfig.ffn_coupling`):
- "none" (the default): each weight with its own highest-energy blocks;
- "neurons": inside each transformer layer the FFN weights (producers such as gate/up_proj cut into row groups, the
  consumer such as down_proj cut into column groups: group b is the same `block_size` neurons in all of them) fill
  their quotas from one ranking of the neuron groups, by the sum of the group's block energies over those weights,
  so a group's read and write are trained together (as S2FT couples them). Equal quotas pick identical groups; a
  larger quota takes the next groups of the same ranking. Other weights fill as with "none". A layer whose FFN
  weights do not line up (`COUPLING_RULE`) fills independently, with a warning; none lining up is an error.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np

from .blocks import BlockGrid, module_role
from .checks import check_choice
from .search import BlockTable

ALLOCATIONS = ("search", "proportional")
QUOTA_ROUNDINGS = ("largest_remainder", "systematic", "systematic_mixed", "spread_remainder")
DEFAULT_QUOTA_ROUNDING = "spread_remainder"  # NOTES 56: largest remainders alone pile small budgets into early layers
FFN_COUPLINGS = ("none", "neurons")
COUPLING_RULE = (
    "a transformer layer's FFN weights are coupled when they are one consumer (down_proj, output.dense, ...) cut "
    "along 'in' and at least one producer (gate_proj, up_proj, intermediate.dense, ...) cut along 'out', all into "
    "the same blocks of the same neurons (equal neuron count and block width)"
)


def proportional_quotas(table: BlockTable, budget: int, rounding: str = "largest_remainder",
                        seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """(rows of `table` in one weight, that weight's quota in blocks), weights in first-seen order.

    The budget in blocks is `budget // median block size`; it is shared out in proportion to each weight's block
    count and rounded as `rounding` says (module docstring; `seed` drives the seeded ones); quotas sum to it exactly.
    """
    names = np.array(table.module_names)
    weights = list(dict.fromkeys(table.module_names))
    if not weights:
        return []
    n_blocks = int(budget // max(int(np.median(table.sizes)), 1))
    counts = np.array([np.sum(names == w) for w in weights], dtype=int)
    if n_blocks >= counts.sum():  # the budget holds every block
        return [(np.flatnonzero(names == w), int(k)) for w, k in zip(weights, counts)]
    exact = n_blocks * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    remainder = n_blocks - int(quota.sum())
    rng = np.random.default_rng(seed)
    if rounding == "systematic":
        quota[systematic_picks(exact - quota, remainder, rng)] += 1
    elif rounding == "systematic_mixed":
        order = mixed_layer_order(_weight_layers(table, names, weights), rng)
        quota[order[systematic_picks((exact - quota)[order], remainder, rng)]] += 1
    elif rounding == "spread_remainder":
        layers = _weight_layers(table, names, weights)
        quota[spread_remainder_picks(exact - quota, remainder, layers, rng)] += 1
    else:
        quota[np.argsort(-(exact - quota), kind="stable")[:remainder]] += 1
    return [(np.flatnonzero(names == w), int(k)) for w, k in zip(weights, quota)]


def _weight_layers(table: BlockTable, names: np.ndarray, weights: list[str]) -> np.ndarray:
    """Each weight's transformer layer (from its first block's row)."""
    return table.layers[[int(np.argmax(names == w)) for w in weights]]


def systematic_picks(fractions: np.ndarray, n_picks: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `n_picks` distinct entries, entry i drawn with probability `fractions[i]` (each in [0, 1), summing
    to `n_picks`): one uniform offset, then points one apart along the cumulative fractions (Madow's systematic
    sampling). Neighbours in the order given are rarely picked together, so picks spread evenly along it."""
    if n_picks <= 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.cumsum(fractions)
    edges *= n_picks / edges[-1]  # exact total despite float sums
    points = rng.uniform() + np.arange(n_picks)
    return np.searchsorted(edges, points, side="right")


def spread_remainder_picks(remainders: np.ndarray, n_picks: int, layers: np.ndarray,
                           rng: np.random.Generator) -> np.ndarray:
    """Indices of the `n_picks` largest `remainders`, where the entries tied at the cut share the picks left evenly
    along the layers: systematic sampling with equal fractions over them in `mixed_layer_order`. Largest remainders
    alone break ties by model order, so with fewer blocks than tied weights every block lands in the first layers
    (SmolLM2 at a quarter of LoRA r=8's count: 30 / 3 / 0 blocks by layer thirds, NOTES 50)."""
    if n_picks <= 0:
        return np.zeros(0, dtype=np.int64)
    cut = np.sort(remainders)[::-1][n_picks - 1]
    tied = np.isclose(remainders, cut, rtol=1e-9, atol=1e-12)
    above = np.flatnonzero((remainders > cut) & ~tied)
    tied = np.flatnonzero(tied)
    tied = tied[mixed_layer_order(layers[tied], rng)]
    left = n_picks - len(above)
    return np.concatenate([above, tied[systematic_picks(np.full(len(tied), left / len(tied)), left, rng)]])


def mixed_layer_order(layers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The weights ordered by layer, in a seeded random order inside each layer. Systematic sampling along model
    order aliases with the layers' period: where the spacing between picks is a whole layer, every pick lands on the
    same role (MiniLM at a quarter of LoRA r=8's count: six blocks, all in one role, NOTES 51)."""
    return np.lexsort((rng.permutation(len(layers)), layers))


def proportional_selection(table: BlockTable, budget: int, rounding: str = "largest_remainder", seed: int = 0, *,
                           ffn_coupling: str = "none",
                           grids: Mapping[str, BlockGrid] | None = None) -> dict[str, list[int]]:
    """Module name -> sorted block ids: every weight's quota filled with its highest-energy blocks (with
    `ffn_coupling="neurons"`, a layer's FFN weights with its strongest neuron groups: `coupled_fill`, which needs the
    weights' `grids`), then taken in order of energy while they fit `budget` elements (where the quotas hold blocks
    larger than the median, the weakest of them are left out)."""
    check_choice("ffn_coupling", ffn_coupling, FFN_COUPLINGS)
    quotas = proportional_quotas(table, budget, rounding, seed)
    if ffn_coupling == "neurons":
        if grids is None:
            raise ValueError("`grids` (module name -> BlockGrid) must be given with ffn_coupling='neurons', got None")
        rows, rank = coupled_fill(table, quotas, grids)
    else:
        rows, rank = independent_fill(table, quotas), table.energy
    rows.sort(key=lambda r: -rank[r])
    return take_in_order(table, rows, budget)


def independent_fill(table: BlockTable, quotas: list[tuple[np.ndarray, int]]) -> list[int]:
    """Rows of `table`: each weight's quota filled with its own highest-energy blocks."""
    rows: list[int] = []
    for mine, k in quotas:
        rows += mine[np.argsort(-table.energy[mine], kind="stable")][:k].tolist()
    return rows


def coupled_fill(table: BlockTable, quotas: list[tuple[np.ndarray, int]],
                 grids: Mapping[str, BlockGrid]) -> tuple[list[int], np.ndarray]:
    """(rows of `table`, a ranking value per row): `quotas` filled as `independent_fill` does, except that each
    layer's coupled FFN weights (`ffn_units`) take their quotas from one ranking of the neuron groups, by the group's
    energy summed over those weights. Their rows rank by that sum divided by the number of weights (the group's mean
    energy; other rows by their own energy), so at the budget cut a group's blocks stand next to each other instead
    of apart by their own energies, and few groups are split.

    Layers whose FFN weights do not couple fill independently, with a `RuntimeWarning` naming them; a `ValueError`
    when no layer couples.
    """
    units, skipped = ffn_units(table, grids)
    if not units:
        found = _describe(skipped) or f"no FFN weight among the {len(set(table.module_names))} target weights"
        raise ValueError(f"`ffn_coupling='neurons'` needs a layer whose FFN weights can be coupled ({COUPLING_RULE}); "
                         f"none can, got {found}")
    if skipped:
        warnings.warn(f"ffn_coupling='neurons': these layers' FFN weights are filled independently, since "
                      f"{COUPLING_RULE}: {_describe(skipped)}", RuntimeWarning, stacklevel=3)
    quota = {table.module_names[mine[0]]: (mine, k) for mine, k in quotas}
    coupled = {name for unit in units for name in unit}
    rows = independent_fill(table, [q for name, q in quota.items() if name not in coupled])
    rank = table.energy.copy()
    for unit in units:
        # (weights, groups) rows of the unit, columns in block-id order (every weight holds the same ids)
        grid_rows = np.stack([mine[np.argsort(table.block_ids[mine], kind="stable")]
                              for mine, _ in (quota[name] for name in unit)])
        score = table.energy[grid_rows].sum(axis=0)
        order = np.argsort(-score, kind="stable")
        rank[grid_rows] = score / len(unit)
        for (_, k), weight_rows in zip((quota[name] for name in unit), grid_rows):
            rows += weight_rows[order[:k]].tolist()
    return rows, rank


def ffn_units(table: BlockTable, grids: Mapping[str, BlockGrid]) -> tuple[list[list[str]], dict[int, str]]:
    """(the coupled FFN weights of each layer that has them, in table order; layer -> why its FFN weights are not
    coupled), by `COUPLING_RULE`. FFN weights are found by `module_role`, layers from the table's `layers` (the
    weights in no layer, -1, count as one; a layer holding two consumers, e.g. a mixture of experts or two stacks
    sharing indices, is not coupled)."""
    names = np.array(table.module_names)
    weights = list(dict.fromkeys(table.module_names))
    by_layer: dict[int, list[str]] = {}
    for name, layer in zip(weights, _weight_layers(table, names, weights).tolist()):
        if module_role(name) in ("ffn_out", "ffn_in"):
            by_layer.setdefault(layer, []).append(name)
    units, skipped = [], {}
    for layer, unit in by_layer.items():
        producers = [n for n in unit if module_role(n) == "ffn_out"]
        consumers = [n for n in unit if module_role(n) == "ffn_in"]
        axes = {n: grids[n].axis for n in unit}
        shapes = {(grids[n].length, grids[n].width) for n in unit}
        ids = {tuple(sorted(table.block_ids[names == n].tolist())) for n in unit}
        if len(consumers) != 1 or not producers:
            skipped[layer] = (f"{len(producers)} producer(s) ({', '.join(producers) or 'none'}) and "
                              f"{len(consumers)} consumer(s) ({', '.join(consumers) or 'none'})")
        elif any(axes[n] != "out" for n in producers) or axes[consumers[0]] != "in":
            skipped[layer] = "block axes " + ", ".join(f"{n}: {a}" for n, a in axes.items())
        elif len(shapes) > 1:
            skipped[layer] = "(neurons, block width) " + ", ".join(
                f"{n}: ({grids[n].length}, {grids[n].width})" for n in unit)
        elif len(ids) > 1:
            skipped[layer] = f"different block ids in the table for {', '.join(unit)}"
        else:
            units.append(unit)
    return units, skipped


def _describe(skipped: dict[int, str]) -> str:
    return "; ".join(f"layer {layer}: {reason}" for layer, reason in skipped.items())


def take_in_order(table: BlockTable, rows, budget: int) -> dict[str, list[int]]:
    """Module name -> sorted block ids: the blocks of `rows` in order, skipping any that would exceed `budget`."""
    selection: dict[str, list[int]] = {}
    used = 0
    for r in rows:
        size = int(table.sizes[r])
        if used + size <= budget:
            selection.setdefault(table.module_names[r], []).append(int(table.block_ids[r]))
            used += size
    return {name: sorted(ids) for name, ids in selection.items()}
