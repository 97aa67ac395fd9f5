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
    handler_timeout_s = 30.0
    subscriber_stall_timeout_s = 30.0

    [serial]
    ports = ["/dev/serial0:115200", "/dev/ttyUSB0,rts=off"]   # PORT[:BAUD][,dtr=..][,rts=..]
    baud = 115200                     # for ports given without one
    dtr = true                        # DTR and RTS at open, for ports that do not say
    rts = true                        # (true asserts the line; the board profile's default)
    psk_file = "/etc/edgenode/uart.key"
    reliable = false
    max_frame = 256                   # 128 .. 4096
    keepalive_interval_s = 1.0
    keepalive_timeout_s = 3.0

    [uplink]                          # an MQTT broker for chosen topics (docs/fleet.md)
    broker = "mqtts://broker.example.net:8883"
    username = "site-a"
    password_file = "/etc/edgenode/mqtt.password"
    [[uplink.out]]
    topic = "sensors/#"

A layer that sets a keepalive interval but not its timeout gets a timeout of
three intervals (``--keepalive-interval 2`` alone means a 6 s timeout).
Command-line flags replace the file's values, lists included (``--peer``
replaces ``peers.connect``). The state directory's ``authorised_nodes``
file is trusted in addition to ``peers.authorised``.

Peers are keyed by IP address (one connection per IP): two entries of
``peers.connect`` with one IP are one peer, and the last one is kept, with
a warning. A peer that is the node itself is a configuration error: its
own listen address, or, for a node listening on every address
(``0.0.0.0`` or ``::``), one of this host's addresses at the node's own
port, which the node would dial, refuse and redial for ever.

Every bad value raises :class:`~edgenode.errors.ConfigError` naming the file,
the key, the value and what is allowed: ``/etc/edgenode.toml:
keepalive.interval_s: expected a number > 0, got 'soon'``. Unknown sections
and keys are errors too, with a suggestion when one is close.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import NodeConfig
from .config_keys import (
    BY_KEY,
    KEY_OF_FIELD,
    MAX_FILE_BYTES,
    PROFILE_KEYS,
    SECTIONS,
    SETTINGS,
    UPLINK_FIELDS,
    Setting,
    format_table,
    parse_sections,
    parse_serial_port,
    parse_toml,
    read_psk_file,
    read_toml_file,
)
from .errors import ConfigError
from .peer_list import check_peers, host_port

# The table is config_keys'; these names stay importable from here.
__all__ = [
    "BY_KEY",
    "COMMAND_LINE",
    "DEFAULT",
    "ENVIRONMENT_STATE_DIR",
    "KEY_OF_FIELD",
    "MAX_FILE_BYTES",
    "PROFILE_KEYS",
    "SECTIONS",
    "SETTINGS",
    "UPLINK_FIELDS",
    "Resolved",
    "Setting",
    "check_peers",
    "default_state_dir",
    "format_table",
    "load_config_file",
    "parse_sections",
    "parse_serial_port",
    "parse_toml",
    "read_psk_file",
    "read_toml_file",
    "resolve",
    "show_value",
]

log = logging.getLogger("edgenode.settings")

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


_DERIVED_TIMEOUTS = (
    ("keepalive.interval_s", "keepalive.timeout_s"),
    ("serial.keepalive_interval_s", "serial.keepalive_timeout_s"),
)
_TIMEOUT_INTERVALS = 3


def load_config_file(path: str | os.PathLike[str]) -> dict[str, object]:
    """Read a configuration file: ``{"section.key": converted value}``.

    Relative paths in it are relative to the file's directory. Raises
    :class:`ConfigError` naming the file for a missing or unreadable file,
    invalid TOML (with its line and column), an unknown section or key, or
    a bad value.
    """
    from .profiles import load_node_profile

    path = Path(path)
    data = read_toml_file(path)
    values = parse_sections(data, str(path), base=path.parent.absolute())
    board = values.get("node.board")
    if board is not None:
        try:
            values["node.board"] = load_node_profile(str(board)).name
        except ConfigError as exc:
            raise ConfigError(f"{path}: node.board: {exc}") from None
    return values


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
    for name in UPLINK_FIELDS:
        values[f"uplink.{name}"] = None
    return values


def _rank(source: str) -> int:
    return _RANKS[source.partition(" ")[0]]


