"""Registration, data-dependent loading, reduced-precision bases and trainability after load."""

import copy
import importlib
import json

import pytest
import torch
from peft import PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from tiny_models import CASES_BY_NAME, outputs

import mftc_peft
from mftc_peft import MFTCConfig, MFTCLayer, MFTCModel


def test_import_twice_and_reload_are_harmless():
    importlib.reload(mftc_peft.registry)
    importlib.reload(mftc_peft)
    mftc_peft.register()
    assert PeftType("MFTC") is PeftType.MFTC
    assert list(PeftType).count(PeftType.MFTC) == 1
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MFTC].__name__ == MFTCModel.__name__


def _saved(case, tmp_path, **overrides):
    kwargs = {**copy.deepcopy(case.config_kwargs), "init_weights": False, **overrides}
    model = get_peft_model(case.model(), MFTCConfig(**kwargs)).eval()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        return model, outputs(model, case.inputs())


@pytest.mark.parametrize("is_trainable", [False, True])
def test_checkpoint_shapes_win_when_config_has_no_selection(tmp_path, is_trainable):
    """A selection found by the warm-up is data-dependent: the layers take their shapes from the checkpoint."""
    case = CASES_BY_NAME["llama_gqa"]
    _, expected = _saved(case, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["block_selection"] = {}
    config_path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(case.model(), tmp_path, is_trainable=is_trainable).eval()
    with torch.no_grad():
        assert torch.equal(outputs(loaded, case.inputs()), expected)
    deltas = [p for n, p in loaded.named_parameters() if "mftc_delta" in n and p.numel()]
    assert deltas and all(p.requires_grad == is_trainable for p in deltas)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_trainability_after_load(tmp_path, is_trainable):
    case = CASES_BY_NAME["bert"]
    _saved(case, tmp_path)
    loaded = PeftModel.from_pretrained(case.model(), tmp_path, is_trainable=is_trainable)
    deltas = {n: p for n, p in loaded.named_parameters() if "mftc_delta" in n}
    non_empty = {n for n, p in deltas.items() if p.numel()}
    assert non_empty
    assert {n for n, p in deltas.items() if p.requires_grad} == (non_empty if is_trainable else set())


def test_low_cpu_mem_usage_load(tmp_path):
    case = CASES_BY_NAME["gpt2"]
    _, expected = _saved(case, tmp_path)
    loaded = PeftModel.from_pretrained(case.model(), tmp_path, low_cpu_mem_usage=True).eval()
    with torch.no_grad():
        assert torch.equal(outputs(loaded, case.inputs()), expected)


def test_empty_deltas_are_never_trainable():
    """DistributedDataParallel rejects trainable parameters that receive no gradient."""
    case = CASES_BY_NAME["bert"]
    model = get_peft_model(case.model(), MFTCConfig(**copy.deepcopy(case.config_kwargs)))
    model.set_adapter("default")
    for module in model.modules():
        if isinstance(module, MFTCLayer):
            delta = module.mftc_delta["default"]
            assert delta.requires_grad == (delta.numel() > 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_base(dtype):
    case = CASES_BY_NAME["llama_gqa"]
    base = case.model().to(dtype)
    model = get_peft_model(base, MFTCConfig(**copy.deepcopy(case.config_kwargs), init_weights=False)).eval()
    deltas = [p for n, p in model.named_parameters() if "mftc_delta" in n and p.numel()]
    assert deltas and all(p.dtype == torch.float32 for p in deltas)  # PEFT's autocast_adapter_dtype keeps fp32
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "mftc_" not in n}
    with torch.no_grad():
        unmerged = outputs(model, case.inputs())
        assert unmerged.dtype == dtype
        model.merge_adapter()
        merged = outputs(model, case.inputs())
        model.unmerge_adapter()
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=5e-2, rtol=0)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "mftc_" not in n)


def test_set_block_selection_records_it_in_the_config(tmp_path):
    case = CASES_BY_NAME["bert"]
    model = get_peft_model(case.model(), MFTCConfig(task_type="SEQ_CLS", block_size=32))
    assert model.base_model.selected_numel() == 0
    selection = {"bert.encoder.layer.1.attention.self.key": [3, 0], "bert.encoder.layer.0.output.dense": [1]}
    model.base_model.set_block_selection(selection)
    assert model.peft_config["default"].block_selection == {
        "bert.encoder.layer.1.attention.self.key": [0, 3],
        "bert.encoder.layer.0.output.dense": [1],
    }
    assert model.base_model.block_selection() == model.peft_config["default"].block_selection
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "mftc_" in n)
    assert trainable == model.base_model.selected_numel() == 2 * 16 * 64 + 32 * 64
