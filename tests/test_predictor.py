"""The additive performance predictor: ridge fit, models from probes, fidelity, architecture sampling."""

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import mean_absolute_error, r2_score

from mftc_peft.predictor import (
    AdditiveModel,
    ProbeResult,
    fit_additive_model,
    models_from_probes,
    predictor_fidelity,
    sample_architectures,
)
# ---------------------------------------------------------------------------------------------------------- predictor



@pytest.mark.parametrize("seed", range(4))
def test_regression_recovers_additive_truth(seed):
    rng = np.random.default_rng(seed)
    counts = (3, 4, 2, 5, 3)
    truth = AdditiveModel(0.7, tuple(np.r_[0.0, rng.normal(size=k - 1)] for k in counts))
    arch = sample_architectures(counts, 40, rng)
    fitted = fit_additive_model(arch, truth.predict(arch), n_candidates_per_node=counts)
    assert fitted.base == pytest.approx(truth.base, abs=1e-5)
    for got, want in zip(fitted.deltas, truth.deltas):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # An exact fit leaves no residual, so the standard errors vanish too.
    assert all(np.all(s < 1e-5) for s in fitted.spread)
    held_out = sample_architectures(counts, 30, np.random.default_rng(seed + 100))
    np.testing.assert_allclose(fitted.predict(held_out), truth.predict(held_out), atol=1e-5)


def test_regression_standard_errors_and_unseen_candidates():
    rng = np.random.default_rng(0)
    arch = np.array([[0, 1], [1, 0], [1, 1], [0, 0], [1, 1], [0, 1]])
    noisy = 1.0 + 0.5 * arch[:, 0] - 0.25 * arch[:, 1] + rng.normal(scale=0.01, size=6)
    fitted = fit_additive_model(arch, noisy)
    assert fitted.n_candidates_per_node == (2, 2)
    assert fitted.deltas[0][1] == pytest.approx(0.5, abs=0.05) and 0 < fitted.spread[0][1] < 0.05
    with pytest.warns(UserWarning, match="1 candidate\\(s\\) never appear"):
        unseen = fit_additive_model(arch, noisy, n_candidates_per_node=(2, 3))
    assert unseen.deltas[1][2] == 0.0  # ridge shrinks the unidentified effect to "no effect"


def test_models_from_probes_and_prediction():
    results = [
        ProbeResult(0, 1, 0.02, -0.1, accuracy_spread=0.01),
        ProbeResult(1, 1, 0.03, -0.2),
        ProbeResult(1, 2, -0.01, 0.05, loss_spread=0.02),
    ]
    acc, loss = models_from_probes(results, (2, 3), base_accuracy=0.8, base_loss=0.5)
    np.testing.assert_allclose(acc.predict([[1, 1], [0, 2], [0, 0]]), [0.85, 0.79, 0.8])
    np.testing.assert_allclose(loss.predict([1, 2]), [0.45])
    np.testing.assert_array_equal(acc.spread[0], [0.0, 0.01])
    np.testing.assert_array_equal(loss.spread[1], [0.0, 0.0, 0.02])
    with pytest.raises(ValueError, match=r"missing \(node, candidate\): \[\(1, 2\)\]"):
        models_from_probes(results[:2], (2, 3), base_accuracy=0.8, base_loss=0.5)
    with pytest.raises(ValueError, match="candidate 1 of node 0 has more than one probe result"):
        models_from_probes(results + results[:1], (2, 3), base_accuracy=0.8, base_loss=0.5)
    with pytest.raises(ValueError, match="node 0, candidate 0 lies outside the search space"):
        models_from_probes([ProbeResult(0, 0, 0.0, 0.0)], (2, 3), base_accuracy=0.8, base_loss=0.5)


def test_fidelity_matches_scipy_and_sklearn_on_hand_example():
    measured = [0.80, 0.82, 0.79, 0.85, 0.81]
    predicted = [0.81, 0.83, 0.78, 0.84, 0.80]
    fid = predictor_fidelity(predicted, measured)
    # Ranks: measured (2, 4, 1, 5, 3), predicted (3, 4, 1, 5, 2): sum d^2 = 2, rho = 1 - 6*2 / (5*24) = 0.9.
    assert fid.spearman == pytest.approx(0.9)
    assert fid.mae == pytest.approx(0.01)
    # Mean measured 0.814: SS_tot = 2.12e-3, SS_res = 5 * 1e-4, R^2 = 1 - 5e-4 / 2.12e-3
    assert fid.r2 == pytest.approx(1 - 5e-4 / 2.12e-3)
    assert fid.n == 5
    assert fid.spearman == pytest.approx(spearmanr(predicted, measured).statistic)
    assert fid.mae == pytest.approx(mean_absolute_error(measured, predicted))
    assert fid.r2 == pytest.approx(r2_score(measured, predicted))


def test_sample_architectures_distinct_seeded_and_balanced():
    counts = (3, 4, 2)
    a = sample_architectures(counts, 12, 7)
    b = sample_architectures(counts, 12, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and a.shape == (12, 3)
    assert len({tuple(r) for r in a}) == 12
    assert np.all(a >= 0) and np.all(a < np.array(counts))
    # Balanced draws: each candidate of a node appears about equally often (redrawn duplicates may shift a few).
    assert np.bincount(a[:, 1], minlength=4).min() >= 1
    everything = sample_architectures(counts, 24, 0)  # dense request: all of them, in random order
    assert len({tuple(r) for r in everything}) == 24
    assert not np.array_equal(sample_architectures(counts, 12, 8), a)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: sample_architectures((2, 2), 5, 0), r"`n` must be an integer in 0..4 .*got 5"),
        (lambda: sample_architectures((2, 0), 1, 0), r"`n_candidates_per_node` must be a non-empty sequence of posi"),
        (lambda: sample_architectures((2, 2), 1, -3), r"`rng` must be a numpy Generator or a non-negative integer"),
        (lambda: fit_additive_model([[0, 1]], [1.0], alpha=-1), r"`alpha` must be a non-negative number, got -1"),
        (lambda: fit_additive_model([[0, 1]], [1.0, 2.0]), r"`measured` must be a finite 1-D array of length 1"),
        (lambda: fit_additive_model([[0, 2]], [1.0], n_candidates_per_node=(2, 2)),
         r"`architectures` indices must lie in 0..n_candidates-1 per node, got 2 at row 0, node 1"),
        (lambda: AdditiveModel(0.0, (np.zeros(2),)).predict([[0, 1]]),
         r"`architectures` must be an integer array of shape \(n, 1\)"),
        (lambda: predictor_fidelity([1.0], [1.0]), r"must hold at least 2 values, got 1"),
        (lambda: predictor_fidelity([1.0, np.nan], [1.0, 2.0]), r"`predicted` must be a finite 1-D array"),
    ],
)
def test_predictor_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call()
