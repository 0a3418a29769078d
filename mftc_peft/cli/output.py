"""The output folder of a `mftc-peft finetune` run: refusing to clobber it, writing it, and reading it back.

A run folder holds `run.json` (the manifest: command-line arguments, labels, versions), `metrics.json`, `adapter/`
(PEFT's `save_pretrained`) and, for MFTC, `warmup_report.json` and `plots/`. A folder that is not empty is never
written to without `--overwrite`; with it, only these entries are replaced and anything else is left alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MANIFEST, METRICS, REPORT, ADAPTER, PLOTS = "run.json", "metrics.json", "warmup_report.json", "adapter", "plots"
OUTPUTS = (MANIFEST, METRICS, REPORT, ADAPTER, PLOTS)
# Arguments that do not change what a run computes: two runs that differ only here are the same run.
_NOT_IDENTITY = ("output_dir", "overwrite", "progress")


class OutputError(ValueError):
    """The output folder cannot be used (one-line message naming the folder)."""


def identity(args: dict) -> dict:
    return {k: v for k, v in args.items() if k not in _NOT_IDENTITY}


def check_output_dir(path: Path, args: dict, *, overwrite: bool) -> None:
    """Raise unless `path` is absent, empty, or `overwrite` is set. The message says what the folder holds."""
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"--output-dir {path}: exists and is not a folder")
    if overwrite or not any(path.iterdir()):
        return
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise OutputError(
            f"--output-dir {path}: is not empty and holds no mftc-peft run (no {MANIFEST}); choose another folder "
            "or pass --overwrite"
        )
    try:
        previous = identity(json.loads(manifest.read_text()).get("args", {}))
    except (json.JSONDecodeError, AttributeError):
        previous = {}
    current = identity(args)
    differing = [k for k in sorted(set(previous) | set(current)) if previous.get(k) != current.get(k)]
    if differing:
        shown = ", ".join(f"{k}: {previous.get(k)!r} there, {current.get(k)!r} here" for k in differing[:3])
        raise OutputError(
            f"--output-dir {path}: holds a different run ({shown}); pass --overwrite to replace it or choose "
            "another folder"
        )
    raise OutputError(f"--output-dir {path}: already holds this run's results; pass --overwrite to replace them")


def clear_outputs(path: Path) -> None:
    """Remove a previous run's entries (only those a run writes), so no stale file survives an overwrite."""
    for name in OUTPUTS:
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------- read back
def load_run(path: Path) -> tuple[dict, dict]:
    """(manifest, metrics) of a saved run folder; `OutputError` naming the folder when it is not one."""
    if not path.is_dir():
        raise OutputError(f"{path}: no such folder")
    manifest_path, metrics_path = path / MANIFEST, path / METRICS
    if not manifest_path.is_file():
        raise OutputError(f"{path}: holds no mftc-peft run (no {MANIFEST})")
    return _read_json(manifest_path), _read_json(metrics_path) if metrics_path.is_file() else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise OutputError(f"file {path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise OutputError(f"file {path}: must hold a JSON object, got {type(data).__name__}")
    return data


def format_metrics(metrics: dict) -> str:
    """One line of the headline numbers (the command line prints it after training and in `report`)."""
    parts = [f"method {metrics.get('method', '?')}"]
    if "test_accuracy" in metrics:
        parts.append(f"test accuracy {metrics['test_accuracy']:.4f}")
    if "test_loss" in metrics:
        parts.append(f"test loss {metrics['test_loss']:.4f}")
    if "trainable_params" in metrics:
        parts.append(
            f"trainable params {metrics['trainable_params_without_head']:,} + head {metrics['head_params']:,}"
        )
    if "train_seconds" in metrics:
        warm = metrics.get("warmup_seconds")
        parts.append(f"train {metrics['train_seconds']:.1f} s" + (f" (+ warm-up {warm:.1f} s)" if warm else ""))
    return " | ".join(parts)
