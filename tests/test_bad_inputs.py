"""Issue 13: bad input never slips through. Every row is one bad input; each must fail with a message that names the
argument (or file), states the rule and echoes the value, and leave the user's model as it was.

Sections: config fields (items 5, 8, 9, 10), checkpoints (1, 2, 12), merge (3), warm-up (4, 11, 15), probes (7),
command line (6, 14, 15, 16). `test_count_of_bad_inputs` keeps the number the issue's note reports honest.
"""

import copy

import pytest
from tiny_models import CASES_BY_NAME

import mftc_peft  # noqa: F401
from mftc_peft import MFTCConfig

# ------------------------------------------------------------------------------------------------- config fields
CONFIG_CASES = [
    # item 5: booleans must be booleans ("no" is truthy)
    ({"init_weights": "no"}, r"`init_weights` must be True or False, got 'no'"),
    ({"init_weights": 0}, r"`init_weights` must be True or False, got 0"),
    ({"head_blocks": "false"}, r"`head_blocks` must be True or False, got 'false'"),
    # item 8: regexes and module-name types
    ({"target_modules": "query("}, r"`target_modules` must be a valid regular expression, got 'query\(' \(missing \)"),
    ({"target_modules": ["query", "key["]}, r"`target_modules` must be module names or valid regular expressions, "
                                           r"got 'key\['"),
    ({"exclude_modules": "(value"}, r"`exclude_modules` must be a valid regular expression, got '\(value'"),
    ({"block_selection": {"query(": [0]}}, r"`block_selection` must be keyed by module names or valid regular "
                                           r"expressions, got 'query\('"),
    ({"target_modules": 123}, r"`target_modules` must be a string or a list of strings, got 123"),
    ({"target_modules": ["query", 5]}, r"`target_modules` must be a string or a list of strings, got \['query', 5\]"),
    # item 9: fields PEFT reads itself
    ({"modules_to_save": "classifier"}, r"`modules_to_save` must be a list of module names, got the string "
                                        r"'classifier' \(write \['classifier'\]\)"),
    ({"layers_pattern": 5}, r"`layers_pattern` must be a string or a list of strings, got 5"),
    ({"layers_to_transform": "0"}, r"`layers_to_transform` must be a non-negative integer or a list of them, got '0'"),
    # item 10: accepted before, then failing deep in the warm-up
    ({"seed": -1}, r"`seed` must be a non-negative integer, got -1"),
    ({"embed_dim": 1}, r"`embed_dim` must be an integer >= 2, got 1"),
    ({"signature_window": 1}, r"`signature_window` must be an integer >= 2, got 1"),
]


@pytest.mark.parametrize("kwargs, match", CONFIG_CASES, ids=[str(k) for k, _ in CONFIG_CASES])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MFTCConfig(**kwargs)


def test_unsorted_block_ids_are_sorted_in_the_config():
    """Item 1: `[3, 1]` was accepted and reported unsorted while the layer trains blocks [1, 3]."""
    assert MFTCConfig(block_selection={"query": [3, 1]}).block_selection == {"query": [1, 3]}
