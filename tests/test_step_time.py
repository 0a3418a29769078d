"""benchmarks/step_time.py: options per model, method lists, and the table (no model is built here)."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

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


class _Recorder(torch.nn.Module):
    """A one-parameter model that logs when it is stepped."""

    def __init__(self, name: str, log: list[str]):
        super().__init__()
        self.name, self.log, self.weight = name, log, torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.log.append(self.name)
        return SimpleNamespace(loss=(self.weight * x).sum())


def test_methods_take_turns_in_reverse_order_on_odd_steps_and_warmup_steps_are_not_timed():
    log = []
    models = {"lora": _Recorder("lora", log), "mftc": _Recorder("mftc", log)}
    times = bench.time_steps(models, {"x": torch.ones(2)}, steps=3, warmup=1, device=torch.device("cpu"))
    assert log == ["lora", "mftc", "mftc", "lora", "lora", "mftc", "mftc", "lora"]
    assert {name: len(t) for name, t in times.items()} == {"lora": 3, "mftc": 3}
