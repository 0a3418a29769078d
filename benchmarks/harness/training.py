"""The one training loop every method runs: AdamW, linear decay to 0, a fixed number of steps, batches on a device.

Hooks carry what some methods need inside the loop (AdaLoRA's `update_and_allocate` after the optimiser step and
before `zero_grad`; MFTC's spectral regulariser and gradient filter).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .methods import Hooks


@dataclass(frozen=True)
class TrainResult:
    losses: tuple[float, ...]
    seconds: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model, batches, *, lr: float, steps: int, hooks: Hooks, device: torch.device) -> TrainResult:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: max(0.0, 1.0 - k / steps))
    model.train()
    losses = []
    _sync(device)
    start = time.perf_counter()
    for step in range(steps):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(**batch).loss
        if hooks.extra_loss is not None:
            loss = loss + hooks.extra_loss()
        loss.backward()
        if hooks.after_backward is not None:
            hooks.after_backward()
        optimizer.step()
        if hooks.after_step is not None:
            hooks.after_step(step)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(float(loss.detach()))
    _sync(device)
    return TrainResult(tuple(losses), time.perf_counter() - start)
