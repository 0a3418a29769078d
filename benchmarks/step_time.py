"""Step time: forward + backward + optimiser step, MFTC vs LoRA vs head-only vs full, on MiniLM-shaped BERT or SmolLM2.

MFTC and LoRA train the same number of elements (LoRA r=8 on every attention and FFN linear layer; MFTC at most that
many elements in random blocks of its default grid: one block per attention head, `MFTCConfig.block_size`-wide blocks
elsewhere). Methods run in turns within one process, so machine noise hits them alike; the medians and the ratios come
from that one run.

    python benchmarks/step_time.py [--steps 30] [--batch 32] [--seq 64]
    python benchmarks/step_time.py --device cuda --dtype bfloat16 --out /tmp/step_time   # a bf16 base on a GPU
    python benchmarks/step_time.py --model smollm2 --methods mftc,lora   # the LM benchmark's model, batch 8 x 128

--model minilm-shape (random init, sequence classification) writes step_time.json / .md; --model smollm2 (the
packaged SmolLM2-135M, causal LM on random token ids, labels = inputs; no head_only, its head is the tied embedding)
writes step_time_smollm2.json / .md. On a bf16 base every method keeps PEFT's convention (trainable adapter weights
in fp32, `autocast_adapter_dtype`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
import transformers

import mftc_peft

sys.path.insert(0, str(Path(__file__).parent))
from step_time_models import MODELS, ModelSpec, adapter_numel, build, parse_methods, selection_label  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REFERENCES = ("lora", "full")  # the methods the ratios and the table's "vs" columns divide by, where they ran


def build_models(spec: ModelSpec, methods: list[str], dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The timed models in `methods`' order; LoRA is built whenever MFTC runs, since MFTC is matched to its count."""
    lora = build(spec, "lora", dtype=dtype) if "lora" in methods or "mftc" in methods else None
    lora_numel = adapter_numel(spec, lora) if lora is not None else None
    return {name: lora if name == "lora" else build(spec, name, lora_numel=lora_numel, dtype=dtype)
            for name in methods}


def time_steps(models: dict, batch: dict, *, steps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each method's timed steps; methods alternate every step, in reverse order on odd steps, so that
    noise and any cost of going first or second hit them alike."""
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for name, m in models.items()
    }
    times = {name: [] for name in models}
    for step in range(warmup + steps):
        turns = list(models.items())
        for name, model in (turns if step % 2 == 0 else turns[::-1]):
            model.train()
            _synchronize(device)
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            _synchronize(device)  # queued GPU work belongs to the step
            elapsed = time.perf_counter() - start
            if step >= warmup:
                times[name].append(elapsed)
    return times


def make_record(spec: ModelSpec, args, device: torch.device, trainable: dict, medians: dict) -> dict:
    ratios = {f"ratio_mftc_over_{ref}": medians["mftc"] / medians[ref]
              for ref in REFERENCES if "mftc" in medians and ref in medians}
    return {
        "benchmark": "step_time",
        "model": spec.label,
        "model_key": args.model,
        "device": str(device),
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "trainable_without_head": trainable,
        "median_step_s": medians,
        **ratios,
        **({"mftc_selection": selection_label(spec)} if "mftc" in medians else {}),
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "mftc_peft": mftc_peft.__version__, "python": platform.python_version(),
        },
    }


def table(record: dict) -> str:
    """Markdown rows per method; a "vs" column for each reference method that ran."""
    medians, trainable = record["median_step_s"], record["trainable_without_head"]
    refs = [ref for ref in REFERENCES if ref in medians]
    names = {"lora": "LoRA", "full": "full"}
    columns = ["method", "trainable (no head)", "median step (s)", *(f"vs {names[ref]}" for ref in refs)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, median in medians.items():
        ratios = "".join(f" {median / medians[ref]:.3f} |" for ref in refs)
        lines.append(f"| {name} | {trainable[name]:,} | {median:.3f} |{ratios}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="minilm-shape",
                        help="minilm-shape: random MiniLM-shaped BERT; smollm2: the packaged SmolLM2-135M")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of lora,mftc,head_only,full (default: all the model supports)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="default: 32 for minilm-shape, 8 for smollm2")
    parser.add_argument("--seq", type=int, default=None, help="default: 64 for minilm-shape, 128 for smollm2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the base model")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder of step_time.json / .md (step_time_smollm2.json / .md for --model smollm2)")
    args = parser.parse_args(argv)
    spec = MODELS[args.model]
    args.batch = spec.batch if args.batch is None else args.batch
    args.seq = spec.seq if args.seq is None else args.seq
    try:
        args.methods = parse_methods(spec, args.methods)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec, device, dtype = MODELS[args.model], torch.device(args.device), getattr(torch, args.dtype)
    models = {name: model.to(device) for name, model in build_models(spec, args.methods, dtype).items()}
    generator = torch.Generator().manual_seed(0)
    batch = {key: value.to(device) for key, value in spec.make_batch(args.batch, args.seq, generator).items()}
    times = time_steps(models, batch, steps=args.steps, warmup=args.warmup, device=device)

    medians = {name: statistics.median(t) for name, t in times.items()}
    trainable = {name: adapter_numel(spec, m) for name, m in models.items()}
    record = make_record(spec, args, device, trainable, medians)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{spec.stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    header = (f"Step time, {spec.label}, {args.dtype} on {device}, batch {args.batch} x {args.seq} tokens, median of "
              f"{args.steps} steps (generated by step_time.py)"
              + (f"; MFTC trains {record['mftc_selection']}" if "mftc_selection" in record else ""))
    (args.out / f"{spec.stem}.md").write_text(f"{header}\n\n{table(record)}\n")
    print(table(record))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
