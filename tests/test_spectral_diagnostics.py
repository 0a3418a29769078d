"""Spectral diagnostics: energy concentration, subspace drift, label agreement, eigengap, and their errors."""

import numpy as np
import pytest
import scipy.linalg

from mftc_peft.spectral_diagnostics import eigengap, energy_concentration, label_agreement, subspace_drift


def test_diagnostics():
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(30, 3)))[0]
    inside = basis @ np.array([1.0, 2.0, 0.0])
    np.testing.assert_allclose(energy_concentration(inside, basis), [0.2, 1.0, 1.0])
    assert subspace_drift(basis, basis @ scipy.linalg.qr(np.ones((3, 3)) + np.eye(3))[0]) < 1e-6  # rotation only
    assert subspace_drift(basis[:, :1], basis[:, 1:2]) == pytest.approx(np.pi / 2)
    assert label_agreement(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0])) == {"ari": 1.0, "nmi": 1.0}
    assert eigengap(np.array([0.0, 0.01, 0.5]), 2) == pytest.approx(0.49)
    assert np.isnan(eigengap(np.array([0.0, 0.01]), 2))
    with pytest.raises(ValueError, match="`signals` must not be all zero"):
        energy_concentration(np.zeros(30), basis)
    with pytest.raises(ValueError, match="must share m rows, got \\(29,\\) and \\(30, 3\\)"):
        energy_concentration(np.ones(29), basis)
    with pytest.raises(ValueError, match="`labels` and `previous` must be 1-D of one length"):
        label_agreement(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="`n_clusters` must be a positive integer, got 0"):
        eigengap(np.ones(3), 0)
    with pytest.raises(ValueError, match="`current` and `previous` must be 2-D with the same rows"):
        subspace_drift(basis, basis[:5])
