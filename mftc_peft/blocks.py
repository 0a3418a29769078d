"""Block grid of one weight matrix: which contiguous slices along one axis form the blocks.

A block is a run of rows ("out" axis: output features) or columns ("in" axis: input features) of a weight,
described in `nn.Linear` terms (out_features x in_features) whatever the module stores. Block ids run 0..n-1 along
the block axis; the last block is narrower when the width does not divide the axis length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

AXES = ("in", "out")
AXIS_CHOICES = ("auto", *AXES)  # "auto": `default_axis` decides per module

# Module-name suffixes by role. "Producers" emit per-head / per-neuron features and are cut along "out"; "consumers"
# read them and are cut along "in", so head h (or neuron group g) has the same block id in both.
_ATTENTION_PRODUCERS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "c_attn", "Wqkv")
_ATTENTION_CONSUMERS = ("o_proj", "out_proj", "attention.output.dense", "attn.c_proj")
_FFN_PRODUCERS = ("gate_proj", "up_proj", "intermediate.dense", "c_fc", "fc1", "w1", "w3", "dense_h_to_4h", "wi")
_FFN_CONSUMERS = ("down_proj", "output.dense", "mlp.c_proj", "fc2", "w2", "dense_4h_to_h", "wo")


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    return any(re.search(rf"(^|\.){re.escape(suffix)}$", name) for suffix in suffixes)


def module_role(module_name: str) -> str | None:
    """Role of a target from its name: 'attention_out', 'attention_in', 'ffn_out', 'ffn_in', or None if unknown.

    Attention roles are checked first so that BERT's `attention.output.dense` is not taken for the FFN `output.dense`.
    """
    if _matches(module_name, _ATTENTION_CONSUMERS):
        return "attention_in"
    if _matches(module_name, _ATTENTION_PRODUCERS):
        return "attention_out"
    if _matches(module_name, _FFN_CONSUMERS):
        return "ffn_in"
    if _matches(module_name, _FFN_PRODUCERS):
        return "ffn_out"
    return None


def default_axis(module_name: str) -> str:
    """The "auto" axis rule: consumers of heads/neurons are cut along "in", everything else along "out"."""
    role = module_role(module_name)
    return "in" if role in ("attention_in", "ffn_in") else "out"


@dataclass(frozen=True)
class BlockGrid:
    """Partition of one weight's block axis into contiguous blocks of `width` (the last may be narrower)."""

    axis: str
    in_features: int
    out_features: int
    width: int

    def __post_init__(self):
        if self.axis not in AXES:
            raise ValueError(f"`axis` must be one of {AXES}, got {self.axis!r}")
        if not isinstance(self.width, int) or self.width <= 0:
            raise ValueError(f"`width` must be a positive integer, got {self.width!r}")

    @property
    def length(self) -> int:
        """Number of features along the block axis."""
        return self.in_features if self.axis == "in" else self.out_features

    @property
    def other_length(self) -> int:
        """Number of features along the other axis (every block spans all of it)."""
        return self.out_features if self.axis == "in" else self.in_features

    @property
    def n_blocks(self) -> int:
        return -(-self.length // self.width)

    def bounds(self, block_id: int) -> tuple[int, int]:
        start = block_id * self.width
        return start, min(start + self.width, self.length)

    def widths(self, block_ids: Iterable[int]) -> list[int]:
        return [stop - start for start, stop in map(self.bounds, block_ids)]

    def numel(self, block_ids: Iterable[int]) -> int:
        """Trainable elements of a selection."""
        return sum(self.widths(block_ids)) * self.other_length

    def block_numels(self) -> list[int]:
        return [w * self.other_length for w in self.widths(range(self.n_blocks))]

    def feature_index(self, block_ids: Iterable[int]) -> torch.Tensor:
        """Positions along the block axis covered by the blocks, concatenated in the given order (int64)."""
        ranges = [torch.arange(*self.bounds(b)) for b in block_ids]
        return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.long)

    def segment_ids(self) -> torch.Tensor:
        """Block id of every position along the block axis: the key for per-block reductions (`index_add`)."""
        return torch.arange(self.length) // self.width

    def lines(self, tensor: torch.Tensor, *, fan_in_fan_out: bool) -> torch.Tensor:
        """A weight (or its gradient) in its storage layout seen as lines along the block axis: a (length,
        other_length) view, so that block b is rows `bounds(b)`. Conv1D (`fan_in_fan_out`) stores (in, out)."""
        tensor = tensor.T if fan_in_fan_out else tensor  # (out, in): nn.Linear's layout
        return tensor if self.axis == "out" else tensor.T

    def check_ids(self, block_ids: Iterable[int], *, name: str = "block_selection") -> list[int]:
        """Validate a selection: integer ids in 0..n_blocks-1, no duplicates. Returns them as a list of ints."""
        ids = [int(b) for b in block_ids]
        bad = [b for b in ids if not 0 <= b < self.n_blocks]
        if bad:
            raise ValueError(
                f"`{name}` block ids must lie in 0..{self.n_blocks - 1} (the {self.axis} axis of length {self.length} "
                f"cut into blocks of {self.width}), got {bad!r}"
            )
        duplicates = sorted({b for b in ids if ids.count(b) > 1})
        if duplicates:
            raise ValueError(f"`{name}` block ids must be unique, got duplicates {duplicates!r} in {ids!r}")
        return ids

    def dense_mask(self, block_ids: Iterable[int]) -> torch.Tensor:
        """Boolean (out_features, in_features) mask of the selection. For tests and diagnostics only."""
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool)
        index = self.feature_index(block_ids)
        if self.axis == "out":
            mask[index, :] = True
        else:
            mask[:, index] = True
        return mask


def make_grid(
    module_name: str,
    in_features: int,
    out_features: int,
    *,
    block_size: int,
    block_axis: str = "auto",
    head_dim: int | None = None,
    head_blocks: bool = True,
) -> BlockGrid:
    """The block grid a target gets: head-wide blocks on the head axis of attention projections, else `block_size`.

    Fused projections (GPT-2 `c_attn` = q|k|v) and grouped-query k/v need no special case: each part is a whole number
    of heads, so cutting every `head_dim` features yields one block per head of each part.
    """
    axis = default_axis(module_name) if block_axis == "auto" else block_axis
    role = module_role(module_name)
    head_axis = {"attention_out": "out", "attention_in": "in"}.get(role)
    width = block_size
    if head_blocks and head_dim and head_axis == axis:
        length = in_features if axis == "in" else out_features
        if length % head_dim == 0:
            width = head_dim
    return BlockGrid(axis=axis, in_features=in_features, out_features=out_features, width=width)


def move_lines(tensor: torch.Tensor, source: torch.Tensor, *, fill: float) -> None:
    """In place: line i of `tensor` becomes old line `source[i]`, or `fill` where `source[i]` is -1 (a new block).
    Used for a delta, its step scales and any optimiser state of the delta's shape."""
    kept = (source >= 0).to(tensor.device)
    with torch.no_grad():
        moved = torch.full_like(tensor, fill)
        moved[kept] = tensor[source.to(tensor.device)[kept]]
        tensor.copy_(moved)
