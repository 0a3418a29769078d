"""Causal language modelling with MFTC: the packaged SmolLM2-135M on Hamlet (acts I-IV), perplexity on act V.

The packaged SmolLM2 is stored 4-bit (Q4_1 GGUF); `mftc_peft.assets.smollm2_dir()` dequantises it once (~20 s) to a
float32 cache folder. Its weights carry 4-bit rounding noise, so its perplexities are not those of the original
float checkpoint: compare runs with each other, not with published numbers.

    python examples/causal_lm_smollm2.py                    # a few minutes on 2 CPU cores (the warm-up dominates)
    python examples/causal_lm_smollm2.py --max-steps 2 --warmup-steps 2 --eval-chunks 4 --batch-size 2
    python examples/causal_lm_smollm2.py --dtype bfloat16   # a bfloat16 base, float32 deltas
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is packaged: a hub lookup would be a bug

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import mftc_peft  # noqa: E402
from mftc_peft import MFTCConfig  # noqa: E402
from mftc_peft.training import evaluate, iterate_batches, make_batches, train_steps  # noqa: E402


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=10, help="optimiser steps (default 10)")
    parser.add_argument("--warmup-steps", type=int, default=4, help="MFTC warm-up micro-batches")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--chunk-length", type=int, default=128, help="tokens per training / evaluation chunk")
    parser.add_argument("--eval-chunks", type=int, default=16, help="chunks of act V to measure perplexity on")
    parser.add_argument("--budget", type=float, default=0.01, help="share of the target weights MFTC may train")
    parser.add_argument("--lr", type=float, default=3e-4, help="a default, not tuned")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="the base model's dtype; the trained deltas stay float32 on a bfloat16 base (PEFT's "
                             "autocast_adapter_dtype)")
    parser.add_argument("--output-dir", default="mftc-smollm2-hamlet")
    return parser.parse_args(argv)


def chunks(tokenizer, text: str, length: int, limit: int | None = None) -> dict[str, torch.Tensor]:
    """Consecutive full `length`-token chunks of `text` (the partial last one dropped), labels = inputs."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    n = len(ids) // length if limit is None else min(limit, len(ids) // length)
    input_ids = ids[: n * length].view(n, length)  # (n, T)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def perplexity(model, data, batch_size: int) -> float:
    loss, _ = evaluate(model, make_batches(data, batch_size))  # every chunk is full: the mean token loss
    return math.exp(loss)


def main(argv=None) -> dict:
    args = parse_args(argv)
    folder = mftc_peft.assets.smollm2_dir()  # dequantised once, then reloaded from the cache
    tokenizer = AutoTokenizer.from_pretrained(folder)
    acts = mftc_peft.assets.load_hamlet_acts()
    train = chunks(tokenizer, "\n".join(acts[:4]), args.chunk_length)
    test = chunks(tokenizer, acts[4], args.chunk_length, limit=args.eval_chunks)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[args.dtype])
    peft_model = get_peft_model(
        model, MFTCConfig(task_type="CAUSAL_LM", budget=args.budget, warmup_steps=args.warmup_steps, seed=args.seed)
    )
    before = perplexity(peft_model, test, args.batch_size)  # no block selected yet: the base model
    print(f"act V perplexity before: {before:.2f} ({len(test['input_ids'])} chunks of {args.chunk_length} tokens)")

    report = mftc_peft.warmup(peft_model, iterate_batches(train, args.batch_size, seed=args.seed + 1, epochs=None))
    print(report.summary())
    peft_model.print_trainable_parameters()
    peft_model.train()
    log = train_steps(
        peft_model, iterate_batches(train, args.batch_size, seed=args.seed, epochs=None),
        lr=args.lr, steps=args.max_steps, schedule="linear", progress=True, desc="train (mftc)",
    )
    after = perplexity(peft_model, test, args.batch_size)
    print(f"act V perplexity after {log.steps} steps ({log.seconds:.1f} s): {after:.2f} (before {before:.2f}; "
          "base weights carry 4-bit rounding noise)")
    peft_model.save_pretrained(args.output_dir)
    report.to_json(os.path.join(args.output_dir, "warmup_report.json"))
    trained = {str(p.dtype) for p in peft_model.parameters() if p.requires_grad}
    return {"perplexity_before": before, "perplexity_after": after, "train_losses": log.losses,
            "trained_dtypes": sorted(trained)}


if __name__ == "__main__":
    main()
