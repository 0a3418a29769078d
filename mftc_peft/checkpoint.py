"""What a saved MFTC layer must look like before it is loaded: one check per tensor, each naming the first mismatch.

A checkpoint holds, per layer and adapter, the block ids (`mftc_idx`), the delta (`mftc_delta`), optional step scales
(`mftc_scale`) and the geometry of the weight it was cut from (`mftc_geometry`: out features, in features, block
width, block axis). Loading checks that they agree with each other, with the base model's weight and, when the
adapter's config lists a selection, with that selection; otherwise a different base model or an edited
`adapter_config.json` would load silently and train other blocks than the config says. An adapter with a low-rank
part (`MFTCConfig.low_rank`) also holds its factors (`mftc_lora_A`, `mftc_lora_B`), whose presence and shapes must
agree with the config's rank.
"""

from __future__ import annotations

from typing import Optional

import torch

from .blocks import AXES, BlockGrid

SHAPE_HINT = "the adapter was saved for a base model whose shapes differ from this one"


def grid_geometry(grid: BlockGrid) -> torch.Tensor:
    """(out features, in features, block width, axis index): what the saved ids mean, as an int32 buffer."""
    return torch.tensor([grid.out_features, grid.in_features, grid.width, AXES.index(grid.axis)], dtype=torch.int32)


def describe_geometry(values) -> str:
    out_features, in_features, width, axis = (int(v) for v in values)
    axis_name = AXES[axis] if 0 <= axis < len(AXES) else f"axis {axis}"
    return f"a {out_features} x {in_features} weight cut into blocks of {width} along '{axis_name}'"


PARTS = ("idx", "delta", "scale", "geometry")
LOW_RANK_PARTS = ("lora_A", "lora_B")  # the factors of an adapter with a low-rank part (`low_rank.py`)


def geometry_is_optional(module, incompatible_keys) -> None:
    """A load_state_dict post-hook: checkpoints saved before `mftc_geometry` existed lack it, which is not a missing
    adapter weight (they load as before)."""
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if ".mftc_geometry." not in key]


def saved_key(prefix: str, part: str, adapter_name: str) -> str:
    """The state-dict key of one saved tensor of a layer (`prefix` ends with the layer's name and a dot)."""
    return f"{prefix}mftc_{part}.{adapter_name}"


def check_saved_layer(
    prefix: str, adapter_name: str, grid: BlockGrid, tensors: dict, *, config_ids: Optional[list[int]]
) -> Optional[list[int]]:
    """Validate one adapter's saved tensors for the layer at `prefix` (cut by `grid`); returns the saved block ids
    (None when the checkpoint has none for this layer).

    `tensors` maps the `PARTS` to the saved tensors (missing ones are absent or None); `config_ids` are the ids the
    adapter's config selects for this layer, or None when the config lists no selection (a warm-up's data-dependent
    selection then comes from the checkpoint).
    """
    module = prefix.rstrip(".")

    def key(part: str) -> str:
        return saved_key(prefix, part, adapter_name)

    geometry, expected = tensors.get("geometry"), grid_geometry(grid)
    if geometry is not None and geometry.shape != expected.shape:
        raise ValueError(f"checkpoint {key('geometry')} must have shape {tuple(expected.shape)}, got "
                         f"{tuple(geometry.shape)}: the file is damaged")
    if geometry is not None and not torch.equal(geometry.to(torch.int32).cpu(), expected):
        raise ValueError(
            f"checkpoint {key('geometry')} was saved for {describe_geometry(geometry)}, but {module} is "
            f"{describe_geometry(expected)}: {SHAPE_HINT}"
        )
    ids = _saved_ids(key("idx"), tensors.get("idx"), grid)
    if ids is None:
        return None
    if config_ids is not None and ids != config_ids:
        raise ValueError(
            f"checkpoint {key('idx')} holds block ids {ids!r}, but the adapter's config selects "
            f"{config_ids!r} for {module} (`block_selection` in adapter_config.json): the config and the saved tensors "
            "disagree; restore the config the adapter was saved with"
        )
    n_lines = sum(grid.widths(ids))
    _check_shape(key("delta"), tensors.get("delta"), (n_lines, grid.other_length), module, grid, ids)
    _check_shape(key("scale"), tensors.get("scale"), (n_lines,), module, grid, ids)
    return ids


