"""Dynamic selection during training: every K steps, swap the weakest selected blocks for better unselected ones.

The warm-up's selection is a guess from a few batches at the start; what the task needs moves as training goes (the
paper's time-varying module library B(t); SpIEL drops small updates and regrows by gradient, LISA re-samples
layers). `reselect_blocks` measures the current per-block gradient energy of every block of the adapted weights on a
few batches (the warm-up's own hooks), then swaps up to `fraction` of all full-width selected blocks: per weight, the
ones whose applied change is smallest (mean squared delta times its step scale, per element) are offered for the
unselected ones with the largest gradient energy per element, only where the newcomer's energy beats the dropped
block's; over all weights the swaps with the largest energy ratio (newcomer / dropped) are made. A weight offers at
most `fraction` of its blocks, and at least one: under the proportional allocation most weights hold one block or
none, and a cap per weight alone would round every swap away.
Swaps stay inside a weight and between blocks of the same width, so the delta keeps its shape and Parameter object:
the trainable count never changes, every optimiser stays valid, and the adapter can be saved, loaded or merged at any
step. The optimiser state of the swapped-in lines starts fresh (zero), the kept lines' state moves with them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from .blocks import move_lines
from .checks import is_real
from .measure import weight_gradients_only
from .model import mftc_tuner
from .signatures import SignatureCollector
from .state import adapter_name_of, preserved_state
from .step_control import new_block_scale
from .training import deterministic_mode, loss_and_outputs

logger = logging.getLogger(__name__)


@dataclass
class ReselectReport:
    """What one reselection did: per module, the (dropped, grown) block pairs; seconds spent."""

    swaps: dict[str, list[tuple[int, int]]]
    seconds: float

    @property
    def n_swapped(self) -> int:
        return sum(map(len, self.swaps.values()))


def reselection_due(completed_steps: int, every: int, max_steps: int) -> bool:
    """Whether a loop reselects after `completed_steps` of `max_steps`: every `every` steps (0: never), but not after
    the last one, where the dropped blocks' training would be lost and the new ones never trained."""
    return bool(every) and completed_steps % every == 0 and completed_steps < max_steps


