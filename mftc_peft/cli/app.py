"""`mftc-peft` (also `python -m mftc_peft`): fine-tune, benchmark, and read back a saved run.

    mftc-peft finetune                       # MFTC on the packaged MiniLM + Rotten Tomatoes (the embedded default)
    mftc-peft finetune --method lora --epochs 1 --max-train-samples 500
    mftc-peft finetune --model DIR --train-file train.csv --eval-file test.csv --text-column review
    mftc-peft report runs/mftc-20250101-120000
    mftc-peft bench                          # the benchmark's quick profile (needs the source checkout)

Bad input ends with one line on stderr naming the file, line or argument, and exit status 2 (as argparse does).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from .. import defaults
from .data import DEFAULT_SIZES, DataError, file_data, packaged_data
from .errors import TrainingError
from .methods import DEFAULT_LR, METHODS
from .output import (ADAPTER, MANIFEST, METRICS, PLOTS, REPORT, OutputError, check_output_dir, clear_outputs,
                         format_metrics, load_run, write_json)
from .model_folder import ModelError, check_model_dir

logger = logging.getLogger(__name__)
USAGE_ERROR = 2  # argparse's exit status for bad command-line input
BENCH_SCRIPT = Path("benchmarks") / "run.py"


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage block), like every other error of this command."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def _budget(text: str):
    """A float in (0, 1] (share of the target weights) or a positive integer (count of trainable elements)."""
    try:
        value = int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a float in (0, 1] or a positive integer, got {text!r}") from None
    if (isinstance(value, int) and value <= 0) or (isinstance(value, float) and not 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a float in (0, 1] or a positive integer, got {text!r}")
    return value


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (math.isfinite(value) and value > 0):  # inf would train to NaN and "succeed"
            rule = "a positive finite number" if kind is float else f"a positive {kind.__name__}"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mftc-peft", description="MFTC (modular fine-tuning by clustering) for Hugging Face PEFT.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_finetune(commands.add_parser(
        "finetune", help="fine-tune a sequence classifier with MFTC (or LoRA, AdaLoRA, PiSSA)",
        description="Fine-tune a sequence classifier. With no arguments: MFTC on the packaged MiniLM encoder and "
        f"Rotten Tomatoes snippets ({DEFAULT_SIZES['train']:,} train / {DEFAULT_SIZES['test']:,} test from a seeded "
        "permutation, max 64 tokens, batch 32, 3 epochs, AdamW with linear decay).",
    ))
    report = commands.add_parser("report", help="print the summary of a saved run and regenerate its plots")
    report.add_argument("run_dir", type=Path, metavar="DIR", help="output folder of a `finetune` run")
    bench = commands.add_parser("bench", help="run the benchmark's quick profile (needs the source checkout)")
    bench.add_argument("--profile", default="quick", help="benchmark profile (default: quick)")
    bench.add_argument("extra", nargs=argparse.REMAINDER, help="further arguments for benchmarks/run.py")
    return parser


def _add_finetune(p: argparse.ArgumentParser) -> None:
    lr_defaults = ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items())
    p.add_argument("--model", type=Path, help="a local transformers model folder (default: the packaged MiniLM)")
    p.add_argument("--train-file", type=Path, help="CSV or JSONL training data (default: packaged Rotten Tomatoes)")
    p.add_argument("--eval-file", type=Path,
                   help="CSV or JSONL test data (default: a seeded 20%% of --train-file is held out)")
    p.add_argument("--text-column", default="text", help="column of the texts (default: text)")
    p.add_argument("--label-column", default="label", help="column of the labels: integers 0..K-1 or strings "
                   "(default: label)")
    p.add_argument("--method", choices=METHODS, default="mftc", help="adapter to train (default: mftc)")
    # MFTC's defaults are MFTCConfig's, read from its fields so that the help cannot drift from them.
    p.add_argument("--budget", type=_budget, help="MFTC only: a float in (0, 1] is a share of the target weights, "
                   f"an integer a count of trainable elements (default: {defaults.BUDGET})")
    p.add_argument("--warmup-steps", type=_positive(int),
                   help=f"MFTC only: warm-up micro-batches (default: {defaults.WARMUP_STEPS})")
    p.add_argument("--epochs", type=_positive(int), default=3, help="training epochs (default: 3)")
    p.add_argument("--lr", type=_positive(float),
                   help=f"learning rate (defaults: {lr_defaults}; defaults, not tuned for your dataset)")
    p.add_argument("--batch-size", type=_positive(int), default=32, help="batch size (default: 32)")
    p.add_argument("--max-length", type=_positive(int), default=64, help="tokens per text (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, batch order and MFTC (default: 0)")
    p.add_argument("--max-train-samples", type=_positive(int), metavar="N", help="train on the first N examples")
    p.add_argument("--max-eval-samples", type=_positive(int), metavar="N", help="evaluate on the first N examples")
    p.add_argument("--output-dir", type=Path, help="where the adapter, report, plots and metrics go "
                   "(default: runs/<method>-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of a run already in --output-dir")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


# -------------------------------------------------------------------------------------------------------- finetune
def _check_finetune_args(args) -> None:
    if args.method != "mftc":
        for name in ("budget", "warmup_steps"):
            if getattr(args, name) is not None:
                raise DataError(f"--{name.replace('_', '-')} applies to --method mftc only, got --method {args.method}")
    if args.eval_file is not None and args.train_file is None:
        raise DataError("--eval-file needs --train-file (the default data brings its own test split)")
    if args.seed < 0:
        raise DataError(f"--seed must be a non-negative integer, got {args.seed!r}")


def _manifest_args(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "command"}


def run_finetune(args) -> int:
    from .. import assets

    _check_finetune_args(args)
    args.lr = args.lr or DEFAULT_LR[args.method]
    args.output_dir = args.output_dir or Path("runs") / f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output_dir(args.output_dir, _manifest_args(args), overwrite=args.overwrite)
    if args.train_file is None:
        data = packaged_data(args.seed)
    else:
        data = file_data(args.train_file, args.eval_file, text_column=args.text_column,
                         label_column=args.label_column, seed=args.seed)
    data = data.capped(args.max_train_samples, args.max_eval_samples)
    data.check_training_classes()
    model_dir = args.model if args.model is not None else assets.minilm_dir()
    check_model_dir(model_dir)
    # torch, transformers and PEFT (seconds to import) only once the arguments and files are known to be good.
    from .run import RunSettings, finetune, plan_line

    settings = RunSettings(
        model_dir=Path(model_dir), method=args.method, lr=args.lr, epochs=args.epochs, seed=args.seed,
        batch_size=args.batch_size, max_length=args.max_length, budget=args.budget, warmup_steps=args.warmup_steps,
        progress=args.progress,
    )
    print(f"mftc-peft finetune: {args.method} on {data.source} ({len(data.train):,} train / {len(data.test):,} test, "
          f"{data.num_labels} labels), model {model_dir}", flush=True)
    print(plan_line(settings, len(data.train)), flush=True)
    with _quiet_transformers(args.progress):
        result = finetune(data, settings)
    _write_run(args, data, model_dir, result)
    print(format_metrics(result.metrics))
    print(f"wrote {args.output_dir}")
    return 0


def _write_run(args, data, model_dir, result) -> None:
    out = args.output_dir
    check_output_dir(out, _manifest_args(args), overwrite=args.overwrite)  # again: the run took a while
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out)
    result.peft_model.save_pretrained(out / ADAPTER)
    if result.report is not None:
        result.report.to_json(out / REPORT)
        result.report.plot(out / PLOTS)
    write_json(out / METRICS, result.metrics)
    from .. import __version__

    write_json(out / MANIFEST, {
        "command": "finetune", "args": _manifest_args(args), "model": str(model_dir), "data": data.source,
        "label_names": data.label_names, "mftc_peft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })


# ---------------------------------------------------------------------------------------------------------- report
def run_report(args) -> int:
    from .. import WarmupReport

    manifest, metrics = load_run(args.run_dir)
    run_args = manifest.get("args", {})
    print(f"run {args.run_dir}: {manifest.get('command', '?')} {run_args.get('method', '?')} on "
          f"{manifest.get('data', '?')}, model {manifest.get('model', '?')} ({manifest.get('created', '?')})")
    if metrics:
        print(format_metrics(metrics))
        for record in metrics.get("validation", []):
            print(f"  epoch {record['epoch']}: validation accuracy {record['accuracy']:.4f}, loss {record['loss']:.4f}")
    report_path = args.run_dir / REPORT
    if report_path.is_file():
        try:
            report = WarmupReport.from_json(report_path)
        except (ValueError, TypeError) as error:
            raise OutputError(f"file {report_path}: not a warm-up report ({error})") from None
        print(report.summary())
        written = report.plot(args.run_dir / PLOTS)
        print(f"plots: {', '.join(str(path) for path in written)}")
    return 0


# ----------------------------------------------------------------------------------------------------------- bench
def bench_script() -> Path | None:
    """benchmarks/run.py of the source checkout this package runs from (or of the current folder), if any."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / BENCH_SCRIPT).is_file():
            return root / BENCH_SCRIPT
    return None


