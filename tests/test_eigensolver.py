"""The Laplacian eigensolver's argument errors (its accuracy is tested through DSCA against dense eigh)."""

import numpy as np
import pytest
import scipy.sparse as sp

from mftc_peft.eigensolver import laplacian_eigenvectors


def test_solver_argument_errors():
    adjacency = sp.eye_array(30)
    with pytest.raises(ValueError, match="`n_components` must be an integer in 1..29, got 30"):
        laplacian_eigenvectors(adjacency, 30)
    with pytest.raises(ValueError, match="`init` must be a finite array of shape \\(30, 2\\)"):
        laplacian_eigenvectors(adjacency, 2, init=np.ones((30, 3)))
