"""SignatureCollector on tiny nn.Linear and Conv1D-like weights: exact energies, freed grads, skips, hook removal."""

import numpy as np
import pytest
import torch
from torch import nn

from mftc_peft.blocks import BlockGrid
from mftc_peft.signatures import SignatureCollector, energy_signatures


class Conv1DLike(nn.Module):
    """transformers' Conv1D layout: weight (in, out), y = x @ W + b."""

    def __init__(self, n_in, n_out, generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out, generator=generator))

    def forward(self, x):
        return x @ self.weight


@pytest.fixture
def model():
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(10, 7, bias=False)  # out axis: 7 rows in blocks of 3 -> widths 3, 3, 1
    with torch.no_grad():
        linear.weight.copy_(torch.randn(7, 10, generator=generator))
    conv = Conv1DLike(7, 6, generator)  # in axis: 7 columns (Linear terms) in blocks of 4 -> widths 4, 3
    targets = {
        "fc": (linear.weight, BlockGrid("out", in_features=10, out_features=7, width=3), False),
        "proj": (conv.weight, BlockGrid("in", in_features=7, out_features=6, width=4), True),
    }
    return linear, conv, targets


def _backward(linear, conv, seed, scale=1.0):
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(seed))
    (conv(linear(x)) * scale).pow(2).sum().backward()


def _reference_energy(linear, conv, seed):
    """Per-block squared-gradient sums from full gradients (no hooks)."""
    linear.weight.grad = conv.weight.grad = None
    _backward(linear, conv, seed)
    g_fc = linear.weight.grad  # (7, 10), blocks of rows
    g_proj = conv.weight.grad.T  # (6, 7) in Linear terms, blocks of columns
    fc = [g_fc[a:b].pow(2).sum().item() for a, b in ((0, 3), (3, 6), (6, 7))]
    proj = [g_proj[:, a:b].pow(2).sum().item() for a, b in ((0, 4), (4, 7))]
    linear.weight.grad = conv.weight.grad = None
    return np.array(fc + proj)


def test_energies_match_full_gradient_and_grads_are_freed(model):
    linear, conv, targets = model
    expected = [_reference_energy(linear, conv, seed) for seed in range(3)]
    collector = SignatureCollector(targets, window=4)
    assert collector.nodes == [("fc", 0), ("fc", 1), ("fc", 2), ("proj", 0), ("proj", 1)]
    with collector:
        for seed in range(3):
            _backward(linear, conv, seed)
            assert linear.weight.grad is None and conv.weight.grad is None
            assert collector.end_micro_batch()
    np.testing.assert_allclose(collector.block_energy(), np.sum(expected, axis=0), rtol=1e-5)
    sizes = collector.node_sizes()
    np.testing.assert_array_equal(sizes, [30, 30, 10, 24, 18])
    per_element = np.stack(expected) / sizes  # (T, m)
    np.testing.assert_allclose(collector.signatures(), energy_signatures(per_element), rtol=1e-5, atol=1e-8)