def run_bench(args) -> int:
    script = bench_script()
    if script is None:
        raise OutputError(
            f"{BENCH_SCRIPT} not found next to the package or in {Path.cwd()}: the benchmark ships with the source "
            "checkout, not the wheel (clone the repository and `pip install -e .`)"
        )
    extra = [a for a in args.extra if a != "--"]
    command = [sys.executable, str(script), "--profile", args.profile, *extra]
    print("running " + " ".join(command), flush=True)
    env = os.environ | {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    return subprocess.run(command, cwd=script.parent.parent, env=env).returncode


# ------------------------------------------------------------------------------------------------------------ main
COMMANDS = {"finetune": run_finetune, "report": run_report, "bench": run_bench}


@contextlib.contextmanager
def _cli_logging():
    """Library INFO messages (e.g. the warm-up summary) and Python warnings on stderr, written through tqdm so that
    they never land on the line of a progress bar; restored afterwards."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    loggers = [logging.getLogger("mftc_peft"), logging.getLogger("py.warnings")]
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    levels = [logger_.level for logger_ in loggers]
    for logger_ in loggers:
        logger_.addHandler(handler)
    loggers[0].setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(), logging_redirect_tqdm(loggers=loggers):  # restores `warnings.showwarning`
            logging.captureWarnings(True)
            try:
                yield
            finally:
                logging.captureWarnings(False)
    finally:
        for logger_, level in zip(loggers, levels):
            logger_.removeHandler(handler)
            logger_.setLevel(level)


@contextlib.contextmanager
def _quiet_transformers(progress: bool):
    """transformers' load report hushed (it lists the new head's weights as MISSING: expected for a new task), its
    loading bar shown only with progress bars, and PEFT's use of a property transformers deprecated not reported
    (the user can do nothing about it)."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.* is deprecated", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help and argparse errors: return their status so `main([...])` is testable
        return exit_.code if isinstance(exit_.code, int) else USAGE_ERROR
    try:
        with _cli_logging():
            return COMMANDS[args.command](args)
    except (DataError, ModelError, OutputError, TrainingError) as error:
        print(f"mftc-peft {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
