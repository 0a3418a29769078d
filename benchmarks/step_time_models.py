"""The models step_time.py times, and how each method is built on them.

A `ModelSpec` holds what differs between models (loader, targets, task type, head, random batch, default shape, file
stem); `build` turns a spec and a method name into a model ready to train, the same way for every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from harness.tasks import BERT_TARGETS, LLAMA_TARGETS  # the targets every method of the benchmark adapts
from mftc_peft import MFTCConfig
from mftc_peft.blocks import module_role

LORA_RANK = 8
MINILM_SHAPE = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
    max_position_embeddings=512, num_labels=2,
)


@dataclass(frozen=True)
class ModelSpec:
    label: str  # what the record and the table header call the model
    stem: str  # results/<stem>.json and .md
    task_type: str
    targets: list[str]
    head_prefixes: tuple[str, ...]  # parameters of a task head (trained by head_only, left out of adapter counts)
    methods: tuple[str, ...]  # the methods this model supports, in the order they take turns
    batch: int
    seq: int
    load: Callable[[], torch.nn.Module]  # a fresh fp32 base model, the same weights on every call
    make_batch: Callable[[int, int, torch.Generator], dict[str, torch.Tensor]]  # (batch, seq, generator) -> inputs
    # Roles MFTC's random blocks are drawn from (None: every target), so that the timed adapter has the make-up of
    # what the default selects on this model
    block_roles: tuple[str, ...] | None = None


def _minilm_shape() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)  # random init: seeded so that every method starts from the same weights
    return BertForSequenceClassification(BertConfig(**MINILM_SHAPE))


def _minilm_batch(batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(1000, 30000, (batch, seq), generator=generator),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=generator),
    }


def _smollm2() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from mftc_peft.assets import smollm2_dir

    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)


def _smollm2_batch(batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 49152, (batch, seq), generator=generator)  # SmolLM2's vocabulary
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": ids.clone()}


MODELS = {
    "minilm-shape": ModelSpec(
        label="MiniLM-shaped BERT (random init)", stem="step_time", task_type="SEQ_CLS", targets=BERT_TARGETS,
        head_prefixes=("classifier",), methods=("lora", "mftc", "head_only", "full"), batch=32, seq=64,
        load=_minilm_shape, make_batch=_minilm_batch,
    ),
    # The LM benchmark's model and batch (8 x 128). Its head is the tied input embedding, so there is no head_only.
    "smollm2": ModelSpec(
        label="SmolLM2-135M (packaged, dequantised from Q4_1 GGUF)", stem="step_time_smollm2", task_type="CAUSAL_LM",
        targets=LLAMA_TARGETS, head_prefixes=(), methods=("lora", "mftc", "full"), batch=8, seq=128,
        load=_smollm2, make_batch=_smollm2_batch,
        # at LoRA r=8's count the 8-wide default puts every group in the FFN weights (a head is 8 groups; NOTES 62)
        block_roles=("ffn_in", "ffn_out"),
    ),
}


def parse_methods(spec: ModelSpec, text: str | None) -> list[str]:
    """Comma-separated method names -> the list in `spec.methods`' order; None means all of them."""
    if text is None:
        return list(spec.methods)
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in spec.methods]
    if unknown or not wanted:
        raise ValueError(f"`methods` must be a comma-separated subset of {','.join(spec.methods)}, got {text!r}")
    return [name for name in spec.methods if name in wanted]


def adapter_numel(spec: ModelSpec, model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and not any(prefix in n for prefix in spec.head_prefixes))


def selection_label(spec: ModelSpec) -> str:
    """What the record says about MFTC's timed blocks."""
    roles = "every target" if spec.block_roles is None else "roles " + ", ".join(spec.block_roles)
    return f"random blocks of the default grid over {roles} (seed 0)"


def random_selection(spec: ModelSpec, budget: int, seed: int) -> dict[str, list[int]]:
    """Random blocks of MFTC's default grid over the spec's roles until `budget` elements are reached (never more)."""
    probe = get_peft_model(spec.load(), MFTCConfig(task_type=spec.task_type, target_modules=spec.targets))
    grids = {name: grid for name, grid in probe.base_model.block_grids().items()
             if spec.block_roles is None or module_role(name) in spec.block_roles}
    blocks = [(name, b) for name, grid in grids.items() for b in range(grid.n_blocks)]
    rng = np.random.default_rng(seed)
    selection, used = {}, 0
    for index in rng.permutation(len(blocks)):
        name, block = blocks[index]
        size = grids[name].numel([block])
        if used + size <= budget:
            selection.setdefault(name, []).append(block)
            used += size
    return selection


def build(spec: ModelSpec, method: str, *, lora_numel: int | None = None, dtype: torch.dtype = torch.float32):
    """`method` on a fresh base of `spec`; mftc needs `lora_numel`, the count it is matched to."""
    model = spec.load().to(dtype)  # before get_peft_model, so that PEFT keeps the adapters in fp32
    if method == "lora":
        return get_peft_model(model, LoraConfig(task_type=spec.task_type, r=LORA_RANK, target_modules=spec.targets))
    if method == "mftc":
        selection = random_selection(spec, lora_numel, seed=0)
        config = MFTCConfig(task_type=spec.task_type, target_modules=spec.targets, block_selection=selection)
        return get_peft_model(model, config)
    if method == "head_only" and spec.head_prefixes:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(spec.head_prefixes)
        return model
    if method == "full":
        return model
    raise ValueError(f"`method` must be one of {', '.join(spec.methods)}, got {method!r}")
