"""Spectral coordination of the selected blocks during training (the companion method, off by default).

Selected blocks whose deltas share a shape form a group; over each group the block graph (the warm-up's affinity W,
restricted to the group) gives the normalised adjacency A = D^-1/2 W D^-1/2 and Laplacian L = I - A. Two tools:

- gradient filtering (beta in [0, 1)): before each optimiser step, G <- (1 - beta) G + beta A G, a low-pass filter that
  pulls each block's gradient towards those of the blocks it moves with;
- regularisation (lambda >= 0): lambda * tr(Delta^T L Delta) added to the loss, penalising deltas that differ between
  strongly connected blocks.

Plain loop:  loss = loss + coordinator.regularization(); loss.backward(); coordinator.filter_gradients(); opt.step()
`MFTCTrainer` does this itself when `spectral_filter` or `spectral_reg` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import sparse

from .graph import normalized_adjacency
from .layer import MFTCLayer


@dataclass(frozen=True)
class _BlockSlot:
    layer: MFTCLayer
    start: int  # first line of the block inside the adapter's delta
    stop: int


@dataclass(frozen=True)
class _Group:
    slots: tuple[_BlockSlot, ...]
    adjacency: torch.Tensor  # (n, n) normalised A over the group's blocks


class SpectralCoordinator:
    """Gradient filter and Laplacian regulariser over the selected blocks of one adapter.

    Parameters
    ----------
    peft_model : PeftModel or MFTCModel holding the adapter (its selection must already be injected).
    nodes : sequence of (module name, block id), the rows/columns of `affinity`.
    affinity : (m, m) symmetric non-negative matrix (dense or scipy sparse), e.g. the warm-up's block graph.
    beta, lam : the filter strength in [0, 1) and the regularisation weight >= 0.
    """

    def __init__(
        self, peft_model, nodes: Sequence[tuple[str, int]], affinity, *, beta=0.0, lam=0.0, adapter_name=None
    ):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` must be in [0, 1), got {beta!r}")
        if lam < 0:
            raise ValueError(f"`lam` must be >= 0, got {lam!r}")
        affinity = affinity.toarray() if sparse.issparse(affinity) else np.asarray(affinity, dtype=float)
        if affinity.shape != (len(nodes), len(nodes)):
            raise ValueError(f"`affinity` must be ({len(nodes)}, {len(nodes)}) to match `nodes`, got {affinity.shape}")
        tuner = getattr(peft_model, "base_model", peft_model)
        self.adapter_name = adapter_name or tuner.active_adapters[0]
        self.beta, self.lam = float(beta), float(lam)
        self.groups = _build_groups(tuner, self.adapter_name, list(map(tuple, nodes)), affinity)

    def _stack(self, group: _Group, use_grad: bool) -> torch.Tensor:
        rows = []
        for slot in group.slots:
            delta = slot.layer.mftc_delta[self.adapter_name]
            source = delta.grad if use_grad else delta
            rows.append(source[slot.start : slot.stop].reshape(-1))
        return torch.stack(rows)  # (n blocks, block elements)

    @torch.no_grad()
    def filter_gradients(self) -> None:
        """G <- (1 - beta) G + beta A G for every group, in place on the deltas' `.grad`."""
        if self.beta == 0.0:
            return
        for group in self.groups:
            if any(slot.layer.mftc_delta[self.adapter_name].grad is None for slot in group.slots):
                continue
            grads = self._stack(group, use_grad=True)
            filtered = (1 - self.beta) * grads + self.beta * (group.adjacency.to(grads) @ grads)
            for slot, row in zip(group.slots, filtered):
                grad = slot.layer.mftc_delta[self.adapter_name].grad
                grad[slot.start : slot.stop] = row.view_as(grad[slot.start : slot.stop])

    def regularization(self) -> torch.Tensor:
        """lambda * sum over groups of tr(Delta^T L Delta), L = I - A; differentiable."""
        total = None
        for group in self.groups:
            deltas = self._stack(group, use_grad=False)  # (n, e)
            laplacian = torch.eye(len(group.slots), dtype=deltas.dtype, device=deltas.device)
            laplacian = laplacian - group.adjacency.to(deltas)
            term = (deltas * (laplacian @ deltas)).sum()  # tr(Delta^T L Delta) without the (e, e) product
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.lam * total


def _build_groups(tuner, adapter_name: str, nodes: list[tuple[str, int]], affinity: np.ndarray) -> list[_Group]:
    index = {node: i for i, node in enumerate(nodes)}
    by_shape: dict[tuple[int, int], list[tuple[int, _BlockSlot]]] = {}
    for name, layer in tuner.mftc_layers(adapter_name):
        grid = layer.mftc_grid[adapter_name]
        offset = 0
        for block_id, width in zip(layer.block_ids(adapter_name), grid.widths(layer.block_ids(adapter_name))):
            row = index.get((name, block_id))
            if row is not None:
                slot = _BlockSlot(layer, offset, offset + width)
                by_shape.setdefault((width, grid.other_length), []).append((row, slot))
            offset += width
    groups = []
    for members in by_shape.values():
        if len(members) < 2:
            continue  # a lone block has no neighbour to coordinate with
        rows = [row for row, _ in members]
        within = affinity[np.ix_(rows, rows)].copy()
        np.fill_diagonal(within, 0.0)  # a block is not its own neighbour
        adjacency = normalized_adjacency(within)[0].toarray()  # isolated blocks get a zero row
        # On the deltas' device once, so that no training step copies it from the host (a blocking copy).
        device = members[0][1].layer.mftc_delta[adapter_name].device
        groups.append(_Group(tuple(slot for _, slot in members),
                             torch.as_tensor(adjacency, dtype=torch.float32, device=device)))
    return groups
