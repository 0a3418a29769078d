"""mftc-peft: MFTC (modular fine-tuning by clustering) as a tuner type of Hugging Face PEFT.

Importing the package registers the `mftc` tuner type with PEFT (idempotently). The public names and the
registration need PEFT, transformers and torch (seconds to import), so they are loaded when PEFT is: at once if it
is already imported, else as soon as anything imports it (`_import_hook.py`). Until then `import mftc_peft` is
light, which keeps `mftc-peft --help` and its argument checks fast.
"""

from __future__ import annotations

import importlib
import sys
import types

from ._compat import check_peft_version

check_peft_version()

__version__ = "0.1.0"
# Public name -> the submodule that defines it.
_EXPORTS = {
    "BlockGrid": "blocks", "make_grid": "blocks", "MFTCConfig": "config", "DynamicSpectralClustering": "dsca",
    "ReselectReport": "dynamic", "reselect_blocks": "dynamic", "reselection_due": "dynamic", "MFTCLayer": "layer",
    "BlockMeasurement": "measure",
    "measure_blocks": "measure", "MFTCModel": "model", "WarmupReport": "report", "SpectralCoordinator": "spectral",
    "compute_selection": "warmup", "warmup": "warmup",
}
__all__ = sorted([*_EXPORTS, "MFTCTrainer", "register"])


def register():
    """Make `mftc` a PEFT tuner type (`PeftType.MFTC`). Importing the package does it; calling it again is harmless."""
    from .config import MFTCConfig
    from .model import MFTCModel
    from .registry import register_tuner

    return register_tuner(MFTCConfig, MFTCModel)


def _load_public_names() -> None:
    for name, module in _EXPORTS.items():
        globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)
    register()


def __getattr__(name):
    if name in _EXPORTS:
        _load_public_names()
        return globals()[name]
    # The Trainer import pulls in much of transformers' training stack: only pay for it when it is used.
    if name == "MFTCTrainer":
        from .trainer import MFTCTrainer

        return MFTCTrainer
    if name == "assets":  # mftc_peft.assets.minilm_dir() without importing the submodule first
        return importlib.import_module(".assets", __name__)
    raise AttributeError(f"module 'mftc_peft' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # `warmup` names both a submodule and the exported function: the import system binds a submodule to its
        # package when it is first imported, which must not hide the function once that is loaded.
        if name in _EXPORTS and isinstance(value, types.ModuleType) and name in self.__dict__:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

from ._import_hook import when_imported  # noqa: E402

when_imported("peft", __name__, _load_public_names)
