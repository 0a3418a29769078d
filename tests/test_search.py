"""Module search: constrained selection against a brute-force oracle, the additive predictor, the search space."""

import itertools
import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import mean_absolute_error, r2_score

from mftc_peft.blocks import BlockGrid
from mftc_peft.search import select_candidates


# ---------------------------------------------------------------------------------------------------------- selection
def _instance(seed, *, with_loss, with_spread):
    """Random instance of up to 6 nodes x 5 candidates; budget and loss limit cut through the interesting range."""
    rng = np.random.default_rng(seed)
    n_nodes = int(rng.integers(1, 7))
    counts = rng.integers(1, 6, size=n_nodes)
    gains = [np.r_[0.0, rng.normal(size=k - 1)] for k in counts]
    sizes = [np.r_[0.0, rng.integers(1, 50, size=k - 1)].astype(float) for k in counts]
    total = sum(s.max() for s in sizes)
    kwargs = {"budget": float(rng.uniform(0, 1) * total)}
    if with_loss:
        kwargs["losses"] = [np.r_[0.0, rng.normal(size=k - 1)] for k in counts]
        lo = sum(l.min() for l in kwargs["losses"])
        kwargs["loss_limit"] = float(lo + rng.uniform(0.3, 1.5) * abs(lo) + 0.1)
    if with_spread:
        kwargs["spread"] = [np.r_[0.0, rng.uniform(0, 0.5, size=k - 1)] for k in counts]
        kwargs["confidence"] = 1.5
    return gains, sizes, kwargs


def _brute_force(gains, sizes, *, budget, losses=None, loss_limit=None, spread=None, confidence=0.0):
    values = gains if spread is None else [g - confidence * s for g, s in zip(gains, spread)]
    best = None
    for choice in itertools.product(*(range(len(g)) for g in gains)):
        if sum(s[c] for s, c in zip(sizes, choice)) > budget:
            continue
        if loss_limit is not None and sum(l[c] for l, c in zip(losses, choice)) > loss_limit:
            continue
        value = sum(v[c] for v, c in zip(values, choice))
        best = value if best is None else max(best, value)
    return best


def _check_feasible(result, sizes, kwargs):
    assert len(result.chosen) == len(sizes)
    assert all(0 <= c < len(s) for c, s in zip(result.chosen, sizes))
    size = sum(s[c] for s, c in zip(sizes, result.chosen))
    assert size == pytest.approx(result.total_size) and size <= kwargs["budget"] + 1e-9
    if "loss_limit" in kwargs:
        loss = sum(l[c] for l, c in zip(kwargs["losses"], result.chosen))
        assert loss == pytest.approx(result.total_loss) and loss <= kwargs["loss_limit"] + 1e-9


CASES = [(seed, loss, spread) for seed in range(12) for loss in (False, True) for spread in (False, True)]


@pytest.mark.parametrize("seed,with_loss,with_spread", CASES)
def test_exact_matches_brute_force(seed, with_loss, with_spread):
    gains, sizes, kwargs = _instance(seed, with_loss=with_loss, with_spread=with_spread)
    best = _brute_force(gains, sizes, **kwargs)
    if best is None:
        with pytest.raises(ValueError, match="loss_limit"):
            select_candidates(gains, sizes, **kwargs)
        return
    result = select_candidates(gains, sizes, **kwargs, method="exact")
    _check_feasible(result, sizes, kwargs)
    assert result.objective == pytest.approx(best, abs=1e-9)
    assert result.status == "optimal" and result.method == "exact"
    assert result.bound >= best - 1e-9
    assert result.bound - result.objective == result.gap >= 0


@pytest.mark.parametrize("seed,with_loss,with_spread", CASES)
def test_greedy_is_feasible_and_within_gap(seed, with_loss, with_spread):
    gains, sizes, kwargs = _instance(seed, with_loss=with_loss, with_spread=with_spread)
    best = _brute_force(gains, sizes, **kwargs)
    if best is None:
        with pytest.raises(ValueError, match="loss_limit"):
            select_candidates(gains, sizes, **kwargs, method="greedy")
        return
    result = select_candidates(gains, sizes, **kwargs, method="greedy")
    _check_feasible(result, sizes, kwargs)
    assert result.method == "greedy" and result.status == "heuristic"
    assert result.objective <= best + 1e-9
    assert result.objective <= result.bound + 1e-9 and result.bound >= best - 1e-9
    assert result.bound - result.objective == result.gap
    assert result.relative_gap == pytest.approx(result.gap / max(abs(result.bound), 1e-12))


