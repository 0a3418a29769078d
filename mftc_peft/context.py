"""`WarmupRun`: what every stage of one warm-up shares, so that the stages take one argument instead of ten.

The model and the adapter they act on, that adapter's config, the loss, the child seeds spawned from the config's one
seed, the progress flag and the seconds spent per stage.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .training import loss_and_outputs

# Child seeds spawned from the config's one seed, one stream per stage that draws random numbers (style: separate
# generators per purpose).
STREAMS = ("signatures", "clustering", "probing", "allocation")  # append only: spawn keys are positions


def stage_seeds(seed: int) -> dict[str, int]:
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: int(child.generate_state(1)[0]) for name, child in zip(STREAMS, children)}


def default_loss(model, batch) -> torch.Tensor:
    """`outputs.loss` of the batch (a clear error when the batch has no labels)."""
    return loss_and_outputs(model, batch, None)[0]


@dataclass
class WarmupRun:
    peft_model: torch.nn.Module
    adapter_name: str
    config: object  # the adapter's MFTCConfig
    compute_loss: Optional[Callable] = None  # the user's loss; None: `outputs.loss`
    progress: bool = True
    timings: dict = field(default_factory=dict)  # seconds per stage, summed over calls

    @property
    def seeds(self) -> dict[str, int]:
        return stage_seeds(self.config.seed)

    def loss(self, batch) -> torch.Tensor:
        loss = (self.compute_loss or default_loss)(self.peft_model, batch)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            shape = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else repr(loss)
            raise ValueError(
                f"`compute_loss` must return the batch's loss as a scalar tensor (e.g. the mean over samples), "
                f"got {shape:.80}"
            )
        return loss.reshape(())

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
