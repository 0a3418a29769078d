"""What a low-rank part cannot learn: a gradient without its top singular directions (`block_energy`).

Next to a rank-r part on every weight (`MFTCConfig.low_rank`), a block is worth training for the part of the gradient
that the part does not already follow. LoRA-style updates move fastest along the gradient's leading singular
directions, so with `block_energy="outside_low_rank"` the warm-up scores blocks by the energy of each micro-batch's
gradient after removing its best rank-r approximation. The top directions are estimated with the randomised range
finder of Halko, Martinsson and Tropp (SIAM Review 2011, algorithms 4.4 and 5.1): a fixed Gaussian probe, a few power
iterations, and one small SVD, so the cost per weight is a handful of (out x in) x (in x (r + 8)) products.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK_ENERGIES = ("total", "outside_low_rank")
OVERSAMPLING = 8  # extra probe columns: the range finder's error bound needs a few beyond the rank (Halko et al. 4.2)
POWER_ITERATIONS = 2  # sharpen the estimate where the spectrum decays slowly (Halko et al. 4.5)


def gaussian_probe(columns: int, rank: int, seed: int) -> torch.Tensor:
    """A fixed (columns x k) standard normal test matrix, k = rank + OVERSAMPLING capped at `columns`; from its own
    numpy Generator, so estimating directions never moves torch's random state (data order, dropout, init)."""
    width = min(rank + OVERSAMPLING, columns)
    rng = np.random.default_rng([seed, columns, rank])
    return torch.from_numpy(rng.standard_normal((columns, width)).astype(np.float32))


def without_top_directions(matrix: torch.Tensor, rank: int, probe: torch.Tensor) -> torch.Tensor:
    """`matrix` (float, m x n) minus its projection onto its (estimated) top-`rank` left singular directions, i.e.
    minus its best rank-`rank` approximation; all zeros when `rank` reaches the matrix's smaller side, `matrix` itself
    when `rank` is 0. `probe` is `gaussian_probe(n, rank, seed)` on the matrix's device."""
    if rank <= 0:
        return matrix
    if rank >= min(matrix.shape):
        return torch.zeros_like(matrix)
    basis = torch.linalg.qr(matrix @ probe).Q  # (m, k): an orthonormal basis of the sampled range
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix @ (matrix.T @ basis)).Q
    small_left, _, _ = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    top = basis @ small_left[:, :rank]  # (m, rank)
    return matrix - top @ (top.T @ matrix)
