"""Diagnostics of a spectral clustering over time: energy concentration, label agreement, subspace drift, eigengap.

Pure functions on arrays, used by DSCA's per-update `history_` and by the report layer (`diagnostics.py`).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def energy_concentration(signals, basis) -> np.ndarray:
    """kappa(1..r): share of the energy of `signals` (m,) or (m, d) inside the span of the first j columns of `basis`.

    With `basis` the DSCA embedding (the r smoothest Laplacian eigenvectors, orthonormal columns), kappa(r) near 1
    says the gradient signal lives on the module structure; near r / m says it is spread like noise.
    """
    signals = np.asarray(signals, dtype=np.float64)
    basis = np.asarray(basis, dtype=np.float64)
    if basis.ndim != 2 or signals.ndim not in (1, 2) or basis.shape[0] != signals.shape[0]:
        raise ValueError(
            f"`signals` (m,) or (m, d) and `basis` (m, r) must share m rows, got {signals.shape!r} and {basis.shape!r}"
        )
    if signals.ndim == 1:
        signals = signals[:, None]
    total = float(np.sum(signals**2))
    if total == 0.0:
        raise ValueError("`signals` must not be all zero (its energy is the denominator of kappa)")
    q, _ = np.linalg.qr(basis)  # orthonormalise: the embedding is already, any other basis need not be
    captured = np.sum((q.T @ signals) ** 2, axis=1)  # energy per basis direction, (r,)
    return np.cumsum(captured) / total


def label_agreement(labels, previous) -> dict:
    """Adjusted Rand index and normalised mutual information between two labellings of the same nodes."""
    labels, previous = np.asarray(labels), np.asarray(previous)
    if labels.shape != previous.shape or labels.ndim != 1:
        raise ValueError(
            f"`labels` and `previous` must be 1-D of one length, got {labels.shape!r} and {previous.shape!r}"
        )
    return {
        "ari": float(adjusted_rand_score(previous, labels)),
        "nmi": float(normalized_mutual_info_score(previous, labels)),
    }


def subspace_drift(current, previous) -> float:
    """Largest principal angle (radians) between the column spaces of two embeddings (m, r): 0 = same subspace.

    Insensitive to the sign flips and rotations that eigensolvers are free to make within a degenerate eigenspace.
    Computed from the singular values of Q1^T Q2 (thin QR bases): O(m r^2), unlike `scipy.linalg.subspace_angles`,
    which takes SVDs of the tall matrices; angles below ~1e-7 round to 0, which is fine for a drift measure.
    """
    current, previous = np.asarray(current, dtype=np.float64), np.asarray(previous, dtype=np.float64)
    if current.ndim != 2 or previous.ndim != 2 or current.shape[0] != previous.shape[0]:
        raise ValueError(
            f"`current` and `previous` must be 2-D with the same rows, got {current.shape!r} and {previous.shape!r}"
        )
    q1, q2 = np.linalg.qr(current)[0], np.linalg.qr(previous)[0]
    cosines = np.linalg.svd(q1.T @ q2, compute_uv=False)
    return float(np.arccos(np.clip(cosines.min(), -1.0, 1.0)))


def eigengap(eigenvalues, n_clusters: int) -> float:
    """lambda_{k+1} - lambda_k of the Laplacian (ascending eigenvalues, k = n_clusters); NaN if fewer than k+1 known.

    A large gap relative to lambda_k says the graph really has k modules.
    """
    values = np.asarray(eigenvalues, dtype=np.float64)
    if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
        raise ValueError(f"`n_clusters` must be a positive integer, got {n_clusters!r}")
    if values.size <= n_clusters:
        return float("nan")
    return float(values[n_clusters] - values[n_clusters - 1])