def test_energy_signature_is_double_centred_log():
    window = np.exp(np.random.default_rng(0).normal(size=(5, 4)))
    sig = energy_signatures(window)
    assert sig.shape == (4, 5)
    np.testing.assert_allclose(sig.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(sig.mean(axis=1), 0, atol=1e-12)
    # A factor shared by all blocks in one micro-batch (the batch's loss scale) leaves the signature unchanged.
    scaled = window * np.array([1.0, 10.0, 0.1, 3.0, 1.0])[:, None]
    np.testing.assert_allclose(energy_signatures(scaled), sig, atol=1e-10)


def test_window_slides_and_keeps_last_micro_batches(model):
    linear, conv, targets = model
    collector = SignatureCollector(targets, window=2)
    with pytest.raises(RuntimeError, match="at least 2 folded micro-batches, got 0"):
        collector.signatures()
    with collector:
        for seed in range(4):
            _backward(linear, conv, seed)
            collector.end_micro_batch()
    last = np.stack([_reference_energy(linear, conv, seed) for seed in (2, 3)]) / collector.node_sizes()
    np.testing.assert_allclose(collector.signatures(), energy_signatures(last), rtol=1e-5, atol=1e-8)
    assert collector.n_micro_batches == 4


def test_hooks_leave_reductions_on_the_device_until_the_micro_batch_ends(model, monkeypatch):
    """On a GPU a host copy or a finiteness test inside a hook stalls the backward pass once per target weight (about
    a second per warm-up micro-batch for MiniLM on a shared H200): the hooks only queue work on the gradient's device,
    and `end_micro_batch` copies once."""
    linear, conv, targets = model
    expected = _reference_energy(linear, conv, 0)
    collector = SignatureCollector(targets, window=4, keep_history=True)

    def refuse(*args, **kwargs):
        raise AssertionError("a hook synchronised with the host")

    with collector:
        with monkeypatch.context() as patch:
            for name in ("cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"):
                patch.setattr(torch.Tensor, name, refuse)
            _backward(linear, conv, 0)
        assert collector.end_micro_batch()
    np.testing.assert_allclose(collector.block_energy(), expected, rtol=1e-5)
    assert collector.history().shape == (1, 5, collector.sketch_dim)


def test_two_backward_passes_in_one_micro_batch_add_up(model):
    linear, conv, targets = model
    expected = _reference_energy(linear, conv, 0) + _reference_energy(linear, conv, 1)
    sketches = []
    for seeds in ([0], [1], [0, 1]):
        collector = SignatureCollector(targets, window=4, keep_history=True)
        with collector:
            for seed in seeds:
                _backward(linear, conv, seed)
            assert collector.end_micro_batch()
        sketches.append(collector.history()[0])
    np.testing.assert_allclose(collector.block_energy(), expected, rtol=1e-5)
    assert collector.n_micro_batches == 1
    np.testing.assert_allclose(sketches[2], sketches[0] + sketches[1], rtol=1e-5, atol=1e-7)  # sketches are linear


def test_only_the_targets_with_a_non_finite_gradient_are_named(model):
    linear, conv, targets = model
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    collector = SignatureCollector(targets, window=4)
    with collector:
        (linear(x).sum() * float("nan")).backward()  # the gradient reaches fc only; proj gets none
        with pytest.warns(RuntimeWarning, match=r"non-finite gradient in fc; it is not folded"):
            assert not collector.end_micro_batch()
        linear(x).pow(2).sum().backward()  # fc only again, finite: proj's blocks get zeros, not an error
        assert collector.end_micro_batch()
    energy = collector.block_energy()
    assert np.all(energy[:3] > 0) and np.all(energy[3:] == 0)


def test_non_finite_micro_batch_is_skipped_with_warning(model):
    linear, conv, targets = model
    collector = SignatureCollector(targets, window=4)
    with collector:
        _backward(linear, conv, 0)
        collector.end_micro_batch()
        _backward(linear, conv, 1, scale=float("nan"))
        with pytest.warns(RuntimeWarning, match="non-finite gradient in fc, proj"):
            assert not collector.end_micro_batch()
        _backward(linear, conv, 2)
        collector.end_micro_batch()
    expected = _reference_energy(linear, conv, 0) + _reference_energy(linear, conv, 2)
    np.testing.assert_allclose(collector.block_energy(), expected, rtol=1e-5)
    assert collector.n_micro_batches == 2 and collector.n_skipped == 1


def test_hooks_removed_after_exit_even_on_error(model):
    linear, conv, targets = model
    collector = SignatureCollector(targets)
    with pytest.raises(KeyError):
        with collector:
            raise KeyError("boom")
    _backward(linear, conv, 0)
    assert linear.weight.grad is not None and conv.weight.grad is not None  # no hook freed them
    assert collector.block_energy().sum() == 0
    with collector:
        with pytest.raises(RuntimeError, match="already attached"):
            collector.attach()


def test_sketch_is_seeded_linear_and_estimates_inner_products():
    grid = BlockGrid("out", in_features=64, out_features=64, width=32)  # two blocks of one shape
    weight = nn.Parameter(torch.zeros(64, 64))
    base = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))

    def collect(seed, grads):
        collector = SignatureCollector({"w": (weight, grid, False)}, kind="sketch", sketch_dim=256, seed=seed)
        with collector:
            for grad in grads:
                (weight * grad).sum().backward()
                collector.end_micro_batch()
        return collector.signatures()

    same = torch.cat([base, base])  # block 1 = block 0: identical sketches
    sig = collect(3, [same])
    np.testing.assert_allclose(sig[0], sig[1], rtol=1e-6)
    np.testing.assert_allclose(collect(3, [same]), sig)  # same seed, same sketch
    assert not np.allclose(collect(4, [same]), sig)
    # Linear over the window: two micro-batches sum to the sketch of the summed gradient.
    np.testing.assert_allclose(collect(3, [same, same]), 2 * sig, rtol=1e-5)
    # Norm preserved on average: |sketch|^2 ~ |g|^2 / numel.
    assert np.sum(sig[0] ** 2) == pytest.approx(float(base.pow(2).sum()) / base.numel(), rel=0.3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "fisher"}, r"`kind` must be one of \('energy', 'sketch'\), got 'fisher'"),
        ({"window": 0}, "`window` must be a positive integer, got 0"),
        ({"sketch_dim": 2.5}, "`sketch_dim` must be a positive integer, got 2.5"),
        ({"seed": "0"}, "`seed` must be an integer, got '0'"),
    ],
)
def test_invalid_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SignatureCollector(model[2], **kwargs)


