"""No host synchronisation in a training step's hot path: on a GPU, reading a tensor's value on the host (`.item()`,
`float()`, `.tolist()`, `.cpu()`) or indexing by a mask waits for every queued kernel. A CPU proxy for what
`tests/test_gpu.py` checks with `torch.cuda.set_sync_debug_mode("error")`: record such calls inside the step."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import CASES, CASES_BY_NAME, outputs
from torch.overrides import TorchFunctionMode

import mftc_peft  # noqa: F401
from mftc_peft import MFTCConfig
from mftc_peft.training import train_steps

TORCH_DIR, TRANSFORMERS_DIR = (os.path.dirname(m.__file__) + os.sep for m in (torch, transformers))
READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "nonzero"}


class HostReads(TorchFunctionMode):
    """Records the calls that read device values on the host, and indexing by a boolean mask."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        masks = [a for a in args[1:] if isinstance(a, torch.Tensor) and a.dtype == torch.bool]
        if (name in READS or (name in ("__getitem__", "__setitem__") and masks)) and not _read_by_transformers_4():
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _read_by_transformers_4() -> bool:
    """transformers 4.x's own BERT forward reads its attention mask on the host (`torch.all(mask == 1)`): not
    MFTC's to fix, so on 4.x reads from transformers' code are not counted (5.x has none in these models)."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return False
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(TRANSFORMERS_DIR)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_forward_and_backward_read_nothing_on_the_host(case):
    """Every tiny model, narrow last blocks (odd_mlp, Llama's up_proj) and step scales included."""
    config = MFTCConfig(**copy.deepcopy(case.config_kwargs), init_weights=False, step_scale="energy")
    model = get_peft_model(case.model(), config).train()
    inputs = case.inputs()
    with HostReads() as reads:
        out = outputs(model, inputs)
        out.float().pow(2).mean().backward()
    assert reads.seen == []
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "mftc_delta" in n)


def test_train_steps_reads_the_losses_once():
    case = CASES[0]
    model = get_peft_model(case.model(), MFTCConfig(**copy.deepcopy(case.config_kwargs))).train()
    batches = [{**case.inputs(), "labels": torch.tensor([0, 1, 2])} for _ in range(3)]
    with HostReads() as reads:
        # SGD: AdamW reads its step count with `.item()`, but that count lives on the host (no GPU wait).
        log = train_steps(model, batches, lr=1e-2, optimizer="sgd")
    assert reads.seen == ["tolist"]  # the losses, read once after the last step
    assert len(log.losses) == log.steps == 3 and all(isinstance(v, float) for v in log.losses)


def test_a_checkpoint_with_unsorted_block_ids_is_refused(tmp_path):
    """The forward slices the positions past a narrow last block off the end, which needs increasing ids."""
    case = CASES_BY_NAME["odd_mlp"]
    model = get_peft_model(case.model(), MFTCConfig(**copy.deepcopy(case.config_kwargs), init_weights=False))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("fc1.mftc_idx"))
    tensors[key] = tensors[key].flip(0)  # [2, 0]: the narrow block 2 first
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"mftc_idx.default block ids must be sorted ascending, got \[2, 0\]"):
        PeftModel.from_pretrained(case.model(), tmp_path)
