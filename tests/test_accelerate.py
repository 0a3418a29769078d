"""MFTCTrainer under `accelerate launch` (2 CPU processes, gloo): one selection, identical training on both ranks, a
checkpoint that reloads bit-identically in another process. FSDP and DeepSpeed are refused, naming the setting."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import CASES_BY_NAME, VOCAB, outputs
from transformers import Trainer, TrainingArguments

from mftc_peft import MFTCConfig, MFTCTrainer

TESTS_DIR = Path(__file__).parent
# `--multi_gpu` is accelerate's torchrun launcher; on CPU it is the one that starts several processes without mpirun
# (`--cpu` alone starts one). The worker's `use_cpu=True` then makes accelerate choose MULTI_CPU with gloo.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
          "--monitor_interval", "0.1"]


def launch(out_dir: Path) -> list[dict]:
    # HF_HOME in tmp: a default accelerate config of this machine must not change the launch
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(out_dir / "hf_home")}
    subprocess.run([*LAUNCH, str(TESTS_DIR / "accelerate_worker.py"), str(out_dir)], check=True, env=env, timeout=240)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def test_accelerate_launch_two_processes_select_train_and_checkpoint_identically(tmp_path):
    ranks = launch(tmp_path)
    for rank in ranks:  # really one DDP job, not two single-process runs
        assert (rank["world_size"], rank["backend"], rank["wrapped"]) == (2, "gloo", "DistributedDataParallel")
        assert rank["distributed_type"] == "DistributedType.MULTI_CPU"
    first, second = ranks
    assert first["selection"] and first["selection"] == second["selection"]
    assert first["trainable"] == second["trainable"]
    assert any("mftc_delta" in name for name in first["trainable"])
    assert first["changed"] == second["changed"] == sorted(first["trainable"]), "every trainable tensor must train"
    assert first["digest_before"] == second["digest_before"] != first["digest_after"] == second["digest_after"]

    trained = load_file(tmp_path / "trained.safetensors")
    case = CASES_BY_NAME["bert"]
    reloaded = PeftModel.from_pretrained(case.model(), first["checkpoint"]).eval()
    assert reloaded.base_model.block_selection() == first["selection"]
    params = dict(reloaded.named_parameters())
    for name in first["trainable"]:
        assert torch.equal(params[name], trained[f"param:{name}"]), name
    with torch.no_grad():
        assert torch.equal(outputs(reloaded, case.inputs()), trained["logits"])


def trainer_parts(tmp_path, **training_args):
    model = get_peft_model(CASES_BY_NAME["bert"].model(), MFTCConfig(task_type="SEQ_CLS", budget=0.1))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **training_args)
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    return model, args, [{"input_ids": row, "labels": 0} for row in ids]


@pytest.fixture
def clean_environment(monkeypatch):
    # accelerate writes ACCELERATE_USE_FSDP/DEEPSPEED into os.environ when it gets a plugin: undo that after the test
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "setting, value, kind",
    [
        ("TrainingArguments.fsdp", True, "FSDP"),
        ("TrainingArguments.deepspeed", "ds_config.json", "DeepSpeed"),
        ("ACCELERATE_USE_FSDP", "true", "FSDP"),  # what `accelerate launch --use_fsdp` sets
        ("ACCELERATE_USE_DEEPSPEED", "TRUE", "DeepSpeed"),
    ],
)
def test_fsdp_and_deepspeed_are_refused_naming_the_setting_and_ddp(tmp_path, clean_environment, setting, value, kind):
    model, args, data = trainer_parts(tmp_path, **({"fsdp": value} if setting.endswith("fsdp") else {}))
    if setting.endswith("deepspeed"):
        args.deepspeed = value  # set after construction: TrainingArguments(deepspeed=...) needs deepspeed installed
    elif setting.startswith("ACCELERATE"):
        clean_environment.setenv(setting, value)
    # The message echoes what the arguments hold: transformers 4.x turns fsdp=True into [FSDPOption.FULL_SHARD].
    shown = getattr(args, setting.split(".")[1]) if setting.startswith("TrainingArguments") else value
    for construct in (lambda: MFTCTrainer(model, args, train_dataset=data),
                      lambda: MFTCTrainer(model=model, args=args, train_dataset=data)):
        message = f"^`{setting}` turns on {kind}, got {re.escape(repr(shown))}: "
        with pytest.raises(ValueError, match=message) as refused:
            construct()
        assert "supports a single device, DDP and gradient checkpointing, not FSDP or DeepSpeed" in str(refused.value)
        assert "`accelerate launch --multi_gpu --num_processes N train.py`" in str(refused.value)


def test_fsdp_reaching_accelerate_state_otherwise_is_refused(tmp_path, clean_environment):
    real = Trainer.create_accelerator_and_postprocess

    def with_fsdp(self):
        real(self)
        self.is_fsdp_enabled = True  # as when accelerate's state holds an FSDP plugin (a GPU job, a parallelism config)

    clean_environment.setattr(Trainer, "create_accelerator_and_postprocess", with_fsdp)
    with pytest.raises(ValueError, match="^`trainer.is_fsdp_enabled` turns on FSDP, got True: "):
        MFTCTrainer(*trainer_parts(tmp_path)[:2])


def test_settings_that_are_off_are_not_refused(tmp_path, clean_environment):
    clean_environment.setenv("ACCELERATE_USE_FSDP", "false")
    model, args, data = trainer_parts(tmp_path, fsdp="")
    assert isinstance(MFTCTrainer(model, args, train_dataset=data), MFTCTrainer)