def test_auto_picks_exact_on_small_instances():
    gains, sizes, kwargs = _instance(3, with_loss=False, with_spread=False)
    assert select_candidates(gains, sizes, **kwargs, method="auto").method == "exact"


def test_zero_budget_chooses_only_free_candidates():
    gains = [np.array([0.0, 5.0, 1.0]), np.array([0.0, 2.0])]
    sizes = [np.array([0.0, 10.0, 0.0]), np.array([0.0, 3.0])]
    for method in ("exact", "greedy"):
        result = select_candidates(gains, sizes, budget=0, method=method)
        assert result.chosen == (2, 0) and result.objective == 1.0 and result.total_size == 0


def test_infinite_budget_takes_best_per_node():
    gains = [np.array([0.0, -1.0, 3.0]), np.array([0.0, 2.0, 1.0])]
    sizes = [np.array([0.0, 1.0, 100.0]), np.array([0.0, 1e6, 1.0])]
    for method in ("exact", "greedy"):
        result = select_candidates(gains, sizes, budget=math.inf, method=method)
        assert result.chosen == (2, 1) and result.gap == 0


def test_greedy_pair_swap_escapes_ratio_trap():
    # Ratio greedy fills the budget with node 0's efficient small candidate; only swapping it out for node 1's large
    # one (node 0 back to "none") reaches the optimum.
    gains = [np.array([0.0, 2.0]), np.array([0.0, 9.0])]
    sizes = [np.array([0.0, 1.0]), np.array([0.0, 10.0])]
    result = select_candidates(gains, sizes, budget=10, method="greedy")
    assert result.chosen == (0, 1) and result.objective == 9.0


def test_confidence_penalises_spread():
    gains = [np.array([0.0, 1.0, 0.9])]
    sizes = [np.array([0.0, 1.0, 1.0])]
    spread = [np.array([0.0, 0.5, 0.0])]
    assert select_candidates(gains, sizes, budget=1, spread=spread).chosen == (1,)
    assert select_candidates(gains, sizes, budget=1, spread=spread, confidence=1.0).chosen == (2,)


def test_losses_without_limit_are_reported_only():
    gains = [np.array([0.0, 1.0])]
    sizes = [np.array([0.0, 1.0])]
    result = select_candidates(gains, sizes, budget=1, losses=[np.array([0.0, 0.25])])
    assert result.chosen == (1,) and result.total_loss == 0.25
    assert select_candidates(gains, sizes, budget=1).total_loss is None


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_infeasible_loss_limit_reports_amount(method):
    gains = [np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0])]
    sizes = [np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0])]
    losses = [np.array([0.0, -0.5, -1.0]), np.array([0.0, -0.25])]
    with pytest.raises(ValueError, match=r"minimal achievable loss sum -1\.25 exceeds loss_limit=-2\.0 by 0\.75"):
        select_candidates(gains, sizes, budget=10, losses=losses, loss_limit=-2.0, method=method)
    # Reachable without a budget, not within it: the joint message gives the minimum within budget.
    with pytest.raises(ValueError, match=r"minimal loss sum within budget=1\.0 is -0\.5, .* by 0\.5"):
        select_candidates(gains, sizes, budget=1, losses=losses, loss_limit=-1.0, method=method)


def test_greedy_reaches_tight_loss_limit():
    gains = [np.array([0.0, 3.0, 0.0]), np.array([0.0, 1.0])]
    sizes = [np.array([0.0, 1.0, 1.0]), np.array([0.0, 1.0])]
    losses = [np.array([0.0, 0.0, -1.0]), np.array([0.0, -1.0])]
    for method in ("exact", "greedy"):
        result = select_candidates(gains, sizes, budget=2, losses=losses, loss_limit=-1.5, method=method)
        assert result.chosen == (2, 1) and result.total_loss == -2.0


GOOD = {"gains": [np.array([0.0, 1.0])], "sizes": [np.array([0.0, 1.0])], "budget": 1.0}


