"""Profiles: how much data, how many steps and seeds, and which learning rates each method is tried with.

- "full": the protocol's settings (the headline numbers; meant for a GPU machine). Learning rates are swept on the
  validation split with the first seed; the pick is then run with every seed on the test split.
- "quick": one seed, small subsets, one epoch, a fixed learning rate per method ("not swept"); finishes in minutes on
  2 CPU cores. Proves the pipeline end to end; its numbers are not comparisons.
- "cpu_budget": the budget sweep of issue 16 on 2 CPU cores: MFTC, LoRA, random blocks and SHiRA at 1/4x, 1x and 4x
  LoRA r=8's trainable count, learning rate swept per method and budget.
- "gpu": the protocol's full sizes, every method, 3 seeds and 3-point sweeps, meant for one large GPU with several
  runs at a time (`scripts/gpu_benchmark.sh`).
- "smoke": tiny random models and random data (no assets), a few steps: for the test suite. "cpu_budget_smoke" and
  "gpu_smoke" are the two profiles above shrunk the same way (`run.py --profile gpu --smoke`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mftc_peft.defaults import WARMUP_STEPS

ALL_METHODS = (
    "mftc", "lora", "adalora", "pissa", "shira", "adamss", "full", "bias",
    "random_blocks", "top_energy", "mftc_no_search", "mftc_no_cluster", "mftc_spectral",
)
# Methods whose trainable count does not follow a LoRA rank: in a budget sweep they run once, at 1x.
BUDGET_FREE = ("full", "bias")
LORA_R = 8  # the rank whose trainable count is a budget sweep's 1x


def rank_for(multiple: float) -> int:
    """LoRA's rank at `multiple` x LoRA r=8's trainable count (a LoRA count is linear in its rank)."""
    rank = LORA_R * multiple
    if not (rank >= 1 and float(rank).is_integer()):
        raise ValueError(f"a budget multiple must make 8 x multiple a whole rank >= 1 (0.125, 0.25, 0.5, 1, 2, 4, "
                         f"...), got {multiple!r}")
    return int(rank)


# Learning-rate grids of the full profile's sweep, per method family (classification / language modelling).
_BLOCK_METHODS = ("mftc", "random_blocks", "top_energy", "mftc_no_search", "mftc_no_cluster", "mftc_spectral")
_LOW_RANK_METHODS = ("lora", "adalora", "pissa", "shira", "adamss")
CLS_LR_GRID = {
    **{m: (5e-4, 1e-3, 2e-3, 5e-3) for m in _BLOCK_METHODS + _LOW_RANK_METHODS},
    "full": (2e-5, 5e-5, 1e-4, 2e-4),
    "bias": (1e-3, 3e-3, 1e-2),
}
LM_LR_GRID = {
    **{m: (1e-4, 3e-4, 1e-3, 3e-3) for m in _BLOCK_METHODS + _LOW_RANK_METHODS},
    "full": (1e-5, 3e-5, 1e-4),
    "bias": (1e-3, 3e-3, 1e-2),
}
# CPU profile: two learning rates per method around the protocol's reference picks (fewer steps than the protocol's
# 3 epochs, so the higher of the two is the step up); the secondary peers and ablations run with one seed.
CPU_LR_GRID = {
    "cls": {
        # The block methods, SHiRA and AdaMSS picked the top point of (2e-3, 5e-3), so they also get 1e-2.
        **{m: (2e-3, 5e-3, 1e-2) for m in _BLOCK_METHODS + ("shira", "adamss")},
        "lora": (2e-3, 5e-3),
        # AdaLoRA sat at the majority class at 2e-3 and 5e-3 (its loss adds an orthogonality term, and its E starts
        # at zero), so it gets the two lower points as well.
        "adalora": (5e-4, 1e-3, 2e-3, 5e-3),
        "pissa": (1e-3, 2e-3), "full": (1e-4, 2e-4), "bias": (3e-3, 1e-2),
    },
    # Language modelling: the same points for every adapter method. With (3e-4, 1e-3) and then (3e-4, 1e-3, 3e-3)
    # both MFTC and LoRA picked the top point (40 steps is a short schedule), so the grid reaches 1e-2.
    "lm": {**{m: (3e-4, 1e-3, 3e-3, 1e-2) for m in _BLOCK_METHODS + _LOW_RANK_METHODS}, "full": (3e-5, 1e-4),
           "bias": (3e-3, 1e-2)},
}
# Budget sweep on the CPU (64 classification steps, 40 language-modelling steps): three points per method, from the
# cpu profile's picks (cpu.md) and the method lab's brackets. LoRA collapsed at 5e-3 on classification, so its bracket
# sits one step lower; SHiRA picked the top point (1e-2), so its bracket sits one step higher. SHiRA's bracket for
# language modelling is a guess (never swept there), taken from random blocks, the other sparse method. A pick on an
# edge is extended by one point (`extend_edges`), at every budget: a budget 16x larger need not share a best rate.
BUDGET_LR_GRID = {
    "cls": {"mftc": (2e-3, 5e-3, 1e-2), "random_blocks": (2e-3, 5e-3, 1e-2), "lora": (1e-3, 2e-3, 4e-3),
            "shira": (5e-3, 1e-2, 2e-2)},
    "lm": {"mftc": (1e-3, 3e-3, 1e-2), "lora": (1e-3, 3e-3, 1e-2), "random_blocks": (3e-3, 1e-2, 3e-2),
           "shira": (3e-3, 1e-2, 3e-2)},
}
BUDGET_METHODS = ("mftc", "lora", "random_blocks", "shira")
BUDGET_MULTIPLES = (0.25, 1.0, 4.0)  # of LoRA r=8's count: LoRA r=2, 8 and 32
# GPU profile (protocol sizes: 189 classification steps, 120 language-modelling steps): three points per method. At
# 189 steps the method lab picked 2e-3 for the block methods (bracket 1e-3..1e-2) and 1e-3 for LoRA (it collapsed at
# 4e-3); the protocol's reference picks at 3 epochs were 2e-3 (LoRA), 1e-3 (PiSSA) and 2e-4 (full fine-tuning, the top
# of its grid). AdaLoRA has not learned at any rate tried so far (it stays at the majority class), so its bracket is
# LoRA's one step up, a guess. Language modelling has three times the cpu profile's 40 steps, where MFTC and LoRA picked
# 3e-3 (interior) and random blocks 1e-2 (the top).
_GPU_RANDOM_SPARSE = ("random_blocks", "shira")  # high-gradient selections tolerate smaller steps than random ones
GPU_LR_GRID = {
    "cls": {
        **{m: (1e-3, 2e-3, 5e-3) for m in _BLOCK_METHODS + ("shira", "adamss", "adalora")},
        "lora": (5e-4, 1e-3, 2e-3), "pissa": (5e-4, 1e-3, 2e-3), "full": (1e-4, 2e-4, 5e-4), "bias": (3e-3, 1e-2, 3e-2),
    },
    "lm": {
        **{m: (1e-3, 3e-3, 1e-2) for m in _BLOCK_METHODS + _LOW_RANK_METHODS},
        **{m: (3e-3, 1e-2, 3e-2) for m in _GPU_RANDOM_SPARSE},
        "full": (3e-5, 1e-4, 3e-4), "bias": (3e-3, 1e-2, 3e-2),
    },
}
# Smoke twins: two rates (so every pick sits on an edge and the extension runs), two seeds (so that paired intervals
# exist); the numbers mean nothing on tiny random models.
SMOKE_LR_GRID = {task: {m: (1e-3, 2e-3) for m in ALL_METHODS} for task in ("cls", "lm")}
CPU_HEADLINE = ("mftc", "lora", "adalora", "pissa", "random_blocks", "top_energy")
# Quick profile: one fixed learning rate per method (from the protocol's reference measurements where there is one).
QUICK_LR = {
    **{m: 2e-3 for m in _BLOCK_METHODS + ("lora", "adalora", "shira", "adamss")},
    "pissa": 1e-3, "full": 2e-4, "bias": 1e-2,
}


@dataclass(frozen=True)
class TaskSettings:
    n_train: int | None  # examples (cls) or chunks (lm) for training, validation split included (None: all)
    n_val: int  # carved from the training examples, used by the learning-rate sweep only
    n_test: int | None  # None: every test example / chunk
    batch_size: int
    epochs: int | None = None  # steps = epochs x batches per epoch ...
    steps: int | None = None  # ... or a fixed number of steps (data cycled in fresh seeded orders)
    max_length: int = 64  # tokens per snippet (cls) or per chunk (lm)
    # MFTC warm-up micro-batches (for MFTC and every ablation that measures gradients): the product's default
    warmup_steps: int = WARMUP_STEPS


@dataclass(frozen=True)
class Profile:
    name: str
    seeds: int
    sweep: bool
    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    settings: dict[str, TaskSettings] = field(default_factory=dict)
    tiny_models: bool = False  # random tiny models and data (smoke)
    headline: tuple[str, ...] | None = None  # methods run with every seed (None: all); the rest with the first only
    lr_grids: dict | None = None  # per-task, per-method sweep grids (None: the full profile's)
    budgets: tuple[float, ...] = (1.0,)  # multiples of LoRA r=8's trainable count (LoRA r = 8 x multiple)
    extend_edges: int = 0  # times a sweep whose best rate sits on its bracket's edge is extended by one rate
    # After the edges: one rate between the best and its better neighbour where they are more than this ratio apart
    # (`sweep.refinement`); None: no refinement
    refine_ratio: float | None = None
    device: str | None = None  # None: cuda when available, else cpu

    def lr_grid(self, task: str, method: str) -> tuple[float, ...]:
        if not self.sweep:
            return (QUICK_LR[method],)
        if self.lr_grids is not None:
            return self.lr_grids[task][method]
        return (CLS_LR_GRID if task == "cls" else LM_LR_GRID)[method]

    def seeds_for(self, method: str, seeds: list[int]) -> list[int]:
        return seeds if self.headline is None or method in self.headline else seeds[:1]


# Hamlet: acts I-IV cut into 336 chunks of 128 tokens, 30 held out for the sweep (306 train); act V (77 chunks, 9,856
# tokens) is the test text. 120 steps of batch 8 = about 3.1 passes over the chunks.
_PROTOCOL_LM = TaskSettings(n_train=None, n_val=30, n_test=None, batch_size=8, steps=120, max_length=128)
_CPU_SETTINGS = {
    # 1,000 training snippets, and 1,000 for validation: a 200-snippet split told learning rates apart by one or two
    # examples, so the sweep was a coin toss.
    "cls": TaskSettings(n_train=2000, n_val=1000, n_test=1000, batch_size=32, epochs=2, max_length=64),
    "lm": TaskSettings(n_train=None, n_val=30, n_test=None, batch_size=8, steps=40, max_length=128),
}
_SMOKE_SETTINGS = {
    "cls": TaskSettings(n_train=48, n_val=16, n_test=16, batch_size=8, steps=3, max_length=16, warmup_steps=4),
    "lm": TaskSettings(n_train=24, n_val=8, n_test=8, batch_size=4, steps=3, max_length=16, warmup_steps=4),
}

PROFILES = {
    "full": Profile(
        name="full", seeds=3, sweep=True, methods=ALL_METHODS, tasks=("cls", "lm"),
        settings={
            # Protocol: 2,000 train (250 of them held out as the validation split) / 1,000 test, 3 epochs.
            "cls": TaskSettings(n_train=2000, n_val=250, n_test=1000, batch_size=32, epochs=3, max_length=64),
            "lm": _PROTOCOL_LM,
        },
    ),
    "gpu": Profile(
        # The protocol's sizes on one large GPU, several runs at a time (scripts/gpu_benchmark.sh). Classification
        # trains on 2,000 snippets x 3 epochs (189 steps, the method lab's decision length) and sweeps on its own
        # 1,000-snippet validation split (250 could not tell rates apart reliably on the CPU); 1,000 test snippets.
        name="gpu", seeds=3, sweep=True, methods=ALL_METHODS, tasks=("cls", "lm"), lr_grids=GPU_LR_GRID,
        extend_edges=1, device="cuda",
        settings={"cls": TaskSettings(n_train=3000, n_val=1000, n_test=1000, batch_size=32, epochs=3, max_length=64),
                  "lm": _PROTOCOL_LM},
    ),
    "gpu_smoke": Profile(
        # The gpu profile's pipeline (both tasks, sweep with edge extension, matched ablations, a skipped method) on
        # tiny models and the CPU, small enough for the test suite: fewer methods, two seeds, two rates.
        name="gpu_smoke", seeds=2, sweep=True, methods=("mftc", "lora", "random_blocks", "top_energy", "bias"),
        tasks=("cls", "lm"), tiny_models=True, lr_grids=SMOKE_LR_GRID, extend_edges=1, device="cpu",
        settings=_SMOKE_SETTINGS,
    ),
    "cpu_budget": Profile(
        # Issue 16's budget sweep: the cpu profile's sizes, four methods at three budgets, 3 seeds each.
        name="cpu_budget", seeds=3, sweep=True, methods=BUDGET_METHODS, tasks=("cls", "lm"), lr_grids=BUDGET_LR_GRID,
        budgets=BUDGET_MULTIPLES, extend_edges=1, settings=_CPU_SETTINGS,
        # The LM grids step by 3.3x; the classification ones by at most 2.5x, so only the LM is refined (NOTES 87)
        refine_ratio=3.0,
    ),
    "cpu_budget_smoke": Profile(
        # The tiny BERT's weights cannot hold 4x LoRA r=8 (SHiRA refuses r=32 on a 32 x 32 weight): 2x is the top.
        name="cpu_budget_smoke", seeds=2, sweep=True, methods=BUDGET_METHODS, tasks=("cls", "lm"), tiny_models=True,
        lr_grids=SMOKE_LR_GRID, budgets=(0.25, 1.0, 2.0), device="cpu", settings=_SMOKE_SETTINGS,
    ),
    "cpu": Profile(
        # What 2 CPU cores can do in about an hour: the protocol's test set and sweep, a smaller training set and 2
        # epochs, 3 seeds for MFTC, LoRA, AdaLoRA, PiSSA and the two block baselines, 1 seed for the rest.
        name="cpu", seeds=3, sweep=True, methods=ALL_METHODS, tasks=("cls",), headline=CPU_HEADLINE,
        lr_grids=CPU_LR_GRID, settings=_CPU_SETTINGS,
    ),
    "lab_long": Profile(
        # The method lab's decision length: the protocol's 2,000 training snippets x 3 epochs (189 steps), scored on
        # its own 1,000-snippet validation split (selection_study.py only; it never touches the test split).
        name="lab_long", seeds=5, sweep=True, methods=ALL_METHODS, tasks=("cls",), lr_grids=CPU_LR_GRID,
        settings={"cls": TaskSettings(n_train=3000, n_val=1000, n_test=1000, batch_size=32, epochs=3, max_length=64)},
    ),
    "quick": Profile(
        name="quick", seeds=1, sweep=False, methods=("mftc", "lora", "random_blocks", "top_energy", "bias"),
        tasks=("cls",),
        settings={
            "cls": TaskSettings(n_train=512, n_val=64, n_test=256, batch_size=32, epochs=1, max_length=64,
                                warmup_steps=8),
            "lm": TaskSettings(n_train=64, n_val=8, n_test=16, batch_size=8, steps=6, max_length=128, warmup_steps=4),
        },
    ),
    "smoke": Profile(
        name="smoke", seeds=1, sweep=False, methods=ALL_METHODS, tasks=("cls",), tiny_models=True,
        settings=_SMOKE_SETTINGS,
    ),
}
# `run.py --profile P --smoke` runs P's smoke twin (any other profile: "smoke").
SMOKE_TWINS = {"gpu": "gpu_smoke", "cpu_budget": "cpu_budget_smoke"}
