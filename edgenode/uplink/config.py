"""The uplink's configuration: the broker, the credentials, the topic maps, the queue.

Pure: nothing here opens a file or a socket, and the MQTT client library is
not imported, so a node (or ``edgenode run --print-config``) can check an
uplink's settings without loading it.

Every check raises :class:`~edgenode.errors.ConfigError`. The checks of one
value (:func:`parse_broker`, :func:`check_qos`, ...) say "expected ..., got
..." without naming the key: the configuration file's reader adds the file
and key, and :meth:`UplinkConfig.validate` adds ``uplink.<field>``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .topics import InRoute, OutRoute, check_filter, check_node_pattern, check_template

MQTT = "mqtt"
MQTTS = "mqtts"
DEFAULT_PORTS = {MQTT: 1883, MQTTS: 8883}

#: What the queue does when it is full (``uplink.queue_policy``).
DROP_OLDEST = "drop-oldest"
REFUSE_NEW = "refuse-new"
POLICIES = (DROP_OLDEST, REFUSE_NEW)

#: MQTT protocol versions (``uplink.protocol``): 3.1.1 is spoken by every
#: broker (nats-server only speaks it); 5 lets the node cap what the broker
#: may send it (Maximum Packet Size).
PROTOCOLS = ("3.1.1", "5")

#: Where an ``in`` map delivers (``deliver``): this node's subscribers; the
#: whole site (every connected peer, best effort, and this node); one peer
#: (``peer:ADDRESS``: an IP, a node ID or ``ip/device``); a device on this
#: node's serial ports (``device:ID``).
LOCAL = "local"
SITE = "site"
PEER_PREFIX = "peer:"
DEVICE_PREFIX = "device:"

#: The queue's share of the node's memory budget when its size is not set.
QUEUE_SHARE_OF_BUDGET = 8
#: The message cap that goes with a derived byte cap: one per this many bytes.
BYTES_PER_QUEUED_MESSAGE = 256
#: The smallest disk spool: a spool is kept in eight segments, each able to
#: hold the largest message (a 64 KiB frame and its topic).
MIN_SPOOL_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Broker:
    """Where the broker is: ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]``."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == MQTTS

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_broker(text: object) -> Broker:
    """Parse a broker URL; raise :class:`ConfigError` saying what is allowed."""
    expected = "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
    if not isinstance(text, str):
        raise ConfigError(f"{expected}, got {text!r:.80}")
    scheme, sep, rest = text.strip().partition("://")
    if not sep or scheme not in DEFAULT_PORTS:
        raise ConfigError(f"{expected}, got {text!r:.80}")
    if "@" in rest:
        raise ConfigError(
            f"expected no user or password in the URL (use uplink.username and "
            f"uplink.password_file), got {scheme}://...@{rest.rpartition('@')[2]!r:.60}"
        )
    if rest.endswith("/"):
        rest = rest[:-1]
    if "/" in rest or "?" in rest or "#" in rest:
        raise ConfigError(f"{expected} with no path, got {text!r:.80}")
    port_text = ""
    if rest.startswith("["):
        host, close, after = rest[1:].partition("]")
        if not close or (after and not after.startswith(":")):
            raise ConfigError(f"{expected} ([IPV6] in brackets), got {text!r:.80}")
        port_text = after[1:]
    elif ":" in rest:
        host, _, port_text = rest.partition(":")
    else:
        host = rest
    if not host:
        raise ConfigError(f"{expected}: missing host, got {text!r:.80}")
    if not port_text:
        return Broker(scheme, host, DEFAULT_PORTS[scheme])
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{expected}: port should be 1..65535, got {port_text!r:.20}")
    return Broker(scheme, host, int(port_text))


def check_qos(value: object) -> int:
    if isinstance(value, bool) or value not in (0, 1):
        raise ConfigError(f"expected 0 or 1 (MQTT QoS 2 is not offered), got {value!r:.40}")
    return value  # type: ignore[return-value]


def check_deliver(value: object) -> str:
    expected = f"expected {LOCAL!r}, {SITE!r}, 'peer:ADDRESS' or 'device:ID'"
    if not isinstance(value, str):
        raise ConfigError(f"{expected}, got {value!r:.60}")
    if value in (LOCAL, SITE):
        return value
    for prefix in (PEER_PREFIX, DEVICE_PREFIX):
        if value.startswith(prefix) and value[len(prefix) :].strip():
            return value
    raise ConfigError(f"{expected}, got {value!r:.60}")


