"""The configuration file, and where each of a node's settings comes from.

A node's settings come in four layers, each overriding the one before:

1. ``default``: :class:`~edgenode.config.NodeConfig`'s defaults; the state
   directory is ``$EDGENODE_STATE_DIR``, else ``~/.local/state/edgenode``.
2. ``board NAME``: a board profile (``--board NAME`` or ``node.board`` in the
   file), which sizes the node for its board (:mod:`edgenode.profiles`).
3. ``file PATH``: a configuration file (``--config PATH``).
4. ``command line``: the flags of ``edgenode run``.

:func:`resolve` merges them into one validated ``NodeConfig`` and records,
for every setting, the layer its value came from; ``edgenode run
--print-config`` prints that table.

The file is TOML. Every key is optional and belongs to one section; keys
are named after the ``NodeConfig`` fields they set, without the section's
prefix (``keepalive.interval_s`` sets ``keepalive_interval_s``)::

    [node]
    board = "pi-zero-w"               # a profile listed by `edgenode boards`
    state_dir = "/var/lib/edgenode"   # relative paths are relative to this file
    listen = "0.0.0.0:7300"           # HOST:PORT or [IPV6]:PORT
    memory_budget_mb = 40
    shutdown_grace_s = 2.0
    control_socket = "/run/edgenode/control.sock"   # for `edgenode status`
    control_group = "edgenode"        # its members may use the control socket too

    [peers]
    connect = ["192.168.1.20:7300", "192.168.1.21"]   # port 7300 if omitted
    authorised = ["mmg4-2klg-yqzw-neis-krel-xms3-qjpg"]  # besides the state dir's list
    learn = true                      # dial authorised peers that peers tell us of
    max = 32                          # the registry's size cap
    prune_after_s = 3600.0
    handshake_timeout_s = 5.0
    max_handshakes_per_ip = 4
    max_handshakes = 64
    max_handshake_rate_per_ip = 4.0
    remember = true                   # redial peers that were up before a restart
    max_known = 256                   # peers remembered

    [keepalive]
    interval_s = 10.0                 # ping after this long without sending
    timeout_s = 30.0                  # a peer silent this long is down
    jitter = 0.1                      # 0 <= jitter < 0.5

    [backoff]
    base_s = 1.0                      # first redial delay
    cap_s = 60.0                      # longest redial delay

    [limits]
    max_frame_bytes = 65536           # 256 .. 16777216
    inbox_size = 128                  # events queued for the loop
    outbox_frames = 32                # frames queued per connection
    subscription_buffer = 256
    max_pending_requests = 256
    max_inflight_handlers = 32

    [serial]
    ports = ["/dev/serial0:115200", "/dev/ttyUSB0"]   # PORT[:BAUD]
    baud = 115200                     # for ports given without one
    psk_file = "/etc/edgenode/uart.key"
    reliable = false
    max_frame = 256                   # 128 .. 4096
    keepalive_interval_s = 1.0
    keepalive_timeout_s = 3.0

A layer that sets a keepalive interval but not its timeout gets a timeout of
three intervals (``--keepalive-interval 2`` alone means a 6 s timeout).
Command-line flags replace the file's values, lists included (``--peer``
replaces ``peers.connect``). The state directory's ``authorised_nodes``
file is trusted in addition to ``peers.authorised``.

Every bad value raises :class:`~edgenode.errors.ConfigError` naming the file,
the key, the value and what is allowed: ``/etc/edgenode.toml:
keepalive.interval_s: expected a number > 0, got 'soon'``. Unknown sections
and keys are errors too, with a suggestion when one is close.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

from .config import NodeConfig, parse_address
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9 and 3.10
    import tomli as tomllib

#: A configuration or profile file larger than this is refused unread.
MAX_FILE_BYTES = 1024 * 1024

DEFAULT = "default"
COMMAND_LINE = "command line"
ENVIRONMENT_STATE_DIR = "environment EDGENODE_STATE_DIR"

_RANKS = {"default": 0, "environment": 0, "board": 1, "file": 2, "command": 3}


def default_state_dir() -> Path:
    """``$EDGENODE_STATE_DIR``, else ``$XDG_STATE_HOME/edgenode`` (``~/.local/state/edgenode``)."""
    env = os.environ.get("EDGENODE_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "edgenode"


# -- values ------------------------------------------------------------------------


class _Expected(Exception):
    """A value is not what its key takes; carries the "expected ..." text."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _shown(value: object) -> str:
    """A value as the user wrote it, for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def _number(value: object, expected: str, ok: Callable[[float], bool]) -> float:
    # bool is an int to Python, not a number to a user; nan and inf are no duration.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Expected(expected)
    if not math.isfinite(value) or not ok(value):
        raise _Expected(expected)
    return float(value)


def _positive(value: object, base: Path | None) -> float:
    return _number(value, "a number > 0", lambda n: n > 0)


def _non_negative(value: object, base: Path | None) -> float:
    return _number(value, "a number >= 0", lambda n: n >= 0)


def _jitter(value: object, base: Path | None) -> float:
    return _number(value, "a number >= 0 and < 0.5", lambda n: 0 <= n < 0.5)


def _integer(low: int, high: int | None = None) -> Callable[[object, Path | None], int]:
    expected = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(value: object, base: Path | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Expected(expected)
        if value < low or (high is not None and value > high):
            raise _Expected(expected)
        return value

    return parse


def _boolean(value: object, base: Path | None) -> bool:
    if not isinstance(value, bool):
        raise _Expected("true or false")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Expected(what)
    return value.strip()


def _path(value: object, base: Path | None) -> Path:
    path = Path(_text(value, "a path"))
    # In a file, a relative path is relative to the file, not to wherever
    # the service manager happened to start the node.
    return base / path if base is not None and not path.is_absolute() else path


def _strings(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Expected(f"a list of {what}")
    return value


def _listen(value: object, base: Path | None) -> tuple[str, int]:
    return parse_address(_text(value, 'a "host:port" string'))


def _peer_list(value: object, base: Path | None) -> list[tuple[str, int]]:
    return [parse_address(text) for text in _strings(value, '"host:port" strings')]


def _node_ids(value: object, base: Path | None) -> frozenset[str]:
    from .identity import parse_node_id

    return frozenset(parse_node_id(text) for text in _strings(value, "node ID strings"))


def parse_serial_port(text: str) -> tuple[str, int | None]:
    """Parse ``PORT[:BAUD]``; the baud rate is None when not given.

    Raises :class:`ConfigError` (a bad or missing device path, a bad baud rate).
    """
    from .transports.serial import parse_serial_spec

    path, baud = parse_serial_spec(text)
    # parse_serial_spec returns the whole text as the path when it has no baud.
    return (path, None) if path == text else (path, baud)


def _serial_ports(value: object, base: Path | None) -> list[tuple[str, int | None]]:
    return [parse_serial_port(text) for text in _strings(value, '"PORT[:BAUD]" strings')]


def read_psk_file(path: Path) -> bytes:
    """Read a pre-shared key file: owner-only, 16 to 64 bytes (surrounding blanks stripped).

    Raises :class:`ConfigError` when the file is readable by others, cannot be
    read, or holds a key of the wrong size; never shows the key.
    """
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(
                f"{path} is readable by others (mode {mode:04o}); run: chmod 600 {path}"
            )
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return key


def _psk_file(value: object, base: Path | None) -> tuple[Path, bytes]:
    path = _path(value, base)
    key = read_psk_file(path)
    if not 16 <= len(key) <= 64:
        raise ConfigError(f"{path}: expected a key of 16..64 bytes, got {len(key)} bytes")
    return path, key


def _group(value: object, base: Path | None) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return _text(value, "a group name or number")


def _ipv4(value: object, base: Path | None) -> str:
    text = _text(value, "an IPv4 address")
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        raise _Expected("an IPv4 address") from None
    return text


def _board(value: object, base: Path | None) -> str:
    from .profiles import load_node_profile

    return load_node_profile(_text(value, "a board name")).name


# -- the keys ------------------------------------------------------------------------


class Setting:
    """One key of the configuration file and the NodeConfig field it sets."""

    __slots__ = ("field", "flag", "key", "parse", "profile")

    def __init__(
        self,
        key: str,
        field: str | None,
        parse: Callable[[Any, Path | None], object],
        *,
        profile: bool = False,
        flag: str | None = None,
    ) -> None:
        self.key = key
        #: The NodeConfig field, or None for a key that sets none (node.board)
        #: or several (node.listen).
        self.field = field
        self.parse = parse
        #: Whether a board profile may set it (sizes and timings, not places).
        self.profile = profile
        #: The ``edgenode run`` flag that overrides it, if any.
        self.flag = flag

    @property
    def section(self) -> str:
        return self.key.partition(".")[0]

    @property
    def name(self) -> str:
        return self.key.partition(".")[2]


_ANY = _integer(1)

SETTINGS: tuple[Setting, ...] = (
    Setting("node.board", None, _board, flag="--board"),
    Setting("node.state_dir", "state_dir", _path, flag="--state-dir"),
    Setting("node.listen", None, _listen, flag="--listen"),
    Setting("node.memory_budget_mb", "memory_budget_mb", _integer(16, 1_048_576), profile=True),
    Setting("node.shutdown_grace_s", "shutdown_grace_s", _non_negative),
    Setting("node.control_socket", "control_socket", _path),
    Setting("node.control_group", "control_group", _group),
    Setting("peers.connect", "peers", _peer_list, flag="--peer"),
    Setting("peers.authorised", "authorised", _node_ids, flag="--authorise"),
    Setting("peers.learn", "learn_peers", _boolean),
    Setting("peers.max", "max_peers", _ANY, profile=True),
    Setting("peers.prune_after_s", "prune_after_s", _positive),
    Setting(
        "peers.handshake_timeout_s",
        "handshake_timeout_s",
        _positive,
        profile=True,
        flag="--handshake-timeout",
    ),
    Setting("peers.max_handshakes_per_ip", "max_handshakes_per_ip", _ANY),
    Setting("peers.max_handshakes", "max_handshakes", _ANY),
    Setting("peers.max_handshake_rate_per_ip", "max_handshake_rate_per_ip", _positive),
    Setting("peers.remember", "remember_peers", _boolean),
    Setting("peers.max_known", "max_known_peers", _ANY, profile=True),
    Setting(
        "keepalive.interval_s",
        "keepalive_interval_s",
        _positive,
        profile=True,
        flag="--keepalive-interval",
    ),
    Setting(
        "keepalive.timeout_s",
        "keepalive_timeout_s",
        _positive,
        profile=True,
        flag="--keepalive-timeout",
    ),
    Setting("keepalive.jitter", "keepalive_jitter", _jitter, profile=True),
    Setting("backoff.base_s", "backoff_base_s", _positive, profile=True),
    Setting("backoff.cap_s", "backoff_cap_s", _positive, profile=True, flag="--backoff-cap"),
    Setting("limits.max_frame_bytes", "max_frame_bytes", _integer(256, 16 << 20), profile=True),
    Setting("limits.inbox_size", "inbox_size", _ANY, profile=True),
    Setting("limits.outbox_frames", "outbox_frames", _ANY, profile=True),
    Setting("limits.subscription_buffer", "subscription_buffer", _ANY, profile=True),
    Setting("limits.max_pending_requests", "max_pending_requests", _ANY, profile=True),
    Setting("limits.max_inflight_handlers", "max_inflight_handlers", _ANY, profile=True),
    Setting("serial.ports", "serial_ports", _serial_ports, flag="--serial"),
    Setting("serial.baud", "serial_baud", _integer(50, 4_000_000), profile=True),
    Setting("serial.psk_file", "serial_psk", _psk_file, flag="--serial-psk-file"),
    Setting("serial.reliable", "serial_reliable", _boolean, flag="--serial-reliable"),
    Setting("serial.max_frame", "serial_max_frame", _integer(128, 4096), profile=True),
    Setting("serial.keepalive_interval_s", "serial_keepalive_interval_s", _positive, profile=True),
    Setting("serial.keepalive_timeout_s", "serial_keepalive_timeout_s", _positive, profile=True),
    Setting("discovery.enabled", "discovery", _boolean, flag="--discovery"),
    Setting("discovery.port", "discovery_port", _integer(1, 65535)),
    Setting("discovery.address", "discovery_address", _ipv4),
    Setting("discovery.bind", "discovery_bind_host", _ipv4),
    Setting("discovery.interval_s", "discovery_interval_s", _positive),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))
#: NodeConfig field -> the key that sets it (for hints and error context).
KEY_OF_FIELD: dict[str, str] = {
    **{s.field: s.key for s in SETTINGS if s.field},
    "listen_host": "node.listen",
    "listen_port": "node.listen",
}
PROFILE_KEYS: frozenset[str] = frozenset(s.key for s in SETTINGS if s.profile)

# A timeout set below the layer of its interval follows it: 3 intervals.
_DERIVED_TIMEOUTS = (
    ("keepalive.interval_s", "keepalive.timeout_s"),
    ("serial.keepalive_interval_s", "serial.keepalive_timeout_s"),
)
_TIMEOUT_INTERVALS = 3


def _suggest(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


# -- reading TOML ----------------------------------------------------------------------


def parse_toml(data: bytes, label: str) -> dict[str, Any]:
    """Parse a TOML document; raise :class:`ConfigError` prefixed with ``label``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{label}: invalid TOML: not UTF-8 (at line {line})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message ends "(at line L, column C)".
        message = str(exc)
        raise ConfigError(f"{label}: invalid TOML: {message[:1].lower()}{message[1:]}") from None


