"""mftc-peft: MFTC (modular fine-tuning by clustering) as a tuner type of Hugging Face PEFT.

Importing the package registers the `mftc` tuner type with PEFT (idempotently).
"""

from __future__ import annotations

from ._compat import check_peft_version

check_peft_version()

from . import assets  # noqa: E402, F401  (mftc_peft.assets.minilm_dir() etc.)
from .blocks import BlockGrid, make_grid  # noqa: E402
from .config import MFTCConfig  # noqa: E402
from .dsca import DynamicSpectralClustering  # noqa: E402
from .dynamic import ReselectReport, reselect_blocks  # noqa: E402
from .layer import MFTCLayer  # noqa: E402
from .measure import BlockMeasurement, measure_blocks  # noqa: E402
from .model import MFTCModel  # noqa: E402
from .registry import register_tuner  # noqa: E402
from .report import WarmupReport  # noqa: E402
from .spectral import SpectralCoordinator  # noqa: E402
from .warmup import compute_selection, warmup  # noqa: E402


def register():
    """Make `mftc` a PEFT tuner type (`PeftType.MFTC`). Importing the package does it; calling it again is harmless."""
    return register_tuner(MFTCConfig, MFTCModel)


register()

__version__ = "0.1.0"
__all__ = [
    "BlockGrid", "BlockMeasurement", "DynamicSpectralClustering", "MFTCConfig", "MFTCLayer", "MFTCModel",
    "MFTCTrainer", "ReselectReport", "SpectralCoordinator", "WarmupReport", "compute_selection", "make_grid",
    "measure_blocks", "register", "reselect_blocks", "warmup",
]


def __getattr__(name):
    # The Trainer import pulls in much of transformers' training stack: only pay for it when it is used.
    if name == "MFTCTrainer":
        from .trainer import MFTCTrainer

        return MFTCTrainer
    raise AttributeError(f"module 'mftc_peft' has no attribute {name!r}")
