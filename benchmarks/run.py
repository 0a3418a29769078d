"""Side-by-side benchmark (issue 6): MFTC vs LoRA, AdaLoRA, PiSSA, SHiRA, AdaMSS, full fine-tuning, bias-only and
MFTC's ablations, on MiniLM + Rotten Tomatoes ("cls") and SmolLM2-135M + Hamlet ("lm").

    python benchmarks/run.py --profile quick                  # one seed, small subsets, CPU: a few minutes
    python benchmarks/run.py --profile full --device cuda     # the headline numbers (sweep + 3 seeds)
    python benchmarks/run.py --profile smoke                  # tiny random models, for tests
    python benchmarks/report.py                               # table + plots from the JSON lines

Each run (one method, task, seed and learning rate) executes in a fresh subprocess (its peak resident memory is its
own) and appends one JSON line to `<out>/<profile>.jsonl`. With `sweep`, each method's learning rate is picked on the
validation split (phase "sweep", first seed) and then run on the test split with every seed (phase "test"); without
it (quick, smoke) a fixed per-method learning rate is used and recorded with `lr_swept: false`. MFTC runs first for
each seed so that the ablations can be matched to its trainable count.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental hub lookup must fail fast
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.profiles import ALL_METHODS, PROFILES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECORD_PREFIX = "RECORD "
logger = logging.getLogger("benchmarks.run")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--smoke", action="store_true", help="same as --profile smoke (tiny random models)")
    parser.add_argument("--tasks", help="comma-separated subset of cls,lm (default: the profile's)")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: the profile's)")
    parser.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default: the profile's)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of <profile>.jsonl")
    parser.add_argument("--resume", action="store_true", help="skip runs that already have an 'ok' line")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs at a time, each in its own subprocess (set OMP_NUM_THREADS so that workers x "
                             "threads fits the cores); overlapping runs have their wall times measured under "
                             "contention")
    parser.add_argument("--in-process", action="store_true",
                        help="run everything in this process (faster start; peak memory is then cumulative)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the table and plots at the end")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: a JSON spec, run in this subprocess
    args = parser.parse_args(argv)
    if args.smoke:
        args.profile = "smoke"
    if args.workers < 1 or (args.workers > 1 and args.in_process):
        parser.error(f"`--workers` must be >= 1, and 1 with --in-process, got {args.workers}")
    return args


def _split(value: str | None, default, allowed, name: str) -> list[str]:
    items = list(default) if value is None else [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"`--{name}` must be a comma-separated subset of {','.join(allowed)}, got {value!r}")
    return items


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------- one run
def execute(spec: dict, *, in_process: bool) -> dict:
    if in_process:
        from harness.runner import run_one

        return run_one(spec)
    command = [sys.executable, str(Path(__file__).resolve()), "--run-one", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith(RECORD_PREFIX)]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1][len(RECORD_PREFIX):])
    return dict(spec, status="failed", reason=f"subprocess exited {done.returncode}: {done.stderr[-2000:]}")


def _key(record: dict) -> tuple:
    return tuple(record.get(k) for k in ("phase", "task", "method", "seed", "lr"))


def load_done(path: Path) -> dict:
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {_key(r): r for r in records if r.get("status") == "ok"}


class Runner:
    """Runs specs in order, appends each record to the JSONL file and remembers MFTC's counts for the ablations."""

    def __init__(self, args, path: Path):
        self.args, self.path = args, path
        self.done = load_done(path) if args.resume else {}
        self.mftc_counts: dict[tuple, int] = {}
        self._lock = threading.Lock()  # several runs may finish at once (--workers)

    def __call__(self, spec: dict) -> dict:
        from harness.methods import MATCHED_TO_MFTC

        count = self.mftc_counts.get((spec["task"], spec["seed"]))
        matched = spec["method"] in MATCHED_TO_MFTC and count is not None
        spec = spec | {"match_budget": count if matched else spec["lora_budget"],
                       "budget_source": "mftc" if matched else "lora"}
        record = self.done.get(_key(spec))
        if record is None:
            record = execute(spec, in_process=self.args.in_process)
            with self._lock, self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        with self._lock:
            if spec["method"] == "mftc" and record.get("status") == "ok":
                self.mftc_counts[(spec["task"], spec["seed"])] = record["trainable_params_no_head"]
            _log(record)
        return record

    def stage(self, specs: list[dict]) -> list[dict]:
        """Run `specs` (none depending on another) `--workers` at a time; records in the order of `specs`."""
        if self.args.workers == 1:
            return [self(spec) for spec in specs]
        with ThreadPoolExecutor(self.args.workers) as pool:
            return list(pool.map(self, specs))


