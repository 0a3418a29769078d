"""The job behind `mftc-peft finetune`: load a sequence classifier, wrap it in an adapter, warm up (MFTC), train,
evaluate. Writes nothing: the caller decides where the adapter, report and metrics go.

Training is AdamW with a linear decay to 0 over all steps, batches in an order drawn from the run's seed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .. import defaults
from ..training import encode_texts, evaluate, iterate_batches, make_batches, n_examples, train_steps
from .data import TaskData
from .errors import TrainingError
from .methods import Adapter, build_adapter, count_parameters
from .model_folder import load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    model_dir: Path
    method: str
    lr: float
    epochs: int
    seed: int
    batch_size: int = 32
    max_length: int = 64
    budget: Optional[float] = None
    warmup_steps: Optional[int] = None
    progress: bool = True


@dataclass
class RunResult:
    peft_model: object
    metrics: dict
    report: object = None  # WarmupReport (MFTC only)
    history: list = field(default_factory=list)


ETA_AFTER_STEPS = 3  # training steps timed before the ETA is logged (the first one also pays for set-up)


def plan_line(settings: RunSettings, n_train: int) -> str:
    """What the run will do, printed before the model is loaded: the step counts a user can time by."""
    steps_per_epoch = math.ceil(n_train / settings.batch_size)
    warmup = ""
    if settings.method == "mftc":
        n_warmup = settings.warmup_steps or defaults.WARMUP_STEPS
        warmup = f"warm-up {n_warmup} batches, then "
    total = settings.epochs * steps_per_epoch
    eta = f"; an ETA follows after {ETA_AFTER_STEPS} steps" if total > ETA_AFTER_STEPS else ""
    return (f"plan: {warmup}{total} training steps ({settings.epochs} epochs x {steps_per_epoch} batches of "
            f"{settings.batch_size}){eta}")


def eta_line(steps_done: int, total_steps: int, seconds: float) -> str:
    """The time left for training at the pace of the steps so far (validation and test evaluation come on top)."""
    per_step = seconds / steps_done
    left = per_step * (total_steps - steps_done)
    return (f"{per_step:.1f} s a step: training ends in about {left / 60:.1f} min "
            f"({total_steps - steps_done} of {total_steps} steps left)")


def finetune(data: TaskData, settings: RunSettings) -> RunResult:
    """Train an adapter of `settings.method` on `data.train`; metrics on `data.test` (and per epoch on validation)."""
    # The command line is the application: it seeds torch for the new head's initialisation, inside fork_rng so
    # that a caller's global RNG state (e.g. a test process calling `main`) is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return _finetune(data, settings)


def _finetune(data: TaskData, settings: RunSettings) -> RunResult:
    start = time.perf_counter()
    model, tokenizer = load_model(settings.model_dir, data.num_labels)
    encode = lambda split: encode_texts(tokenizer, split.texts, split.labels, max_length=settings.max_length)  # noqa
    train, test = encode(data.train), encode(data.test)
    validation = encode(data.validation) if data.validation is not None and len(data.validation) else None
    steps_per_epoch = math.ceil(n_examples(train) / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    adapter = build_adapter(
        model, settings.method, task_type="SEQ_CLS", total_steps=total_steps, seed=settings.seed,
        budget=settings.budget, warmup_steps=settings.warmup_steps,
    )
    report, warmup_seconds = None, 0.0
    if settings.method == "mftc":
        from ..warmup import warmup

        # The warm-up reads its own pass of seeded batches (a different order from training's first epoch).
        batches = iterate_batches(train, settings.batch_size, seed=settings.seed + 1, epochs=None)
        report = warmup(adapter.model, batches, progress=settings.progress)
        warmup_seconds = report.timings.get("total", 0.0)
    history, losses, train_seconds = _train(adapter, train, validation, settings, steps_per_epoch)
    test_loss, test_accuracy = evaluate(adapter.model, make_batches(test, settings.batch_size))
    metrics = {
        "method": settings.method, "test_accuracy": test_accuracy, "test_loss": test_loss,
        **count_parameters(adapter.model),
        "train_examples": n_examples(train), "test_examples": n_examples(test), "num_labels": data.num_labels,
        "steps": total_steps, "epochs": settings.epochs, "lr": settings.lr, "seed": settings.seed,
        "final_train_loss": losses[-1] if losses else None,
        "train_seconds": train_seconds, "warmup_seconds": warmup_seconds,
        "total_seconds": time.perf_counter() - start, "validation": history,
    }
    return RunResult(adapter.model, metrics, report, history)


def _check_converging(step: int, loss: float, total: int, lr: float) -> None:
    """A non-finite training loss means the run diverged: stop at once rather than train on and write NaN metrics
    and an adapter."""
    if not math.isfinite(loss):
        raise TrainingError(
            f"training diverged: the loss was {loss} at step {step + 1} of {total} with --lr {lr:g}; "
            "lower --lr (nothing was written)"
        )


def _train(adapter: Adapter, train, validation, settings: RunSettings, steps_per_epoch: int):
    """AdamW + linear decay; returns (per-epoch validation records, step losses, seconds spent training)."""
    model = adapter.model
    total = settings.epochs * steps_per_epoch
    history, validation_seconds = [], 0.0
    bar = tqdm(total=total, desc=f"train ({settings.method})", disable=not settings.progress)
    started = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        nonlocal validation_seconds
        _check_converging(step, loss, total, settings.lr)
        epoch = step // steps_per_epoch + 1
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
        if step + 1 == ETA_AFTER_STEPS < total:
            logger.info(eta_line(step + 1, total, time.perf_counter() - started))
        if validation is not None and (step + 1) % steps_per_epoch == 0:
            tic = time.perf_counter()
            val_loss, val_accuracy = evaluate(model, make_batches(validation, settings.batch_size))
            history.append({"epoch": epoch, "loss": val_loss, "accuracy": val_accuracy})
            logger.info("epoch %d: validation accuracy %.4f, loss %.4f", epoch, val_accuracy, val_loss)
            validation_seconds += time.perf_counter() - tic

    model.train()
    with contextlib.closing(bar):
        log = train_steps(
            model, iterate_batches(train, settings.batch_size, seed=settings.seed, epochs=settings.epochs),
            lr=settings.lr, steps=total, schedule="linear", hooks=adapter.hooks, on_step=on_step,
        )
    return history, list(log.losses), log.seconds - validation_seconds
