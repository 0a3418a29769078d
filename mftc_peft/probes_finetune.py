"""Probes that train the model: "finetune" (one candidate at a time) and "regression" (random architectures jointly).

Both measure against the base network N_e: the classification head (the PEFT `modules_to_save` parameters) trained
alone for the same steps, from the same starting point, on the same batches. A probe run

1. takes a snapshot of everything it could change (`preserved_state`),
2. per probe: selects the blocks (`set_block_selection`, zero deltas), makes only the head and those blocks trainable,
   trains `probe_steps` steps on warm-up batches, evaluates loss and accuracy on held-out probe batches,
3. restores the snapshot exactly, after every probe and after the run, also when an exception escapes.

Batch orders come from a numpy Generator seeded by `seed`; dropout masks from a torch seed drawn from a child of that
Generator (spawned, so the batch orders are the same as without it), one per repeat: every candidate of a repeat sees
the same masks, so deltas are paired differences. Results are therefore deterministic given `seed` alone (and so, in
the warm-up, given `MFTCConfig.seed`). Torch's global RNG, which dropout draws from, is forked around each probe and
restored, so the caller's RNG state is left as it was.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .model import mftc_tuner
from .checks import check_int, check_number, check_positive_number, check_rng
from .predictor import AdditiveModel, ProbeResult, fit_additive_model, sample_architectures
from .predictor import models_from_probes
from .search import SearchSpace
from .state import adapter_name_of, head_parameters, preserved_state
from .training import (
    OPTIMIZERS,
    LossFn,
    TrainLog,
    deterministic_mode,
    evaluate,
    train_steps,
)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ProbeBudget:
    """What probing cost: probes run, forward and backward passes (one per batch), wall seconds."""

    probes: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ProbeReport:
    """A probe run: one `ProbeResult` per candidate (the "none" candidates included, with deltas exactly 0; leave them
    out before `models_from_probes`, as `models` does), the base network's absolute accuracy and loss, and the budget
    spent. `architectures` and `measured_*` hold what the "regression" kind trained (empty for "finetune")."""

    kind: str
    results: tuple[ProbeResult, ...]
    base_accuracy: float
    base_loss: float
    budget: ProbeBudget
    architectures: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64), repr=False)
    measured_accuracy: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    measured_loss: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def models(self, n_candidates_per_node: Sequence[int]) -> tuple[AdditiveModel, AdditiveModel]:
        """(accuracy model, loss model) for the search: `models_from_probes` over the non-"none" results with this
        run's base values."""
        return models_from_probes(
            [r for r in self.results if r.candidate != 0],
            n_candidates_per_node,
            base_accuracy=self.base_accuracy,
            base_loss=self.base_loss,
        )


@dataclass
class _Settings:
    steps: int
    lr: float
    head_lr: float
    optimizer: str
    weight_decay: float
    dropout: bool
    compute_loss: LossFn | None


def _check_common(peft_model, space, train_batches, eval_batches, probe_steps, lr, head_lr, optimizer, adapter_name):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not isinstance(space, SearchSpace):
        raise ValueError(f"`space` must be a SearchSpace, got {type(space).__name__}")
    if not isinstance(train_batches, Sequence) or len(train_batches) == 0:
        raise ValueError(f"`train_batches` must be a non-empty sequence of batch dicts, got {train_batches!r:.80}")
    if not isinstance(eval_batches, Sequence) or len(eval_batches) == 0:
        raise ValueError(f"`eval_batches` must be a non-empty sequence of batch dicts, got {eval_batches!r:.80}")
    check_int("probe_steps", probe_steps)
    check_positive_number("lr", lr)
    if head_lr is not None:
        check_positive_number("head_lr", head_lr)
    mftc = mftc_tuner(peft_model)
    return mftc, adapter_name_of(mftc, adapter_name)


