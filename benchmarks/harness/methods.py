"""Method builders: each turns a freshly loaded base model into the model a method trains, by name.

Every builder returns a `Built`: the model (on the device), how long construction and any warm-up took, optional
training hooks (AdaLoRA's rank allocation, MFTC's spectral coordination) and facts for the JSON line. A method that
cannot be built for a task raises `Skip` with the reason, which is recorded instead of a result.

Matched budgets: `ctx.lora_budget` is the trainable count without the head of LoRA at rank `ctx.rank` (8 unless a
budget sweep sets 8 x multiple; computed by building LoRA); MFTC's budget is that number. The rank-based peers (LoRA,
PiSSA, SHiRA, AdaLoRA's final rank) use `ctx.rank`, AdaMSS fits its rank to `ctx.lora_budget`. The ablations use
`ctx.match_budget`: MFTC's trained count for the same task, seed and budget when MFTC ran first in this invocation,
else the LoRA budget; they get MFTC's low-rank part (`low_rank_share`, from the LoRA budget) and blocks for the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from peft import AdaLoraConfig, LoraConfig, ShiraConfig, get_peft_model

import mftc_peft
from mftc_peft import MFTCConfig, SpectralCoordinator
from mftc_peft.training import TrainHooks

from . import selections
from .profiles import LORA_R
from .tasks import Task

# lora_alpha = 2r keeps LoRA's scale alpha / r at 2 (alpha 16 at r=8, as before) at every rank of a budget sweep: with
# alpha fixed, r=2 and r=32 would differ 16x in scale and the best learning rate would move off a shared grid.
LORA_ALPHA_PER_RANK = 2
ADALORA_INIT_WIDTH = 1.5  # AdaLoRA starts 1.5x wider than its final rank (12 -> 8 at 1x) and is pruned to it
SPECTRAL_BETA, SPECTRAL_LAMBDA = 0.1, 1e-3  # mftc_spectral: gradient low-pass strength and Laplacian weight (not swept)
ADAMSS_SUBSPACES, ADAMSS_SUBSPACE_RANK = 5, 4  # K subspaces of rank s (peft's typical 1-4); R fitted


class Skip(Exception):
    """The method cannot run on this task; the message is recorded as the reason."""


@dataclass
class Context:
    task: Task
    seed: int
    steps: int
    device: torch.device
    lora_budget: int
    match_budget: int
    warmup_batches: Callable  # () -> a fresh iterator over the seed's warm-up batches (the same for every method)
    rank: int = LORA_R  # LoRA's rank at this budget (8 x the budget multiple)
    mftc_overrides: dict = field(default_factory=dict)  # MFTCConfig fields for MFTC and its ablations (studies)


@dataclass
class Built:
    model: torch.nn.Module
    setup_seconds: float = 0.0  # adapter construction (incl. PiSSA's SVD, AdaMSS's clustering)
    warmup_seconds: float = 0.0  # MFTC's warm-up / the ablation's selection (part of the wall time)
    hooks: TrainHooks = field(default_factory=TrainHooks)  # what the method needs inside `train_steps`
    info: dict = field(default_factory=dict)
    is_peft: bool = True


def _timed_peft(model, config) -> tuple[torch.nn.Module, float]:
    start = time.perf_counter()
    peft_model = get_peft_model(model, config)
    return peft_model, time.perf_counter() - start


def lora_config(ctx: Context, **extra) -> LoraConfig:
    return LoraConfig(task_type=ctx.task.task_type, r=ctx.rank, lora_alpha=LORA_ALPHA_PER_RANK * ctx.rank,
                      lora_dropout=0.0, target_modules=ctx.task.targets, **extra)


def build_lora(model, ctx):
    peft_model, seconds = _timed_peft(model.to(ctx.device), lora_config(ctx))
    return Built(peft_model, setup_seconds=seconds,
                 info={"config": {"r": ctx.rank, "lora_alpha": LORA_ALPHA_PER_RANK * ctx.rank}})


def build_pissa(model, ctx):
    peft_model, seconds = _timed_peft(model.to(ctx.device), lora_config(ctx, init_lora_weights="pissa"))
    return Built(peft_model, setup_seconds=seconds, info={"config": {"r": ctx.rank, "init_lora_weights": "pissa"}})


def build_adalora(model, ctx):
    steps = ctx.steps
    tinit, tfinal = steps // 10, steps // 5  # prune ranks between 10% and 80% of training, then keep them
    init_r = max(ctx.rank + 1, round(ADALORA_INIT_WIDTH * ctx.rank))  # something to prune even at r=1
    config = AdaLoraConfig(
        task_type=ctx.task.task_type, init_r=init_r, target_r=ctx.rank, lora_alpha=LORA_ALPHA_PER_RANK * ctx.rank,
        total_step=steps, tinit=tinit, tfinal=tfinal, deltaT=max(1, steps // 20), target_modules=ctx.task.targets,
    )
    peft_model, seconds = _timed_peft(model.to(ctx.device), config)
    hooks = TrainHooks(after_step=lambda step: peft_model.base_model.update_and_allocate(step))
    built = Built(peft_model, setup_seconds=seconds, hooks=hooks,
                  info={"config": {"init_r": init_r, "target_r": ctx.rank, "tinit": tinit,
                                   "tfinal": tfinal, "total_step": steps}})
    built.info["finalize"] = lambda: {"adalora_final_rank_params": adalora_final_params(peft_model)}
    return built


def adalora_final_params(peft_model) -> int:
    """Elements of the ranks AdaLoRA kept (unmasked E entries x (in + out + 1)): its effective final budget."""
    total = 0
    for module in peft_model.modules():
        if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            kept = int((module.lora_E["default"] != 0).sum())
            a, b = module.lora_A["default"], module.lora_B["default"]
            total += kept * (a.shape[1] + b.shape[0] + 1)
    return total


def build_shira(model, ctx):
    # SHiRA trains r x (in + out) entries per weight: exactly LoRA's count at the same rank.
    config = ShiraConfig(task_type=ctx.task.task_type, r=ctx.rank, target_modules=ctx.task.targets,
                         random_seed=ctx.seed)
    peft_model, seconds = _timed_peft(model.to(ctx.device), config)
    return Built(peft_model, setup_seconds=seconds, info={"config": {"r": ctx.rank, "mask_type": "random"}})


def build_adamss(model, ctx):
    try:
        from peft import AdamssConfig
    except ImportError as error:
        raise Skip(f"peft {__import__('peft').__version__} has no AdamssConfig") from error
    config = AdamssConfig(task_type=ctx.task.task_type, r=adamss_rank(model, ctx), num_subspaces=ADAMSS_SUBSPACES,
                          subspace_rank=ADAMSS_SUBSPACE_RANK, target_modules=ctx.task.targets)
    try:
        peft_model, seconds = _timed_peft(model.to(ctx.device), config)
        with torch.no_grad():  # one forward: some shapes build but cannot run (a subspace narrower than s)
            batch = next(ctx.warmup_batches())
            peft_model(**{k: v.to(ctx.device) for k, v in batch.items()})
    except Exception as error:  # a peer's failure to construct is a recorded skip, not a crash of the harness
        reason = f"AdaMSS (peft's AdamssConfig) could not be built and run: {type(error).__name__}: {error}"
        raise Skip(reason) from error
    return Built(peft_model, setup_seconds=seconds,
                 info={"config": {"r": config.r, "num_subspaces": ADAMSS_SUBSPACES,
                                  "subspace_rank": ADAMSS_SUBSPACE_RANK}})


def adamss_rank(model, ctx) -> int:
    """SVD rank R so that AdaMSS's count, about sum over targets of K*s*R + s*out, is closest to LoRA's budget.

    (Each of K subspaces trains A: s x R and B: len(segment) x s, the segments partitioning the output rows; the exact
    count depends on the clustering and is reported as measured.)"""
    k, s = ADAMSS_SUBSPACES, ADAMSS_SUBSPACE_RANK
    dims = [(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in ctx.task.targets)]
    best = min(range(1, max(min(d) for d in dims) + 1),
               key=lambda r: abs(sum(k * s * min(r, i, o) + s * o for i, o in dims) - ctx.lora_budget))
    return best


def build_full(model, ctx):
    model = model.to(ctx.device)
    for param in model.parameters():
        param.requires_grad_(True)
    return Built(model, is_peft=False)


def build_bias(model, ctx):
    model = model.to(ctx.device)
    n_bias = 0
    for name, param in model.named_parameters():
        is_bias = name.endswith(".bias") and not ctx.task.is_head(name)
        param.requires_grad_(is_bias or ctx.task.is_head(name))
        n_bias += param.numel() if is_bias else 0
    if n_bias == 0:
        raise Skip(f"{type(model).__name__} has no bias parameters outside the head (bias-only has nothing to train)")
    return Built(model, is_peft=False)


def _mftc_model(model, ctx, **extra):
    # A study may narrow the targets (`target_modules` in its overrides); the budget stays LoRA's count on all of them.
    fields = {"target_modules": ctx.task.targets, "warmup_steps": ctx.task.settings.warmup_steps}
    fields |= ctx.mftc_overrides | extra
    config = MFTCConfig(task_type=ctx.task.task_type, seed=ctx.seed, **fields)
    return _timed_peft(model.to(ctx.device), config)


def _warmup(peft_model, ctx) -> tuple[object, float]:
    start = time.perf_counter()
    report = mftc_peft.warmup(peft_model, ctx.warmup_batches(), progress=False)
    return report, time.perf_counter() - start


def build_mftc(model, ctx):
    peft_model, seconds = _mftc_model(model, ctx, budget=ctx.lora_budget)
    report, warm = _warmup(peft_model, ctx)
    hooks, info = _reselection(peft_model, ctx)
    return Built(peft_model, setup_seconds=seconds, warmup_seconds=warm, hooks=hooks,
                 info={"budget": ctx.lora_budget, "warmup_timings": report.timings,
                       "selected_blocks": sum(map(len, report.selection.values())),
                       "warmup_steps": peft_model.peft_config[peft_model.active_adapter].warmup_steps,
                       "low_rank_elements": report.low_rank_elements} | info)


def _reselection(peft_model, ctx) -> tuple[TrainHooks, dict]:
    """MFTC's dynamic selection (`reselect_every` in the config) inside the benchmark's loop, on batches of the
    warm-up's own stream; the record gets the number of swapped blocks and the seconds spent."""
    config = peft_model.peft_config["default"]
    if not config.reselect_every:
        return TrainHooks(), {}
    holder, totals, stream = {}, {"reselect_swaps": 0, "reselect_seconds": 0.0}, ctx.warmup_batches()

    def after_step(step: int) -> None:
        if mftc_peft.reselection_due(step + 1, config.reselect_every, ctx.steps):
            batches = [next(stream) for _ in range(config.reselect_batches)]
            done = mftc_peft.reselect_blocks(peft_model, [{k: v.to(ctx.device) for k, v in b.items()} for b in batches],
                                             fraction=config.reselect_fraction, optimizer=holder["optimizer"])
            totals["reselect_swaps"] += done.n_swapped
            totals["reselect_seconds"] += done.seconds

    hooks = TrainHooks(after_step=after_step, optimizer_ready=lambda opt: holder.update(optimizer=opt))
    return hooks, {"finalize": lambda: dict(totals)}


