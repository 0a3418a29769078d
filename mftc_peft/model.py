"""`MFTCModel`: PEFT's BaseTuner for MFTC. Resolves targets, gives each its block grid and wraps it in an MFTC layer.

Everything else (trainable marking, merge/unmerge, `merge_and_unload`, `set_adapter`, `delete_adapter`, the state-dict
hooks of save/load) is PEFT's own and inherited unchanged.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping, Optional, Sequence

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils.other import get_pattern_key
from torch import nn

from .blocks import BlockGrid, make_grid
from .checks import is_real
from .config import MFTCConfig
from .layer import SUPPORTED_LAYER_TYPES, Linear, MFTCLayer, quantized_weight_error
from .low_rank import LOW_RANK_NAMES, effective_share, rank_for_share
from .step_control import has_step_scales, new_block_scale

_BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Used when `target_modules` is None: every attention and FFN projection, never embeddings, poolers or heads.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{name: _BERT_TARGETS for name in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{name: _LLAMA_TARGETS for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo")},
}


def head_dim_of(model: nn.Module) -> int | None:
    """Attention head width from a transformers config (None for models without one)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if hidden and heads else None


def _in_out_features(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    shape = getattr(weight, "ds_shape", weight.shape)  # DeepSpeed ZeRO-3 empties `shape`
    # nn.Linear stores (out, in); transformers' Conv1D stores (in, out).
    return (shape[1], shape[0]) if isinstance(module, nn.Linear) else (shape[0], shape[1])


def selection_key(config: MFTCConfig, module_name: str) -> str | None:
    """The `block_selection` key that applies to `module_name` (exact name, suffix or regex, like `rank_pattern`)."""
    key = get_pattern_key(list(config.block_selection), module_name)
    return key if key in config.block_selection else None


class MFTCModel(BaseTuner):
    """Wraps every target weight in an MFTC layer that trains only the blocks of `block_selection`."""

    prefix: str = "mftc_"
    tuner_layer_cls = MFTCLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    # ----- injection -----------------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        # Validate every target and selection before PEFT replaces the first module, so that a bad config leaves the
        # user's model untouched.
        config = self.peft_config[adapter_name]
        grids = self._check_config_against_model(model, config)
        share = effective_share(config.low_rank_share, config.low_rank)
        if share:
            shapes = [(grid.in_features, grid.out_features) for grid in grids.values()]
            config.low_rank = rank_for_share(share, config.budget, shapes, stated_rank=config.low_rank)
        # what was used (0 where the budget holds no rank), so that a saved config reloads to the same adapter
        config.low_rank_share = share if config.low_rank else 0.0
        super().inject_adapter(model, adapter_name, **kwargs)
        # PEFT freezes inference-mode and inactive adapters by flipping flags directly; record the intent so that a
        # delta filled from a checkpoint later gets the same trainability (see MFTCLayer._resize_to_checkpoint).
        wants_grad = not config.inference_mode and adapter_name in self.active_adapters
        for _, layer in self.mftc_layers(adapter_name):
            layer.record_trainability(adapter_name, wants_grad)

    def _grid_for(self, config: MFTCConfig, module_name: str, module: nn.Module) -> BlockGrid:
        in_features, out_features = _in_out_features(module)
        return make_grid(
            module_name,
            in_features,
            out_features,
            block_size=config.block_size,
            block_axis=config.block_axis,
            head_dim=head_dim_of(self.model),
            head_blocks=config.head_blocks,
        )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        grid = self._grid_for(config, current_key, base)
        key = selection_key(config, current_key)
        block_ids = config.block_selection[key] if key is not None else []
        options = {"init_weights": config.init_weights, "seed": config.seed}
        if has_step_scales(config):
            # `block_step_scale` for listed blocks; a buffer for a saved adapter's scales to load into, and the warm-up
            # sets measured ones.
            options["step_scales"] = [new_block_scale(config)] * len(block_ids)
        low_rank = {"alpha": config.low_rank_alpha, "init_weights": config.init_weights, "seed": config.seed,
                    "module_name": current_key}
        if isinstance(target, MFTCLayer):
            target.update_layer(adapter_name, grid, block_ids, **options)
            target.update_low_rank(adapter_name, config.low_rank, **low_rank)
            target.record_selection_listed(adapter_name, bool(config.block_selection))
            return
        new_module = Linear(target, adapter_name, grid, block_ids, **options)
        new_module.update_low_rank(adapter_name, config.low_rank, **low_rank)
        new_module.record_selection_listed(adapter_name, bool(config.block_selection))
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until it is set active
        self._replace_module(parent, target_name, new_module, target)

    def _check_config_against_model(self, model: nn.Module, config: MFTCConfig) -> dict[str, BlockGrid]:
        """Every target's block grid, once targets and selection are checked against the model."""
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        if config.target_modules == "all-linear":
            config = _maybe_include_all_linear_layers(config, model)
        modules = dict(model.named_modules())
        if not isinstance(config.target_modules, str):
            missing = sorted(t for t in config.target_modules if not any(_name_matches(n, t) for n in modules))
            if missing:
                raise ValueError(
                    f"`target_modules` entries {missing!r} match no module of the model "
                    f"({type(model).__name__}); each entry must be a module name or the suffix of one."
                )
        targets = {}
        for name, module in modules.items():
            if not self._check_target_module_exists(config, name):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not isinstance(base, SUPPORTED_LAYER_TYPES):
                supported = ", ".join(f"{t.__module__}.{t.__name__}" for t in SUPPORTED_LAYER_TYPES)
                raise TypeError(
                    f"`target_modules` matched {name!r}, a {type(base).__name__}, which MFTC does not support. "
                    f"Supported module types: {supported}."
                )
            if (reason := quantized_weight_error(base)) is not None:
                raise TypeError(f"`target_modules` matched {name!r}: {reason}")
            targets[name] = self._grid_for(config, name, base)
        for key, ids in config.block_selection.items():
            matched = [name for name in targets if get_pattern_key([key], name) == key]
            if not matched:
                raise ValueError(
                    f"`block_selection` key {key!r} matches no target module; targets are {sorted(targets)!r}"
                )
            for name in matched:
                targets[name].check_ids(ids, name=f"block_selection[{key!r}] for {name}")
        return targets

    # ----- merge ----------------------------------------------------------------------------------------------
    # PEFT merges layer by layer, so a non-finite weight found in a later layer would leave the earlier ones merged:
    # with `safe_merge`, every layer is checked before the first is written.
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_merge_is_finite(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge and safe_merge:
            self._check_merge_is_finite(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _check_merge_is_finite(self, adapter_names: Optional[list[str]]) -> None:
        for name, module in self.model.named_modules():
            broken = module.first_nonfinite_merge(adapter_names) if isinstance(module, MFTCLayer) else None
            if broken is not None:
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {broken} seems to be broken: merging it into "
                    f"{name} gives non-finite weights (safe_merge: nothing was merged)"
                )

    # ----- selection ------------------------------------------------------------------------------------------
    def mftc_layers(self, adapter_name: str | None = None) -> Iterator[tuple[str, MFTCLayer]]:
        """(base-model module name, layer) for every MFTC layer that holds `adapter_name` (default: active)."""
        adapter_name = adapter_name or self.active_adapters[0]
        for name, module in self.model.named_modules():
            if isinstance(module, MFTCLayer) and adapter_name in module.mftc_grid:
                yield name, module

    def block_grids(self, adapter_name: str | None = None) -> dict[str, BlockGrid]:
        adapter_name = adapter_name or self.active_adapters[0]
        return {name: layer.mftc_grid[adapter_name] for name, layer in self.mftc_layers(adapter_name)}

    def block_selection(self, adapter_name: str | None = None) -> dict[str, list[int]]:
        """The blocks each layer trains now, from the layers' id buffers (a loaded checkpoint's ids must agree with
        the config's selection; a config without one takes the checkpoint's)."""
        adapter_name = adapter_name or self.active_adapters[0]
        selection = {name: layer.block_ids(adapter_name) for name, layer in self.mftc_layers(adapter_name)}
        return {name: ids for name, ids in selection.items() if ids}

    def set_block_selection(
        self, selection: Mapping[str, Sequence[int]], adapter_name: str | None = None, *, init_weights: bool = True,
        step_scales: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        """Replace the adapter's selection with `selection` (full module names); unlisted layers train nothing.

        `step_scales` (optional, `step_control.py`): per module, one positive scale per block in the order of
        `selection[name]`; the layer applies scale * delta, so each block's step is scaled. Validates everything
        before it changes anything, and records the selection in the adapter's config so that a saved adapter reloads
        without a warm-up (the scales are in the saved tensors).
        """
        adapter_name = adapter_name or self.active_adapters[0]
        layers = dict(self.mftc_layers(adapter_name))
        unknown = sorted(set(selection) - set(layers))
        if unknown:
            raise ValueError(f"`selection` names modules without an MFTC layer: {unknown!r}")
        checked = {
            name: layers[name].mftc_grid[adapter_name].check_ids(ids, name=f"selection[{name!r}]")
            for name, ids in selection.items()
        }
        config = self.peft_config[adapter_name]
        if step_scales is not None and not has_step_scales(config):
            raise ValueError(
                "`step_scales` need an adapter whose config has `step_scale` set (e.g. 'energy') or `block_step_scale` "
                f"!= 1, so that a saved adapter reloads with its scales; adapter {adapter_name!r} has "
                f"step_scale='none' and block_step_scale={config.block_step_scale!r}"
            )
        scales = _check_step_scales(step_scales, checked)
        for name, layer in layers.items():
            layer.update_layer(
                adapter_name,
                layer.mftc_grid[adapter_name],
                checked.get(name, []),
                init_weights=init_weights,
                seed=config.seed,
                step_scales=_scales_for(config, scales, name, checked.get(name, [])),
            )
        config.block_selection = {name: sorted(ids) for name, ids in checked.items() if ids}
        for layer in layers.values():
            layer.record_selection_listed(adapter_name, bool(config.block_selection))

    def selected_numel(self, adapter_name: str | None = None) -> int:
        """Trainable elements of the adapter's blocks (its low-rank part, if any, is `low_rank_numel`)."""
        adapter_name = adapter_name or self.active_adapters[0]
        return sum(layer.mftc_delta[adapter_name].numel() for _, layer in self.mftc_layers(adapter_name))

    def low_rank_numel(self, adapter_name: str | None = None) -> int:
        """Trainable elements of the adapter's low-rank part: r * (in + out) per target weight; 0 without one."""
        adapter_name = adapter_name or self.active_adapters[0]
        return sum(getattr(layer, name)[adapter_name].numel() for _, layer in self.mftc_layers(adapter_name)
                   for name in LOW_RANK_NAMES if adapter_name in getattr(layer, name))


def mftc_tuner(peft_model) -> MFTCModel:
    """The `MFTCModel` of a PeftModel (or the MFTCModel itself); TypeError for anything else."""
    tuner = getattr(peft_model, "base_model", peft_model)
    if not isinstance(tuner, MFTCModel):
        raise TypeError(
            f"`peft_model` must be a PEFT model with an MFTC adapter (get_peft_model(model, MFTCConfig(...))), "
            f"got {type(peft_model).__name__}"
        )
    return tuner


def _scales_for(config, scales, name: str, ids: list[int]) -> list[float] | None:
    """A layer's step scales: the given ones, `block_step_scale` for each block when the config asks for scales but
    none were given (blocks set by hand, and those the module search's "finetune" / "regression" probes train, which
    so take the step training will give them), else None."""
    if scales is not None:
        return scales.get(name, [])
    return [new_block_scale(config)] * len(ids) if has_step_scales(config) else None


def _check_step_scales(step_scales, selection: dict[str, list[int]]) -> dict[str, list[float]] | None:
    if step_scales is None:
        return None
    scales = {name: list(values) for name, values in step_scales.items()}
    for name, ids in selection.items():
        values = scales.get(name, [] if not ids else None)
        if values is None or len(values) != len(ids):
            raise ValueError(
                f"`step_scales[{name!r}]` must hold one scale per selected block ({len(ids)}), got {values!r}"
            )
        if not all(is_real(v) and v > 0 for v in values):
            raise ValueError(f"`step_scales[{name!r}]` must be positive finite numbers, got {values!r}")
    extra = sorted(set(scales) - set(selection))
    if extra:
        raise ValueError(f"`step_scales` names modules that `selection` does not: {extra!r}")
    return scales


def _name_matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith(f".{target}") or bool(re.fullmatch(target, module_name))
