"""Side-by-side benchmark (issue 6): MFTC vs LoRA, AdaLoRA, PiSSA, SHiRA, AdaMSS, full fine-tuning, bias-only and
MFTC's ablations, on MiniLM + Rotten Tomatoes ("cls") and SmolLM2-135M + Hamlet ("lm").

    python benchmarks/run.py --profile quick                  # one seed, small subsets, CPU: a few minutes
    python benchmarks/run.py --profile full --device cuda     # the headline numbers (sweep + 3 seeds)
    python benchmarks/run.py --profile smoke                  # tiny random models, for tests
    python benchmarks/run.py --profile cpu_budget --workers 2 # budget sweep: 1/4x, 1x, 4x LoRA r=8's count
    bash scripts/gpu_benchmark.sh                             # the gpu profile, several runs at a time on one GPU
    python benchmarks/report.py                               # table + plots from the JSON lines

Each run (one method, task, seed and learning rate) executes in a fresh subprocess (its peak resident memory is its
own) and appends one JSON line to `<out>/<profile>.jsonl`. With `sweep`, each method's learning rate is picked on the
validation split (phase "sweep", first seed) and then run on the test split with every seed (phase "test"); without
it (quick, smoke) a fixed per-method learning rate is used and recorded with `lr_swept: false`; a sweep whose best
rate sits on its bracket's edge is extended by one rate, `--extend-edges` times. MFTC runs first for each seed so that
the ablations can be matched to its trainable count. With several budgets (`--budgets 0.25,1,4`: LoRA r=2/8/32 and
every other method matched to that count) each budget is swept and run on its own; records carry `budget_multiple`.
With `--workers` > 1 the tasks and budgets run side by side, at most that many runs at a time. Each invocation appends
a line to `<out>/<profile>_sessions.jsonl`: its wall time, workers and run counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental hub lookup must fail fast
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from harness.profiles import ALL_METHODS, BUDGET_FREE, PROFILES, SMOKE_TWINS, rank_for  # noqa: E402
from harness.summary import budget_of, record_key  # noqa: E402
from harness.sweep import best, edge_extension, refinement  # noqa: E402

RESULTS = BENCHMARKS / "results"
RECORD_PREFIX = "RECORD "
logger = logging.getLogger("benchmarks.run")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), help="default: quick")
    parser.add_argument("--smoke", action="store_true",
                        help="the profile's smoke twin, tiny random models on the CPU (gpu -> gpu_smoke, cpu_budget -> "
                             "cpu_budget_smoke, any other or none -> smoke)")
    parser.add_argument("--tasks", help="comma-separated subset of cls,lm (default: the profile's)")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: the profile's)")
    parser.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default: the profile's)")
    parser.add_argument("--budgets", help="comma-separated multiples of LoRA r=8's trainable count, e.g. 0.25,1,4 "
                                           "(LoRA r=2/8/32; default: the profile's)")
    parser.add_argument("--extend-edges", type=int,
                        help="extend a sweep whose best rate sits on an edge by one rate, up to this many times "
                             "(default: the profile's)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: the profile's, else cuda when available)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of <profile>.jsonl")
    parser.add_argument("--resume", action="store_true", help="skip runs that already have an 'ok' line")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs at a time, each in its own subprocess (set OMP_NUM_THREADS so that workers x "
                             "threads fits the cores); overlapping runs have their wall times measured under "
                             "contention")
    parser.add_argument("--in-process", action="store_true",
                        help="run everything in this process (faster start; peak memory is then cumulative)")
    parser.add_argument("--reuse-processes", action="store_true",
                        help="`--workers` long-lived processes run the specs (each imports torch and creates its CUDA "
                             "context once; peak GPU memory stays per run, peak RSS becomes per process)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the table and plots at the end")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: a JSON spec, run in this subprocess
    args = parser.parse_args(argv)
    args.profile = SMOKE_TWINS.get(args.profile, "smoke") if args.smoke else (args.profile or "quick")
    if args.workers < 1 or (args.workers > 1 and args.in_process):
        parser.error(f"`--workers` must be >= 1, and 1 with --in-process, got {args.workers}")
    if args.in_process and args.reuse_processes:
        parser.error("`--in-process` and `--reuse-processes` exclude each other")
    if args.extend_edges is not None and args.extend_edges < 0:
        parser.error(f"`--extend-edges` must be >= 0, got {args.extend_edges}")
    try:
        args.budgets = None if args.budgets is None else _budgets(args.budgets)
    except ValueError as error:
        parser.error(f"`--budgets`: {error}")
    return args


def _budgets(value: str) -> tuple[float, ...]:
    multiples = tuple(sorted({float(v) for v in value.split(",") if v.strip()}))
    if not multiples:
        raise ValueError(f"no multiple given in {value!r}")
    for multiple in multiples:
        rank_for(multiple)  # raises for a multiple that is not a whole LoRA rank
    return multiples


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


def load_done(path: Path) -> dict:
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {record_key(r): r for r in records if r.get("status") == "ok"}


def _count_key(spec: dict) -> tuple:
    return spec["task"], spec["seed"], budget_of(spec)


class Runner:
    """Runs specs, appends each record to the JSONL file and remembers MFTC's counts for the ablations.

    At most `--workers` runs at a time, whichever task or budget asks for them: the threads share one pool.
    """

    def __init__(self, args, path: Path):
        self.args, self.path = args, path
        self.done = load_done(path) if args.resume else {}
        self.mftc_counts: dict[tuple, int] = {}  # (task, seed, budget multiple) -> MFTC's trainable count
        self.counts = {"executed": 0, "reused": 0}
        self._lock = threading.Lock()  # several runs may finish at once (--workers)
        self._threads = ThreadPoolExecutor(args.workers) if args.workers > 1 else None
        self._processes = None
        if args.reuse_processes:
            from harness.pool import WorkerPool

            self._processes = WorkerPool(args.workers, BENCHMARKS)

    def __call__(self, spec: dict) -> dict:
        from harness.methods import MATCHED_TO_MFTC

        count = self.mftc_counts.get(_count_key(spec))
        matched = spec["method"] in MATCHED_TO_MFTC and count is not None
        spec = spec | {"match_budget": count if matched else spec["lora_budget"],
                       "budget_source": "mftc" if matched else "lora"}
        record = self.done.get(record_key(spec))
        reused = record is not None
        if not reused:
            record = self._processes.run(spec) if self._processes else execute(spec, in_process=self.args.in_process)
            with self._lock, self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        with self._lock:
            self.counts["reused" if reused else "executed"] += 1
            if spec["method"] == "mftc" and record.get("status") == "ok":
                self.mftc_counts[_count_key(spec)] = record["trainable_params_no_head"]
            _log(record)
        return record

    def stage(self, specs: list[dict]) -> list[dict]:
        """Run `specs` (none depending on another), records in the order of `specs`."""
        if self._threads is None:
            return [self(spec) for spec in specs]
        return list(self._threads.map(self, specs))

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()
        if self._processes is not None:
            self._processes.close()


def _log(record: dict) -> None:
    split = record.get("eval_split", "")
    score = record.get(f"{split}_{record.get('metric')}")
    detail = (f"{record.get('metric')} {score:.4f}, {record.get('trainable_params_no_head'):,} params, "
              f"{record.get('wall_seconds'):.1f} s" if record.get("status") == "ok" else record.get("reason", "")[:300])
    budget = "" if budget_of(record) == 1.0 else f" {budget_of(record):g}x"
    print(f"[{record['phase']}] {record['task']}{budget} {record['method']} seed {record['seed']} lr {record['lr']:g}: "
          f"{record.get('status')} - {detail}", flush=True)


# ----------------------------------------------------------------------------------------------------- profile
def run_unit(task_name: str, budget: float, lora_count: int, methods: list[str], seeds: list[int], profile, args,
             runner: Runner) -> None:
    """One task at one budget: sweep (first seed, validation split; edges extended, then a wide spacing around the
    best refined where the profile asks for it), then every seed on the test split with each method's pick.

    Each phase runs in two stages: MFTC and the methods that do not depend on it, then the ablations, which are
    matched to MFTC's trainable count for the same seed and budget. Within a stage runs are independent.
    """
    from harness.methods import MATCHED_TO_MFTC

    base = {"profile": profile.name, "task": task_name, "device": args.device, "lora_budget": lora_count,
            "budget_multiple": budget, "lora_rank": rank_for(budget)}
    first = [m for m in methods if m not in MATCHED_TO_MFTC]
    matched = [m for m in methods if m in MATCHED_TO_MFTC]
    picks = {m: profile.lr_grid(task_name, m)[0] for m in methods}
    if profile.sweep:
        sweeps: dict[str, list[dict]] = {}
        for group in (first, matched):
            rates = {m: profile.lr_grid(task_name, m) for m in group}
            for round_ in range(args.extend_edges + 1):
                specs = [base | {"phase": "sweep", "method": m, "seed": seeds[0], "lr": lr, "lr_swept": True}
                         | ({"lr_extended": True} if round_ else {}) for m, lrs in rates.items() for lr in lrs]
                for spec, record in zip(specs, runner.stage(specs)):
                    sweeps.setdefault(spec["method"], []).append(record)
                rates = {m: (lr,) for m in group if (lr := edge_extension(sweeps[m])) is not None}
                if not rates:
                    break
            if profile.refine_ratio:
                specs = [base | {"phase": "sweep", "method": m, "seed": seeds[0], "lr": lr, "lr_swept": True,
                                 "lr_refined": True}
                         for m in group if (lr := refinement(sweeps[m], profile.refine_ratio)) is not None]
                for spec, record in zip(specs, runner.stage(specs)):
                    sweeps[spec["method"]].append(record)
        picks = {m: best(records)["lr"] for m, records in sweeps.items()}
    for group in (first, matched):
        runner.stage([base | {"phase": "test", "method": m, "seed": seed, "lr": picks[m], "lr_swept": profile.sweep}
                      for seed in seeds for m in group if seed in profile.seeds_for(m, seeds)])


def methods_at(methods: list[str], budget: float, budgets: tuple[float, ...]) -> list[str]:
    """A method whose count follows no rank (full, bias) runs at one budget only: 1x, or the first one asked for."""
    anchor = 1.0 if 1.0 in budgets else budgets[0]
    return [m for m in methods if m not in BUDGET_FREE or budget == anchor]


def lora_counts(tasks: list[str], budgets: tuple[float, ...], profile) -> dict[tuple, int]:
    """LoRA's trainable count per (task, budget), each counted on a built model (one at a time: each loads one)."""
    from harness.methods import lora_budget
    from harness.tasks import make_task

    return {(t, b): lora_budget(make_task(t, profile.settings[t], tiny=profile.tiny_models), rank_for(b))
            for t in tasks for b in budgets}


