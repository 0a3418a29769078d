"""The module library's clustering of a spectral embedding: size bounds by merging and splitting."""

import numpy as np
import pytest

from mftc_peft.module_library import cluster_embedding


def test_size_bounds_merge_and_split():
    labels = np.repeat([0, 1, 2], [50, 5, 145])
    embedding = np.eye(3)[labels] + 0.01 * np.random.default_rng(0).normal(size=(200, 3))
    out = cluster_embedding(embedding, 3, min_size=10, max_size=80, random_state=0)
    counts = np.bincount(out)
    assert counts.min() >= 10 and counts.max() <= 80 and counts.sum() == 200
    with pytest.raises(ValueError, match="`max_size` must be at least 2 \\* min_size = 20, got 15"):
        cluster_embedding(embedding, 3, min_size=10, max_size=15)
