"""Board profiles: how much a node may use on each board, and microcontrollers' UART defaults.

One TOML file per board lives in the repository's ``boards/`` directory
(``boards/pi-zero-w.toml``, ...). The wheel ships them as package data,
``edgenode/boards/*.toml`` (pyproject.toml maps the package
``edgenode.boards`` onto ``boards/``, taking only its ``.toml`` files, not
the microcontroller examples). They are read with ``importlib.resources``
through the ``edgenode`` package, so they load from an installed wheel, a
zipped one included, on every Python from 3.9; run from a source checkout
(or an editable install), where ``edgenode/boards`` does not exist, they are
read from the checkout's ``boards/``.

A node board's profile is a configuration file (:mod:`edgenode.settings`)
limited to sizes and timings, plus a ``[board]`` section::

    [board]
    kind = "node"
    description = "Raspberry Pi Zero W: ARMv6, 1 core, Wi-Fi"
    ram_mb = 512

    [node]
    memory_budget_mb = 40
    [peers]
    max = 32
    [limits]
    inbox_size = 128
    ...

A microcontroller's profile describes the device end of a UART link: its
RAM, what firmware_bridge's driver needs of it, the link settings
(``[serial]``: the same keys as a node's) and the UART its example in
``boards/<name>/main.py`` uses (``[uart]``)::

    [board]
    kind = "microcontroller"
    description = "Raspberry Pi Pico (RP2040) on MicroPython"
    ram_kb = 264
    memory_budget_kb = 64

    [serial]
    baud = 115200
    ...

    [uart]
    id = 0
    tx_pin = 0
    rx_pin = 1
    rxbuf_bytes = 512
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .config import NodeConfig
from .config_keys import BY_KEY, PROFILE_KEYS, format_table, parse_sections, parse_toml
from .errors import ConfigError

NODE = "node"
MICROCONTROLLER = "microcontroller"

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,39}\Z")
_SERIAL_KEYS = frozenset(k for k in PROFILE_KEYS if k.startswith("serial."))
_UART_KEYS = ("id", "tx_pin", "rx_pin", "rxbuf_bytes")


@dataclasses.dataclass(frozen=True)
class Profile:
    """One board's profile, as read from ``boards/<name>.toml``."""

    name: str
    #: ``"node"`` (a board that runs a node) or ``"microcontroller"``.
    kind: str
    description: str
    ram_kb: int
    #: Memory the node (or, on a microcontroller, firmware_bridge) is sized to use.
    memory_budget_kb: int
    #: ``"section.key"`` -> value, as a configuration file would set them.
    settings: Mapping[str, object]
    #: Microcontrollers: the UART their example uses (id, tx_pin, rx_pin, rxbuf_bytes).
    uart: Mapping[str, int]

    @property
    def is_node(self) -> bool:
        return self.kind == NODE

    def apply(self, config: NodeConfig | None = None) -> NodeConfig:
        """``config`` (default: NodeConfig's defaults) with this profile's settings applied.

        The result is not validated; call ``validate()``.
        """
        changes = {BY_KEY[key].field: value for key, value in self.settings.items()}
        return (config or NodeConfig()).replace(**changes)  # type: ignore[arg-type]

    def row(self) -> tuple[str, str, str, str, str, str]:
        """The profile's line in ``edgenode boards``."""
        s = self.settings
        if self.is_node:
            peers = str(s.get("peers.max", "-"))
            interval, timeout = s.get("keepalive.interval_s"), s.get("keepalive.timeout_s")
        else:
            peers = "-"
            interval = s.get("serial.keepalive_interval_s")
            timeout = s.get("serial.keepalive_timeout_s")
        keepalive = f"{_num(interval)} s / {_num(timeout)} s" if interval and timeout else "-"
        return (
            self.name,
            self.description,
            size_text(self.ram_kb),
            peers,
            keepalive,
            size_text(self.memory_budget_kb),
        )


