"""Warm-up end to end on tiny models: budget, determinism, failure safety, reload, report."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import CASES_BY_NAME, VOCAB, outputs

import mftc_peft
from mftc_peft import MFTCConfig, MFTCLayer, WarmupReport

TESTS_DIR = Path(__file__).parent
# Blocks only: these tests check the warm-up's selection against its budget (the low-rank part, on by default, has
# its own tests in test_low_rank.py and test_low_rank_share.py)
WARMUP = dict(warmup_steps=6, dsca_every=2, n_clusters=4, embed_dim=6, low_rank_share=0.0)


def token_batches(n, *, labels=3, seed=0, causal=False):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (8, 9), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone() if causal else torch.randint(0, labels, (8,),
                                                                                           generator=generator)})
    return batches


def warm_model(case_name="bert", **overrides):
    case = CASES_BY_NAME[case_name]
    task = case.config_kwargs["task_type"]
    config = MFTCConfig(task_type=task, **{**WARMUP, "budget": 0.1, **overrides})
    return case, get_peft_model(case.model(), config)


def state(model):
    """Everything a failed warm-up must leave unchanged."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "selection": copy.deepcopy(model.peft_config["default"].block_selection),
        "hooks": sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters()),
    }


def assert_same_state(before, after):
    assert before["params"].keys() == after["params"].keys()
    assert all(torch.equal(before["params"][n], after["params"][n]) for n in before["params"])
    assert before["requires_grad"] == after["requires_grad"]
    assert all(
        (before["grads"][n] is None and after["grads"][n] is None) or torch.equal(before["grads"][n], after["grads"][n])
        for n in before["grads"]
    )
    assert before["training"] == after["training"]
    assert before["selection"] == after["selection"]
    assert before["hooks"] == after["hooks"] == 0


@pytest.mark.parametrize("case_name", ["bert", "gpt2", "llama_gqa"])
def test_warmup_selects_within_budget_and_trains(case_name):
    case, model = warm_model(case_name)
    causal = case_name != "bert"
    report = mftc_peft.warmup(model, token_batches(6, causal=causal), progress=False)
    assert 0 < report.trainable_elements <= report.budget_elements
    assert report.budget_elements == int(0.1 * report.target_elements)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "mftc_delta" in n)
    assert trainable == report.trainable_elements
    assert model.peft_config["default"].block_selection == report.selection
    assert model.base_model.block_selection() == report.selection
    # the base weights are frozen again and the model is back in its mode
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = outputs(model, case.inputs()).detach()
    model.train()
    model(**token_batches(1, causal=causal, seed=5)[0]).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert not torch.equal(outputs(model, case.inputs()), before)


def test_int_budget_is_a_count():
    _, model = warm_model(budget=3000)
    report = mftc_peft.warmup(model, token_batches(6), progress=False)
    assert report.budget_elements == 3000
    assert 0 < report.trainable_elements <= 3000


def test_same_seed_same_selection_and_seed_matters_through_the_config():
    """`MFTCConfig.seed` is the one seed of MFTC's random choices: the same seed repeats a warm-up exactly, and another
    seed changes what each seeded stream drives: the gradient sketches (the taylor probe's input), DSCA's clustering,
    and the random initial deltas of `init_weights=False`."""

    def report(seed):
        _, model = warm_model(seed=seed)
        result = mftc_peft.warmup(model, token_batches(6), progress=False).to_dict()
        del result["timings"]
        return result

    first = report(3)
    assert first["selection"] and report(3) == first

    def measurement(seed, **overrides):
        _, model = warm_model(seed=seed, **overrides)
        return mftc_peft.measure_blocks(model, token_batches(6), keep_projections=True)

    # the sketch hashes: the same seed sketches the same gradients identically, another seed differently
    sketches = {seed: measurement(seed).projections for seed in (3, 4)}
    assert np.array_equal(measurement(3).projections, sketches[3])
    assert not np.allclose(sketches[3], sketches[4], rtol=1e-3, atol=0)

    # DSCA's k-means and eigensolver (energy signatures use no sketch): the modules follow the seed
    def partition(seed):  # on 32-wide groups: the tiny model's finer grid separates into the same modules each time
        return {frozenset(module) for module in measurement(seed, signature_kind="energy", block_size=32).library}

    assert partition(3) == partition(3)
    assert len({frozenset(partition(seed)) for seed in (3, 4, 5)}) > 1

    # random initial deltas for an explicit selection
    def deltas(seed):
        case = CASES_BY_NAME["bert"]
        config = MFTCConfig(task_type="SEQ_CLS", seed=seed, init_weights=False,
                            block_selection={"query": [0, 2], "intermediate.dense": [1]})
        model = get_peft_model(case.model(), config)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "mftc_delta" in n and p.numel()}

    same, other = deltas(3), deltas(4)
    assert len(same) == 4 and all(p.abs().sum() > 0 for p in same.values())
    assert all(torch.equal(p, deltas(3)[n]) for n, p in same.items())
    assert all(not torch.equal(p, other[n]) for n, p in same.items())


