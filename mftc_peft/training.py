"""Data batching, evaluation and the one training loop: shared by the probes, the warm-up, the CLI and the benchmarks.

Data is kept as one dict of equally long tensors (`encode_texts`: padded to `max_length` once); batches are index
selections of it, trimmed to the longest sequence they contain. Batch orders come from a numpy Generator, so they are
reproducible without touching torch's global RNG. `train_steps` (the training loop, with `TrainHooks` for what some
methods need inside it) and `evaluate` run plain loops over batch dicts that the model takes (with `labels`); losses
come from `outputs.loss` or a `compute_loss(model, batch)` callable.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.optimization import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from .checks import check_choice, check_int, check_number, check_positive_number, check_rng

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear")
# The KV-cache arguments transformers' checkpointing wrapper clears (`_checkpointed_forward`): 5.x names the cache
# `cache` (GPT-2: `layer_past`), 4.x `past_key_value` or `past_key_values`.
CACHE_KWARGS = ("cache", "layer_past", "past_key_value", "past_key_values")
IGNORE_INDEX = -100  # label value that losses and accuracies skip (transformers' convention)

# compute_loss(model, batch) -> loss tensor, or (loss tensor, outputs with `.logits`) so that accuracy can be measured.
LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], "torch.Tensor | tuple[torch.Tensor, object]"]


# --------------------------------------------------------------------------------------------------------------- data
def encode_texts(tokenizer, texts: Sequence[str], labels: Sequence[int] | None = None, *, max_length: int = 64):
    """Tokenise `texts` once, truncated and padded to `max_length`: a dict of (n, max_length) tensors (+ `labels`)."""
    check_int("max_length", max_length)
    texts = list(texts)
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"`labels` must have one entry per text ({len(texts)}), got {len(labels)}")
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    data = {key: value for key, value in encoded.items()}
    if labels is not None:
        data["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return data


def n_examples(data: Mapping[str, torch.Tensor]) -> int:
    sizes = {len(v) for v in data.values()}
    if len(sizes) != 1:
        raise ValueError(f"`data` must hold tensors of one common length, got lengths {sorted(sizes)!r}")
    return sizes.pop()


def take(data: Mapping[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    """The batch of rows `index`, with padding columns that no row of it uses dropped (needs `attention_mask`)."""
    index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    batch = {key: value[index] for key, value in data.items()}
    mask = batch.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        used = mask.bool().any(dim=0)  # (T,): works for left and right padding alike
        if not bool(used.all()):
            width = mask.shape[1]
            batch = {k: v[:, used] if v.ndim >= 2 and v.shape[1] == width else v for k, v in batch.items()}
    return batch


def make_batches(
    data: Mapping[str, torch.Tensor], batch_size: int, *, rng=None, drop_last: bool = False
) -> list[dict[str, torch.Tensor]]:
    """One epoch of batches: in order, or shuffled by `rng` (a numpy Generator or an integer seed)."""
    batch_size = check_int("batch_size", batch_size)
    n = n_examples(data)
    order = np.arange(n) if rng is None else check_rng("rng", rng).permutation(n)
    stops = range(batch_size, n + 1 if drop_last else n + batch_size, batch_size)
    return [take(data, order[stop - batch_size : min(stop, n)]) for stop in stops]


def iterate_batches(
    data: Mapping[str, torch.Tensor],
    batch_size: int,
    *,
    seed: int | None = None,
    epochs: int | None = 1,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches for `epochs` epochs (None: forever), each epoch in a fresh order drawn from `default_rng(seed)`.

    `seed=None` keeps the data order. The same seed always yields the same batches.
    """
    if epochs is not None:
        check_int("epochs", epochs)
    rng = None if seed is None else check_rng("seed", seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        yield from make_batches(data, batch_size, rng=rng, drop_last=drop_last)
        epoch += 1


# ------------------------------------------------------------------------------------------------------------ metrics
def loss_and_outputs(model: nn.Module, batch, compute_loss: LossFn | None):
    """(loss, outputs) of a batch: `outputs.loss` by default, else `compute_loss(model, batch)` (outputs may be
    None)."""
    if compute_loss is None:
        outputs = model(**batch)
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError("the model returned no `loss`: pass batches with `labels` or a `compute_loss` callable")
        return loss, outputs
    result = compute_loss(model, batch)
    return result if isinstance(result, tuple) else (result, None)


def _correct_and_count(outputs, batch) -> tuple[int, int]:
    """Correct predictions and how many labels were scored; (0, 0) when there is nothing to score."""
    logits = getattr(outputs, "logits", outputs if isinstance(outputs, torch.Tensor) else None)
    labels = batch.get("labels")
    if logits is None or labels is None:
        return 0, 0
    if logits.ndim == 3 and labels.ndim == 2:
        # Causal LM: position t predicts token t + 1 (transformers shifts the same way inside its loss).
        logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    elif logits.ndim != 2 or labels.ndim != 1:
        raise ValueError(
            "accuracy needs classification logits (B, C) with labels (B,) or causal-LM logits (B, T, V) with labels "
            f"(B, T), got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    scored = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & scored
    return int(correct.sum()), int(scored.sum())


def _batch_stats(model, batch, compute_loss) -> tuple[float, int, int]:
    loss, outputs = loss_and_outputs(model, batch, compute_loss)
    correct, count = _correct_and_count(outputs, batch)
    return float(loss.detach()), correct, count


def batch_metrics(model: nn.Module, batch: Mapping[str, torch.Tensor], compute_loss: LossFn | None = None):
    """(loss, accuracy) of one batch without gradients, in the model's current train/eval mode.

    Accuracy is argmax(logits) == labels for classification and next-token accuracy for causal LM logits (B, T, V)
    with labels (B, T), positions labelled -100 skipped. NaN when it cannot be measured (no labels, or a
    `compute_loss` that returns the loss alone instead of `(loss, outputs)`).
    """
    with torch.no_grad():
        loss, correct, count = _batch_stats(model, batch, compute_loss)
    return loss, (correct / count if count else math.nan)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`model.eval()` for the duration, then every submodule's own train/eval flag back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def deterministic_mode(model: nn.Module):
    """Eval mode for the duration (no dropout: a measurement is deterministic) that keeps activation checkpointing.

    transformers checkpoints a layer only while the layer's own `training` flag is on, and many layers also read that
    flag for their functional dropout, so the flag cannot do both: the layers with checkpointing enabled stay in eval
    mode and get an instance-level `forward` that checkpoints the class's unwrapped forward. Otherwise the warm-up's
    backward passes would hold every activation that training, checkpointed, does not. Modes and forwards are put
    back on exit."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    with eval_mode(model):
        for layer in layers:
            layer.forward = functools.partial(_checkpointed_forward, layer)
        try:
            yield model
        finally:
            for layer in layers:
                del layer.forward


def _checkpointed_forward(layer: nn.Module, *args, **kwargs):
    """What transformers' checkpointing wrapper does in training mode, whatever the layer's `training` flag."""
    forward = type(layer).forward
    forward = getattr(forward, "__wrapped__", forward)  # the class's own forward, under transformers' wrapper
    if not torch.is_grad_enabled():
        return forward(layer, *args, **kwargs)
    # As the wrapper does: a cache written during the forward would be written again by the backward's replay.
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not getattr(layer, "_can_checkpoint_with_cache", False):
        kwargs.update({key: None for key in CACHE_KWARGS if kwargs.get(key) is not None})
    return layer._gradient_checkpointing_func(functools.partial(forward, layer, **kwargs), *args)


def evaluate(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, compute_loss: LossFn | None = None
) -> tuple[float, float]:
    """(loss, accuracy) over `batches` in eval mode, without gradients; the model's modes are restored after.

    The loss is the mean of batch losses weighted by batch size (exact for mean-reduced classification losses);
    accuracy pools correct predictions over all scored labels (NaN when none could be scored).
    """
    total, weight, correct, count = 0.0, 0, 0, 0
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            loss, c, k = _batch_stats(model, batch, compute_loss)
            size = len(next(iter(batch.values())))
            total, weight, correct, count = total + loss * size, weight + size, correct + c, count + k
    if weight == 0:
        raise ValueError("`batches` must hold at least one batch")
    return total / weight, (correct / count if count else math.nan)


# ------------------------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class TrainHooks:
    """What some methods need inside the training loop; each is optional and called once per step.

    `extra_loss()` returns a term added to the loss before backward (MFTC's spectral regulariser);
    `after_backward()` runs between backward and the optimiser step (spectral gradient filtering);
    `after_step(step)` runs after the optimiser step and before `zero_grad`, while the gradients are still there
    (AdaLoRA's `update_and_allocate`), with the 0-based index of the step; `optimizer_ready(optimizer)` once, when
    the loop has built its optimiser (MFTC's dynamic selection moves the optimiser state of swapped blocks).
    """

    extra_loss: Callable[[], torch.Tensor] | None = None
    after_backward: Callable[[], None] | None = None
    after_step: Callable[[int], None] | None = None
    optimizer_ready: Callable[[torch.optim.Optimizer], None] | None = None


@dataclass(frozen=True)
class TrainLog:
    """What `train_steps` did: the loss of every step (extra loss term included), the number of steps, wall seconds."""

    losses: tuple[float, ...]
    steps: int
    seconds: float


def make_optimizer(params, *, lr: float, optimizer: str = "adamw", weight_decay: float = 0.0):
    """AdamW or SGD over `params` (tensors or param-group dicts; groups may set their own `lr`)."""
    lr = check_positive_number("lr", lr)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    weight_decay = check_number("weight_decay", weight_decay, minimum=0, allow_inf=False)
    params = list(params)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _synchronize(device: torch.device | None) -> None:
    """Wait for queued GPU work, so that wall seconds measure the steps and not only their launch."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def make_scheduler(opt: torch.optim.Optimizer, schedule: str, *, steps: int | None, lr_warmup_steps: int):
    """transformers' schedule for `schedule` after a linear ramp of `lr_warmup_steps` (None: a constant rate)."""
    if schedule == "linear":
        return get_linear_schedule_with_warmup(opt, lr_warmup_steps, steps)
    return get_constant_schedule_with_warmup(opt, lr_warmup_steps) if lr_warmup_steps else None


def train_steps(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    lr: float,
    steps: int | None = None,
    params=None,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    schedule: str = "constant",
    lr_warmup_steps: int = 0,
    compute_loss: LossFn | None = None,
    hooks: TrainHooks | None = None,
    device: torch.device | str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> TrainLog:
    """The training loop: forward, backward and optimiser step on each batch, for `steps` steps (None: until
    `batches` runs out). The probes, the command line, the examples and the benchmarks all train with it.

    Each step: loss (+ `hooks.extra_loss()`) -> backward -> `hooks.after_backward()` -> optimiser step ->
    `hooks.after_step(step)` -> `zero_grad(set_to_none=True)` -> scheduler step -> `on_step(step, loss)`.
    The losses stay on the device until the end, so a step never waits for the host; `on_step` takes the loss as a
    float, which does wait on a GPU: pass it only when a per-step readout (a progress bar) is worth that.

    `params` (tensors or param-group dicts; None: every parameter of `model` that requires gradients) are what the
    optimiser updates; which parameters receive gradients is up to their `requires_grad` flags. `optimizer` is
    "adamw" or "sgd" with `weight_decay`; `schedule="linear"` decays the learning rate linearly to 0 over `steps`
    (which must then be given), "constant" keeps it. `lr_warmup_steps` first ramps the rate linearly from 0, as
    transformers' `get_*_schedule_with_warmup` (the `Trainer`'s `warmup_steps`) do; the linear decay then runs over
    the steps after the ramp. `device` moves every batch there (None: batches are used as
    they come). Runs in the model's current train/eval mode and leaves gradients cleared (None).
    """
    if steps is not None:
        steps = check_int("steps", steps)
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "linear" and steps is None:
        raise ValueError("`steps` must be given with `schedule='linear'`, got None")
    lr_warmup_steps = check_int("lr_warmup_steps", lr_warmup_steps, minimum=0)
    if steps is not None and lr_warmup_steps >= steps:
        raise ValueError(f"`lr_warmup_steps` must be smaller than `steps` ({steps}), got {lr_warmup_steps}")
    hooks = TrainHooks() if hooks is None else hooks
    device = None if device is None else torch.device(device)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=lr, optimizer=optimizer, weight_decay=weight_decay)
    if hooks.optimizer_ready is not None:
        hooks.optimizer_ready(opt)
    scheduler = make_scheduler(opt, schedule, steps=steps, lr_warmup_steps=lr_warmup_steps)
    losses, batches = [], iter(batches)
    bar = tqdm(total=steps, desc=desc or "train", disable=not progress, leave=False)
    _synchronize(device)
    start = time.perf_counter()
    try:
        while steps is None or len(losses) < steps:
            try:
                batch = next(batches)
            except StopIteration:
                if steps is not None:
                    raise ValueError(f"`batches` ran out after {len(losses)} of {steps} steps") from None
                break
            step = len(losses)
            if device is not None:
                batch = {key: value.to(device) for key, value in batch.items()}
            loss, _ = loss_and_outputs(model, batch, compute_loss)
            if hooks.extra_loss is not None:
                loss = loss + hooks.extra_loss()
            loss.backward()
            if hooks.after_backward is not None:
                hooks.after_backward()
            opt.step()
            if hooks.after_step is not None:
                hooks.after_step(step)
            opt.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.detach())  # read once at the end: a float per step would wait for the GPU each step
            bar.update(1)
            if on_step is not None:
                on_step(step, float(losses[-1]))
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)
    _synchronize(device)
    seconds = time.perf_counter() - start
    values = tuple(torch.stack(losses).tolist()) if losses else ()
    return TrainLog(tuple(float(v) for v in values), len(losses), seconds)
