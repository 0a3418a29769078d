"""Every bad input names the argument, states the rule, echoes the value, and leaves the user's model untouched."""

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import CASES_BY_NAME
from torch import nn

import mftc_peft  # noqa: F401
from mftc_peft import MFTCConfig, MFTCLayer


def bert():
    return CASES_BY_NAME["bert"].model()


def assert_untouched(model):
    assert not any(isinstance(m, MFTCLayer) for m in model.modules())


def test_unknown_target_module_name():
    model = bert()
    with pytest.raises(ValueError, match=r"`target_modules` entries \['qeury'\] match no module"):
        get_peft_model(model, MFTCConfig(target_modules=["query", "qeury"]))
    assert_untouched(model)


def test_unsupported_module_type_lists_supported_types():
    model = bert()
    with pytest.raises(TypeError, match=r"matched 'bert.embeddings.word_embeddings', a Embedding.*torch.nn.modules"):
        get_peft_model(model, MFTCConfig(target_modules=["word_embeddings", "query"]))
    assert_untouched(model)


@pytest.mark.parametrize("dtype, shape", [(torch.int8, (45, 20)), (torch.uint8, (450, 1))], ids=["8bit", "4bit"])
def test_quantized_weights_are_refused(dtype, shape):
    """bitsandbytes' 8-bit (int8, out x in) and 4-bit (packed uint8) layers subclass nn.Linear: stand-ins here."""
    from tiny_models import OddMLP

    model = OddMLP()
    model.fc2.weight = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
    message = rf"matched 'fc2': its weight must be a plain floating-point tensor, got Linear with a {dtype} Parameter"
    with pytest.raises(TypeError, match=message):
        get_peft_model(model, MFTCConfig(target_modules=["fc1", "fc2"], block_size=16, modules_to_save=[]))
    assert_untouched(model)


@pytest.mark.parametrize("quantize", [False, True], ids=["before_the_move", "quantized"])
@pytest.mark.parametrize("layer, weight", [("Linear8bitLt", "Int8Params"), ("Linear4bit", "Params4bit")])
def test_bitsandbytes_layers_are_refused(layer, weight, quantize):
    bnb = pytest.importorskip("bitsandbytes")
    options = {"Linear8bitLt": {"has_fp16_weights": False}, "Linear4bit": {"compute_dtype": torch.float32}}[layer]
    model = nn.Sequential(getattr(bnb.nn, layer)(20, 45, **options), nn.ReLU(), nn.Linear(45, 7))
    if quantize:
        model.to("cpu")  # bitsandbytes quantises on the first move to a device
    with pytest.raises(TypeError, match=rf"matched '0': .* {layer} with a torch\.\w+ {weight} .* quantised"):
        get_peft_model(model, MFTCConfig(target_modules=["0", "2"], block_size=16))
    assert_untouched(model)


@pytest.mark.parametrize(
    "selection, message",
    [
        ({"layer.0.attention.self.query": [4]}, r"block ids must lie in 0\.\.3 .* got \[4\]"),
        ({"layer.0.intermediate.dense": [0, 3]}, r"block ids must lie in 0\.\.2 .* got \[3\]"),
        ({"layer.0.attention.self.query": [1, 1]}, r"`block_selection\['layer.0.attention.self.query'\]` block ids "
                                                   r"must be unique, got \[1, 1\]"),
        ({"query": [-1]}, r"must be non-negative integers, got \[-1\]"),
        ({"layer.9.attention.self.query": [0]}, r"`block_selection` key 'layer.9.attention.self.query' matches no "
                                                r"target module"),
        ({"query": "0"}, r"`block_selection\['query'\]` must be a list of block ids, got '0'"),
    ],
)
def test_bad_block_selection(selection, message):
    model = bert()
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, MFTCConfig(block_selection=selection, block_size=32))  # the ids' grid: 96 = 3 x 32
    assert_untouched(model)


@pytest.mark.parametrize("value", [0, -32, 2.5, True])
def test_block_size_must_be_positive_int(value):
    with pytest.raises(ValueError, match=rf"`block_size` must be a positive integer, got {value!r}"):
        MFTCConfig(block_size=value)


@pytest.mark.parametrize("field, value", [("block_axis", "rows"), ("bias", "lora_only")])
def test_choices(field, value):
    with pytest.raises(ValueError, match=rf"`{field}` must be one of .*got '{value}'"):
        MFTCConfig(**{field: value})


