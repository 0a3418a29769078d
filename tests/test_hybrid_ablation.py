"""benchmarks/hybrid_ablation.py on tiny models: each half removed and restored exactly, the movements, the table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from tiny_models import CASES_BY_NAME, outputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import hybrid_ablation as bench  # noqa: E402

from mftc_peft import MFTCConfig  # noqa: E402


def _hybrid():
    case = CASES_BY_NAME["bert"]
    config = MFTCConfig(**case.config_kwargs, low_rank=2, init_weights=False)  # random blocks and a random B
    return case, get_peft_model(case.model(), config).eval()


def test_removing_a_half_changes_the_output_and_restores_it_bit_for_bit():
    case, model = _hybrid()
    inputs = case.inputs()
    whole = outputs(model, inputs)
    for names in (("mftc_delta",), ("mftc_lora_B",)):
        with bench.zeroed(model, names):
            assert not torch.allclose(outputs(model, inputs), whole, atol=1e-4)
        assert torch.equal(outputs(model, inputs), whole)
    with bench.zeroed(model, ("mftc_delta", "mftc_lora_B")):
        assert torch.allclose(outputs(model, inputs), outputs(case.model().eval(), inputs), atol=1e-5)


def test_the_halves_are_the_blocks_applied_lines_and_the_scaled_product_of_the_factors():
    _, model = _hybrid()
    for _, layer in bench.mftc_layers(model):
        blocks, part = bench.halves(layer)
        a, b = layer.mftc_lora_A["default"], layer.mftc_lora_B["default"]
        assert torch.allclose(part, layer.mftc_low_rank_scaling["default"] * b @ a)  # nn.Linear: (out, in)
        grid, ids = layer.mftc_grid["default"], layer.block_ids("default")
        expected = torch.zeros_like(part)
        if ids:
            grid.lines(expected, fan_in_fan_out=False)[grid.feature_index(ids)] = layer.applied_delta("default")
            assert torch.allclose(blocks, expected, atol=1e-6)
            assert torch.allclose(bench.as_lines(layer, blocks), layer.applied_delta("default"), atol=1e-6)
        else:
            assert blocks is None
    moved = bench.movement(model)
    selected = sum(1 for _, layer in bench.mftc_layers(model) if layer.block_ids("default"))
    assert moved["weights_with_blocks"] == selected > 0
    assert moved["blocks_rel_median"] > 0 and moved["part_rel_median"] > 0
    assert -1.0 <= moved["cos_blocks_part_median"] <= 1.0


def test_a_run_records_every_score_and_the_table(tmp_path):
    bench.main(["--profile", "smoke", "--task", "cls", "--runs", "hybrid_warmup_4@0.002", "--out", str(tmp_path)])
    (record,) = [json.loads(line) for line in (tmp_path / "hybrid_ablation.jsonl").read_text().splitlines()]
    assert {"full_accuracy", "no_blocks_accuracy", "no_part_accuracy", "full_loss", "no_part_loss"} <= set(record)
    assert record["full_loss"] != record["no_part_loss"] and record["weights_with_blocks"] > 0
    assert f"| smoke | cls | 1x | hybrid_warmup_4 | 0.002 | 0 | {record['full_accuracy']:.4f} |" in (
        tmp_path / "hybrid_ablation.md").read_text()