@dataclass(frozen=True)
class OutMap:
    """Node topics to the broker: every message on ``topic`` (exact, ``a/#``
    or ``#``) is published on ``to`` (default ``{prefix}/`` + ``topic``; a
    trailing ``#`` carries what the node topic's ``#`` matched)."""

    topic: str
    to: str | None = None
    qos: int = 1

    @property
    def broker_template(self) -> str:
        return self.to if self.to is not None else "{prefix}/" + self.topic

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad field (``qos: expected ...``)."""
        _field("topic", check_node_pattern, self.topic)
        _field("to", check_template, self.broker_template, self.topic.endswith("#"))
        _field("qos", check_qos, self.qos)


@dataclass(frozen=True)
class InMap:
    """Broker topics to the node: messages matching the MQTT filter ``topic``
    (``+`` and ``#`` allowed, ``{prefix}`` and ``{node_id}`` expanded) become
    node messages on ``to`` (default: the filter without its ``{prefix}/``;
    a trailing ``#`` carries what the filter's ``#`` matched), delivered as
    ``deliver`` says."""

    topic: str
    to: str | None = None
    deliver: str = LOCAL
    qos: int = 1

    @property
    def node_template(self) -> str:
        if self.to is not None:
            return self.to
        head = "{prefix}/"
        return self.topic[len(head) :] if self.topic.startswith(head) else self.topic

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad field."""
        _field("topic", check_filter, self.topic)
        node = self.node_template
        _field("to", check_node_pattern, node)
        if node.endswith("#") and not self.topic.endswith("#"):
            raise ConfigError(
                f"to: a trailing '#' needs a filter ending in '#', got to={node!r:.60} "
                f"for topic={self.topic!r:.60}"
            )
        _field("deliver", check_deliver, self.deliver)
        _field("qos", check_qos, self.qos)


def _field(name: str, check: object, value: object, *args: object) -> None:
    try:
        check(value, *args)  # type: ignore[operator]
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


@dataclass
class UplinkConfig:
    """An MQTT uplink: the broker, who we are there, and what crosses.

    ``NodeConfig(uplink=UplinkConfig(broker="mqtts://broker.example:8883",
    outbound=(OutMap("sensors/#"),)))``. ``validate()`` raises
    :class:`ConfigError` naming ``uplink.<field>``, the value and what is
    allowed. docs/fleet.md describes each setting.
    """

    broker: str
    #: MQTT client ID; None: ``edgenode-`` and the node ID.
    client_id: str | None = None
    username: str | None = None
    #: The password (read from ``password_file`` by the configuration file's reader).
    password: str | None = field(default=None, repr=False)
    #: Where the password came from, for ``--print-config`` and messages.
    password_file: Path | None = None
    #: CA certificates that sign the broker's (PEM); None: the system's.
    ca_file: Path | None = None
    #: A client certificate and its key (PEM), for brokers that ask for one.
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    #: False: a persistent session (the broker keeps our subscriptions and
    #: QoS 1 messages for us while we are away).
    clean_session: bool = False
    protocol: str = "3.1.1"
    #: The root of this node's broker topics (status, default map targets).
    prefix: str = "edgenode/{node_id}"
    outbound: tuple[OutMap, ...] = ()
    inbound: tuple[InMap, ...] = ()
    #: The store-and-forward queue's caps; None: derived from the node's
    #: memory budget (:func:`derived_queue_caps`).
    queue_messages: int | None = None
    queue_bytes: int | None = None
    queue_policy: str = DROP_OLDEST
    #: Keep queued QoS 1 messages on disk (in the state directory), at most
    #: this many bytes; 0: memory only.
    spool_bytes: int = 0
    reconnect_base_s: float = 1.0
    reconnect_cap_s: float = 60.0
    #: Time for TCP, TLS and the broker's CONNACK together.
    connect_timeout_s: float = 10.0

    def replace(self, **changes: object) -> UplinkConfig:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def parsed_broker(self) -> Broker:
        return parse_broker(self.broker)

    def validate(self) -> UplinkConfig:
        """Check every value; return self. Raises :class:`ConfigError`."""
        _named("broker", parse_broker, self.broker)
        for name in ("client_id", "username", "password"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"uplink.{name}: expected non-empty text, got {value!r:.40}")
        if self.client_id is not None and len(self.client_id.encode()) > 65535:
            raise ConfigError("uplink.client_id: expected at most 65535 bytes")
        if self.password is not None and self.username is None:
            raise ConfigError("uplink.password_file: expected uplink.username with a password")
        tls = self.parsed_broker.tls
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(self, name) is not None and not tls:
                raise ConfigError(
                    f"uplink.{name}: only used with an mqtts:// broker, got {self.broker!r:.80}"
                )
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(
                "uplink.cert_file and uplink.key_file: expected both or neither, got "
                f"{'cert_file' if self.key_file is None else 'key_file'} alone"
            )
        _named("keepalive_s", check_int(5, 65535), self.keepalive_s)
        if not isinstance(self.clean_session, bool):
            raise ConfigError(
                f"uplink.clean_session: expected true or false, got {self.clean_session!r}"
            )
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"uplink.protocol: expected one of {', '.join(map(repr, PROTOCOLS))}, "
                f"got {self.protocol!r:.20}"
            )
        _named("prefix", check_template, self.prefix, False)
        if "{prefix}" in self.prefix:
            raise ConfigError(
                f"uplink.prefix: expected no {{prefix}} in itself, got {self.prefix!r}"
            )
        for kind, maps in (("out", self.outbound), ("in", self.inbound)):
            for i, entry in enumerate(maps):
                if not isinstance(entry, (OutMap if kind == "out" else InMap)):
                    raise ConfigError(f"uplink.{kind}[{i}]: expected a map, got {entry!r:.60}")
                try:
                    entry.validate()
                except ConfigError as exc:
                    raise ConfigError(f"uplink.{kind}[{i}].{exc}") from None
        for name in ("queue_messages", "queue_bytes"):
            if getattr(self, name) is not None:
                _named(name, check_int(1, None), getattr(self, name))
        if self.queue_policy not in POLICIES:
            raise ConfigError(
                f"uplink.queue_policy: expected {DROP_OLDEST!r} or {REFUSE_NEW!r}, "
                f"got {self.queue_policy!r:.40}"
            )
        _named("spool_bytes", check_spool_bytes, self.spool_bytes)
        for name in ("reconnect_base_s", "reconnect_cap_s", "connect_timeout_s"):
            _named(name, check_seconds, getattr(self, name))
        if self.reconnect_cap_s < self.reconnect_base_s:
            raise ConfigError(
                f"uplink.reconnect_cap_s: expected at least uplink.reconnect_base_s "
                f"({self.reconnect_base_s}), got {self.reconnect_cap_s}"
            )
        return self


def _named(name: str, check: object, value: object, *args: object) -> None:
    try:
        check(value, *args)  # type: ignore[operator]
    except ConfigError as exc:
        raise ConfigError(f"uplink.{name}: {exc}") from None


def check_int(low: int, high: int | None) -> object:
    """A check for an integer in ``low..high`` (no upper bound when None)."""
    expected = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected {expected}, got {value!r:.40}")
        if value < low or (high is not None and value > high):
            raise ConfigError(f"expected {expected}, got {value!r:.40}")
        return value

    return check


def check_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"expected a number > 0, got {value!r:.40}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"expected a finite number > 0, got {value!r:.40}")
    return float(value)


def check_spool_bytes(value: object) -> int:
    expected = f"0 (no spool) or an integer >= {MIN_SPOOL_BYTES}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected {expected}, got {value!r:.40}")
    if value != 0 and value < MIN_SPOOL_BYTES:
        raise ConfigError(f"expected {expected}, got {value!r:.40}")
    return value