@pytest.mark.parametrize(
    "change,match",
    [
        ({"budget": -1}, r"`budget` must be a non-negative number, got -1"),
        ({"budget": float("nan")}, r"`budget` must be a non-negative number, got nan"),
        ({"budget": "3"}, r"`budget` must be a non-negative number, got '3'"),
        ({"confidence": -0.5}, r"`confidence` must be a non-negative number, got -0.5"),
        ({"method": "milp"}, r"`method` must be one of \('exact', 'greedy', 'auto'\), got 'milp'"),
        ({"gains": []}, r"`gains` must hold at least one node, got \[\]"),
        ({"gains": "abc"}, r"`gains` must be a sequence over nodes of 1-D arrays over candidates, got 'abc'"),
        ({"gains": 3}, r"`gains` must be a sequence over nodes of 1-D numeric arrays, got 3"),
        ({"gains": [np.zeros((2, 2))]}, r"`gains\[0\]` must be a non-empty 1-D array over candidates, got shape"),
        ({"gains": [np.array([0.0, np.nan])]}, r"`gains\[0\]` must be finite"),
        ({"sizes": [np.array([0.0, 1.0])] * 2}, r"`sizes` must have one array per node like `gains` \(1 nodes\)"),
        ({"sizes": [np.array([0.0, 1.0, 2.0])]}, r"`sizes\[0\]` must have the same length as `gains\[0\]` \(2 cand"),
        ({"sizes": [np.array([0.0, -1.0])]}, r"`sizes\[0\]` must be non-negative"),
        ({"gains": [np.array([0.5, 1.0])]}, r"candidate 0 of every node is 'none' .* gain 0.5 and size 0.0 at node 0"),
        ({"sizes": [np.array([2.0, 1.0])]}, r"must have gain 0 and size 0, got gain 0.0 and size 2.0 at node 0"),
        ({"loss_limit": 1.0}, r"`losses` must be given when `loss_limit` is, got loss_limit=1.0"),
        ({"losses": [np.zeros(2)], "loss_limit": "x"}, r"`loss_limit` must be a number, got 'x'"),
        ({"losses": [np.zeros(3)]}, r"`losses\[0\]` must have the same length as `gains\[0\]` \(2 candidates\), got 3"),
        ({"spread": [np.array([0.0, -1.0])]}, r"`spread\[0\]` must be non-negative"),
        ({"spread": [np.zeros(2)] * 3}, r"`spread` must have one array per node like `gains` \(1 nodes\), got 3"),
        ({"confidence": 1.0}, r"`spread` must be given when `confidence` is positive, got confidence=1.0"),
    ],
)
def test_selection_validation(change, match):
    kwargs = {**GOOD, **change}
    gains, sizes = kwargs.pop("gains"), kwargs.pop("sizes")
    with pytest.raises(ValueError, match=match):
        select_candidates(gains, sizes, **kwargs)


# ---------------------------------------------------------------------------------------------------------- predictor
from mftc_peft.search import (  # noqa: E402
    AdditiveModel,
    BlockTable,
    ProbeResult,
    build_search_space,
    fit_additive_model,
    layer_index,
    models_from_probes,
    predictor_fidelity,
    sample_architectures,
)


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


# ------------------------------------------------------------------------------------------------------- search space
@pytest.mark.parametrize(
    "name,index",
    [
        ("bert.encoder.layer.3.attention.self.query", 3),
        ("model.layers.12.mlp.down_proj", 12),
        ("transformer.h.0.attn.c_attn", 0),
        ("encoder.block.5.layer.0.SelfAttention.q", 5),
        ("classifier.dense", None),
        ("layer3.conv", None),
    ],
)
def test_layer_index(name, index):
    assert layer_index(name) == index


def _table():
    # Two layers x (query: 2 blocks, dense: 2 blocks) plus a pooler block with no layer.
    names = [f"encoder.layer.{l}.{m}" for l in (0, 1) for m in ("query", "query", "dense", "dense")] + ["pooler"]
    ids = [0, 1, 0, 1] * 2 + [0]
    sizes = [10, 10, 20, 20, 10, 10, 20, 20, 5]
    energy = [1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.1, 0.1, 9.0]
    return BlockTable(tuple(names), np.array(ids), np.array(sizes), np.array(energy))


