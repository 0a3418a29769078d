"""Neighbour graphs over block signatures: kNN search, edge similarities, EMA + sparsification, normalisation.

Pure functions on numpy / scipy arrays; the DSCA estimator (`dsca.py`) keeps the state between updates. A directed
neighbour list is an int64 array `(m, c)` of node indices, -1 where a slot is empty. The public functions validate
their arguments; the private `_` twins trust them.
"""

from __future__ import annotations

import contextlib
import math
import sys

import numpy as np
import scipy.sparse as sp

SIMILARITIES = ("cosine", "gaussian")
KNN_METHODS = ("exact", "nndescent")
EXPLORE_FRACTION = 4  # a warm graph refresh samples k/4 two-hop and k/4 random candidates per node
_CHUNK = 8192  # rows per chunk for gathers: bounds the (chunk, c, d) temporaries to a few tens of MB


def default_n_neighbors(n_nodes: int) -> int:
    """Neighbours per node when `n_neighbors=None`: ceil(log2 m) + 4, capped at m - 1.

    A kNN graph then has O(m log m) edges, and k of order log m is the connectivity threshold of random geometric
    graphs, so the graph is connected with high probability while staying sparse. This is the only place the rule lives.
    """
    if n_nodes < 2:
        return 0
    return int(min(math.ceil(math.log2(n_nodes)) + 4, n_nodes - 1))


