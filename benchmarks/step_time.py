"""Step time: forward + backward + optimiser step on a MiniLM-shaped BERT, MFTC vs LoRA vs head-only vs full.

MFTC and LoRA train the same number of elements (LoRA r=8 on every linear layer of the encoder; MFTC that many
elements in random head / 32-row blocks). Methods run in turns within one process, so machine noise hits them alike;
the medians and the ratios come from that one run.

    python benchmarks/step_time.py [--steps 30] [--batch 32] [--seq 64]
    python benchmarks/step_time.py --device cuda --dtype bfloat16 --out /tmp/step_time   # a bf16 base on a GPU

On a bf16 base every method keeps PEFT's convention (trainable adapter weights in fp32, `autocast_adapter_dtype`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import mftc_peft
from mftc_peft import MFTCConfig

RESULTS = Path(__file__).parent / "results"
MINILM_SHAPE = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
    max_position_embeddings=512, num_labels=2,
)
LINEAR_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def base_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**MINILM_SHAPE))


def random_selection(model, budget: int, seed: int) -> dict[str, list[int]]:
    """Random blocks over all targets until `budget` elements are reached (never more)."""
    probe = get_peft_model(model, MFTCConfig(task_type="SEQ_CLS", target_modules=LINEAR_TARGETS))
    grids = probe.base_model.block_grids()
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


def build(method: str, lora_numel: int | None = None, dtype: torch.dtype = torch.float32):
    model = base_model().to(dtype)  # before get_peft_model, so that PEFT keeps the adapters in fp32
    if method == "lora":
        return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, target_modules=LINEAR_TARGETS))
    if method == "mftc":
        selection = random_selection(base_model(), lora_numel, seed=0)
        return get_peft_model(
            model, MFTCConfig(task_type="SEQ_CLS", target_modules=LINEAR_TARGETS, block_selection=selection)
        )
    if method == "head_only":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("classifier")
        return model
    if method == "full":
        return model
    raise ValueError(f"`method` must be one of lora, mftc, head_only, full, got {method!r}")


def adapter_numel(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the base model")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of step_time.json / .md")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    lora = build("lora", dtype=dtype)
    lora_numel = adapter_numel(lora)
    models = {"lora": lora, "mftc": build("mftc", lora_numel, dtype), "head_only": build("head_only", dtype=dtype),
              "full": build("full", dtype=dtype)}
    models = {name: model.to(device) for name, model in models.items()}
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for name, m in models.items()
    }
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 30000, (args.batch, args.seq), generator=generator),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch,), generator=generator),
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    times = {name: [] for name in models}
    for step in range(args.warmup + args.steps):
        for name, model in models.items():  # alternate methods every step
            model.train()
            _synchronize(device)
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            _synchronize(device)  # queued GPU work belongs to the step
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                times[name].append(elapsed)

    medians = {name: statistics.median(t) for name, t in times.items()}
    record = {
        "benchmark": "step_time",
        "model": "MiniLM-shaped BERT (random init)",
        "device": str(device),
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "trainable_without_head": {name: adapter_numel(m) for name, m in models.items()},
        "median_step_s": medians,
        "ratio_mftc_over_lora": medians["mftc"] / medians["lora"],
        "ratio_mftc_over_full": medians["mftc"] / medians["full"],
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "mftc_peft": mftc_peft.__version__, "python": platform.python_version(),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_time.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "| method | trainable (no head) | median step (s) | vs LoRA | vs full |",
        "|---|---|---|---|---|",
    ]
    for name, median in medians.items():
        lines.append(
            f"| {name} | {record['trainable_without_head'][name]:,} | {median:.3f} | "
            f"{median / medians['lora']:.3f} | {median / medians['full']:.3f} |"
        )
    table = "\n".join(lines)
    header = (f"Step time, {args.dtype} on {device}, batch {args.batch} x {args.seq} tokens, median of {args.steps} "
              "steps (generated by step_time.py)")
    (args.out / "step_time.md").write_text(f"{header}\n\n{table}\n")
    print(table)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
