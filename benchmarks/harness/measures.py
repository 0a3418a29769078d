"""What is measured about a run besides its quality: parameter counts, adapter file size, memory, versions."""

from __future__ import annotations

import platform
import resource
import sys
import tempfile
from pathlib import Path

import torch


def trainable_counts(model, is_head) -> tuple[int, int]:
    """(trainable elements, trainable elements outside the head); tied parameters counted once."""
    seen, total, no_head = set(), 0, 0
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
            no_head += 0 if is_head(name) else param.numel()
    return total, no_head


def adapter_bytes(model, *, is_peft: bool) -> tuple[int, str]:
    """Bytes of the saved adapter: PEFT's `adapter_model.safetensors` (head included, nothing excluded); for the
    non-PEFT methods (full, bias-only) a safetensors file of exactly the trainable tensors."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        if is_peft:
            model.save_pretrained(folder)
            path = Path(folder) / "adapter_model.safetensors"
            return path.stat().st_size, "adapter_model.safetensors (save_pretrained)"
        tensors, seen = {}, set()
        for name, param in model.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                tensors[name] = param.detach().cpu().contiguous()
        path = Path(folder) / "trainable.safetensors"
        save_file(tensors, str(path))
        return path.stat().st_size, "trainable tensors (safetensors)"


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process (ru_maxrss, KiB on Linux) and, on CUDA, the peak allocated bytes."""
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}
    out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return out


def versions() -> dict:
    import peft
    import transformers

    import mftc_peft

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "mftc_peft": mftc_peft.__version__}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def selection_summary(model) -> dict:
    """Where a block adapter put its budget: selected blocks per "layer:role" (empty for other methods)."""
    from mftc_peft.blocks import module_role
    from mftc_peft.search import layer_index

    tuner = getattr(model, "base_model", None)
    if not hasattr(tuner, "block_selection"):
        return {}
    counts: dict[str, int] = {}
    for name, ids in tuner.block_selection().items():
        key = f"{layer_index(name)}:{module_role(name)}"
        counts[key] = counts.get(key, 0) + len(ids)
    return {"blocks_by_layer_role": dict(sorted(counts.items()))}
