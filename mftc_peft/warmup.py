"""The warm-up: measure block gradients on real batches, cluster the blocks (DSCA), value the modules (probes and a
linear predictor), choose them under the budget (constrained search), and inject the choice as the adapter.

    report = mftc_peft.warmup(peft_model, train_dataloader)

The compute (`compute_selection`) is split from the apply (`MFTCModel.set_block_selection`), so a selection can be
cached and re-applied. If anything raises, the model is as it was before the call.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, NamedTuple, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .diagnostics import WarmupReport
from .model import mftc_tuner
from .dsca import DynamicSpectralClustering
from .probes_finetune import finetune_probe, head_parameters, preserved_state, regression_probe
from .probes import gradient_projections, taylor_probe
from .search import BlockTable, build_search_space, layer_index, share_levels_up_to
from .predictor import AdditiveModel, models_from_probes
from .selection import select_candidates
from .signatures import SignatureCollector
from .training_utils import _loss_and_outputs

logger = logging.getLogger(__name__)

_PROBE_EVAL_BATCHES = 2  # held-out batches a training probe evaluates on

# Child seeds spawned from the config's one seed, one stream per stage (style: separate generators per purpose).
_STREAMS = ("signatures", "clustering", "probing", "search")


def stage_seeds(seed: int) -> dict[str, int]:
    children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    return {name: int(child.generate_state(1)[0]) for name, child in zip(_STREAMS, children)}


def budget_elements(budget, target_elements: int) -> int:
    """A float budget is a share of the target weights, an int a count of elements."""
    return int(budget) if isinstance(budget, int) else int(budget * target_elements)


def default_loss(model, batch) -> torch.Tensor:
    """`outputs.loss` of the batch (a clear error when the batch has no labels)."""
    return _loss_and_outputs(model, batch, None)[0]


def _batches(dataloader: Iterable, n: int, device) -> Iterable[dict]:
    """`n` batches, cycling through the dataloader if it is shorter, moved to the model's device."""
    produced = 0
    while produced < n:
        empty = True
        for batch in dataloader:
            empty = False
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            produced += 1
            if produced == n:
                return
        if empty:
            raise ValueError("`train_dataloader` yielded no batch")


