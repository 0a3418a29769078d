"""`MFTCConfig.low_rank_share`: a low-rank part sized as a share of the budget, its rank resolved at injection.

The rank is the largest whose part fits the share; the warm-up's blocks get the rest of the budget; a share too small
for one rank warns and trains blocks only; a `low_rank` set with it must agree, which is how a saved adapter is checked
against the model and budget it is loaded with; the default is half the budget, and a config saved before the option
existed loads without a part.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_warmup import token_batches
from tiny_models import CASES_BY_NAME, outputs

import mftc_peft
from mftc_peft import MFTCConfig

CASE = CASES_BY_NAME["llama_gqa"]


def per_rank_elements(case=CASE) -> tuple[int, int]:
    """(in + out summed over the target weights, in * out summed): one rank's elements and all target elements."""
    grids = get_peft_model(case.model(), MFTCConfig(**copy.deepcopy(case.config_kwargs))).base_model.block_grids()
    return (sum(g.in_features + g.out_features for g in grids.values()),
            sum(g.in_features * g.out_features for g in grids.values()))


def make(case=CASE, **overrides):
    kwargs = {**copy.deepcopy(case.config_kwargs), "init_weights": False, **overrides}
    return get_peft_model(case.model(), MFTCConfig(**kwargs)).eval()


def ranks(model) -> set[int]:
    return {layer.mftc_lora_A["default"].shape[0] for _, layer in model.base_model.mftc_layers("default")}


@pytest.mark.parametrize("share, budget_ranks, expected", [(0.5, 8, 4), (0.5, 9, 4), (0.25, 8, 2), (0.3, 10, 3)])
def test_the_rank_is_the_largest_whose_part_fits_the_share(share, budget_ranks, expected):
    per_rank, _ = per_rank_elements()
    model = make(budget=budget_ranks * per_rank, low_rank_share=share)
    assert model.peft_config["default"].low_rank == expected
    assert ranks(model) == {expected}
    assert model.base_model.low_rank_numel() == expected * per_rank


def test_a_float_budget_is_a_share_of_the_target_weights():
    per_rank, target = per_rank_elements()
    model = make(budget=0.2, low_rank_share=0.6)
    expected = int(0.6 * int(0.2 * target) / per_rank)
    assert expected > 0 and model.peft_config["default"].low_rank == expected and ranks(model) == {expected}


def test_the_warmup_selects_blocks_for_the_rest_of_the_budget():
    per_rank, _ = per_rank_elements()
    budget = 8 * per_rank
    model = make(budget=budget, low_rank_share=0.5, init_weights=True)
    report = mftc_peft.warmup(model, token_batches(6, causal=True), progress=False)
    assert report.low_rank_elements == 4 * per_rank and report.budget_elements == budget - 4 * per_rank
    assert 0 < report.trainable_elements <= report.budget_elements
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == report.trainable_elements + 4 * per_rank


def test_a_share_smaller_than_one_rank_warns_and_trains_blocks_only():
    per_rank, _ = per_rank_elements()
    with pytest.warns(UserWarning, match=rf"`low_rank_share`=0\.3 of `budget`={3 * per_rank} \({3 * per_rank:,} "
                                         rf"elements\) is less than one rank of the low-rank part \({per_rank:,} "
                                         r"elements on these target weights\): the adapter trains blocks only"):
        model = make(budget=3 * per_rank, low_rank_share=0.3)
    assert model.peft_config["default"].low_rank == 0 and model.base_model.low_rank_numel() == 0
    report = mftc_peft.warmup(model, token_batches(6, causal=True), progress=False)
    assert report.low_rank_elements == 0 and report.budget_elements == 3 * per_rank


def test_the_default_puts_half_the_budget_in_the_part_and_an_old_config_loads_without_one(tmp_path):
    per_rank, _ = per_rank_elements()
    model = make(budget=8 * per_rank)
    assert model.peft_config["default"].low_rank_share == 0.5 and ranks(model) == {4}
    fixed = make(budget=8 * per_rank, low_rank=3)  # a fixed rank replaces the default share
    assert fixed.peft_config["default"].low_rank_share == 0.0 and ranks(fixed) == {3}
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    old = {k: v for k, v in saved.items() if k not in ("low_rank", "low_rank_share")}  # saved before the part existed
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"mftc_lora_A"):  # this checkpoint has factors its config does not list
        PeftModel.from_pretrained(CASE.model(), tmp_path)
    plain = make(budget=8 * per_rank, low_rank_share=0.0)
    plain.save_pretrained(tmp_path)
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                if k not in ("low_rank", "low_rank_share")}))
    loaded = PeftModel.from_pretrained(CASE.model(), tmp_path)
    assert loaded.peft_config["default"].low_rank_share == 0.0 and loaded.base_model.low_rank_numel() == 0


def test_a_stated_rank_must_agree_with_the_share():
    per_rank, _ = per_rank_elements()
    assert ranks(make(budget=8 * per_rank, low_rank_share=0.5, low_rank=4)) == {4}
    with pytest.raises(ValueError, match=r"`low_rank`=3 disagrees with `low_rank_share`=0\.5, which gives rank 4 "):
        make(budget=8 * per_rank, low_rank_share=0.5, low_rank=3)


def test_a_saved_adapter_reloads_with_its_rank_and_a_changed_budget_is_refused(tmp_path):
    per_rank, _ = per_rank_elements()
    model = make(budget=8 * per_rank, low_rank_share=0.5)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mftc_" in name:  # values a fresh (seeded) initialisation cannot reproduce
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        expected = outputs(model, CASE.inputs())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["low_rank"] == 4 and saved["low_rank_share"] == 0.5
    loaded = PeftModel.from_pretrained(CASE.model(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(outputs(loaded, CASE.inputs()), expected)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "budget": 4 * per_rank}))
    with pytest.raises(ValueError, match=r"`low_rank`=4 disagrees with `low_rank_share`=0\.5, which gives rank 2 "):
        PeftModel.from_pretrained(CASE.model(), tmp_path)


@pytest.mark.parametrize("share", [1.0, -0.1, float("nan"), True, "0.5"])
def test_bad_shares_name_the_argument(share):
    with pytest.raises(ValueError, match=rf"`low_rank_share` must be a number in \[0, 1\) or None, got {share!r}"):
        MFTCConfig(low_rank_share=share)


def test_the_scaling_numerator_applies_to_a_share_sized_part():
    per_rank, _ = per_rank_elements()
    model = make(budget=8 * per_rank, low_rank_share=0.5, low_rank_alpha=2.0)
    assert {layer.mftc_low_rank_scaling["default"] for _, layer in model.base_model.mftc_layers()} == {0.5}
