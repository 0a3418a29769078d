"""The report's plots read on their own: weight starts marked on the module map, a legend of the modules outside the
axes, and layers without a selected block shown as 0."""

from types import SimpleNamespace

import pytest

from mftc_peft import plots

pytest.importorskip("matplotlib")

WEIGHTS = [("attention.self.query", 2), ("attention.self.key", 2), ("attention.self.value", 2),
           ("attention.output.dense", 2), ("intermediate.dense", 3), ("output.dense", 3)]


def minilm_like_nodes(n_layers: int):
    """(module, block) of every block of a tiny BERT: 2 heads, 3 FFN groups per weight, in node order."""
    nodes, layers = [], []
    for layer in range(n_layers):
        for suffix, n_blocks in WEIGHTS:
            nodes += [(f"bert.encoder.layer.{layer}.{suffix}", b) for b in range(n_blocks)]
            layers += [layer] * n_blocks
    return nodes, layers


def test_short_weight_names():
    assert plots.short_weight_name("bert.encoder.layer.11.attention.output.dense") == "o"
    assert plots.short_weight_name("bert.encoder.layer.0.output.dense") == "FFN out"
    assert plots.short_weight_name("model.layers.3.self_attn.q_proj") == "self_attn.q_proj"
    assert plots.short_weight_name("transformer.h.2.mlp.c_fc") == "mlp.c_fc"


def test_weight_starts_mark_q_k_v_o_and_the_ffn():
    nodes, layers = minilm_like_nodes(3)
    assert plots.weight_starts(nodes, layers) == [
        (0, "q"), (2, "k"), (4, "v"), (6, "o"), (8, "FFN in"), (11, "FFN out")]


def test_layers_without_selected_blocks_count_zero():
    assert plots.per_layer_counts({1: 96, 4: 32}, [0, 0, 1, 2, 3, 4, 5]) == {0: 0, 1: 96, 2: 0, 3: 0, 4: 32, 5: 0}


def test_module_map_has_weight_ticks_and_a_module_legend_outside_the_axes():
    plt = plots._pyplot()
    nodes, layers = minilm_like_nodes(2)
    report = SimpleNamespace(nodes=[list(n) for n in nodes], labels=[i % 3 for i in range(len(nodes))],
                             selected_blocks=[{"module": nodes[0][0], "block": 0}], config={"block_size": 16})
    fig = plots._module_map(plt, report, layers)
    ax = fig.axes[0]
    assert "16-unit group" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q", "k", "v", "o", "FFN in", "FFN out"]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["module 0", "module 1", "module 2", "selected"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1, "the legend covers the map"
    plt.close(fig)
