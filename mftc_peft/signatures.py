"""Per-block gradient signatures, collected during warm-up backward passes without keeping full gradients.

A post-accumulate-grad hook on every target weight reduces the gradient to per-block numbers as soon as it is
accumulated and then frees it (`param.grad = None`), so warm-up never holds the gradients of all targets at once.
The caller makes the weights require grad, runs forward + backward per micro-batch, and calls `end_micro_batch()`
after each backward.

Two kinds of signature per block (node):
- "energy" (default, shape-agnostic): the block's mean squared gradient per micro-batch over a sliding window of the
  last `window` micro-batches, as a double-centred log series (see `energy_signatures`).
- "sketch": a random linear sketch of the block's raw gradient summed over the window: lines summed with random
  signs by their offset inside the block, then the other axis count-sketched. The hashes are shared by all blocks,
  so the sketches of two blocks of one shape estimate the inner product of their gradients.
With `residual_rank` r > 0 every gradient first loses its best rank-r approximation (`residual.py`): the signatures
and energies then describe what a rank-r low-rank part next to the blocks would not learn.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from typing import Mapping

import numpy as np
import torch

from .blocks import BlockGrid
from .checks import check_int
from .residual import gaussian_probe, without_top_directions

logger = logging.getLogger(__name__)

KINDS = ("energy", "sketch")
_FLOOR = 1e-6  # energies below this share of the micro-batch's mean block energy count as "no gradient" in log space


class SignatureCollector:
    """Hooks that turn each target's gradient into per-block signatures, one micro-batch at a time.

    `targets` maps a module name to (weight, grid, fan_in_fan_out): the weight is an `nn.Linear` weight (out x in) or,
    with `fan_in_fan_out=True`, a transformers `Conv1D` weight (in x out); `grid` is its `BlockGrid` in Linear terms.
    Rows of `signatures()` follow `nodes`: the targets in the given order, block ids ascending within each.

    Use as a context manager (or `attach()` / `detach()`); hooks are removed on exit even after an error.
    """

    def __init__(
        self, targets: Mapping[str, tuple], *, kind: str = "energy", window: int = 8, sketch_dim: int = 64,
        seed: int = 0, keep_history: bool = False, residual_rank: int = 0,
    ):
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
        check_int("window", window)
        check_int("sketch_dim", sketch_dim)
        check_int("residual_rank", residual_rank, minimum=0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`seed` must be an integer, got {seed!r}")
        if not targets:
            raise ValueError(
                f"`targets` must map at least one module name to (weight, grid, fan_in_fan_out), got {targets!r}"
            )
        self.kind, self.window, self.sketch_dim, self.seed = kind, window, sketch_dim, seed
        self.residual_rank = residual_rank
        self._targets = [_check_target(name, value) for name, value in targets.items()]
        self.nodes = [(name, b) for name, _, grid, _ in self._targets for b in range(grid.n_blocks)]
        sizes = [grid.n_blocks for _, _, grid, _ in self._targets]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        m = len(self.nodes)
        # The taylor probe needs every micro-batch's block sketch (not only the window): kept when asked for.
        self.keep_history = bool(keep_history)
        self._sketching = kind == "sketch" or self.keep_history
        self._history: list[np.ndarray] = []
        self._hash = self._make_hash() if self._sketching else None
        self._device_cache: dict = {}
        self._handles: list = []
        self._ring = np.zeros((window, m) if kind == "energy" else (window, m, sketch_dim), dtype=np.float64)
        self._filled = 0  # micro-batches folded in so far (the ring holds min(filled, window) of them)
        self._total_energy = np.zeros(m, dtype=np.float64)
        self.n_skipped = 0
        self._clear_pending()

    # ------------------------------------------------------------------ hooks
    def attach(self) -> "SignatureCollector":
        if self._handles:
            raise RuntimeError("this SignatureCollector is already attached; call `detach()` first")
        try:
            for index, (_, weight, _, _) in enumerate(self._targets):
                self._handles.append(weight.register_post_accumulate_grad_hook(self._hook(index)))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __enter__(self) -> "SignatureCollector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, index):
        def hook(param):
            if param.grad is not None:
                self._reduce(index, param.grad.detach())
            param.grad = None  # reduced: free it now, so only one target's full gradient exists at a time

        return hook

    def _reduce(self, index, grad):
        _, _, grid, fan_in_fan_out = self._targets[index]
        if self.residual_rank:
            grad = grad.float()  # the best rank-r approximation is the same for a matrix and its transpose
            probe = self._on_device("probe", grad.shape[1], grad.device,
                                    lambda: gaussian_probe(grad.shape[1], self.residual_rank, self.seed))
            grad = without_top_directions(grad, self.residual_rank, probe)
        rows = grid.lines(grad, fan_in_fan_out=fan_in_fan_out).float()  # (length along the block axis, other_length)
        segments = self._on_device("segments", index, rows.device, grid.segment_ids)
        per_row = rows.pow(2).sum(dim=1, dtype=torch.float64)  # (length,)
        energy = torch.zeros(grid.n_blocks, dtype=torch.float64, device=rows.device).index_add_(0, segments, per_row)
        reduced = energy[:, None]  # (blocks, 1 [+ sketch_dim]): the energy, then the sketch
        if self._sketching:
            reduced = torch.cat([reduced, self._sketch(index, rows, grid, segments)], dim=1)
        # Kept on the gradient's device until the micro-batch ends: a host copy (or a finiteness test) here would
        # make every backward pass wait for the device once per target weight.
        self._pending[index] = reduced + self._pending[index] if index in self._pending else reduced

    def _sketch(self, index, rows, grid, segments):
        """Sketch of every block: element (p, q) adds s(p) s'(q) g[p, q] to bucket h'(q).

        The lines of a block are first summed with random signs s(p) (one pass over the gradient), then the other
        axis is hashed by a product with a signed one-hot (other, d) matrix. Both steps are linear with independent
        random signs, so inner products of sketches estimate inner products of block gradients, at the cost of one
        scaled copy of the gradient (a full CountSketch over (p, q) cost half of a SmolLM2 warm-up micro-batch).
        """
        d = self.sketch_dim
        length, other = rows.shape
        s_local = self._on_device("line_signs", None, rows.device, lambda: self._hash[0])
        local = self._on_device("local", index, rows.device, lambda: torch.arange(length) % grid.width)
        signed = torch.zeros(grid.n_blocks, other, device=rows.device).index_add_(
            0, segments, rows * s_local[local][:, None]
        )  # (blocks, other)
        projection = self._on_device(
            "projection", other, rows.device, lambda: _signed_one_hot(self._hash[1][:other], self._hash[2][:other], d)
        )
        sketch = signed @ projection  # (blocks, d)
        numel = self._on_device("numel", index, rows.device,
                                lambda: torch.tensor(grid.block_numels(), dtype=torch.float32))
        return (sketch / numel.sqrt()[:, None]).double()  # per-element scale, like the energies

    def _make_hash(self):
        """Hash and sign tables from the seed (numpy Generator; never Python's hash())."""
        rng = np.random.default_rng(self.seed)
        width = max(grid.width for _, _, grid, _ in self._targets)
        other = max(grid.other_length for _, _, grid, _ in self._targets)
        return (
            torch.from_numpy(rng.choice([-1.0, 1.0], size=width).astype(np.float32)),
            torch.from_numpy(rng.integers(self.sketch_dim, size=other)),
            torch.from_numpy(rng.choice([-1.0, 1.0], size=other).astype(np.float32)),
        )

    def _on_device(self, key, index, device, make):
        """Small index tensors built once per (key, target, device)."""
        cache_key = (key, index, str(device))
        if cache_key not in self._device_cache:
            self._device_cache[cache_key] = make().to(device)
        return self._device_cache[cache_key]

    # ------------------------------------------------------------------ micro-batches
    def _clear_pending(self):
        self._pending: dict[int, torch.Tensor] = {}  # target index -> (blocks, 1 [+ sketch_dim]) on its device

    def _gather_pending(self):
        """The micro-batch's reductions on the host, with one copy per device: (energy (m,), sketch (m, d) or None,
        names of the targets whose gradient was not finite). A target without a gradient contributes zeros."""
        host = torch.zeros(len(self.nodes), 1 + (self.sketch_dim if self._sketching else 0), dtype=torch.float64)
        by_device = defaultdict(list)
        for index, reduced in self._pending.items():
            by_device[reduced.device].append(index)
        for indices in by_device.values():
            copied = torch.cat([self._pending[i] for i in indices]).cpu()
            at = 0
            for i in indices:
                start, stop = self._offsets[i], self._offsets[i + 1]
                host[start:stop] = copied[at : at + stop - start]
                at += stop - start
        energy = host[:, 0].contiguous()
        sketch = host[:, 1:].contiguous() if self._sketching else None
        bad = [name for i, (name, _, _, _) in enumerate(self._targets)
               if not bool(torch.isfinite(energy[self._offsets[i] : self._offsets[i + 1]]).all())]
        return energy, sketch, bad

    def end_micro_batch(self) -> bool:
        """Fold the gradients reduced since the last call into the window. Returns False if the micro-batch was skipped.

        A micro-batch in which any target had a non-finite gradient is skipped with a warning. Under
        `torch.distributed` the reductions are averaged over ranks first (and a skip on one rank is a skip on all),
        so every rank holds identical signatures.
        """
        try:
            pending_energy, pending_sketch, bad_targets = self._gather_pending()
            energy, sketch, bad = self._all_reduce(pending_energy, pending_sketch, len(bad_targets))
            if bad or not np.all(np.isfinite(energy)) or (sketch is not None and not np.all(np.isfinite(sketch))):
                self.n_skipped += 1
                names = ", ".join(sorted(bad_targets)) or "another rank's targets"
                warnings.warn(
                    f"skipping micro-batch {self._filled + self.n_skipped}: non-finite gradient in {names}; it is not "
                    "folded into the signatures",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return False
            numel = np.concatenate([grid.block_numels() for _, _, grid, _ in self._targets]).astype(np.float64)
            slot = self._filled % self.window
            self._ring[slot] = energy / numel if self.kind == "energy" else sketch
            if self.keep_history:
                # undo the per-element scale: the taylor probe needs raw inner products of block gradients
                self._history.append((sketch * np.sqrt(numel)[:, None]).astype(np.float32))
            self._total_energy += energy
            self._filled += 1
            return True
        finally:
            self._clear_pending()

    @staticmethod
    def _all_reduce(energy, sketch, n_bad):
        """Average the micro-batch reductions over ranks (sum then divide); count non-finite targets on all ranks."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return energy.numpy(), None if sketch is None else sketch.numpy(), n_bad
        parts = [torch.tensor([float(n_bad)], dtype=torch.float64), energy]
        parts += [] if sketch is None else [sketch.ravel()]
        packed = torch.cat(parts)
        if dist.get_backend() == "nccl":
            packed = packed.cuda()
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        packed = packed.cpu() / dist.get_world_size()
        m = energy.numel()
        reduced_sketch = None if sketch is None else packed[1 + m :].reshape(sketch.shape).numpy()
        return packed[1 : 1 + m].numpy(), reduced_sketch, int(packed[0].item() > 0)

    # ------------------------------------------------------------------ results
    @property
    def n_micro_batches(self) -> int:
        """Micro-batches folded in so far (skipped ones excluded)."""
        return self._filled

    def _window(self):
        """The ring's entries in chronological order: (T', m) or (T', m, d)."""
        count = min(self._filled, self.window)
        start = self._filled % self.window if self._filled > self.window else 0
        return np.roll(self._ring, -start, axis=0)[:count]

    def signatures(self) -> np.ndarray:
        """Signatures (m, d) of the last `window` micro-batches, float64, rows in `nodes` order.

        energy: d = number of micro-batches in the window (>= 2 needed); sketch: d = `sketch_dim`.
        """
        if self.kind == "energy":
            if min(self._filled, self.window) < 2:
                raise RuntimeError(
                    f"energy signatures need at least 2 folded micro-batches, got {self._filled}; run more backward "
                    "passes (each followed by `end_micro_batch()`) first"
                )
            return energy_signatures(self._window())
        if self._filled == 0:
            raise RuntimeError("sketch signatures need at least 1 folded micro-batch, got 0")
        return self._window().sum(axis=0)

    def history(self) -> np.ndarray:
        """Every folded micro-batch's block sketches (T, m, sketch_dim), at the scale of the raw gradient, so that
        inner products of rows estimate inner products of block gradients. Needs `keep_history=True`."""
        if not self.keep_history:
            raise RuntimeError("this SignatureCollector keeps no history: create it with `keep_history=True`")
        if not self._history:
            raise RuntimeError("no micro-batch has been folded in yet")
        return np.stack(self._history)

    def block_energy(self) -> np.ndarray:
        """Cumulative squared-gradient sum per block over all folded micro-batches (m,): a Fisher-style ranking."""
        return self._total_energy.copy()

    def node_sizes(self) -> np.ndarray:
        """Parameter count of every block (m,), int64: DSCA's `node_sizes`."""
        return np.concatenate([grid.block_numels() for _, _, grid, _ in self._targets]).astype(np.int64)


def _signed_one_hot(buckets: torch.Tensor, signs: torch.Tensor, d: int) -> torch.Tensor:
    """(n, d) matrix with signs[q] at (q, buckets[q]) and zeros elsewhere."""
    matrix = torch.zeros(len(buckets), d)
    matrix[torch.arange(len(buckets)), buckets] = signs
    return matrix


def energy_signatures(window: np.ndarray) -> np.ndarray:
    """Double-centred log energies (m, T) from mean squared gradients per element (T, m).

    Per-element means make blocks of different sizes comparable. Gradient energies span orders of magnitude across
    layers, so they are compared in log space, where a common multiplicative change is additive. Subtracting each
    micro-batch's mean over blocks removes what moves every block at once (the loss size of that batch, learning-rate
    or loss-scale changes); subtracting each block's mean over time removes its level. What is left is co-movement,
    and the cosine of two rows is the correlation of the two blocks' energy trajectories. Energies below `_FLOOR` of
    the micro-batch's mean are floored so that a block with no gradient does not become a -inf outlier.
    """
    floor = _FLOOR * window.mean(axis=1, keepdims=True) + np.finfo(np.float64).tiny
    logs = np.log(np.maximum(window, floor))  # (T, m)
    logs -= logs.mean(axis=1, keepdims=True)
    logs -= logs.mean(axis=0, keepdims=True)
    return np.ascontiguousarray(logs.T)


def _check_target(name, value):
    try:
        weight, grid, fan_in_fan_out = value
    except (TypeError, ValueError):
        raise ValueError(
            f"`targets[{name!r}]` must be a tuple (weight, grid, fan_in_fan_out), got {value!r}"
        ) from None
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise TypeError(
            f"`targets[{name!r}]` weight must be a 2-D torch tensor (nn.Linear or Conv1D weight), "
            f"got {type(weight).__name__}"
        )
    if not isinstance(grid, BlockGrid):
        raise TypeError(f"`targets[{name!r}]` grid must be a BlockGrid, got {type(grid).__name__}")
    expected = (grid.in_features, grid.out_features) if fan_in_fan_out else (grid.out_features, grid.in_features)
    if tuple(weight.shape) != expected:
        layout = "Conv1D (in x out)" if fan_in_fan_out else "nn.Linear (out x in)"
        raise ValueError(
            f"`targets[{name!r}]` weight must have the {layout} shape {expected!r} of its grid, "
            f"got {tuple(weight.shape)!r}"
        )
    return name, weight, grid, bool(fan_in_fan_out)
