"""A TOML document from plain values: what a node process is given as its config file.

The standard library reads TOML (``tomllib``) but does not write it;
:class:`~edgenode.testing.procs.NodeProcess` writes ``node.toml`` with
:func:`toml_text` before each start. Strings, paths, numbers, booleans and
lists only: all a node's settings need.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        if any(ord(c) < 0x20 for c in escaped):
            raise ValueError(f"control characters in TOML string {text!r}")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple, frozenset, set)):
        items = sorted(value) if isinstance(value, (frozenset, set)) else value
        return "[" + ", ".join(_toml_value(item) for item in items) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def toml_text(sections: Mapping[str, Mapping[str, object]]) -> str:
    """A TOML document of ``{section: {key: value}}`` (strings, paths, numbers, lists)."""
    lines: list[str] = []
    for section, values in sections.items():
        if not values:
            continue
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
