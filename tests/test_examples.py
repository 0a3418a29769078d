"""examples/: each script's `main` runs end to end with tiny step counts."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng(devices=[]):  # the Trainer seeds torch's global RNG
        yield


def test_sequence_classification_trainer(tmp_path):
    metrics = load("sequence_classification_trainer").main([
        "--max-steps", "2", "--train-size", "32", "--eval-size", "16", "--batch-size", "8", "--warmup-steps", "2",
        "--output-dir", str(tmp_path / "out"),
    ])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "warmup_report.json").is_file()


def test_load_merge_switch(tmp_path):
    result = load("load_merge_switch").main([
        "--max-steps", "2", "--train-size", "16", "--batch-size", "8", "--output-dir", str(tmp_path / "out"),
    ])
    assert result["merged_type"] == "BertForSequenceClassification"
    assert (tmp_path / "out" / "late" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "early" / "adapter_config.json").is_file()


@pytest.mark.slow  # first use dequantises the packaged 4-bit GGUF (~30 s); the warm-up on 30 layers is slow on CPU
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_causal_lm_smollm2(tmp_path, dtype):
    result = load("causal_lm_smollm2").main([
        "--max-steps", "2", "--warmup-steps", "2", "--batch-size", "2", "--chunk-length", "32", "--eval-chunks", "2",
        "--output-dir", str(tmp_path / "out"), "--dtype", dtype,
    ])
    assert result["perplexity_before"] > 1 and result["perplexity_after"] > 1
    assert len(result["train_losses"]) == 2
    assert result["trained_dtypes"] == ["torch.float32"]  # on a bfloat16 base too (PEFT's autocast_adapter_dtype)
    assert (tmp_path / "out" / "adapter_config.json").is_file()
