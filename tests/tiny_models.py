"""Tiny randomly initialised models for the table-driven adapter suite, each with an explicit block selection.

Every factory is deterministic (fixed seed), so a fresh Python process can rebuild the identical base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 100


class OddMLP(nn.Module):
    """A model whose widths (20 -> 45 -> 7) do not divide the block size, so the last block is narrower."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 45)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(45, 7)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _bert():
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=32, num_labels=3,
    )
    return BertForSequenceClassification(config)


def _gpt2():
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    return GPT2LMHeadModel(config)


def _llama():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=80, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    config_kwargs: dict
    inputs: Callable[[], dict]

    def model(self) -> nn.Module:
        torch.manual_seed(0)  # test code may seed globally; the library never does
        return self.build().eval()


def _token_inputs():
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, VOCAB, (3, 9), generator=generator)}


def _mlp_inputs():
    return {"x": torch.randn(4, 20, generator=torch.Generator().manual_seed(1))}


CASES = [
    Case(
        "bert",
        _bert,
        {
            "task_type": "SEQ_CLS",
            "block_size": 32,  # the default before NOTES 62; the ids below are on this grid
            "block_selection": {
                "layer.0.attention.self.query": [1, 3],
                "layer.0.attention.self.value": [0],
                "layer.1.attention.output.dense": [2],
                "intermediate.dense": [2],  # suffix: both layers
                "layer.1.output.dense": [0],
            },
        },
        _token_inputs,
    ),
    Case(
        "gpt2",
        _gpt2,
        {
            "task_type": "CAUSAL_LM",
            "block_size": 32,  # the default before NOTES 62; the ids below (narrow last blocks) are on this grid
            "block_selection": {
                "h.0.attn.c_attn": [0, 5, 11],  # q head 0, k head 1, v head 3 of the fused projection
                "h.1.attn.c_proj": [2],
                "h.0.mlp.c_fc": [7],  # the last block of 256 outputs
                "h.1.mlp.c_proj": [1],
            },
        },
        _token_inputs,
    ),
    Case(
        "llama_gqa",
        _llama,
        {
            "task_type": "CAUSAL_LM",
            "block_size": 32,  # the default before NOTES 62; the ids below (narrow last blocks) are on this grid
            "block_selection": {
                "layers.0.self_attn.q_proj": [3],
                "layers.0.self_attn.k_proj": [1],  # 2 key/value heads only
                "layers.1.self_attn.v_proj": [0, 1],
                "layers.1.self_attn.o_proj": [2],
                "layers.0.mlp.up_proj": [2],  # 80 = 32 + 32 + 16: the narrow last block
                "layers.1.mlp.down_proj": [0, 2],
            },
        },
        _token_inputs,
    ),
    Case(
        "odd_mlp",
        OddMLP,
        {
            "target_modules": ["fc1", "fc2"],
            "block_size": 16,
            "modules_to_save": [],
            "block_selection": {"fc1": [0, 2], "fc2": [2]},
        },
        _mlp_inputs,
    ),
]
CASES_BY_NAME = {case.name: case for case in CASES}


def outputs(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits
