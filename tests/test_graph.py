"""The DSCA graph's public functions: argument errors, exact kNN without self-loops."""

import warnings

import numpy as np
import pytest

from mftc_peft import graph


def test_graph_argument_errors_and_exact_knn_without_self():
    points = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="`n_neighbors` must be an integer in 1..19, got 20"):
        graph.knn_graph(points, 20)
    with pytest.raises(ValueError, match="`method` must be one of \\('exact', 'nndescent'\\), got 'kd'"):
        graph.knn_graph(points, 3, method="kd")
    with pytest.raises(ValueError, match="`decay` must lie in \\[0, 1\\), got 1.5"):
        graph.ema_affinity(None, np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), decay=1.5, n_neighbors=1)
    with pytest.raises(ValueError, match="exactly one of `n_neighbors` and `top_p` must be given"):
        graph.ema_affinity(None, np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), decay=0.5)
    with pytest.raises(ValueError, match="`similarity` must be one of"):
        graph.prepare_points(points, "dot")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        indices, distances = graph.knn_graph(points, 3)
    assert indices.shape == (20, 3) and not np.any(indices == np.arange(20)[:, None])