def _num(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def size_text(kb: int) -> str:
    """``1048576`` -> ``"1 GB"``, ``524288`` -> ``"512 MB"``, ``264`` -> ``"264 KB"``."""
    for unit, size in (("GB", 1 << 20), ("MB", 1 << 10)):
        if kb >= size and kb % size == 0:
            return f"{kb // size} {unit}"
    return f"{kb} KB"


# -- finding and reading the files ---------------------------------------------------


def _profiles_dir() -> Any:
    """The directory of profile files: the package's, else the source checkout's.

    Reached through the ``edgenode`` package rather than by importing
    ``edgenode.boards``: that directory has no ``__init__.py``, and Python
    3.9's ``importlib.resources`` cannot open a namespace package.
    """
    packaged = importlib.resources.files(__package__).joinpath("boards")
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "boards"
    if checkout.is_dir():
        return checkout
    raise ConfigError(f"no board profiles: neither edgenode/boards nor {checkout} exists")


@functools.lru_cache(maxsize=1)
def _files() -> dict[str, Any]:
    return {
        entry.name[: -len(".toml")]: entry
        for entry in _profiles_dir().iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    }


def profile_names() -> list[str]:
    """The names of every profile, sorted."""
    return sorted(_files())


def list_profiles() -> list[Profile]:
    """Every profile: node boards, then microcontrollers, each smallest budget first.

    Raises :class:`ConfigError` if a profile file is malformed.
    """
    profiles = [load_profile(name) for name in profile_names()]
    return sorted(profiles, key=lambda p: (not p.is_node, p.memory_budget_kb, p.name))


def load_profile(name: str) -> Profile:
    """Load the profile called ``name`` (``"pi-4b"``).

    Raises :class:`ConfigError` for an unknown name (listing the known ones)
    or a malformed profile file.
    """
    files = _files()
    entry = files.get(name) if isinstance(name, str) and _NAME_RE.match(name) else None
    if entry is None:
        close = difflib.get_close_matches(str(name), list(files), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown board {name!r}; {hint}known boards: {', '.join(sorted(files))}")
    return _load(name, entry.read_bytes())


def load_node_profile(name: str) -> Profile:
    """Load the profile of a board that runs a node.

    Raises :class:`ConfigError` as :func:`load_profile` does, and for a
    microcontroller's profile.
    """
    profile = load_profile(name)
    if not profile.is_node:
        nodes = ", ".join(p.name for p in list_profiles() if p.is_node)
        raise ConfigError(
            f"board {name!r} is a microcontroller: its profile describes the device end of "
            f"a UART link, not a node; node boards: {nodes}"
        )
    return profile


@functools.cache
def _load(name: str, data: bytes) -> Profile:
    label = f"board profile {name}"
    document = parse_toml(data, label)
    board = document.pop("board", None)
    if not isinstance(board, dict):
        raise ConfigError(f"{label}: expected a [board] table")
    kind = board.get("kind")
    if kind == NODE:
        fields = {"kind", "description", "ram_mb"}
        uart: dict[str, int] = {}
        if "uart" in document:
            raise ConfigError(f"{label}: [uart]: only a microcontroller's profile has one")
        settings = parse_sections(document, label, allowed=PROFILE_KEYS)
        ram_kb = _board_int(board, "ram_mb", label) * 1024
        budget = settings.get("node.memory_budget_mb")
        if budget is None:
            raise ConfigError(f"{label}: node.memory_budget_mb: missing")
        budget_kb = int(budget) * 1024  # type: ignore[call-overload]
    elif kind == MICROCONTROLLER:
        fields = {"kind", "description", "ram_kb", "memory_budget_kb"}
        uart_table = document.pop("uart", {})
        if not isinstance(uart_table, dict):
            raise ConfigError(f"{label}: uart: expected a table [uart]")
        unknown = sorted(set(uart_table) - set(_UART_KEYS))
        if unknown:
            raise ConfigError(
                f"{label}: uart.{unknown[0]}: unknown key; [uart] takes {', '.join(_UART_KEYS)}"
            )
        uart = {key: _table_int(uart_table, key, f"{label}: uart", 0) for key in uart_table}
        settings = parse_sections(document, label, allowed=_SERIAL_KEYS)
        ram_kb = _board_int(board, "ram_kb", label)
        budget_kb = _board_int(board, "memory_budget_kb", label)
    else:
        raise ConfigError(
            f"{label}: board.kind: expected {NODE!r} or {MICROCONTROLLER!r}, got {kind!r}"
        )
    unknown = sorted(set(board) - fields)
    if unknown:
        raise ConfigError(
            f"{label}: board.{unknown[0]}: unknown key; [board] takes {', '.join(sorted(fields))}"
        )
    description = board.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ConfigError(f"{label}: board.description: expected a non-empty string")
    return Profile(
        name=name,
        kind=kind,
        description=description.strip(),
        ram_kb=ram_kb,
        memory_budget_kb=budget_kb,
        settings=MappingProxyType(settings),
        uart=MappingProxyType(uart),
    )


def _board_int(board: Mapping[str, object], key: str, label: str) -> int:
    return _table_int(board, key, f"{label}: board", 1)


def _table_int(table: Mapping[str, object], key: str, where: str, low: int) -> int:
    value = table.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        got = "nothing" if value is None else repr(value)
        raise ConfigError(f"{where}.{key}: expected an integer >= {low}, got {got}")
    return value


def format_profiles(profiles: list[Profile]) -> str:
    """The table ``edgenode boards`` prints."""
    header = ("board", "description", "RAM", "peers", "keepalive", "memory budget")
    return format_table(header, [p.row() for p in profiles])
