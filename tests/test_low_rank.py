"""`MFTCConfig.low_rank`: a low-rank part scaling * B @ A on every target weight next to the blocks (RoSA-like).

Off by default (no new tensors); counted inside the warm-up's budget; forward, merge and the dense delta agree with a
dense oracle built from the parameters alone; save/load round-trips and refuses a checkpoint whose factors disagree
with the config; the rest of the adapter's life cycle (adapters, switching, training, the Trainer) keeps working.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_trainer import make_trainer
from test_warmup import assert_same_state, state, token_batches, warm_model
from tiny_models import CASES, CASES_BY_NAME, outputs

import mftc_peft
from mftc_peft import MFTCConfig, MFTCLayer, WarmupReport

RANK = 2
DEFAULT_SCALING = 2.0  # alpha None = 2r


def make(case, **overrides):
    kwargs = {**copy.deepcopy(case.config_kwargs), "init_weights": False, "low_rank": RANK, "low_rank_share": 0.0,
              **overrides}
    return get_peft_model(case.model(), MFTCConfig(**kwargs)).eval()


def layers(model, adapter="default") -> dict[str, MFTCLayer]:
    return dict(model.base_model.mftc_layers(adapter))


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "mftc_" not in n}


@torch.no_grad()
def dense_oracle(layer, adapter="default", scaling=DEFAULT_SCALING) -> torch.Tensor:
    """scaling * B @ A plus the applied delta on the selected lines, in nn.Linear layout (out, in), from the
    parameters and block ids alone."""
    a, b = layer.mftc_lora_A[adapter], layer.mftc_lora_B[adapter]
    dense = scaling * (b @ a)  # (out, in)
    grid, ids = layer.mftc_grid[adapter], layer.block_ids(adapter)
    positions = [p for block in ids for p in range(block * grid.width, min((block + 1) * grid.width, grid.length))]
    lines = dense if grid.axis == "out" else dense.T  # a view: rows are lines along the block axis
    lines[positions] += layer.applied_delta(adapter)
    return dense


def in_layout(layer, dense):
    return dense.T if layer.fan_in_fan_out else dense  # transformers' Conv1D stores (in, out)


# ----- (a) without a part --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_no_part_adds_no_tensors(case, tmp_path):
    explicit = make(case, low_rank=0, low_rank_share=0.0)
    default = get_peft_model(case.model(), MFTCConfig(**{**copy.deepcopy(case.config_kwargs), "init_weights": False,
                                                          "low_rank_share": 0.0}))
    assert default.peft_config["default"].low_rank == 0 and default.peft_config["default"].low_rank_alpha is None
    for model in (default, explicit):
        keys = set(model.state_dict())
        assert not [k for k in keys if "lora" in k]
        assert all(not layer.mftc_lora_A and not layer.mftc_lora_B and not layer.mftc_low_rank_scaling
                   for layer in layers(model).values())
        assert model.base_model.low_rank_numel() == 0
    assert set(default.state_dict()) == set(explicit.state_dict())
    default.save_pretrained(tmp_path)
    parts = {key.rsplit(".", 1)[1] for key in load_file(tmp_path / "adapter_model.safetensors")}
    assert parts <= {"mftc_delta", "mftc_idx", "mftc_scale", "mftc_geometry", "weight", "bias"}


# ----- (b) the budget ------------------------------------------------------------------------------------------
def test_warmup_takes_the_low_rank_part_out_of_the_budget(tmp_path):
    batches = token_batches(6, causal=True)
    _, model = warm_model("llama_gqa", budget=12_000, low_rank=RANK)
    grids = model.base_model.block_grids()
    low_rank = sum(RANK * (g.in_features + g.out_features) for g in grids.values())
    assert model.base_model.low_rank_numel() == low_rank
    report = mftc_peft.warmup(model, batches, progress=False)
    assert report.low_rank_elements == low_rank and report.budget_elements == 12_000 - low_rank
    assert 0 < report.trainable_elements <= report.budget_elements
    assert report.trainable_elements + report.low_rank_elements <= 12_000
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == report.trainable_elements + low_rank
    assert f"plus a low-rank part of {low_rank:,} trainable elements" in report.summary()
    assert WarmupReport.from_json(report.to_json(tmp_path / "report.json")).low_rank_elements == low_rank
    # B starts at zero, so the gradients are those without the part: the blocks are those of the smaller budget
    _, plain = warm_model("llama_gqa", budget=12_000 - low_rank, low_rank_share=0.0)
    assert mftc_peft.warmup(plain, batches, progress=False).selection == report.selection


def test_a_low_rank_part_larger_than_the_budget_is_refused_before_anything_changes():
    _, model = warm_model("llama_gqa", budget=1_000, low_rank=RANK)
    low_rank = model.base_model.low_rank_numel()
    before = state(model)
    with pytest.raises(ValueError, match=rf"`low_rank`=2 trains {low_rank:,} elements on the target weights, more "
                                         r"than `budget`=1000 allows \(1,000 elements\)"):
        mftc_peft.warmup(model, token_batches(6, causal=True), progress=False)
    assert_same_state(before, state(model))


# ----- (c) forward, (d) merge, (i) Conv1D and grouped-query attention -------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_and_dense_delta_match_the_oracle(case):
    model = make(case)
    generator = torch.Generator().manual_seed(3)
    for name, layer in layers(model).items():
        assert layer.mftc_lora_B["default"].abs().min() > 0, name  # a non-trivial part
        oracle = dense_oracle(layer)
        assert torch.allclose(layer.get_delta_weight("default"), in_layout(layer, oracle), atol=1e-6), name
        x = torch.randn(2, 3, layer.in_features, generator=generator)
        with torch.no_grad():
            assert torch.allclose(layer(x), layer.base_layer(x) + x @ oracle.T, atol=1e-5), name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_merge_matches_the_oracle_and_unmerge_is_bit_exact(case):
    model = make(case)
    inputs, before = case.inputs(), base_weights(model)
    oracles = {name: in_layout(layer, dense_oracle(layer)) for name, layer in layers(model).items()}
    with torch.no_grad():
        unmerged = outputs(model, inputs)
        model.base_model.merge_adapter(safe_merge=True)
        for name, layer in layers(model).items():
            weight = layer.get_base_layer().weight
            assert torch.allclose(weight, before[f"base_model.model.{name}.base_layer.weight"] + oracles[name],
                                  atol=1e-6), name
        assert torch.allclose(outputs(model, inputs), unmerged, atol=1e-5)
        model.unmerge_adapter()
        after = base_weights(model)
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert torch.equal(outputs(model, inputs), unmerged)


def test_a_non_finite_low_rank_part_is_refused_by_safe_merge():
    model = make(CASES_BY_NAME["gpt2"])
    before = base_weights(model)
    name, layer = list(layers(model).items())[-1]
    with torch.no_grad():
        layer.mftc_lora_B["default"][0, 0] = float("inf")  # outside every block: only the low-rank part sees it
    with pytest.raises(ValueError, match=rf"adapter default seems to be broken: merging it into .*{name}"):
        model.base_model.merge_adapter(safe_merge=True)
    assert not any(layer.merged for layer in layers(model).values())
    after = base_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("case_name, weight, factors", [
    ("gpt2", "transformer.h.0.attn.c_attn", ((RANK, 64), (192, RANK))),  # Conv1D: weight (64, 192) = (in, out)
    ("llama_gqa", "model.layers.0.self_attn.k_proj", ((RANK, 64), (32, RANK))),  # 2 key/value heads of 16
])
def test_factors_are_in_linear_orientation_and_merge_transposes_for_conv1d(case_name, weight, factors):
    model = make(CASES_BY_NAME[case_name], low_rank_alpha=3.0)
    layer = layers(model)[weight]
    assert (tuple(layer.mftc_lora_A["default"].shape), tuple(layer.mftc_lora_B["default"].shape)) == factors
    assert layer.mftc_low_rank_scaling["default"] == 1.5 and not layer.supports_lora_conversion()
    base = layer.get_base_layer().weight.detach().clone()
    model.base_model.merge_adapter()
    expected = base + in_layout(layer, dense_oracle(layer, scaling=1.5))
    assert torch.allclose(layer.get_base_layer().weight, expected, atol=1e-6)


# ----- (e) save and load, (f) a checkpoint that disagrees with the config ----------------------------------------
def _trained_and_saved(case, path, **overrides):
    """A saved adapter whose factors and deltas a fresh (seeded) initialisation cannot reproduce."""
    model = make(case, **overrides)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mftc_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        expected = outputs(model, case.inputs())
    model.save_pretrained(path)
    return model, expected


@pytest.mark.parametrize("listed", [True, False], ids=["config_selection", "checkpoint_selection"])
@pytest.mark.parametrize("is_trainable", [False, True])
def test_save_and_reload_reproduce_the_outputs(tmp_path, is_trainable, listed):
    case = CASES_BY_NAME["llama_gqa"]
    model, expected = _trained_and_saved(case, tmp_path)
    names = list(layers(model))
    assert {f"base_model.model.{n}.mftc_lora_{f}.default" for n in names for f in "AB"} <= set(model.state_dict())
    saved = load_file(tmp_path / "adapter_model.safetensors")  # PEFT drops the adapter name, as for mftc_delta
    assert {f"base_model.model.{n}.mftc_{p}" for n in names for p in ("lora_A", "lora_B", "delta")} <= set(saved)
    if not listed:  # a warm-up's selection: the layers take the checkpoint's blocks
        path = tmp_path / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "block_selection": {}}))
    loaded = PeftModel.from_pretrained(case.model(), tmp_path, is_trainable=is_trainable).eval()
    with torch.no_grad():
        assert torch.equal(outputs(loaded, case.inputs()), expected)
    factors = [p for n, p in loaded.named_parameters() if "mftc_lora_" in n]
    assert len(factors) == 2 * len(names) and all(p.requires_grad == is_trainable for p in factors)


def test_low_cpu_mem_usage_reload_of_a_conv1d_model(tmp_path):
    case = CASES_BY_NAME["gpt2"]
    _, expected = _trained_and_saved(case, tmp_path)
    loaded = PeftModel.from_pretrained(case.model(), tmp_path, low_cpu_mem_usage=True).eval()
    with torch.no_grad():
        assert torch.equal(outputs(loaded, case.inputs()), expected)


KEY = r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.mftc_lora_A"


@pytest.mark.parametrize("saved_rank, config_rank, message", [
    (RANK, 3, rf"checkpoint {KEY}\.default must have shape \(3, 64\) \(low_rank=3 of the adapter's config, for "
              r".*q_proj, a 64 x 64 weight\), got \(2, 64\)"),
    # PEFT >= 0.21 adds the adapter name only to keys the model has
    (RANK, 0, rf"checkpoint {KEY}(\.default)? holds a low-rank part \(shape \(2, 64\)\) for .*q_proj, but the "
              r"adapter's config has low_rank=0"),
    (0, RANK, rf"checkpoint has no {KEY}\.default, but the adapter's config has low_rank=2, which needs it with shape "
              r"\(2, 64\)"),
])
def test_a_checkpoint_whose_low_rank_part_disagrees_with_the_config_is_refused(tmp_path, saved_rank, config_rank,
                                                                               message):
    case = CASES_BY_NAME["llama_gqa"]
    _trained_and_saved(case, tmp_path, low_rank=saved_rank)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "low_rank": config_rank}))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(case.model(), tmp_path)


# ----- (g) bad values -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"low_rank": -1}, r"`low_rank` must be a non-negative integer, got -1"),
    ({"low_rank": 1.5}, r"`low_rank` must be a non-negative integer, got 1\.5"),
    ({"low_rank": True}, r"`low_rank` must be a non-negative integer, got True"),
    ({"low_rank": "2"}, r"`low_rank` must be a non-negative integer, got '2'"),
    ({"low_rank": 2, "low_rank_alpha": 0}, r"`low_rank_alpha` must be a positive number, got 0"),
    ({"low_rank": 2, "low_rank_alpha": float("nan")}, r"`low_rank_alpha` must be a positive number, got nan"),
    ({"low_rank": 2, "low_rank_alpha": "4"}, r"`low_rank_alpha` must be a positive number, got '4'"),
    ({"low_rank_alpha": 4.0, "low_rank_share": 0.0}, r"`low_rank_alpha` only applies with a low-rank part .*got "
                                                     r"low_rank_alpha=4\.0 with low_rank=0"),
])
def test_bad_values_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MFTCConfig(**kwargs)


# ----- (h) training ----------------------------------------------------------------------------------------------
def test_a_plain_adamw_loop_trains_the_factors_and_the_deltas():
    model = make(CASES_BY_NAME["llama_gqa"], init_weights=True).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".mftc_")[1].split(".")[0] for n in names} == {"delta", "lora_A", "lora_B"}
    before, base = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, base_weights(model)
    assert all(not before[n].any() for n in names if "lora_B" in n or "delta" in n)  # a no-op at the start
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in token_batches(3, causal=True):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in names), [n for n in names if torch.equal(before[n],
                                                                                                  after[n])]
    assert all(torch.equal(base[n], after[n]) for n in base)


def test_mftc_trainer_warms_up_within_the_budget_and_trains_the_factors(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, low_rank=RANK)
    tuner = trainer.model.base_model
    factors = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    report = trainer.warmup_report
    assert report.low_rank_elements == tuner.low_rank_numel() > 0
    budget = int(0.1 * report.target_elements)  # make_trainer's budget=0.1
    assert report.budget_elements == budget - report.low_rank_elements
    assert 0 < report.trainable_elements and report.trainable_elements + report.low_rank_elements <= budget
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    trained = dict(trainer.model.named_parameters())
    assert all(id(trained[n]) in optimised and not torch.equal(factors[n], trained[n]) for n in factors)
    assert json.loads((tmp_path / "checkpoint-2" / "adapter_config.json").read_text())["low_rank"] == RANK


# ----- everything else keeps working -----------------------------------------------------------------------------
def test_a_second_adapter_without_low_rank_switching_and_disabling():
    case = CASES_BY_NAME["llama_gqa"]
    model, inputs = make(case), case.inputs()
    plain = {**copy.deepcopy(case.config_kwargs), "init_weights": False, "seed": 1}
    model.add_adapter("plain", MFTCConfig(**plain))
    with torch.no_grad(), model.disable_adapter():
        base = outputs(model, inputs)
    for layer in layers(model).values():
        assert set(layer.mftc_lora_A) == set(layer.mftc_low_rank_scaling) == {"default"}
    model.set_adapter("plain")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "mftc_lora_" in n)
    with torch.no_grad():
        for layer in layers(model, "plain").values():
            x = torch.randn(3, layer.in_features)
            expected = layer.base_layer(x) + x @ in_layout(layer, layer.get_delta_weight("plain")).T
            assert torch.allclose(layer(x), expected, atol=1e-5)
        plain_out = outputs(model, inputs)
        model.set_adapter("default")
        assert all(p.requires_grad for n, p in model.named_parameters() if "mftc_lora_" in n)
        assert not torch.allclose(outputs(model, inputs), plain_out)
        before = base_weights(model)
        model.base_model.set_adapter(["default", "plain"])
        both = outputs(model, inputs)
        model.base_model.merge_adapter(["default", "plain"], safe_merge=True)
        assert torch.allclose(outputs(model, inputs), both, atol=1e-5)
        model.unmerge_adapter()
        assert all(torch.equal(before[n], p) for n, p in base_weights(model).items())
        with model.disable_adapter():
            assert torch.equal(outputs(model, inputs), base)
    model.base_model.delete_adapter("default")
    assert all(not layer.mftc_lora_A and not layer.mftc_low_rank_scaling for layer in layers(model, "plain").values())


def test_recreating_the_blocks_keeps_the_factors_objects_and_fp32_on_a_bf16_base():
    case = CASES_BY_NAME["llama_gqa"]
    kwargs = {**copy.deepcopy(case.config_kwargs), "init_weights": False, "low_rank": RANK}
    model = get_peft_model(case.model().to(torch.bfloat16), MFTCConfig(**kwargs))
    factors = {n: p for n, p in model.named_parameters() if "mftc_lora_" in n}
    assert all(p.dtype == torch.float32 for p in factors.values())  # PEFT's autocast_adapter_dtype
    values = {n: p.detach().clone() for n, p in factors.items()}
    selection = {name: [0] for name in layers(model)}
    model.base_model.set_block_selection(selection)
    after = {n: p for n, p in model.named_parameters() if "mftc_lora_" in n}
    assert all(after[n] is factors[n] and torch.equal(after[n], values[n]) for n in factors)
    assert all(layer.mftc_delta["default"].dtype == torch.float32 for layer in layers(model).values())


def test_reselection_swaps_blocks_and_leaves_the_factors():
    model = make(CASES_BY_NAME["llama_gqa"])
    factors = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if "mftc_lora_" in n}
    report = mftc_peft.reselect_blocks(model, token_batches(2, causal=True), fraction=1.0)
    assert report.n_swapped > 0
    after = dict(model.named_parameters())
    assert all(after[n] is p and torch.equal(p, value) for n, (p, value) in factors.items())


def test_gradient_checkpointing_gives_the_factors_the_same_gradients():
    case = CASES_BY_NAME["llama_gqa"]
    batch = token_batches(1, causal=True)[0]
    grads = []
    for checkpointing in (False, True):
        model = make(case).train()
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "mftc_lora_" in n})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[0].values())
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
