"""Budget-aware candidates: modules are offered as top-energy truncations that spread the budget over nodes."""

import numpy as np

from mftc_peft.search import SHARE_LEVELS, BlockTable, build_search_space, share_levels_up_to


def table_of(layers=4, blocks_per_layer=10, size=100):
    names = tuple(f"model.layers.{layer}.mlp.up_proj" for layer in range(layers) for _ in range(blocks_per_layer))
    ids = np.tile(np.arange(blocks_per_layer), layers)
    energy = np.random.default_rng(0).uniform(1, 2, size=len(names)) * np.repeat(np.arange(1, layers + 1), 10) ** 3
    return BlockTable(module_names=names, block_ids=ids, sizes=np.full(len(names), size), energy=energy)


def test_no_candidate_exceeds_the_largest_share_of_a_node():
    table = table_of()
    library = [list(range(len(table)))]  # one module spanning every block of every layer
    budget = 1200  # fair share 300 per node: caps 150, 300, 600
    space = build_search_space(library, table, budget=budget)
    fair = budget / len(space.nodes)
    for node in space.nodes:
        sizes = sorted(c.size for c in node.candidates[1:])
        assert sizes == [100, 300, 600]
        assert max(sizes) <= max(SHARE_LEVELS) * fair
    # truncations keep the highest-energy blocks of the module inside the node
    top = space.nodes[0].candidates[1]
    rows = np.array(top.rows)
    others = np.setdiff1d(np.array(space.nodes[0].rows), rows)
    assert table.energy[rows].min() >= table.energy[others].max()


def test_without_budget_modules_are_offered_whole():
    table = table_of()
    space = build_search_space([list(range(len(table)))], table)
    assert [c.size for node in space.nodes for c in node.candidates[1:]] == [1000] * 4


def test_share_levels_up_to_caps_the_largest_truncation():
    assert share_levels_up_to(2.0) == SHARE_LEVELS
    assert share_levels_up_to(1.0) == (0.5, 1.0)
    assert share_levels_up_to(1.5) == (0.5, 1.0, 1.5)
    assert share_levels_up_to(0.5) == (0.5,)
    table = table_of()
    space = build_search_space([list(range(len(table)))], table, budget=1200, share_levels=share_levels_up_to(1.0))
    assert {c.size for node in space.nodes for c in node.candidates[1:]} == {100, 300}  # caps 150 and 300