def prepare_points(signatures: np.ndarray, similarity: str) -> np.ndarray:
    """Points in which Euclidean kNN equals the similarity's kNN: unit rows for cosine (zero rows stay zero)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"`similarity` must be one of {SIMILARITIES}, got {similarity!r}")
    return _prepare_points(np.asarray(signatures, dtype=np.float64), similarity)


def _prepare_points(X: np.ndarray, similarity: str) -> np.ndarray:
    if similarity == "gaussian":
        return X
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def knn_graph(points: np.ndarray, n_neighbors: int, *, method: str = "exact", random_state: int | None = None):
    """Directed kNN lists (indices (m, k) int64, Euclidean distances (m, k)), self excluded.

    `method="exact"` is scikit-learn's brute-force search; `"nndescent"` is pynndescent (approximate; it JIT-compiles
    on first use in a process, so reserve it for graphs where exact search costs more than that).
    """
    points = np.asarray(points)
    if points.ndim != 2:
        raise ValueError(f"`points` must be a 2-D array (nodes x features), got shape {points.shape!r}")
    if not isinstance(n_neighbors, (int, np.integer)) or not 1 <= n_neighbors < points.shape[0]:
        raise ValueError(f"`n_neighbors` must be an integer in 1..{points.shape[0] - 1}, got {n_neighbors!r}")
    if method not in KNN_METHODS:
        raise ValueError(f"`method` must be one of {KNN_METHODS}, got {method!r}")
    return _knn_graph(points, int(n_neighbors), method, random_state)


def _knn_graph(points, n_neighbors, method, random_state):
    if method == "exact":
        from sklearn.neighbors import NearestNeighbors

        search = NearestNeighbors(n_neighbors=n_neighbors, algorithm="brute").fit(points)
        distances, indices = search.kneighbors()  # no query: each point's own entry is left out
        return indices.astype(np.int64), distances
    from pynndescent import NNDescent  # imported lazily: importing it is cheap, its first graph pays the JIT

    with _torch_threads_kept():
        index = NNDescent(
            points.astype(np.float32), n_neighbors=n_neighbors + 1, random_state=random_state, compressed=True
        )
        indices, distances = index.neighbor_graph
    return _drop_self(indices.astype(np.int64), distances.astype(np.float64), n_neighbors)


@contextlib.contextmanager
def _torch_threads_kept():
    """Restore torch's intra-op thread count after numba ran. Numba's OpenMP pool calls `omp_set_num_threads` on
    launch, which lands in the libgomp torch loaded, so a process set to 1 thread would train on every core from its
    first large warm-up on (NOTES 70: 2.3x slower steps with two such processes on 2 cores)."""
    torch = sys.modules.get("torch")  # graph.py stays torch-free; a process without torch has nothing to keep
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if torch is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _drop_self(indices, distances, n_neighbors):
    """Remove each row's own index (or, where duplicates hid it, the farthest entry) to keep k neighbours."""
    m = indices.shape[0]
    is_self = indices == np.arange(m)[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    is_self[np.cumsum(is_self, axis=1) > 1] = False  # at most one dropped per row
    keep = ~is_self
    return indices[keep].reshape(m, -1)[:, :n_neighbors], distances[keep].reshape(m, -1)[:, :n_neighbors]


def _explore_candidates(neighbors, n_explore, rng):
    """One sampled NN-descent round: `n_explore` neighbours-of-neighbours and `n_explore` random nodes per row.

    Used between full rebuilds of a large graph: the previous graph is the warm start, exactly as the previous
    eigenvectors are for the eigensolver, and repeated rounds over successive updates converge like NN-descent. The
    random nodes let a row find a group it has no path to yet (planted groups that change).
    """
    m, k = neighbors.shape
    rows = np.arange(m)[:, None]
    hop = neighbors[rows, rng.integers(k, size=(m, n_explore))]
    hop = np.where(hop >= 0, hop, rows)
    two_hop = neighbors[hop, rng.integers(k, size=(m, n_explore))]
    random = rng.integers(m, size=(m, n_explore))
    return np.concatenate([two_hop, random], axis=1)


def _merge_candidates(first, *others):
    """Union of neighbour lists per row: (candidates (m, c), -1 padded at the end; mask of the entries from `first`).

    Self loops and repeats are dropped; a repeat keeps the flag of its copy in `first`. Sorting packed integer keys
    (node * 2 + not-from-first) is several times faster than a stable argsort of the pair.
    """
    m = first.shape[0]
    stacked = np.concatenate((first, *others), axis=1)
    key = stacked * 2 + 1
    key[:, : first.shape[1]] -= 1
    blank_key = 2 * m + 2
    key[(stacked < 0) | (stacked == np.arange(m)[:, None])] = blank_key
    key.sort(axis=1)
    repeat = np.zeros(key.shape, dtype=bool)
    repeat[:, 1:] = (key[:, 1:] >> 1) == (key[:, :-1] >> 1)
    key[repeat] = blank_key
    key.sort(axis=1)  # blanks (the largest key) move to the end
    width = max(int((key != blank_key).sum(axis=1).max(initial=0)), 1)
    key = key[:, :width]
    blank = key == blank_key
    cand = np.where(blank, -1, key >> 1)
    return cand, ~blank & (key & 1 == 0)


def _compact(cand, mask):
    """The entries of `cand` where `mask` holds, ascending per row, -1 padded at the end to the widest row."""
    blank_key = np.iinfo(np.int64).max
    key = np.where(mask & (cand >= 0), cand, blank_key)
    key.sort(axis=1)
    width = max(int((key != blank_key).sum(axis=1).max(initial=0)), 1)
    key = key[:, :width]
    return np.where(key == blank_key, -1, key)


def _row_distances(points, cand):
    """Euclidean distances from row i to each cand[i, j]; +inf for empty (-1) slots."""
    points = points.astype(np.float32)  # the gathers dominate; float32 halves them and cos stays good to ~1e-7
    sq = np.einsum("ij,ij->i", points, points)
    safe = np.where(cand >= 0, cand, 0)
    out = np.empty(cand.shape, dtype=np.float64)
    for start in range(0, cand.shape[0], _CHUNK):
        stop = start + _CHUNK
        dots = np.matmul(points[safe[start:stop]], points[start:stop, :, None])[..., 0]  # (chunk, c)
        out[start:stop] = sq[start:stop, None] + sq[safe[start:stop]] - 2.0 * dots
    out = np.sqrt(np.maximum(out, 0.0))
    out[cand < 0] = np.inf
    return out


def _nearest_mask(distances, n_neighbors):
    """Mask of the `n_neighbors` smallest finite distances of each row."""
    if n_neighbors >= distances.shape[1]:
        return np.isfinite(distances)
    order = np.argpartition(distances, n_neighbors - 1, axis=1)[:, :n_neighbors]
    mask = np.zeros(distances.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask & np.isfinite(distances)


def _similarity(points, cand, distances, similarity, bandwidth):
    """Instantaneous similarity S(t) on the candidate edges, in [0, 1]; 0 for empty slots.

    cosine: max(cos, 0), because affinities must be non-negative and anti-correlated blocks do not belong together.
    gaussian: exp(-d^2 / (2 h^2)).
    """
    if similarity == "cosine":
        # Unit rows: cos = 1 - d^2 / 2. A zero row has no direction, so its edges are zeroed explicitly.
        sim = np.maximum(1.0 - 0.5 * distances**2, 0.0)
        zero = ~np.any(points != 0, axis=1)
        if zero.any():
            sim[zero] = 0.0
            sim[np.isin(cand, np.flatnonzero(zero))] = 0.0
    else:
        sim = np.exp(-(distances**2) / (2.0 * bandwidth**2))
    sim[cand < 0] = 0.0
    return sim


def median_bandwidth(distances: np.ndarray) -> float:
    """Median heuristic for the Gaussian bandwidth: the median of the finite, positive kNN distances (1.0 if none)."""
    d = np.asarray(distances, dtype=np.float64)
    d = d[np.isfinite(d) & (d > 0)]
    return float(np.median(d)) if d.size else 1.0


def _lookup(matrix, cand):
    """Entries matrix[i, cand[i, j]] of a CSR matrix (0 for empty slots)."""
    out = np.zeros(cand.shape, dtype=np.float64)
    if matrix is None or matrix.nnz == 0:
        return out
    valid = cand >= 0
    rows = np.broadcast_to(np.arange(cand.shape[0])[:, None], cand.shape)[valid]
    out[valid] = np.asarray(matrix[rows, cand[valid]]).ravel()
    return out


def _rank_mask(values, n_neighbors, top_p):
    """Per row: the `n_neighbors` largest values, or the fewest largest whose sum reaches share `top_p` of the row."""
    if top_p is None:
        return _nearest_mask(-values, n_neighbors)
    order = np.argsort(-values, axis=1, kind="stable")
    ranked = np.take_along_axis(values, order, axis=1)
    total = ranked.sum(axis=1, keepdims=True)
    before = np.cumsum(ranked, axis=1) - ranked  # share already reached before this entry
    mask = np.zeros(values.shape, dtype=bool)
    np.put_along_axis(mask, order, before < top_p * total, axis=1)
    return mask


def ema_affinity(previous, candidates, similarities, current, *, decay, n_neighbors=None, top_p=None):
    """One EMA + sparsification step: W(t) = decay * W(t-1) + (1 - decay) * S(t) on the candidate edges.

    `previous` is the symmetric W(t-1) (CSR, or None at the start); `candidates` (m, c) the neighbour lists on which
    S(t) was evaluated (`similarities`, same shape); `current` marks the current kNN edges among them. Edges outside
    the candidates were sparsified away before and count as 0. An edge is kept if it is among the row's top
    `n_neighbors` (or `top_p` share) by W(t) *or* a current kNN edge: otherwise a new edge, which starts at
    (1 - decay) * S, could never displace an old one decaying from W ~ S, and the labels could not follow a change.
    Returns (W(t) as a symmetric CSR array, kept neighbour lists (m, c') padded with -1).
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    similarities = np.asarray(similarities, dtype=np.float64)
    current = np.asarray(current, dtype=bool)
    if candidates.ndim != 2 or not candidates.shape == similarities.shape == current.shape:
        raise ValueError(
            f"`candidates`, `similarities` and `current` must be 2-D arrays of one shape, got {candidates.shape!r}, "
            f"{similarities.shape!r} and {current.shape!r}"
        )
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"`decay` must lie in [0, 1), got {decay!r}")
    if (n_neighbors is None) == (top_p is None):
        raise ValueError(f"exactly one of `n_neighbors` and `top_p` must be given, got {n_neighbors!r} and {top_p!r}")
    return _ema_affinity(previous, candidates, similarities, current, decay, n_neighbors, top_p)


def _ema_affinity(previous, cand, sim, current, decay, n_neighbors, top_p):
    weights = decay * _lookup(previous, cand) + (1.0 - decay) * sim
    weights[cand < 0] = 0.0
    keep = (_rank_mask(weights, n_neighbors, top_p) | current) & (weights > 0)
    m = cand.shape[0]
    rows = np.broadcast_to(np.arange(m)[:, None], cand.shape)[keep]
    directed = sp.csr_array((weights[keep], (rows, cand[keep])), shape=(m, m))
    # Union symmetrisation: an edge kept by either endpoint stays. Both directions carry the same weight (S and
    # W(t-1) are symmetric), so the maximum is just that weight.
    affinity = directed.maximum(directed.T).tocsr()
    affinity.sort_indices()
    return affinity, _compact(cand, keep)  # the kept lists are W(t)'s memory for the next update's candidates


def normalized_adjacency(affinity) -> tuple[sp.csr_array, np.ndarray]:
    """D^-1/2 W D^-1/2 and the degrees. Isolated nodes (degree 0) get a zero row, i.e. Laplacian eigenvalue 1.

    The symmetric normalised Laplacian is L = I - D^-1/2 W D^-1/2; its smallest eigenvectors are this matrix's largest.
    """
    affinity = sp.csr_array(affinity)
    if affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"`affinity` must be square, got shape {affinity.shape!r}")
    return _normalized_adjacency(affinity)


def _normalized_adjacency(affinity):
    degrees = np.asarray(affinity.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(degrees)
    np.divide(1.0, np.sqrt(degrees), out=inv_sqrt, where=degrees > 0)
    # Scale the stored entries in place of two sparse products: w_ij / sqrt(d_i d_j).
    rows = np.repeat(np.arange(affinity.shape[0]), np.diff(affinity.indptr))
    data = affinity.data * inv_sqrt[rows] * inv_sqrt[affinity.indices]
    scaled = sp.csr_array((data, affinity.indices.copy(), affinity.indptr.copy()), shape=affinity.shape)
    return scaled, degrees


def laplacian_dense(affinity) -> np.ndarray:
    """Dense symmetric normalised Laplacian I - D^-1/2 W D^-1/2: an oracle for small graphs (tests, diagnostics)."""
    adjacency, _ = normalized_adjacency(affinity)
    return np.eye(adjacency.shape[0]) - adjacency.toarray()


def update_affinity(
    points, previous, knn, kept, *, n_neighbors: int, exact: bool, rebuild: bool, random_state, explore_rng,
    similarity: str, bandwidth, decay: float, top_p,
):
    """One DSCA graph step on prepared `points`: candidate neighbours, S(t) on them, EMA with the `previous`
    affinity W(t-1), sparsification. Returns (affinity, knn, kept) for the next step.

    Candidates come from a fresh kNN search (exact when `exact`, else pynndescent) when `rebuild`, `exact` or there
    is no previous `knn`; otherwise from the previous neighbours, their neighbours and random nodes (`explore_rng`),
    cut back to the `n_neighbors` nearest. The edges `kept` last time always stay candidates, so the EMA can decay
    them instead of dropping them at once.
    """
    previous_kept = () if kept is None else (kept,)
    if exact or rebuild or knn is None:
        method = "exact" if exact else "nndescent"
        found, _ = _knn_graph(points, n_neighbors, method, random_state.randint(np.iinfo(np.int32).max))
        cand, current = _merge_candidates(found, *previous_kept)
        distances = _row_distances(points, cand)
    else:
        explored = _explore_candidates(knn, max(n_neighbors // EXPLORE_FRACTION, 2), explore_rng)
        cand, _ = _merge_candidates(knn, explored, *previous_kept)
        distances = _row_distances(points, cand)
        current = _nearest_mask(distances, n_neighbors)
    knn = _compact(cand, current)
    bandwidth = bandwidth or median_bandwidth(distances[current])
    sim = _similarity(points, cand, distances, similarity, bandwidth)
    affinity, kept = _ema_affinity(
        previous, cand, sim, current, float(decay), None if top_p else n_neighbors, top_p
    )
    return affinity, knn, kept
