"""Probes: estimates of each candidate's effect, returned as `ProbeResult` records for the additive predictor.

Three kinds (see the issue "Module search"):

- "taylor" (here): a first-order estimate from per-block gradient statistics, no extra forward/backward passes. The
  statistics come from the warm-up's measurement (`mftc_peft.measure.measure_blocks`).
- "finetune" (`finetune_probe`, probes_finetune.py): train the head plus one candidate at a time, against the head
  alone; the model is restored exactly after every probe (`preserved_state`).
- "regression" (`regression_probe`, probes_finetune.py): train random architectures jointly and fit the additive
  model by least squares.

Taylor estimate. One SGD step of size `lr` on the blocks C of a candidate moves the weights by -lr * gbar_C (gbar: the
mean warm-up gradient), so to first order the loss changes by

    b^L(C) = -lr * sum_{b in C} ||gbar_b||^2.

With per-micro-batch projections p_b(t) = <g_b(t), gbar_b>, whose mean over t is exactly ||gbar_b||^2, the spread is
the standard error of that mean: lr * std_t(sum_{b in C} p_b(t)) / sqrt(T). Inner-product-preserving sketches of the
block gradients (e.g. random projections) give the same quantities approximately, so signatures can stand in for the
gradients themselves.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import sparse

from .checks import check_positive_number
from .predictor import ProbeResult
from .search import SearchSpace

logger = logging.getLogger(__name__)

PROBES = ("taylor", "finetune", "regression")  # "taylor" here; the others in probes_finetune.py
BLOCK_SCORES = ("energy", "consistency")  # what a block's taylor gain measures (`consistency_projections`)



def gradient_projections(block_gradients) -> np.ndarray:
    """(T, blocks) projections p_b(t) = <g_b(t), gbar_b> from (T, blocks, d) per-micro-batch block gradients (or
    their sketches), gbar being the mean over the T micro-batches. Blocks of different sizes may be zero-padded to a
    common d: padding adds nothing to an inner product."""
    g = np.asarray(block_gradients, dtype=float)
    if g.ndim != 3 or g.shape[0] < 1 or not np.all(np.isfinite(g)):
        raise ValueError(
            f"`block_gradients` must be a finite array of shape (micro-batches, blocks, d), got shape {g.shape}"
        )
    return np.einsum("tbd,bd->tb", g, g.mean(axis=0))


def consistency_projections(projections, energy) -> np.ndarray:
    """The projections rescaled so that a block's taylor gain is its gradient consistency, not its magnitude.

    Each column p_b(t) is divided by the block's mean squared gradient per micro-batch, e_b / T, so that its mean
    over t becomes ||gbar_b||^2 / mean_t ||g_b(t)||^2 in [0, 1]: 1 when every micro-batch pushes the block the same
    way, about 1/T for noise. A candidate's gain is then the sum of its blocks' consistencies: the search prefers
    many consistent blocks over a few large-gradient ones (the "largest gradient" rule loses to random selections in
    published ablations and in NOTES.md). Blocks without gradient get 0.
    """
    p = np.asarray(projections, dtype=float)
    e = np.asarray(energy, dtype=float)
    if p.ndim != 2 or e.shape != (p.shape[1],) or np.any(e < 0):
        raise ValueError(
            f"`energy` must be a non-negative array with one value per projection column ({p.shape[-1]}), "
            f"got shape {e.shape}"
        )
    per_batch = e / p.shape[0]
    safe = np.where(per_batch > 0, per_batch, 1.0)
    return np.where(per_batch > 0, p / safe, 0.0)


def taylor_probe(space: SearchSpace, projections, *, lr: float) -> list[ProbeResult]:
    """First-order ("taylor") probe of every candidate of `space` except "none".

    Parameters
    ----------
    space : SearchSpace
        Candidates refer to rows of the block table; `projections` has one column per row.
    projections : array of shape (T, blocks)
        p_b(t) = <g_b(t), gbar_b> per micro-batch t (see `gradient_projections`).
    lr : float
        Step size of the hypothetical SGD step; it scales deltas and spreads alike, so it does not change rankings.

    Returns one `ProbeResult` per candidate: `loss_delta` = -lr * sum ||gbar_b||^2 (<= 0), `loss_spread` its standard
    error over micro-batches (0 when T = 1). There is no first-order accuracy estimate, so `accuracy_delta` carries the
    predicted loss decrease (-loss_delta) as a gain proxy in loss units, with the same spread.
    """
    if not isinstance(space, SearchSpace):
        raise ValueError(f"`space` must be a SearchSpace, got {type(space).__name__}")
    p = np.asarray(projections, dtype=float)
    n_rows = 1 + max((r for node in space.nodes for c in node.candidates for r in c.rows), default=-1)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < n_rows or not np.all(np.isfinite(p)):
        raise ValueError(
            f"`projections` must be a finite array of shape (micro-batches, blocks) with at least {n_rows} block "
            f"columns (the rows the candidates use), got shape {p.shape}"
        )
    return _taylor_probe(space, p, check_positive_number("lr", lr))


def _taylor_probe(space: SearchSpace, p: np.ndarray, lr: float) -> list[ProbeResult]:
    keys = [(i, c) for i, node in enumerate(space.nodes) for c in range(1, len(node.candidates))]
    if not keys:
        return []
    rows = [space.nodes[i].candidates[c].rows for i, c in keys]
    block = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
    candidate = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    membership = sparse.csr_matrix((np.ones(block.size), (block, candidate)), shape=(p.shape[1], len(rows)))
    per_batch = np.asarray(membership.T @ p.T).T  # (T, candidates): sum over the candidate's blocks
    t = p.shape[0]
    decrease = lr * per_batch.mean(axis=0)
    spread = lr * per_batch.std(axis=0, ddof=1) / math.sqrt(t) if t > 1 else np.zeros(len(rows))
    logger.info("taylor probe: %d candidates from %d micro-batches, no extra passes", len(rows), t)
    return [
        ProbeResult(i, c, float(d), float(-d), accuracy_spread=float(s), loss_spread=float(s), n_repeats=t)
        for (i, c), d, s in zip(keys, decrease, spread)
    ]
