"""Linear (additive) performance predictor over architectures: one candidate per node.

An architecture's accuracy (or loss) is predicted as the base network's value plus, per node, the delta of the
candidate chosen there; candidate 0 ("none") contributes 0. The deltas come either from probes that measure each
candidate on its own (`ProbeResult` records -> `models_from_probes`) or from a least-squares fit to architectures
measured jointly (`fit_additive_model`, the "regression" probe kind). `predictor_fidelity` scores predictions against
measurements; `sample_architectures` draws distinct random architectures for fitting and validation.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import mean_absolute_error, r2_score

from .checks import check_number, check_rng

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    """What one probe measured for one candidate, relative to the base network N_e (only the head trained).

    Deltas are "candidate minus base": a helpful candidate has `accuracy_delta` > 0 and `loss_delta` < 0. Spreads are
    standard deviations over the probe's repeats (0 when it ran once or has no notion of repeats).
    """

    node: int
    candidate: int
    accuracy_delta: float
    loss_delta: float
    accuracy_spread: float = 0.0
    loss_spread: float = 0.0
    n_repeats: int = 1


@dataclass(frozen=True)
class AdditiveModel:
    """`predict(arch) = base + sum_i deltas[i][arch[i]]`, with `deltas[i][0] == 0` for "none".

    `spread[i][c]` is the uncertainty of `deltas[i][c]` (probe spread, or the standard error of a fitted
    coefficient); None when unknown.
    """

    base: float
    deltas: tuple[np.ndarray, ...]
    spread: tuple[np.ndarray, ...] | None = None

    @property
    def n_candidates_per_node(self) -> tuple[int, ...]:
        return tuple(d.size for d in self.deltas)

    def predict(self, architectures) -> np.ndarray:
        """Predictions for an (n, nodes) integer array of chosen candidate indices (or a single architecture)."""
        arch = _check_architectures(architectures, self.n_candidates_per_node)
        return self.base + sum(d[arch[:, i]] for i, d in enumerate(self.deltas))


@dataclass(frozen=True)
class Fidelity:
    """Agreement of predicted with measured values: Spearman rank correlation (and its p-value), MAE, R^2."""

    spearman: float
    spearman_pvalue: float
    mae: float
    r2: float
    n: int


# ------------------------------------------------------------------------------------------------------------ helpers
def _check_counts(n_candidates_per_node) -> tuple[int, ...]:
    counts = tuple(n_candidates_per_node)
    if not counts or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 for k in counts):
        raise ValueError(
            f"`n_candidates_per_node` must be a non-empty sequence of positive integers, got {n_candidates_per_node!r}"
        )
    return tuple(int(k) for k in counts)


def _check_architectures(architectures, counts: Sequence[int]) -> np.ndarray:
    arch = np.asarray(architectures)
    if arch.ndim == 1:
        arch = arch[None, :]
    if arch.ndim != 2 or arch.shape[1] != len(counts) or not np.issubdtype(arch.dtype, np.integer):
        raise ValueError(
            f"`architectures` must be an integer array of shape (n, {len(counts)}) (one candidate index per node), "
            f"got shape {arch.shape} and dtype {arch.dtype}"
        )
    bad = (arch < 0) | (arch >= np.asarray(counts))
    if bad.any():
        row, node = map(int, np.argwhere(bad)[0])
        raise ValueError(
            f"`architectures` indices must lie in 0..n_candidates-1 per node, got {int(arch[row, node])} at "
            f"row {row}, node {node} (which has {counts[node]} candidates)"
        )
    return arch


def _check_vector(values, name: str, n: int | None = None) -> np.ndarray:
    out = np.asarray(values, dtype=float)
    if out.ndim != 1 or (n is not None and out.size != n) or not np.all(np.isfinite(out)):
        want = "a finite 1-D array" + ("" if n is None else f" of length {n}")
        raise ValueError(f"`{name}` must be {want}, got shape {out.shape}: {values!r}")
    return out


# -------------------------------------------------------------------------------------------------------- from probes
def models_from_probes(
    results: Iterable[ProbeResult],
    n_candidates_per_node: Sequence[int],
    *,
    base_accuracy: float,
    base_loss: float,
) -> tuple[AdditiveModel, AdditiveModel]:
    """Accuracy and loss models from one probe per candidate. "none" (candidate 0) needs no probe and gets 0.

    Every other candidate must be probed exactly once; a missing or repeated record raises, because a silent 0 would
    read as "no effect" to the search.
    """
    counts = _check_counts(n_candidates_per_node)
    tables = {k: [np.zeros(c) for c in counts] for k in ("acc", "loss", "acc_sd", "loss_sd")}
    seen = [np.zeros(c, dtype=bool) for c in counts]
    for r in results:
        if not (0 <= r.node < len(counts) and 1 <= r.candidate < counts[r.node]):
            raise ValueError(
                f"probe result for node {r.node}, candidate {r.candidate} lies outside the search space "
                f"(nodes 0..{len(counts) - 1}; candidates 1..n-1, 0 is 'none')"
            )
        if seen[r.node][r.candidate]:
            raise ValueError(f"candidate {r.candidate} of node {r.node} has more than one probe result")
        seen[r.node][r.candidate] = True
        for key, value in zip(tables, (r.accuracy_delta, r.loss_delta, r.accuracy_spread, r.loss_spread)):
            tables[key][r.node][r.candidate] = value
    missing = [(i, int(c)) for i, s in enumerate(seen) for c in np.flatnonzero(~s[1:]) + 1]
    if missing:
        raise ValueError(f"every candidate except 'none' needs a probe result; missing (node, candidate): {missing!r}")
    freeze = lambda key: tuple(tables[key])  # noqa: E731
    return (
        AdditiveModel(float(base_accuracy), freeze("acc"), freeze("acc_sd")),
        AdditiveModel(float(base_loss), freeze("loss"), freeze("loss_sd")),
    )


# -------------------------------------------------------------------------------------------------------- regression
def _design(arch: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """One-hot design with "none" as each node's reference level: column per (node, candidate >= 1)."""
    offsets = np.concatenate([[0], np.cumsum([c - 1 for c in counts])])
    x = np.zeros((arch.shape[0], int(offsets[-1])))
    for i, c in enumerate(counts):
        chosen = arch[:, i] > 0
        x[np.flatnonzero(chosen), offsets[i] + arch[chosen, i] - 1] = 1.0
    return x


