"""DSCA on planted structure: recovery (exact and pynndescent paths), tracking, eigensolver oracle, determinism,
errors."""


import logging
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from mftc_peft import eigensolver, graph
from mftc_peft.dsca import DynamicSpectralClustering
from mftc_peft.eigensolver import laplacian_eigenvectors


# Well-separated planted groups give a kNN graph with one component per group: the warning is right, and expected.
pytestmark = pytest.mark.filterwarnings("ignore:the DSCA graph is not connected:RuntimeWarning")


@pytest.fixture(autouse=True)
def one_blas_thread():
    # On a shared 2-core machine a second BLAS thread spins against other jobs; one is much faster here.
    with threadpool_limits(1):
        yield


def planted(m=600, k=4, d=16, noise=0.6, seed=0):
    """Labels (m,) and a draw() of signatures scattered around one random centre per group."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(m) % k)
    centres = rng.normal(size=(k, d))
    return labels, lambda lab=labels: centres[lab] + noise * rng.normal(size=(m, d))


def test_planted_groups_recovered_on_exact_path():
    labels, draw = planted()
    est = DynamicSpectralClustering(n_clusters=4, embed_dim=6, random_state=0).fit([draw() for _ in range(3)])
    assert adjusted_rand_score(labels, est.labels_) >= 0.95
    assert est.n_updates_ == 3 and est.n_neighbors_ == graph.default_n_neighbors(600) == 14
    assert [h["reset"] for h in est.history_] == [True, False, False]
    assert est.history_[-1]["warm_start"] and est.solver_info_.converged
    assert sp.issparse(est.affinity_) and (abs(est.affinity_ - est.affinity_.T)).max() < 1e-12
    assert est.embedding_.shape == (600, 6) and np.all(np.diff(est.eigenvalues_) >= 0)
    assert sorted(m.size for m in est.modules_) == sorted(np.bincount(labels))


def test_planted_groups_recovered_on_pynndescent_path():
    # The only test that pays pynndescent's JIT compilation.
    labels, draw = planted(m=800, k=5, seed=1)
    est = DynamicSpectralClustering(n_clusters=5, embed_dim=5, exact_threshold=100, reset_every=3, random_state=0)
    for _ in range(4):  # reset (pynndescent), two warm refinements, reset again
        est.update(draw())
        assert adjusted_rand_score(labels, est.labels_) >= 0.95
    assert [h["reset"] for h in est.history_] == [True, False, False, True]


@pytest.mark.parametrize(("similarity", "top_p"), [("gaussian", None), ("cosine", 0.9)])
def test_gaussian_similarity_and_top_p(similarity, top_p):
    labels, draw = planted(seed=2)
    est = DynamicSpectralClustering(n_clusters=4, embed_dim=4, similarity=similarity, top_p=top_p, random_state=0)
    est.fit([draw() for _ in range(2)])
    assert adjusted_rand_score(labels, est.labels_) >= 0.95


def test_labels_follow_a_change_of_groups():
    first, draw = planted(seed=3)
    second = np.roll(first, 150)  # every node gets another group
    est = DynamicSpectralClustering(n_clusters=4, embed_dim=4, ema_decay=0.5, random_state=0, reset_every=100)
    for _ in range(3):
        est.update(draw(first))
    assert adjusted_rand_score(first, est.labels_) >= 0.95
    scores = []
    for _ in range(5):
        est.update(draw(second))
        scores.append(adjusted_rand_score(second, est.labels_))
    assert max(scores[:4]) >= 0.95 and scores[-1] >= 0.95, scores
    assert est.history_[3]["ari_previous"] < 0.9  # the change shows up in the stability diagnostics


def test_warm_start_matches_dense_eigh_with_fewer_iterations():
    _, draw = planted(seed=4)
    est = DynamicSpectralClustering(n_clusters=4, embed_dim=4, ema_decay=0.8, eigen_tol=1e-7, random_state=0)
    for _ in range(6):
        est.update(draw())
    warm = est.solver_info_
    assert warm.warm_start and warm.converged and warm.method == "lobpcg"
    laplacian = graph.laplacian_dense(est.affinity_)
    values, vectors = scipy.linalg.eigh(laplacian, subset_by_index=[0, 3])
    np.testing.assert_allclose(est.eigenvalues_, values, atol=1e-6)
    assert np.max(scipy.linalg.subspace_angles(est.embedding_, vectors)) < 1e-3
    adjacency, _ = graph.normalized_adjacency(est.affinity_)
    _, cold_vectors, cold = laplacian_eigenvectors(adjacency, 4, tol=1e-7, random_state=0)
    assert not cold.warm_start and cold.converged
    assert warm.n_iter < cold.n_iter
    assert np.max(scipy.linalg.subspace_angles(cold_vectors, vectors)) < 1e-3


def test_same_random_state_gives_identical_labels():
    _, draw = planted(seed=5, noise=1.0)
    sequence = [draw() for _ in range(3)]
    runs = [DynamicSpectralClustering(n_clusters=4, random_state=7).fit(sequence) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].labels_, runs[1].labels_)
    np.testing.assert_array_equal(runs[0].embedding_, runs[1].embedding_)


def test_module_library_records_sizes_energy_and_stability():
    labels, draw = planted(seed=6)
    sizes = np.arange(600) + 1
    energy = np.linspace(0, 1, 600)
    est = DynamicSpectralClustering(n_clusters=4, embed_dim=4, random_state=0)
    est.update(draw(), node_sizes=sizes, node_energy=energy)
    assert all(module.stability is None for module in est.modules_) and np.isnan(est.stability_)
    est.update(draw(), node_sizes=sizes, node_energy=energy)
    assert sum(m.n_params for m in est.modules_) == sizes.sum()
    for module in est.modules_:
        assert module.mean_energy == pytest.approx(energy[module.nodes].mean())
        assert module.stability >= 0.9  # ids are matched to the previous update's, so each module keeps its id
    assert est.stability_ >= 0.9


def test_warnings_for_disconnected_graph_and_zero_rows(caplog):
    rng = np.random.default_rng(0)
    signatures = np.zeros((200, 8))
    signatures[:100, :4] = rng.random((100, 4)) + 0.5  # two groups in orthogonal (non-negative) subspaces:
    signatures[100:, 4:] = rng.random((100, 4)) + 0.5  # cosine 0 between them, so no edge crosses
    expected = "not connected \\(2 components over 200 nodes, .*raise `n_neighbors` above"
    with pytest.warns(RuntimeWarning, match=expected):
        DynamicSpectralClustering(n_clusters=2, embed_dim=2, random_state=0).update(signatures)
    with warnings.catch_warnings():  # a few components next to the modules asked for: logged, not warned
        warnings.simplefilter("error", RuntimeWarning)
        with caplog.at_level(logging.INFO, logger="mftc_peft.dsca"):
            DynamicSpectralClustering(n_clusters=4, embed_dim=4, random_state=0).update(signatures)
    assert "the DSCA graph has 2 components over 200 nodes" in caplog.text
    signatures[5] = 0.0
    with pytest.warns(RuntimeWarning, match="1 of 200 rows of `signatures` are all zero"):
        DynamicSpectralClustering(n_clusters=2, embed_dim=2, random_state=0).update(signatures)


def test_solver_fallback_warns(monkeypatch):
    _, draw = planted(seed=7)

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(eigensolver, "lobpcg", broken)
    est = DynamicSpectralClustering(n_clusters=4, embed_dim=4, random_state=0)
    with pytest.warns(RuntimeWarning, match="LOBPCG failed \\(not positive definite\\); falling back to ARPACK"):
        est.update(draw())
    assert est.solver_info_.method == "eigsh"


def test_feature_count_may_change_but_node_count_may_not():
    _, draw = planted(seed=8)
    est = DynamicSpectralClustering(n_clusters=4, embed_dim=4, random_state=0)
    est.update(draw())
    est.update(draw()[:, :10])  # d may change (e.g. a window still filling up)
    assert est.n_features_in_ == 10
    with pytest.raises(ValueError, match="must keep the node count of the first update \\(600 rows\\), got 599"):
        est.update(draw()[:599])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_clusters": 0}, "`n_clusters` must be a positive integer, got 0"),
        ({"embed_dim": 2.0}, "`embed_dim` must be a positive integer, got 2.0"),
        ({"ema_decay": 1.0}, "`ema_decay` must be a number in \\[0, 1\\), got 1.0"),
        ({"similarity": "rbf"}, "`similarity` must be one of \\('cosine', 'gaussian'\\), got 'rbf'"),
        ({"bandwidth": -1}, "`bandwidth` must be None or a positive number, got -1"),
        ({"n_neighbors": 0}, "`n_neighbors` must be None or a positive integer, got 0"),
        ({"top_p": 1.5}, "`top_p` must be None or a number in \\(0, 1\\], got 1.5"),
        ({"reset_every": 0}, "`reset_every` must be a positive integer, got 0"),
        ({"min_module_size": 0}, "`min_module_size` must be a positive integer, got 0"),
        ({"min_module_size": 5, "max_module_size": 8}, "`max_module_size` must be None or an integer >= 2 \\* min"),
        ({"exact_threshold": -1}, "`exact_threshold` must be a non-negative integer, got -1"),
        ({"eigen_tol": 0}, "`eigen_tol` must be \"auto\" or a positive number, got 0"),
        ({"max_iter": 0}, "`max_iter` must be a positive integer, got 0"),
    ],
)
def test_invalid_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        DynamicSpectralClustering(**params).update(np.random.default_rng(0).normal(size=(50, 4)))


def _with_nan_row():
    x = np.random.default_rng(0).normal(size=(50, 4))
    x[3, 1] = np.nan
    return x


@pytest.mark.parametrize(
    ("signatures", "message"),
    [
        (np.zeros(50), "`signatures` must be a 2-D array \\(nodes x features\\), got shape \\(50,\\)"),
        (_with_nan_row(), "`signatures` must be finite, got 1 rows with NaN or Inf \\(first: row 3"),
        (np.zeros((50, 4)), "`signatures` must not be all zero, got an all-zero array of shape \\(50, 4\\)"),
        (np.tile([1.0, 2.0], (50, 1)), "`signatures` must vary across nodes, got rows that are all identical"),
        (np.random.default_rng(0).normal(size=(10, 4)), "at least n_clusters=12 rows .* got 10"),
    ],
)
def test_invalid_signatures(signatures, message):
    with pytest.raises(ValueError, match=message):
        DynamicSpectralClustering(embed_dim=4).update(signatures)


def test_fit_rejects_empty_sequence():
    with pytest.raises(ValueError, match="`sequence` must hold at least one"):
        DynamicSpectralClustering().fit([])
