"""Smallest eigenpairs of the symmetric normalised Laplacian, warm-started from the previous update's eigenvectors.

The solver works on the normalised adjacency N = D^-1/2 W D^-1/2, whose largest eigenvectors are the smallest of
L = I - N, and returns eigenvalues of L in ascending order. LOBPCG converges in a few iterations from a block close
to the answer, which is what DSCA has between two EMA steps; a cold (random) start is the periodic full
recomputation. Convergence is judged on the leading `n_check` pairs only: with more eigenvectors than clusters the
trailing ones sit inside the bulk of the spectrum, where they are neither stable nor needed for k-means.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh, lobpcg
from sklearn.utils import check_random_state

logger = logging.getLogger(__name__)

_WARM_ROUND = 4  # LOBPCG iterations per round from a warm start: enough when the graph moved by one EMA step
_COLD_ROUND = 20  # per round from a random block; rounds let us stop on the leading pairs, which scipy cannot
_STALE_FACTOR = 10.0  # a warm start whose first round leaves residual > this x tol is stale: recompute from scratch
_FLOAT32_MIN_TOL = 1e-5  # sparse products run in float32 unless a tighter tolerance needs float64
_DENSE_MAX_FALLBACK = 20_000  # largest graph for a dense last-resort eigh


@dataclass(frozen=True)
class SolverInfo:
    """What the eigensolver did in one update."""

    method: str  # "dense", "lobpcg" or "eigsh" (fallback)
    warm_start: bool  # True if the accepted result came from the previous eigenvectors
    n_iter: int  # LOBPCG iterations, summed over rounds (and over a stale warm attempt); 0 for dense
    residual: float  # largest residual norm ||N u - mu u|| over the leading `n_check` pairs
    converged: bool
    residuals: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    reason: str = ""  # why a cold start or fallback happened, "" otherwise


def laplacian_eigenvectors(
    adjacency, n_components: int, *, init=None, tol: float = 1e-3, max_iter: int = 200, n_check=None,
    random_state=None,
):
    """The `n_components` smallest eigenpairs of L = I - `adjacency` (the normalised adjacency D^-1/2 W D^-1/2).

    Returns (eigenvalues of L ascending (r,), eigenvectors (m, r) with orthonormal columns and deterministic signs,
    `SolverInfo`). `init` (m, r), the previous eigenvectors, warm-starts LOBPCG; without it, or when the warm start
    turns out stale, the block starts from random vectors drawn from `random_state`.
    """
    adjacency = sp.csr_array(adjacency)
    m = adjacency.shape[0]
    if adjacency.ndim != 2 or adjacency.shape[1] != m:
        raise ValueError(f"`adjacency` must be a square matrix, got shape {adjacency.shape!r}")
    if not isinstance(n_components, (int, np.integer)) or not 1 <= n_components < m:
        raise ValueError(f"`n_components` must be an integer in 1..{m - 1}, got {n_components!r}")
    if init is not None:
        init = np.asarray(init, dtype=np.float64)
        if init.shape != (m, n_components) or not np.all(np.isfinite(init)):
            raise ValueError(f"`init` must be a finite array of shape {(m, n_components)!r}, got shape {init.shape!r}")
    if not tol > 0:
        raise ValueError(f"`tol` must be positive, got {tol!r}")
    if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive integer, got {max_iter!r}")
    n_check = n_components if n_check is None else min(int(n_check), n_components)
    return _laplacian_eigenvectors(adjacency, int(n_components), init, tol, int(max_iter), n_check,
                                   check_random_state(random_state))


def _laplacian_eigenvectors(adjacency, r, init, tol, max_iter, n_check, rs):
    m = adjacency.shape[0]
    if m <= 5 * r:  # LOBPCG needs a block much narrower than the matrix; a dense solve is cheap here anyway
        return _finish(*_dense(adjacency, r), SolverInfo("dense", False, 0, 0.0, True))
    spent, reason = 0, ""
    try:
        if init is not None:
            mu, vectors, residuals, n_iter = _lobpcg_rounds(adjacency, init, tol, max_iter, n_check, _WARM_ROUND)
            lead = float(residuals[:n_check].max())
            if lead <= _STALE_FACTOR * tol or n_iter >= max_iter:
                if lead > tol and n_iter < max_iter:  # close: keep going from here
                    mu, vectors, residuals, more = _lobpcg_rounds(
                        adjacency, vectors, tol, max_iter - n_iter, n_check, _WARM_ROUND
                    )
                    n_iter += more
                return _finish(mu, vectors, _info("lobpcg", True, n_iter, residuals, n_check, tol, ""))
            spent, reason = n_iter, f"stale warm start (residual {lead:.2e} > {_STALE_FACTOR:g} x tol)"
            logger.info("DSCA eigensolver: %s; recomputing from a random block", reason)
        start = rs.standard_normal((m, r))
        mu, vectors, residuals, n_iter = _lobpcg_rounds(adjacency, start, tol, max_iter, n_check, _COLD_ROUND)
    except (np.linalg.LinAlgError, ValueError) as error:
        return _fallback(adjacency, r, tol, rs, f"LOBPCG failed ({error})")
    info = _info("lobpcg", False, spent + n_iter, residuals, n_check, tol, reason or "cold start")
    if not np.all(np.isfinite(mu)):
        return _fallback(adjacency, r, tol, rs, "LOBPCG returned non-finite eigenvalues")
    if not info.converged:
        warnings.warn(
            f"LOBPCG did not reach tol={tol:g} in {n_iter} iterations (largest leading residual {info.residual:.2e}); "
            "using its best vectors. Raise `max_iter` or loosen `eigen_tol` if this persists.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _finish(mu, vectors, info)


def _operator(adjacency, tol):
    """N as a LinearOperator that counts its block products (one per LOBPCG iteration, plus one per round).

    Products run in float32 when the tolerance allows (half the memory traffic); LOBPCG's own algebra stays float64.
    """
    low = adjacency.astype(np.float32) if tol >= _FLOAT32_MIN_TOL else adjacency
    calls = [0]

    def matmat(block):
        calls[0] += 1
        return np.asarray(low @ block.astype(low.dtype), dtype=np.float64)

    operator = LinearOperator(adjacency.shape, matvec=matmat, matmat=matmat, dtype=np.float64)
    return operator, calls


def _lobpcg_rounds(adjacency, block, tol, max_iter, n_check, round_iter):
    """LOBPCG (largest eigenpairs of N) in rounds of `round_iter` until the leading `n_check` pairs converge."""
    operator, calls = _operator(adjacency, tol)
    n_iter = 0
    while True:
        step = min(round_iter, max_iter - n_iter)
        before = calls[0]
        with warnings.catch_warnings():
            # scipy warns at every capped round; convergence is judged and reported here instead.
            warnings.simplefilter("ignore", UserWarning)
            mu, block, history = lobpcg(
                operator, np.ascontiguousarray(block), largest=True, tol=tol, maxiter=step,
                retResidualNormsHistory=True,
            )
        residuals = np.asarray(history[-1], dtype=np.float64)
        n_iter += max(calls[0] - before - 2, 0)  # a round also multiplies its start block and its final best block
        if residuals[:n_check].max() <= tol or n_iter >= max_iter:
            return mu, block, residuals, n_iter


def _info(method, warm, n_iter, residuals, n_check, tol, reason):
    lead = float(np.max(residuals[:n_check]))
    return SolverInfo(method, warm, int(n_iter), lead, lead <= tol, residuals, reason)


def _fallback(adjacency, r, tol, rs, reason):
    warnings.warn(f"{reason}; falling back to ARPACK (eigsh)", RuntimeWarning, stacklevel=4)
    m = adjacency.shape[0]
    try:
        mu, vectors = eigsh(adjacency, k=r, which="LA", tol=tol * 1e-2, v0=rs.uniform(-1, 1, m))
    except (ArpackNoConvergence, ArpackError) as error:
        if m > _DENSE_MAX_FALLBACK:
            raise RuntimeError(f"eigensolvers failed on a {m}-node graph: {reason}; then ARPACK: {error}") from error
        warnings.warn(f"ARPACK failed too ({error}); using a dense eigh", RuntimeWarning, stacklevel=4)
        mu, vectors = _dense(adjacency, r)
        return _finish(mu, vectors, SolverInfo("dense", False, 0, 0.0, True, reason=reason))
    residuals = np.linalg.norm(adjacency @ vectors - vectors * mu, axis=0)
    return _finish(mu, vectors, _info("eigsh", False, 0, residuals, r, np.inf, reason))


def _dense(adjacency, r):
    """Largest r eigenpairs of N by a dense symmetric solver."""
    m = adjacency.shape[0]
    mu, vectors = scipy.linalg.eigh(adjacency.toarray(), subset_by_index=[m - r, m - 1])
    return mu, vectors


def _finish(mu, vectors, info):
    """Eigenvalues of L ascending, with the matching vectors sign-flipped so the largest |entry| is positive."""
    values = 1.0 - np.asarray(mu, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    vectors = np.asarray(vectors, dtype=np.float64)[:, order]
    return values[order], _sign_flip(vectors), info


def _sign_flip(vectors):
    """Deterministic signs (as scikit-learn's spectral embedding): each column's largest-magnitude entry positive."""
    pivot = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[pivot, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs
