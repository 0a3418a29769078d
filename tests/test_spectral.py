"""Spectral coordination changes the update exactly as its formulas say."""

import numpy as np
import pytest
import torch
from peft import get_peft_model
from tiny_models import CASES_BY_NAME, outputs

from mftc_peft import MFTCConfig
from mftc_peft.spectral import SpectralCoordinator

SELECTION = {
    "bert.encoder.layer.0.attention.self.query": [0, 2],
    "bert.encoder.layer.1.attention.self.value": [1],
    "bert.encoder.layer.0.intermediate.dense": [1],  # 32 x 64 lines: a shape of its own
    "bert.encoder.layer.1.intermediate.dense": [2],
}
NODES = [(name, b) for name, ids in SELECTION.items() for b in ids]


def model_and_affinity():
    case = CASES_BY_NAME["bert"]
    model = get_peft_model(
        case.model(), MFTCConfig(task_type="SEQ_CLS", block_selection=SELECTION, init_weights=False)
    )
    rng = np.random.default_rng(0)
    weights = rng.uniform(0.1, 1.0, size=(len(NODES), len(NODES)))
    return model, case, (weights + weights.T) / 2


def block_rows(model, name_block):
    """The delta rows of one block, found independently of the coordinator."""
    name, block = name_block
    layer = model.base_model.model.get_submodule(name)
    grid = layer.mftc_grid["default"]
    ids = layer.block_ids("default")
    start = sum(grid.widths(ids[: ids.index(block)]))
    return layer.mftc_delta["default"], slice(start, start + grid.widths([block])[0])


def test_filter_matches_direct_computation():
    model, case, affinity = model_and_affinity()
    outputs(model, case.inputs()).square().mean().backward()
    heads = NODES[:3]  # the three 16 x 64 head blocks share a shape
    before = torch.stack([block_rows(model, n)[0].grad[block_rows(model, n)[1]].flatten() for n in heads])
    ffn_before = [block_rows(model, n)[0].grad[block_rows(model, n)[1]].clone() for n in NODES[3:]]

    SpectralCoordinator(model, NODES, affinity, beta=0.3).filter_gradients()

    within = affinity[:3, :3].copy()
    np.fill_diagonal(within, 0)
    degree = within.sum(1)
    a = torch.tensor(within / np.sqrt(np.outer(degree, degree)), dtype=torch.float32)
    expected = 0.7 * before + 0.3 * a @ before
    after = torch.stack([block_rows(model, n)[0].grad[block_rows(model, n)[1]].flatten() for n in heads])
    torch.testing.assert_close(after, expected)
    # the two FFN blocks have shapes 32 x 64 each: they form a group of two and are mixed with each other
    ffn_after = [block_rows(model, n)[0].grad[block_rows(model, n)[1]] for n in NODES[3:]]
    torch.testing.assert_close(ffn_after[0], 0.7 * ffn_before[0] + 0.3 * ffn_before[1])


def test_regularization_matches_direct_computation():
    model, _, affinity = model_and_affinity()
    coordinator = SpectralCoordinator(model, NODES, affinity, lam=0.5)
    value = coordinator.regularization()
    expected = 0.0
    groups = []
    for members in (NODES[:3], NODES[3:]):
        rows = [NODES.index(n) for n in members]
        within = affinity[np.ix_(rows, rows)].copy()
        np.fill_diagonal(within, 0)
        degree = within.sum(1)
        laplacian = np.eye(len(rows)) - within / np.sqrt(np.outer(degree, degree))
        deltas = np.stack([block_rows(model, n)[0][block_rows(model, n)[1]].detach().numpy().ravel() for n in members])
        expected += np.trace(deltas.T @ laplacian @ deltas)
        groups.append((members, laplacian, deltas))
    assert value.item() == pytest.approx(0.5 * expected, rel=1e-5)
    value.backward()  # what training descends: d/dDelta lam tr(Delta^T L Delta) = 2 lam L Delta (L symmetric)
    for members, laplacian, deltas in groups:
        grads = np.stack([block_rows(model, n)[0].grad[block_rows(model, n)[1]].numpy().ravel() for n in members])
        np.testing.assert_allclose(grads, 2 * 0.5 * laplacian @ deltas, rtol=1e-4, atol=1e-7)
        assert np.abs(grads).max() > 1e-3


def test_bad_arguments():
    model, _, affinity = model_and_affinity()
    with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\), got 1.0"):
        SpectralCoordinator(model, NODES, affinity, beta=1.0)
    with pytest.raises(ValueError, match=r"`lam` must be >= 0, got -1"):
        SpectralCoordinator(model, NODES, affinity, lam=-1)
    with pytest.raises(ValueError, match=r"`affinity` must be \(5, 5\)"):
        SpectralCoordinator(model, NODES, affinity[:4, :4])