def write_session(path: Path, line: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(line) + "\n")


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
    budgets = args.budgets or profile.budgets
    args.extend_edges = profile.extend_edges if args.extend_edges is None else args.extend_edges
    args.device = args.device or profile.device or default_device()
    if args.device.startswith("cuda") and default_device() != "cuda":
        raise SystemExit(f"profile {profile.name!r} runs on {args.device!r}, but torch sees no CUDA device; its CPU "
                         f"smoke twin is `--profile {args.profile} --smoke`")
    args.out.mkdir(parents=True, exist_ok=True)
    started, start = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    counts = lora_counts(tasks, budgets, profile)
    units = [(t, b, counts[t, b], methods_at(methods, b, budgets)) for t in tasks for b in budgets]
    runner = Runner(args, args.out / f"{profile.name}.jsonl")
    try:
        if args.workers == 1:
            for unit in units:
                run_unit(*unit, seeds, profile, args, runner)
        else:  # every (task, budget) at once, so that no stage's stragglers leave workers idle
            with ThreadPoolExecutor(len(units)) as pool:
                list(pool.map(lambda unit: run_unit(*unit, seeds, profile, args, runner), units))
    finally:
        runner.close()
    write_session(args.out / f"{profile.name}_sessions.jsonl", {
        "profile": profile.name, "started": started, "elapsed_seconds": round(time.perf_counter() - start, 1),
        "workers": args.workers, "reuse_processes": args.reuse_processes, "in_process": args.in_process,
        "threads_per_run": os.environ.get("OMP_NUM_THREADS"), "device": args.device, "tasks": tasks,
        "methods": methods, "budgets": list(budgets), "seeds": len(seeds), "resume": args.resume, **runner.counts})
    if not args.no_report:
        import report

        report.write_reports(args.out)


if __name__ == "__main__":
    main()
