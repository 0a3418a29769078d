"""Run under `torchrun --nproc_per_node=2`: each rank warms up on its own batches, then takes one DDP step."""

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tiny_models import CASES_BY_NAME, VOCAB  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import mftc_peft  # noqa: E402
from mftc_peft import MFTCConfig  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = get_peft_model(
        CASES_BY_NAME["bert"].model(),  # same seed on every rank: identical base models
        MFTCConfig(task_type="SEQ_CLS", budget=0.1, warmup_steps=6, dsca_every=2, n_clusters=4, embed_dim=6),
    )
    generator = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    batches = [
        {"input_ids": torch.randint(0, VOCAB, (4, 9), generator=generator),
         "labels": torch.randint(0, 3, (4,), generator=generator)}
        for _ in range(6)
    ]
    report = mftc_peft.warmup(model, batches, progress=False)
    ddp = DistributedDataParallel(model)  # fails at backward if a trainable parameter gets no gradient
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for batch in batches[:2]:
        ddp(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = sorted(n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n]))
    result = {"selection": report.selection, "changed": changed,
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    # Free DDP's reducer while the process group is alive: torch's gloo group can deadlock when its last reference
    # dies in the reducer's destructor at interpreter exit (a worker thread waits for the GIL the main thread holds).
    dist.barrier()
    del ddp, optimizer
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
