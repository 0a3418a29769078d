"""Argument checks shared by every module: one place, one argument order `(name, value, ...)`, one message shape.

Every failure raises ValueError "`name` must be <rule>, got <value!r>". Booleans are never numbers here: `True` is
not a count of 1 and not a learning rate of 1.0.
"""

from __future__ import annotations

import math
import numbers
import operator
import re

import numpy as np


def is_int(value) -> bool:
    """An integer (Python, numpy or anything with `__index__`), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def is_real(value) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value, *, minimum: int = 1) -> int:
    if not (is_int(value) and operator.index(value) >= minimum):
        rule = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"`{name}` must be {rule}, got {value!r}")
    return operator.index(value)


def check_positive_number(name: str, value) -> float:
    if not (is_real(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive number, got {value!r}")
    return float(value)


def check_number(name: str, value, *, minimum: float | None = None, allow_inf: bool = True) -> float:
    """A real number (not NaN), optionally finite and >= `minimum`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (allow_inf or math.isfinite(value)) and (minimum is None or value >= minimum)
    if not ok:
        if minimum is None:
            rule = "a number"
        else:
            rule = "a non-negative number" if minimum == 0 else f"a number >= {minimum:g}"
        raise ValueError(f"`{name}` must be {rule}, got {value!r}")
    return float(value)


def check_range(name: str, value, low: float, high: float, rule: str) -> float:
    """`low <= value < high` (inf allowed as `high`); `rule` is how the message states it."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and low <= value < high):
        raise ValueError(f"`{name}` must be {rule}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices: tuple):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def check_rng(name: str, value) -> np.random.Generator:
    """A numpy Generator as it is, or a non-negative integer seed turned into one."""
    if isinstance(value, np.random.Generator):
        return value
    if is_int(value) and operator.index(value) >= 0:
        return np.random.default_rng(operator.index(value))
    raise ValueError(f"`{name}` must be a numpy Generator or a non-negative integer seed, got {value!r}")


def check_bool(name: str, value) -> bool:
    """`True` or `False` only: a string such as "no" is truthy and would silently mean the opposite."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return bool(value)


def check_regex(name: str, pattern: str, *, rule: str = "a valid regular expression") -> str:
    """A string that compiles as a regular expression (module names are matched as regexes); `rule` as stated."""
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"`{name}` must be {rule}, got {pattern!r} ({error})") from None
    return pattern


def check_names(name: str, value, *, allow_str: bool = True, regex: bool = False):
    """None, a string (if `allow_str`) or a list / tuple / set of strings; with `regex`, each must compile."""
    if value is None:
        return value
    if isinstance(value, str):
        if not allow_str:
            raise ValueError(f"`{name}` must be a list of module names, got the string {value!r} (write [{value!r}])")
        return check_regex(name, value) if regex else value
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
        rule = "a string or a list of strings" if allow_str else "a list of module names (strings)"
        raise ValueError(f"`{name}` must be {rule}, got {value!r}")
    if regex:
        for entry in value:
            check_regex(name, entry, rule="module names or valid regular expressions")
    return value