def test_search_space_by_layer():
    table = _table()
    library = [[0, 4], [1, 2, 3], [0, 4, 8], [5], [2, 3, 1]]  # module 4 duplicates module 1
    space = build_search_space(library, table)
    assert [n.name for n in space.nodes] == ["layer 0", "layer 1", "pooler"]
    layer0 = space.nodes[0].candidates
    assert layer0[0].module is None and layer0[0].size == 0 and layer0[0].blocks == {}
    # Ranked by energy: module 1 (1+3+4... restricted: rows 1,2,3 -> 2+3+4=9), then modules 0 and 2 (row 0: 1.0).
    assert [c.module for c in layer0] == [None, 1, 0]  # module 2 restricted to layer 0 equals module 0: deduped
    assert layer0[1].blocks == {"encoder.layer.0.query": (1,), "encoder.layer.0.dense": (0, 1)}
    assert layer0[1].size == 50 and layer0[1].energy == 9.0
    assert [c.module for c in space.nodes[1].candidates] == [None, 0, 3]  # equal energy: library order
    assert space.n_candidates_per_node == (3, 3, 2)
    np.testing.assert_array_equal(space.sizes()[0], [0, 50, 10])
    assert space.selection([1, 2, 1]) == {
        "encoder.layer.0.query": [1],
        "encoder.layer.0.dense": [0, 1],
        "encoder.layer.1.query": [1],
        "pooler": [0],
    }
    capped = build_search_space(library, table, max_candidates=1)
    assert capped.n_candidates_per_node == (2, 2, 2)


def test_search_space_by_module_and_layer_groups():
    table = _table()
    library = [[0, 4], [1, 2, 3], [5]]
    by_module = build_search_space(library, table, grouping="module")
    assert [n.name for n in by_module.nodes] == ["encoder.layer.0.query", "encoder.layer.0.dense",
                                                 "encoder.layer.1.query"]
    assert [c.blocks for c in by_module.nodes[0].candidates[1:]] == [{"encoder.layer.0.query": (1,)},
                                                                      {"encoder.layer.0.query": (0,)}]
    grouped = build_search_space(library, table, grouping=2)
    assert [n.name for n in grouped.nodes] == ["layers 0-1"]
    assert grouped.nodes[0].candidates[1].blocks == {"encoder.layer.0.query": (1,), "encoder.layer.0.dense": (0, 1)}
    assert grouped.nodes[0].candidates[2].rows == (0, 4)


def test_search_space_feeds_selection():
    table = _table()
    space = build_search_space([[0, 4], [1, 2, 3], [5], [8]], table)
    gains = [e / 10 for e in space.energies()]
    result = select_candidates(gains, space.sizes(), budget=30)
    assert result.total_size <= 30
    assert sum(len(v) for v in space.selection(result.chosen).values()) >= 1


def test_block_table_from_grids():
    grids = {"layer.0.query": BlockGrid("out", 8, 8, 4), "layer.0.output.dense": BlockGrid("in", 6, 8, 4)}
    table = BlockTable.from_grids(grids, {"layer.0.query": [1.0, 2.0], "layer.0.output.dense": [3.0, 4.0]})
    assert table.module_names == ("layer.0.query",) * 2 + ("layer.0.output.dense",) * 2
    np.testing.assert_array_equal(table.sizes, [32, 32, 32, 16])
    np.testing.assert_array_equal(table.layers, [0, 0, 0, 0])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda t: build_search_space([[0]], t, grouping="head"), r"`grouping` must be one of \('layer', 'module'\)"),
        (lambda t: build_search_space([[0]], t, grouping=0), r"or a positive integer, got 0"),
        (lambda t: build_search_space([[0]], t, max_candidates=0), r"`max_candidates` must be a positive integer or"),
        (lambda t: build_search_space([[0], [9]], t), r"`library\[1\]` rows must lie in 0..8 \(the block table\)"),
        (lambda t: build_search_space([[0]], "table"), r"`table` must be a BlockTable, got str"),
        (lambda t: BlockTable(("a",), np.array([0]), np.array([1.5]), np.array([1.0])),
         r"`sizes` must be an integer array of length 1"),
        (lambda t: BlockTable(("a",), np.array([0]), np.array([1]), np.array([-1.0])),
         r"`energy` must be a finite non-negative array of length 1"),
        (lambda t: BlockTable(("a", "a"), np.array([0, 0]), np.array([1, 1]), np.ones(2)),
         r"every \(module name, block id\) pair must appear once"),
        (lambda t: BlockTable.from_grids({"a": BlockGrid("in", 4, 4, 2)}, {"a": [1.0]}),
         r"`energy\['a'\]` must hold one value per block \(2\)"),
    ],
)
def test_search_space_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call(_table())


def test_selection_validation_of_chosen():
    space = build_search_space([[0, 4]], _table())
    with pytest.raises(ValueError, match=r"`chosen` must hold one candidate index per node \(2 nodes"):
        space.selection([1])
