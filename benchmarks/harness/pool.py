"""Long-lived worker processes for `run.py --reuse-processes`: each imports torch, transformers and PEFT (and creates
its CUDA context) once, then runs many specs one after another.

On a GPU a run's own work takes seconds, so a fresh interpreter per run (the default) would spend more time starting
than running. What changes: the peak GPU memory stays per run (`run_one` resets CUDA's peak counter first), but the
peak resident memory becomes the worker's high-water mark over all its runs; such records say so in
`peak_rss_scope`, and the report leaves their RSS column empty.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import site
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

_runs_here = 0  # runs this worker process has finished (module state of the worker, not of the parent)


def run_in_worker(spec: dict) -> dict:
    """Executed inside a worker: one run, annotated with the worker and how many runs it had done before."""
    global _runs_here
    import torch

    from harness.runner import run_one

    gc.collect()  # the previous run's model must be gone before CUDA's peak counter is reset
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    record = run_one(spec)
    record |= {"worker_pid": os.getpid(), "worker_run_index": _runs_here,
               "peak_rss_scope": "worker process: high-water mark over all its runs so far"}
    _runs_here += 1
    return record


class WorkerPool:
    """`workers` spawned processes (never forked: CUDA cannot be re-initialised in a forked child)."""

    def __init__(self, workers: int, benchmarks_dir: Path):
        # site.addsitedir puts benchmarks/ on the worker's path before any task is unpickled, so that
        # `harness.pool.run_in_worker` resolves there as it does here.
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=site.addsitedir, initargs=(str(benchmarks_dir),))

    def run(self, spec: dict) -> dict:
        try:
            return self._pool.submit(run_in_worker, spec).result()
        except BrokenProcessPool as error:  # a worker died (e.g. killed for memory): every later run fails too
            return dict(spec, status="failed", reason=f"worker process died: {error}")

    def close(self) -> None:
        self._pool.shutdown()
