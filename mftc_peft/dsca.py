"""Dynamic Spectral Clustering (DSCA): a time-varying module library from per-block gradient signatures.

One `update` is one step of Algorithm 1 of the MFTC paper:
  S(t) similarity on a sparse neighbour graph -> W(t) = a W(t-1) + (1 - a) S(t) -> sparsify (kNN / top-p, symmetric)
  -> degrees -> symmetric normalised Laplacian -> r smallest eigenvectors warm-started from U(t-1) (full recomputation
  every `reset_every` updates or when the residual grows) -> k-means on the unit rows -> merge small / split large.

Scale: below `exact_threshold` nodes the neighbours are found exactly at every update. Above it pynndescent builds
the graph at each reset, and in between the previous graph is refined by one sampled NN-descent round per update,
so a warm update costs O(m k (k + d)) for the graph plus a few sparse block products for the eigenvectors.
"""

from __future__ import annotations

import logging
import numbers
import warnings

import numpy as np
from scipy.sparse.csgraph import connected_components
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state

from . import graph
from .checks import is_int
from .eigensolver import laplacian_eigenvectors
from .module_library import build_library, cluster_embedding
from .spectral_diagnostics import eigengap, energy_concentration, label_agreement, subspace_drift

logger = logging.getLogger(__name__)

# "auto" eigen_tol: residual ||N u - mu u|| of the leading pairs. The angle error is ~ tol / eigengap, far below
# anything that moves a k-means assignment.
_AUTO_TOL = 1e-3


