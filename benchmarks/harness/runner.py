"""One run: build a method on a fresh base model, warm up if it needs to, train, evaluate, measure; one record.

`run_one(spec)` is what `benchmarks/run.py` executes in a fresh subprocess per run, so that the peak resident memory
(`ru_maxrss`, a per-process high-water mark) belongs to that run alone.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from mftc_peft.training import TrainLog, iterate_batches, train_steps

from .measures import adapter_bytes, device_name, peak_memory, selection_summary, trainable_counts, versions
from .methods import LORA_R, Built, Context, Skip, build
from .profiles import PROFILES
from .tasks import Splits, make_task, trim_padding

WARMUP_SEED_OFFSET = 10_000  # warm-up batches: their own seeded stream, the same for MFTC and every ablation


def run_one(spec: dict) -> dict:
    """`spec`: profile, phase ('sweep' | 'test'), task, method, seed, lr, lr_swept, device, lora_budget,
    match_budget, budget_source, and optionally mftc_config (MFTCConfig overrides), lora_rank (a budget sweep's
    rank; default 8) and lr_warmup_ratio (the share of the steps over which the rate ramps up from 0; default 0).
    Returns the JSON record (status 'ok', 'skipped' or 'failed')."""
    profile = PROFILES[spec["profile"]]
    settings = profile.settings[spec["task"]]
    task = make_task(spec["task"], settings, tiny=profile.tiny_models)
    device = torch.device(spec["device"])
    if profile.tiny_models:
        torch.set_num_threads(1)  # tiny matrices: extra threads only contend with the rest of the machine
    record = dict(spec, batch_size=settings.batch_size, max_length=settings.max_length, metric=task.metric,
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device_name=device_name(device),
                  versions=versions(), tiny_models=profile.tiny_models)
    try:
        return record | _run(spec, task, device)
    except Skip as skip:
        return record | {"status": "skipped", "reason": str(skip)}
    except Exception as error:  # recorded, so that one broken method does not stop a long profile
        return record | {"status": "failed", "reason": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc(limit=8)}


@dataclass
class Trained:
    """A method built, warmed up and trained as `run_one` does it, before any evaluation."""

    built: Built
    splits: Splits
    steps: int
    lr_warmup_steps: int
    trainable: tuple[int, int]  # (all, outside the head), counted before training
    result: TrainLog


def train(spec: dict, task, device: torch.device) -> Trained:
    """Build `spec`'s method on a fresh base model, warm it up if it needs to, and train it: the one training loop
    every method runs (AdamW, weight decay 0, linear decay to 0 after the ramp the spec asks for, the method's hooks,
    such as AdaLoRA's rank allocation or MFTC's spectral coordination, inside it). Diagnostics that look at a trained
    adapter (`benchmarks/hybrid_ablation.py`) start from here."""
    seed, bs = spec["seed"], task.settings.batch_size
    splits = task.splits()
    steps = task.steps()
    ctx = Context(
        task=task, seed=seed, steps=steps, device=device, lora_budget=spec["lora_budget"],
        match_budget=spec["match_budget"], mftc_overrides=dict(spec.get("mftc_config") or {}),
        rank=int(spec.get("lora_rank", LORA_R)),
        warmup_batches=lambda: map(trim_padding, iterate_batches(splits.train, bs, seed=WARMUP_SEED_OFFSET + seed,
                                                                 epochs=None)),
    )
    built = build(spec["method"], task.load_model(seed), ctx)
    trainable = trainable_counts(built.model, task.is_head)
    torch.manual_seed(seed)  # dropout masks: the same stream for every method of a seed
    train_batches = map(trim_padding, iterate_batches(splits.train, bs, seed=seed, epochs=None))
    built.model.train()
    ramp = lr_warmup_steps(spec, steps)
    result = train_steps(built.model, train_batches, lr=spec["lr"], steps=steps, schedule="linear",
                         lr_warmup_steps=ramp, hooks=built.hooks, device=device)
    return Trained(built, splits, steps, ramp, trainable, result)


def _run(spec: dict, task, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trained = train(spec, task, device)
    built, splits, result = trained.built, trained.splits, trained.result
    total, no_head = trained.trainable
    split = "val" if spec["phase"] == "sweep" else "test"
    start = time.perf_counter()
    metrics = task.evaluate(built.model, getattr(splits, split), device)
    eval_seconds = time.perf_counter() - start
    info = dict(built.info)
    finalize = info.pop("finalize", None)
    size, size_kind = adapter_bytes(built.model, is_peft=built.is_peft)
    return {
        "status": "ok", "steps": trained.steps, "lr_warmup_steps": trained.lr_warmup_steps, "eval_split": split,
        "n_train": len(splits.train["input_ids"]),
        "n_eval": len(getattr(splits, split)["input_ids"]),
        **{f"{split}_{k}": v for k, v in metrics.items()},
        "trainable_params": total, "trainable_params_no_head": no_head,
        "setup_seconds": built.setup_seconds, "warmup_seconds": built.warmup_seconds, "train_seconds": result.seconds,
        "wall_seconds": built.setup_seconds + built.warmup_seconds + result.seconds, "eval_seconds": eval_seconds,
        "first_loss": result.losses[0], "last_loss": result.losses[-1], "losses": [round(x, 5) for x in result.losses],
        **selection_summary(built.model),
        "adapter_bytes": size, "adapter_file": size_kind, **peak_memory(device),
        "threads": torch.get_num_threads(), **info, **(finalize() if finalize else {}),
    }


def lr_warmup_steps(spec: dict, steps: int) -> int:
    """The steps of the learning-rate ramp: `lr_warmup_ratio` of the run's steps, rounded, and at least one step when
    the ratio is above 0 (a smoke run's 3 steps would round it away)."""
    ratio = float(spec.get("lr_warmup_ratio", 0.0))
    return max(1, round(ratio * steps)) if ratio > 0 else 0
