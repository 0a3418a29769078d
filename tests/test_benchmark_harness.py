"""The side-by-side benchmark harness (benchmarks/run.py) on tiny random models: every method builds, trains with a
matched trainable count, and writes one JSON line; the report is generated from those lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_modules import load_benchmark as _load

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MAX_BLOCK = 1024  # largest block of the tiny BERT (32 FFN rows x hidden 32): greedy fills land within one block


def _records(path: Path) -> dict[str, dict]:
    return {r["method"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    _load("run").main(["--smoke", "--in-process", "--device", "cpu", "--out", str(out), "--no-report"])
    return out, _records(out / "smoke.jsonl")


def test_every_method_runs_and_writes_one_line(smoke_results):
    out, records = smoke_results
    from harness.profiles import ALL_METHODS

    assert sorted(records) == sorted(ALL_METHODS)
    assert len((out / "smoke.jsonl").read_text().splitlines()) == len(ALL_METHODS)
    for method, r in records.items():
        assert r["status"] == "ok", (method, r.get("reason"))
        for key in ("test_accuracy", "trainable_params", "trainable_params_no_head", "train_seconds",
                    "warmup_seconds", "wall_seconds", "peak_rss_bytes", "adapter_bytes", "versions", "lr", "steps"):
            assert r[key] is not None, (method, key)
        assert r["phase"] == "test" and r["lr_swept"] is False


def test_trainable_counts_are_matched(smoke_results):
    _, records = smoke_results
    budget = records["lora"]["lora_budget"]
    for method in ("lora", "pissa", "shira"):
        assert records[method]["trainable_params_no_head"] == budget, method
    mftc = records["mftc"]["trainable_params_no_head"]
    assert 0 < mftc <= budget
    assert records["mftc_spectral"]["trainable_params_no_head"] == mftc  # same warm-up, same selection
    for method in ("random_blocks", "top_energy", "mftc_no_search"):
        assert records[method]["budget_source"] == "mftc"
        assert mftc - MAX_BLOCK < records[method]["trainable_params_no_head"] <= mftc, method
    assert 0 < records["mftc_no_cluster"]["trainable_params_no_head"] <= mftc
    # MFTC's default puts half of LoRA's count in a low-rank part; the ablations share it, so only the blocks differ
    low_rank = records["mftc"]["low_rank_elements"]
    assert low_rank == budget // 2
    for method in ("random_blocks", "top_energy", "mftc_no_search", "mftc_no_cluster"):
        assert records[method]["low_rank_elements"] == low_rank, method
    # Every method trains the same head on top of its own parameters.
    heads = {r["trainable_params"] - r["trainable_params_no_head"] for r in records.values()}
    assert len(heads) == 1
    assert records["mftc"]["warmup_seconds"] > 0
    assert records["mftc"]["wall_seconds"] >= records["mftc"]["warmup_seconds"] + records["mftc"]["train_seconds"]


def test_report_is_generated_from_the_lines(smoke_results):
    out, _ = smoke_results
    written = _load("report").write_reports(out)
    assert {p.name for p in written} == {"smoke.md", "README.md"}
    text = (out / "smoke.md").read_text()
    assert "| mftc |" in text and "Targets (issue 6)" in text
    assert (out / "smoke_cls_vs_params.png").exists() and (out / "smoke_cls_vs_wall.png").exists()


def test_report_uses_the_test_runs_of_the_latest_pick():
    report = _load("report")
    base = {"task": "cls", "method": "adalora", "phase": "test", "status": "ok", "metric": "accuracy",
            "trainable_params_no_head": 10, "trainable_params": 12, "steps": 4}
    old = [base | {"lr": 5e-3, "seed": s, "date": "2026-01-01T00:00:00", "test_accuracy": 0.5} for s in range(3)]
    new = [base | {"lr": 1e-3, "seed": s, "date": "2026-01-02T00:00:00", "test_accuracy": 0.7 + s / 100}
           for s in range(3)]
    summary = report.summarise(old + new, "cls")["adalora"]
    assert summary["lr"] == 1e-3 and summary["n"] == 3 and abs(summary["mean"] - 0.71) < 1e-12


def test_subprocess_runs_language_modelling_and_records_skips(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--tasks", "lm", "--methods", "lora,mftc,bias",
               "--device", "cpu", "--out", str(tmp_path), "--no-report"]
    subprocess.run(command, check=True, capture_output=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=120)
    records = _records(tmp_path / "smoke.jsonl")
    assert records["mftc"]["status"] == "ok" and records["lora"]["status"] == "ok"
    assert records["mftc"]["test_perplexity"] > 1
    assert records["bias"]["status"] == "skipped" and "no bias" in records["bias"]["reason"]


def test_trim_padding_is_exact_and_leaves_left_padding_alone():
    import torch
    from tiny_models import CASES_BY_NAME

    sys.path.insert(0, str(BENCHMARKS))
    from harness.tasks import trim_padding

    model = CASES_BY_NAME["bert"].model().eval()
    ids = torch.randint(1, 50, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:], mask[1, 4:], mask[2, 7:] = 0, 0, 0  # right padding: the longest example uses 7 columns
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2])}
    trimmed = trim_padding(batch)
    assert trimmed["input_ids"].shape == (3, 7) and torch.equal(trimmed["labels"], batch["labels"])
    with torch.no_grad():
        torch.testing.assert_close(model(**trimmed).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)
    left = {"input_ids": ids, "attention_mask": mask.flip(1)}
    assert trim_padding(left)["input_ids"].shape == (3, 10)


def test_parallel_workers_run_ablations_after_mftc(tmp_path):
    # With two workers the ablation must still wait for MFTC's run of the same seed and match its count.
    command = [sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--methods", "random_blocks,mftc,lora",
               "--workers", "2", "--device", "cpu", "--out", str(tmp_path), "--no-report"]
    subprocess.run(command, check=True, capture_output=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=300)
    records = _records(tmp_path / "smoke.jsonl")
    assert {r["status"] for r in records.values()} == {"ok"}
    assert records["random_blocks"]["budget_source"] == "mftc"
    mftc = records["mftc"]["trainable_params_no_head"]
    assert mftc - MAX_BLOCK < records["random_blocks"]["trainable_params_no_head"] <= mftc


def test_cpu_profile_runs_secondary_methods_with_one_seed():
    sys.path.insert(0, str(BENCHMARKS))
    from harness.profiles import PROFILES

    cpu = PROFILES["cpu"]
    assert cpu.seeds_for("mftc", [0, 1, 2]) == [0, 1, 2] and cpu.seeds_for("shira", [0, 1, 2]) == [0]
    assert cpu.lr_grid("cls", "lora") != cpu.lr_grid("lm", "lora")
    assert PROFILES["full"].seeds_for("shira", [0, 1, 2]) == [0, 1, 2]
