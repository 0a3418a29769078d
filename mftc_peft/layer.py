"""The MFTC tuner layer: a compact trainable delta for a few blocks of one weight, applied without a dense update.

Per adapter the layer holds one dense tensor with the selected blocks' lines (`mftc_delta`, shape
(selected rows or columns, length of the other axis)) and their block ids (`mftc_idx`, a persistent int32 buffer).
The forward adds `x @ delta.T` into the selected output features ("out" blocks) or `x[..., selected columns] @ delta`
("in" blocks); it never builds a full-size weight, so gradients and optimiser state are as small as the selection.
An adapter may also hold a low-rank part on the whole weight (`mftc_lora_A`, `mftc_lora_B`; `low_rank.py`).
"""

from __future__ import annotations

import itertools
import warnings
import zlib
from typing import Optional, Sequence

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._compat import freeze_empty, move_keeping_integers
from .blocks import BlockGrid, move_lines
from .checkpoint import (
    PARTS, check_saved_layer, check_saved_low_rank, check_saved_scales, geometry_is_optional, grid_geometry,
    saved_key,
)
from .low_rank import LOW_RANK_NAMES, LowRankPart, keep_entries

SUPPORTED_LAYER_TYPES = (nn.Linear, Conv1D)
# Scale of the random deltas that `init_weights=False` draws, so that tests can tell an adapter from the base model.
RANDOM_INIT_STD = 0.02


def quantized_weight_error(base: nn.Module) -> Optional[str]:
    """Why MFTC cannot adapt `base` although its type is supported, or None. bitsandbytes' Linear8bitLt and Linear4bit
    subclass nn.Linear but store integer weights (4-bit ones packed): the warm-up needs the weight's gradient, and
    merge would write float lines into the integer storage (README, Limitations)."""
    weight = getattr(base, "weight", None)
    # bitsandbytes' weight classes quantise on the first move to a device, so a float one is refused as well.
    if weight is None or (weight.is_floating_point() and not type(weight).__module__.startswith("bitsandbytes")):
        return None
    return (
        f"its weight must be a plain floating-point tensor, got {type(base).__name__} with a {weight.dtype} "
        f"{type(weight).__name__} of shape {tuple(weight.shape)}; quantised base layers (e.g. bitsandbytes 8-/4-bit) "
        "are not supported"
    )


