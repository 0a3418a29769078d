"""Proportional allocation (`MFTCConfig.allocation="proportional"`): where the budget goes is fixed by the weights'
sizes, which blocks by the gradients.

Each target weight gets a number of blocks proportional to how many blocks it has (uniformly random blocks get that
in expectation); its quota is then filled with its highest-energy blocks. On the LM lab the module search put two
thirds of the budget into one role (attention-out column groups) and lost to random blocks, while this rule did not
(benchmarks/results/NOTES.md, entries 21, 25 and 26).

What it does where shares fall below one block, as measured (NOTES 26-28): the rounding's remainders go to the
weights seen first, so with many weights and a small budget the early layers get one block more than the late ones,
and weights whose share is under half a block (attention weights, which hold few blocks) may get none; the budget in
blocks uses the median block size, so where larger blocks (heads, row groups) are in the quotas the element budget
drops the lowest-energy quota blocks.
"""

from __future__ import annotations

import numpy as np

from .search import BlockTable

ALLOCATIONS = ("search", "proportional")


def proportional_quotas(table: BlockTable, budget: int) -> list[tuple[np.ndarray, int]]:
    """(rows of `table` in one weight, that weight's quota in blocks), weights in first-seen order.

    The budget in blocks is `budget // median block size`; it is shared out in proportion to each weight's block
    count, rounding by largest remainders (ties to the weight seen first), so quotas sum to it exactly.
    """
    names = np.array(table.module_names)
    weights = list(dict.fromkeys(table.module_names))
    if not weights:
        return []
    n_blocks = int(budget // max(int(np.median(table.sizes)), 1))
    counts = np.array([np.sum(names == w) for w in weights], dtype=float)
    exact = n_blocks * counts / counts.sum()
    quota = np.minimum(np.floor(exact).astype(int), counts.astype(int))
    remainder = n_blocks - int(quota.sum())
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:remainder]] += 1
    quota = np.minimum(quota, counts.astype(int))  # a quota never exceeds the weight's blocks (budget > everything)
    return [(np.flatnonzero(names == w), int(k)) for w, k in zip(weights, quota)]


def proportional_selection(table: BlockTable, budget: int) -> dict[str, list[int]]:
    """Module name -> sorted block ids: every weight's quota filled with its highest-energy blocks, then taken in
    order of energy while they fit `budget` elements (where the quotas hold blocks larger than the median, the
    weakest of them are left out)."""
    rows: list[int] = []
    for mine, k in proportional_quotas(table, budget):
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
