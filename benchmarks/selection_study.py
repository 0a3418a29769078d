"""Selection study (issue 6): MFTC configurations and block baselines side by side on the VALIDATION split.

    OMP_NUM_THREADS=1 python benchmarks/selection_study.py --workers 2
    OMP_NUM_THREADS=1 python benchmarks/selection_study.py --variants default,node_share_1 --seeds 3 --lr 5e-3

Used to choose MFTC's defaults without looking at the test split: every run trains on the cpu profile's classification
training set and is scored on its 1,000-snippet validation split (phase "sweep" in the record). Each variant is a
method of the benchmark plus `MFTCConfig` overrides; records go to `results/selection_study.jsonl` and a mean +- std
table to `results/selection_study.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import RESULTS, execute  # noqa: E402

# name: (benchmark method, MFTCConfig overrides)
VARIANTS = {
    "default": ("mftc", {}),
    "node_share_1": ("mftc", {"max_node_share": 1.0}),
    "node_share_1.5": ("mftc", {"max_node_share": 1.5}),
    "per_weight_nodes": ("mftc", {"node_grouping": "module"}),
    "per_weight_nodes_share_1": ("mftc", {"node_grouping": "module", "max_node_share": 1.0}),
    "head_first_16": ("mftc", {"head_warmup_steps": 16}),
    "head_first_16_lr1e-3": ("mftc", {"head_warmup_steps": 16, "head_warmup_lr": 1e-3}),
    "head_first_32": ("mftc", {"head_warmup_steps": 32}),
    "head_first_top_energy": ("top_energy", {"head_warmup_steps": 16}),
    "random_blocks": ("random_blocks", {}),
    "top_energy": ("top_energy", {}),
    "cluster_round_robin": ("cluster_round_robin", {}),
    "cluster_random": ("cluster_random", {}),
    "bottom_energy": ("bottom_energy", {}),
    "adam_gain": ("adam_gain", {}),
    "energy_sampled": ("energy_sampled", {}),
    "sqrt_energy_sampled": ("sqrt_energy_sampled", {}),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="default,node_share_1,per_weight_nodes,random_blocks",
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--lr", type=float, nargs="+", default=[5e-3], help="learning rates (each variant runs all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--profile", default="cpu",
                        help="profile whose classification settings are used (tests: smoke)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        parser.error(f"`--variants` must be a comma-separated subset of {','.join(VARIANTS)}, got {bad}")
    return args


def specs(args, lora_budget: int) -> list[dict]:
    base = {"profile": args.profile, "task": "cls", "device": "cpu", "phase": "sweep", "lr_swept": False,
            "lora_budget": lora_budget, "match_budget": lora_budget, "budget_source": "lora"}
    return [base | {"variant": name, "method": VARIANTS[name][0], "mftc_config": VARIANTS[name][1], "seed": seed,
                    "lr": lr}
            for seed in range(args.seeds) for lr in args.lr for name in args.variants.split(",")]


def table(records: list[dict]) -> str:
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if r.get("status") == "ok":
            groups.setdefault((r["variant"], r["lr"]), []).append(r["val_accuracy"])
    lines = ["| variant | lr | runs | val accuracy mean | std |", "|---|---|---|---|---|"]
    for (variant, lr), values in sorted(groups.items(), key=lambda kv: -statistics.mean(kv[1])):
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        lines.append(f"| {variant} | {lr:g} | {len(values)} | {statistics.mean(values):.4f} | {std:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    from harness.methods import lora_budget
    from harness.profiles import PROFILES
    from harness.tasks import make_task

    profile = PROFILES[args.profile]
    budget = lora_budget(make_task("cls", profile.settings["cls"], tiny=profile.tiny_models))
    args.out.mkdir(parents=True, exist_ok=True)
    path, lock = args.out / "selection_study.jsonl", threading.Lock()

    def one(spec):
        record = execute(spec, in_process=False) | {"variant": spec["variant"]}
        with lock, path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(spec["variant"], spec["seed"], spec["lr"], record.get("status"), record.get("val_accuracy"),
              record.get("reason", "")[:300], flush=True)
        return record

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(one, specs(args, budget)))
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    (args.out / "selection_study.md").write_text(
        "# Selection study (validation split, cpu profile classification)\n\n"
        "`python benchmarks/selection_study.py`; every record in `selection_study.jsonl`.\n\n" + table(records)
    )
    print(table(records))


if __name__ == "__main__":
    main()
