"""Sentiment classification with `MFTCTrainer`: the packaged MiniLM encoder on the packaged Rotten Tomatoes snippets.

`MFTCTrainer` is a `transformers.Trainer` that runs MFTC's warm-up (block gradients -> each weight's share of the
budget) on its training dataloader right before it creates the optimiser, so the optimiser holds only the selected
blocks and the classification head.

    python examples/sequence_classification_trainer.py                      # ~2-3 minutes on 2 CPU cores
    python examples/sequence_classification_trainer.py --max-steps 4 --train-size 128 --eval-size 64
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is packaged: a hub lookup would be a bug

import numpy as np  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments  # noqa: E402

import mftc_peft  # noqa: E402
from mftc_peft import MFTCConfig, MFTCTrainer  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=60, help="optimiser steps (default 60, ~1 epoch of 2,000)")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="a default, not tuned per dataset")
    parser.add_argument("--warmup-steps", type=int, default=16, help="MFTC warm-up micro-batches")
    parser.add_argument("--budget", type=float, default=0.03, help="share of the target weights MFTC may train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="mftc-trainer-example")
    return parser.parse_args(argv)


def datasets(tokenizer, train_size: int, eval_size: int, seed: int):
    """Lists of example dicts (the Trainer's default collator stacks them), from a seeded shuffle of the corpus."""
    corpus = mftc_peft.assets.load_rotten_tomatoes()
    order = np.random.default_rng(seed).permutation(len(corpus.texts))
    picked = {"train": order[:train_size], "eval": order[train_size : train_size + eval_size]}
    out = {}
    for name, rows in picked.items():
        encoded = tokenizer([corpus.texts[i] for i in rows], truncation=True, max_length=64, padding="max_length")
        out[name] = [
            {"input_ids": encoded["input_ids"][j], "attention_mask": encoded["attention_mask"][j],
             "labels": corpus.labels[i]}
            for j, i in enumerate(rows)
        ]
    return out["train"], out["eval"]


def accuracy(eval_prediction) -> dict:
    logits, labels = eval_prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    folder = mftc_peft.assets.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train, evaluation = datasets(tokenizer, args.train_size, args.eval_size, args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    config = MFTCConfig(task_type="SEQ_CLS", budget=args.budget, warmup_steps=args.warmup_steps, seed=args.seed)
    peft_model = get_peft_model(model, config)  # no blocks selected yet: the trainer's warm-up chooses them
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
    )
    trainer = MFTCTrainer(
        model=peft_model, args=training_args, train_dataset=train, eval_dataset=evaluation,
        compute_metrics=accuracy,
    )
    trainer.train()
    print(trainer.warmup_report.summary())
    metrics = trainer.evaluate()
    print(f"eval accuracy {metrics['eval_accuracy']:.4f}, eval loss {metrics['eval_loss']:.4f}")
    peft_model.save_pretrained(args.output_dir)  # adapter_config.json records the selected blocks
    trainer.warmup_report.to_json(os.path.join(args.output_dir, "warmup_report.json"))
    return metrics


if __name__ == "__main__":
    main()