class DynamicSpectralClustering(BaseEstimator):
    """Dynamic spectral clustering of parameter blocks from a sequence of gradient signatures.

    Parameters (keyword-only; stored as given, validated at the first update):
        n_clusters: k, the number of modules k-means looks for (before the size bounds merge or split).
        embed_dim: r, the number of Laplacian eigenvectors in the embedding.
        ema_decay: alpha in W(t) = alpha W(t-1) + (1 - alpha) S(t); 0 forgets the past at once.
        similarity: "cosine" (max(cos, 0) of the signatures) or "gaussian" (exp(-d^2 / 2h^2)).
        bandwidth: h for "gaussian"; None = median kNN distance of the update (median heuristic).
        n_neighbors: neighbours per node of the kNN graph; None = `graph.default_n_neighbors(m)` = ceil(log2 m) + 4.
        top_p: if set, W(t) keeps per node the fewest strongest edges that hold this share of its weight (plus the
            current kNN edges) instead of its `n_neighbors` strongest.
        reset_every: every this many updates the eigenvectors (and, above `exact_threshold`, the neighbour graph) are
            recomputed from scratch rather than warm-started.
        min_module_size, max_module_size: module size bounds in nodes (blocks); None = no upper bound.
        exact_threshold: largest node count searched exactly; above it pynndescent (which JIT-compiles once per process,
            ~35-50 s, so it only pays on large graphs).
        eigen_tol: residual tolerance of the leading eigenpairs; "auto" = 1e-3.
        max_iter: LOBPCG iterations allowed per update.
        random_state: int, RandomState or None; seeds k-means, the solver's random blocks and graph exploration.

    The node count m must stay the same across updates; the feature count d may change (the similarity is
    recomputed at every update, so e.g. a signature window that is still filling up is fine).

    Fitted attributes: `labels_` (m,), `embedding_` (m, r) orthonormal eigenvectors, `eigenvalues_` (r,) of the
    Laplacian, `affinity_` (sparse symmetric W(t)), `modules_` (list of `Module`), `n_updates_`, `n_neighbors_`,
    `stability_` (ARI with the previous labelling, NaN at the first update), `solver_info_` (`SolverInfo`), and
    `history_` (one dict of diagnostics per update).
    """

    def __init__(
        self, *, n_clusters=12, embed_dim=16, ema_decay=0.9, similarity="cosine", bandwidth=None, n_neighbors=None,
        top_p=None, reset_every=10, min_module_size=2, max_module_size=None, exact_threshold=20_000,
        eigen_tol="auto", max_iter=200, random_state=None,
    ):
        self.n_clusters = n_clusters
        self.embed_dim = embed_dim
        self.ema_decay = ema_decay
        self.similarity = similarity
        self.bandwidth = bandwidth
        self.n_neighbors = n_neighbors
        self.top_p = top_p
        self.reset_every = reset_every
        self.min_module_size = min_module_size
        self.max_module_size = max_module_size
        self.exact_threshold = exact_threshold
        self.eigen_tol = eigen_tol
        self.max_iter = max_iter
        self.random_state = random_state

    # ------------------------------------------------------------------ public API
    def fit(self, sequence, *, node_sizes=None, node_energy=None):
        """Start afresh and run `update` over a sequence of (m, d) signature arrays (or a (T, m, d) array)."""
        sequence = list(sequence)
        if not sequence:
            raise ValueError("`sequence` must hold at least one (m, d) array of signatures, got an empty sequence")
        self._clear()
        for signatures in sequence:
            self.update(signatures, node_sizes=node_sizes, node_energy=node_energy)
        return self

    def update(self, signatures, *, node_sizes=None, node_energy=None):
        """One DSCA step with the signatures (m, d) of the latest window. Returns self.

        `node_sizes` (m,) parameter counts and `node_energy` (m,) gradient energies of the blocks are optional; they
        only fill in the module records.
        """
        first = not hasattr(self, "n_updates_")
        if first:
            self._validate_params()
        X = self._validate_signatures(signatures, first)
        sizes = self._validate_node_array(node_sizes, "node_sizes", X.shape[0])
        energy = self._validate_node_array(node_energy, "node_energy", X.shape[0])
        if first:
            self._start(X.shape[0])
        self._step(X, sizes, energy)
        return self

    # ------------------------------------------------------------------ validation
    def _validate_params(self):
        checks = [
            (is_int(self.n_clusters) and self.n_clusters >= 1, "n_clusters", "a positive integer"),
            (is_int(self.embed_dim) and self.embed_dim >= 1, "embed_dim", "a positive integer"),
            (isinstance(self.ema_decay, numbers.Real) and 0 <= self.ema_decay < 1, "ema_decay", "a number in [0, 1)"),
            (self.similarity in graph.SIMILARITIES, "similarity", f"one of {graph.SIMILARITIES}"),
            (self.bandwidth is None or (isinstance(self.bandwidth, numbers.Real) and self.bandwidth > 0),
             "bandwidth", "None or a positive number"),
            (self.n_neighbors is None or (is_int(self.n_neighbors) and self.n_neighbors >= 1),
             "n_neighbors", "None or a positive integer"),
            (self.top_p is None or (isinstance(self.top_p, numbers.Real) and 0 < self.top_p <= 1),
             "top_p", "None or a number in (0, 1]"),
            (is_int(self.reset_every) and self.reset_every >= 1, "reset_every", "a positive integer"),
            (is_int(self.min_module_size) and self.min_module_size >= 1, "min_module_size", "a positive integer"),
            (self.max_module_size is None or (is_int(self.max_module_size) and is_int(self.min_module_size)
                                              and self.max_module_size >= 2 * self.min_module_size),
             "max_module_size", "None or an integer >= 2 * min_module_size (so a halved module stays large enough)"),
            (is_int(self.exact_threshold) and self.exact_threshold >= 0, "exact_threshold", "a non-negative integer"),
            (self.eigen_tol == "auto" or (isinstance(self.eigen_tol, numbers.Real) and self.eigen_tol > 0),
             "eigen_tol", '"auto" or a positive number'),
            (is_int(self.max_iter) and self.max_iter >= 1, "max_iter", "a positive integer"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"`{name}` must be {rule}, got {getattr(self, name)!r}")

    def _validate_signatures(self, signatures, first):
        X = np.asarray(signatures, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] < 1:
            raise ValueError(f"`signatures` must be a 2-D array (nodes x features), got shape {X.shape!r}")
        m = X.shape[0]
        if not first and m != self.n_nodes_:
            raise ValueError(
                f"`signatures` must keep the node count of the first update ({self.n_nodes_} rows), got {m} rows; "
                "call `fit` to start a new sequence"
            )
        if m < self.n_clusters or m <= self.embed_dim:
            raise ValueError(
                f"`signatures` must have at least n_clusters={self.n_clusters} rows and more than "
                f"embed_dim={self.embed_dim} rows (one per node), got {m}"
            )
        bad = np.flatnonzero(~np.all(np.isfinite(X), axis=1))
        if bad.size:
            raise ValueError(
                f"`signatures` must be finite, got {bad.size} rows with NaN or Inf (first: row {bad[0]}: {X[bad[0]]!r})"
            )
        if not np.any(X):
            raise ValueError(f"`signatures` must not be all zero, got an all-zero array of shape {X.shape!r}")
        points = graph.prepare_points(X, self.similarity)
        if np.all(points == points[0]):
            raise ValueError(
                "`signatures` must vary across nodes, got rows that are all identical"
                + (" in direction (cosine similarity)" if self.similarity == "cosine" else "")
                + f": row 0 = {X[0]!r}"
            )
        zero = int(np.sum(~np.any(X, axis=1)))
        if zero and self.similarity == "cosine":
            warnings.warn(
                f"{zero} of {m} rows of `signatures` are all zero: under cosine similarity they have no direction, "
                "get no edges and end up in arbitrary modules",
                RuntimeWarning,
                stacklevel=3,
            )
        return X

    @staticmethod
    def _validate_node_array(values, name, m):
        if values is None:
            return None
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (m,) or not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError(f"`{name}` must be a finite non-negative array of shape ({m},), got {values!r}")
        return values

    # ------------------------------------------------------------------ state
    def _clear(self):
        for name in [a for a in vars(self) if a.endswith("_") and not a.startswith("__")]:
            delattr(self, name)

    def _start(self, m):
        self._random = check_random_state(self.random_state)
        self._explore_rng = np.random.default_rng(self._random.randint(np.iinfo(np.int32).max))
        self.n_nodes_ = m
        self.n_neighbors_ = min(self.n_neighbors or graph.default_n_neighbors(m), m - 1)
        self.n_updates_ = 0
        self.history_ = []
        self._knn_ = None  # current kNN lists (m, k), the warm start of the next large-graph refresh
        self._kept_ = None  # neighbour lists of W(t)'s support: its memory for the next candidates
        self._since_reset_ = 0
        self._reset_next_ = True
        self.affinity_ = None
        self.embedding_ = None
        self.labels_ = None

    def _step(self, X, sizes, energy):
        reset = self._reset_next_ or self._since_reset_ >= self.reset_every
        affinity = self._graph_step(X, reset)
        adjacency, _ = graph.normalized_adjacency(affinity)
        tol = _AUTO_TOL if self.eigen_tol == "auto" else float(self.eigen_tol)
        values, vectors, info = laplacian_eigenvectors(
            adjacency, self.embed_dim, init=None if reset else self.embedding_, tol=tol, max_iter=self.max_iter,
            n_check=min(self.n_clusters, self.embed_dim), random_state=self._random,
        )
        previous_labels, previous_vectors = self.labels_, self.embedding_
        fresh = reset or not info.warm_start
        labels = cluster_embedding(
            vectors, self.n_clusters, previous_labels=previous_labels, fresh=fresh, min_size=self.min_module_size,
            max_size=self.max_module_size, random_state=self._random.randint(np.iinfo(np.int32).max),
        )
        self._since_reset_ = 1 if fresh else self._since_reset_ + 1
        # A stale warm start means the structure moved: rebuild the neighbour graph at the next update too.
        self._reset_next_ = not reset and not info.warm_start
        self.affinity_, self.embedding_, self.eigenvalues_, self.labels_ = affinity, vectors, values, labels
        self.solver_info_ = info
        self.modules_ = build_library(labels, previous_labels=previous_labels, node_sizes=sizes, node_energy=energy)
        self.n_features_in_ = X.shape[1]
        self.n_updates_ += 1
        self._record(X, reset, previous_labels, previous_vectors)

    def _graph_step(self, X, reset):
        """Candidates, S(t) on them, EMA with W(t-1), sparsification; warns when the graph is disconnected."""
        m = X.shape[0]
        affinity, self._knn_, self._kept_ = graph.update_affinity(
            graph.prepare_points(X, self.similarity), self.affinity_, self._knn_, self._kept_,
            n_neighbors=self.n_neighbors_, exact=m <= self.exact_threshold, rebuild=reset, random_state=self._random,
            explore_rng=self._explore_rng, similarity=self.similarity, bandwidth=self.bandwidth,
            decay=self.ema_decay, top_p=self.top_p,
        )
        n_components, _ = connected_components(affinity, directed=False)
        # A few components are harmless: each takes one zero eigenvalue and the embedding's other directions still
        # split them into modules. Once they use up the embedding (or outnumber the modules), the modules follow
        # the graph's connectivity instead of gradient similarity: that is worth a warning and an action.
        if n_components >= min(self.n_clusters, self.embed_dim):
            warnings.warn(
                f"the DSCA graph is not connected ({n_components} components over {m} nodes, n_clusters="
                f"{self.n_clusters}, embed_dim={self.embed_dim}): the modules follow the components, not gradient "
                f"similarity; raise `n_neighbors` above the {self.n_neighbors_} used here, or check for blocks "
                "whose signatures are degenerate",
                RuntimeWarning,
                stacklevel=4,
            )
        elif n_components > 1:
            logger.info("the DSCA graph has %d components over %d nodes: modules do not cross them (harmless while "
                        "fewer than n_clusters=%d)", n_components, m, self.n_clusters)
        return affinity

    def _record(self, X, reset, previous_labels, previous_vectors):
        agreement = {"ari": float("nan"), "nmi": float("nan")}
        if previous_labels is not None:
            agreement = label_agreement(self.labels_, previous_labels)
        self.stability_ = agreement["ari"]
        info = self.solver_info_
        lead = min(self.n_clusters, self.embed_dim)
        self.history_.append(
            {
                "update": self.n_updates_,
                "reset": bool(reset),
                "warm_start": info.warm_start,
                "solver": info.method,
                "n_iter": info.n_iter,
                "residual": info.residual,
                "n_modules": len(self.modules_),
                "ari_previous": agreement["ari"],
                "nmi_previous": agreement["nmi"],
                # Drift of the leading (cluster) eigenvectors; the trailing ones sit in the bulk and churn freely.
                "subspace_drift": float("nan") if previous_vectors is None
                else subspace_drift(self.embedding_[:, :lead], previous_vectors[:, :lead]),
                "eigengap": eigengap(self.eigenvalues_, min(self.n_clusters, self.embed_dim)),
                "energy_concentration": float(energy_concentration(X, self.embedding_)[-1]),
            }
        )
        logger.debug("DSCA update %d: %s", self.n_updates_, self.history_[-1])
