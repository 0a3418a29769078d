"""LM test-split runs of the cpu profile at the method lab's picks (validation, 5 seeds; `selection_study.md`), through
run.py's Runner: MFTC (its default) and LoRA first, then random blocks matched to MFTC's count per seed. Appends to
`benchmarks/results/cpu.jsonl` (existing runs are reused); then `python benchmarks/report.py`. NOTES 28 and 57.

    OMP_NUM_THREADS=1 python benchmarks/lab_picks_test.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402
from harness.methods import lora_budget  # noqa: E402
from harness.profiles import PROFILES  # noqa: E402
from harness.tasks import make_task  # noqa: E402

# selection_study.md, lm, validation: MFTC's default (half the budget in a low-rank part since NOTES 91, `low_rank_4` /
# `hybrid` in the lab) picked 5e-3 on 5 seeds, and so did its 4-batch warm-up (NOTES 99); LoRA 5e-3 (NOTES 87: 0.92
# perplexity better than 3e-3 on 5 seeds); random blocks, which now get the same low-rank part (`random_hybrid`),
# 5e-3, interior (NOTES 93). The blocks-only default's runs at 5e-3 / 3e-3 / 1e-2 are in cpu_blocks_only.jsonl.
PICKS = {"mftc": 5e-3, "lora": 5e-3, "random_blocks": 5e-3}
SEEDS = [0, 1, 2]
args = run.parse_args(["--profile", "cpu", "--workers", "2", "--resume"])
args.device = "cpu"
profile = PROFILES["cpu"]
count = lora_budget(make_task("lm", profile.settings["lm"], tiny=False), 8)
base = {"profile": "cpu", "task": "lm", "device": "cpu", "lora_budget": count, "budget_multiple": 1.0, "lora_rank": 8,
        "phase": "test", "lr_swept": True, "lr_source": "selection_study.md (validation, 5 seeds)"}
runner = run.Runner(args, args.out / "cpu.jsonl")
try:
    for group in (("mftc", "lora"), ("random_blocks",)):
        runner.stage([base | {"method": m, "seed": s, "lr": PICKS[m]} for s in SEEDS for m in group])
finally:
    runner.close()