class MFTCLayer(LowRankPart, BaseTunerLayer):
    adapter_layer_names = ("mftc_delta", *LOW_RANK_NAMES)
    other_param_names = ("mftc_idx", "mftc_scale", "mftc_geometry", "mftc_low_rank_scaling")
    random_init_std = RANDOM_INIT_STD

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.mftc_delta = nn.ParameterDict({})
        self.mftc_idx = BufferDict({}, persistent=True)
        # Optional per-line step scales (`step_control.py`): the delta applied is mftc_scale[:, None] * mftc_delta.
        self.mftc_scale = BufferDict({}, persistent=True)
        # The weight shape and block grid the ids refer to, saved so that a different base model is refused on load.
        self.mftc_geometry = BufferDict({}, persistent=True)
        self.mftc_grid: dict[str, BlockGrid] = {}
        self._init_low_rank()  # the optional low-rank part (`low_rank.py`), only for adapters with one
        # (positions, what an adapter's merge replaced there; positions None: the whole weight, for a low-rank part),
        # so that unmerge restores the weight bit-exactly (not by subtraction).
        self._mftc_replaced: dict[str, tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.frozen_peft_weight_names = {}
        # Whether PEFT asked for each adapter to be trainable; an empty delta is frozen regardless, so its own flag
        # cannot tell, and a checkpoint that fills it must know.
        self._mftc_wants_grad: dict[str, bool] = {}
        # Whether the adapter's config lists a selection: then a checkpoint's ids must match the layer's, else the
        # checkpoint's (data-dependent) ids are taken.
        self._mftc_listed: dict[str, bool] = {}
        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_LAYER_TYPES):
            raise TypeError(
                f"Target module {base} is not supported by MFTC. Supported module types: "
                f"{', '.join(t.__module__ + '.' + t.__name__ for t in SUPPORTED_LAYER_TYPES)}."
            )
        if (reason := quantized_weight_error(base)) is not None:
            raise TypeError(f"Target module {base} is not supported by MFTC: {reason}")
        self.in_features, self.out_features = _get_in_out_features(base)
        # transformers' Conv1D stores its weight as (in, out): the transpose of nn.Linear's layout.
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.kwargs = kwargs

    # ----- adapter state -------------------------------------------------------------------------------------------
    def update_layer(
        self, adapter_name: str, grid: BlockGrid, block_ids: Sequence[int], *, init_weights: bool = True, seed: int = 0,
        step_scales: Optional[Sequence[float]] = None,
    ) -> None:
        """Create (or replace) the adapter's delta for exactly `block_ids` of `grid`; `step_scales` (one positive
        number per block, in the order of `block_ids`) scale what each block's delta contributes, and so its step."""
        if (grid.in_features, grid.out_features) != (self.in_features, self.out_features):
            raise ValueError(
                f"`grid` must describe this layer's weight ({self.out_features} x {self.in_features}), "
                f"got {grid.out_features} x {grid.in_features}"
            )
        checked = grid.check_ids(block_ids)
        kept_dtype = self.mftc_delta[adapter_name].dtype if adapter_name in self.mftc_delta else None
        scale_of = None if step_scales is None else dict(zip(checked, step_scales))
        ids = sorted(checked)
        n_lines = sum(grid.widths(ids))
        if init_weights:
            delta = torch.zeros(n_lines, grid.other_length)
        else:
            delta = RANDOM_INIT_STD * torch.randn(
                n_lines, grid.other_length, generator=_layer_generator(seed, adapter_name, grid, ids)
            )
        self.mftc_grid[adapter_name] = grid
        self.mftc_delta[adapter_name] = nn.Parameter(delta)
        self.mftc_idx[adapter_name] = torch.tensor(ids, dtype=torch.int32)  # int32: half the bytes on disk
        self.mftc_geometry[adapter_name] = grid_geometry(grid)
        scale = None
        if scale_of is None:
            if adapter_name in self.mftc_scale:
                del self.mftc_scale[adapter_name]
        else:
            per_block = torch.tensor([float(scale_of[b]) for b in ids], dtype=torch.float32)
            widths = torch.tensor(grid.widths(ids), dtype=torch.long)
            scale = per_block.repeat_interleave(widths)  # (lines,)
            self.mftc_scale[adapter_name] = scale
        if n_lines:
            self.frozen_peft_weight_names.pop(adapter_name, None)
        else:
            # An empty delta never receives a gradient; leaving it trainable would break DistributedDataParallel.
            self.frozen_peft_weight_names[adapter_name] = ("mftc_delta",)
        self._move_only(adapter_name, ("mftc_delta", "mftc_idx", "mftc_scale", "mftc_geometry"))
        if kept_dtype is not None:
            # PEFT upcasts a new adapter once, after injecting it (`autocast_adapter_dtype`, fp32 on a bf16 base); a
            # delta re-created later (warm-up, set_block_selection, a checkpoint's shapes) keeps the dtype that cast
            # or the user gave the old one, where the move above would give it the base's.
            self._set_adapter_dtype(adapter_name, delta, scale, kept_dtype)
        self.set_adapter(self.active_adapters)

    def _move_only(self, adapter_name: str, names: Sequence[str]) -> None:
        """PEFT's move of the adapter to its base layer's device and dtype, for the containers `names` only: the
        others keep their very tensors (re-creating the blocks must not round the low-rank factors to a bf16 base's
        dtype, nor replace Parameters an optimiser holds; and the reverse)."""
        others = [n for n in (*self.adapter_layer_names, *self.other_param_names) if n not in names]
        keep_entries({n: getattr(self, n) for n in others}, adapter_name,
                     lambda: self._move_adapter_to_device_of_base_layer(adapter_name))

    def _set_adapter_dtype(self, adapter_name: str, delta: torch.Tensor, scale: torch.Tensor | None,
                           dtype: torch.dtype) -> None:
        """The adapter's delta and step scales in `dtype`, on their device, from their unrounded values (the move to
        a bf16 base's device has rounded the copies it holds)."""
        device = self.mftc_delta[adapter_name].device
        self.mftc_delta[adapter_name] = nn.Parameter(delta.to(device=device, dtype=dtype))
        if scale is not None:
            self.mftc_scale[adapter_name] = scale.to(device=device, dtype=dtype)

    def swap_blocks(self, adapter_name: str, drop: Sequence[int], grow: Sequence[int], *,
                    grown_scale: float = 1.0) -> torch.Tensor:
        """Replace selected blocks `drop` by unselected blocks `grow` of the same width, in place: the delta keeps its
        Parameter object and shape (optimisers stay valid), kept blocks keep their values, grown blocks start at 0
        (with step scale `grown_scale`, if the adapter has scales). Returns, per line of the new delta, the line of the
        old delta it came from (-1: new), so that the caller can move the optimiser state along (`dynamic.py`)."""
        grid, ids = self.mftc_grid[adapter_name], self.block_ids(adapter_name)
        drop, grow = [int(b) for b in drop], grid.check_ids(grow, name="grow")
        if len(drop) != len(grow) or not set(drop) <= set(ids) or set(grow) & set(ids):
            raise ValueError(
                f"`drop` must be selected blocks and `grow` as many unselected ones, got drop={drop!r}, grow={grow!r} "
                f"for selected {ids!r}"
            )
        if any(w != grid.width for w in grid.widths(drop + grow)):
            raise ValueError(f"only full-width blocks ({grid.width} lines) can be swapped, got {drop + grow!r}")
        starts = [0, *itertools.accumulate(grid.widths(ids))][:-1]
        line_of = dict(zip(ids, starts))  # old block id -> its first line in the old delta
        new_ids = sorted((set(ids) - set(drop)) | set(grow))
        source = torch.cat([
            torch.arange(line_of[b], line_of[b] + w) if b in line_of else torch.full((w,), -1)
            for b, w in zip(new_ids, grid.widths(new_ids))
        ]).to(torch.long)
        move_lines(self.mftc_delta[adapter_name], source, fill=0.0)
        if adapter_name in self.mftc_scale:
            move_lines(self.mftc_scale[adapter_name], source, fill=grown_scale)
        self.mftc_idx[adapter_name].copy_(torch.tensor(new_ids, dtype=torch.int32))
        return source

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # PEFT < 0.21 would also cast the block ids and geometry to the base's float dtype (`_compat.py`).
        integers = {"mftc_idx": self.mftc_idx, "mftc_geometry": self.mftc_geometry}
        move = super()._move_adapter_to_device_of_base_layer
        move_keeping_integers(integers, adapter_name, lambda: move(adapter_name, device=device))

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        freeze_empty(self.mftc_delta)  # PEFT < 0.20 ignores `frozen_peft_weight_names` (`_compat.py`)
        for key in self.mftc_delta:
            self._mftc_wants_grad[key] = key in names and not inference_mode

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        freeze_empty(self.mftc_delta)  # as in set_adapter
        for key in names:
            if key in self.mftc_delta:
                self._mftc_wants_grad[key] = requires_grad

    def record_trainability(self, adapter_name: str, wants_grad: bool) -> None:
        """Remember whether PEFT wants the adapter trainable (an empty delta is frozen whatever PEFT wants, so its own
        flag cannot tell); a delta filled from a checkpoint later gets this trainability."""
        self._mftc_wants_grad[adapter_name] = bool(wants_grad)

    def record_selection_listed(self, adapter_name: str, listed: bool) -> None:
        """Remember whether the adapter's config lists a selection, which a checkpoint's ids must then agree with."""
        self._mftc_listed[adapter_name] = bool(listed)

    def block_ids(self, adapter_name: str) -> list[int]:
        return self.mftc_idx[adapter_name].tolist()

    def _positions(self, adapter_name: str) -> torch.Tensor:
        """Positions along the block axis covered by the adapter's blocks, in delta-line order."""
        grid = self.mftc_grid[adapter_name]
        ids = self.mftc_idx[adapter_name].to(torch.int64)  # int64 for index arithmetic and index_select
        offsets = torch.arange(grid.width, device=ids.device)
        positions = (ids[:, None] * grid.width + offsets).flatten()
        # Only the last block can be narrower, and ids are sorted, so the positions past the end are the trailing
        # ones: slice them off by the delta's line count (a host int), not by a mask (a device-to-host sync per
        # forward).
        return positions[: self.mftc_delta[adapter_name].shape[0]]

    # ----- forward ---------------------------------------------------------------------------------------------
    def _add_block_updates(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        for adapter_name in self.active_adapters:
            if adapter_name not in self.mftc_delta or self.mftc_delta[adapter_name].shape[0] == 0:
                continue
            # Compute in the input's dtype (bf16 matmuls on a bf16 model); the fp32 delta still takes every small step.
            delta = self.applied_delta(adapter_name).to(x.dtype)
            positions = self._positions(adapter_name)
            if self.mftc_grid[adapter_name].axis == "out":
                update = x @ delta.T  # (..., selected outputs)
                result = result.index_add(-1, positions, update.to(result.dtype))
            else:
                update = x.index_select(-1, positions) @ delta  # (..., out_features)
                result = result + update.to(result.dtype)
        return result

    def applied_delta(self, adapter_name: str) -> torch.Tensor:
        """The lines the adapter adds to the weight: the trained delta, times its step scales if it has them."""
        delta = self.mftc_delta[adapter_name]
        if adapter_name not in self.mftc_scale:
            return delta
        return delta * self.mftc_scale[adapter_name].to(delta.dtype)[:, None]

    # ----- merge ---------------------------------------------------------------------------------------------------
    def _lines(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`weight` as a (length, other_length) view of lines along the adapter's block axis."""
        return self.mftc_grid[adapter_name].lines(weight, fan_in_fan_out=self.fan_in_fan_out)

    def _read_lines(self, weight: torch.Tensor, adapter_name: str, positions: torch.Tensor) -> torch.Tensor:
        return self._lines(weight, adapter_name).index_select(0, positions)

    def _write_lines(self, weight: torch.Tensor, adapter_name: str, positions: torch.Tensor, lines) -> None:
        self._lines(weight, adapter_name)[positions] = lines.to(weight.dtype)  # a view: writes into `weight`

    def first_nonfinite_merge(self, adapter_names: Optional[list[str]] = None) -> Optional[str]:
        """The first adapter whose merge would make this weight non-finite (None: all fine), found on a copy of the
        weight, in merge order, so that `safe_merge` can refuse before anything is written."""
        names = self.active_adapters if adapter_names is None else adapter_names
        names = [n for n in names if n in self.mftc_delta and n not in self.merged_adapters]
        if not names:
            return None
        weight = self.get_base_layer().weight.data.clone()
        for adapter_name in names:
            positions, _, new = self._merge_parts(weight, adapter_name)
            if not torch.isfinite(new.to(weight.dtype)).all():  # as written: fp32 sums can overflow fp16
                return adapter_name
            self._write_merge(weight, adapter_name, positions, new)
        return None

    def _merged_lines(self, weight: torch.Tensor, adapter_name: str, positions: torch.Tensor) -> torch.Tensor:
        """Base lines plus the delta, added in the delta's dtype (fp32 on a bf16 base); written in the base's."""
        delta = self.applied_delta(adapter_name).detach()
        return self._read_lines(weight, adapter_name, positions).to(delta.dtype) + delta

    def _merge_parts(self, weight: torch.Tensor, adapter_name: str):
        """(positions, what the merge replaces, what it writes there): the selected lines, or, with a low-rank part,
        the whole weight (positions None; base + scaling * B @ A + the block lines, summed in the factors' dtype)."""
        positions = self._positions(adapter_name).to(weight.device)
        if adapter_name not in self.mftc_lora_A:
            return positions, self._read_lines(weight, adapter_name, positions), self._merged_lines(
                weight, adapter_name, positions)
        full = self._dense_low_rank(adapter_name).detach()
        full = weight.to(full.dtype) + full
        self._write_lines(full, adapter_name, positions, self._merged_lines(full, adapter_name, positions))
        return None, weight, full

    def _write_merge(self, weight: torch.Tensor, adapter_name: str, positions: Optional[torch.Tensor], values) -> None:
        if positions is None:
            weight.copy_(values)  # copy_ casts to the weight's dtype
        else:
            self._write_lines(weight, adapter_name, positions, values)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        broken = self.first_nonfinite_merge(adapter_names) if safe_merge else None
        if broken is not None:  # checked for every adapter first: a refused merge writes nothing
            raise ValueError(f"NaNs detected in the merged weights. The adapter {broken} seems to be broken")
        weight = self.get_base_layer().weight.data
        for adapter_name in adapter_names:
            if adapter_name not in self.mftc_delta:
                continue
            positions, old, new = self._merge_parts(weight, adapter_name)
            # a low-rank part changes every element: the whole weight is kept (its memory, per merged adapter)
            self._mftc_replaced[adapter_name] = (positions, old.clone())
            self._write_merge(weight, adapter_name, positions, new)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight.data
        while self.merged_adapters:  # newest first, so overlapping blocks come back to the oldest values
            adapter_name = self.merged_adapters.pop()
            replaced = self._mftc_replaced.pop(adapter_name, None)
            if replaced is not None:
                self._write_merge(weight, adapter_name, *replaced)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's update as a dense tensor in the base weight's layout. For tests and diagnostics only."""
        weight = self.get_base_layer().weight
        delta = self.applied_delta(adapter_name)
        positions = self._positions(adapter_name).to(delta.device)
        if adapter_name in self.mftc_lora_A:
            dense = self._dense_low_rank(adapter_name).to(delta.dtype)
        else:
            dense = torch.zeros(weight.shape, dtype=delta.dtype, device=delta.device)
        self._write_lines(dense, adapter_name, positions, self._read_lines(dense, adapter_name, positions) + delta)
        return dense

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # Blocks are not a low-rank product, with or without a low-rank part next to them.
        return False


def _layer_generator(seed: int, adapter_name: str, grid: BlockGrid, ids: Sequence[int]) -> torch.Generator:
    """A generator that differs per layer and adapter but not per process (Python's `hash` is salted)."""
    key = f"{seed}|{adapter_name}|{grid}|{list(ids)}".encode()
    return torch.Generator().manual_seed(zlib.crc32(key))


class Linear(nn.Module, MFTCLayer):
    """MFTC around an `nn.Linear` or a transformers `Conv1D`; the forward never needs the base layout."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        grid: BlockGrid,
        block_ids: Sequence[int],
        *,
        init_weights: bool = True,
        seed: int = 0,
        step_scales: Optional[Sequence[float]] = None,
        **kwargs,
    ) -> None:
        super().__init__()
        MFTCLayer.__init__(self, base_layer, **kwargs)
        self.register_load_state_dict_post_hook(geometry_is_optional)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, grid, block_ids, init_weights=init_weights, seed=seed, step_scales=step_scales)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        return self._add_low_rank_updates(x, self._add_block_updates(x, result))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # Selections are data-dependent: take each adapter's shapes from the checkpoint before the copy, after checking
        # that the saved tensors fit this weight and the config. This must live on the concrete class; on the mixin,
        # nn.Module's method would come first in the MRO.
        for adapter_name in list(self.mftc_delta.keys()):
            tensors = {part: state_dict.get(saved_key(prefix, part, adapter_name)) for part in PARTS}
            listed = self._mftc_listed.get(adapter_name, False)
            ids = check_saved_layer(prefix, adapter_name, self.mftc_grid[adapter_name], tensors,
                                    config_ids=self.block_ids(adapter_name) if listed else None)
            check_saved_low_rank(state_dict, prefix, adapter_name, self._low_rank_shapes(adapter_name))
            scaled = adapter_name in self.mftc_scale  # injection made a scale buffer iff the config asks for scales
            check_saved_scales(state_dict, prefix, adapter_name, ids, config_scaled=scaled)
            if ids is not None and ids != self.block_ids(adapter_name):
                self._resize_to_checkpoint(adapter_name, ids, scaled=scaled)  # the scales' values load next
            scale = tensors["scale"]
            if scale is not None and (not scaled or self.mftc_scale[adapter_name].shape != scale.shape):
                delta = self.mftc_delta[adapter_name]  # a layer saved with no blocks: an empty buffer to load into
                self.mftc_scale[adapter_name] = torch.ones(scale.shape, device=delta.device, dtype=delta.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def _resize_to_checkpoint(self, adapter_name: str, ids: list[int], *, scaled: bool) -> None:
        """Re-create the adapter's delta (and step scales, if `scaled`) for the checkpoint's (checked) blocks, keeping
        its dtype and trainability."""
        grid = self.mftc_grid[adapter_name]
        old = self.mftc_delta[adapter_name]
        wanted = old.requires_grad if old.numel() else self._mftc_wants_grad.get(adapter_name, False)
        self.update_layer(adapter_name, grid, ids, step_scales=[1.0] * len(ids) if scaled else None)
        self._mftc_wants_grad[adapter_name] = wanted  # update_layer re-activates; the intent stays what it was
        new = self.mftc_delta[adapter_name]
        new.requires_grad_(wanted and new.numel() > 0)
        self._set_low_rank_requires_grad(adapter_name, wanted)  # update_layer's set_adapter made them trainable

    def __repr__(self) -> str:
        return "mftc." + super().__repr__()
