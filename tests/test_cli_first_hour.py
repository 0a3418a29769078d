"""What a newcomer meets first: a light `--help` and argument checks, the plan and ETA of a run, log lines that keep
off the progress bars, and a validation split held out of `--train-file`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mftc_peft.cli import app
from mftc_peft.cli.data import file_data
from mftc_peft.cli.run import RunSettings, eta_line, plan_line

HEAVY = ("torch", "transformers", "peft")
# Runs `python -m mftc_peft ARGS` in this interpreter, then prints which heavy modules it imported.
RUN_AND_LIST_IMPORTS = """
import runpy, sys
sys.argv = ["mftc-peft", *sys.argv[1:]]
try:
    runpy.run_module("mftc_peft", run_name="__main__")
except SystemExit as exit_:
    code = exit_.code
print("exit", code, "heavy", sorted(m for m in {heavy} if m in sys.modules))
""".format(heavy=HEAVY)


def run_python(code: str, *argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})


# --------------------------------------------------------------------------------- item 2: light help and checks
@pytest.mark.parametrize("argv, status", [
    (["--help"], 0),
    (["finetune", "--help"], 0),
    (["finetune", "--epochs", "0"], 2),
    (["finetune", "--method", "lora", "--budget", "0.1"], 2),
    (["finetune", "--train-file", "absent.csv"], 2),
    (["finetune", "--train-file", "empty.csv"], 2),
    (["finetune", "--train-file", "mixed.csv"], 2),
])
def test_help_and_input_errors_import_no_torch_transformers_or_peft(tmp_path, argv, status):
    (tmp_path / "empty.csv").write_text("text,label\n")
    (tmp_path / "mixed.csv").write_text("text,label\na,0\nb,pos\n")
    done = run_python(RUN_AND_LIST_IMPORTS, *argv, cwd=tmp_path)
    assert done.stdout.strip().splitlines()[-1] == f"exit {status} heavy []", done.stdout + done.stderr


def test_importing_the_package_later_registers_the_tuner_when_peft_arrives():
    done = run_python(
        "import sys, mftc_peft\n"
        "assert not {'torch', 'peft'} & set(sys.modules), 'import mftc_peft alone must stay light'\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
        "from peft.utils.peft_types import PeftType\n"
        "assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MFTC] is mftc_peft.MFTCModel\n"
        "assert callable(mftc_peft.warmup) and mftc_peft.assets.minilm_dir()\n"
        "print('ok')\n"
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_a_submodule_that_imports_peft_first_still_registers_and_keeps_warmup_a_function():
    # The submodule is half-imported when PEFT arrives: registration must wait for it, and importing the
    # `warmup` submodule must not hide the exported `warmup` function.
    done = run_python(
        "from mftc_peft.warmup import warmup\n"
        "import mftc_peft\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
        "from peft.utils.peft_types import PeftType\n"
        "assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MFTC] is mftc_peft.MFTCModel\n"
        "assert mftc_peft.warmup is warmup, mftc_peft.warmup\n"
        "print('ok')\n"
    )
    assert done.stdout.strip() == "ok", done.stderr


# ---------------------------------------------------------------------------------------- item 1: plan and ETA
def test_plan_line_counts_warmup_and_training_steps():
    settings = RunSettings(model_dir=Path("m"), method="mftc", lr=1e-3, epochs=3, seed=0, batch_size=32,
                           warmup_steps=16)
    assert plan_line(settings, 2000).startswith(
        "plan: warm-up 16 batches, then 189 training steps (3 epochs x 63 batches of 32)")
    lora = RunSettings(model_dir=Path("m"), method="lora", lr=1e-3, epochs=1, seed=0, batch_size=8)
    assert plan_line(lora, 17) == "plan: 3 training steps (1 epochs x 3 batches of 8)"  # over before an ETA


def test_eta_line_extrapolates_the_pace_so_far():
    assert eta_line(3, 189, 14.4) == "4.8 s a step: training ends in about 14.9 min (186 of 189 steps left)"


# ------------------------------------------------------------------------- items 1 and 3: a run with progress bars
def test_log_lines_never_share_a_line_with_a_progress_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = app.main(["finetune", "--method", "lora", "--max-train-samples", "16", "--max-eval-samples", "8",
                     "--batch-size", "4", "--max-length", "16", "--epochs", "2", "--output-dir", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "plan: 8 training steps (2 epochs x 4 batches of 4)" in out
    pieces = re.split(r"[\r\n]", err)
    logged = [piece for piece in pieces if "INFO mftc_peft" in piece]
    assert any("validation accuracy" in piece for piece in logged) and any("s a step" in piece for piece in logged)
    assert any("train (lora)" in piece for piece in pieces), "no progress bar was drawn"
    for piece in logged:
        assert piece.startswith("INFO mftc_peft"), f"a log line shares a line with a bar: {piece!r}"
    # Item 8: transformers' load report (the new head MISSING) and PEFT's deprecated-property warning are not shown.
    assert "MISSING" not in err and "is_gradient_checkpointing" not in err, err


# -------------------------------------------------------------------------------- item 5: validation from a file
def test_train_file_gives_a_validation_split_with_or_without_an_eval_file(tmp_path):
    rows = "".join(f"text {i},{i % 2}\n" for i in range(50))
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + rows)
    evaluation = tmp_path / "eval.csv"
    evaluation.write_text("text,label\nx,0\ny,1\n")
    alone = file_data(train, None, text_column="text", label_column="label", seed=0)
    assert (len(alone.train), len(alone.validation), len(alone.test)) == (36, 4, 10)
    paired = file_data(train, evaluation, text_column="text", label_column="label", seed=0)
    assert (len(paired.train), len(paired.validation), len(paired.test)) == (45, 5, 2)
    for data in (alone, paired):
        assert not set(data.validation.texts) & set(data.train.texts)
        assert not set(data.validation.texts) & set(data.test.texts)
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("text,label\na,0\nb,1\n")
    assert file_data(tiny, None, text_column="text", label_column="label", seed=0).validation is None


def test_a_train_file_run_records_validation_per_epoch(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"review {i}", "label": ["neg", "pos"][i % 2]}) + "\n"
                             for i in range(40)))
    code = app.main(["finetune", "--method", "lora", "--train-file", str(train), "--batch-size", "8",
                     "--max-length", "16", "--epochs", "2", "--no-progress", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Loading weights" not in err, "--no-progress shows no bar, transformers' neither"
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert [record["epoch"] for record in metrics["validation"]] == [1, 2]


# ------------------------------------------------------------------------------- item 4: the quick look learns
def readme_quick_look() -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if line.endswith("# a quick look"))
    argv = line.split("#")[0].split()
    assert argv[:2] == ["mftc-peft", "finetune"] and "--seed" not in argv  # the documented seed is the default, 0
    return argv[2:]


@pytest.mark.slow  # about 2.5 minutes on 2 busy cores
def test_the_readme_quick_look_ends_above_the_majority_share(tmp_path, monkeypatch):
    from mftc_peft.cli.data import packaged_data

    monkeypatch.chdir(tmp_path)
    argv = readme_quick_look()
    assert app.main(["finetune", *argv, "--no-progress", "--output-dir", str(tmp_path / "r")]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    test_labels = packaged_data(0).test.labels[: metrics["test_examples"]]
    majority = max(test_labels.count(0), test_labels.count(1)) / len(test_labels)
    assert metrics["test_examples"] == 256 and majority == pytest.approx(0.586, abs=1e-3)
    assert metrics["test_accuracy"] >= majority + 0.05, metrics  # 0.727 measured


def test_a_failed_submodule_import_after_peft_still_registers_the_tuner(tmp_path):
    """The hook fires when the outermost import of a package module ends, also when that import raised: PEFT is
    fully imported by then and `import peft` will not run again."""
    (tmp_path / "broken_for_test.py").write_text("import peft\nraise RuntimeError('broken after importing peft')\n")
    code = (
        "import sys, mftc_peft\n"
        f"mftc_peft.__path__.append({str(tmp_path)!r})\n"
        "try:\n    import mftc_peft.broken_for_test\nexcept RuntimeError:\n    pass\n"
        "from peft.utils.peft_types import PeftType\n"
        "assert hasattr(PeftType, 'MFTC'), 'not registered'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=os.environ | {"HF_HUB_OFFLINE": "1"})
