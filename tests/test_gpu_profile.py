"""Issue 16 item 3: the gpu profile has the protocol's sizes, and its launcher runs end to end on the CPU with
`--smoke` (tiny models, two long-lived worker processes). Nothing here needs a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_modules import load_benchmark as _load

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from harness.profiles import ALL_METHODS, PROFILES  # noqa: E402

REQUIRED = ("mftc", "lora", "adalora", "pissa")
ABLATIONS = ("random_blocks", "top_energy", "mftc_no_search", "mftc_no_cluster")


def test_gpu_profile_has_the_protocols_sizes():
    gpu = PROFILES["gpu"]
    assert gpu.device == "cuda" and gpu.seeds == 3 and gpu.sweep and set(gpu.tasks) == {"cls", "lm"}
    assert set(REQUIRED + ABLATIONS) <= set(gpu.methods) and set(gpu.methods) == set(ALL_METHODS)
    cls, lm = gpu.settings["cls"], gpu.settings["lm"]
    assert cls.n_train - cls.n_val == 2000 and cls.epochs == 3 and cls.n_test == 1000
    assert cls.epochs * math.ceil((cls.n_train - cls.n_val) / cls.batch_size) == 189
    assert lm.steps == 120 and lm.batch_size == 8 and lm.max_length == 128
    for task in gpu.tasks:
        for method in gpu.methods:
            assert len(gpu.lr_grid(task, method)) == 3, (task, method)


def test_smoke_flag_picks_the_profiles_twin():
    run = _load("run")
    assert run.parse_args(["--profile", "gpu", "--smoke"]).profile == "gpu_smoke"
    assert run.parse_args(["--smoke"]).profile == "smoke"
    assert run.parse_args(["--profile", "quick", "--smoke"]).profile == "smoke"
    assert run.parse_args([]).profile == "quick"
    assert PROFILES["gpu_smoke"].tiny_models and PROFILES["gpu_smoke"].device == "cpu"


@pytest.mark.skipif(_load("run").default_device() == "cuda", reason="checks the refusal on a machine without CUDA")
def test_gpu_profile_refuses_a_machine_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device.*--profile gpu --smoke"):
        _load("run").main(["--profile", "gpu", "--out", str(tmp_path)])


def test_launcher_smoke_runs_the_pipeline_in_reused_workers(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_benchmark.sh"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_smoke.jsonl").read_text().splitlines()]
    smoke = PROFILES["gpu_smoke"]
    assert {r["status"] for r in records if not (r["task"] == "lm" and r["method"] == "bias")} == {"ok"}
    assert {r["status"] for r in records if r["task"] == "lm" and r["method"] == "bias"} == {"skipped"}
    assert len({r["worker_pid"] for r in records}) <= 2 and max(r["worker_run_index"] for r in records) > 0
    tests = [r for r in records if r["phase"] == "test"]
    assert {(r["task"], r["method"], r["seed"]) for r in tests} == {
        (t, m, s) for t in smoke.tasks for m in smoke.methods for s in range(smoke.seeds)}
    # Two-point brackets: every pick sits on an edge, so each bracket got one more rate.
    extended = {(r["task"], r["method"]) for r in records if r.get("lr_extended")}
    assert extended == {(t, m) for t in smoke.tasks for m in smoke.methods} - {("lm", "bias")}
    assert all(r["budget_source"] == "mftc" for r in tests if r["method"] in ("random_blocks", "top_energy"))
    session = json.loads((tmp_path / "gpu_smoke_sessions.jsonl").read_text().splitlines()[-1])
    assert session["workers"] == 2 and session["reuse_processes"] and session["executed"] == len(records)
    text = (tmp_path / "gpu_smoke.md").read_text()
    assert "MFTC - method (95% CI)" in text and "long-lived worker processes" in text
    assert "peak RSS" in text and "| n/a |" in text  # a reused worker's RSS is not a run's


def test_the_benchmark_profiles_warm_up_as_the_product_does_by_default():
    # The benchmarks measure MFTC as a user gets it: the warm-up's micro-batches are MFTCConfig's default on every
    # real-model profile (the method lab pins its own counts, `selection_study.LAB_WARMUP_STEPS`).
    from mftc_peft import MFTCConfig

    default = MFTCConfig().warmup_steps
    for name in ("cpu", "cpu_budget", "gpu", "full", "lab_long"):
        for task, settings in PROFILES[name].settings.items():
            assert settings.warmup_steps == default, (name, task, settings.warmup_steps)