def _log(record: dict) -> None:
    split = record.get("eval_split", "")
    score = record.get(f"{split}_{record.get('metric')}")
    detail = (f"{record.get('metric')} {score:.4f}, {record.get('trainable_params_no_head'):,} params, "
              f"{record.get('wall_seconds'):.1f} s" if record.get("status") == "ok" else record.get("reason", "")[:300])
    print(f"[{record['phase']}] {record['task']} {record['method']} seed {record['seed']} lr {record['lr']:g}: "
          f"{record.get('status')} - {detail}", flush=True)


# ----------------------------------------------------------------------------------------------------- profile
def _score(record: dict) -> tuple[float, float]:
    """Higher is better: validation accuracy (ties: lower validation loss), or minus validation perplexity; failures
    rank last."""
    value = record.get(f"val_{record.get('metric')}") if record.get("status") == "ok" else None
    if value is None or not math.isfinite(value):
        return -math.inf, -math.inf
    return (value if record["metric"] == "accuracy" else -value), -record.get("val_loss", math.inf)


def run_task(task_name: str, methods: list[str], seeds: list[int], profile, args, runner: Runner) -> None:
    """Sweep (first seed, validation split), then every seed on the test split with each method's pick.

    Each phase runs in two stages: MFTC and the methods that do not depend on it, then the ablations, which are
    matched to MFTC's trainable count for the same seed. Within a stage runs are independent (`--workers`).
    """
    from harness.methods import MATCHED_TO_MFTC, lora_budget
    from harness.tasks import make_task

    budget = lora_budget(make_task(task_name, profile.settings[task_name], tiny=profile.tiny_models))
    base = {"profile": profile.name, "task": task_name, "device": args.device, "lora_budget": budget}
    first = [m for m in methods if m not in MATCHED_TO_MFTC]
    matched = [m for m in methods if m in MATCHED_TO_MFTC]
    picks = {m: profile.lr_grid(task_name, m)[0] for m in methods}
    if profile.sweep:
        sweeps = {}
        for group in (first, matched):
            specs = [base | {"phase": "sweep", "method": m, "seed": seeds[0], "lr": lr, "lr_swept": True}
                     for m in group for lr in profile.lr_grid(task_name, m)]
            for spec, record in zip(specs, runner.stage(specs)):
                sweeps.setdefault(spec["method"], []).append(record)
        picks = {m: max(records, key=_score)["lr"] for m, records in sweeps.items()}
    for group in (first, matched):
        runner.stage([base | {"phase": "test", "method": m, "seed": seed, "lr": picks[m], "lr_swept": profile.sweep}
                      for seed in seeds for m in group if seed in profile.seeds_for(m, seeds)])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.run_one:
        from harness.runner import run_one

        print(RECORD_PREFIX + json.dumps(run_one(json.loads(args.run_one))), flush=True)
        return
    profile = PROFILES[args.profile]
    tasks = _split(args.tasks, profile.tasks, ("cls", "lm"), "tasks")
    methods = _split(args.methods, profile.methods, ALL_METHODS, "methods")
    methods.sort(key=lambda m: m != "mftc")  # MFTC first: the ablations are matched to its count
    seeds = list(range(args.seeds if args.seeds is not None else profile.seeds))
    args.device = args.device or default_device()
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args, args.out / f"{profile.name}.jsonl")
    for task in tasks:
        run_task(task, methods, seeds, profile, args, runner)
    if not args.no_report:
        import report

        report.write_reports(args.out)


if __name__ == "__main__":
    main()
