"""The adapters `mftc-peft finetune --method ...` can train: MFTC and, for a quick comparison, LoRA, AdaLoRA, PiSSA.

Every method targets the same weights (MFTC's architecture defaults: all attention and FFN projections, else every
linear layer), LoRA-family methods at rank 8, so that MFTC's default budget (3% of the target weights) is close to
LoRA r=8's trainable count on BERT-family encoders. PEFT and the package's tuner are imported only when an adapter is
built, so that the command line's argument checks (which read `METHODS` and `DEFAULT_LR`) stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

METHODS = ("mftc", "lora", "adalora", "pissa")
# Defaults from the benchmark protocol's reference runs on MiniLM + Rotten Tomatoes, not tuned per dataset.
DEFAULT_LR = {"mftc": 2e-3, "lora": 2e-3, "adalora": 2e-3, "pissa": 1e-3}
LORA_R, LORA_ALPHA = 8, 16
ADALORA_INIT_R = 12  # AdaLoRA starts 1.5x wider than its final rank (LoRA's 8) and prunes


@dataclass
class Adapter:
    model: object  # the PeftModel
    # What the method needs inside the training loop (a `TrainHooks`, None: nothing): AdaLoRA's rank allocation.
    hooks: object = None


def lora_targets(model):
    from ..model import DEFAULT_TARGET_MODULES

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return DEFAULT_TARGET_MODULES.get(model_type, "all-linear")


def build_adapter(model, method: str, *, task_type: str, total_steps: int, seed: int, budget=None,
                  warmup_steps: Optional[int] = None) -> Adapter:
    """Wrap `model` in the adapter of `method`; MFTC's blocks are chosen later by `mftc_peft.warmup`."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from ..config import MFTCConfig
    from ..training import TrainHooks

    if method == "mftc":
        extra = {k: v for k, v in (("budget", budget), ("warmup_steps", warmup_steps)) if v is not None}
        return Adapter(get_peft_model(model, MFTCConfig(task_type=task_type, seed=seed, **extra)))
    common = dict(task_type=task_type, lora_alpha=LORA_ALPHA, target_modules=lora_targets(model))
    if method == "lora":
        return Adapter(get_peft_model(model, LoraConfig(r=LORA_R, lora_dropout=0.0, **common)))
    if method == "pissa":
        config = LoraConfig(r=LORA_R, lora_dropout=0.0, init_lora_weights="pissa", **common)
        return Adapter(get_peft_model(model, config))
    if method == "adalora":
        # Ranks are pruned between 10% and 80% of training, then kept; AdaLoRA must know the total step count.
        config = AdaLoraConfig(
            init_r=ADALORA_INIT_R, target_r=LORA_R, total_step=total_steps, tinit=total_steps // 10,
            tfinal=total_steps // 5, deltaT=max(1, total_steps // 20), **common,
        )
        peft_model = get_peft_model(model, config)
        return Adapter(peft_model, TrainHooks(after_step=peft_model.base_model.update_and_allocate))
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")


def count_parameters(peft_model) -> dict[str, int]:
    """Trainable parameters with and without the task head (`modules_to_save`, which every method trains)."""
    trainable = [(name, p.numel()) for name, p in peft_model.named_parameters() if p.requires_grad]
    head = sum(n for name, n in trainable if "modules_to_save" in name)
    total = sum(n for _, n in trainable)
    return {"trainable_params": total, "trainable_params_without_head": total - head, "head_params": head}