def reselect_blocks(
    peft_model, batches: Iterable[dict], *, fraction: float, optimizer: Optional[torch.optim.Optimizer] = None,
    compute_loss: Optional[Callable] = None, adapter_name: Optional[str] = None,
) -> ReselectReport:
    """Swap up to `fraction` of the selected full-width blocks (see the module docstring); with `optimizer`, its
    per-element state (Adam's moments) follows the kept lines and is zero for the new ones. Returns what changed."""
    if not (is_real(fraction) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"`fraction` must be a number in [0, 1], got {fraction!r}")
    tuner = mftc_tuner(peft_model)
    adapter_name = adapter_name_of(tuner, adapter_name)
    layers = dict(tuner.mftc_layers(adapter_name))
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` must hold at least one batch to measure block gradients on")
    start = time.perf_counter()
    energy = _energy_per_element(peft_model, layers, adapter_name, batches, compute_loss)
    offers = {name: _pairs(layer, adapter_name, energy[name], fraction) for name, layer in layers.items()}
    n_full = sum(len(_full_blocks(layer, adapter_name)) for layer in layers.values())
    swaps = {}
    for name, pairs in _best_swaps(offers, int(fraction * n_full)).items():
        layer = layers[name]
        delta = layer.mftc_delta[adapter_name]
        source = layer.swap_blocks(adapter_name, [d for d, _, _ in pairs], [g for _, g, _ in pairs],
                                   grown_scale=new_block_scale(tuner.peft_config[adapter_name]))
        if optimizer is not None:
            _move_optimizer_state(optimizer, delta, source)
        swaps[name] = [(d, g) for d, g, _ in pairs]
    tuner.peft_config[adapter_name].block_selection = tuner.block_selection(adapter_name)
    report = ReselectReport(swaps, time.perf_counter() - start)
    logger.info("MFTC reselection: %d blocks swapped in %.2f s", report.n_swapped, report.seconds)
    return report


def _energy_per_element(peft_model, layers, adapter_name, batches, compute_loss) -> dict[str, np.ndarray]:
    """Mean squared gradient per element of every block of every adapted weight, at the current adapter."""
    grids = {name: layer.mftc_grid[adapter_name] for name, layer in layers.items()}
    with preserved_state(peft_model, adapter_name=adapter_name):
        targets = weight_gradients_only(peft_model, layers, grids)
        collector = SignatureCollector(targets, kind="energy", window=max(2, len(batches)))
        with collector, deterministic_mode(peft_model):
            for batch in batches:
                loss, _ = loss_and_outputs(peft_model, batch, compute_loss)
                if torch.isfinite(loss):
                    loss.backward()
                    collector.end_micro_batch()
        energy = collector.block_energy() / np.maximum(collector.node_sizes(), 1)
    bounds = np.cumsum([0] + [grid.n_blocks for grid in grids.values()])
    return {name: energy[a:b] for name, a, b in zip(grids, bounds[:-1], bounds[1:])}


def _full_blocks(layer, adapter_name: str) -> list[int]:
    grid = layer.mftc_grid[adapter_name]
    ids = layer.block_ids(adapter_name)
    return [b for b, w in zip(ids, grid.widths(ids)) if w == grid.width]


def _pairs(layer, adapter_name: str, energy: np.ndarray, fraction: float) -> list[tuple]:
    """(dropped, grown, (grown's energy, dropped's energy)) offers of one weight: weakest deltas out, strongest
    gradients in, the newcomer must beat; at most `fraction` of the weight's full-width blocks, and at least one."""
    grid = layer.mftc_grid[adapter_name]
    ids, full = layer.block_ids(adapter_name), _full_blocks(layer, adapter_name)
    n_swap = max(1, int(fraction * len(full))) if full and fraction > 0 else 0
    if n_swap == 0:
        return []
    widths = np.array(grid.widths(range(grid.n_blocks)))
    unselected = np.setdiff1d(np.flatnonzero(widths == grid.width), ids)
    if unselected.size == 0:
        return []
    lines = layer.applied_delta(adapter_name).detach()  # with its step scales: what the block really moved
    starts = dict(zip(ids, np.cumsum([0, *grid.widths(ids)])[:-1]))
    moved = {b: float(lines[starts[b] : starts[b] + grid.width].float().pow(2).mean()) for b in full}
    weakest = sorted(full, key=lambda b: (moved[b], b))[:n_swap]
    strongest = unselected[np.argsort(-energy[unselected], kind="stable")][:n_swap]
    return [(int(d), int(g), (float(energy[g]), float(energy[d]))) for d, g in zip(weakest, strongest)
            if energy[g] > energy[d]]


def _priority(grown: float, dropped: float) -> tuple[float, float]:
    """Sort key, smallest first: the largest energy ratio, then (a dropped block without gradient makes every ratio
    infinite) the strongest newcomer."""
    return (-(grown / dropped) if dropped > 0 else -float("inf"), -grown)


def _best_swaps(offers: dict[str, list[tuple]], limit: int) -> dict[str, list[tuple]]:
    """The `limit` offers ranked by `_priority` over all weights (then model order), grouped by weight."""
    ranked = sorted(((*_priority(*energies), order, name, (d, g, energies))
                     for order, (name, pairs) in enumerate(offers.items()) for d, g, energies in pairs),
                    key=lambda item: item[:3])
    chosen: dict[str, list[tuple]] = {}
    for *_, name, pair in ranked[: max(limit, 0)]:
        chosen.setdefault(name, []).append(pair)
    return chosen


def _move_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, source: torch.Tensor) -> None:
    """Per-element optimiser state of `param` (any tensor of its shape, e.g. Adam's exp_avg / exp_avg_sq) follows
    the lines it belonged to; new lines (source -1) start from zero."""
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            move_lines(value, source, fill=0.0)
