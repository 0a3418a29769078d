"""Step control per block: a step scale for each selected block, set at injection from the warm-up's gradients.

Adam gives every element a step of about `lr`, whatever its block's sensitivity, so the blocks with the largest
gradients, which a gradient-ranked selection picks first, diverge at the rates the others need (NOTES.md, entry 9).
The adapter trains `theta` and applies `delta = s_b * theta` to block b: under Adam the step on the delta becomes
`s_b * lr`, under SGD `s_b**2 * lr`, with any optimiser loop and the `Trainer`, and nothing to hook.

"energy": the second-order cost of a sign-like step of size `lr` on block b grows with its Fisher diagonal, i.e. its
mean squared gradient per element e_b; `s_b = min(1, (median(e) / e_b) ** power)` over the selected blocks evens out
that cost (power 0.5 matches it exactly), so the blocks above the median energy take proportionally smaller steps.

`block_step_scale`: one scale s for every block, times the energy scales if any. Next to a low-rank part the blocks
and the part share the optimiser's rate, which the part's best rate sets; s gives the blocks their own step (s * lr
under Adam) without a second parameter group, so that it works in any loop.
"""

from __future__ import annotations

import numpy as np

STEP_SCALES = ("none", "energy")


def has_step_scales(config) -> bool:
    """Whether the adapter's blocks carry step scales (a buffer saved with the adapter)."""
    return config.step_scale != "none" or float(config.block_step_scale) != 1.0


def new_block_scale(config) -> float:
    """The scale of a block no warm-up measured: one given without scales, or one grown by a reselection."""
    return float(config.block_step_scale)


def selection_step_scales(table, selection: dict[str, list[int]], config) -> dict[str, list[float]] | None:
    """The warm-up's scales for `selection`: the energy scales (`step_scale="energy"`, else ones) times
    `block_step_scale`; None when the config asks for none."""
    if not has_step_scales(config):
        return None
    if config.step_scale == "energy":
        scales = energy_step_scales(table, selection, power=config.step_scale_power)
    else:
        scales = {name: [1.0] * len(ids) for name, ids in selection.items()}
    uniform = new_block_scale(config)
    return {name: [uniform * s for s in values] for name, values in scales.items()}


def energy_step_scales(table, selection: dict[str, list[int]], *, power: float) -> dict[str, list[float]]:
    """Per selected block, in the order of `selection[name]`: min(1, (median e / e_b) ** power), e = energy / size.

    `table` is the warm-up's `BlockTable`. Blocks with no gradient at all keep the full step (scale 1).
    """
    row_of = {(name, int(b)): r for r, (name, b) in enumerate(zip(table.module_names, table.block_ids))}
    rows = [row_of[(name, b)] for name, ids in selection.items() for b in ids]
    if not rows:
        return {}
    per_element = table.energy[rows] / np.maximum(table.sizes[rows], 1)
    reference = float(np.median(per_element))
    with np.errstate(divide="ignore"):
        scales = np.where(per_element > 0, np.minimum(1.0, (reference / per_element) ** power), 1.0)
    out, start = {}, 0
    for name, ids in selection.items():
        out[name] = [float(s) for s in scales[start : start + len(ids)]]
        start += len(ids)
    return out
