"""The warm-up's measuring half, and the one way to measure block gradients: `measure_blocks`.

On `warmup_steps` real batches: (optionally) fit a new head alone, run backward passes with hooks on the target
weights that reduce every weight gradient to per-block statistics (`SignatureCollector`), and update DSCA every
`dsca_every` micro-batches. The result is a `BlockMeasurement`: the block table (energy = accumulated squared gradient),
DSCA's module library and the fitted estimator, and the taylor probe's projections when the module search needs them
(or a caller asks: `keep_projections`). `warmup` chooses on it; studies compare other selections on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .context import WarmupRun
from .dsca import DynamicSpectralClustering
from .model import mftc_tuner
from .probes import gradient_projections
from .search import BlockTable
from .signatures import SignatureCollector
from .state import adapter_name_of, head_parameters, preserved_state
from .training import deterministic_mode

logger = logging.getLogger(__name__)

PROBE_EVAL_BATCHES = 2  # held-out batches a training probe evaluates on


@dataclass
class BlockMeasurement:
    """What the warm-up measured.

    table : one row per block (every block of the adapter's grids), energy = accumulated squared gradient.
    projections : (micro-batches, blocks) inputs of the taylor probe; None unless asked for (`keep_projections`) or
        the config needs them (`needs_projections`).
    library : DSCA's modules as rows of `table`.
    timings : seconds per stage ('head', 'signatures', 'dsca').
    dsca : the fitted `DynamicSpectralClustering` (labels, modules, graph, diagnostics).
    train_batches / eval_batches : the micro-batches measured on, and the held-out batches of the training probes.
    """

    table: BlockTable
    projections: Optional[np.ndarray]
    library: list
    timings: dict
    dsca: DynamicSpectralClustering
    train_batches: list
    eval_batches: list


def measure_blocks(
    peft_model, train_dataloader: Iterable, *, compute_loss: Optional[Callable] = None,
    adapter_name: Optional[str] = None, progress: bool = False, keep_projections: Optional[bool] = None,
) -> BlockMeasurement:
    """The warm-up's measurement alone (head fit, block gradients, DSCA) on `warmup_steps` batches of
    `train_dataloader`, without probing, search or injection; the model is left exactly as it was.

    keep_projections : also collect the taylor probe's projections (a sketch of every block's gradient per
        micro-batch). None: only when the adapter's config needs them (`allocation="search"` with `probe="taylor"`).
    """
    adapter_name = adapter_name_of(mftc_tuner(peft_model), adapter_name)
    run = WarmupRun(peft_model, adapter_name, mftc_tuner(peft_model).peft_config[adapter_name],
                    compute_loss=compute_loss, progress=progress)
    with preserved_state(peft_model, adapter_name=adapter_name):
        return measure(run, train_dataloader, keep_projections=keep_projections)


def needs_projections(config) -> bool:
    """Whether the warm-up's choice uses the taylor probe's projections: only the module search's taylor probe."""
    return config.allocation == "search" and config.probe == "taylor"


def measure(run: WarmupRun, train_dataloader: Iterable, eval_dataloader: Optional[Iterable] = None, *,
            keep_projections: Optional[bool] = None):
    """`measure_blocks` for a caller that restores the model's state itself."""
    tuner = mftc_tuner(run.peft_model)
    layers = dict(tuner.mftc_layers(run.adapter_name))
    if not layers:
        raise ValueError(f"adapter {run.adapter_name!r} has no MFTC layer to warm up")
    grids = {name: layer.mftc_grid[run.adapter_name] for name, layer in layers.items()}
    device = next(run.peft_model.parameters()).device
    train_batches, eval_batches = _split_batches(run.config, train_dataloader, eval_dataloader, device)
    _fit_head(run, train_batches)
    if keep_projections is None:
        keep_projections = needs_projections(run.config)
    collector, dsca = _collect(run, layers, grids, train_batches, keep_projections)
    energy = collector.block_energy()
    bounds = np.cumsum([0] + [grid.n_blocks for grid in grids.values()])
    table = BlockTable.from_grids(grids, {name: energy[a:b] for name, a, b in zip(grids, bounds[:-1], bounds[1:])})
    return BlockMeasurement(
        table=table,
        projections=gradient_projections(collector.history()) if collector.keep_history else None,
        library=[module.nodes.tolist() for module in dsca.modules_],
        timings=run.timings, dsca=dsca, train_batches=train_batches, eval_batches=eval_batches,
    )


def _batches(dataloader: Iterable, n: int, device, name: str = "train_dataloader") -> Iterable[dict]:
    """`n` batches, cycling through the dataloader if it is shorter, moved to the model's device."""
    produced = 0
    while produced < n:
        before = produced
        for batch in dataloader:
            yield _to_device(batch, device, name, produced)
            produced += 1
            if produced == n:
                return
        if produced == before:
            raise ValueError(_exhausted(name, produced, n))


def _exhausted(name: str, produced: int, n: int) -> str:
    if produced == 0:
        return f"`{name}` yielded no batch"
    # A generator or iterator is empty on its second pass, so it cannot be cycled.
    return (
        f"`{name}` must yield {n} batches or be re-iterable (a list or a DataLoader, which is cycled), got "
        f"{produced} batches and then none on the next pass (a one-shot generator or iterator?)"
    )