def build_mftc_spectral(model, ctx):
    peft_model, seconds = _mftc_model(model, ctx, budget=ctx.lora_budget, spectral_filter=SPECTRAL_BETA,
                                      spectral_reg=SPECTRAL_LAMBDA)
    start = time.perf_counter()
    report, _ = _warmup(peft_model, ctx)
    graph = report.block_graph()
    coordinator = SpectralCoordinator(peft_model, graph.nodes, graph.affinity, beta=SPECTRAL_BETA, lam=SPECTRAL_LAMBDA)
    warm = time.perf_counter() - start
    hooks = TrainHooks(extra_loss=coordinator.regularization, after_backward=coordinator.filter_gradients)
    return Built(peft_model, setup_seconds=seconds, warmup_seconds=warm, hooks=hooks,
                 info={"budget": ctx.lora_budget, "warmup_timings": report.timings,
                       "config": {"spectral_filter": SPECTRAL_BETA, "spectral_reg": SPECTRAL_LAMBDA},
                       "coordinated_groups": len(coordinator.groups)})


def _ablation(model, ctx, choose):
    """An MFTC adapter with an empty selection, filled by `choose(peft_model, budget) -> (selection, warm-up seconds)`.

    It has MFTC's low-rank part, sized from the same LoRA budget, so that only the blocks differ: `budget` is what the
    part leaves of the matched count."""
    peft_model, seconds = _mftc_model(model, ctx, budget=ctx.lora_budget)
    low_rank = peft_model.base_model.low_rank_numel()
    selection, warm = choose(peft_model, ctx.match_budget - low_rank)
    start = time.perf_counter()
    peft_model.base_model.set_block_selection(selection)
    warm += time.perf_counter() - start
    return Built(peft_model, setup_seconds=seconds, warmup_seconds=warm,
                 info={"budget": ctx.match_budget, "selected_blocks": sum(map(len, selection.values())),
                       "low_rank_elements": low_rank})