def read_toml_file(path: Path) -> dict[str, Any]:
    """Read and parse one TOML file; raise :class:`ConfigError` naming it."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: file exceeds the {MAX_FILE_BYTES}-byte limit")
    return parse_toml(data, str(path))


def parse_sections(
    data: Mapping[str, Any],
    label: str,
    *,
    base: Path | None = None,
    allowed: frozenset[str] | None = None,
) -> dict[str, object]:
    """Check and convert a parsed document's ``[section] key = value`` entries.

    Returns ``{"section.key": value}`` with each value converted (a path, an
    address, a frozenset of node IDs...). ``base`` is the directory relative
    paths are resolved against; ``allowed`` restricts the keys (a board
    profile's). Raises :class:`ConfigError` starting ``"{label}: "`` for an
    unknown section or key, or a bad value.
    """
    values: dict[str, object] = {}
    for section, table in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{label}: {_unknown_top_level(section, table)}")
        if not isinstance(table, dict):
            raise ConfigError(
                f"{label}: {section}: expected a table [{section}], got {_shown(table)}"
            )
        for name, value in table.items():
            key = f"{section}.{name}"
            setting = BY_KEY.get(key)
            if setting is None:
                names = [s.name for s in SETTINGS if s.section == section]
                close = _suggest(name, names)
                if close:
                    hint = f"did you mean {section}.{close}?"
                else:
                    hint = f"[{section}] takes {', '.join(sorted(names))}"
                raise ConfigError(f"{label}: {key}: unknown key; {hint}")
            if allowed is not None and key not in allowed:
                raise ConfigError(f"{label}: {key}: not a setting a board profile may set")
            try:
                values[key] = setting.parse(value, base)
            except _Expected as exc:
                raise ConfigError(
                    f"{label}: {key}: expected {exc.expected}, got {_shown(value)}"
                ) from None
            except ConfigError as exc:
                raise ConfigError(f"{label}: {key}: {exc}") from None
    return values


def _unknown_top_level(name: str, value: object) -> str:
    if not isinstance(value, dict):
        # A flat key: perhaps a NodeConfig field or a key without its section.
        if name in KEY_OF_FIELD:
            return f"{name}: unknown key; did you mean {KEY_OF_FIELD[name]}?"
        homes = [s.key for s in SETTINGS if s.name == name]
        if homes:
            return f"{name}: unknown key; did you mean {' or '.join(homes)}?"
        return f"{name}: unknown key; keys belong in a section: {_section_list()}"
    close = _suggest(name, SECTIONS)
    hint = f"did you mean [{close}]? " if close else ""
    return f"[{name}]: unknown section; {hint}(sections: {_section_list()})"


def _section_list() -> str:
    return ", ".join(f"[{s}]" for s in SECTIONS)


def load_config_file(path: str | os.PathLike[str]) -> dict[str, object]:
    """Read a configuration file: ``{"section.key": converted value}``.

    Relative paths in it are relative to the file's directory. Raises
    :class:`ConfigError` naming the file for a missing or unreadable file,
    invalid TOML (with its line and column), an unknown section or key, or
    a bad value.
    """
    path = Path(path)
    data = read_toml_file(path)
    return parse_sections(data, str(path), base=path.parent.absolute())


# -- resolving the layers ------------------------------------------------------------


def _defaults() -> dict[str, object]:
    config = NodeConfig()
    values: dict[str, object] = {}
    for setting in SETTINGS:
        if setting.field is not None:
            values[setting.key] = getattr(config, setting.field)
    values["node.board"] = None
    values["node.state_dir"] = default_state_dir()
    values["node.listen"] = (config.listen_host, config.listen_port)
    values["serial.psk_file"] = None
    return values


def _rank(source: str) -> int:
    return _RANKS[source.partition(" ")[0]]


class Resolved:
    """A resolved configuration: the NodeConfig and where each setting came from."""

    __slots__ = ("board", "config", "sources", "values")

    def __init__(
        self,
        config: NodeConfig,
        values: dict[str, object],
        sources: dict[str, str],
        board: Any,
    ) -> None:
        self.config = config
        #: ``"section.key"`` -> its value (a path, an address, a number...).
        self.values = values
        #: ``"section.key"`` -> ``"default"``, ``"board NAME"``, ``"file PATH"``,
        #: ``"command line"`` (a derived timeout says so after its layer).
        self.sources = sources
        #: The :class:`~edgenode.profiles.Profile` applied, or None.
        self.board = board

    def rows(self) -> list[tuple[str, str, str]]:
        """``(key, value as text, source)`` for every setting, in the file's order."""
        return [
            (s.key, show_value(s.key, self.values[s.key]), self.sources[s.key]) for s in SETTINGS
        ]

    def format_table(self) -> str:
        """The settings as an aligned text table: key, value, source."""
        return format_table(("setting", "value", "source"), self.rows())


def show_value(key: str, value: object) -> str:
    """A setting's value as text for a table; never shows key material."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if key == "node.listen":
        return _host_port(*value)  # type: ignore[misc]
    if key == "serial.psk_file":
        path, psk = value  # type: ignore[misc]
        return f"{path} ({len(psk)}-byte key)"
    if key == "peers.connect":
        return ", ".join(_host_port(h, p) for h, p in value) or "(none)"  # type: ignore[attr-defined]
    if key == "serial.ports":
        ports = [p if b is None else f"{p}:{b}" for p, b in value]  # type: ignore[attr-defined]
        return ", ".join(ports) or "(none)"
    if isinstance(value, frozenset):
        return ", ".join(sorted(value)) or "(none)"
    return str(value)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Align ``rows`` under ``header`` in columns two spaces apart."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]
    ]
    return "\n".join(lines)


def resolve(
    *,
    board: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    command_line: Mapping[str, object] | None = None,
) -> Resolved:
    """Merge defaults < board profile < config file < command line into a NodeConfig.

    ``board`` is a node board's profile name (overriding the file's
    ``node.board``); ``config_file`` a TOML file (see the module docstring);
    ``command_line`` maps ``"section.key"`` to values already converted, as
    :func:`load_config_file` returns them (``"node.listen": ("0.0.0.0", 7300)``,
    ``"serial.ports": [("/dev/ttyUSB0", None)]``, ``"serial.psk_file": (path,
    key)``, numbers, booleans). Returns a :class:`Resolved` whose config is
    validated.

    Raises :class:`ConfigError`: a bad file (see :func:`load_config_file`),
    an unknown board or a microcontroller's, an unknown key in
    ``command_line``, or a combination ``NodeConfig.validate`` refuses.
    """
    from .profiles import load_node_profile

    cli = dict(command_line or {})
    for key in cli:
        if key not in BY_KEY:
            raise ConfigError(f"unknown setting {key!r}")
    file_values: dict[str, object] = {}
    file_source = ""
    if config_file is not None:
        file_values = load_config_file(config_file)
        file_source = f"file {config_file}"
    if board is not None:
        cli["node.board"] = board
    board_name = cli.get("node.board", file_values.get("node.board"))
    profile = load_node_profile(str(board_name)) if board_name is not None else None

    values = _defaults()
    sources = dict.fromkeys(values, DEFAULT)
    if os.environ.get("EDGENODE_STATE_DIR"):
        sources["node.state_dir"] = ENVIRONMENT_STATE_DIR
    layers: list[tuple[str, Mapping[str, object]]] = []
    if profile is not None:
        layers.append((f"board {profile.name}", profile.settings))
    layers += [(file_source, file_values), (COMMAND_LINE, cli)]
    for source, layer in layers:
        for key, value in layer.items():
            values[key] = value
            sources[key] = source
    for interval, timeout in _DERIVED_TIMEOUTS:
        if _rank(sources[interval]) > _rank(sources[timeout]):
            values[timeout] = _TIMEOUT_INTERVALS * float(values[interval])  # type: ignore[arg-type]
            sources[timeout] = f"{sources[interval]} ({_TIMEOUT_INTERVALS} x {interval})"

    config = _build(values)
    try:
        config.validate()
    except ConfigError as exc:
        raise _with_source(exc, sources) from None
    return Resolved(config, values, sources, profile)


def _build(values: Mapping[str, object]) -> NodeConfig:
    fields: dict[str, object] = {}
    for setting in SETTINGS:
        if setting.field is not None:
            fields[setting.field] = values[setting.key]
    fields["listen_host"], fields["listen_port"] = values["node.listen"]  # type: ignore[misc]
    psk = values["serial.psk_file"]
    fields["serial_psk"] = psk[1] if psk is not None else None  # type: ignore[index]
    baud = values["serial.baud"]
    fields["serial_ports"] = [
        (path, port_baud or baud)
        for path, port_baud in values["serial.ports"]  # type: ignore[attr-defined]
    ]
    fields["peers"] = list(values["peers.connect"])  # type: ignore[call-overload]
    return NodeConfig(**fields)  # type: ignore[arg-type]


def _with_source(exc: ConfigError, sources: Mapping[str, str]) -> ConfigError:
    """Add to a validation error which file or board set the fields it names.

    Values from the command line or the defaults need no pointer.
    """
    message = str(exc)
    named = []
    for field, key in KEY_OF_FIELD.items():
        source = sources.get(key, DEFAULT)
        if _rank(source) in (_RANKS["board"], _RANKS["file"]) and re.search(
            rf"(?<![a-z_]){field}(?![a-z_])", message
        ):
            named.append(f"{key} from {source}")
    if not named:
        return exc
    return ConfigError(f"{message} ({'; '.join(dict.fromkeys(named))})")
