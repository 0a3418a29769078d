"""Per-block gradient statistics from real backward passes: the input of the "taylor" probe and of energy rankings.

`block_gradient_statistics` runs one forward/backward pass per warm-up batch with the target weights' gradients
switched on, cuts each weight gradient into its blocks and returns the block table (energy = accumulated squared
gradient) and the projections p_b(t) = <g_b(t), gbar_b> that `mftc_peft.probes.taylor_probe` takes. It keeps every
micro-batch gradient in memory (T x the adapter's target weights), so it is meant for small models and benchmarks until
the warm-up's signatures (sketched per-block gradients) provide the same quantities.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .probes_finetune import _adapter, _mftc_model, preserved_state
from .search import BlockTable
from .training_utils import LossFn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockGradientStatistics:
    """Per-block gradient statistics over T micro-batches: `table` (every block of the adapter's grids, energy =
    accumulated squared gradient sum_t ||g_b(t)||^2) and `projections` (T, blocks): p_b(t) = <g_b(t), gbar_b>, the
    input of `taylor_probe`."""

    table: BlockTable
    projections: np.ndarray
    seconds: float


def block_gradient_statistics(
    peft_model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    compute_loss: LossFn | None = None,
    adapter_name: str | None = None,
    progress: bool = True,
) -> BlockGradientStatistics:
    """One forward/backward pass per batch with the target weights' gradients on (head frozen, eval mode), reduced
    to per-block statistics; the model is restored after (`preserved_state`). Keeps T full gradients in memory."""
    mftc = _mftc_model(peft_model)
    adapter = _adapter(mftc, adapter_name)
    if not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError(f"`batches` must be a non-empty sequence of batch dicts, got {batches!r:.80}")
    start = time.perf_counter()
    layers = dict(mftc.mftc_layers(adapter))
    grids = {name: layer.mftc_grid[adapter] for name, layer in layers.items()}
    weights = [layer.get_base_layer().weight for layer in layers.values()]
    width = max(grid.width * grid.other_length for grid in grids.values())  # d: the widest block, others padded
    per_batch = []
    with preserved_state(peft_model, adapter_name=adapter):
        for p in peft_model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        peft_model.eval()
        for batch in tqdm(batches, desc="block gradients", disable=not progress):
            if compute_loss is None:
                loss = peft_model(**batch).loss
            else:
                loss = compute_loss(peft_model, batch)
                loss = loss[0] if isinstance(loss, tuple) else loss
            grads = torch.autograd.grad(loss, weights)
            rows = [_block_rows(g, grids[name], layers[name].fan_in_fan_out, width) for name, g in zip(layers, grads)]
            per_batch.append(torch.cat(rows))  # (blocks, d)
    stacked = torch.stack(per_batch)  # (T, blocks, d)
    projections = torch.einsum("tbd,bd->tb", stacked, stacked.mean(dim=0)).double().numpy()  # (T, blocks)
    squared = stacked.pow(2).sum(dim=(0, 2)).double().numpy()  # (blocks,)
    bounds = np.cumsum([0] + [grid.n_blocks for grid in grids.values()])
    energy = {name: squared[a:b] for name, a, b in zip(grids, bounds[:-1], bounds[1:])}
    table = BlockTable.from_grids(grids, energy)
    seconds = time.perf_counter() - start
    logger.info("block gradients: %d batches, %d blocks, %.1f s", len(batches), len(table), seconds)
    return BlockGradientStatistics(table, projections, seconds)


def _block_rows(grad: torch.Tensor, grid, fan_in_fan_out: bool, width: int) -> torch.Tensor:
    """(n_blocks, width) flattened per-block gradients of one weight, zero-padded (narrow blocks, narrow modules)."""
    g = grad.T if fan_in_fan_out else grad  # Conv1D stores (in, out): make it (out, in)
    g = g if grid.axis == "out" else g.T  # lines along the block axis first: (length, other_length)
    pad = grid.n_blocks * grid.width - grid.length
    if pad:
        g = torch.cat([g, g.new_zeros(pad, g.shape[1])])
    g = g.reshape(grid.n_blocks, grid.width * g.shape[1]).detach().float()
    return torch.nn.functional.pad(g, (0, width - g.shape[1]))
