"""benchmarks/step_time.py: options per model, method lists, and the table (no model is built here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_time as bench  # noqa: E402
from step_time_models import MODELS, parse_methods  # noqa: E402


def test_each_model_has_its_own_defaults_and_file_names():
    minilm, smollm2 = bench.parse_args([]), bench.parse_args(["--model", "smollm2"])
    assert (minilm.model, minilm.batch, minilm.seq, minilm.methods) == ("minilm-shape", 32, 64,
                                                                         ["lora", "mftc", "head_only", "full"])
    assert (smollm2.batch, smollm2.seq, smollm2.methods) == (8, 128, ["lora", "mftc", "full"])
    assert bench.parse_args(["--model", "smollm2", "--batch", "1", "--seq", "16"]).batch == 1
    assert MODELS["minilm-shape"].stem == "step_time" and MODELS["smollm2"].stem == "step_time_smollm2"


def test_methods_keep_the_turn_order_and_reject_what_the_model_lacks():
    assert parse_methods(MODELS["smollm2"], "mftc, lora") == ["lora", "mftc"]
    with pytest.raises(ValueError, match="subset of lora,mftc,full, got 'head_only'"):
        parse_methods(MODELS["smollm2"], "head_only")
    with pytest.raises(ValueError, match="got ''"):
        parse_methods(MODELS["minilm-shape"], "")


def test_table_has_a_ratio_column_per_reference_that_ran():
    record = {"median_step_s": {"lora": 2.0, "mftc": 1.0}, "trainable_without_head": {"lora": 1000, "mftc": 1000}}
    assert bench.table(record).splitlines() == [
        "| method | trainable (no head) | median step (s) | vs LoRA |", "|---|---|---|---|",
        "| lora | 1,000 | 2.000 | 1.000 |", "| mftc | 1,000 | 1.000 | 0.500 |",
    ]
    only = {"median_step_s": {"mftc": 1.0}, "trainable_without_head": {"mftc": 7}}
    assert bench.table(only).splitlines() == ["| method | trainable (no head) | median step (s) |", "|---|---|---|",
                                              "| mftc | 7 | 1.000 |"]