class Resolved:
    """A resolved configuration: the NodeConfig and where each setting came from."""

    __slots__ = ("board", "config", "sources", "values", "warnings")

    def __init__(
        self,
        config: NodeConfig,
        values: dict[str, object],
        sources: dict[str, str],
        board: Any,
        warnings: list[str] | None = None,
    ) -> None:
        self.config = config
        #: ``"section.key"`` -> its value (a path, an address, a number...).
        self.values = values
        #: ``"section.key"`` -> ``"default"``, ``"board NAME"``, ``"file PATH"``,
        #: ``"command line"`` (a derived timeout says so after its layer).
        self.sources = sources
        #: The :class:`~edgenode.profiles.Profile` applied, or None.
        self.board = board
        #: What the configuration does that its author may not expect
        #: (logged as warnings by :func:`resolve`).
        self.warnings = list(warnings or ())

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
        return host_port(*value)  # type: ignore[misc]
    if key == "serial.psk_file":
        path, psk = value  # type: ignore[misc]
        return f"{path} ({len(psk)}-byte key)"
    if key == "uplink.password_file":
        return f"{value[0]} (password hidden)"  # type: ignore[index]
    if key in ("uplink.out", "uplink.in"):
        return "; ".join(_show_map(m) for m in value) or "(none)"  # type: ignore[attr-defined]
    if key == "peers.connect":
        return ", ".join(host_port(h, p) for h, p in value) or "(none)"  # type: ignore[attr-defined]
    if key == "serial.ports":
        return ", ".join(str(spec) for spec in value) or "(none)"  # type: ignore[attr-defined]
    if isinstance(value, frozenset):
        return ", ".join(sorted(value)) or "(none)"
    return str(value)


def _show_map(entry: Any) -> str:
    if hasattr(entry, "deliver"):
        return f"{entry.topic} -> {entry.node_template} ({entry.deliver}, qos {entry.qos})"
    return f"{entry.topic} -> {entry.broker_template} (qos {entry.qos})"


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

    uplink_set = [k for k in values if k.startswith("uplink.") and values[k] is not None]
    if uplink_set and values["uplink.broker"] is None:
        raise ConfigError(
            f"uplink.broker: expected a broker URL with the other [uplink] settings "
            f"({uplink_set[0]} from {sources[uplink_set[0]]})"
        )
    config = _build(values)
    if config.uplink is not None:
        _show_uplink_defaults(config, values, sources)
    try:
        config.validate()
    except ConfigError as exc:
        raise _with_source(exc, sources) from None
    peers, warnings = check_peers(config, where=_where("peers.connect", sources["peers.connect"]))
    config = config.replace(peers=peers)
    values["peers.connect"] = peers
    for warning in warnings:
        log.warning("%s", warning)
    return Resolved(config, values, sources, profile, warnings)


# -- peers ------------------------------------------------------------------------------


def _where(key: str, source: str) -> str:
    if source.startswith("file "):
        return f"{source[5:]}: {key}"
    return "--peer" if source == COMMAND_LINE and key == "peers.connect" else key


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
        spec._replace(baud=spec.baud or baud)
        for spec in values["serial.ports"]  # type: ignore[attr-defined]
    ]
    fields["peers"] = list(values["peers.connect"])  # type: ignore[call-overload]
    fields["uplink"] = _build_uplink(values)
    return NodeConfig(**fields)  # type: ignore[arg-type]


def _build_uplink(values: Mapping[str, object]) -> object:
    """The UplinkConfig the ``uplink.*`` keys set, or None without ``uplink.broker``."""
    if values["uplink.broker"] is None:
        return None
    from .uplink.config import UplinkConfig

    fields: dict[str, object] = {}
    for name, field in UPLINK_FIELDS.items():
        value = values[f"uplink.{name}"]
        if value is None:
            continue
        if name == "password_file":
            fields["password_file"], fields["password"] = value  # type: ignore[misc]
        else:
            fields[field] = value
    return UplinkConfig(**fields)  # type: ignore[arg-type]


def _show_uplink_defaults(
    config: NodeConfig, values: dict[str, object], sources: dict[str, str]
) -> None:
    """Put the uplink's defaults (and the queue caps derived from the memory
    budget) in ``values``, so ``--print-config`` shows what the node will use."""
    from .uplink.config import QUEUE_SHARE_OF_BUDGET, derived_queue_caps

    uplink = config.uplink
    for name, field in UPLINK_FIELDS.items():
        key = f"uplink.{name}"
        if values[key] is None and name != "password_file":
            values[key] = getattr(uplink, field)
    derived = derived_queue_caps(config.memory_budget_mb)
    budget = sources["node.memory_budget_mb"]
    for key, value in zip(("uplink.queue_messages", "uplink.queue_bytes"), derived):
        if values[key] is None:
            values[key] = value
            sources[key] = f"{budget} (1/{QUEUE_SHARE_OF_BUDGET} of node.memory_budget_mb)"


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
