"""`block_energy="outside_low_rank"`: block energies of what a rank-r low-rank part would not learn (`residual.py`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_low_rank_share import make, per_rank_elements
from test_warmup import token_batches
from torch import nn

import mftc_peft
from mftc_peft import MFTCConfig
from mftc_peft.blocks import BlockGrid
from mftc_peft.residual import gaussian_probe, without_top_directions
from mftc_peft.signatures import SignatureCollector


def decaying_matrix(rows=40, cols=30, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator))
    return left @ torch.diag(0.6 ** torch.arange(cols, dtype=torch.float32)) @ right.T


@pytest.mark.parametrize("rank", [1, 4])
def test_it_removes_the_best_rank_r_approximation(rank):
    matrix = decaying_matrix()
    left, values, right = torch.linalg.svd(matrix, full_matrices=False)
    expected = matrix - left[:, :rank] @ torch.diag(values[:rank]) @ right[:rank]
    got = without_top_directions(matrix, rank, gaussian_probe(matrix.shape[1], rank, seed=3))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_edges_and_the_probe_leave_torch_random_state_alone():
    matrix = decaying_matrix(6, 5)
    assert without_top_directions(matrix, 0, gaussian_probe(5, 0, 0)) is matrix
    assert not without_top_directions(matrix, 5, gaussian_probe(5, 5, 0)).any()
    state = torch.get_rng_state()
    first, second = gaussian_probe(30, 4, seed=1), gaussian_probe(30, 4, seed=1)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(first, second) and first.shape == (30, 12)


def test_the_collector_ranks_blocks_by_what_the_top_directions_leave():
    # Block 0 of four 4-row blocks holds a large rank-1 gradient, block 3 a small full-rank one: by total energy
    # block 0 leads; outside the top direction only block 3's gradient is left.
    weight = nn.Parameter(torch.zeros(16, 8))
    generator = torch.Generator().manual_seed(0)
    target = torch.zeros(16, 8)
    target[:4] = 10.0 * torch.outer(torch.randn(4, generator=generator), torch.randn(8, generator=generator))
    target[12:] = torch.randn(4, 8, generator=generator)
    grid = BlockGrid("out", in_features=8, out_features=16, width=4)

    def energies(rank):
        collector = SignatureCollector({"w": (weight, grid, False)}, window=2, residual_rank=rank)
        with collector:
            for _ in range(2):
                (weight * target).sum().backward()  # the gradient is `target`
                collector.end_micro_batch()
        return collector.block_energy()

    total, outside = energies(0), energies(1)
    assert np.argmax(total) == 0 and np.argmax(outside) == 3
    assert outside[0] < 1e-6 * total[0] and outside[3] > 0.5 * total[3]


def test_the_warmup_measures_outside_the_low_rank_part():
    per_rank, _ = per_rank_elements()

    def energy_per_weight(block_energy):
        model = make(budget=8 * per_rank, low_rank_share=0.5, block_energy=block_energy, init_weights=True)
        table = mftc_peft.measure_blocks(model, token_batches(4, causal=True)).table
        names = sorted(set(table.module_names))
        return np.array([table.energy[np.asarray(table.module_names) == name].sum() for name in names])

    # Removing a projection can only shrink each weight's whole gradient (not every row group of it)
    total, outside = energy_per_weight("total"), energy_per_weight("outside_low_rank")
    assert np.all(outside <= total * (1 + 1e-4) + 1e-12) and np.sum(outside) < 0.9 * np.sum(total)


def test_it_needs_a_low_rank_part():
    with pytest.raises(ValueError, match=r"`block_energy='outside_low_rank'`.*low_rank=0 and low_rank_share=0"):
        MFTCConfig(block_energy="outside_low_rank", low_rank_share=0)
    with pytest.raises(ValueError, match=r"`block_energy` must be one of .*got 'residual'"):
        MFTCConfig(block_energy="residual")