@pytest.mark.parametrize("allocation, stage", [("search", "_probe"), ("proportional", "proportional_selection")])
def test_failure_mid_warmup_leaves_model_bit_identical(allocation, stage, monkeypatch):
    case, model = warm_model(allocation=allocation)
    model.train()
    before = state(model)
    warmup_module = importlib.import_module("mftc_peft.warmup")  # the package attribute is the function

    def exploding_stage(*args, **kwargs):
        raise RuntimeError(f"injected failure in {stage}")

    monkeypatch.setattr(warmup_module, stage, exploding_stage)
    with pytest.raises(RuntimeError, match="injected failure"):
        mftc_peft.warmup(model, token_batches(6), progress=False)
    assert_same_state(before, state(model))


@pytest.mark.parametrize("overrides, failing_call", [
    ({}, 4),  # the 4th warm-up backward pass
    ({"head_warmup_steps": 8}, 3),  # the 3rd step fitting the head, before any gradient is measured
])
def test_failure_in_a_forward_pass_leaves_model_bit_identical(overrides, failing_call):
    _, model = warm_model(**overrides)
    before = state(model)
    calls = {"n": 0}

    def loss_that_fails(model, batch):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise RuntimeError(f"injected failure in call {failing_call}")
        return model(**batch).loss

    with pytest.raises(RuntimeError, match=f"call {failing_call}"):
        mftc_peft.warmup(model, token_batches(6), compute_loss=loss_that_fails, progress=False)
    assert_same_state(before, state(model))


