"""Run under `accelerate launch --multi_gpu --num_processes 2` on CPU: MFTCTrainer warms up, trains and checkpoints.

Each rank writes rank<r>.json (its selection, trainable parameters, digests of the trainable weights before and after
training); rank 0 also writes its trained weights and logits (trained.safetensors) for the reload check.
"""

import gc
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import CASES_BY_NAME, VOCAB, outputs  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import mftc_peft  # noqa: E402
from mftc_peft import MFTCConfig  # noqa: E402

MAX_STEPS = 3


def examples(n):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, 9), generator=generator)
    return [{"input_ids": ids[i], "labels": int(ids[i, 0] % 3)} for i in range(n)]


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def digest(tensors):
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode() + tensors[name].contiguous().numpy().tobytes())
    return sha.hexdigest()


class _AtTrainBegin(TrainerCallback):
    """The trainable weights after the warm-up and DDP's initial broadcast, before the first optimiser step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = trainable(model)


def main(out_dir: str) -> None:
    model = get_peft_model(  # same seed on every rank: identical base models
        CASES_BY_NAME["bert"].model(),
        MFTCConfig(task_type="SEQ_CLS", budget=0.1, warmup_steps=4, dsca_every=2, n_clusters=4, embed_dim=6),
    )
    args = TrainingArguments(
        output_dir=str(Path(out_dir, "run")), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=MAX_STEPS, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    # 32 examples, 4 per rank and step: the sampler gives each rank its own batches
    trainer = mftc_peft.MFTCTrainer(model=model, args=args, train_dataset=examples(32))
    begin = _AtTrainBegin()
    trainer.add_callback(begin)
    trainer.train()

    rank = dist.get_rank()
    after = trainable(trainer.model)
    result = {
        "world_size": dist.get_world_size(), "backend": dist.get_backend(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapped": type(trainer.model_wrapped).__name__,
        "selection": trainer.warmup_report.selection,
        "trainable": {n: t.numel() for n, t in after.items()},
        "digest_before": digest(begin.weights), "digest_after": digest(after),
        "changed": sorted(n for n, t in after.items() if not torch.equal(t, begin.weights[n])),
        "checkpoint": str(Path(args.output_dir, f"checkpoint-{MAX_STEPS}")),
    }
    if rank == 0:
        trainer.model.eval()
        with torch.no_grad():
            logits = outputs(trainer.model, CASES_BY_NAME["bert"].inputs())
        save_file({"logits": logits.contiguous()} | {f"param:{n}": t.contiguous() for n, t in after.items()},
                  str(Path(out_dir, "trained.safetensors")))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    # Free DDP's reducer while the process group is alive (see ddp_worker.py: gloo can deadlock at interpreter exit).
    dist.barrier()
    del trainer, model
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
