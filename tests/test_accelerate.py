"""MFTCTrainer under `accelerate launch` (2 CPU processes, gloo): one selection, identical training on both ranks, a
checkpoint that reloads bit-identically in another process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import CASES_BY_NAME, outputs

import mftc_peft  # noqa: F401  (registers the `mftc` tuner type: PEFT has no plugin discovery)

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