def _to_device(batch, device, name: str, index: int) -> dict:
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"`{name}` must yield dicts of model inputs (e.g. input_ids, attention_mask, labels), got a "
            f"{type(batch).__name__} as batch {index}"
        )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _split_batches(config, train_dataloader, eval_dataloader, device) -> tuple[list[dict], list[dict]]:
    """The warm-up's micro-batches and, for the training probes, held-out probe batches."""
    n_eval = 0 if config.probe == "taylor" else PROBE_EVAL_BATCHES
    if eval_dataloader is not None and n_eval:
        train = list(_batches(train_dataloader, config.warmup_steps, device))
        return train, list(_batches(eval_dataloader, n_eval, device, "eval_dataloader"))
    batches = list(_batches(train_dataloader, config.warmup_steps + n_eval, device))
    return batches[: config.warmup_steps], batches[config.warmup_steps :]


def _fit_head(run: WarmupRun, batches: list[dict]) -> None:
    """Fit the adapter's new head (if any) alone for `head_warmup_steps` Adam steps on the warm-up batches.

    A random head sends the blocks a random direction of its input, so their gradients say little about the task;
    once the head separates the classes they do (the head-first idea of LP-FT, Kumar et al. 2022). The caller's
    `preserved_state` puts the head back, so training still starts from the user's initialisation.
    """
    head = head_parameters(run.peft_model, run.adapter_name)
    if not head or run.config.head_warmup_steps == 0:
        return
    for param in run.peft_model.parameters():
        param.requires_grad_(False)
    for param in head:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(head, lr=run.config.head_warmup_lr)
    with run.timed("head"), deterministic_mode(run.peft_model):
        for step in range(run.config.head_warmup_steps):
            loss = run.loss(batches[step % len(batches)])
            if torch.isfinite(loss):
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def weight_gradients_only(peft_model, layers: dict, grids: dict) -> dict:
    """Make the adapted base weights the only tensors that require grad; returns the `SignatureCollector` targets.
    The caller runs the passes under `deterministic_mode` and restores the model's state (`preserved_state`)."""
    for param in peft_model.parameters():
        param.requires_grad_(False)
    targets = {
        name: (layer.get_base_layer().weight, grids[name], layer.fan_in_fan_out) for name, layer in layers.items()
    }
    for weight, _, _ in targets.values():
        weight.requires_grad_(True)
    return targets


def _collect(run: WarmupRun, layers: dict, grids: dict, batches: list[dict], keep_projections: bool):
    """Warm-up backward passes: per-block signatures from hooks on the target weights, DSCA every `dsca_every`.

    Only the target weights require grad meanwhile (the caller's `preserved_state` restores every flag), and the model
    is in eval mode, so the measurement is deterministic given the batches.
    """
    config, seeds = run.config, run.seeds
    targets = weight_gradients_only(run.peft_model, layers, grids)
    m = sum(grid.n_blocks for grid in grids.values())
    dsca = DynamicSpectralClustering(
        n_clusters=min(config.n_clusters, m), embed_dim=min(config.embed_dim, max(m - 1, 1)),
        ema_decay=config.ema_decay, similarity=config.similarity, n_neighbors=config.n_neighbors,
        reset_every=config.reset_every, min_module_size=config.min_module_size,
        max_module_size=config.max_module_size, random_state=seeds["clustering"],
    )
    outside_rank = config.low_rank if config.block_energy == "outside_low_rank" else 0
    collector = SignatureCollector(
        targets, kind=config.signature_kind, window=config.signature_window, seed=seeds["signatures"],
        keep_history=keep_projections, residual_rank=outside_rank,
    )
    folded_at_update = 0  # micro-batches folded in at the last DSCA update: no update without new ones
    with collector, deterministic_mode(run.peft_model):
        for step, batch in enumerate(tqdm(batches, desc="MFTC warm-up", disable=not run.progress, leave=False)):
            with run.timed("signatures"):
                loss = run.loss(batch)
                if torch.isfinite(loss):
                    loss.backward()
                    collector.end_micro_batch()
                else:  # skipped, but the update below still runs: the last micro-batch's update must not be lost
                    logger.warning("MFTC warm-up: skipping micro-batch %d with a non-finite loss", step)
            last = step == len(batches) - 1
            fresh = collector.n_micro_batches > folded_at_update
            if fresh and collector.n_micro_batches >= 2 and ((step + 1) % config.dsca_every == 0 or last):
                folded_at_update = collector.n_micro_batches
                _check_some_gradient(collector)
                with run.timed("dsca"):
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


def _check_some_gradient(collector: SignatureCollector) -> None:
    """All-zero block gradients leave DSCA nothing to cluster; say why that happens instead of DSCA's own error."""
    if not np.any(collector.block_energy()):
        raise ValueError(
            f"every block gradient was zero over the {collector.n_micro_batches} warm-up micro-batches: the loss does "
            "not depend on the target weights (e.g. the batches hold a single class, whose cross-entropy over one "
            "label is 0, or `compute_loss` returns a constant); check the labels, `num_labels` and the loss"
        )