def fit_additive_model(
    architectures,
    measured,
    *,
    n_candidates_per_node: Sequence[int] | None = None,
    alpha: float = 1e-6,
) -> AdditiveModel:
    """Least-squares decomposition of jointly measured architectures into per-candidate effects.

    Fits measured ~ base + sum_i delta_i[arch_i] with "none" as the reference level. A ridge penalty `alpha` on the
    deltas (not the base) is added because random architectures rarely pin every effect down: a candidate never (or
    only collinearly) sampled gets a delta shrunk to 0, i.e. "no evidence of an effect", rather than an arbitrary
    huge value the search would then chase. The default is small enough that an exactly additive truth with a
    full-rank design is recovered to ~1e-6. Candidates absent from the sample trigger a warning.

    The returned `spread` holds each delta's standard error (residual variance x diag of the inverse normal matrix)
    when there are more architectures than coefficients, else it is None.
    """
    alpha = check_number("alpha", alpha, minimum=0, allow_inf=False)
    arch = np.asarray(architectures)
    if n_candidates_per_node is None:
        if arch.ndim != 2 or arch.size == 0:
            raise ValueError(f"`architectures` must be a non-empty 2-D integer array, got shape {arch.shape}")
        n_candidates_per_node = (arch.max(axis=0) + 1).tolist()
    counts = _check_counts(n_candidates_per_node)
    arch = _check_architectures(arch, counts)
    y = _check_vector(measured, "measured", arch.shape[0])
    return _fit_additive_model(arch, y, counts, float(alpha))


