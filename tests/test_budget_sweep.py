"""Issue 16 item 1: the budget sweep (benchmarks/run.py --budgets / the cpu_budget profile) on tiny models, end to end:
LoRA's rank follows the budget, every other method is matched to that count, each budget is swept on its own, and the
report draws and tables every budget."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from benchmark_modules import load_benchmark as _load

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from harness import sweep  # noqa: E402
from harness.profiles import PROFILES, rank_for  # noqa: E402

MAX_BLOCK = 1024  # largest block of the tiny BERT (32 FFN rows x hidden 32): greedy fills land within one block
SMOKE_BUDGETS = (0.25, 1.0, 2.0)  # the tiny BERT cannot hold 4x (SHiRA refuses r=32 on a 32 x 32 weight)


def test_rank_follows_the_budget():
    assert [rank_for(m) for m in (0.25, 1, 4)] == [2, 8, 32]
    with pytest.raises(ValueError, match="whole rank >= 1.*got 0.3"):
        rank_for(0.3)
    with pytest.raises(ValueError, match="got 0.0625"):
        rank_for(0.0625)  # rank 0.5
    run = _load("run")
    assert run.parse_args(["--budgets", "4,0.25,1"]).budgets == (0.25, 1.0, 4.0)
    with pytest.raises(SystemExit):
        run.parse_args(["--budgets", "0.3"])


def _sweep_record(lr, value, metric="accuracy", status="ok"):
    return {"lr": lr, "metric": metric, "status": status, f"val_{metric}": value, "val_loss": 0.5}


def test_a_best_rate_on_the_edge_extends_the_bracket_with_its_spacing():
    bracket = [_sweep_record(2e-3, 0.70), _sweep_record(5e-3, 0.72), _sweep_record(1e-2, 0.75)]
    assert sweep.edge_extension(bracket) == pytest.approx(2e-2)
    bracket[0]["val_accuracy"] = 0.80
    assert sweep.edge_extension(bracket) == pytest.approx(8e-4)
    bracket[1]["val_accuracy"] = 0.90
    assert sweep.edge_extension(bracket) is None  # interior
    lm = [_sweep_record(1e-3, 40.0, "perplexity"), _sweep_record(3e-3, 38.0, "perplexity"),
          _sweep_record(1e-2, 36.0, "perplexity")]
    assert sweep.edge_extension(lm) == 0.0333  # lowest perplexity at the top; 1e-2 x (1e-2 / 3e-3), 3 digits
    assert sweep.edge_extension([_sweep_record(1e-3, 0.7)]) is None  # one rate: no spacing to copy
    failed = [_sweep_record(1e-3, None, status="failed"), _sweep_record(2e-3, None, status="skipped")]
    assert sweep.edge_extension(failed) is None
    assert sweep.best([_sweep_record(1e-3, math.nan), _sweep_record(2e-3, 0.6)])["lr"] == 2e-3


def test_a_wide_spacing_around_the_best_rate_gets_a_midpoint_towards_the_better_neighbour():
    # the LM sweep of NOTES 87: LoRA's best, 3e-3, sat between 1e-3 and 1e-2; 5e-3 turned out better still
    lm = [_sweep_record(1e-3, 41.43, "perplexity"), _sweep_record(3e-3, 38.27, "perplexity"),
          _sweep_record(1e-2, 40.30, "perplexity")]
    assert sweep.refinement(lm, max_ratio=3.0) == 0.0055  # sqrt(3e-3 x 1e-2), 2 digits
    assert sweep.refinement(lm, max_ratio=4.0) is None  # 3.3x apart is fine at this ratio
    lm[0]["val_perplexity"] = 39.0  # the lower neighbour is now the better one
    assert sweep.refinement(lm, max_ratio=2.5) == 0.0017
    assert sweep.refinement(lm + [_sweep_record(1.7e-3, 38.5, "perplexity")], max_ratio=2.5) is None  # 1.8x: done
    cls = [_sweep_record(2e-3, 0.70), _sweep_record(5e-3, 0.75), _sweep_record(1e-2, 0.72)]
    assert sweep.refinement(cls, max_ratio=3.0) is None  # 2.5x and 2x apart
    edge = [_sweep_record(1e-2, 40.0, "perplexity"), _sweep_record(3.33e-2, 39.0, "perplexity")]
    assert sweep.refinement(edge, max_ratio=3.0) == 0.018  # the best on an edge has one neighbour
    lonely = [_sweep_record(1e-3, None, status="failed"), _sweep_record(1e-2, 0.6)]
    assert sweep.refinement(lonely, max_ratio=3.0) is None  # no scored neighbour
    assert sweep.refinement([_sweep_record(1e-3, None, status="failed")], max_ratio=3.0) is None


class _ScriptedRunner:
    """Stands in for run.py's Runner: every staged spec gets the validation perplexity its rate has in `values`."""

    def __init__(self, values):
        self.values, self.staged = values, []

    def stage(self, specs):
        self.staged += specs
        return [{"lr": s["lr"], "metric": "perplexity", "status": "ok", "val_perplexity": self.values[s["lr"]],
                 "val_loss": 0.5} for s in specs]


