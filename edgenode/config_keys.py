"""The configuration file's keys: every ``[section] key``, the check and
conversion of its value, and the reading of TOML.

This is the table both the configuration file (:mod:`edgenode.settings`)
and the board profiles (:mod:`edgenode.profiles`) are read with; the layers
(defaults < board < file < command line) are :mod:`edgenode.settings`'s.
Every bad value raises :class:`~edgenode.errors.ConfigError` naming the
key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

from firmware_bridge.frame import MAX_FRAME_BYTES, MAX_PSK_BYTES, MIN_FRAME_BYTES, MIN_PSK_BYTES

from .config import MAX_BAUD, MIN_BAUD, SerialPortSpec, parse_address, parse_serial_spec
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9 and 3.10
    import tomli as tomllib

#: A configuration or profile file larger than this is refused unread.
MAX_FILE_BYTES = 1024 * 1024


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


def parse_serial_port(text: str) -> SerialPortSpec:
    """Parse ``PORT[:BAUD][,dtr=on|off][,rts=on|off]``; what is not given is None.

    Raises :class:`ConfigError` (a bad or missing device path, a bad baud rate
    or option).
    """
    return parse_serial_spec(text)


def _serial_ports(value: object, base: Path | None) -> list[SerialPortSpec]:
    what = '"PORT[:BAUD][,dtr=on|off][,rts=on|off]" strings'
    return [parse_serial_port(text) for text in _strings(value, what)]


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
    if not MIN_PSK_BYTES <= len(key) <= MAX_PSK_BYTES:
        raise ConfigError(
            f"{path}: expected a key of {MIN_PSK_BYTES}..{MAX_PSK_BYTES} bytes, "
            f"got {len(key)} bytes"
        )
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
    # Only its form here: whether a profile of that name exists, and is a
    # node's, is checked where the file is loaded (edgenode.settings), which
    # may import the profiles; this table may not (profiles use it).
    return _text(value, "a board name")


# -- the [uplink] section (edgenode.uplink.config checks each value) -----------------


def _uplink_check(check_name: str, *args: object) -> Callable[[object, Path | None], object]:
    """A parser that runs one of edgenode.uplink.config's checks (loaded only when used)."""

    def parse(value: object, base: Path | None) -> object:
        from .uplink import config as uplink_config

        getattr(uplink_config, check_name)(value, *args)
        return value

    return parse


def _uplink_text(value: object, base: Path | None) -> str:
    return _text(value, "non-empty text")


def _uplink_broker(value: object, base: Path | None) -> str:
    from .uplink.config import parse_broker

    parse_broker(value)
    return str(value).strip()


def _uplink_prefix(value: object, base: Path | None) -> str:
    from .uplink.config import UplinkConfig

    UplinkConfig(broker="mqtt://x", prefix=_text(value, "a topic")).validate()
    return str(value)


def _uplink_protocol(value: object, base: Path | None) -> str:
    from .uplink.config import PROTOCOLS

    if value not in PROTOCOLS:
        raise _Expected(" or ".join(f'"{p}"' for p in PROTOCOLS))
    return str(value)


def _uplink_policy(value: object, base: Path | None) -> str:
    from .uplink.config import POLICIES

    if value not in POLICIES:
        raise _Expected(" or ".join(f'"{p}"' for p in POLICIES))
    return str(value)


def _uplink_password_file(value: object, base: Path | None) -> tuple[Path, str]:
    path = _path(value, base)
    secret = read_psk_file(path)
    try:
        password = secret.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: expected a UTF-8 password") from None
    if not password:
        raise ConfigError(f"{path}: expected a password, got an empty file")
    return path, password


def _uplink_maps(kind: str) -> Callable[[object, Path | None], tuple[object, ...]]:
    """``[[uplink.out]]`` / ``[[uplink.in]]``: a list of tables, each a map."""

    def parse(value: object, base: Path | None) -> tuple[object, ...]:
        from .uplink.config import InMap, OutMap

        cls = OutMap if kind == "out" else InMap
        keys = ("topic", "to", "qos") if kind == "out" else ("topic", "to", "deliver", "qos")
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise _Expected(f"a list of tables ([[uplink.{kind}]] entries)")
        maps = []
        for number, table in enumerate(value, 1):
            unknown = sorted(set(table) - set(keys))
            if unknown:
                raise ConfigError(
                    f"entry {number}: {unknown[0]}: unknown key; [[uplink.{kind}]] takes "
                    f"{', '.join(keys)}"
                )
            if "topic" not in table:
                raise ConfigError(f"entry {number}: topic: missing")
            entry = cls(**table)
            try:
                entry.validate()
            except ConfigError as exc:
                raise ConfigError(f"entry {number}: {exc}") from None
            maps.append(entry)
        return tuple(maps)

    return parse