def test_warmup_then_save_and_reload_in_fresh_process(tmp_path):
    case, model = warm_model()
    mftc_peft.warmup(model, token_batches(6), progress=False)
    with torch.no_grad():  # non-zero deltas, so the reload can fail
        for module in model.modules():
            if isinstance(module, MFTCLayer):
                module.mftc_delta["default"].normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        expected = outputs(model.eval(), case.inputs())
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["block_selection"] == model.peft_config["default"].block_selection
    out = tmp_path / "logits.safetensors"
    subprocess.run(
        [sys.executable, str(TESTS_DIR / "reload_in_fresh_process.py"), "bert", str(tmp_path / "adapter"), str(out)],
        check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert torch.equal(load_file(out)["logits"], expected)


@pytest.mark.parametrize("probe", ["finetune", "regression"])
def test_training_probes_drive_the_selection(probe, monkeypatch):
    """The search ranks what the training probe measured: the report carries the probe's loss deltas, and when the
    probe's results name one helpful candidate, that candidate is exactly the selection, whichever node it is in."""
    warmup_module = importlib.import_module("mftc_peft.warmup")  # the package attribute is the function
    real_probe = getattr(warmup_module, f"{probe}_probe")
    seen = {"calls": 0}

    def probe_then_favour(peft_model, space, *args, **kwargs):
        measured = real_probe(peft_model, space, *args, **kwargs)  # the real probe: trains and evaluates
        seen.update(space=space, measured=measured, calls=seen["calls"] + 1, favoured=None)
        node = seen["favour_node"]
        if node is None:
            return measured
        candidates = space.nodes[node].candidates  # favour the largest candidate of the node that fits the budget
        fits = [c for c, candidate in enumerate(candidates) if 0 < candidate.size <= seen["budget"]]
        seen["favoured"] = (node, max(fits, key=lambda c: candidates[c].size))

        def doctored(r):  # the favoured candidate lowers the loss, every other one raises it
            delta = 0.0 if r.candidate == 0 else -1.0 if (r.node, r.candidate) == seen["favoured"] else 1.0
            return dataclasses.replace(r, loss_delta=delta)

        return dataclasses.replace(measured, results=tuple(doctored(r) for r in measured.results))

    monkeypatch.setattr(warmup_module, f"{probe}_probe", probe_then_favour)

    def run(favour_node=None):
        _, model = warm_model(allocation="search", probe=probe, probe_steps=1, probe_repeats=1, max_candidates=2,
                              warmup_steps=4)
        grids = model.base_model.block_grids().values()
        seen["budget"] = int(0.1 * sum(grid.in_features * grid.out_features for grid in grids))
        seen["favour_node"], calls = favour_node, seen["calls"]
        report = mftc_peft.warmup(model, token_batches(4), eval_dataloader=token_batches(2, seed=9), progress=False)
        assert seen["calls"] == calls + 1 and report.timings["probe"] > 0
        assert report.budget_elements == seen["budget"] and report.trainable_elements <= report.budget_elements
        assert model.peft_config["default"].block_selection == report.selection
        return report, seen["space"]

    # the report's predictions are the probe's measurements, and only candidates measured as helpful are chosen
    report, space = run()
    node_index = {node.name: i for i, node in enumerate(space.nodes)}
    measured = {(r.node, r.candidate): r.loss_delta for r in seen["measured"].results}
    assert len(report.candidates) == len(measured) > 2 * len(space.nodes)
    for record in report.candidates:
        delta = measured[(node_index[record["node"]], record["candidate"])]
        assert record["predicted_loss_delta"] == pytest.approx(delta, abs=1e-12)
        assert record["predicted_gain"] == pytest.approx(-delta, abs=1e-12)
    assert all(measured[(i, c)] < 0 for i, c in enumerate(report.solver["chosen"]) if c != 0)

    # a probe that finds one helpful candidate gets exactly that candidate trained, in the first or the last node
    selections = []
    for favour_node in (0, len(space.nodes) - 1):
        report, space = run(favour_node)
        node, c = seen["favoured"]
        candidate = space.nodes[node].candidates[c]
        assert report.selection == {name: sorted(ids) for name, ids in candidate.blocks.items()}
        assert report.trainable_elements == candidate.size > 0
        assert report.solver["chosen"] == [c if n == node else 0 for n in range(len(space.nodes))]
        selections.append(report.selection)
    assert selections[0] != selections[1]


@pytest.mark.parametrize("allocation", ["search", "proportional"])
def test_report_json_round_trip_and_plots(allocation, tmp_path):
    _, model = warm_model(allocation=allocation)
    report = mftc_peft.warmup(model, token_batches(6), progress=False)
    assert set(report.timings) >= {"signatures", "dsca", "search", "inject", "total"}
    if allocation == "search":
        assert "probe" in report.timings and report.candidates
        assert report.solver["gap"] >= 0 and report.solver["objective"] <= report.solver["bound"] + 1e-12
    assert len(report.nodes) == len(report.labels) == len(report.diagnostics["node_layers"])
    path = report.to_json(tmp_path / "report.json")
    again = WarmupReport.from_json(path)
    assert again.selection == report.selection and again.trainable_elements == report.trainable_elements
    written = report.plot(tmp_path / "plots")
    assert {p.name for p in written} >= {"module_map.png", "laplacian_spectrum.png", "trainable_per_layer.png"}
    assert all(p.stat().st_size > 1000 for p in written)
    graph = report.block_graph()
    assert graph.affinity.shape == (len(report.nodes), len(report.nodes))
    with pytest.raises(ValueError, match="holds no block graph"):
        again.block_graph()


def test_warmup_refuses_a_model_without_mftc():
    with pytest.raises(TypeError, match="`peft_model` must be a PEFT model with an MFTC adapter"):
        mftc_peft.warmup(torch.nn.Linear(2, 2), [])


def test_empty_dataloader_is_an_error_and_harmless():
    _, model = warm_model()
    before = state(model)
    with pytest.raises(ValueError, match="`train_dataloader` yielded no batch"):
        mftc_peft.warmup(model, [], progress=False)
    assert_same_state(before, state(model))


def head_weight(model):
    return next(p for n, p in model.named_parameters() if "modules_to_save" in n and n.endswith("weight"))


def test_head_warmup_fits_the_head_for_the_measurement_then_puts_it_back():
    _, model = warm_model(head_warmup_steps=8, head_warmup_lr=5e-2)
    initial = head_weight(model).detach().clone()
    seen = []

    def recording_loss(model, batch):
        seen.append(head_weight(model).detach().clone())
        return model(**batch).loss

    report = mftc_peft.warmup(model, token_batches(6), compute_loss=recording_loss, progress=False)
    assert len(seen) == 8 + WARMUP["warmup_steps"]
    assert torch.equal(seen[0], initial) and not torch.equal(seen[1], initial)  # one Adam step per head step
    assert all(torch.equal(w, seen[8]) for w in seen[8:])  # the measurement sees the fitted head, unchanged
    assert not torch.equal(seen[8], initial)
    assert torch.equal(head_weight(model), initial)  # and the user's head is back
    assert report.timings["head"] > 0


def test_measure_blocks_is_the_warmups_measurement_and_changes_nothing():
    _, model = warm_model()
    before = state(model)
    measurement = mftc_peft.measure_blocks(model, token_batches(6), keep_projections=True)
    assert_same_state(before, state(model))
    table = measurement.table
    grids = model.base_model.block_grids()
    assert len(table) == sum(grid.n_blocks for grid in grids.values())
    assert (table.energy > 0).any() and (table.energy >= 0).all()
    assert measurement.projections.shape == (WARMUP["warmup_steps"], len(table))
    # projections average to the squared mean gradient, never more than the mean squared gradient (the energy)
    assert np.all(measurement.projections.mean(axis=0) <= table.energy / WARMUP["warmup_steps"] + 1e-9)
    rows = sorted(r for module in measurement.library for r in module)
    assert rows == list(range(len(table)))  # DSCA's modules partition the blocks
    assert set(measurement.timings) >= {"signatures", "dsca"}
    # the warm-up clusters the same blocks in the same order
    report = mftc_peft.warmup(model, token_batches(6), progress=False)
    assert [tuple(n) for n in report.nodes] == list(zip(table.module_names, table.block_ids.tolist()))
