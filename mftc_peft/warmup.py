"""The warm-up pipeline: measure block gradients on real batches and cluster the blocks (DSCA; `measure.py`), choose
the blocks under the budget, inject the choice. The choice is `allocation.py`'s per-weight quotas by default
(`allocation="proportional"`), or MFTC's module search (`allocation="search"`): probes and a linear predictor value
DSCA's modules, a constrained search picks them.

    report = mftc_peft.warmup(peft_model, train_dataloader)

The compute (`compute_selection`) is split from the apply (`MFTCModel.set_block_selection`), so a selection can be
cached and re-applied. If anything raises, the model is as it was before the call.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Optional

import torch

from .allocation import DEFAULT_QUOTA_ROUNDING, proportional_selection
from .config_checks import budget_elements
from .context import WarmupRun
from .low_rank import blocks_budget
from .measure import BlockMeasurement, measure
from .model import mftc_tuner
from .predictor import AdditiveModel, models_from_probes
from .probes import consistency_projections, taylor_probe
from .probes_finetune import finetune_probe, regression_probe
from .report import WarmupReport, build_report
from .search import SearchSpace, build_search_space, share_levels_up_to
from .selection import select_candidates
from .state import adapter_name_of, preserved_state
from .step_control import selection_step_scales

logger = logging.getLogger(__name__)


def warmup(
    peft_model,
    train_dataloader: Iterable,
    *,
    eval_dataloader: Optional[Iterable] = None,
    compute_loss: Optional[Callable] = None,
    adapter_name: Optional[str] = None,
    progress: bool = True,
) -> WarmupReport:
    """Run MFTC's warm-up on real batches and inject the selected blocks into the adapter.

    Parameters
    ----------
    peft_model : the model returned by `get_peft_model(model, MFTCConfig(...))`.
    train_dataloader : batches in the form the model takes (dicts of tensors); it is cycled if it is shorter than
        `warmup_steps`. The loss is `outputs.loss` unless `compute_loss(model, batch)` is given.
    eval_dataloader : held-out batches for the 'finetune' / 'regression' probes (default: batches of the train
        dataloader after the warm-up's own).
    adapter_name : the MFTC adapter to fill (default: the active one).
    progress : show tqdm progress bars.

    Returns a `WarmupReport`; the selection is also recorded in the adapter's config (`block_selection`).
    """
    tuner = mftc_tuner(peft_model)
    adapter_name = adapter_name_of(tuner, adapter_name)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # Everything the computation touches (requires_grad, grads, modes, RNG, the adapter) is put back on exit, on
    # success as on failure; the injection afterwards validates before it changes anything.
    with preserved_state(peft_model, adapter_name=adapter_name):
        selection, report = compute_selection(
            peft_model, train_dataloader, eval_dataloader=eval_dataloader, compute_loss=compute_loss,
            adapter_name=adapter_name, progress=progress, timings=timings,
        )
    inject_start = time.perf_counter()
    tuner.set_block_selection(selection, adapter_name, step_scales=report.step_scales)
    timings["inject"] = time.perf_counter() - inject_start
    timings["total"] = time.perf_counter() - start
    report.timings = timings
    report.trainable_elements = tuner.selected_numel(adapter_name)
    logger.info("MFTC warm-up done:\n%s", report.summary())
    return report


def compute_selection(
    peft_model, train_dataloader, *, eval_dataloader=None, compute_loss=None, adapter_name=None, progress=True,
    timings=None,
) -> tuple[dict[str, list[int]], WarmupReport]:
    """The warm-up's computation without the injection: returns (selection, report). The caller restores state."""
    tuner = mftc_tuner(peft_model)
    adapter_name = adapter_name_of(tuner, adapter_name)
    config = tuner.peft_config[adapter_name]
    config.check_search_fields_unused()  # before any pass: the config may have changed since it was built
    run = WarmupRun(peft_model, adapter_name, config, compute_loss=compute_loss, progress=progress,
                    timings={} if timings is None else timings)
    grids = tuner.block_grids(adapter_name)
    target_elements = sum(g.in_features * g.out_features for g in grids.values())
    # The low-rank part (if any) trains on every target weight whatever is selected: the blocks get what it leaves.
    # Checked before any pass, so that a refused budget costs nothing.
    low_rank = tuner.low_rank_numel(adapter_name)
    budget = blocks_budget(budget_elements(run.config.budget, target_elements), low_rank,
                           low_rank=run.config.low_rank, budget=run.config.budget)
    measurement = measure(run, train_dataloader, eval_dataloader)
    if run.config.allocation == "proportional":
        # No module search: the weights' sizes fix where the budget goes, energy which blocks (`allocation.py`).
        space = result = gain_model = loss_model = None
        with run.timed("search"):
            rounding = run.config.quota_rounding or DEFAULT_QUOTA_ROUNDING
            selection = _broadcast(proportional_selection(
                measurement.table, budget, rounding, run.seeds["allocation"], ffn_coupling=run.config.ffn_coupling,
                grids=grids,
            ))
        if not selection:
            logger.warning("MFTC warm-up: the budget (%s elements) holds no block; the adapter trains none", budget)
    else:
        space, result, gain_model, loss_model = _search(run, measurement, budget)
        selection = _broadcast(space.selection(result.chosen))
        if not selection:
            _warn_empty(space, budget)
    report = build_report(
        selection=selection, measurement=measurement, space=space, result=result, gain_model=gain_model,
        loss_model=loss_model, grids=grids, budget=budget, target_elements=target_elements, config=run.config,
    )
    report.low_rank_elements = low_rank
    report.step_scales = selection_step_scales(measurement.table, selection, run.config)
    return selection, report


def _search(run: WarmupRun, measurement: BlockMeasurement, budget: int):
    """The module search: candidates per node, their predicted values, the constrained choice."""
    with run.timed("probe"):
        space = build_search_space(
            measurement.library, measurement.table, grouping=run.config.node_grouping,
            max_candidates=run.config.max_candidates, budget=budget,
            share_levels=share_levels_up_to(run.config.max_node_share),
        )
        gain_model, loss_model = _probe(run, space, measurement)
    with run.timed("search"):
        result = select_candidates(
            gain_model.deltas, space.sizes(), budget=budget,
            losses=loss_model.deltas if run.config.loss_threshold is not None else None,
            loss_limit=run.config.loss_threshold,
            spread=gain_model.spread, confidence=run.config.confidence, method=run.config.search_method,
        )
    return space, result, gain_model, loss_model


def _probe(run: WarmupRun, space: SearchSpace, measurement: BlockMeasurement):
    """(gain model, loss model) over the search space, from the configured probe kind."""
    config = run.config
    if config.probe == "taylor":
        # lr = 1: the hypothetical step size scales every candidate alike and does not change the ranking.
        projections = measurement.projections
        if config.block_score == "consistency":
            projections = consistency_projections(projections, measurement.table.energy)
        results = taylor_probe(space, projections, lr=1.0)
        return models_from_probes(results, space.n_candidates_per_node, base_accuracy=0.0, base_loss=0.0)
    probe = finetune_probe if config.probe == "finetune" else regression_probe
    report = probe(
        run.peft_model, space, measurement.train_batches, measurement.eval_batches, probe_steps=config.probe_steps,
        lr=config.probe_lr, seed=run.seeds["probing"], compute_loss=run.compute_loss, progress=run.progress,
        adapter_name=run.adapter_name,
        **({"probe_repeats": config.probe_repeats} if config.probe == "finetune" else {}),
    )
    _, loss_model = report.models(space.n_candidates_per_node)
    # Search on the predicted loss decrease: accuracy on a few probe batches moves in coarse steps, loss smoothly.
    gain_model = AdditiveModel(
        base=-loss_model.base, deltas=tuple(-d for d in loss_model.deltas), spread=loss_model.spread
    )
    return gain_model, loss_model


def _warn_empty(space: SearchSpace, budget: int) -> None:
    smallest = min((c.size for node in space.nodes for c in node.candidates[1:]), default=0)
    reason = (
        f"the smallest candidate ({smallest:,} elements) exceeds the budget ({budget:,})"
        if smallest > budget else "no candidate was predicted to lower the loss"
    )
    logger.warning(
        "MFTC warm-up: %s, so the adapter trains no block; try a larger `budget`, more `warmup_steps` or another "
        "`probe`", reason,
    )


def _broadcast(selection: dict) -> dict:
    """Under torch.distributed every rank takes rank 0's selection (probes may differ per rank's batches)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return selection
    box = [selection]
    dist.broadcast_object_list(box, src=0)
    return box[0]