def check_saved_scales(state_dict, prefix: str, adapter_name: str, ids: Optional[list[int]], *,
                       config_scaled: bool) -> None:
    """Saved blocks carry step scales exactly when the adapter's config asks for them (`step_scale` != 'none' or
    `block_step_scale` != 1): otherwise the loaded adapter would apply other updates than the trained one."""
    key = _factor_key(state_dict, prefix, "scale", adapter_name)
    if not ids or (key is not None) == config_scaled:
        return
    if config_scaled:
        missing = saved_key(prefix, "scale", adapter_name)
        raise ValueError(f"checkpoint has no {missing}, but the adapter's config asks for step scales (`step_scale` "
                         "!= 'none' or `block_step_scale` != 1): the config and the saved tensors disagree; restore "
                         "the config the adapter was saved with")
    raise ValueError(f"checkpoint {key} holds step scales, but the adapter's config asks for none (step_scale='none', "
                     "block_step_scale=1): the config and the saved tensors disagree; restore the config the adapter "
                     "was saved with")


def _saved_ids(key: str, ids, grid: BlockGrid) -> Optional[list[int]]:
    if ids is None:
        return None
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(
            f"checkpoint {key} must be a 1-D integer tensor of block ids, got shape {tuple(ids.shape)} of {ids.dtype}"
        )
    values = ids.tolist()
    try:
        grid.check_ids(values, name=key)
    except ValueError as error:
        raise ValueError(f"{error}: {SHAPE_HINT}") from None
    if values != sorted(values):
        raise ValueError(f"checkpoint {key} block ids must be sorted ascending, got {values!r}")
    return values


def _check_shape(key: str, tensor, expected: tuple, module: str, grid: BlockGrid, ids: list[int]) -> None:
    if tensor is None or tuple(tensor.shape) == expected:
        return
    raise ValueError(
        f"checkpoint {key} must have shape {expected} for block ids {ids!r} of {module} "
        f"({describe_geometry(grid_geometry(grid))}), got {tuple(tensor.shape)}: {SHAPE_HINT}, or the file is damaged"
    )


def check_saved_low_rank(state_dict, prefix: str, adapter_name: str, expected: Optional[dict]) -> None:
    """Validate one adapter's saved low-rank factors for the layer at `prefix` in `state_dict` (as it is loaded).

    `expected` maps the parts ('lora_A', 'lora_B') to the shapes the adapter's config (its `low_rank`) gives this
    layer, or is None when the config has none. Factors are looked for only where the state dict holds this adapter's
    blocks for the layer: then it covers the layer, and missing factors mean the config and the file disagree (not a
    file of another adapter).
    """
    if saved_key(prefix, "idx", adapter_name) not in state_dict:
        return
    module = prefix.rstrip(".")
    found = {part: key for part in LOW_RANK_PARTS
             if (key := _factor_key(state_dict, prefix, part, adapter_name)) is not None}
    if expected is None:
        if found:
            key = next(iter(found.values()))
            raise ValueError(
                f"checkpoint {key} holds a low-rank part (shape {tuple(state_dict[key].shape)}) for {module}, but the "
                "adapter's config has low_rank=0: the config and the saved tensors disagree; restore the config the "
                "adapter was saved with (its `low_rank`)"
            )
        return
    (rank, in_features), (out_features, _) = expected["lora_A"], expected["lora_B"]
    for part, shape in expected.items():
        key = found.get(part)
        if key is None:
            raise ValueError(
                f"checkpoint has no {saved_key(prefix, part, adapter_name)}, but the adapter's config has "
                f"low_rank={rank}, which needs it with shape {shape} for {module}: the config and the saved tensors "
                "disagree; restore the config the adapter was saved with (its `low_rank`)"
            )
        if tuple(state_dict[key].shape) != shape:
            raise ValueError(
                f"checkpoint {key} must have shape {shape} (low_rank={rank} of the adapter's config, for {module}, "
                f"a {out_features} x {in_features} weight), got {tuple(state_dict[key].shape)}: the config's "
                f"`low_rank` and the saved tensors disagree, or {SHAPE_HINT}"
            )


def _factor_key(state_dict, prefix: str, part: str, adapter_name: str) -> Optional[str]:
    """Where a saved factor is: under the adapter's name, or, where the layer has no such tensor, as the file holds
    it (PEFT >= 0.21 adds the adapter name only to keys the model has, and passes the others through)."""
    for key in (saved_key(prefix, part, adapter_name), f"{prefix}mftc_{part}"):
        if key in state_dict:
            return key
    return None
