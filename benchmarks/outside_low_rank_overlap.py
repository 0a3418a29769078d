"""How much `block_energy="outside_low_rank"` changes the warm-up's choice of blocks (NOTES 102), before any training.

On each task's cpu-profile warm-up batches (the benchmarks' seeded stream), the default config is measured twice on
one model, with block energies of the whole gradient ("total") and of what the low-rank part would not learn
("outside_low_rank"). Each table is turned into the default's selection at LoRA r=8's count (blocks get what the part
leaves), and the two are compared: overlap, the share of the blocks' energy that lies outside the gradient's top
directions (for the chosen blocks and for all blocks), the roles that change, and what the measurement costs.
Writes `results/outside_low_rank_overlap.jsonl` and `.md`.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python benchmarks/outside_low_rank_overlap.py [--tasks cls,lm] [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
from harness.methods import lora_budget
from harness.profiles import PROFILES
from harness.runner import WARMUP_SEED_OFFSET
from harness.tasks import make_task, trim_padding
from peft import get_peft_model

from mftc_peft import MFTCConfig, measure_blocks
from mftc_peft.allocation import DEFAULT_QUOTA_ROUNDING, proportional_selection
from mftc_peft.blocks import module_role
from mftc_peft.training import iterate_batches

RESULTS = Path(__file__).parent / "results"


def rows_of(table, selection: dict) -> set[int]:
    index = {(m, int(b)): r for r, (m, b) in enumerate(zip(table.module_names, table.block_ids))}
    return {index[(m, b)] for m, ids in selection.items() for b in ids}


def measure_task(name: str, seed: int, *, tiny: bool = False) -> dict:
    settings = PROFILES["cpu"].settings[name]
    task = make_task(name, settings, tiny=tiny)
    budget = lora_budget(task, 8)
    stream = iterate_batches(task.splits().train, settings.batch_size, seed=WARMUP_SEED_OFFSET + seed, epochs=None)
    batches = [trim_padding(b) for b in islice(stream, settings.warmup_steps)]
    tables, seconds = {}, {}
    for energy in ("total", "outside_low_rank"):
        config = MFTCConfig(task_type=task.task_type, target_modules=task.targets, budget=budget, seed=seed,
                            block_energy=energy)
        peft_model = get_peft_model(task.load_model(seed=seed), config)
        start = time.perf_counter()
        tables[energy] = measure_blocks(peft_model, batches).table
        seconds[energy] = time.perf_counter() - start
        block_budget = budget - peft_model.base_model.low_rank_numel()
    total, outside = tables["total"], tables["outside_low_rank"]
    chosen = {e: rows_of(t, proportional_selection(t, block_budget, DEFAULT_QUOTA_ROUNDING, seed))
              for e, t in tables.items()}
    share = outside.energy / np.maximum(total.energy, 1e-30)
    dropped, added = chosen["total"] - chosen["outside_low_rank"], chosen["outside_low_rank"] - chosen["total"]
    roles = lambda rows: dict(Counter(module_role(total.module_names[r]) for r in rows))  # noqa: E731
    return {
        "task": name, "seed": seed, "micro_batches": len(batches), "blocks": len(total.energy),
        "chosen": len(chosen["total"]),
        "overlap": len(chosen["total"] & chosen["outside_low_rank"]) / max(len(chosen["total"]), 1),
        "outside_share_all": float(outside.energy.sum() / total.energy.sum()),
        "outside_share_chosen_by_total": float(np.median(share[list(chosen["total"])])),
        "outside_share_chosen_by_outside": float(np.median(share[list(chosen["outside_low_rank"])])),
        "outside_share_median_block": float(np.median(share)),
        "roles_dropped": roles(dropped), "roles_added": roles(added),
        "seconds_total": seconds["total"], "seconds_outside": seconds["outside_low_rank"],
    }


def table(records: list[dict]) -> str:
    lines = ["| task | seed | chosen blocks | overlap | energy outside top-r: all | median block | chosen by total "
             "| chosen by outside | roles dropped | roles added | measure s (total / outside) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['task']} | {r['seed']} | {r['chosen']} | {r['overlap']:.2f} | {r['outside_share_all']:.2f} | "
            f"{r['outside_share_median_block']:.2f} | {r['outside_share_chosen_by_total']:.2f} | "
            f"{r['outside_share_chosen_by_outside']:.2f} | {r['roles_dropped']} | {r['roles_added']} | "
            f"{r['seconds_total']:.1f} / {r['seconds_outside']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="cls,lm")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    records = []
    for name in args.tasks.split(","):
        for seed in range(args.seeds):
            records.append(measure_task(name, seed))
            print(json.dumps(records[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "outside_low_rank_overlap.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    header = ("# Blocks chosen from the whole gradient vs from what the low-rank part leaves (NOTES 102)\n\n"
              "Generated by `benchmarks/outside_low_rank_overlap.py`: the default config at LoRA r=8's count on the "
              "cpu profile's warm-up batches. 'energy outside top-r': each block's energy outside the micro-batch "
              "gradients' top-r directions as a share of its whole energy (medians over the blocks named).\n\n")
    (args.out / "outside_low_rank_overlap.md").write_text(header + table(records))


if __name__ == "__main__":
    main()