def derived_queue_caps(memory_budget_mb: int) -> tuple[int, int]:
    """The queue's (messages, bytes) caps for a node sized to ``memory_budget_mb``.

    An eighth of the budget (5 MB on a Pi Zero W's 40 MB), and one message
    per 256 bytes of it: a queue of small messages is bounded by its count,
    one of large messages by its bytes.
    """
    queue_bytes = memory_budget_mb * 1024 * 1024 // QUEUE_SHARE_OF_BUDGET
    return queue_bytes // BYTES_PER_QUEUED_MESSAGE, queue_bytes


def expand(template: str, *, prefix: str, node_id: str) -> str:
    """Replace ``{prefix}`` and ``{node_id}`` in a topic template."""
    return template.replace("{prefix}", prefix).replace("{node_id}", node_id)


def compile_routes(
    config: UplinkConfig, node_id: str
) -> tuple[str, tuple[OutRoute, ...], tuple[InRoute, ...]]:
    """The prefix and the maps with ``{prefix}`` and ``{node_id}`` expanded."""
    prefix = expand(config.prefix, prefix="", node_id=node_id)
    out = tuple(
        OutRoute(m.topic, expand(m.broker_template, prefix=prefix, node_id=node_id), m.qos)
        for m in config.outbound
    )
    inbound = tuple(
        InRoute(
            expand(m.topic, prefix=prefix, node_id=node_id),
            expand(m.node_template, prefix=prefix, node_id=node_id),
            m.deliver,
            m.qos,
        )
        for m in config.inbound
    )
    return prefix, out, inbound
