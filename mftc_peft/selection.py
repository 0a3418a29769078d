"""Constrained module selection: one candidate per node under a parameter budget and an optional loss limit.

The problem is a multiple-choice knapsack with (at most) two resource rows:

    maximise    sum_i v[i, x_i]               v = gain - confidence * spread
    subject to  sum_i size[i, x_i] <= budget
                sum_i loss[i, x_i] <= loss_limit   (if given)

with exactly one candidate x_i per node i; candidate 0 is "none" (train nothing: gain 0, size 0). `select_candidates`
validates and dispatches; `_solve_exact` (HiGHS branch-and-bound through `scipy.optimize.milp`) and `_solve_greedy`
(ratio greedy plus pair swaps) trust their inputs. Both report the LP-relaxation bound, so every answer comes with a
certified optimality gap.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from .checks import check_number

logger = logging.getLogger(__name__)

METHODS = ("exact", "greedy", "auto")
# "auto" solves exactly up to this many binaries (nodes x candidates); HiGHS handles that in well under a second on the
# multiple-choice structure, while the greedy's cost grows only linearly.
AUTO_EXACT_MAX_VARIABLES = 20_000
# Up-moves considered per pair-swap pass of the greedy; bounds a pass at O(K * nodes * candidates).
_SWAP_UP_MOVES = 32
_MILP_STATUS = {0: "optimal", 1: "limit_reached", 2: "infeasible", 3: "unbounded", 4: "other"}


@dataclass(frozen=True)
class SelectionResult:
    """Outcome of `select_candidates`.

    `bound` is an upper bound on the best achievable objective (the LP relaxation), so `gap = bound - objective` is a
    certificate: 0 (up to solver tolerance) means provably optimal. `relative_gap = gap / max(|bound|, 1e-12)`.
    `status` is the solver's word: "optimal", "limit_reached" (exact, stopped early) or "heuristic" (greedy).
    """

    chosen: tuple[int, ...]
    objective: float
    bound: float
    gap: float
    relative_gap: float
    total_size: float
    total_loss: float | None
    method: str
    status: str


# --------------------------------------------------------------------------------------------------------- validation
def _check_arrays(arrays, name: str, reference: list[np.ndarray] | None, *, nonnegative: bool = False):
    """Per-node 1-D finite float arrays; with `reference`, one per node of the same length as it."""
    if isinstance(arrays, (str, bytes)):
        raise ValueError(f"`{name}` must be a sequence over nodes of 1-D arrays over candidates, got {arrays!r}")
    try:
        out = [np.asarray(a, dtype=float) for a in arrays]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a sequence over nodes of 1-D numeric arrays, got {arrays!r}") from exc
    if reference is not None and len(out) != len(reference):
        raise ValueError(
            f"`{name}` must have one array per node like `gains` ({len(reference)} nodes), got {len(out)}"
        )
    for i, a in enumerate(out):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"`{name}[{i}]` must be a non-empty 1-D array over candidates, got shape {a.shape}")
        if reference is not None and a.size != reference[i].size:
            raise ValueError(
                f"`{name}[{i}]` must have the same length as `gains[{i}]` ({reference[i].size} candidates), "
                f"got {a.size}"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError(f"`{name}[{i}]` must be finite, got {a!r}")
        if nonnegative and np.any(a < 0):
            raise ValueError(f"`{name}[{i}]` must be non-negative, got {a!r}")
    return out


def select_candidates(
    gains: Sequence,
    sizes: Sequence,
    *,
    budget: float,
    losses: Sequence | None = None,
    loss_limit: float | None = None,
    spread: Sequence | None = None,
    confidence: float = 0.0,
    method: str = "exact",
) -> SelectionResult:
    """Choose one candidate per node maximising the predicted gain within a parameter budget and a loss limit.

    Parameters
    ----------
    gains, sizes : sequence over nodes of 1-D arrays over candidates
        Predicted gain (e.g. the accuracy delta b^A) and trainable-parameter count of each candidate. Index 0 of every
        node is "none" and must have gain 0 and size 0, so training nothing is always within budget.
    budget : float
        Upper bound on the summed size (non-negative; `math.inf` for none).
    losses : sequence over nodes of 1-D arrays, optional
        Predicted loss delta b^L of each candidate (relative to the base network, so "none" is normally 0). Reported
        as `total_loss`; constrained only when `loss_limit` is given.
    loss_limit : float, optional
        Upper bound on the summed loss deltas (i.e. the loss threshold minus the base loss). Requires `losses`.
    spread, confidence :
        Per-candidate spread sigma (non-negative) and the multiplier z of the lower confidence bound
        gain - z * sigma that is maximised. `spread` is required when `confidence` > 0.
    method : {"exact", "greedy", "auto"}
        "exact": 0-1 program through `scipy.optimize.milp`. "greedy": best gain-per-parameter moves, then pair swaps,
        for very large instances. "auto": exact up to `AUTO_EXACT_MAX_VARIABLES` binaries, greedy above.

    Raises
    ------
    ValueError
        On invalid arguments, and when no selection meets the loss limit (the message says by how much).
    """
    gains_ = _check_arrays(gains, "gains", None)
    if not gains_:
        raise ValueError(f"`gains` must hold at least one node, got {gains!r}")
    sizes_ = _check_arrays(sizes, "sizes", gains_, nonnegative=True)
    budget = check_number("budget", budget, minimum=0)
    confidence = check_number("confidence", confidence, minimum=0, allow_inf=False)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    for i, (g, s) in enumerate(zip(gains_, sizes_)):
        if g[0] != 0 or s[0] != 0:
            raise ValueError(
                f"candidate 0 of every node is 'none' and must have gain 0 and size 0, got gain {float(g[0])!r} and "
                f"size {float(s[0])!r} at node {i} (pass gains as deltas relative to the base network)"
            )
    losses_ = None if losses is None else _check_arrays(losses, "losses", gains_)
    if loss_limit is not None:
        if losses_ is None:
            raise ValueError(f"`losses` must be given when `loss_limit` is, got loss_limit={loss_limit!r}")
        loss_limit = check_number("loss_limit", loss_limit)
    values = gains_
    if spread is not None:
        spread_ = _check_arrays(spread, "spread", gains_, nonnegative=True)
        values = [g - confidence * s for g, s in zip(gains_, spread_)]
    elif confidence > 0:
        raise ValueError(f"`spread` must be given when `confidence` is positive, got confidence={confidence!r}")
    if method == "auto":
        n_variables = sum(v.size for v in values)
        method = "exact" if n_variables <= AUTO_EXACT_MAX_VARIABLES else "greedy"
    limit = math.inf if loss_limit is None else loss_limit
    _check_loss_feasible(sizes_, losses_, budget, limit)
    solve = _solve_exact if method == "exact" else _solve_greedy
    return solve(values, sizes_, losses_, budget, limit)


# ------------------------------------------------------------------------------------------------------ shared pieces
def _stack(arrays: list[np.ndarray], fill: float) -> np.ndarray:
    """(nodes, max candidates) array, padded with `fill` where a node has fewer candidates."""
    out = np.full((len(arrays), max(a.size for a in arrays)), fill)
    for i, a in enumerate(arrays):
        out[i, : a.size] = a
    return out


def _program(values, sizes, losses, budget: float, limit: float):
    """Flattened 0-1 program: cost vector (minimised), integrality-free constraints, node offsets."""
    counts = np.array([v.size for v in values])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n = int(offsets[-1])
    node_of = np.repeat(np.arange(len(values)), counts)
    one_per_node = sparse.csr_matrix((np.ones(n), (node_of, np.arange(n))), shape=(len(values), n))
    constraints = [LinearConstraint(one_per_node, 1, 1)]
    if math.isfinite(budget):
        constraints.append(LinearConstraint(np.concatenate(sizes)[None, :], -np.inf, budget))
    if losses is not None and math.isfinite(limit):
        constraints.append(LinearConstraint(np.concatenate(losses)[None, :], -np.inf, limit))
    return -np.concatenate(values), constraints, offsets


def _lp_bound(values, sizes, losses, budget: float, limit: float) -> float:
    cost, constraints, _ = _program(values, sizes, losses, budget, limit)
    res = milp(cost, constraints=constraints, bounds=Bounds(0, 1), integrality=np.zeros(cost.size))
    if res.x is None:  # cannot happen after `_check_loss_feasible`; keep the bound honest rather than crash
        return math.inf
    return float(-res.fun)


def _min_loss_within_budget(sizes, losses, budget: float) -> tuple[float, np.ndarray | None]:
    """Smallest achievable loss sum among selections within budget (exact), and one selection achieving it."""
    zeros = [np.zeros_like(s) for s in sizes]
    cost, constraints, offsets = _program(zeros, sizes, None, budget, math.inf)
    res = milp(np.concatenate(losses), constraints=constraints, bounds=Bounds(0, 1), integrality=np.ones(cost.size))
    if res.x is None:
        return math.inf, None
    return float(res.fun), _decode(res.x, offsets)


def _check_loss_feasible(sizes, losses, budget: float, limit: float) -> None:
    if losses is None or not math.isfinite(limit):
        return
    unconstrained = float(sum(l.min() for l in losses))
    if unconstrained > limit:
        raise ValueError(
            f"`loss_limit` cannot be met: the minimal achievable loss sum {unconstrained:.6g} exceeds "
            f"loss_limit={limit!r} by {unconstrained - limit:.6g}"
        )
    # Per node the smallest loss, and among equal losses the smallest size: if that fits the budget, both hold.
    pick = [np.lexsort((s, l))[0] for l, s in zip(losses, sizes)]
    if sum(s[c] for s, c in zip(sizes, pick)) <= budget:
        return
    best, _ = _min_loss_within_budget(sizes, losses, budget)
    if best > limit + 1e-9 * max(1.0, abs(limit)):
        raise ValueError(
            f"`loss_limit` and `budget` cannot be met together: the minimal loss sum within budget={budget!r} is "
            f"{best:.6g}, which exceeds loss_limit={limit!r} by {best - limit:.6g} (choosing 'none' everywhere "
            f"meets the budget; raise `loss_limit` or `budget`)"
        )


def _decode(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.array([int(np.argmax(x[a:b])) for a, b in zip(offsets[:-1], offsets[1:])])


def _result(chosen, values, sizes, losses, bound: float, method: str, status: str) -> SelectionResult:
    objective = float(sum(v[c] for v, c in zip(values, chosen)))
    # The bound is valid for the true optimum, which is at least this feasible objective; the max() only removes
    # solver round-off (a bound a hair below an exact optimum) so that the gap is never negative.
    bound = max(bound, objective)
    gap = bound - objective
    total_loss = None if losses is None else float(sum(l[c] for l, c in zip(losses, chosen)))
    return SelectionResult(
        chosen=tuple(int(c) for c in chosen),
        objective=objective,
        bound=bound,
        gap=gap,
        relative_gap=gap / max(abs(bound), 1e-12),
        total_size=float(sum(s[c] for s, c in zip(sizes, chosen))),
        total_loss=total_loss,
        method=method,
        status=status,
    )


# -------------------------------------------------------------------------------------------------------------- exact
def _solve_exact(values, sizes, losses, budget: float, limit: float) -> SelectionResult:
    cost, constraints, offsets = _program(values, sizes, losses, budget, limit)
    res = milp(cost, constraints=constraints, bounds=Bounds(0, 1), integrality=np.ones(cost.size))
    status = _MILP_STATUS.get(res.status, "other")
    if res.x is None:
        raise RuntimeError(f"the 0-1 program could not be solved: {res.message} (status {status})")
    if status != "optimal":
        warnings.warn(f"milp stopped before proving optimality ({res.message}); reporting its best selection")
    chosen = _decode(res.x, offsets)
    bound = _lp_bound(values, sizes, losses, budget, limit)
    result = _result(chosen, values, sizes, losses, bound, "exact", status)
    over_loss = 0.0 if result.total_loss is None else result.total_loss - limit
    if result.total_size - budget > 1e-9 * max(1.0, budget) or over_loss > 1e-9 * max(1.0, abs(limit)):
        # HiGHS accepts rows violated within its feasibility tolerance; say so rather than hide it.
        warnings.warn(
            f"milp's selection exceeds a constraint by solver tolerance: size {result.total_size!r} vs budget "
            f"{budget!r}, loss excess {over_loss:.3g}"
        )
    logger.info("exact selection: objective %.6g, bound %.6g, size %g", result.objective, bound, result.total_size)
    return result


# ------------------------------------------------------------------------------------------------------------- greedy
class _State:
    """Current selection and the (nodes, candidates) deltas of every single-node move from it."""

    def __init__(self, values, sizes, losses, chosen):
        self.v = _stack(values, -np.inf)  # padding is never worth moving to ...
        self.s = _stack(sizes, np.inf)  # ... nor affordable
        self.l = np.zeros_like(self.s) if losses is None else _stack(losses, np.inf)
        self.chosen = np.array(chosen, dtype=int)
        self.rows = np.arange(self.v.shape[0])

    def deltas(self):
        at = (self.rows, self.chosen)
        return (self.v - self.v[at][:, None], self.s - self.s[at][:, None], self.l - self.l[at][:, None])

    def totals(self):
        at = (self.rows, self.chosen)
        return self.v[at].sum(), self.s[at].sum(), self.l[at].sum()


def _tolerance(scale: np.ndarray) -> float:
    finite = np.abs(scale[np.isfinite(scale)])
    return 1e-12 * max(1.0, float(finite.max()) if finite.size else 1.0)


def _greedy_moves(state: _State, budget: float, limit: float, tol: float) -> None:
    """Take the feasible improving move with the best gain per added parameter until none is left."""
    while True:
        dv, ds, dl = state.deltas()
        _, size, loss = state.totals()
        feasible = (size + ds <= budget) & (loss + dl <= limit) & (dv > tol)
        if not feasible.any():
            return
        # Moves that add no parameters come first (infinite ratio), ranked by gain; then gain per parameter.
        free = feasible & (ds <= 0)
        if free.any():
            score = np.where(free, dv, -np.inf)
        else:
            score = np.divide(dv, ds, out=np.full(dv.shape, -np.inf), where=feasible)
        i, c = np.unravel_index(np.argmax(score), score.shape)
        state.chosen[i] = c


def _repair_loss(state: _State, budget: float, limit: float) -> bool:
    """From all-"none", lower the loss sum below the limit by the moves with most loss removed per parameter."""
    while True:
        dv, ds, dl = state.deltas()
        _, size, loss = state.totals()
        if loss <= limit:
            return True
        helpful = (dl < 0) & (size + ds <= budget)
        if not helpful.any():
            return False
        # Free moves first (ranked by loss removed), then loss removed per added parameter.
        free = helpful & (ds <= 0)
        if free.any():
            score = np.where(free, -dl, -np.inf)
        else:
            score = np.divide(-dl, ds, out=np.full(dl.shape, -np.inf), where=helpful)
        i, c = np.unravel_index(np.argmax(score), score.shape)
        state.chosen[i] = c


def _best_swap(state: _State, budget: float, limit: float, tol: float):
    """Best improving pair of moves on two different nodes that is feasible together (each alone is not)."""
    dv, ds, dl = state.deltas()
    _, size, loss = state.totals()
    up = np.flatnonzero(dv.ravel() > tol)
    if up.size == 0:
        return None
    up = up[np.argsort(-dv.ravel()[up], kind="stable")[:_SWAP_UP_MOVES]]
    node = np.repeat(state.rows, dv.shape[1])
    fdv, fds, fdl = dv.ravel(), ds.ravel(), dl.ravel()
    best, best_pair = tol, None
    for u in up:
        total = fdv[u] + fdv
        ok = (node != node[u]) & (size + fds[u] + fds <= budget) & (loss + fdl[u] + fdl <= limit) & (total > best)
        if ok.any():
            d = int(np.argmax(np.where(ok, total, -np.inf)))
            best, best_pair = total[d], (u, d)
    if best_pair is None:
        return None
    width = dv.shape[1]
    return [divmod(int(m), width) for m in best_pair]


def _solve_greedy(values, sizes, losses, budget: float, limit: float) -> SelectionResult:
    state = _State(values, sizes, losses, np.zeros(len(values), dtype=int))
    tol = _tolerance(state.v)
    if not _repair_loss(state, budget, limit):
        # The loss limit is reachable (checked up front) but not by the ratio rule: start from the exact
        # minimum-loss selection instead, which costs one feasibility 0-1 program.
        warnings.warn("greedy could not meet `loss_limit` by itself; starting from the exact minimum-loss selection")
        _, start = _min_loss_within_budget(sizes, losses, budget)
        state.chosen = start
    max_rounds = 10 * len(values) + 10
    for _ in range(max_rounds):
        _greedy_moves(state, budget, limit, tol)
        swap = _best_swap(state, budget, limit, tol)
        if swap is None:
            break
        for i, c in swap:
            state.chosen[i] = c
    bound = _lp_bound(values, sizes, losses, budget, limit)
    result = _result(state.chosen, values, sizes, losses, bound, "greedy", "heuristic")
    logger.info(
        "greedy selection: objective %.6g, bound %.6g (gap %.3g), size %g",
        result.objective, bound, result.gap, result.total_size,
    )
    return result