def build_random_blocks(model, ctx):
    def choose(peft_model, budget):
        start = time.perf_counter()
        selection = selections.random_selection(peft_model.base_model.block_grids(), budget, ctx.seed)
        return selection, time.perf_counter() - start

    return _ablation(model, ctx, choose)


def _measured(ctx, select, *, uses_dsca: bool, uses_projections: bool = False):
    """A `choose` for `_ablation` from `select(measurement, peft_model, budget) -> selection` on MFTC's measurement."""
    def choose(peft_model, budget):
        measurement = selections.measure(peft_model, ctx.warmup_batches(), projections=uses_projections)
        start = time.perf_counter()
        selection = select(measurement, peft_model, budget)
        # The measurement always runs DSCA (it is MFTC's); methods without clustering are not charged for it.
        measured = measurement.seconds - (0.0 if uses_dsca else measurement.dsca_seconds)
        return selection, measured + time.perf_counter() - start

    return choose


def build_top_energy(model, ctx):
    select = lambda m, _, budget: selections.top_energy_selection(m, budget)  # noqa: E731
    return _ablation(model, ctx, _measured(ctx, select, uses_dsca=False))


def build_mftc_no_search(model, ctx):
    select = lambda m, _, budget: selections.no_search_selection(m, budget)  # noqa: E731
    return _ablation(model, ctx, _measured(ctx, select, uses_dsca=True))


