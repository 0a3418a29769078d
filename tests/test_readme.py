"""README.md: the two set-up commands as CI runs them, the config table in sync, and the Python quick start runs."""

import importlib.util
import re
import runpy
import shlex
from pathlib import Path

import pytest
import torch

from mftc_peft.config_table import END, START, own_fields, render_config_table, update_readme

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FINETUNE_COMMAND = "bash scripts/setup.sh && mftc-peft finetune"
TEST_COMMAND = 'bash scripts/setup.sh && HF_HUB_OFFLINE=1 python3 -m pytest -q -m "not slow"'
SIZES = "N_TRAIN, N_TEST, BATCH, WARMUP_STEPS, TRAIN_STEPS = 1024, 256, 32, 16, 32"
SMALL_SIZES = "N_TRAIN, N_TEST, BATCH, WARMUP_STEPS, TRAIN_STEPS = 32, 16, 8, 2, 2"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def test_the_two_commands_are_there_and_ci_runs_the_test_command():
    lines = readme().splitlines()
    assert FINETUNE_COMMAND in lines and TEST_COMMAND in lines
    assert TEST_COMMAND.split("&& ", 1)[1] in (ROOT / ".ci" / "run").read_text()


def test_config_table_is_in_sync():
    assert update_readme(README, check=True), "README's MFTCConfig table is out of date: python scripts/config_table.py"
    table = readme().split(START)[1].split(END)[0]
    for field in own_fields():
        assert f"| `{field.name}` |" in table


def test_config_table_renders_every_field_with_its_help():
    table = render_config_table()
    assert "| `budget` | `Union[float, int]` | `0.03` |" in table
    assert all(field.metadata.get("help") for field in own_fields())


def test_benchmark_table_is_linked():
    assert "(benchmarks/results/README.md)" in readme()


def test_benchmark_commands_are_commands_run_py_accepts():
    """Issue 16 item 4: every `benchmarks/run.py` command the benchmark section shows parses (its profile exists), and
    the GPU launcher it names is there."""
    section = readme().split("\n## Benchmarks", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"python benchmarks/run\.py([^\n`#]*)", section)
    assert any("--profile cpu_budget" in c for c in commands), "the budget sweep's command is missing"
    spec = importlib.util.spec_from_file_location("bench_run_readme", ROOT / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    for command in commands:
        run.parse_args(shlex.split(command))
    assert "bash scripts/gpu_benchmark.sh" in section and (ROOT / "scripts" / "gpu_benchmark.sh").is_file()


def quickstart() -> str:
    text = readme().split("## Python quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def trainer_snippet() -> str:
    text = readme().split("## With the `Trainer`", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_python_quickstart_runs(tmp_path, monkeypatch):
    code = quickstart()
    assert SIZES in code, "the quick start's size line changed: update SIZES here"
    script = tmp_path / "quickstart.py"
    script.write_text(code.replace(SIZES, SMALL_SIZES))
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng(devices=[]):
        namespace = runpy.run_path(str(script))
    assert (tmp_path / "mftc-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "mftc-report" / "warmup_report.json").is_file()
    assert (tmp_path / "mftc-report" / "plots" / "module_map.png").is_file()
    peft_model, merged = namespace["peft_model"], namespace["merged"]
    batch = {k: v[:8] for k, v in namespace["test"].items() if k != "labels"}
    peft_model.eval(), merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, peft_model(**batch).logits, rtol=1e-4, atol=1e-4)
    assert type(merged).__name__ == "BertForSequenceClassification"


@pytest.mark.parametrize("marker", [START, END])
def test_markers_present_once(marker):
    assert readme().count(marker) == 1


def test_package_map_lists_exactly_the_package_files():
    text = readme()
    table = text[text.index("<!-- package-map:start -->"):text.index("<!-- package-map:end -->")]
    listed = re.findall(r"^\| `(mftc_peft/[^`]+)` \| \S", table, flags=re.MULTILINE)
    on_disk = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "mftc_peft").rglob("*.py"))
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert sorted(listed) == on_disk


def test_trainer_snippet_runs_after_the_quick_start(tmp_path, monkeypatch):
    snippet = trainer_snippet()
    assert snippet.startswith("# continues the quick start"), "the snippet must say where its names come from"
    script = tmp_path / "trainer.py"
    script.write_text(quickstart().replace(SIZES, SMALL_SIZES) + snippet)
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng(devices=[]):
        namespace = runpy.run_path(str(script))
    trainer = namespace["trainer"]
    assert trainer.warmup_report is not None and trainer.warmup_report.trainable_elements > 0
    assert trainer.state.global_step == 4  # 32 examples in batches of 8, one epoch


def test_the_import_needed_for_loading_is_in_the_introduction():
    """Issue 13 item 13: PEFT raises a bare `KeyError: 'MFTC'` before any plugin code runs (its config lookup is a plain
    dict, with no discovery hook), so the remedy must be where users look first: above the first section."""
    introduction = readme().split("\n## ", 1)[0]
    assert "`KeyError: 'MFTC'`" in introduction and "`import mftc_peft` first" in introduction
