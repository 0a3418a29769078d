"""`MFTCTrainer`: a `transformers.Trainer` that runs the MFTC warm-up before it creates its optimiser.

The optimiser therefore holds exactly the selected deltas. The selection is part of the adapter config, so every
checkpoint carries it; resuming loads it from the checkpoint and does not warm up again. Spectral coordination
(`spectral_filter`, `spectral_reg` in the config) is applied on every step when set, dynamic selection
(`reselect_every`) every K steps.

Supported: a single device, DDP (`torchrun` or `accelerate launch --multi_gpu`) and gradient checkpointing. FSDP and
DeepSpeed are refused at construction. Both are untested, and the warm-up re-creates the deltas with data-dependent
shapes inside `create_optimizer`: FSDP1 calls it after flattening the parameters into its own, and DeepSpeed with an
optimiser in its config builds that optimiser from the trainable parameters listed before the warm-up.
"""

from __future__ import annotations

import itertools
import logging
import os

from transformers import Trainer, TrainerCallback

from .dynamic import reselect_blocks, reselection_due
from .model import mftc_tuner
from .spectral import SpectralCoordinator
from .warmup import warmup

logger = logging.getLogger(__name__)

SUPPORTED = "a single device, DDP and gradient checkpointing"
USE_DDP = "`torchrun --nproc_per_node N train.py` or `accelerate launch --multi_gpu --num_processes N train.py`"


def _sharding_settings(args) -> list[tuple[str, object, str]]:
    """(setting, value, what it turns on) for each setting that would run the trainer under FSDP or DeepSpeed."""
    found = [(f"TrainingArguments.{name}", getattr(args, name, None), kind)
             for name, kind in (("fsdp", "FSDP"), ("deepspeed", "DeepSpeed"))]
    found = [setting for setting in found if setting[1]]
    # `accelerate launch --use_fsdp / --use_deepspeed` (or an accelerate config naming them) sets these; accelerate
    # reads them the same way
    for name, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(name, "false").lower() == "true":
            found.append((name, os.environ[name], kind))
    return found


def _refuse_sharding(settings: list[tuple[str, object, str]]) -> None:
    if settings:
        name, value, kind = settings[0]
        raise ValueError(
            f"`{name}` turns on {kind}, got {value!r}: MFTCTrainer supports {SUPPORTED}, not FSDP or DeepSpeed (the "
            f"warm-up re-creates the adapter's deltas, which sharded or engine-owned parameters do not follow). For "
            f"several devices use DDP: {USE_DDP}."
        )


class _FilterGradients(TrainerCallback):
    """Low-pass filter the selected blocks' gradients right before each optimiser step."""

    def __init__(self, trainer: "MFTCTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.spectral is not None:
            self.trainer.spectral.filter_gradients()


class _Reselect(TrainerCallback):
    """Dynamic selection (`reselect_every` in the config): every K optimiser steps, swap blocks (`dynamic.py`)."""

    def __init__(self, trainer: "MFTCTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        tuner = mftc_tuner(self.trainer.model)
        config = tuner.peft_config[tuner.active_adapters[0]]
        if reselection_due(state.global_step, config.reselect_every, state.max_steps):
            batches = [self.trainer._prepare_inputs(batch)
                       for batch in itertools.islice(self.trainer.get_train_dataloader(), config.reselect_batches)]
            reselect_blocks(self.trainer.model, batches, fraction=config.reselect_fraction,
                            optimizer=self.trainer.optimizer,
                            compute_loss=self.trainer.warmup_kwargs.get("compute_loss"))


class MFTCTrainer(Trainer):
    """A `Trainer` for a PEFT model with an MFTC adapter.

    Extra keyword arguments: `warmup_kwargs` (passed to `mftc_peft.warmup`, e.g. `compute_loss`) and
    `warmup_eval_dataset` (held-out batches for finetune probes). After training, `trainer.warmup_report` holds the
    report (None when the adapter already had a selection or training resumed from a checkpoint).
    """

    def __init__(self, *args, warmup_kwargs: dict | None = None, **kwargs):
        # before the Accelerator exists, and before transformers' own FSDP checks (which name neither MFTC nor DDP)
        _refuse_sharding(_sharding_settings(kwargs.get("args", args[1] if len(args) > 1 else None)))
        super().__init__(*args, **kwargs)
        # FSDP or DeepSpeed that reached accelerate's state some other way (e.g. a parallelism config)
        _refuse_sharding([(f"trainer.is_{kind.lower()}_enabled", True, kind) for kind in ("FSDP", "DeepSpeed")
                          if getattr(self, f"is_{kind.lower()}_enabled", False)])
        mftc_tuner(self.model)  # fail early, with a clear message, if the model has no MFTC adapter
        self.warmup_kwargs = dict(warmup_kwargs or {})
        self.warmup_report = None
        self.spectral = None
        self.add_callback(_FilterGradients(self))
        self.add_callback(_Reselect(self))

    def _needs_warmup(self) -> bool:
        tuner = mftc_tuner(self.model)
        return tuner.selected_numel() == 0

    def create_optimizer(self, model=None):
        if self.optimizer is None and self._needs_warmup():
            self._run_warmup()
        self._build_spectral_coordinator()
        # transformers 4.x's create_optimizer takes no `model` (5.x passes one only for a wrapped model).
        return super().create_optimizer() if model is None else super().create_optimizer(model)

    def _run_warmup(self) -> None:
        logger.info("MFTC: warm-up on the training dataloader before creating the optimiser")
        report = warmup(
            self.model,
            (self._prepare_inputs(batch) for batch in self.get_train_dataloader()),
            progress=not self.args.disable_tqdm,
            **self.warmup_kwargs,
        )
        self.warmup_report = report
        self.log({f"mftc_warmup_{stage}_s": seconds for stage, seconds in report.timings.items()}
                 | {"mftc_trainable_elements": report.trainable_elements})

    def _build_spectral_coordinator(self) -> None:
        tuner = mftc_tuner(self.model)
        config = tuner.peft_config[tuner.active_adapters[0]]
        if not (config.spectral_filter or config.spectral_reg):
            return
        if self.warmup_report is None:
            logger.warning("MFTC: spectral coordination needs the warm-up's block graph; it is off for this run")
            return
        graph = self.warmup_report.block_graph()
        self.spectral = SpectralCoordinator(
            self.model, graph.nodes, graph.affinity, beta=config.spectral_filter, lam=config.spectral_reg
        )

    def compute_loss(self, model, inputs, *args, **kwargs):
        result = super().compute_loss(model, inputs, *args, **kwargs)
        if self.spectral is None or self.spectral.lam == 0.0:
            return result
        if isinstance(result, tuple):
            return (result[0] + self.spectral.regularization(), *result[1:])
        return result + self.spectral.regularization()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # The layers took the checkpoint's block ids; keep the config in step so later saves record them.
        tuner = mftc_tuner(self.model)
        tuner.peft_config[tuner.active_adapters[0]].block_selection = tuner.block_selection()