def test_the_budget_profile_refines_a_wide_lm_sweep_and_tests_at_the_refined_pick():
    from argparse import Namespace

    runner = _ScriptedRunner({1e-3: 41.43, 3e-3: 38.27, 1e-2: 40.30, 0.0055: 36.94})
    args = Namespace(device="cpu", extend_edges=1)
    _load("run").run_unit("lm", 1.0, 1000, ["lora"], [0, 1], PROFILES["cpu_budget"], args, runner)
    sweeps = [(s["lr"], bool(s.get("lr_refined"))) for s in runner.staged if s["phase"] == "sweep"]
    assert sweeps == [(1e-3, False), (3e-3, False), (1e-2, False), (0.0055, True)]
    assert [(s["seed"], s["lr"]) for s in runner.staged if s["phase"] == "test"] == [(0, 0.0055), (1, 0.0055)]

def test_budget_free_methods_run_once():
    run = _load("run")
    methods = ["mftc", "lora", "full", "bias"]
    assert run.methods_at(methods, 0.25, (0.25, 1.0, 4.0)) == ["mftc", "lora"]
    assert run.methods_at(methods, 1.0, (0.25, 1.0, 4.0)) == methods
    assert run.methods_at(methods, 2.0, (2.0, 4.0)) == methods  # no 1x: the first budget


def test_budget_profiles():
    cpu = PROFILES["cpu_budget"]
    assert cpu.budgets == (0.25, 1.0, 4.0) and cpu.seeds >= 3 and set(cpu.tasks) == {"cls", "lm"}
    assert set(cpu.methods) == {"mftc", "lora", "random_blocks", "shira"}
    for task in cpu.tasks:
        for method in cpu.methods:
            assert len(cpu.lr_grid(task, method)) >= 3, (task, method)
    assert _load("run").parse_args(["--profile", "cpu_budget", "--smoke"]).profile == "cpu_budget_smoke"


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget")
    _load("run").main(["--profile", "cpu_budget", "--smoke", "--tasks", "cls", "--in-process", "--out", str(out)])
    records = [json.loads(line) for line in (out / "cpu_budget_smoke.jsonl").read_text().splitlines()]
    return out, records


def test_every_budget_is_swept_and_run_with_matched_counts(budget_run):
    _, records = budget_run
    assert {r["status"] for r in records} == {"ok"}, [r.get("reason") for r in records if r["status"] != "ok"]
    tests = {(r["method"], r["budget_multiple"], r["seed"]): r for r in records if r["phase"] == "test"}
    lora = {b: tests["lora", b, 0]["trainable_params_no_head"] for b in SMOKE_BUDGETS}
    assert lora[0.25] * 4 == lora[1.0] and lora[2.0] == 2 * lora[1.0]  # a LoRA count is linear in its rank
    for (method, budget, seed), r in tests.items():
        assert r["lora_rank"] == rank_for(budget) and r["lora_budget"] == lora[budget]
        if method in ("lora", "shira"):
            assert r["trainable_params_no_head"] == lora[budget], (method, budget)
        mftc = tests["mftc", budget, seed]["trainable_params_no_head"]
        assert 0 < mftc <= lora[budget]
        if method == "random_blocks":
            assert r["budget_source"] == "mftc" and mftc - MAX_BLOCK < r["trainable_params_no_head"] <= mftc
    assert {k[1:] for k in tests} == {(b, s) for b in SMOKE_BUDGETS for s in (0, 1)}
    swept = {(r["method"], r["budget_multiple"]) for r in records if r["phase"] == "sweep"}
    assert swept == {(m, b) for m in ("mftc", "lora", "random_blocks", "shira") for b in SMOKE_BUDGETS}


def test_report_draws_and_tables_every_budget(budget_run):
    out, records = budget_run
    text = (out / "cpu_budget_smoke.md").read_text()
    for budget, rank in ((0.25, 2), (1, 8), (2, 16)):
        assert f"#### {budget:g}x LoRA r=8's count: LoRA r={rank}," in text
    assert text.count("| method | lr | seeds | test metric (mean ± std) | MFTC - method (95% CI) |") == 3
    assert "Budget targets (issue 16):" in text and "MFTC at or above lora at 0.25x" in text
    assert "| method | 0.25x | 1x | 2x | 1x - 0.25x (95% CI) | 2x - 1x (95% CI) |" in text
    assert (out / "cpu_budget_smoke_cls_vs_params.png").exists() and (out / "cpu_budget_smoke_cls_vs_wall.png").exists()
    report = _load("report")
    from harness.report_plots import method_lines

    by_budget = {b: report.summarise(records, "cls", b) for b in SMOKE_BUDGETS}
    xs, ys, errs = method_lines(by_budget, "params")["lora"]
    assert xs == sorted(xs) and len(xs) == 3 and len(errs) == 3  # one line through the three budgets