@contextmanager
def _timed(timings: dict, stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


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
    adapter_name = adapter_name or tuner.active_adapters[0]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # Everything the computation touches (requires_grad, grads, modes, RNG, the adapter) is put back on exit, on
    # success as on failure; the injection afterwards validates before it changes anything.
    with preserved_state(peft_model, adapter_name=adapter_name):
        selection, report = compute_selection(
            peft_model, train_dataloader, eval_dataloader=eval_dataloader, compute_loss=compute_loss,
            adapter_name=adapter_name, progress=progress, timings=timings,
        )
    with _timed(timings, "inject"):
        tuner.set_block_selection(selection, adapter_name)
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
    adapter_name = adapter_name or mftc_tuner(peft_model).active_adapters[0]
    timings = {} if timings is None else timings
    measured = _gradients(
        peft_model, adapter_name, train_dataloader, eval_dataloader, compute_loss or default_loss, progress, timings
    )
    config, grids, collector, dsca = measured.config, measured.grids, measured.collector, measured.dsca
    train_batches, eval_batches = measured.train_batches, measured.eval_batches
    seeds = stage_seeds(config.seed)
    target_elements = sum(g.in_features * g.out_features for g in grids.values())
    budget = budget_elements(config.budget, target_elements)
    nodes = [tuple(node) for node in collector.nodes]
    with _timed(timings, "probe"):
        table = _block_table(grids, nodes, collector.block_energy())
        library = [module.nodes.tolist() for module in dsca.modules_]
        space = build_search_space(
            library, table, grouping=config.node_grouping, max_candidates=config.max_candidates, budget=budget,
            share_levels=share_levels_up_to(config.max_node_share),
        )
        gain_model, loss_model = _probe(
            peft_model, space, collector, train_batches, eval_batches, config, seeds, compute_loss, progress,
            adapter_name,
        )
    with _timed(timings, "search"):
        result = select_candidates(
            gain_model.deltas, space.sizes(), budget=budget,
            losses=loss_model.deltas if config.loss_threshold is not None else None,
            loss_limit=config.loss_threshold,
            spread=gain_model.spread, confidence=config.confidence, method=config.search_method,
        )
        selection = _broadcast(space.selection(result.chosen))
    if not selection:
        smallest = min((c.size for node in space.nodes for c in node.candidates[1:]), default=0)
        reason = (
            f"the smallest candidate ({smallest:,} elements) exceeds the budget ({budget:,})"
            if smallest > budget else "no candidate was predicted to lower the loss"
        )
        logger.warning(
            "MFTC warm-up: %s, so the adapter trains no block; try a larger `budget`, more `warmup_steps` or another "
            "`probe`", reason,
        )

    row_of = {node: row for row, node in enumerate(nodes)}
    report = WarmupReport(
        selection=selection,
        trainable_elements=sum(grids[n].numel(ids) for n, ids in selection.items()),
        budget_elements=budget,
        target_elements=target_elements,
        nodes=[list(node) for node in nodes],
        labels=[int(label) for label in dsca.labels_],
        modules=[_module_record(module, nodes) for module in dsca.modules_],
        candidates=_candidate_records(space, gain_model, loss_model),
        solver={k: v for k, v in asdict(result).items() if k != "chosen"} | {"chosen": list(result.chosen)},
        diagnostics=_diagnostics(dsca) | {"node_layers": [_layer(name) for name, _ in nodes]},
        selected_blocks=[
            {"module": name, "block": b, "layer": _layer(name), "size": grids[name].numel([b]),
             "label": int(dsca.labels_[row_of[(name, b)]])}
            for name, ids in selection.items() for b in ids
        ],
        config={k: v for k, v in config.to_dict().items() if k != "block_selection"},
    )
    report.attach_graph(dsca.affinity_)
    return selection, report


@dataclass
class BlockMeasurement:
    """The warm-up's measurement: `table` (one row per block, energy = accumulated squared gradient), `projections`
    ((micro-batches, blocks) inputs of the taylor probe; None unless `probe='taylor'`), `library` (DSCA's modules as
    rows of `table`) and `timings` (seconds per stage: head, signatures, dsca)."""

    table: BlockTable
    projections: Optional[np.ndarray]
    library: list
    timings: dict


def measure_blocks(
    peft_model, train_dataloader: Iterable, *, compute_loss: Optional[Callable] = None,
    adapter_name: Optional[str] = None, progress: bool = False,
) -> BlockMeasurement:
    """The warm-up's measurement alone (head fit, block gradients, DSCA) on `warmup_steps` batches of
    `train_dataloader`, without probing, search or injection; the model is left exactly as it was. For studies that
    compare other selections on MFTC's own measurement."""
    adapter_name = adapter_name or mftc_tuner(peft_model).active_adapters[0]
    timings: dict[str, float] = {}
    with preserved_state(peft_model, adapter_name=adapter_name):
        measured = _gradients(
            peft_model, adapter_name, train_dataloader, None, compute_loss or default_loss, progress, timings
        )
    collector = measured.collector
    return BlockMeasurement(
        table=_block_table(measured.grids, [tuple(node) for node in collector.nodes], collector.block_energy()),
        projections=gradient_projections(collector.history()) if measured.config.probe == "taylor" else None,
        library=[module.nodes.tolist() for module in measured.dsca.modules_],
        timings=timings,
    )


class _Gradients(NamedTuple):
    config: object
    grids: dict
    collector: SignatureCollector
    dsca: DynamicSpectralClustering
    train_batches: list
    eval_batches: list


def _gradients(peft_model, adapter_name, train_dataloader, eval_dataloader, loss_fn, progress, timings) -> _Gradients:
    """The measuring half of the warm-up, shared by `compute_selection` and `measure_blocks`: the batches, the head
    fit, the block gradients and DSCA. The caller restores the model's state."""
    tuner = mftc_tuner(peft_model)
    config = tuner.peft_config[adapter_name]
    layers = dict(tuner.mftc_layers(adapter_name))
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} has no MFTC layer to warm up")
    grids = {name: layer.mftc_grid[adapter_name] for name, layer in layers.items()}
    device = next(peft_model.parameters()).device
    train_batches, eval_batches = _split_batches(train_dataloader, eval_dataloader, config, device)
    _fit_head(peft_model, adapter_name, train_batches, loss_fn, config, timings)
    collector, dsca = _measure(
        peft_model, layers, grids, config, stage_seeds(config.seed), train_batches, loss_fn, progress, timings
    )
    return _Gradients(config, grids, collector, dsca, train_batches, eval_batches)


