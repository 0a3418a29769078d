"""Lab probe (NOTES 86): MFTC's selected blocks plus a low-rank part on every target weight, at LoRA's count.

RoSA (Nikdan et al., 2024) trains a sparse part chosen from accumulated gradients together with LoRA and reports
beating both alone at the same count. This builder tests that idea on MFTC before any of it goes into the product:
the warm-up selects blocks for the budget left after a LoRA of rank `HYBRID_RANK_SHARE` x LoRA's rank, then PEFT's
LoRA layer wraps each MFTC layer's base layer, so the forward is base + LoRA + blocks. Only training is
supported: nothing here saves, merges or loads the pair.
"""

from __future__ import annotations

import time

from peft import LoraConfig
from peft.tuners import lora

from mftc_peft.layer import MFTCLayer

# LoRA's share of the rank (and so of the count, which is linear in the rank); the blocks take the rest.
HYBRID_RANK_SHARE = 0.5
LORA_ALPHA_PER_RANK = 2  # as the benchmark's LoRA (alpha = 2r)


def low_rank_part(rank: int) -> int:
    """The rank of the hybrid's LoRA part for a budget of LoRA at `rank` (at least 1)."""
    return max(1, round(rank * HYBRID_RANK_SHARE))


def blocks_budget(lora_budget: int, rank: int) -> int:
    """What is left for the blocks: LoRA's count at `rank` minus the low-rank part's (LoRA's count is linear in r)."""
    return lora_budget - lora_budget * low_rank_part(rank) // rank


def add_low_rank(peft_model, rank: int) -> float:
    """Wrap the base layer of every MFTC layer of `peft_model` in PEFT's LoRA at `low_rank_part(rank)` (B = 0, so the
    model's output is unchanged), trainable. Returns the seconds it took."""
    start = time.perf_counter()
    part = low_rank_part(rank)
    for module in list(peft_model.modules()):
        if isinstance(module, MFTCLayer):
            config = LoraConfig(r=part, lora_alpha=LORA_ALPHA_PER_RANK * part, lora_dropout=0.0,
                                fan_in_fan_out=module.fan_in_fan_out)
            wrapped = lora.Linear(module.base_layer, "low_rank", config, r=part, lora_alpha=config.lora_alpha,
                                  fan_in_fan_out=module.fan_in_fan_out)
            module.base_layer = wrapped
            for param in [*wrapped.lora_A.parameters(), *wrapped.lora_B.parameters()]:
                param.requires_grad_(True)
    return time.perf_counter() - start