def _fit_additive_model(arch: np.ndarray, y: np.ndarray, counts: Sequence[int], alpha: float) -> AdditiveModel:
    x = np.hstack([np.ones((arch.shape[0], 1)), _design(arch, counts)])
    unseen = np.flatnonzero(x[:, 1:].sum(axis=0) == 0)
    if unseen.size:
        warnings.warn(f"{unseen.size} candidate(s) never appear in the sampled architectures; their deltas are 0")
    # Ridge as an augmented least-squares system; row 0 of the penalty is zero so the base is not shrunk.
    penalty = math.sqrt(alpha) * np.eye(x.shape[1])
    penalty[0, 0] = 0.0
    coef, *_ = np.linalg.lstsq(np.vstack([x, penalty]), np.r_[y, np.zeros(x.shape[1])], rcond=None)
    dof = x.shape[0] - x.shape[1]
    stderr = None
    if dof > 0:
        residual = y - x @ coef
        normal = x.T @ x + alpha * np.diag(np.r_[0.0, np.ones(x.shape[1] - 1)])
        variance = float(residual @ residual) / dof
        stderr = np.sqrt(np.maximum(np.diag(np.linalg.pinv(normal)), 0) * variance)
    offsets = np.concatenate([[1], 1 + np.cumsum([c - 1 for c in counts])])
    split = lambda v: tuple(np.r_[0.0, v[a:b]] for a, b in zip(offsets[:-1], offsets[1:]))  # noqa: E731
    logger.info("fitted additive model: %d architectures, %d coefficients", x.shape[0], x.shape[1])
    return AdditiveModel(float(coef[0]), split(coef), None if stderr is None else split(stderr))


# ---------------------------------------------------------------------------------------------------------- sampling
def sample_architectures(n_candidates_per_node: Sequence[int], n: int, rng) -> np.ndarray:
    """`n` distinct architectures, an (n, nodes) int64 array, drawn with a numpy Generator (or an integer seed).

    Draws are balanced per node (each candidate appears about n / n_candidates times, in a random order), which
    keeps every effect identifiable for `fit_additive_model`; rows that repeat an earlier one are redrawn uniformly.
    """
    counts = _check_counts(n_candidates_per_node)
    total = math.prod(counts)
    if not (isinstance(n, numbers.Integral) and not isinstance(n, bool) and 0 <= n <= total):
        raise ValueError(f"`n` must be an integer in 0..{total} (the number of distinct architectures), got {n!r}")
    return _sample_architectures(counts, int(n), check_rng("rng", rng))


def _sample_architectures(counts: Sequence[int], n: int, rng: np.random.Generator) -> np.ndarray:
    if n == 0:
        return np.zeros((0, len(counts)), dtype=np.int64)
    if n > math.prod(counts) // 2:
        # Dense request: rejection would stall, so pick n of all architectures (the count is small here).
        flat = rng.choice(math.prod(counts), size=n, replace=False)
        return np.stack(np.unravel_index(flat, counts), axis=1).astype(np.int64)
    arch = np.stack([rng.permutation(np.arange(n) % c) for c in counts], axis=1).astype(np.int64)
    _, first = np.unique(arch, axis=0, return_index=True)
    rows = [tuple(r) for r in arch[np.sort(first)]]
    seen = set(rows)
    while len(rows) < n:
        row = tuple(int(rng.integers(c)) for c in counts)
        if row not in seen:
            seen.add(row)
            rows.append(row)
    return np.array(rows, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------- fidelity
def predictor_fidelity(predicted, measured) -> Fidelity:
    """Spearman rank correlation, mean absolute error and R^2 (`sklearn.metrics.r2_score`) of predictions.

    Spearman is NaN (with scipy's warning) when either side is constant: a ranking cannot be judged then.
    """
    p = _check_vector(predicted, "predicted")
    m = _check_vector(measured, "measured", p.size)
    if p.size < 2:
        raise ValueError(f"`predicted` and `measured` must hold at least 2 values, got {p.size}")
    rho, pvalue = spearmanr(p, m)
    return Fidelity(
        spearman=float(rho),
        spearman_pvalue=float(pvalue),
        mae=float(mean_absolute_error(m, p)),
        r2=float(r2_score(m, p)),
        n=int(p.size),
    )
