"""Print the seed-0 warm-up selections of the cpu profile (classification) and of README's quick start, with a short
digest of each, so that a refactoring can show that it changed no selection:

    HF_HUB_OFFLINE=1 python scripts/selection_digest.py            # this checkout
    PYTHONPATH=<other checkout> HF_HUB_OFFLINE=1 python <other checkout>/scripts/selection_digest.py

Uses only the public API (and the benchmark harness of the same checkout).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import mftc_peft  # noqa: E402
from mftc_peft import MFTCConfig  # noqa: E402
from mftc_peft.training import encode_texts, iterate_batches  # noqa: E402


def digest(selection: dict) -> str:
    return hashlib.sha256(json.dumps(selection, sort_keys=True).encode()).hexdigest()[:16]


def cpu_profile_selection(seed: int = 0) -> dict:
    from harness.methods import lora_budget
    from harness.profiles import PROFILES
    from harness.runner import WARMUP_SEED_OFFSET
    from harness.tasks import make_task, trim_padding

    settings = PROFILES["cpu"].settings["cls"]
    task = make_task("cls", settings)
    budget, splits = lora_budget(task), task.splits()
    config = MFTCConfig(task_type=task.task_type, target_modules=task.targets, seed=seed, budget=budget,
                        warmup_steps=settings.warmup_steps)
    model = get_peft_model(task.load_model(seed), config)
    batches = map(trim_padding, iterate_batches(splits.train, settings.batch_size, seed=WARMUP_SEED_OFFSET + seed,
                                                epochs=None))
    return mftc_peft.warmup(model, batches, progress=False).selection


def quick_start_selection() -> dict:
    """README's quick start, as written there (N_TRAIN 1024, batch 32, 16 warm-up steps, budget 0.03)."""
    folder = mftc_peft.assets.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = mftc_peft.assets.load_rotten_tomatoes()
    order = np.random.default_rng(0).permutation(len(corpus.texts))[:1024]
    train = encode_texts(tokenizer, [corpus.texts[i] for i in order], [corpus.labels[i] for i in order],
                         max_length=64)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    peft_model = get_peft_model(model, MFTCConfig(task_type="SEQ_CLS", budget=0.03, warmup_steps=16))
    return mftc_peft.warmup(peft_model, iterate_batches(train, 32, seed=1, epochs=None), progress=False).selection


if __name__ == "__main__":
    for name, make in (("cpu profile cls, seed 0", cpu_profile_selection), ("quick start", quick_start_selection)):
        selection = make()
        print(f"{name}: {sum(map(len, selection.values()))} blocks, digest {digest(selection)}")
        print("  " + json.dumps(selection, sort_keys=True))
