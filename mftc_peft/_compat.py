"""Version gate and shims: the PEFT versions MFTC supports (the tests cover both ends, `scripts/check_versions.sh`)
and the differences between them that the layer papers over. Each shim is a no-op on the versions that do not need it.

PEFT 0.17 is out of reach: its `BaseTuner` has no `tuner_layer_cls`, `set_adapter`, `merge_and_unload` or
`set_requires_grad` of its own (0.18 moved them there from each tuner), and `_get_in_out_features` does not exist.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Mapping

from packaging.version import Version

SUPPORTED_PEFT = (Version("0.18.0"), Version("0.22.0"))  # [lower, upper)


def check_peft_version() -> None:
    try:
        installed = Version(version("peft"))
    except PackageNotFoundError:
        raise ImportError("mftc-peft needs PEFT: install `peft>=0.18,<0.22`.") from None
    lower, upper = SUPPORTED_PEFT
    if not lower <= Version(installed.base_version) < upper:
        raise ImportError(
            f"mftc-peft supports peft>={lower},<{upper} (the versions its tests cover), but peft {installed} is "
            f"installed. Install a supported version: pip install 'peft>={lower},<{upper}'."
        )


def move_keeping_integers(containers: Mapping[str, Mapping], adapter_name: str, move: Callable[[], None]) -> None:
    """Run `move` (PEFT's move of an adapter to its base layer's device), then give the adapter's integer tensors in
    `containers` (name -> BufferDict) back their dtype and exact values, on the device they were moved to.

    Needed by PEFT 0.18-0.20: their `_move_adapter_to_device_of_base_layer` casts every adapter tensor, integer buffers
    included, to a floating base layer's dtype (block ids become float32 even on an fp32 base); 0.21 leaves integer
    tensors alone. Casting back is not enough: bf16 holds integers exactly only up to 256.
    """
    kept = {
        name: container[adapter_name]
        for name, container in containers.items()
        if adapter_name in container and not container[adapter_name].is_floating_point()
    }
    move()
    for name, value in kept.items():
        moved = containers[name][adapter_name]
        if moved.dtype != value.dtype:
            containers[name][adapter_name] = value.to(moved.device)


def freeze_empty(deltas: Mapping) -> None:
    """Take `requires_grad` from every empty delta in `deltas` (adapter name -> Parameter).

    Needed by PEFT 0.18-0.19: their `set_adapter` and `set_requires_grad` make every delta of an active adapter
    trainable and ignore the layer's `frozen_peft_weight_names` (0.20 honours it). An empty delta never receives a
    gradient, and a trainable parameter without one breaks DistributedDataParallel.
    """
    for delta in deltas.values():
        if delta.numel() == 0:
            delta.requires_grad_(False)
