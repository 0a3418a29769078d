"""The only module that touches PEFT internals: the `MFTC` member of `PeftType` and the tuner registration.

PEFT has no plugin hook for new tuner types: `register_peft_method` accepts only names that are members of the
`PeftType` enum, and an enum cannot be extended by subclassing. We therefore add a real member through the enum's own
maps, so that `PeftType("MFTC")`, `PeftType.MFTC`, iteration, JSON, pickle and deepcopy behave as for built-in
members. Both steps are guarded, so importing or reloading the package twice is harmless.
"""

from __future__ import annotations


from peft.utils.peft_types import PeftType, register_peft_method

MFTC_NAME = "mftc"
MFTC_PREFIX = "mftc_"


def _add_peft_type_member(value: str) -> PeftType:
    """Add `value` as a member of `PeftType` (a no-op when it already is one) and return the member."""
    existing = PeftType._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    if hasattr(PeftType, "_add_member_"):  # Python 3.13+: keeps every private map consistent
        PeftType._add_member_(value, member)
    else:
        PeftType._member_map_[value] = member
        PeftType._member_names_.append(value)
        # A plain class attribute: Enum's own __setattr__ refuses names that look like members.
        type.__setattr__(PeftType, value, member)
    PeftType._value2member_map_[value] = member
    if hasattr(PeftType, "_sort_order_"):  # Python 3.12+ orders members by this when iterating
        member._sort_order_ = len(PeftType._member_names_) - 1
    return member


def mftc_peft_type() -> PeftType:
    """`PeftType.MFTC`, added to the enum on first use."""
    return _add_peft_type_member(MFTC_NAME.upper())


def register_tuner(config_cls: type, model_cls: type) -> PeftType:
    """Register `config_cls` / `model_cls` as PEFT's `mftc` tuner type. Idempotent: safe on a second import or
    `importlib.reload`. Takes the classes as arguments so that this module imports nothing of the package."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    member = mftc_peft_type()
    if member not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=MFTC_NAME, config_cls=config_cls, model_cls=model_cls, prefix=MFTC_PREFIX)
    return member
