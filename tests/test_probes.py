"""Taylor probe: first-order loss decrease per candidate from per-block gradient statistics."""

import contextlib
import math

import numpy as np
import pytest

from mftc_peft.probes import gradient_projections, taylor_probe
from mftc_peft.search import BlockTable, build_search_space, models_from_probes, predictor_fidelity


def _space():
    names = [f"encoder.layer.{l}.query" for l in (0, 0, 1, 1)]
    table = BlockTable(tuple(names), np.array([0, 1, 0, 1]), np.full(4, 8), np.array([1.0, 2.0, 3.0, 4.0]))
    return build_search_space([[0, 1], [1], [2, 3], [3]], table)


def test_projections_average_to_squared_mean_gradient():
    g = np.random.default_rng(0).normal(size=(5, 4, 3))  # (T, blocks, d)
    p = gradient_projections(g)
    assert p.shape == (5, 4)
    np.testing.assert_allclose(p.mean(axis=0), (g.mean(axis=0) ** 2).sum(axis=1))


def test_taylor_probe_hand_example():
    p = np.array([[1.0, 2.0, 0.5, 0.0], [3.0, 2.0, 0.5, 1.0]])  # (T=2, 4 blocks)
    results = taylor_probe(_space(), p, lr=0.1)
    by_key = {(r.node, r.candidate): r for r in results}
    # Layer 0: candidates ranked by energy: module 0 (rows 0, 1), then module 1 (row 1).
    both = by_key[(0, 1)]
    assert both.loss_delta == pytest.approx(-0.1 * (2.0 + 2.0))  # column means 2.0 and 2.0
    assert both.accuracy_delta == pytest.approx(-both.loss_delta)
    # Per-batch sums 3 and 5: std (ddof=1) sqrt(2), standard error sqrt(2)/sqrt(2) = 1.
    assert both.loss_spread == pytest.approx(0.1 * 1.0) and both.n_repeats == 2
    assert by_key[(0, 2)].loss_delta == pytest.approx(-0.2) and by_key[(0, 2)].loss_spread == pytest.approx(0.0)
    assert by_key[(1, 1)].loss_delta == pytest.approx(-0.1 * (0.5 + 0.5))
    assert by_key[(1, 1)].loss_spread == pytest.approx(0.1 * math.sqrt(0.5) / math.sqrt(2))


def test_taylor_probe_matches_direct_gradients_and_fills_predictor():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(6, 4, 5))
    space = _space()
    results = taylor_probe(space, gradient_projections(g), lr=0.01)
    gbar = g.mean(axis=0)
    for r in results:
        rows = list(space.nodes[r.node].candidates[r.candidate].rows)
        assert r.loss_delta == pytest.approx(-0.01 * (gbar[rows] ** 2).sum())
    acc, loss = models_from_probes(results, space.n_candidates_per_node, base_accuracy=0.5, base_loss=0.7)
    assert loss.predict([0, 0])[0] == 0.7 and np.all(loss.predict([[1, 1], [2, 2]]) <= 0.7)


def test_taylor_probe_single_batch_has_zero_spread():
    results = taylor_probe(_space(), np.ones((1, 4)), lr=1.0)
    assert all(r.loss_spread == 0.0 and r.n_repeats == 1 for r in results)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s: taylor_probe(s, np.ones((2, 4)), lr=0), r"`lr` must be a positive number, got 0"),
        (lambda s: taylor_probe(s, np.ones((2, 3)), lr=0.1), r"at least 4 block columns .* got shape \(2, 3\)"),
        (lambda s: taylor_probe(s, np.ones(4), lr=0.1), r"`projections` must be a finite array of shape"),
        (lambda s: taylor_probe("space", np.ones((2, 4)), lr=0.1), r"`space` must be a SearchSpace, got str"),
        (lambda s: gradient_projections(np.ones((2, 3))), r"`block_gradients` must be a finite array of shape"),
    ],
)
def test_taylor_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call(_space())


# ------------------------------------------------------------------------------------ probes that train the model
import types  # noqa: E402

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tiny_models import CASES_BY_NAME, VOCAB  # noqa: E402

