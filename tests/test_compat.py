"""The version gate and shims of `_compat.py`, on whatever PEFT is installed: each shim test makes PEFT behave as the
old versions did (by patching the one method that changed), so the shims are tested without installing those
versions. `scripts/check_versions.sh` runs the adapter tests against the real lower bounds."""

import re
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import mftc_peft  # noqa: F401
from mftc_peft import MFTCConfig, MFTCLayer, _compat

ROOT = Path(__file__).resolve().parent.parent


def test_the_claimed_range_is_the_gated_and_tested_range():
    """pyproject's PEFT range is the import gate's, and check_versions.sh pins the lower bounds pyproject claims."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    specifiers = {Requirement(line).name: Requirement(line).specifier for line in dependencies}
    lower, upper = _compat.SUPPORTED_PEFT
    assert specifiers["peft"] == SpecifierSet(f">={lower},<{upper}")
    script = (ROOT / "scripts" / "check_versions.sh").read_text()
    for name, variable in [("peft", "PEFT_VERSION"), ("transformers", "TRANSFORMERS_VERSION")]:
        pinned = re.search(rf'{variable}="\${{{variable}:-([^}}]+)}}"', script).group(1)
        claimed = next(spec.version for spec in specifiers[name] if spec.operator == ">=")
        assert Version(pinned) == Version(claimed), f"check_versions.sh pins {name} {pinned}, pyproject claims {claimed}"


@pytest.mark.parametrize("installed", ["0.17.1", "0.22.0", "1.0.0"])
def test_versions_outside_the_range_are_refused(monkeypatch, installed):
    monkeypatch.setattr(_compat, "version", lambda name: installed)
    match = rf"mftc-peft supports peft>=0.18.0,<0.22.0 .* but peft {installed} is installed"
    with pytest.raises(ImportError, match=match):
        _compat.check_peft_version()


@pytest.mark.parametrize("installed", ["0.18.0", "0.20.0", "0.21.2", "0.21.3.dev0"])
def test_versions_inside_the_range_are_accepted(monkeypatch, installed):
    monkeypatch.setattr(_compat, "version", lambda name: installed)
    _compat.check_peft_version()


def _move_casting_everything(self, adapter_name, device=None):
    """PEFT 0.18-0.20's move: every adapter tensor, integer buffers included, to the base weight's dtype."""
    weight = self.get_base_layer().weight
    for name in self.adapter_layer_names + self.other_param_names:
        container = getattr(self, name, None)
        if hasattr(container, "keys") and adapter_name in container:
            container[adapter_name] = container[adapter_name].to(weight.device, dtype=weight.dtype)


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4096)  # 512 blocks of 8 outputs

    def forward(self, x):
        return self.fc(x)


def test_block_ids_stay_exact_integers_when_peft_casts_them(monkeypatch):
    monkeypatch.setattr(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", _move_casting_everything)
    ids = [257, 511]  # bf16 would round them to 256 and 512
    config = MFTCConfig(target_modules=["fc"], block_size=8, block_axis="out", block_selection={"fc": ids})
    model = get_peft_model(Wide().to(torch.bfloat16), config)
    layer = model.base_model.model.fc
    assert layer.mftc_idx["default"].dtype == torch.int32 and layer.block_ids("default") == ids
    assert layer.mftc_geometry["default"].dtype == torch.int32
    assert layer.mftc_geometry["default"].tolist() == [4096, 4, 8, 1]  # axis 1: "out"
    assert layer.mftc_delta["default"].shape == (16, 4)


def test_empty_deltas_stay_frozen_when_peft_ignores_frozen_names(monkeypatch):
    # PEFT 0.18-0.19 have no `_freeze_non_trainable_peft_weights`: set_adapter makes every active delta trainable.
    monkeypatch.setattr(BaseTunerLayer, "_freeze_non_trainable_peft_weights", lambda self, *a, **k: None,
                        raising=False)
    config = MFTCConfig(target_modules=["fc"], block_size=8, block_axis="out", block_selection={})
    model = get_peft_model(Wide(), config)
    model.set_adapter("default")
    model.base_model.set_requires_grad("default", True)
    layer = model.base_model.model.fc
    assert isinstance(layer, MFTCLayer) and layer.mftc_delta["default"].numel() == 0
    assert not layer.mftc_delta["default"].requires_grad
    model.base_model.set_block_selection({"fc": [3]})
    assert layer.mftc_delta["default"].requires_grad  # a filled delta is trainable again