def _split_batches(train_dataloader, eval_dataloader, config, device) -> tuple[list[dict], list[dict]]:
    """The warm-up's micro-batches and, for the training probes, held-out probe batches."""
    n_eval = 0 if config.probe == "taylor" else _PROBE_EVAL_BATCHES
    if eval_dataloader is not None and n_eval:
        train = list(_batches(train_dataloader, config.warmup_steps, device))
        return train, list(_batches(eval_dataloader, n_eval, device))
    batches = list(_batches(train_dataloader, config.warmup_steps + n_eval, device))
    return batches[: config.warmup_steps], batches[config.warmup_steps :]


def _fit_head(peft_model, adapter_name, batches, loss_fn, config, timings) -> None:
    """Fit the adapter's new head (if any) alone for `head_warmup_steps` Adam steps on the warm-up batches.

    A random head sends the blocks a random direction of its input, so their gradients say little about the task;
    once the head separates the classes they do (the head-first idea of LP-FT, Kumar et al. 2022). The caller's
    `preserved_state` puts the head back, so training still starts from the user's initialisation.
    """
    head = head_parameters(peft_model, adapter_name)
    if not head or config.head_warmup_steps == 0:
        return
    for param in peft_model.parameters():
        param.requires_grad_(False)
    for param in head:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(head, lr=config.head_warmup_lr)
    peft_model.eval()
    with _timed(timings, "head"):
        for step in range(config.head_warmup_steps):
            loss = loss_fn(peft_model, batches[step % len(batches)])
            if torch.isfinite(loss):
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _measure(peft_model, layers, grids, config, seeds, batches, loss_fn, progress, timings):
    """Warm-up backward passes: per-block signatures from hooks on the target weights, DSCA every `dsca_every`.

    Only the target weights require grad meanwhile (the caller's `preserved_state` restores every flag), and the model
    is in eval mode, so the measurement is deterministic given the batches.
    """
    for param in peft_model.parameters():
        param.requires_grad_(False)
    targets = {
        name: (layer.get_base_layer().weight, grids[name], layer.fan_in_fan_out) for name, layer in layers.items()
    }
    for weight, _, _ in targets.values():
        weight.requires_grad_(True)
    peft_model.eval()
    m = sum(grid.n_blocks for _, grid, _ in targets.values())
    dsca = DynamicSpectralClustering(
        n_clusters=min(config.n_clusters, m), embed_dim=min(config.embed_dim, max(m - 1, 1)),
        ema_decay=config.ema_decay, similarity=config.similarity, n_neighbors=config.n_neighbors,
        reset_every=config.reset_every, min_module_size=config.min_module_size,
        max_module_size=config.max_module_size, random_state=seeds["clustering"],
    )
    collector = SignatureCollector(
        targets, kind=config.signature_kind, window=config.signature_window, seed=seeds["signatures"],
        keep_history=config.probe == "taylor",
    )
    with collector:
        for step, batch in enumerate(tqdm(batches, desc="MFTC warm-up", disable=not progress, leave=False)):
            with _timed(timings, "signatures"):
                loss = loss_fn(peft_model, batch)
                if not torch.isfinite(loss):
                    logger.warning("MFTC warm-up: skipping micro-batch %d with a non-finite loss", step)
                    continue
                loss.backward()
                collector.end_micro_batch()
            last = step == len(batches) - 1
            if collector.n_micro_batches >= 2 and ((step + 1) % config.dsca_every == 0 or last):
                with _timed(timings, "dsca"):
                    dsca.update(
                        collector.signatures(), node_sizes=collector.node_sizes(),
                        node_energy=collector.block_energy(),
                    )
    if not hasattr(dsca, "labels_"):
        raise ValueError(
            f"the warm-up folded {collector.n_micro_batches} micro-batches with finite gradients; DSCA needs at least "
            "2: raise `warmup_steps` or check the batches"
        )
    return collector, dsca