@pytest.mark.parametrize("value", [0.25, -1.0, "2", True])
def test_max_node_share_must_be_at_least_half(value):
    with pytest.raises(ValueError, match=rf"`max_node_share` must be a number >= 0.5, got {value!r}"):
        MFTCConfig(max_node_share=value)


@pytest.mark.parametrize("field, value, rule", [
    ("head_warmup_steps", -1, "a non-negative integer"), ("head_warmup_steps", 2.0, "a non-negative integer"),
    ("head_warmup_lr", 0.0, "a positive number"), ("head_warmup_lr", "1e-2", "a positive number"),
])
def test_head_warmup_fields(field, value, rule):
    with pytest.raises(ValueError, match=rf"`{field}` must be {rule}, got {value!r}"):
        MFTCConfig(**{field: value})


def test_seed_must_be_int():
    with pytest.raises(ValueError, match=r"`seed` must be a non-negative integer, got '1'"):
        MFTCConfig(seed="1")


def test_adapter_onto_base_with_other_shapes(tmp_path):
    from peft import PeftModel

    case = CASES_BY_NAME["odd_mlp"]
    model = get_peft_model(case.model(), MFTCConfig(**copy.deepcopy(case.config_kwargs), init_weights=False))
    model.save_pretrained(tmp_path)

    class WiderMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(24, 45)
            self.fc2 = nn.Linear(45, 7)

        def forward(self, x):
            return self.fc2(self.fc1(x))

    with pytest.raises(ValueError, match=r"saved for a 45 x 20 weight .*fc1 is a 45 x 24 weight "
                                         r".*base model whose shapes differ"):
        PeftModel.from_pretrained(WiderMLP(), tmp_path)

    class NarrowerMLP(WiderMLP):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(20, 30)
            self.fc2 = nn.Linear(30, 7)

    with pytest.raises(ValueError, match=r"block ids must lie in 0\.\.1 .*got \[2\]"):
        PeftModel.from_pretrained(NarrowerMLP(), tmp_path)


def test_set_block_selection_validates_before_changing_anything():
    case = CASES_BY_NAME["bert"]
    model = get_peft_model(case.model(), MFTCConfig(**copy.deepcopy(case.config_kwargs)))
    before = model.base_model.block_selection()
    with pytest.raises(ValueError, match=r"`selection\['bert.encoder.layer.0.attention.self.key'\]` block ids must"):
        model.base_model.set_block_selection(
            {"bert.encoder.layer.0.attention.self.query": [0], "bert.encoder.layer.0.attention.self.key": [9]}
        )
    with pytest.raises(ValueError, match=r"`selection` names modules without an MFTC layer: \['bert.pooler'\]"):
        model.base_model.set_block_selection({"bert.pooler": [0]})
    assert model.base_model.block_selection() == before


def test_block_ids_accept_numpy_and_torch_integers():
    import numpy as np

    config = MFTCConfig(block_selection={"query": [np.int64(1), torch.tensor(2)]})
    assert config.block_selection == {"query": [1, 2]}
    assert all(type(i) is int for i in config.block_selection["query"])


@pytest.mark.parametrize("kwargs, match", [
    ({"step_scale": "fisher"}, r"`step_scale` must be one of \('none', 'energy'\), got 'fisher'"),
    ({"step_scale_power": 0}, r"`step_scale_power` must be a positive number, got 0"),
    ({"block_step_scale": 0.0}, r"`block_step_scale` must be a positive number, got 0.0"),
    ({"block_step_scale": float("inf")}, r"`block_step_scale` must be a positive number, got inf"),
    ({"reselect_every": -1}, r"`reselect_every` must be a non-negative integer, got -1"),
    ({"reselect_fraction": 0}, r"`reselect_fraction` must be a number in \(0, 1\], got 0"),
    ({"reselect_batches": 0}, r"`reselect_batches` must be a positive integer, got 0"),
    ({"block_score": "snr"}, r"`block_score` must be one of \('energy', 'consistency'\), got 'snr'"),
    ({"allocation": "search", "block_score": "consistency", "probe": "finetune"}, r"`block_score` 'consistency' needs probe='taylor'"),
])
def test_issue12_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MFTCConfig(**kwargs)
