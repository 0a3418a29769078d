"""Checks of `MFTCConfig`'s fields that need more than one line (several fields together, module names, the
selection), and what the budget means in elements. Pure functions of the config's values; `config.py` calls them."""

from __future__ import annotations

import operator

from .allocation import FFN_COUPLINGS
from .checks import check_choice, check_int, check_names, check_positive_number, check_range, check_regex, is_int
from .residual import BLOCK_ENERGIES


def check_search_fields_unused(config) -> None:
    if config.allocation != "proportional":
        return
    ignored = {name: value for name, value, default in (
        ("probe", config.probe, "taylor"), ("block_score", config.block_score, "energy"),
        ("loss_threshold", config.loss_threshold, None), ("confidence", config.confidence, 0.0),
    ) if value != default}
    if ignored:
        raise ValueError(
            f"allocation='proportional' runs no module search, so these fields would have no effect; leave them at "
            f"their defaults or use allocation='search', got {ignored!r}"
        )


def check_ffn_coupling(config) -> None:
    check_choice("ffn_coupling", config.ffn_coupling, FFN_COUPLINGS)
    if config.ffn_coupling == "none":
        return
    if config.allocation != "proportional":
        raise ValueError(f"`ffn_coupling` only applies to allocation='proportional' (the module search sets no "
                         f"quotas to fill), got ffn_coupling={config.ffn_coupling!r} with allocation="
                         f"{config.allocation!r}")
    if config.block_axis != "auto":
        raise ValueError(f"`ffn_coupling={config.ffn_coupling!r}` needs block_axis='auto' (FFN producers cut along "
                         f"'out', the consumer along 'in', so a neuron group has one block id in all of them), got "
                         f"block_axis={config.block_axis!r}")


def check_low_rank(config) -> None:
    check_int("low_rank", config.low_rank, minimum=0)
    if config.low_rank_share is not None:
        check_range("low_rank_share", config.low_rank_share, 0.0, 1.0, "a number in [0, 1) or None")
    if config.low_rank_alpha is None:
        return
    if config.low_rank == 0 and config.low_rank_share == 0:
        raise ValueError(f"`low_rank_alpha` only applies with a low-rank part (low_rank > 0 or low_rank_share > 0; it "
                         f"scales the part), got low_rank_alpha={config.low_rank_alpha!r} with low_rank=0 and "
                         f"low_rank_share=0")
    check_positive_number("low_rank_alpha", config.low_rank_alpha)


def check_block_energy(config) -> None:
    check_choice("block_energy", config.block_energy, BLOCK_ENERGIES)
    if config.block_energy == "outside_low_rank" and config.low_rank == 0 and config.low_rank_share == 0:
        raise ValueError(
            "`block_energy='outside_low_rank'` measures what a low-rank part would not learn and needs one "
            f"(low_rank > 0 or low_rank_share > 0 or None), got low_rank={config.low_rank!r} and "
            f"low_rank_share={config.low_rank_share!r}"
        )


def check_module_fields(config) -> None:
    """The module-name fields PEFT reads: strings where PEFT expects them, regexes that compile."""
    check_names("target_modules", config.target_modules, regex=True)
    check_names("exclude_modules", config.exclude_modules, regex=True)
    check_names("layers_pattern", config.layers_pattern)
    # PEFT extends this list with the task's head: a string would be extended character by character, or fail.
    check_names("modules_to_save", config.modules_to_save, allow_str=False)
    layers = config.layers_to_transform
    if layers is not None and not (is_int(layers) and layers >= 0) and not (
        isinstance(layers, (list, tuple)) and all(is_int(i) and i >= 0 for i in layers)
    ):
        raise ValueError(f"`layers_to_transform` must be a non-negative integer or a list of them, got {layers!r}")


def budget_elements(budget, target_elements: int) -> int:
    """`budget` in elements: a float is a share of the target weights, an int a count of elements."""
    return int(budget) if isinstance(budget, int) else int(budget * target_elements)


def check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"`budget` must be a float in (0, 1] or a positive int, got {budget!r}")
    if isinstance(budget, int) and budget <= 0:
        raise ValueError(f"`budget` as an int is a count of trainable elements and must be positive, got {budget!r}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"`budget` as a float is a share of the target weights and must be in (0, 1], got {budget!r}")


def normalise_selection(selection) -> dict[str, list[int]]:
    """Plain `{str: [int, ...]}` (JSON-safe: no nested sets or tuples), ids non-negative, unique and sorted per key."""
    if selection is None:
        return {}
    if not isinstance(selection, dict):
        raise ValueError(f"`block_selection` must be a dict of module name -> list of block ids, got {selection!r}")
    normalised = {}
    for key, ids in selection.items():
        if not isinstance(key, str):
            raise ValueError(f"`block_selection` keys must be module names (str), got {key!r}")
        check_regex("block_selection", key, rule="keyed by module names or valid regular expressions")
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise ValueError(f"`block_selection[{key!r}]` must be a list of block ids, got {ids!r}")
        ids = list(ids)
        if any(not is_int(i) or i < 0 for i in ids):
            raise ValueError(f"`block_selection[{key!r}]` block ids must be non-negative integers, got {ids!r}")
        ids = [operator.index(i) for i in ids]  # numpy / torch integers -> int, so the config stays JSON-safe
        if len(set(ids)) != len(ids):
            raise ValueError(f"`block_selection[{key!r}]` block ids must be unique, got {ids!r}")
        normalised[key] = sorted(ids)  # ids name a set of blocks: sorted, as the layers hold and save them
    return normalised
