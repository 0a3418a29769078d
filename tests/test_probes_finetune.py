"""The probes that train the model ("finetune", "regression"): exact restore, determinism, sensible deltas."""

import math

import numpy as np
import pytest
import torch
from model_state import assert_same, fingerprint, tiny_bert, tiny_space, token_batches

from mftc_peft.predictor import predictor_fidelity
from mftc_peft.probes_finetune import finetune_probe, regression_probe
from mftc_peft.search import BlockTable, build_search_space


def _space():
    names = [f"encoder.layer.{l}.query" for l in (0, 0, 1, 1)]
    table = BlockTable(tuple(names), np.array([0, 1, 0, 1]), np.full(4, 8), np.array([1.0, 2.0, 3.0, 4.0]))
    return build_search_space([[0, 1], [1], [2, 3], [3]], table)


def test_finetune_probe_leaves_model_bit_identical_and_is_deterministic():
    model = tiny_bert()
    space = tiny_space(model)
    all_weights = {n: p.detach().clone() for n, p in model.named_parameters()}  # frozen base weights too
    before = fingerprint(model)
    kwargs = dict(probe_steps=3, probe_repeats=2, lr=1e-2, seed=0, progress=False)
    report = finetune_probe(model, space, token_batches(4, seed=1), token_batches(2, seed=2), **kwargs)
    assert_same(before, fingerprint(model))
    assert all(torch.equal(p, all_weights[n]) for n, p in model.named_parameters())
    again = finetune_probe(model, space, token_batches(4, seed=1), token_batches(2, seed=2), **kwargs)
    assert again.results == report.results and again.base_loss == report.base_loss


def test_finetune_probe_deltas_are_finite_and_none_is_zero():
    model = tiny_bert()
    space = tiny_space(model)
    train, held_out = token_batches(4, seed=1), token_batches(2, seed=2)
    report = finetune_probe(model, space, train, held_out, probe_steps=3, probe_repeats=2, lr=1e-2, progress=False)
    counts = space.n_candidates_per_node
    assert sorted((r.node, r.candidate) for r in report.results) == [(i, c) for i, k in enumerate(counts)
                                                                    for c in range(k)]
    for r in report.results:
        values = [r.accuracy_delta, r.loss_delta, r.accuracy_spread, r.loss_spread]
        assert all(math.isfinite(v) for v in values) and r.accuracy_spread >= 0 and r.n_repeats == 2
        if r.candidate == 0:
            assert r.accuracy_delta == 0.0 and r.loss_delta == 0.0 and r.loss_spread == 0.0
    assert any(r.loss_delta != 0.0 for r in report.results if r.candidate)  # candidates do change something
    assert 0.0 <= report.base_accuracy <= 1.0 and report.base_loss > 0
    n_probes = 2 * (1 + sum(k - 1 for k in counts))
    budget = report.budget
    assert (budget.probes, budget.backward_passes, budget.forward_passes) == (n_probes, 3 * n_probes, 5 * n_probes)
    accuracy, loss = report.models(counts)
    assert loss.predict(np.zeros(len(counts), dtype=int))[0] == report.base_loss


def test_probe_restores_the_model_when_an_exception_escapes_mid_probe():
    model = tiny_bert()
    space = tiny_space(model)
    before = fingerprint(model)
    calls = []

    def failing_loss(m, batch):
        calls.append(1)
        if len(calls) == 5:  # inside the second probe's training
            raise RuntimeError("loss exploded")
        return m(**batch).loss

    with pytest.raises(RuntimeError, match="loss exploded"):
        finetune_probe(model, space, token_batches(3, seed=1), token_batches(1, seed=2), probe_steps=2, probe_repeats=1,
                       compute_loss=failing_loss, progress=False)
    assert_same(before, fingerprint(model))


def test_regression_probe_recovers_a_sensible_additive_model():
    model = tiny_bert()
    space = tiny_space(model)
    train, held_out = token_batches(4, seed=1), token_batches(3, seed=2)
    before = fingerprint(model)
    n_all = math.prod(space.n_candidates_per_node)  # 9: every architecture once
    kwargs = dict(probe_steps=4, lr=1e-2, dropout=False, progress=False)
    report = regression_probe(model, space, train, held_out, n_architectures=n_all, alpha=1e-6, **kwargs)
    assert_same(before, fingerprint(model))
    assert report.architectures.shape == (n_all, len(space.nodes))
    accuracy, loss = report.models(space.n_candidates_per_node)
    fitted = loss.predict(report.architectures)
    # Nearly additive: the fit explains most of the variation, and the all-"none" architecture (N_e) is close.
    assert predictor_fidelity(fitted, report.measured_loss).r2 > 0.8
    none = np.flatnonzero((report.architectures == 0).all(axis=1))[0]
    assert report.base_loss == pytest.approx(report.measured_loss[none], abs=0.05)
    # The regression's per-candidate loss deltas agree in sign with probing each candidate alone.
    single = finetune_probe(model, space, train, held_out, probe_repeats=1, seed=0, **kwargs)
    probed = {(r.node, r.candidate): r.loss_delta for r in single.results if r.candidate}
    fitted_deltas = {(r.node, r.candidate): r.loss_delta for r in report.results if r.candidate}
    assert np.corrcoef([probed[k] for k in probed], [fitted_deltas[k] for k in probed])[0, 1] > 0.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"probe_steps": 0}, r"`probe_steps` must be a positive integer, got 0"),
        ({"probe_repeats": 1.5}, r"`probe_repeats` must be a positive integer, got 1.5"),
        ({"lr": -1.0}, r"`lr` must be a positive number, got -1.0"),
        ({"space": "space"}, r"`space` must be a SearchSpace, got str"),
        ({"train_batches": []}, r"`train_batches` must be a non-empty sequence of batch dicts"),
        ({"adapter_name": "other"}, r"`adapter_name` must be one of \['default'\], got 'other'"),
        ({"optimizer": "adam"}, r"`optimizer` must be one of \('adamw', 'sgd'\), got 'adam'"),
    ],
)
def test_finetune_probe_validation(kwargs, match):
    model = tiny_bert()
    args = {"space": _space(), "train_batches": token_batches(1, seed=1), "eval_batches": token_batches(1, seed=2),
            **kwargs}
    with pytest.raises(ValueError, match=match):
        finetune_probe(model, args.pop("space"), args.pop("train_batches"), args.pop("eval_batches"), **args,
                       progress=False)


@pytest.mark.parametrize("probe", [finetune_probe, regression_probe])
def test_dropout_masks_come_from_the_seed_not_the_global_rng(probe):
    """Issue 13 item 7: with dropout on, the same `seed` gives the same results whatever torch's global RNG holds, a
    different seed different ones, and the caller's global RNG state is left as it was."""
    model = tiny_bert()  # dropout 0.1, in train mode
    space = tiny_space(model)
    kwargs = dict(probe_steps=3, lr=1e-2, dropout=True, progress=False)

    def run(global_seed, seed):
        torch.manual_seed(global_seed)  # test code may seed globally; the library never does
        state = torch.get_rng_state()
        report = probe(model, space, token_batches(4, seed=1), token_batches(2, seed=2), seed=seed, **kwargs)
        assert torch.equal(torch.get_rng_state(), state)
        return report.results, report.base_loss

    first = run(1, seed=0)
    assert run(2, seed=0) == first
    assert run(1, seed=1) != first
