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
"""

from __future__ import annotations

import numpy as np

from .search import BlockTable

ALLOCATIONS = ("search", "proportional")
QUOTA_ROUNDINGS = ("largest_remainder", "systematic", "systematic_mixed", "spread_remainder")
DEFAULT_QUOTA_ROUNDING = "spread_remainder"  # NOTES 56: largest remainders alone pile small budgets into early layers


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


def proportional_selection(table: BlockTable, budget: int, rounding: str = "largest_remainder",
                           seed: int = 0) -> dict[str, list[int]]:
    """Module name -> sorted block ids: every weight's quota filled with its highest-energy blocks, then taken in
    order of energy while they fit `budget` elements (where the quotas hold blocks larger than the median, the
    weakest of them are left out)."""
    rows: list[int] = []
    for mine, k in proportional_quotas(table, budget, rounding, seed):
        rows += mine[np.argsort(-table.energy[mine], kind="stable")][:k].tolist()
    rows.sort(key=lambda r: -table.energy[r])
    return take_in_order(table, rows, budget)


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