def test_invalid_targets(model):
    linear, conv, targets = model
    with pytest.raises(ValueError, match="`targets` must map at least one module"):
        SignatureCollector({})
    with pytest.raises(ValueError, match=r"nn.Linear \(out x in\) shape \(10, 7\) of its grid, got \(7, 10\)"):
        SignatureCollector({"fc": (linear.weight, BlockGrid("out", 7, 10, 3), False)})
    with pytest.raises(TypeError, match="grid must be a BlockGrid"):
        SignatureCollector({"fc": (linear.weight, None, False)})
    with pytest.raises(ValueError, match=r"must be a tuple \(weight, grid, fan_in_fan_out\)"):
        SignatureCollector({"fc": linear.weight})


@pytest.mark.parametrize("axis", ["in", "out"])
def test_sketch_matches_an_element_wise_count_sketch(axis):
    """Oracle: element (p, q) of a block adds s(p) s'(q) g[p, q] to bucket h'(q), p its offset in the block."""
    grid = BlockGrid(axis, in_features=12, out_features=10, width=4)  # a narrow last block on either axis
    weight = nn.Parameter(torch.zeros(10, 12))
    grad = torch.randn(10, 12, generator=torch.Generator().manual_seed(2))
    d = 8
    collector = SignatureCollector({"w": (weight, grid, False)}, kind="sketch", sketch_dim=d, seed=5)
    with collector:
        (weight * grad).sum().backward()
        collector.end_micro_batch()
    s_local, h_other, s_other = (t.numpy() for t in collector._hash)
    lines = (grad if axis == "out" else grad.T).numpy()  # (positions along the block axis, other axis)
    expected = np.zeros((grid.n_blocks, d))
    for p in range(lines.shape[0]):
        block, offset = divmod(p, grid.width)
        for q in range(lines.shape[1]):
            expected[block, h_other[q]] += s_local[offset] * s_other[q] * lines[p, q]
    expected /= np.sqrt(np.array(grid.block_numels()))[:, None]
    np.testing.assert_allclose(collector.signatures(), expected, rtol=1e-5, atol=1e-6)