def _batch_order(rng: np.random.Generator, n_batches: int, steps: int) -> np.ndarray:
    """`steps` batch indices: whole random permutations of the batches, concatenated and cut."""
    rounds = -(-steps // n_batches)
    return np.concatenate([rng.permutation(n_batches) for _ in range(rounds)])[:steps]


@dataclass(frozen=True)
class SelectionMeasurement:
    """`measure_selection`'s outcome: held-out loss and accuracy after training, and the training log."""

    loss: float
    accuracy: float
    train: TrainLog


def measure_selection(
    peft_model: nn.Module,
    selection: Mapping[str, Sequence[int]],
    train_batches: Iterable[Mapping[str, torch.Tensor]],
    eval_batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    head_lr: float | None = None,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    schedule: str = "constant",
    dropout: bool = True,
    compute_loss: LossFn | None = None,
    adapter_name: str | None = None,
    dropout_seed: int | None = None,
) -> SelectionMeasurement:
    """Train the head plus exactly the blocks of `selection` ({full module name: block ids}; {} is N_e) for `steps`
    steps from the model's current head and zero deltas, evaluate on `eval_batches`, and restore the model exactly.

    The building block of the probes, and of "measure an architecture for real" in benchmarks (with more steps and a
    `schedule="linear"` decay). `head_lr` defaults to `lr`. `dropout_seed` (a non-negative int) seeds the dropout
    masks of the training steps; None draws them from torch's global RNG as it stands.
    """
    check_int("steps", steps)
    check_positive_number("lr", lr)
    mftc = mftc_tuner(peft_model)
    adapter = adapter_name_of(mftc, adapter_name)
    with preserved_state(peft_model, adapter_name=adapter):
        mftc.set_block_selection(selection, adapter, init_weights=True)
        deltas = [layer.mftc_delta[adapter] for _, layer in mftc.mftc_layers(adapter)]
        deltas = [d for d in deltas if d.numel() > 0]
        head = head_parameters(peft_model, adapter)
        for p in peft_model.parameters():
            p.requires_grad_(False)
        for p in head + deltas:
            p.requires_grad_(True)
        groups = [g for g in ({"params": head, "lr": head_lr or lr}, {"params": deltas, "lr": lr}) if g["params"]]
        if dropout:
            peft_model.train()
        log = TrainLog((), 0, 0.0)
        if groups:
            mode = contextlib.nullcontext() if dropout else deterministic_mode(peft_model)
            with _torch_rng(dropout_seed), mode:
                log = train_steps(
                    peft_model, train_batches, params=groups, lr=lr, steps=steps, optimizer=optimizer,
                    weight_decay=weight_decay, schedule=schedule, compute_loss=compute_loss,
                )
        loss, accuracy = evaluate(peft_model, eval_batches, compute_loss=compute_loss)
    return SelectionMeasurement(loss, accuracy, log)


@contextlib.contextmanager
def _torch_rng(seed: int | None):
    """Torch's global RNG (dropout's only source) seeded with `seed` inside, and put back as it was on exit."""
    if seed is None:
        yield
        return
    check_int("dropout_seed", seed, minimum=0)
    # torch.manual_seed also seeds every CUDA device (lazily if CUDA is not initialised yet), so their states are
    # forked too: the caller's CUDA RNG must come back as it was, like the CPU one.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _dropout_seeds(rng: np.random.Generator):
    """Torch seeds for the dropout masks, from a spawned child of `rng`: drawing them leaves `rng`'s stream (the batch
    orders) exactly as it would be without them, so models without dropout select the same as before."""
    child = rng.spawn(1)[0]
    while True:
        yield int(child.integers(2**63 - 1))


def _probe_once(peft_model, mftc, adapter, selection, order, train_batches, eval_batches, s: _Settings, counter,
                dropout_seed: int | None = None):
    """One probe: `measure_selection` on the batches in `order`, counted. Returns (loss, accuracy)."""
    m = measure_selection(
        peft_model, selection, (train_batches[k] for k in order), eval_batches, steps=len(order), lr=s.lr,
        head_lr=s.head_lr, optimizer=s.optimizer, weight_decay=s.weight_decay, dropout=s.dropout,
        compute_loss=s.compute_loss, adapter_name=adapter, dropout_seed=dropout_seed,
    )
    counter["forward"] += m.train.steps + len(eval_batches)
    counter["backward"] += m.train.steps
    counter["probes"] += 1
    return m.loss, m.accuracy


def _budget(counter, start: float) -> ProbeBudget:
    return ProbeBudget(counter["probes"], counter["forward"], counter["backward"], time.perf_counter() - start)


def _spread(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if values.size > 1 else 0.0


# --------------------------------------------------------------------------------------------------------- finetune
def finetune_probe(
    peft_model: nn.Module,
    space: SearchSpace,
    train_batches: Sequence[Mapping[str, torch.Tensor]],
    eval_batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    probe_steps: int = 10,
    probe_repeats: int = 2,
    lr: float = 1e-3,
    head_lr: float | None = None,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    dropout: bool = True,
    seed=0,
    compute_loss: LossFn | None = None,
    adapter_name: str | None = None,
    progress: bool = True,
) -> ProbeReport:
    """The paper's probing: train the head plus one candidate's blocks, for every candidate, and compare with N_e.

    Parameters
    ----------
    peft_model : PeftModel with an MFTC adapter (not merged)
        Left exactly as it was (see `preserved_state`). Probes start from its current head and from zero deltas.
    space : SearchSpace
        Candidates to probe; candidate 0 ("none") of every node is N_e itself and gets deltas of exactly 0.
    train_batches, eval_batches : sequences of batch dicts (with `labels`)
        Warm-up batches to train on and held-out probe batches to evaluate on.
    probe_steps, probe_repeats : int
        Optimiser steps per probe, and repeats with different batch orders (the spread is the standard deviation of
        the paired deltas over repeats; 0 with one repeat). Every candidate and N_e share each repeat's order.
    lr, head_lr, optimizer, weight_decay :
        Optimiser of the probes ("adamw" or "sgd"); `head_lr` defaults to `lr`.
    dropout : bool
        Train in train mode (dropout on; every candidate of a repeat sees the same masks) or in eval mode.
    seed : int or numpy Generator
        Source of the batch orders and of the dropout masks.

    Cost: probe_repeats x (1 + number of non-"none" candidates) probes of probe_steps forward/backward passes plus
    len(eval_batches) forward passes each; logged at INFO level and returned in `report.budget`.
    """
    mftc, adapter = _check_common(peft_model, space, train_batches, eval_batches, probe_steps, lr, head_lr,
                                  optimizer, adapter_name)
    probe_repeats = check_int("probe_repeats", probe_repeats)
    rng = check_rng("seed", seed)
    dropout_seeds = _dropout_seeds(rng)
    s = _Settings(int(probe_steps), float(lr), float(head_lr or lr), optimizer, weight_decay, bool(dropout),
                  compute_loss)
    keys = list(iter_candidates(space))
    counter, start = {"probes": 0, "forward": 0, "backward": 0}, time.perf_counter()
    base = np.zeros((probe_repeats, 2))  # (repeats, [loss, accuracy])
    measured = np.zeros((probe_repeats, len(keys), 2))
    bar = tqdm(total=probe_repeats * (1 + len(keys)), desc="finetune probe", disable=not progress)
    with preserved_state(peft_model, adapter_name=adapter), bar:
        for r in range(probe_repeats):
            order, masks = _batch_order(rng, len(train_batches), s.steps), next(dropout_seeds)
            base[r] = _probe_once(peft_model, mftc, adapter, {}, order, train_batches, eval_batches, s, counter,
                                  masks)
            bar.update(1)
            for k, (i, c) in enumerate(keys):
                blocks = space.nodes[i].candidates[c].blocks
                measured[r, k] = _probe_once(peft_model, mftc, adapter, blocks, order, train_batches, eval_batches,
                                             s, counter, masks)
                bar.update(1)
    deltas = measured - base[:, None, :]  # (repeats, candidates, [loss, accuracy]), paired per repeat
    results = [ProbeResult(i, 0, 0.0, 0.0, n_repeats=probe_repeats) for i in range(len(space.nodes))]
    results += [
        ProbeResult(i, c, float(deltas[:, k, 1].mean()), float(deltas[:, k, 0].mean()),
                    accuracy_spread=_spread(deltas[:, k, 1]), loss_spread=_spread(deltas[:, k, 0]),
                    n_repeats=probe_repeats)
        for k, (i, c) in enumerate(keys)
    ]
    budget = _budget(counter, start)
    _log_budget("finetune", budget)
    return ProbeReport("finetune", tuple(results), float(base[:, 1].mean()), float(base[:, 0].mean()), budget)


def _log_budget(kind: str, budget: ProbeBudget) -> None:
    logger.info(
        "%s probe: %d probes, %d forward / %d backward passes, %.1f s",
        kind, budget.probes, budget.forward_passes, budget.backward_passes, budget.seconds,
    )


# ------------------------------------------------------------------------------------------------------- regression
def regression_probe(
    peft_model: nn.Module,
    space: SearchSpace,
    train_batches: Sequence[Mapping[str, torch.Tensor]],
    eval_batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    n_architectures: int | None = None,
    probe_steps: int = 10,
    lr: float = 1e-3,
    head_lr: float | None = None,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    dropout: bool = True,
    alpha: float = 1e-2,
    seed=0,
    compute_loss: LossFn | None = None,
    adapter_name: str | None = None,
    progress: bool = True,
) -> ProbeReport:
    """Train random architectures (one candidate per node) jointly, then fit the additive model by least squares.

    For when nodes x candidates is too many to probe one by one. `n_architectures` defaults to twice the number of
    coefficients (1 + non-"none" candidates), capped at the number of distinct architectures; all share one batch
    order. Accuracy and loss are each fitted with `fit_additive_model` (ridge `alpha` on the deltas); a delta's spread
    is its standard error (0 when there are no spare degrees of freedom). The base values are the fitted intercepts.
    Other arguments as for `finetune_probe`.
    """
    mftc, adapter = _check_common(peft_model, space, train_batches, eval_batches, probe_steps, lr, head_lr,
                                  optimizer, adapter_name)
    counts = space.n_candidates_per_node
    total = math.prod(counts)
    if n_architectures is None:
        n_architectures = min(total, 2 * (1 + sum(c - 1 for c in counts)))
    if not (isinstance(n_architectures, numbers.Integral) and not isinstance(n_architectures, bool)
            and 2 <= n_architectures <= total):
        raise ValueError(f"`n_architectures` must be an integer in 2..{total}, got {n_architectures!r}")
    alpha = check_number("alpha", alpha, minimum=0)
    rng = check_rng("seed", seed)
    masks = next(_dropout_seeds(rng))  # one set of masks for all architectures, as they share one batch order
    s = _Settings(int(probe_steps), float(lr), float(head_lr or lr), optimizer, weight_decay, bool(dropout),
                  compute_loss)
    arch = sample_architectures(counts, int(n_architectures), rng)
    order = _batch_order(rng, len(train_batches), s.steps)
    counter, start = {"probes": 0, "forward": 0, "backward": 0}, time.perf_counter()
    measured = np.zeros((len(arch), 2))
    with preserved_state(peft_model, adapter_name=adapter):
        for a, row in enumerate(tqdm(arch, desc="regression probe", disable=not progress)):
            measured[a] = _probe_once(peft_model, mftc, adapter, space.selection(row), order, train_batches,
                                      eval_batches, s, counter, masks)
    accuracy = fit_additive_model(arch, measured[:, 1], n_candidates_per_node=counts, alpha=float(alpha))
    loss = fit_additive_model(arch, measured[:, 0], n_candidates_per_node=counts, alpha=float(alpha))
    results = []
    for i, count in enumerate(counts):
        for c in range(count):
            sd = [0.0 if m.spread is None else float(m.spread[i][c]) for m in (accuracy, loss)]
            results.append(ProbeResult(i, c, float(accuracy.deltas[i][c]), float(loss.deltas[i][c]),
                                       accuracy_spread=sd[0], loss_spread=sd[1]))
    budget = _budget(counter, start)
    _log_budget("regression", budget)
    return ProbeReport("regression", tuple(results), accuracy.base, loss.base, budget, arch, measured[:, 1].copy(),
                       measured[:, 0].copy())


def iter_candidates(space: SearchSpace) -> Iterator[tuple[int, int]]:
    """(node, candidate) pairs of every non-"none" candidate, in probing order."""
    for i, node in enumerate(space.nodes):
        for c in range(1, len(node.candidates)):
            yield i, c
