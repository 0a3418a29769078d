"""Taylor probe: first-order loss decrease per candidate from per-block gradient statistics."""

import math

import numpy as np
import pytest

from mftc_peft.probes import consistency_projections, gradient_projections, taylor_probe
from mftc_peft.predictor import models_from_probes
from mftc_peft.search import BlockTable, build_search_space


def _space():
    names = [f"encoder.layer.{l}.query" for l in (0, 0, 1, 1)]
    table = BlockTable(tuple(names), np.array([0, 1, 0, 1]), np.full(4, 8), np.array([1.0, 2.0, 3.0, 4.0]))
    return build_search_space([[0, 1], [1], [2, 3], [3]], table)


def test_projections_average_to_squared_mean_gradient():
    g = np.random.default_rng(0).normal(size=(5, 4, 3))  # (T, blocks, d)
    p = gradient_projections(g)
    assert p.shape == (5, 4)
    np.testing.assert_allclose(p.mean(axis=0), (g.mean(axis=0) ** 2).sum(axis=1))


def test_taylor_probe_hand_example():
    p = np.array([[1.0, 2.0, 0.5, 0.0], [3.0, 2.0, 0.5, 1.0]])  # (T=2, 4 blocks)
    results = taylor_probe(_space(), p, lr=0.1)
    by_key = {(r.node, r.candidate): r for r in results}
    # Layer 0: candidates ranked by energy: module 0 (rows 0, 1), then module 1 (row 1).
    both = by_key[(0, 1)]
    assert both.loss_delta == pytest.approx(-0.1 * (2.0 + 2.0))  # column means 2.0 and 2.0
    assert both.accuracy_delta == pytest.approx(-both.loss_delta)
    # Per-batch sums 3 and 5: std (ddof=1) sqrt(2), standard error sqrt(2)/sqrt(2) = 1.
    assert both.loss_spread == pytest.approx(0.1 * 1.0) and both.n_repeats == 2
    assert by_key[(0, 2)].loss_delta == pytest.approx(-0.2) and by_key[(0, 2)].loss_spread == pytest.approx(0.0)
    assert by_key[(1, 1)].loss_delta == pytest.approx(-0.1 * (0.5 + 0.5))
    assert by_key[(1, 1)].loss_spread == pytest.approx(0.1 * math.sqrt(0.5) / math.sqrt(2))


def test_taylor_probe_matches_direct_gradients_and_fills_predictor():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(6, 4, 5))
    space = _space()
    results = taylor_probe(space, gradient_projections(g), lr=0.01)
    gbar = g.mean(axis=0)
    for r in results:
        rows = list(space.nodes[r.node].candidates[r.candidate].rows)
        assert r.loss_delta == pytest.approx(-0.01 * (gbar[rows] ** 2).sum())
    acc, loss = models_from_probes(results, space.n_candidates_per_node, base_accuracy=0.5, base_loss=0.7)
    assert loss.predict([0, 0])[0] == 0.7 and np.all(loss.predict([[1, 1], [2, 2]]) <= 0.7)


def test_taylor_probe_single_batch_has_zero_spread():
    results = taylor_probe(_space(), np.ones((1, 4)), lr=1.0)
    assert all(r.loss_spread == 0.0 and r.n_repeats == 1 for r in results)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s: taylor_probe(s, np.ones((2, 4)), lr=0), r"`lr` must be a positive number, got 0"),
        (lambda s: taylor_probe(s, np.ones((2, 3)), lr=0.1), r"at least 4 block columns .* got shape \(2, 3\)"),
        (lambda s: taylor_probe(s, np.ones(4), lr=0.1), r"`projections` must be a finite array of shape"),
        (lambda s: taylor_probe("space", np.ones((2, 4)), lr=0.1), r"`space` must be a SearchSpace, got str"),
        (lambda s: gradient_projections(np.ones((2, 3))), r"`block_gradients` must be a finite array of shape"),
    ],
)
def test_taylor_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call(_space())


def test_consistency_is_one_for_steady_gradients_and_zero_for_noise():
    g = np.array([[[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [-3.0, 0.0], [0.0, 0.0]]])  # (T=2, blocks=3, d)
    p = gradient_projections(g)
    energy = (g ** 2).sum(axis=(0, 2))  # accumulated squared gradient per block
    c = consistency_projections(p, energy)
    np.testing.assert_allclose(c.mean(axis=0), [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"`energy` must be a non-negative array with one value per projection"):
        consistency_projections(p, energy[:2])


def test_warmup_values_blocks_by_consistency_when_asked():
    import mftc_peft
    from test_warmup import token_batches, warm_model

    _, model = warm_model(allocation="search", block_score="consistency")
    measurement = mftc_peft.measure_blocks(model, token_batches(6))
    table = measurement.table
    consistency = consistency_projections(measurement.projections, table.energy).mean(axis=0)
    row_of = {(name, int(b)): r for r, (name, b) in enumerate(zip(table.module_names, table.block_ids))}
    report = mftc_peft.warmup(model, token_batches(6), progress=False)
    candidates = [c for c in report.candidates if c["blocks"]]
    assert candidates
    for c in candidates:
        rows = [row_of[(name, b)] for name, ids in c["blocks"].items() for b in ids]
        assert c["predicted_gain"] == pytest.approx(consistency[rows].sum(), rel=1e-9)