def _probe(
    peft_model, space, collector, train_batches, eval_batches, config, seeds, compute_loss, progress, adapter_name
):
    """(gain model, loss model) over the search space, from the configured probe kind."""
    if config.probe == "taylor":
        # lr = 1: the hypothetical step size scales every candidate alike and does not change the ranking.
        results = taylor_probe(space, gradient_projections(collector.history()), lr=1.0)
        return models_from_probes(results, space.n_candidates_per_node, base_accuracy=0.0, base_loss=0.0)
    probe = finetune_probe if config.probe == "finetune" else regression_probe
    report = probe(
        peft_model, space, train_batches, eval_batches, probe_steps=config.probe_steps, lr=config.probe_lr,
        seed=seeds["probing"], compute_loss=compute_loss, progress=progress, adapter_name=adapter_name,
        **({"probe_repeats": config.probe_repeats} if config.probe == "finetune" else {}),
    )
    _, loss_model = report.models(space.n_candidates_per_node)
    # Search on the predicted loss decrease: accuracy on a few probe batches moves in coarse steps, loss smoothly.
    gain_model = AdditiveModel(
        base=-loss_model.base, deltas=tuple(-d for d in loss_model.deltas), spread=loss_model.spread
    )
    return gain_model, loss_model


def _block_table(grids, nodes, energy) -> BlockTable:
    """The search's block table, row for row in the collector's node order."""
    names = tuple(name for name, _ in nodes)
    ids = np.array([block for _, block in nodes], dtype=np.int64)
    sizes = np.array([grids[name].numel([block]) for name, block in nodes], dtype=np.int64)
    return BlockTable(module_names=names, block_ids=ids, sizes=sizes, energy=np.asarray(energy, dtype=float))


def _module_record(module, nodes) -> dict:
    return {
        "label": int(module.label),
        "blocks": [list(nodes[i]) for i in module.nodes.tolist()],
        "n_params": module.n_params,
        "mean_energy": module.mean_energy,
        "stability": module.stability,
    }


def _candidate_records(space, gain_model, loss_model) -> list[dict]:
    records = []
    for n, node in enumerate(space.nodes):
        for c, candidate in enumerate(node.candidates):
            records.append({
                "node": node.name, "candidate": c, "module": candidate.module, "size": int(candidate.size),
                "blocks": {k: list(v) for k, v in candidate.blocks.items()},
                "predicted_gain": float(gain_model.deltas[n][c]),
                "predicted_loss_delta": float(loss_model.deltas[n][c]),
                "spread": None if gain_model.spread is None else float(gain_model.spread[n][c]),
            })
    return records


def _diagnostics(dsca) -> dict:
    last = dsca.history_[-1] if dsca.history_ else {}
    return {
        "eigenvalues": [float(v) for v in dsca.eigenvalues_],
        "energy_concentration": last.get("energy_concentration"),
        "stability_ari": last.get("ari_previous"),
        "stability_nmi": last.get("nmi_previous"),
        "subspace_drift": last.get("subspace_drift"),
        "eigengap": last.get("eigengap"),
        "history": dsca.history_,
    }


def _broadcast(selection: dict) -> dict:
    """Under torch.distributed every rank takes rank 0's selection (probes may differ per rank's batches)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return selection
    box = [selection]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _layer(name: str) -> int:
    index = layer_index(name)
    return -1 if index is None else index
