"""What the warm-up and the probes may change, and how they put it back: the model-state helpers.

- `adapter_name_of`: the adapter a call acts on (the active one by default), checked against the model.
- `head_parameters`: the adapter's `modules_to_save` parameters (e.g. a new classification head).
- `preserved_state`: a snapshot of everything a measurement or probe touches, restored exactly on exit.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .model import mftc_tuner

_MISSING = object()


def adapter_name_of(mftc, adapter_name: str | None) -> str:
    """`adapter_name`, or the active adapter when it is None; a clear error for a name the model does not have."""
    adapter_name = adapter_name or mftc.active_adapters[0]
    if adapter_name not in mftc.peft_config:
        raise ValueError(f"`adapter_name` must be one of {sorted(mftc.peft_config)!r}, got {adapter_name!r}")
    return adapter_name


def head_parameters(peft_model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The adapter's `modules_to_save` parameters (e.g. a new classification head): what N_e trains."""
    adapter_name = adapter_name_of(mftc_tuner(peft_model), adapter_name)
    params = []
    for module in peft_model.modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            params += list(module.modules_to_save[adapter_name].parameters())
    return params


@contextlib.contextmanager
def preserved_state(peft_model: nn.Module, *, adapter_name: str | None = None, include_frozen: bool = False):
    """Snapshot the model on entry and put it back exactly on exit, also when the body raises.

    Restored: the adapter's block selection (the very delta Parameter and id-buffer objects, so optimisers that hold
    them stay valid, and the config's `block_selection`), the values of every parameter that is trainable on entry or
    belongs to the adapter's head (all parameters with `include_frozen=True`), every buffer, every `requires_grad` flag
    and `.grad`, the train/eval flag of every module, and the global torch RNG state (CPU and, if initialised, CUDA).

    Frozen base weights are not copied by default: probes never make them trainable. A merged adapter is refused,
    because probing would then train on top of merged weights.
    """
    mftc = mftc_tuner(peft_model)
    adapter = adapter_name_of(mftc, adapter_name)
    layers = list(mftc.mftc_layers(adapter))
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"`peft_model` must not be merged while probing, got merged layers {merged[:3]!r}")
    config = mftc.peft_config[adapter]
    rng_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    modes = [(module, module.training) for module in peft_model.modules()]
    structure = [
        (
            layer,
            layer.mftc_grid[adapter],
            layer.mftc_delta[adapter],
            layer.mftc_idx[adapter],
            layer.mftc_scale[adapter] if adapter in layer.mftc_scale else None,
            layer.frozen_peft_weight_names.get(adapter, _MISSING),
        )
        for _, layer in layers
    ]
    selection = copy.deepcopy(config.block_selection)
    head = {id(p) for p in head_parameters(peft_model, adapter)}
    params = []
    for p in dict.fromkeys(peft_model.parameters()):  # ordered and without duplicates (tied weights)
        keep = include_frozen or p.requires_grad or id(p) in head
        grad = None if p.grad is None else p.grad.detach().clone()
        params.append((p, p.detach().clone() if keep else None, p.requires_grad, grad))
    buffers = [(b, b.detach().clone()) for b in dict.fromkeys(peft_model.buffers())]
    try:
        yield peft_model
    finally:
        for layer, grid, delta, idx, scale, frozen in structure:
            layer.mftc_grid[adapter] = grid
            layer.mftc_delta[adapter] = delta
            layer.mftc_idx[adapter] = idx
            if scale is None:
                if adapter in layer.mftc_scale:
                    del layer.mftc_scale[adapter]
            else:
                layer.mftc_scale[adapter] = scale
            if frozen is _MISSING:
                layer.frozen_peft_weight_names.pop(adapter, None)
            else:
                layer.frozen_peft_weight_names[adapter] = frozen
        config.block_selection = selection
        for _, layer in layers:
            layer.record_selection_listed(adapter, bool(selection))
        with torch.no_grad():
            for p, value, requires_grad, grad in params:
                if value is not None:
                    p.copy_(value)
                p.requires_grad_(requires_grad)
                p.grad = grad
            for b, value in buffers:
                b.copy_(value)
        for module, training in modes:
            module.training = training
        torch.set_rng_state(rng_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
