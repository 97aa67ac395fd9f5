"""Node configuration: every setting a node reads, validated in one place."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from firmware_bridge.frame import MAX_FRAME_BYTES, MAX_PSK_BYTES, MIN_FRAME_BYTES, MIN_PSK_BYTES

from .errors import ConfigError

DEFAULT_PORT = 7300
#: Baud rates a serial port may be set to (pyserial takes any; a UART's own
#: limits are narrower).
MIN_BAUD = 50
MAX_BAUD = 4_000_000


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Parse ``host``, ``host:port`` or ``[v6]:port``; raise :class:`ConfigError`."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"invalid address {text!r}: expected [ipv6]:port")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ConfigError(f"invalid address {text!r}: missing host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"invalid address {text!r}: port should be 0..65535, got {port_text!r}")
    return host, int(port_text)


class SerialPortSpec(NamedTuple):
    """One configured serial port: ``PORT[:BAUD][,dtr=on|off][,rts=on|off]``.

    ``baud`` None (in a parsed spec): the node's ``serial_baud``. ``dtr`` and
    ``rts`` None: the node's ``serial_dtr`` / ``serial_rts`` (board defaults),
    the state the modem lines are set to when the port opens (True:
    asserted, as pyserial does by default).
    """

    path: str
    baud: int | None = None
    dtr: bool | None = None
    rts: bool | None = None

    def __str__(self) -> str:
        text = self.path if self.baud is None else f"{self.path}:{self.baud}"
        for name in ("dtr", "rts"):
            value = getattr(self, name)
            if value is not None:
                text += f",{name}={'on' if value else 'off'}"
        return text


_LINE_STATES = {"on": True, "off": False}


def parse_serial_spec(text: str) -> SerialPortSpec:
    """Parse ``PORT[:BAUD][,dtr=on|off][,rts=on|off]`` (``/dev/ttyUSB0:115200,dtr=off``).

    The baud rate, ``dtr`` and ``rts`` are None when not given. Raises
    :class:`ConfigError` for a missing path, a bad baud rate or option.
    """
    head, *options = text.split(",")
    path, sep, baud_text = head.rpartition(":")
    baud: int | None = None
    if not sep or "/" in baud_text:
        path = head
    elif not baud_text.isdigit() or not MIN_BAUD <= int(baud_text) <= MAX_BAUD:
        raise ConfigError(
            f"serial port {text!r}: baud rate should be {MIN_BAUD}..{MAX_BAUD}, got {baud_text!r}"
        )
    else:
        baud = int(baud_text)
    if not path:
        raise ConfigError(f"serial port {text!r}: missing device path")
    lines: dict[str, bool] = {}
    for option in options:
        name, eq, value = option.strip().partition("=")
        if name not in ("dtr", "rts") or not eq:
            raise ConfigError(
                f"serial port {text!r}: unknown option {option!r:.40}, "
                f"expected dtr=on|off or rts=on|off"
            )
        if value.lower() not in _LINE_STATES:
            raise ConfigError(
                f"serial port {text!r}: {name} should be on or off, got {value!r:.20}"
            )
        lines[name] = _LINE_STATES[value.lower()]
    return SerialPortSpec(path, baud, lines.get("dtr"), lines.get("rts"))


# RFC 1123 host names: labels of letters, digits and hyphens, not starting or
# ending with a hyphen, dot-separated, 253 characters at most ("pi-kitchen.local").
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def is_host_name(text: str) -> bool:
    """Whether ``text`` is a syntactically valid DNS host name (not an IP address)."""
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253 or name.replace(".", "").isdigit():
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def check_peer_host(host: str, what: str) -> str:
    """Return ``host`` if it is an IP address or a host name; raise :class:`ConfigError`."""
    if isinstance(host, str):
        try:
            ipaddress.ip_address(host.strip("[]"))
            return host
        except ValueError:
            if is_host_name(host):
                return host
    raise ConfigError(f"{what}: expected an ip address or a host name, got {host!r:.60}")


@dataclass
class NodeConfig:
    """Everything a :class:`~edgenode.node.Node` needs to run.

    Sizes default to a small board; ``validate()`` raises
    :class:`ConfigError` naming the field, the value and what is allowed.
    """

    state_dir: Path = Path("edgenode-state")
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    #: Peers to dial and keep connected, as (host, port): an IP address, or a
    #: host name resolved by the system resolver before each dial.
    peers: list[tuple[str, int]] = field(default_factory=list)
    #: Authorised node IDs; None reads ``authorised_nodes`` in the state dir.
    authorised: frozenset[str] | None = None
    keepalive_interval_s: float = 5.0
    keepalive_timeout_s: float = 15.0
    keepalive_jitter: float = 0.1
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    handshake_timeout_s: float = 5.0
    shutdown_grace_s: float = 2.0
    max_peers: int = 64
    prune_after_s: float = 3600.0
    max_frame_bytes: int = 64 * 1024
    inbox_size: int = 256
    outbox_frames: int = 128
    subscription_buffer: int = 256
    max_pending_requests: int = 256
    max_inflight_handlers: int = 32
    #: A request handler running longer is cancelled and answered with an error.
    handler_timeout_s: float = 30.0
    #: A subscription that takes nothing this long while a message waits for
    #: it is ended (SubscriberStalled), so that its connection reads again.
    subscriber_stall_timeout_s: float = 30.0
    #: Handshakes in progress from one IP; more connections are refused at once.
    max_handshakes_per_ip: int = 4
    #: Handshakes in progress from all IPs together.
    max_handshakes: int = 64
    #: New handshakes a second from one IP, on average (bursts of 2 x max_handshakes_per_ip).
    max_handshake_rate_per_ip: float = 4.0
    #: Dial authorised peers that other peers tell us about.
    learn_peers: bool = True
    #: Serial ports bridging microcontrollers: (device path, baud rate) or a
    #: :class:`SerialPortSpec` (which may set the port's DTR and RTS).
    serial_ports: list[tuple[str, int] | SerialPortSpec] = field(default_factory=list)
    #: The DTR and RTS lines of every serial port at open, unless its spec
    #: says otherwise: True asserts the line (pyserial's default). Many ESP32
    #: boards reset when one toggles; native-USB boards take DTR low as "no
    #: host" (docs/microcontrollers.md, "DTR and RTS").
    serial_dtr: bool = True
    serial_rts: bool = True
    #: Pre-shared key (16..64 bytes) authenticating every UART frame, or None.
    serial_psk: bytes | None = None
    #: Ask devices for reliable delivery (sequence numbers, acks, retransmission).
    serial_reliable: bool = False
    serial_max_frame: int = 256
    serial_keepalive_interval_s: float = 1.0
    serial_keepalive_timeout_s: float = 3.0
    #: The control socket (``edgenode status``/``send``), or None for none.
    control_socket: Path | None = None
    #: A group (name or number) whose members may use the control socket,
    #: besides root and the node's own user; None for none.
    control_group: str | int | None = None
    #: Find authorised peers on the local subnet by UDP broadcast beacons.
    discovery: bool = False
    discovery_port: int = 7301
    #: Where beacons go: the subnet's broadcast address is best (docs/discovery.md).
    discovery_address: str = "255.255.255.255"
    #: Where beacons are heard (tests on loopback use 127.255.255.255).
    discovery_bind_host: str = "0.0.0.0"
    discovery_interval_s: float = 10.0
    #: Remember peers that were up (``known_peers.json``) and redial them after a restart.
    remember_peers: bool = True
    max_known_peers: int = 256
    #: Baud rate of a serial port given without one (``--serial /dev/serial0``).
    serial_baud: int = 115200
    #: Memory (MB) the node is sized to stay within, from its board profile.
    memory_budget_mb: int = 64
    #: The MQTT uplink (``edgenode.uplink.UplinkConfig``), or None for none.
    #: Its module, and the MQTT client library, load only when this is set.
    uplink: Any = None

    def replace(self, **changes: object) -> NodeConfig:
        """Return a copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def validate(self) -> NodeConfig:
        """Check every value; return self. Raises :class:`ConfigError`."""

        def positive(name: str, minimum: float = 0.0, strict: bool = True) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name}: expected a number, got {value!r}")
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            if value < minimum or (strict and value == minimum):
                cmp = ">" if strict else ">="
                raise ConfigError(f"{name}: expected a value {cmp} {minimum}, got {value!r}")

        for name in (
            "keepalive_interval_s",
            "keepalive_timeout_s",
            "backoff_base_s",
            "backoff_cap_s",
            "handshake_timeout_s",
            "prune_after_s",
            "max_handshake_rate_per_ip",
            "handler_timeout_s",
            "subscriber_stall_timeout_s",
        ):
            positive(name)
        positive("shutdown_grace_s", strict=False)
        for name in (
            "max_peers",
            "inbox_size",
            "outbox_frames",
            "subscription_buffer",
            "max_pending_requests",
            "max_inflight_handlers",
            "max_handshakes_per_ip",
            "max_handshakes",
            "max_known_peers",
        ):
            positive(name, 1, strict=False)
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{name}: expected an integer, got {getattr(self, name)!r}")
        if self.keepalive_timeout_s <= self.keepalive_interval_s:
            raise ConfigError(
                f"keepalive_timeout_s: expected more than keepalive_interval_s "
                f"({self.keepalive_interval_s}), got {self.keepalive_timeout_s}"
            )
        if not 0 <= self.keepalive_jitter < 0.5:
            raise ConfigError(
                f"keepalive_jitter: expected 0 <= value < 0.5, got {self.keepalive_jitter}"
            )
        if self.backoff_cap_s < self.backoff_base_s:
            raise ConfigError(
                f"backoff_cap_s: expected at least backoff_base_s ({self.backoff_base_s}), "
                f"got {self.backoff_cap_s}"
            )
        if not 256 <= self.max_frame_bytes <= 16 * 1024 * 1024:
            raise ConfigError(
                f"max_frame_bytes: expected 256..16777216, got {self.max_frame_bytes!r}"
            )
        positive("serial_keepalive_interval_s")
        positive("discovery_interval_s")
        if not 1 <= self.discovery_port <= 65535:
            raise ConfigError(f"discovery_port: expected 1..65535, got {self.discovery_port!r}")
        for name in ("discovery_address", "discovery_bind_host"):
            try:
                ipaddress.IPv4Address(getattr(self, name))
            except ValueError:
                raise ConfigError(
                    f"{name}: expected an IPv4 address, got {getattr(self, name)!r}"
                ) from None
        if self.serial_keepalive_timeout_s <= self.serial_keepalive_interval_s:
            raise ConfigError(
                f"serial_keepalive_timeout_s: expected more than serial_keepalive_interval_s "
                f"({self.serial_keepalive_interval_s}), got {self.serial_keepalive_timeout_s}"
            )
        for spec in self.serial_ports:
            check_serial_port(spec)
        for name in ("serial_dtr", "serial_rts"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if not MIN_FRAME_BYTES <= self.serial_max_frame <= MAX_FRAME_BYTES:
            raise ConfigError(
                f"serial_max_frame: expected {MIN_FRAME_BYTES}..{MAX_FRAME_BYTES}, "
                f"got {self.serial_max_frame!r}"
            )
        psk = self.serial_psk
        if psk is not None and not MIN_PSK_BYTES <= len(psk) <= MAX_PSK_BYTES:
            raise ConfigError(
                f"serial_psk: expected {MIN_PSK_BYTES}..{MAX_PSK_BYTES} bytes, got {len(psk)} bytes"
            )
        if not MIN_BAUD <= self.serial_baud <= MAX_BAUD:
            raise ConfigError(
                f"serial_baud: expected {MIN_BAUD}..{MAX_BAUD}, got {self.serial_baud!r}"
            )
        if not 16 <= self.memory_budget_mb <= 1_048_576:
            raise ConfigError(
                f"memory_budget_mb: expected 16..1048576, got {self.memory_budget_mb!r}"
            )
        if not 0 <= self.listen_port <= 65535:
            raise ConfigError(f"listen_port: expected 0..65535, got {self.listen_port!r}")
        if self.listen_host not in ("0.0.0.0", "::", ""):
            try:
                ipaddress.ip_address(self.listen_host.strip("[]"))
            except (ValueError, AttributeError):
                raise ConfigError(
                    f"listen_host: expected an ip address, got {self.listen_host!r:.60}"
                ) from None
        for host, port in self.peers:
            check_peer_host(host, "peers")
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ConfigError(f"peers: port of {host}: expected 1..65535, got {port!r}")
        if self.control_group is not None:
            resolve_group(self.control_group, "control_group")
        if self.uplink is not None:
            self.uplink.validate()
        return self


def check_serial_port(spec: object) -> None:
    """Check one ``serial_ports`` entry; raise :class:`ConfigError`."""
    if not isinstance(spec, tuple) or len(spec) not in (2, 4):
        raise ConfigError(
            f"serial_ports: expected (path, baud) or a SerialPortSpec, got {spec!r:.60}"
        )
    path, baud = spec[0], spec[1]
    if not isinstance(path, str) or not path:
        raise ConfigError(f"serial_ports: expected a device path, got {path!r:.60}")
    if isinstance(baud, bool) or not isinstance(baud, int) or not MIN_BAUD <= baud <= MAX_BAUD:
        raise ConfigError(
            f"serial_ports: {path}: expected a baud rate in {MIN_BAUD}..{MAX_BAUD}, got {baud!r}"
        )
    for name, value in zip(("dtr", "rts"), spec[2:]):
        if value is not None and not isinstance(value, bool):
            raise ConfigError(
                f"serial_ports: {path}: {name} should be true, false or None, got {value!r}"
            )


def resolve_group(group: str | int, what: str = "group") -> tuple[int, str]:
    """Return (gid, name) of ``group``, a group name or number, from the system's groups.

    Raises :class:`ConfigError` naming ``what`` if it is neither, or no such
    group exists, or the platform has no groups.
    """
    try:
        import grp
    except ImportError:  # pragma: no cover - not on Unix
        raise ConfigError(f"{what}: this platform has no unix groups") from None
    if isinstance(group, bool) or not isinstance(group, (str, int)):
        raise ConfigError(f"{what}: expected a group name or number, got {group!r:.40}")
    try:
        if isinstance(group, int):
            entry = grp.getgrgid(group)
        elif group.strip().isdigit():
            entry = grp.getgrgid(int(group.strip()))
        else:
            entry = grp.getgrnam(group.strip())
    except (KeyError, OverflowError, ValueError):
        raise ConfigError(
            f"{what}: expected a group of this system (getent group), got {group!r:.40}"
        ) from None
    return entry.gr_gid, entry.gr_name
