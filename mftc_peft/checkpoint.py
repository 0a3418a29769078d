"""What a saved MFTC layer must look like before it is loaded: one check per tensor, each naming the first mismatch.

A checkpoint holds, per layer and adapter, the block ids (`mftc_idx`), the delta (`mftc_delta`), optional step scales
(`mftc_scale`) and the geometry of the weight it was cut from (`mftc_geometry`: out features, in features, block
width, block axis). Loading checks that they agree with each other, with the base model's weight and, when the
adapter's config lists a selection, with that selection; otherwise a different base model or an edited
`adapter_config.json` would load silently and train other blocks than the config says.
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