from mftc_peft import MFTCConfig  # noqa: E402
from mftc_peft.probes import (  # noqa: E402
    batch_metrics,
    block_gradient_statistics,
    finetune_probe,
    preserved_state,
    regression_probe,
)
from mftc_peft.training_utils import iterate_batches, make_batches, train_steps  # noqa: E402


def _tiny_bert():
    case = CASES_BY_NAME["bert"]
    config = MFTCConfig(**case.config_kwargs, init_weights=False)  # non-zero deltas: a restore that zeroes them fails
    model = get_peft_model(case.model(), config)
    model.train()
    model.base_model.model.bert.encoder.layer[0].attention.self.dropout.eval()  # a mixed train/eval pattern
    return model


def _batches(n, seed, batch=8, length=9):
    """Synthetic 3-class batches whose label is a function of the second token, so training has signal."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 1] % 3})
    return out


def _tiny_space(model, max_candidates=2):
    """One library module per target module, one node per layer."""
    stats = block_gradient_statistics(model, _batches(2, seed=5), progress=False)
    table = stats.table
    library = [np.flatnonzero(np.array(table.module_names) == name) for name in dict.fromkeys(table.module_names)]
    return build_search_space(library, table, max_candidates=max_candidates)


def _fingerprint(model):
    mftc = model.base_model
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
                   for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "selection": mftc.block_selection(),
        "config": dict(mftc.peft_config["default"].block_selection),
        "rng": torch.get_rng_state(),
    }


def _assert_same(before, after):
    assert before["params"].keys() == after["params"].keys()
    for name, (p, value, flag, grad) in before["params"].items():
        q, value2, flag2, grad2 = after["params"][name]
        assert q is p, f"{name} is a new Parameter object"
        assert torch.equal(value, value2), f"{name} changed"
        assert flag == flag2, f"{name}.requires_grad changed"
        assert (grad is None and grad2 is None) or torch.equal(grad, grad2), f"{name}.grad changed"
    assert before["buffers"].keys() == after["buffers"].keys()
    assert all(torch.equal(b, after["buffers"][n]) for n, b in before["buffers"].items())
    assert before["modes"] == after["modes"]
    assert before["selection"] == after["selection"] and before["config"] == after["config"]
    assert torch.equal(before["rng"], after["rng"])


@pytest.mark.parametrize("raise_inside", [False, True])
def test_preserved_state_restores_every_property(raise_inside):
    model = _tiny_bert()
    head = model.base_model.model.classifier.modules_to_save["default"]
    head.weight.grad = torch.ones_like(head.weight)  # a gradient on entry must come back as it was
    before = _fingerprint(model)
    with pytest.raises(RuntimeError, match="boom") if raise_inside else contextlib.nullcontext():
        with preserved_state(model):
            model.base_model.set_block_selection({"bert.encoder.layer.1.attention.self.key": [0, 2]})
            with torch.no_grad():
                head.weight.add_(1.0)
                model.base_model.model.bert.embeddings.position_ids.add_(1)  # a buffer
            head.weight.grad = None
            for p in model.parameters():
                p.requires_grad_(not p.requires_grad)
            model.eval()
            torch.rand(5)  # consumes the global RNG, as dropout does
            if raise_inside:
                raise RuntimeError("boom")
    _assert_same(before, _fingerprint(model))


def test_preserved_state_refuses_a_merged_adapter():
    model = _tiny_bert()
    model.base_model.merge_adapter()
    with pytest.raises(ValueError, match="`peft_model` must not be merged while probing"):
        with preserved_state(model):
            pass


def test_finetune_probe_leaves_model_bit_identical_and_is_deterministic():
    model = _tiny_bert()
    space = _tiny_space(model)
    all_weights = {n: p.detach().clone() for n, p in model.named_parameters()}  # frozen base weights too
    before = _fingerprint(model)
    kwargs = dict(probe_steps=3, probe_repeats=2, lr=1e-2, seed=0, progress=False)
    report = finetune_probe(model, space, _batches(4, seed=1), _batches(2, seed=2), **kwargs)
    _assert_same(before, _fingerprint(model))
    assert all(torch.equal(p, all_weights[n]) for n, p in model.named_parameters())
    again = finetune_probe(model, space, _batches(4, seed=1), _batches(2, seed=2), **kwargs)
    assert again.results == report.results and again.base_loss == report.base_loss


def test_finetune_probe_deltas_are_finite_and_none_is_zero():
    model = _tiny_bert()
    space = _tiny_space(model)
    train, held_out = _batches(4, seed=1), _batches(2, seed=2)
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
    model = _tiny_bert()
    space = _tiny_space(model)
    before = _fingerprint(model)
    calls = []

    def failing_loss(m, batch):
        calls.append(1)
        if len(calls) == 5:  # inside the second probe's training
            raise RuntimeError("loss exploded")
        return m(**batch).loss

    with pytest.raises(RuntimeError, match="loss exploded"):
        finetune_probe(model, space, _batches(3, seed=1), _batches(1, seed=2), probe_steps=2, probe_repeats=1,
                       compute_loss=failing_loss, progress=False)
    _assert_same(before, _fingerprint(model))


def test_regression_probe_recovers_a_sensible_additive_model():
    model = _tiny_bert()
    space = _tiny_space(model)
    train, held_out = _batches(4, seed=1), _batches(3, seed=2)
    before = _fingerprint(model)
    n_all = math.prod(space.n_candidates_per_node)  # 9: every architecture once
    kwargs = dict(probe_steps=4, lr=1e-2, dropout=False, progress=False)
    report = regression_probe(model, space, train, held_out, n_architectures=n_all, alpha=1e-6, **kwargs)
    _assert_same(before, _fingerprint(model))
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


def test_batch_metrics_classification_and_causal_lm():
    def fake(logits):
        return lambda **batch: types.SimpleNamespace(loss=torch.tensor(0.5), logits=logits)

    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])  # predicts 1, 0, 1
    assert batch_metrics(fake(logits), {"labels": torch.tensor([1, 1, 1])}) == (0.5, pytest.approx(2 / 3))
    # Causal LM: position t predicts token t + 1; -100 is skipped.
    lm_logits = torch.zeros(1, 4, 5)
    lm_logits[0, 0, 2] = lm_logits[0, 1, 3] = lm_logits[0, 2, 0] = 1.0  # predicts 2, 3, 0 for positions 1..3
    labels = torch.tensor([[7, 2, 4, -100]])
    loss, accuracy = batch_metrics(fake(lm_logits), {"labels": labels})
    assert accuracy == pytest.approx(1 / 2)
    loss, accuracy = batch_metrics(fake(logits), {"labels": torch.tensor([1, 1, 1])},
                                   compute_loss=lambda m, b: torch.tensor(0.25))
    assert loss == 0.25 and math.isnan(accuracy)


def test_batches_are_deterministic_and_trimmed():
    data = {
        "input_ids": torch.arange(40).reshape(10, 4),
        "attention_mask": torch.tensor([[1, 1, 0, 0]] * 9 + [[1, 1, 1, 0]]),
        "labels": torch.arange(10),
    }
    batches = make_batches(data, 4, rng=3)
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat([b["labels"] for b in batches]).tolist()) == list(range(10))
    assert all(b["input_ids"].shape[1] == (3 if 9 in b["labels"] else 2) for b in batches)
    first = [b["labels"].tolist() for b in iterate_batches(data, 4, seed=1, epochs=2)]
    assert first == [b["labels"].tolist() for b in iterate_batches(data, 4, seed=1, epochs=2)]
    assert first[:3] != first[3:]  # each epoch gets a fresh order
    with pytest.raises(ValueError, match=r"`batches` ran out after 3 of 5 steps"):
        model = torch.nn.Linear(1, 1)
        train_steps(model, iter([{}] * 3), params=model.parameters(), lr=0.1, steps=5,
                    compute_loss=lambda m, b: m(torch.ones(1)).sum())


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
    model = _tiny_bert()
    args = {"space": _space(), "train_batches": _batches(1, seed=1), "eval_batches": _batches(1, seed=2), **kwargs}
    with pytest.raises(ValueError, match=match):
        finetune_probe(model, args.pop("space"), args.pop("train_batches"), args.pop("eval_batches"), **args,
                       progress=False)
