"""Block grid rules: auto axis, head-wide blocks (grouped-query and fused attention), narrow last block, masks."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import CASES_BY_NAME

from mftc_peft import BlockGrid, MFTCConfig, MFTCLayer, make_grid
from mftc_peft.blocks import default_axis, module_role


@pytest.mark.parametrize(
    "name, role, axis",
    [
        ("bert.encoder.layer.0.attention.self.query", "attention_out", "out"),
        ("bert.encoder.layer.0.attention.output.dense", "attention_in", "in"),
        ("bert.encoder.layer.0.intermediate.dense", "ffn_out", "out"),
        ("bert.encoder.layer.0.output.dense", "ffn_in", "in"),
        ("transformer.h.0.attn.c_attn", "attention_out", "out"),
        ("transformer.h.0.attn.c_proj", "attention_in", "in"),
        ("transformer.h.0.mlp.c_fc", "ffn_out", "out"),
        ("transformer.h.0.mlp.c_proj", "ffn_in", "in"),
        ("model.layers.3.self_attn.k_proj", "attention_out", "out"),
        ("model.layers.3.self_attn.o_proj", "attention_in", "in"),
        ("model.layers.3.mlp.gate_proj", "ffn_out", "out"),
        ("model.layers.3.mlp.down_proj", "ffn_in", "in"),
        ("classifier", None, "out"),
    ],
)
def test_roles_and_auto_axis(name, role, axis):
    assert module_role(name) == role
    assert default_axis(name) == axis


def test_grouped_query_attention_has_fewer_key_blocks():
    q = make_grid("layers.0.self_attn.q_proj", 64, 64, block_size=32, head_dim=16)
    k = make_grid("layers.0.self_attn.k_proj", 64, 32, block_size=32, head_dim=16)
    o = make_grid("layers.0.self_attn.o_proj", 64, 64, block_size=32, head_dim=16)
    assert (q.n_blocks, k.n_blocks, o.n_blocks) == (4, 2, 4)
    assert (q.axis, k.axis, o.axis) == ("out", "out", "in")


def test_fused_qkv_is_cut_per_head_of_each_part():
    grid = make_grid("h.0.attn.c_attn", 64, 192, block_size=32, head_dim=16)
    assert grid.n_blocks == 12
    assert grid.bounds(4) == (64, 80)  # key head 0 starts after the 4 query heads


def test_head_blocks_off_uses_block_size():
    grid = make_grid("layers.0.self_attn.q_proj", 64, 64, block_size=32, head_dim=16, head_blocks=False)
    assert grid.width == 32 and grid.n_blocks == 2


def test_last_block_is_narrower_and_ids_cover_the_axis():
    grid = BlockGrid(axis="out", in_features=20, out_features=45, width=16)
    assert grid.n_blocks == 3
    assert grid.widths(range(3)) == [16, 16, 13]
    assert grid.numel([2]) == 13 * 20
    assert torch.equal(grid.segment_ids(), torch.tensor([0] * 16 + [1] * 16 + [2] * 13))
    assert grid.feature_index([2, 0]).tolist() == list(range(32, 45)) + list(range(16))


@pytest.mark.parametrize("axis", ["in", "out"])
def test_dense_mask_marks_exactly_the_selected_lines(axis):
    grid = BlockGrid(axis=axis, in_features=40, out_features=24, width=16)
    mask = grid.dense_mask([1])
    lines = mask.any(dim=1 if axis == "out" else 0).nonzero().flatten().tolist()
    assert lines == list(range(*grid.bounds(1)))
    assert mask.sum() == grid.numel([1])


@pytest.mark.parametrize("case_name", ["bert", "gpt2", "llama_gqa", "odd_mlp"])
def test_delta_lands_exactly_on_the_mask(case_name):
    case = CASES_BY_NAME[case_name]
    model = get_peft_model(case.model(), MFTCConfig(**case.config_kwargs, init_weights=False))
    for module in model.modules():
        if isinstance(module, MFTCLayer) and module.block_ids("default"):
            grid = module.mftc_grid["default"]
            mask = grid.dense_mask(module.block_ids("default"))
            if module.fan_in_fan_out:
                mask = mask.T
            nonzero = module.get_delta_weight("default") != 0
            assert torch.equal(nonzero, mask)


def test_grid_rejects_bad_ids():
    grid = BlockGrid(axis="in", in_features=64, out_features=8, width=32)
    with pytest.raises(ValueError, match=r"`block_selection` block ids must lie in 0\.\.1 .*got \[2\]"):
        grid.check_ids([0, 2])
    with pytest.raises(ValueError, match=r"must be unique, got duplicates \[1\]"):
        grid.check_ids([1, 1])
    with pytest.raises(ValueError, match="`axis` must be one of"):
        BlockGrid(axis="rows", in_features=4, out_features=4, width=2)


def test_the_default_cuts_ffn_weights_into_8_unit_groups_and_attention_per_head():
    """The default width (NOTES 62): 8-row/column FFN groups, heads whole (the Llama case: 4 heads of 16 features)."""
    model = get_peft_model(CASES_BY_NAME["llama_gqa"].model(), MFTCConfig(task_type="CAUSAL_LM"))
    grids = model.base_model.block_grids()
    widths = {name.rsplit(".", 1)[-1]: (grid.axis, grid.width, grid.n_blocks) for name, grid in grids.items()}
    assert widths["gate_proj"] == ("out", 8, 10)  # intermediate 80 = 10 groups of 8 neurons
    assert widths["down_proj"] == ("in", 8, 10)
    assert widths["q_proj"] == ("out", 16, 4)
    assert widths["k_proj"] == ("out", 16, 2)
