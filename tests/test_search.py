"""The search space: block table, layer indices, candidates per node, and the selection it turns back into."""

import numpy as np
import pytest

from mftc_peft.blocks import BlockGrid
from mftc_peft.search import BlockTable, build_search_space, layer_index
from mftc_peft.selection import select_candidates


# ------------------------------------------------------------------------------------------------------- search space
@pytest.mark.parametrize(
    "name,index",
    [
        ("bert.encoder.layer.3.attention.self.query", 3),
        ("model.layers.12.mlp.down_proj", 12),
        ("transformer.h.0.attn.c_attn", 0),
        ("encoder.block.5.layer.0.SelfAttention.q", 5),
        ("classifier.dense", None),
        ("layer3.conv", None),
    ],
)
def test_layer_index(name, index):
    assert layer_index(name) == index


def _table():
    # Two layers x (query: 2 blocks, dense: 2 blocks) plus a pooler block with no layer.
    names = [f"encoder.layer.{l}.{m}" for l in (0, 1) for m in ("query", "query", "dense", "dense")] + ["pooler"]
    ids = [0, 1, 0, 1] * 2 + [0]
    sizes = [10, 10, 20, 20, 10, 10, 20, 20, 5]
    energy = [1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.1, 0.1, 9.0]
    return BlockTable(tuple(names), np.array(ids), np.array(sizes), np.array(energy))


def test_search_space_by_layer():
    table = _table()
    library = [[0, 4], [1, 2, 3], [0, 4, 8], [5], [2, 3, 1]]  # module 4 duplicates module 1
    space = build_search_space(library, table)
    assert [n.name for n in space.nodes] == ["layer 0", "layer 1", "pooler"]
    layer0 = space.nodes[0].candidates
    assert layer0[0].module is None and layer0[0].size == 0 and layer0[0].blocks == {}
    # Ranked by energy: module 1 (1+3+4... restricted: rows 1,2,3 -> 2+3+4=9), then modules 0 and 2 (row 0: 1.0).
    assert [c.module for c in layer0] == [None, 1, 0]  # module 2 restricted to layer 0 equals module 0: deduped
    assert layer0[1].blocks == {"encoder.layer.0.query": (1,), "encoder.layer.0.dense": (0, 1)}
    assert layer0[1].size == 50 and layer0[1].energy == 9.0
    assert [c.module for c in space.nodes[1].candidates] == [None, 0, 3]  # equal energy: library order
    assert space.n_candidates_per_node == (3, 3, 2)
    np.testing.assert_array_equal(space.sizes()[0], [0, 50, 10])
    assert space.selection([1, 2, 1]) == {
        "encoder.layer.0.query": [1],
        "encoder.layer.0.dense": [0, 1],
        "encoder.layer.1.query": [1],
        "pooler": [0],
    }
    capped = build_search_space(library, table, max_candidates=1)
    assert capped.n_candidates_per_node == (2, 2, 2)


def test_search_space_by_module_and_layer_groups():
    table = _table()
    library = [[0, 4], [1, 2, 3], [5]]
    by_module = build_search_space(library, table, grouping="module")
    assert [n.name for n in by_module.nodes] == ["encoder.layer.0.query", "encoder.layer.0.dense",
                                                 "encoder.layer.1.query"]
    assert [c.blocks for c in by_module.nodes[0].candidates[1:]] == [{"encoder.layer.0.query": (1,)},
                                                                      {"encoder.layer.0.query": (0,)}]
    grouped = build_search_space(library, table, grouping=2)
    assert [n.name for n in grouped.nodes] == ["layers 0-1"]
    assert grouped.nodes[0].candidates[1].blocks == {"encoder.layer.0.query": (1,), "encoder.layer.0.dense": (0, 1)}
    assert grouped.nodes[0].candidates[2].rows == (0, 4)


def test_search_space_feeds_selection():
    """The space's sizes and energies line up with its candidates, and `selection` names the chosen candidates'
    blocks. Candidates: layer 0 [none, rows 1-3 (50 elements, energy 9), row 0 (10, 1)], layer 1 [none, row 4 (10,
    0.5), row 5 (10, 0.5)], pooler [none, row 8 (5, 9)]."""
    table = _table()
    space = build_search_space([[0, 4], [1, 2, 3], [5], [8]], table)
    gains = [e / 10 for e in space.energies()]
    small = select_candidates(gains, space.sizes(), budget=20)  # the pooler and layer 0's small module
    assert small.chosen == (2, 0, 1) and small.total_size == 15 and small.objective == pytest.approx(1.0)
    assert space.selection(small.chosen) == {"encoder.layer.0.query": [0], "pooler": [0]}
    large = select_candidates(gains, space.sizes(), budget=60)  # layer 0's large module fits now
    assert large.chosen == (1, 0, 1) and large.total_size == 55 and large.objective == pytest.approx(1.8)
    assert space.selection(large.chosen) == {
        "encoder.layer.0.query": [1], "encoder.layer.0.dense": [0, 1], "pooler": [0],
    }


def test_block_table_from_grids():
    grids = {"layer.0.query": BlockGrid("out", 8, 8, 4), "layer.0.output.dense": BlockGrid("in", 6, 8, 4)}
    table = BlockTable.from_grids(grids, {"layer.0.query": [1.0, 2.0], "layer.0.output.dense": [3.0, 4.0]})
    assert table.module_names == ("layer.0.query",) * 2 + ("layer.0.output.dense",) * 2
    np.testing.assert_array_equal(table.sizes, [32, 32, 32, 16])
    np.testing.assert_array_equal(table.layers, [0, 0, 0, 0])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda t: build_search_space([[0]], t, grouping="head"), r"`grouping` must be one of \('layer', 'module'\)"),
        (lambda t: build_search_space([[0]], t, grouping=0), r"or a positive integer, got 0"),
        (lambda t: build_search_space([[0]], t, max_candidates=0), r"`max_candidates` must be a positive integer or"),
        (lambda t: build_search_space([[0], [9]], t), r"`library\[1\]` rows must lie in 0..8 \(the block table\)"),
        (lambda t: build_search_space([[0]], "table"), r"`table` must be a BlockTable, got str"),
        (lambda t: BlockTable(("a",), np.array([0]), np.array([1.5]), np.array([1.0])),
         r"`sizes` must be an integer array of length 1"),
        (lambda t: BlockTable(("a",), np.array([0]), np.array([1]), np.array([-1.0])),
         r"`energy` must be a finite non-negative array of length 1"),
        (lambda t: BlockTable(("a", "a"), np.array([0, 0]), np.array([1, 1]), np.ones(2)),
         r"every \(module name, block id\) pair must appear once"),
        (lambda t: BlockTable.from_grids({"a": BlockGrid("in", 4, 4, 2)}, {"a": [1.0]}),
         r"`energy\['a'\]` must hold one value per block \(2\)"),
    ],
)
def test_search_space_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call(_table())


def test_selection_validation_of_chosen():
    space = build_search_space([[0, 4]], _table())
    with pytest.raises(ValueError, match=r"`chosen` must hold one candidate index per node \(2 nodes"):
        space.selection([1])