#: ``[uplink]`` keys -> UplinkConfig fields (``password_file`` sets two).
UPLINK_FIELDS = {
    "broker": "broker",
    "client_id": "client_id",
    "username": "username",
    "password_file": "password_file",
    "ca_file": "ca_file",
    "cert_file": "cert_file",
    "key_file": "key_file",
    "keepalive_s": "keepalive_s",
    "clean_session": "clean_session",
    "protocol": "protocol",
    "prefix": "prefix",
    "out": "outbound",
    "in": "inbound",
    "queue_messages": "queue_messages",
    "queue_bytes": "queue_bytes",
    "queue_policy": "queue_policy",
    "spool_bytes": "spool_bytes",
    "reconnect_base_s": "reconnect_base_s",
    "reconnect_cap_s": "reconnect_cap_s",
    "connect_timeout_s": "connect_timeout_s",
}


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
    Setting("limits.handler_timeout_s", "handler_timeout_s", _positive),
    Setting("limits.subscriber_stall_timeout_s", "subscriber_stall_timeout_s", _positive),
    Setting("serial.ports", "serial_ports", _serial_ports, flag="--serial"),
    Setting("serial.baud", "serial_baud", _integer(MIN_BAUD, MAX_BAUD), profile=True),
    Setting("serial.dtr", "serial_dtr", _boolean, profile=True),
    Setting("serial.rts", "serial_rts", _boolean, profile=True),
    Setting("serial.psk_file", "serial_psk", _psk_file, flag="--serial-psk-file"),
    Setting("serial.reliable", "serial_reliable", _boolean, flag="--serial-reliable"),
    Setting(
        "serial.max_frame",
        "serial_max_frame",
        _integer(MIN_FRAME_BYTES, MAX_FRAME_BYTES),
        profile=True,
    ),
    Setting("serial.keepalive_interval_s", "serial_keepalive_interval_s", _positive, profile=True),
    Setting("serial.keepalive_timeout_s", "serial_keepalive_timeout_s", _positive, profile=True),
    Setting("discovery.enabled", "discovery", _boolean, flag="--discovery"),
    Setting("discovery.port", "discovery_port", _integer(1, 65535)),
    Setting("discovery.address", "discovery_address", _ipv4),
    Setting("discovery.bind", "discovery_bind_host", _ipv4),
    Setting("discovery.interval_s", "discovery_interval_s", _positive),
    # The MQTT uplink (docs/fleet.md): one UplinkConfig, built by _build_uplink.
    Setting("uplink.broker", None, _uplink_broker, flag="--uplink"),
    Setting("uplink.client_id", None, _uplink_text),
    Setting("uplink.username", None, _uplink_text),
    Setting("uplink.password_file", None, _uplink_password_file, flag="--uplink-password-file"),
    Setting("uplink.ca_file", None, _path),
    Setting("uplink.cert_file", None, _path),
    Setting("uplink.key_file", None, _path),
    Setting("uplink.keepalive_s", None, _integer(5, 65535)),
    Setting("uplink.clean_session", None, _boolean),
    Setting("uplink.protocol", None, _uplink_protocol),
    Setting("uplink.prefix", None, _uplink_prefix),
    Setting("uplink.out", None, _uplink_maps("out")),
    Setting("uplink.in", None, _uplink_maps("in")),
    Setting("uplink.queue_messages", None, _integer(1)),
    Setting("uplink.queue_bytes", None, _integer(1)),
    Setting("uplink.queue_policy", None, _uplink_policy),
    Setting("uplink.spool_bytes", None, _uplink_check("check_spool_bytes")),
    Setting("uplink.reconnect_base_s", None, _positive),
    Setting("uplink.reconnect_cap_s", None, _positive),
    Setting("uplink.connect_timeout_s", None, _positive),
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


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Align ``rows`` under ``header`` in columns two spaces apart."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]
    ]
    return "\n".join(lines)
