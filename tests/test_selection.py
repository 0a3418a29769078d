"""Constrained selection (`select_candidates`) against a brute-force oracle, greedy within its gap, validation."""

import itertools
import math

import numpy as np
import pytest

from mftc_peft.selection import select_candidates


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
