"""The Markdown table of `MFTCConfig`'s fields, rendered from their help metadata (README embeds it).

    python scripts/config_table.py          # rewrite README.md's table between the markers
    python scripts/config_table.py --check  # exit 1 if README.md's table is out of date
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import MFTCConfig

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def own_fields(cls=MFTCConfig) -> list[dataclasses.Field]:
    """The fields MFTC declares (PEFT's inherited ones such as `task_type` are documented by PEFT)."""
    own = cls.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(cls) if f.name in own]


def field_default(name: str, cls=MFTCConfig):
    """The default value of one config field (e.g. for command-line help, so that it cannot drift)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_config_table(cls=MFTCConfig) -> str:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for f in own_fields(cls):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append(
            f"| `{f.name}` | `{_cell(kind)}` | `{_cell(_default(f))}` | {_cell(f.metadata.get('help', ''))} |"
        )
    return "\n".join(rows)


def replace_table(text: str, table: str) -> str:
    """`text` with everything between the markers replaced by `table`; a `ValueError` if the markers are missing."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the text must contain {START!r} followed by {END!r}")
    return text[: start + len(START)] + "\n" + table + "\n" + text[end:]


def update_readme(path: str | Path, *, check: bool = False) -> bool:
    """Write the current table into `path` (or, with `check`, only report). Returns whether it was up to date."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    updated = replace_table(text, render_config_table())
    if updated != text and not check:
        path.write_text(updated, encoding="utf-8")
    return updated == text
