"""`mftc-peft`: the default finetune run (tiny), report, bench, one-line errors with exit status 2, --overwrite."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mftc_peft.cli import app

TINY = ["--max-train-samples", "64", "--max-eval-samples", "32", "--epochs", "1", "--warmup-steps", "4",
        "--max-length", "32", "--no-progress"]
# Cheaper still, for runs that only check what is written where (LoRA: no warm-up).
TINIER = ["--method", "lora", "--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "8",
          "--max-length", "16", "--epochs", "1", "--no-progress"]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv):
    code = app.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *argv) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert app.main(["finetune", *TINY, "--output-dir", str(out)]) == 0
    return out


def test_default_finetune_writes_adapter_report_plots_and_metrics(default_run):
    assert (default_run / "adapter" / "adapter_config.json").is_file()
    assert (default_run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((default_run / "adapter" / "adapter_config.json").read_text())["block_selection"]
    report = json.loads((default_run / "warmup_report.json").read_text())
    assert report["selection"] and report["trainable_elements"] > 0
    assert {p.name for p in (default_run / "plots").glob("*.png")} >= {"module_map.png", "trainable_per_layer.png"}
    metrics = json.loads((default_run / "metrics.json").read_text())
    assert metrics["method"] == "mftc" and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["train_examples"] == 64 and metrics["test_examples"] == 32 and metrics["steps"] == 2
    assert metrics["trainable_params_without_head"] == report["trainable_elements"] + report["low_rank_elements"]
    manifest = json.loads((default_run / "run.json").read_text())
    assert manifest["args"]["method"] == "mftc" and manifest["label_names"] == ["rotten", "fresh"]


def test_report_prints_summary_and_regenerates_plots(default_run, capsys):
    for plot in (default_run / "plots").glob("*.png"):
        plot.unlink()
    code, out, _ = run_cli(capsys, "report", default_run)
    assert code == 0
    assert "test accuracy" in out and "selected" in out and "trainable elements" in out
    assert (default_run / "plots" / "module_map.png").is_file()


def test_same_or_different_run_is_refused_and_leaves_the_folder_untouched(default_run, capsys):
    before = snapshot(default_run)
    line = one_line_error(capsys, "finetune", *TINY, "--output-dir", default_run)
    assert "already holds this run's results" in line and "--overwrite" in line
    line = one_line_error(capsys, "finetune", *TINY, "--seed", "1", "--output-dir", default_run)
    assert "holds a different run" in line and "seed: 0 there, 1 here" in line
    assert snapshot(default_run) == before


def test_foreign_folder_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    line = one_line_error(capsys, "finetune", *TINIER, "--output-dir", tmp_path)
    assert f"--output-dir {tmp_path}: is not empty and holds no mftc-peft run" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_the_previous_run_only(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"command": "finetune", "args": {"method": "mftc"}}))
    (tmp_path / "warmup_report.json").write_text("{}")  # stale: a LoRA run writes none
    (tmp_path / "notes.txt").write_text("mine")
    code, out, err = run_cli(capsys, "finetune", *TINIER, "--output-dir", tmp_path, "--overwrite")
    assert code == 0, err
    assert "method lora" in out and "test accuracy" in out
    assert json.loads((tmp_path / "run.json").read_text())["args"]["method"] == "lora"
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "warmup_report.json").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------------ bad input
def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output folder, were anything written, lands here
    good = write(tmp_path / "train.csv", "text,label\ngood film,pos\nbad film,neg\nfine,pos\n")
    return tmp_path, good


@pytest.mark.parametrize("name, content, extra, expected", [
    ("missing.csv", None, [], "file {path}: not found"),
    ("cols.csv", "sentence,label\nok,1\n", [],
     "file {path}: no column 'text' (columns: sentence, label); set --text-column"),
    ("cols.jsonl", '{"text": "ok", "y": 1}\n', [], "file {path}, line 1: no column 'label'"),
    ("empty.csv", "", [], "file {path}: is empty"),
    ("header_only.csv", "text,label\n", [], "file {path}: is empty (no data rows)"),
    ("empty.jsonl", "\n", [], "file {path}: is empty (no data rows)"),
    ("nolabel.csv", "text,label\na,1\nb,\n", [], "file {path}, line 3: the row has no label"),
    ("nolabel.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": null}\n', [],
     "file {path}, line 2: the row has no label"),
    ("negative.csv", "text,label\na,0\nb,-1\n", [], "file {path}, line 3: integer labels must be 0..K-1, got '-1'"),
    ("float.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 0.5}\n', [],
     "file {path}, line 2: a label must be an integer 0..K-1 or a string, got 0.5"),
    ("mixed.csv", "text,label\na,0\nb,pos\n", [], "file {path}, line 2: labels must be all integers or all strings"),
    ("badjson.jsonl", '{"text": "a", "label": 0}\n{"text": \n', [], "file {path}, line 2: not valid JSON"),
    ("data.txt", "a,0\n", [], "file {path}: must end in .csv, .jsonl or .ndjson"),
])
def test_bad_train_file(files, capsys, name, content, extra, expected):
    folder, _ = files
    path = folder / name
    if content is not None:
        write(path, content)
    line = one_line_error(capsys, "finetune", "--train-file", path, *extra)
    assert line.startswith("mftc-peft finetune: error: ")
    assert expected.format(path=path) in line
    assert not (folder / "runs").exists()


def test_eval_label_unseen_in_training(files, capsys):
    folder, good = files
    evaluation = write(folder / "eval.jsonl", '{"text": "x", "label": "pos"}\n{"text": "y", "label": "neutral"}\n')
    line = one_line_error(capsys, "finetune", "--train-file", good, "--eval-file", evaluation)
    assert f"file {evaluation}, line 2: label 'neutral' does not occur in the training data (labels: 'neg', 'pos')" \
        in line


def test_custom_columns_are_used(files, capsys):
    folder, _ = files
    train = write(folder / "t.csv", "review,stars\na,0\n")
    line = one_line_error(capsys, "finetune", "--train-file", train, "--text-column", "review",
                          "--label-column", "stars")
    assert "needs at least 2 rows" in line  # the columns were found; the single row cannot be split


@pytest.mark.parametrize("argv, expected", [
    (["--budget", "2.5"], "argument --budget: must be a float in (0, 1] or a positive integer, got '2.5'"),
    (["--epochs", "0"], "argument --epochs: must be a positive int, got '0'"),
    (["--method", "bitfit"], "argument --method: invalid choice: 'bitfit'"),
    (["--method", "lora", "--budget", "0.1"], "--budget applies to --method mftc only"),
    (["--eval-file", "x.csv"], "--eval-file needs --train-file"),
])
def test_bad_arguments(files, capsys, argv, expected):
    assert expected in one_line_error(capsys, "finetune", *argv)


def test_model_folder_that_is_not_a_transformers_model(files, capsys):
    folder, _ = files
    (folder / "model").mkdir()
    line = one_line_error(capsys, "finetune", "--model", folder / "model")
    assert f"--model {folder / 'model'}: not a transformers model folder (no config.json)" in line
    write(folder / "model" / "config.json", "{not json")
    line = one_line_error(capsys, "finetune", "--model", folder / "model")
    assert f"--model {folder / 'model'}: not a transformers model folder (" in line
    line = one_line_error(capsys, "finetune", "--model", folder / "absent")
    assert "no such folder" in line


def test_report_of_a_folder_without_a_run(tmp_path, capsys):
    assert f"{tmp_path}: holds no mftc-peft run (no run.json)" in one_line_error(capsys, "report", tmp_path)
    assert "no such folder" in one_line_error(capsys, "report", tmp_path / "absent")


# ---------------------------------------------------------------------------------------------------------- bench
def test_bench_without_the_benchmark_scripts(monkeypatch, capsys):
    monkeypatch.setattr(app, "bench_script", lambda: None)
    line = one_line_error(capsys, "bench")
    assert "benchmarks/run.py not found" in line and "source checkout" in line


def test_bench_runs_the_quick_profile(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(app.subprocess, "run", lambda command, **kw: calls.append(command) or
                        subprocess.CompletedProcess(command, 0))
    code, _, _ = run_cli(capsys, "bench", "--", "--methods", "mftc,lora")
    assert code == 0
    (command,) = calls
    assert command[0] == sys.executable and command[1].endswith(os.path.join("benchmarks", "run.py"))
    assert command[2:] == ["--profile", "quick", "--methods", "mftc,lora"]


def test_bench_script_is_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the script is found next to the package
    assert app.bench_script() == Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "mftc_peft", "finetune", "--budget", "0"], capture_output=True,
                          text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "mftc-peft finetune: error: argument --budget: must be a float in (0, 1] or a positive integer, got '0'"
    )
