"""From a spectral embedding to the module library: k-means, size bounds, stable label ids, module records.

Pure functions; `DynamicSpectralClustering` (dsca.py) calls them once per update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.preprocessing import normalize
from sklearn.utils import check_random_state

_SMALL_GRAPH = 10_000  # above this many nodes k-means++ restarts run on a sample of this size (k-means is O(m k r))
_RESTARTS = 3


@dataclass(frozen=True)
class Module:
    """One module of the library: a set of blocks (nodes) that DSCA found moving together."""

    label: int
    nodes: np.ndarray  # node indices (rows of the signatures / `collector.nodes`), ascending int64
    n_params: int | None  # sum of `node_sizes` over the nodes, if sizes were given
    mean_energy: float | None  # mean of `node_energy` over the nodes, if energies were given
    stability: float | None  # Jaccard overlap with the previous update's module of the same label (None at first)

    @property
    def size(self) -> int:
        return int(self.nodes.size)


def cluster_embedding(
    embedding, n_clusters: int, *, previous_labels=None, fresh=True, min_size: int = 1, max_size=None,
    random_state=None,
):
    """Labels for the rows of a spectral embedding (m, r): k-means on unit rows, size bounds, ids aligned to before.

    A Lloyd run started from the centroids of `previous_labels` (the previous update's modules, measured in the new
    embedding) is compared with k-means++ and the lower inertia wins; on large graphs (> 10,000 nodes) k-means++ only
    runs when `fresh` (a reset update) or when there is nothing to warm-start from, as the eigensolver does.
    Clusters below `min_size` nodes are merged into the nearest centroid, clusters above `max_size` halved along their
    principal direction. Label ids are matched to `previous_labels` (Hungarian assignment on the overlap) so a module
    keeps its id while it persists.
    """
    embedding = np.asarray(embedding, dtype=np.float64)
    if embedding.ndim != 2 or not np.all(np.isfinite(embedding)):
        raise ValueError(f"`embedding` must be a finite 2-D array, got shape {embedding.shape!r}")
    m = embedding.shape[0]
    if not isinstance(n_clusters, (int, np.integer)) or not 1 <= n_clusters <= m:
        raise ValueError(f"`n_clusters` must be an integer in 1..{m}, got {n_clusters!r}")
    if previous_labels is not None:
        previous_labels = np.asarray(previous_labels)
        if previous_labels.shape != (m,):
            raise ValueError(f"`previous_labels` must have shape {(m,)!r}, got {previous_labels.shape!r}")
    if max_size is not None and max_size < 2 * min_size:
        raise ValueError(f"`max_size` must be at least 2 * min_size = {2 * min_size}, got {max_size!r}")
    return _cluster_embedding(embedding, int(n_clusters), previous_labels, fresh, min_size, max_size, random_state)


def _cluster_embedding(embedding, n_clusters, previous_labels, fresh, min_size, max_size, random_state):
    points = normalize(embedding)  # Ng-Jordan-Weiss: unit rows
    labels = _kmeans(points, n_clusters, previous_labels, fresh, random_state)
    labels = _merge_small(points, labels, min_size)
    if max_size is not None:
        labels = _split_large(points, labels, max_size)
    return _align(labels, previous_labels)


def _kmeans(points, n_clusters, previous_labels, fresh, random_state):
    warm = None
    if previous_labels is not None:
        ids, centroids = _centroids(points, previous_labels)
        if ids.size == n_clusters:
            warm = KMeans(n_clusters, init=centroids, n_init=1).fit(points)
    small = points.shape[0] <= _SMALL_GRAPH
    if warm is not None and not fresh and not small:
        return warm.labels_.astype(np.int64)
    if small:
        best = KMeans(n_clusters, n_init=_RESTARTS, random_state=random_state).fit(points)
    else:
        # k-means++ restarts on a sample pick the starting centroids, one Lloyd run on all rows finishes: a single
        # k-means++ draw on a large graph too often lands in a local optimum that merges two modules.
        rs = check_random_state(random_state)
        sample = points[rs.choice(points.shape[0], _SMALL_GRAPH, replace=False)]
        seeds = KMeans(n_clusters, n_init=_RESTARTS, random_state=rs).fit(sample).cluster_centers_
        best = KMeans(n_clusters, init=seeds, n_init=1).fit(points)
    if warm is not None and warm.inertia_ <= best.inertia_:
        best = warm
    return best.labels_.astype(np.int64)


def _centroids(points, labels):
    ids = np.unique(labels)
    return ids, np.stack([points[labels == i].mean(axis=0) for i in ids])


def _merge_small(points, labels, min_size):
    """Fold the smallest cluster below `min_size` into the cluster with the nearest centroid, until none is left."""
    labels = labels.copy()
    while True:
        ids, counts = np.unique(labels, return_counts=True)
        if ids.size < 2 or counts.min() >= min_size:
            return labels
        small = ids[np.argmin(counts)]
        ids, centres = _centroids(points, labels)
        distance = np.linalg.norm(centres - centres[ids == small], axis=1)
        distance[ids == small] = np.inf
        labels[labels == small] = ids[np.argmin(distance)]


def _split_large(points, labels, max_size):
    """Halve clusters above `max_size` at the median of their principal direction (both halves stay >= min_size)."""
    labels = labels.copy()
    while True:
        ids, counts = np.unique(labels, return_counts=True)
        if counts.max() <= max_size:
            return labels
        members = np.flatnonzero(labels == ids[np.argmax(counts)])
        centred = points[members] - points[members].mean(axis=0)
        direction = np.linalg.svd(centred, full_matrices=False)[2][0]
        order = np.argsort(centred @ direction, kind="stable")
        labels[members[order[members.size // 2 :]]] = labels.max() + 1


def _align(labels, previous_labels):
    """Relabel to 0..K-1: matched to the previous ids where possible, else ordered by each cluster's first node."""
    ids, first = np.unique(labels, return_index=True)
    rank = np.argsort(first, kind="stable").astype(np.float64)  # canonical order: by smallest node index
    if previous_labels is not None:
        prev_ids = np.unique(previous_labels)
        overlap = np.zeros((ids.size, prev_ids.size))
        np.add.at(overlap, (np.searchsorted(ids, labels), np.searchsorted(prev_ids, previous_labels)), 1.0)
        rows, cols = linear_sum_assignment(-overlap)
        rank = np.full(ids.size, np.inf)
        rank[rows] = prev_ids[cols]  # matched clusters sort by the id they had
        unmatched = np.isinf(rank)
        rank[unmatched] = prev_ids.max() + 1 + np.argsort(np.argsort(first[unmatched], kind="stable"))
    new_id = np.empty(ids.size, dtype=np.int64)
    new_id[np.argsort(rank, kind="stable")] = np.arange(ids.size)
    return new_id[np.searchsorted(ids, labels)]


def build_library(labels, *, previous_labels=None, node_sizes=None, node_energy=None) -> list[Module]:
    """Module records for a labelling (ids 0..K-1): nodes, parameter count, mean energy, overlap with the previous."""
    labels = np.asarray(labels, dtype=np.int64)
    modules = []
    for label in np.unique(labels):
        nodes = np.flatnonzero(labels == label)
        stability = None
        if previous_labels is not None:
            before = np.flatnonzero(previous_labels == label)
            union = np.union1d(nodes, before).size
            stability = float(np.intersect1d(nodes, before).size / union) if union else 0.0
        modules.append(
            Module(
                label=int(label),
                nodes=nodes,
                n_params=None if node_sizes is None else int(np.sum(node_sizes[nodes])),
                mean_energy=None if node_energy is None else float(np.mean(node_energy[nodes])),
                stability=stability,
            )
        )
    return modules