def build_mftc_no_cluster(model, ctx):
    def select(measurement, peft_model, budget):
        config = peft_model.base_model.peft_config["default"]
        return selections.no_cluster_selection(measurement, budget, config)

    return _ablation(model, ctx, _measured(ctx, select, uses_dsca=False, uses_projections=True))


def _study_builder(choose, *, uses_dsca: bool, uses_projections: bool = False):
    """A builder of a selection-study baseline: `choose(measurement, ctx, budget)` picks blocks from MFTC's
    measurement."""
    def build(model, ctx):
        return _ablation(model, ctx, _measured(ctx, lambda m, _, budget: choose(m, ctx, budget), uses_dsca=uses_dsca,
                                               uses_projections=uses_projections))

    return build


STUDY_BUILDERS = {
    "cluster_round_robin": _study_builder(
        lambda m, ctx, budget: selections.round_robin_selection(m, budget), uses_dsca=True),
    "cluster_random": _study_builder(
        lambda m, ctx, budget: selections.round_robin_selection(m, budget, seed=ctx.seed), uses_dsca=True),
    "adam_gain": _study_builder(lambda m, ctx, budget: selections.adam_gain_selection(m, budget), uses_dsca=False,
                                uses_projections=True),
    "energy_sampled": _study_builder(
        lambda m, ctx, budget: selections.energy_sampled_selection(m, budget, ctx.seed), uses_dsca=False),
    "sqrt_energy_sampled": _study_builder(
        lambda m, ctx, budget: selections.energy_sampled_selection(m, budget, ctx.seed, power=0.5),
        uses_dsca=False),
    "proportional_top": _study_builder(
        lambda m, ctx, budget: selections.proportional_top_selection(m, budget), uses_dsca=False),
    "middle_band": _study_builder(
        lambda m, ctx, budget: selections.proportional_band_selection(m, budget, ctx.seed), uses_dsca=False),
    "bottom_energy": _study_builder(
        lambda m, ctx, budget: selections.bottom_energy_selection(m, budget), uses_dsca=False),
}


BUILDERS = {
    "mftc": build_mftc, "lora": build_lora, "adalora": build_adalora, "pissa": build_pissa, "shira": build_shira,
    "adamss": build_adamss, "full": build_full, "bias": build_bias, "random_blocks": build_random_blocks,
    "top_energy": build_top_energy, "mftc_no_search": build_mftc_no_search, "mftc_no_cluster": build_mftc_no_cluster,
    "mftc_spectral": build_mftc_spectral,
    **STUDY_BUILDERS,  # benchmarks/selection_study.py only, not in the profiles
}
MATCHED_TO_MFTC = ("random_blocks", "top_energy", "mftc_no_search", "mftc_no_cluster")


def build(method: str, model, ctx: Context) -> Built:
    if method not in BUILDERS:
        raise ValueError(f"`method` must be one of {tuple(BUILDERS)}, got {method!r}")
    return BUILDERS[method](model, ctx)


def lora_budget(task: Task, rank: int = LORA_R) -> int:
    """LoRA's trainable elements at `rank` without the head, counted on a built LoRA model."""
    model = task.load_model(seed=0)
    peft_model = get_peft_model(model, LoraConfig(task_type=task.task_type, r=rank, target_modules=task.targets))
    return sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and not task.is_head(n))
