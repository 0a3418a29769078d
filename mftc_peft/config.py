"""`MFTCConfig`: the fields of an MFTC adapter, with help metadata, and their validation. Nothing else lives here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from . import defaults
from .allocation import ALLOCATIONS, DEFAULT_QUOTA_ROUNDING, QUOTA_ROUNDINGS
from .blocks import AXIS_CHOICES
from .checks import check_bool, check_choice, check_int, check_positive_number, check_range, is_real
from .config_checks import (
    check_block_energy, check_budget, check_ffn_coupling, check_low_rank, check_module_fields,
    check_search_fields_unused, normalise_selection,
)
from .graph import SIMILARITIES
from .probes import BLOCK_SCORES, PROBES
from .registry import mftc_peft_type
from .search import GROUPINGS
from .selection import METHODS as SEARCH_METHODS
from .signatures import KINDS as SIGNATURE_KINDS
from .step_control import STEP_SCALES

BIAS_OPTIONS = ("none", "all", "mftc_only")  # PEFT's own bias options (BaseTuner marks the biases trainable)


@dataclass
class MFTCConfig(PeftConfig):
    """Configuration of an MFTC adapter: which weights are cut into blocks, how, and which blocks are trained.

    With an explicit `block_selection` the adapter is ready at once; otherwise `mftc_peft.warmup` computes the
    selection from the task's gradients and records it here, so a saved adapter reloads without a warm-up.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex of the weights to cut into blocks. None uses the "
            "architecture defaults (all attention and FFN projections of BERT-family encoders, GPT-2 and "
            "Llama-family decoders)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave out of `target_modules`."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices (as for LoRA)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list that `layers_to_transform` indexes (as for LoRA)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter, e.g. a new classification head."},
    )
    block_size: int = field(
        default=8,
        metadata={
            "help": "Width of a block (rows or columns) for weights not cut per attention head. 8 (the default since "
            "benchmarks/results/NOTES.md 62; 32 before) spreads the budget over 4x as many FFN units."
        },
    )
    head_blocks: bool = field(
        default=True,
        metadata={"help": "Cut attention projections per head (width = head dimension) instead of `block_size`."},
    )
    block_axis: str = field(
        default="auto",
        metadata={
            "help": "'in' (columns), 'out' (rows) or 'auto': producers of heads/neurons (q, k, v, FFN up/gate) are cut "
            "along 'out', their consumers (attention output, FFN down) along 'in', so head h has one id in both."
        },
    )
    block_selection: dict[str, list[int]] = field(
        default_factory=dict,
        metadata={
            "help": "Base-model module name (or a suffix/regex matched like LoRA's `rank_pattern`) -> block ids to "
            "train. Filled in by the warm-up; modules that are not listed train no block."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: zero deltas, so a fresh adapter is a no-op. False: small random deltas (for tests)."},
    )
    bias: str = field(
        default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'mftc_only' (targets' biases)."}
    )
    seed: int = field(
        default=0, metadata={"help": "The one seed from which every random choice of MFTC is derived."}
    )
    # ----- warm-up: what is measured -----
    budget: Union[float, int] = field(
        default=defaults.BUDGET,
        metadata={
            "help": "Trainable elements the warm-up may select: a float in (0, 1] is a share of all target-weight "
            "elements, an int a count (e.g. a LoRA run's trainable parameters, for a matched comparison)."
        },
    )
    warmup_steps: int = field(
        default=defaults.WARMUP_STEPS,
        metadata={
            "help": "Micro-batches (forward + backward, no optimiser step) the warm-up measures; 4 since "
            "benchmarks/results/NOTES.md 99 (12 before: next to the low-rank part more of them tied, at 2-4x the cost)."
        },
    )
    head_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Optimiser steps that fit a new head (`modules_to_save`) alone before the gradients are measured; "
            "the head is put back afterwards. Through a random head the gradients point in a random direction."
        },
    )
    head_warmup_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of those head steps."})
    dsca_every: int = field(
        default=4, metadata={"help": "Update the clustering after every this many warm-up micro-batches."}
    )
    signature_kind: str = field(
        default="energy",
        metadata={
            "help": "Per-block gradient signature that DSCA clusters: 'energy' (gradient energy over the last "
            "`signature_window` micro-batches; shape-agnostic) or 'sketch' (a random sketch of the raw gradient)."
        },
    )
    signature_window: int = field(
        default=8, metadata={"help": "Micro-batches an 'energy' signature spans (its length T)."}
    )
    # ----- warm-up: dynamic spectral clustering (DSCA) -----
    n_clusters: int = field(default=12, metadata={"help": "DSCA: number of modules k the blocks are clustered into."})
    embed_dim: int = field(default=16, metadata={"help": "DSCA: Laplacian eigenvectors r used as the embedding."})
    ema_decay: float = field(
        default=0.9, metadata={"help": "DSCA: alpha in W(t) = alpha W(t-1) + (1 - alpha) S(t), in [0, 1)."}
    )
    similarity: str = field(default="cosine", metadata={"help": "DSCA: 'cosine' or 'gaussian' block similarity."})
    n_neighbors: Optional[int] = field(
        default=None, metadata={"help": "DSCA: neighbours per block in the graph; None derives O(log m) of them."}
    )
    reset_every: int = field(
        default=10, metadata={"help": "DSCA: recompute the eigenvectors from scratch every this many updates."}
    )
    min_module_size: int = field(
        default=2, metadata={"help": "DSCA: modules with fewer blocks are merged into their nearest neighbour."}
    )
    max_module_size: Optional[int] = field(
        default=None, metadata={"help": "DSCA: modules with more blocks are split in two (None: no bound)."}
    )
    # ----- warm-up: module search -----
    node_grouping: Union[str, int] = field(
        default="layer",
        metadata={
            "help": "Search nodes: 'layer' (one per transformer layer), 'module' (one per target weight) or an int "
            "k (k consecutive layers per node). Each node trains at most one candidate module."
        },
    )
    max_candidates: int = field(
        default=8, metadata={"help": "Candidate modules per node (besides 'none'), ranked by gradient energy."}
    )
    max_node_share: float = field(
        default=2.0,
        metadata={
            "help": "Most of the budget one search node may take, as a multiple of its fair share (budget / nodes): "
            "candidates are offered truncated to their highest-energy blocks at 0.5x, 1x, ... up to this multiple."
        },
    )
    allocation: str = field(
        default="proportional",
        metadata={
            "help": "Where the budget goes: 'proportional' (each target weight gets blocks in proportion to its block "
            "count, as uniformly random blocks would, filled with its highest-energy blocks; no probes, no search) "
            "or 'search' (the constrained module search over DSCA's modules decides; the default before the method "
            "lab showed it losing to random blocks on the LM, benchmarks/results/NOTES.md 26)."
        },
    )
    quota_rounding: Optional[str] = field(
        default=None,
        metadata={
            "help": "allocation='proportional' only. How shares under one block are rounded: 'spread_remainder' (the "
            "default, which None resolves to: largest remainders, with the weights tied at the cut sharing its "
            "blocks evenly along the layers), 'largest_remainder' (the default before NOTES 56: ties go to the "
            "weights seen first, so with fewer blocks than weights all of them land in the first layers), "
            "'systematic' (each share rounded up with probability equal to its fraction, seeded by `seed`, "
            "spaced evenly along the layers: random blocks' expected count per weight; picks a whole number of "
            "layers apart all land on one role) or 'systematic_mixed' (the same with each layer's weights in a "
            "seeded random order, so the roles vary)."
        },
    )
    ffn_coupling: str = field(
        default="none",
        metadata={
            "help": "allocation='proportional' only. How the FFN weights' quotas are filled: 'none' (each weight with "
            "its own highest-energy blocks) or 'neurons' (in each layer, gate/up_proj row groups and down_proj column "
            "groups, which are the same neurons, ranked together by their summed energy: the weights train the same "
            "neuron groups as far as their quotas allow; needs block_axis='auto'). On the LM lab it tied 'none' (benchmarks/results/NOTES.md 83)."
        },
    )
    probe: str = field(
        default="taylor",
        metadata={
            "help": "allocation='search' only. How candidates are valued: 'taylor' (first-order, from warm-up gradients, no extra passes), "
            "'finetune' (train head + candidate for `probe_steps`) or 'regression' (random architectures jointly)."
        },
    )
    block_score: str = field(
        default="energy",
        metadata={
            "help": "allocation='search' only. What the 'taylor' probe values in a block: 'energy' (its squared mean gradient) or "
            "'consistency' (that divided by its mean squared gradient per batch: how consistently the batches push "
            "it, in [0, 1], whatever its size)."
        },
    )
    probe_steps: int = field(default=4, metadata={"help": "Training steps per 'finetune'/'regression' probe."})
    probe_repeats: int = field(default=2, metadata={"help": "Repeats per probe, for the spread sigma."})
    probe_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the 'finetune'/'regression' probes."})
    loss_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "allocation='search' only. Upper bound on the predicted sum of loss deltas of the selection "
                          "(None: off)."},
    )
    confidence: float = field(
        default=0.0,
        metadata={"help": "allocation='search' only. Search maximises sum(gain - confidence * spread): a "
                          "lower-confidence bound."},
    )
    search_method: str = field(
        default="auto", metadata={"help": "'exact' (scipy MILP), 'greedy' (+ swaps), or 'auto' (by problem size)."}
    )
    # ----- training: step control per block (off by default) -----
    step_scale: str = field(
        default="none",
        metadata={
            "help": "Per-block step scales set at injection: 'none', or 'energy' (each selected block's delta is "
            "scaled by min(1, (median / its per-element gradient energy) ** step_scale_power), so the most "
            "sensitive blocks take smaller steps under any optimiser)."
        },
    )
    step_scale_power: float = field(
        default=0.5, metadata={"help": "Exponent of the 'energy' step scales (> 0; 0.5 evens out the Fisher cost)."}
    )
    block_step_scale: float = field(
        default=1.0,
        metadata={
            "help": "> 0: every block's delta is this times its trained values (times its 'energy' scale, if any), so "
            "under Adam the blocks step by this times the rate while a low-rank part takes the rate itself (blocks "
            "given by hand, grown by a reselection or trained by the search's probes take it too); 1: off."
        },
    )
    # ----- training: dynamic selection (off by default) -----
    reselect_every: int = field(
        default=0,
        metadata={
            "help": "Every this many training steps, swap the weakest selected blocks (smallest delta) for unselected "
            "ones with larger current gradient energy, inside each weight (`dynamic.py`); 0: off. `MFTCTrainer` "
            "does it through a callback (never after the last step); a custom loop calls `mftc_peft.reselect_blocks` "
            "when `mftc_peft.reselection_due` says so."
        },
    )
    reselect_fraction: float = field(
        default=0.25,
        metadata={
            "help": "In (0, 1]: one reselection makes at most this share of the full-width selected blocks' swaps, "
            "over all weights, best energy ratios first; each weight offers max(1, this share of its blocks)."
        },
    )
    reselect_batches: int = field(
        default=2, metadata={"help": "Batches a reselection measures gradient energies on (extra backward passes)."}
    )
    # ----- training: spectral coordination over the block graph (off by default) -----
    spectral_filter: float = field(
        default=0.0,
        metadata={"help": "beta in [0, 1): low-pass filter of same-shape block gradients over the block graph."},
    )
    spectral_reg: float = field(
        default=0.0,
        metadata={"help": "lambda >= 0: adds lambda * tr(Delta^T L Delta) over the block graph to the loss."},
    )
    # ----- a low-rank part next to the blocks (off by default) -----
    low_rank: int = field(
        default=0,
        metadata={
            "help": "Rank r of a low-rank update scaling * B @ A added to every target weight next to its blocks "
            "(RoSA, Nikdan et al. 2024; A: r x in, initialised as PEFT LoRA's, B: out x r, zeros); 0: the rank that "
            "`low_rank_share` gives (half the budget by default), none if that share is 0. Its "
            "r * (in + out) elements per weight come out of `budget`: the warm-up selects blocks for the rest, and "
            "refuses a low-rank part larger than the budget. Step scales, reselection and spectral coordination act "
            "on the blocks only. Merging keeps a copy of each whole target weight per merged adapter (without a "
            "low-rank part: only the replaced lines), so that unmerge restores it bit-exactly."
        },
    )
    low_rank_alpha: Optional[float] = field(
        default=None,
        metadata={
            "help": "With a low-rank part only. Numerator of its scaling alpha / r; None means 2 * low_rank "
            "(scaling 2, as the benchmarks' LoRA with alpha = 2r)."
        },
    )

    low_rank_share: Optional[float] = field(
        default=None,
        metadata={
            "help": "The share in [0, 1) of `budget` that a low-rank part on every target weight may take; None: "
            "0.5 (the default since benchmarks/results/NOTES.md 91; blocks only before), or 0 if `low_rank` sets a "
            "fixed rank. The rank is resolved at injection as the largest r whose r * (in + out) elements per weight "
            "fit the share and written to `low_rank`, the share used to `low_rank_share` (a `low_rank` given with an "
            "explicit share must equal that rank: this checks a saved adapter against the model it is loaded onto). "
            "A budget too small for one rank gives blocks only, with a warning. 0: no part unless `low_rank` > 0."
        },
    )
    block_energy: str = field(
        default="total",
        metadata={
            "help": "What the warm-up's block energies (and signatures) measure: 'total', each block's whole squared "
            "gradient, or 'outside_low_rank', the squared gradient left after removing each micro-batch gradient's "
            "best rank-`low_rank` approximation (what the low-rank part would learn), so that blocks complement the "
            "part; that needs a low-rank part (a budget too small for one rank measures 'total'). Off by default: "
            "benchmarks/results/NOTES.md 102."
        },
    )

    @classmethod
    def check_kwargs(cls, **kwargs):
        """PEFT's hook for a config read from a file: one saved before `allocation` existed was warmed up with the
        module search, so it loads as allocation='search', one saved before `quota_rounding` existed rounded by
        largest remainders, and one saved before `low_rank_share` existed has no part unless `low_rank` gave one (its
        other warm-up fields keep their meaning)."""
        kwargs = super().check_kwargs(**kwargs)
        return {"allocation": "search", "quota_rounding": "largest_remainder", "low_rank_share": 0.0, **kwargs}

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = mftc_peft_type()
        check_module_fields(self)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        check_int("block_size", self.block_size)
        check_bool("head_blocks", self.head_blocks)
        check_bool("init_weights", self.init_weights)
        check_choice("block_axis", self.block_axis, AXIS_CHOICES)
        check_choice("bias", self.bias, BIAS_OPTIONS)
        check_int("seed", self.seed, minimum=0)  # numpy's SeedSequence takes non-negative seeds only
        self.block_selection = normalise_selection(self.block_selection)
        check_budget(self.budget)
        for name in ("warmup_steps", "dsca_every", "n_clusters", "max_candidates"):
            check_int(name, getattr(self, name))
        # An energy signature needs 2 micro-batches to have a shape; one eigenvector embeds nothing (the first is
        # the constant one), so the eigensolver needs at least 2.
        check_int("signature_window", self.signature_window, minimum=2)
        check_int("embed_dim", self.embed_dim, minimum=2)
        for name in ("probe_steps", "probe_repeats"):
            check_int(name, getattr(self, name))
        for name in ("n_neighbors", "max_module_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        check_int("reset_every", self.reset_every)
        check_int("min_module_size", self.min_module_size)
        check_choice("signature_kind", self.signature_kind, SIGNATURE_KINDS)
        check_choice("similarity", self.similarity, SIMILARITIES)
        check_choice("probe", self.probe, PROBES)
        check_choice("allocation", self.allocation, ALLOCATIONS)
        if self.quota_rounding is None and self.allocation == "proportional":
            # resolved here rather than in the field, so a saved adapter records what its warm-up did
            self.quota_rounding = DEFAULT_QUOTA_ROUNDING
        if self.quota_rounding is not None:
            check_choice("quota_rounding", self.quota_rounding, QUOTA_ROUNDINGS)
        # "largest_remainder" with the search: configs saved while it was the default must still load
        if self.allocation == "search" and self.quota_rounding not in (None, "largest_remainder"):
            raise ValueError(f"`quota_rounding` only applies to allocation='proportional' (the module search sets no "
                             f"quotas), got quota_rounding={self.quota_rounding!r} with allocation='search'")
        check_ffn_coupling(self)
        check_choice("block_score", self.block_score, BLOCK_SCORES)
        if self.block_score != "energy" and self.probe != "taylor":
            raise ValueError(f"`block_score` {self.block_score!r} needs probe='taylor', got probe={self.probe!r}")
        check_choice("search_method", self.search_method, SEARCH_METHODS)
        if not (isinstance(self.node_grouping, str) and self.node_grouping in GROUPINGS) and not (
            isinstance(self.node_grouping, int) and not isinstance(self.node_grouping, bool) and self.node_grouping > 0
        ):
            raise ValueError(
                f"`node_grouping` must be one of {GROUPINGS} or a positive integer, got {self.node_grouping!r}"
            )
        check_range("ema_decay", self.ema_decay, 0.0, 1.0, "in [0, 1)")
        check_int("reselect_every", self.reselect_every, minimum=0)
        check_int("reselect_batches", self.reselect_batches)
        if not (is_real(self.reselect_fraction) and 0 < self.reselect_fraction <= 1):
            raise ValueError(f"`reselect_fraction` must be a number in (0, 1], got {self.reselect_fraction!r}")
        check_choice("step_scale", self.step_scale, STEP_SCALES)
        if not (is_real(self.step_scale_power) and self.step_scale_power > 0):
            raise ValueError(f"`step_scale_power` must be a positive number, got {self.step_scale_power!r}")
        check_positive_number("block_step_scale", self.block_step_scale)
        check_range("max_node_share", self.max_node_share, 0.5, float("inf"), "a number >= 0.5")
        check_range("spectral_filter", self.spectral_filter, 0.0, 1.0, "in [0, 1)")
        check_range("spectral_reg", self.spectral_reg, 0.0, float("inf"), "a number >= 0")
        check_low_rank(self)
        check_block_energy(self)
        check_range("confidence", self.confidence, 0.0, float("inf"), "a number >= 0")
        check_int("head_warmup_steps", self.head_warmup_steps, minimum=0)
        if not (is_real(self.head_warmup_lr) and self.head_warmup_lr > 0):
            raise ValueError(f"`head_warmup_lr` must be a positive number, got {self.head_warmup_lr!r}")
        if not (is_real(self.probe_lr) and self.probe_lr > 0):
            raise ValueError(f"`probe_lr` must be a positive number, got {self.probe_lr!r}")
        if self.loss_threshold is not None and not is_real(self.loss_threshold):
            raise ValueError(f"`loss_threshold` must be a number or None, got {self.loss_threshold!r}")
        if not self.block_selection:  # a saved adapter's selection is made: its warm-up fields are a record
            self.check_search_fields_unused()  # after each field's own check, which names a bad value better

    def check_search_fields_unused(self) -> None:
        """Raise if a field only the module search reads is set while `allocation="proportional"` would ignore it
        (`probe`, `block_score`, `loss_threshold`, `confidence`; the search's shape fields are harmless). The warm-up
        calls it too, for a config changed after construction or one that already holds a selection."""
        check_search_fields_unused(self)
