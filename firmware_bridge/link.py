"""The UART link between a host node and a microcontroller, as a pure state machine.

One class, :class:`Link`, runs both ends (``role`` "host" or "device").
It never touches a UART and never reads a clock: bytes from the line go
into ``receive_bytes(data, now_ms)``, events come out, and bytes for the
line come out of ``bytes_to_send()``. Time is an integer millisecond count
``now_ms`` that never goes backwards; randomness (the boot epoch) is an
argument. The owner calls ``tick(now_ms)`` once ``next_deadline_ms()`` has
passed; the link has no timers of its own. docs/serial-protocol.md gives
the wire format byte by byte.

The rules, in the order a link meets them:

1. Framing. Every frame is ``COBS(body + CRC-32(body), little-endian)``
   followed by 0x00. A frame that is oversize, bad COBS, short, or fails
   its CRC is dropped and counted; the reader resynchronises at the next
   0x00. Hello frames are sent with a leading 0x00 so that they also end
   any garbage the receiver holds.
2. Header. The body's first byte holds the frame type (low 4 bits) and
   two flags: RELIABLE (a 1-byte sequence number follows) and AUTH (a
   4-byte counter follows, a 16-byte HMAC-SHA256 tag ends the body).
3. Session. Each side has a boot epoch (random, 1..2**32-1, new at every
   start) and sends a hello at start. A hello names the sender's epoch,
   echoes the epoch it last heard from the peer (0 if none), and says
   whether the sender considers the session up. A side answers a hello
   with its own when the peer's epoch changed, when the hello does not
   echo our epoch, or when the hello says the peer is not up; a hello from
   a side that is up, with both epochs as known, gets no answer, which ends
   the exchange. The session is up once a hello arrives that echoes our
   current epoch, and goes down when one arrives with a new epoch (the peer
   restarted) or one that no longer echoes ours (the peer lost the
   session). So a restart on either side resynchronises within about one
   round trip, with no reset line.
4. While the session is down, every frame but a hello is dropped ("not
   up") and answered with a hello (at most once per ``rto_ms``), and hellos
   are repeated every keepalive interval. After a keepalive timeout a side
   forgets the peer's epoch, so its hellos echo 0 and take the peer's
   session down too.
5. Keepalive. Once up, each side pings when it has sent nothing for its
   interval (and for less than half the peer's timeout), and declares the
   session down when nothing valid has arrived for its timeout. Any valid
   frame proves liveness.
6. Reliable mode, when both hellos ask for it: application frames carry an
   8-bit sequence number; the receiver delivers them exactly once and in
   order and acknowledges cumulatively; the sender keeps at most ``window``
   frames unacknowledged, retransmits all of them (go-back-N) after
   ``rto_ms`` without progress, and queues at most ``send_queue`` more.
7. Authentication, when both sides hold the same pre-shared key: each frame
   carries a counter that strictly increases per direction and a tag over
   (sender epoch, receiver epoch, body). A bad tag is "auth failure"; a
   counter not above the last accepted is "replay".

Bad bytes from the line never raise: each bad frame becomes a
:class:`Dropped` event and a count in ``stats.drops``, and the session
stays as it was. Misuse by the owner (sending while down, a field too
long) raises a :class:`LinkUsageError`.

Runs unchanged on CPython 3.9+ and MicroPython.
"""

import struct
from binascii import crc32

from . import cbor, cobs
from .cobs import BadCOBS, FrameError, FrameTooLarge, LinkError, hex_preview
from .hmac_sha256 import HmacSha256, equal

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef]
        return x


PROTOCOL_VERSION = const(1)

# Frame types (low 4 bits of the header byte).
HELLO = const(1)
PING = const(2)
PONG = const(3)
DATA = const(4)
REQUEST = const(5)
RESPONSE = const(6)
SEND_TO = const(7)
ACK = const(8)
TYPE_NAMES = {
    HELLO: "hello",
    PING: "ping",
    PONG: "pong",
    DATA: "data",
    REQUEST: "request",
    RESPONSE: "response",
    SEND_TO: "send_to",
    ACK: "ack",
}
_APP_TYPES = (DATA, REQUEST, RESPONSE, SEND_TO)

# Header flags (high 4 bits of the header byte).
FLAG_RELIABLE = const(0x10)
FLAG_AUTH = const(0x20)
_FLAGS_RESERVED = const(0xC0)

# Bits of the hello's flags field.
HELLO_RELIABLE = const(1)
HELLO_AUTH = const(2)
HELLO_UP = const(4)  # the sender considers the session up

CRC_BYTES = const(4)
COUNTER_BYTES = const(4)
TAG_BYTES = const(16)
_AUTH_BYTES = const(20)  # COUNTER_BYTES + TAG_BYTES

#: Limits on ``max_frame`` (the largest frame body, CRC excluded). The floor
#: leaves room for the largest hello.
MIN_FRAME_BYTES = const(128)
MAX_FRAME_BYTES = const(4096)
MAX_ID_BYTES = const(64)
MAX_TOPIC_BYTES = const(255)
MAX_DEST_BYTES = const(255)
MIN_PSK_BYTES = const(16)
MAX_PSK_BYTES = const(64)
MAX_WINDOW = const(16)
_U32_MAX = const(0xFFFFFFFF)
_SEEN_EPOCHS = const(4)  # peer epochs whose last auth counter is remembered

# Received.kind values.
KIND_DATA = "data"
KIND_REQUEST = "request"
KIND_RESPONSE = "response"
KIND_SEND_TO = "send_to"

# SessionDown.reason values.
DOWN_TIMEOUT = "keepalive timeout"
DOWN_PEER_RESTART = "peer restart"
DOWN_PEER_RESET = "peer lost the session"

ROLES = ("host", "device")


# --- errors ----------------------------------------------------------------
# LinkError, FrameError, BadCOBS and FrameTooLarge live in cobs.py, the
# lowest module; they are re-exported here so that one import serves.


class BadCRC(FrameError):
    """A frame's CRC-32 does not match its body."""

    reason = "bad crc"


class BadFrame(FrameError):
    """A frame's header or fields are malformed or not allowed here."""

    reason = "bad frame"


class UnknownType(FrameError):
    """A frame's type is not one this protocol version defines."""

    reason = "unknown type"


class BadHello(FrameError):
    """A hello's CBOR or fields are malformed, or its protocol version is unsupported."""

    reason = "bad hello"


class NotUp(FrameError):
    """A frame other than a hello arrived while the session is down."""

    reason = "not up"


class AuthFailure(FrameError):
    """A frame's authentication is missing, unexpected or wrong."""

    reason = "auth failure"


class Replay(AuthFailure):
    """An authenticated frame's counter is not above the last one accepted."""

    reason = "replay"


class Duplicate(FrameError):
    """A reliable frame that was already delivered arrived again."""

    reason = "duplicate"


class OutOfOrder(FrameError):
    """A reliable frame arrived after a gap (go-back-N drops it)."""

    reason = "out of order"


class LinkUsageError(LinkError):
    """The owner misused the link: a bug in the caller, not bad bytes."""


class LinkDown(LinkUsageError):
    """A message was sent while the session is not up."""


class MessageTooLarge(LinkUsageError):
    """A message or one of its fields exceeds its size limit."""


class SendQueueFull(LinkUsageError):
    """No room for a message: the reliable window and queue, or the unread output, are full."""


__all__ = [
    "AuthFailure",
    "BadCOBS",
    "BadCRC",
    "BadFrame",
    "BadHello",
    "Dropped",
    "Duplicate",
    "FrameError",
    "FrameTooLarge",
    "Hello",
    "Link",
    "LinkDown",
    "LinkError",
    "LinkStats",
    "LinkUsageError",
    "MessageTooLarge",
    "NotUp",
    "OutOfOrder",
    "Received",
    "Replay",
    "SendQueueFull",
    "SessionDown",
    "SessionUp",
    "UnknownType",
]


# --- events ----------------------------------------------------------------


class _Record:
    """Equality and repr over the names in ``_fields``."""

    __slots__ = ()
    _fields = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return False
        for name in self._fields:
            if getattr(self, name) != getattr(other, name):
                return False
        return True

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __repr__(self) -> str:
        parts = [f"{name}={getattr(self, name)!r}" for name in self._fields]
        return "{}({})".format(type(self).__name__, ", ".join(parts))


class Hello(_Record):
    """A hello's fields: who the sender is, its limits, and the epoch it echoes."""

    __slots__ = (
        "auth",
        "echo_epoch",
        "epoch",
        "id",
        "keepalive_interval_ms",
        "keepalive_timeout_ms",
        "max_frame",
        "reliable",
        "up",
        "version",
    )
    _fields = (
        "version",
        "id",
        "epoch",
        "max_frame",
        "keepalive_interval_ms",
        "keepalive_timeout_ms",
        "reliable",
        "auth",
        "up",
        "echo_epoch",
    )

    def __init__(
        self,
        id: str,
        epoch: int,
        max_frame: int,
        keepalive_interval_ms: int,
        keepalive_timeout_ms: int,
        reliable: bool,
        auth: bool,
        echo_epoch: int,
        up: bool = False,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        self.version = version
        self.id = id
        self.epoch = epoch
        self.max_frame = max_frame
        self.keepalive_interval_ms = keepalive_interval_ms
        self.keepalive_timeout_ms = keepalive_timeout_ms
        self.reliable = reliable
        self.auth = auth
        self.echo_epoch = echo_epoch
        self.up = up

    def encode(self) -> bytes:
        """Return the hello's CBOR array."""
        flags = (
            (HELLO_RELIABLE if self.reliable else 0)
            | (HELLO_AUTH if self.auth else 0)
            | (HELLO_UP if self.up else 0)
        )
        return cbor.encode(
            [
                self.version,
                self.id,
                self.epoch,
                self.max_frame,
                self.keepalive_interval_ms,
                self.keepalive_timeout_ms,
                flags,
                self.echo_epoch,
            ]
        )

    @staticmethod
    def decode(raw: "bytes | bytearray") -> "Hello":
        """Parse a hello's CBOR array. Raises :class:`BadHello`."""
        try:
            item = cbor.decode(raw, max_depth=1, max_items=32)
        except cbor.CBORError as exc:
            raise BadHello("bad hello: " + str(exc)) from None
        if type(item) is not list or len(item) < 8:
            raise BadHello(
                f"bad hello: expected an array of at least 8 fields, got {_describe(item)}: "
                f"{hex_preview(raw)}"
            )
        version = _uint(item[0], "version", 1, 0xFFFF)
        if version != PROTOCOL_VERSION:
            raise BadHello(
                f"bad hello: unsupported protocol version {version} "
                f"(this link speaks {PROTOCOL_VERSION})"
            )
        peer_id = item[1]
        if type(peer_id) is not str:
            raise BadHello(f"bad hello: id should be text, got {_describe(peer_id)}")
        id_bytes = len(peer_id.encode("utf-8"))
        if not 1 <= id_bytes <= MAX_ID_BYTES:
            raise BadHello(f"bad hello: id of {id_bytes} bytes is outside 1..{MAX_ID_BYTES}")
        epoch = _uint(item[2], "epoch", 1, _U32_MAX)
        max_frame = _uint(item[3], "max frame bytes", MIN_FRAME_BYTES, 0xFFFF)
        interval = _uint(item[4], "keepalive interval", 1, _U32_MAX)
        timeout = _uint(item[5], "keepalive timeout", 1, _U32_MAX)
        flags = _uint(item[6], "flags", 0, 0xFF)
        echo = _uint(item[7], "echoed epoch", 0, _U32_MAX)
        # Fields after the eighth are for later versions: ignored.
        return Hello(
            peer_id,
            epoch,
            max_frame,
            interval,
            timeout,
            bool(flags & HELLO_RELIABLE),
            bool(flags & HELLO_AUTH),
            echo,
            bool(flags & HELLO_UP),
            version,
        )


def _describe(value: object) -> str:
    if type(value) is list:
        return f"an array of {len(value)}"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _uint(value: object, name: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise BadHello(f"bad hello: {name} should be an integer, got {_describe(value)}")
    if not low <= value <= high:
        raise BadHello(f"bad hello: {name} {value} is outside {low}..{high}")
    return value


class SessionUp(_Record):
    """The session is up: the peer's hello echoed our epoch."""

    __slots__ = ("peer_hello",)
    _fields = ("peer_hello",)

    def __init__(self, peer_hello: Hello) -> None:
        self.peer_hello = peer_hello


class SessionDown(_Record):
    """The session went down; ``lost`` reliable messages were never acknowledged."""

    __slots__ = ("lost", "reason")
    _fields = ("reason", "lost")

    def __init__(self, reason: str, lost: int = 0) -> None:
        self.reason = reason
        self.lost = lost


class Received(_Record):
    """A message from the peer. ``kind`` says which fields apply; the rest are None.

    data: topic, payload. request: req_id, topic, payload. response: req_id,
    status, payload (and, when status is not 0, ``error``: the payload as
    text). send_to: dest, topic, payload.
    """

    __slots__ = ("dest", "error", "kind", "payload", "req_id", "status", "topic")
    _fields = ("kind", "topic", "payload", "req_id", "status", "error", "dest")

    def __init__(
        self,
        kind: str,
        topic: "str | None" = None,
        payload: bytes = b"",
        req_id: "int | None" = None,
        status: "int | None" = None,
        error: "str | None" = None,
        dest: "str | None" = None,
    ) -> None:
        self.kind = kind
        self.topic = topic
        self.payload = payload
        self.req_id = req_id
        self.status = status
        self.error = error
        self.dest = dest


class Dropped(_Record):
    """A frame from the line was dropped; ``error`` says why (log it)."""

    __slots__ = ("error", "reason")
    _fields = ("reason", "message")

    def __init__(self, error: FrameError) -> None:
        self.error = error
        self.reason = error.reason

    @property
    def message(self) -> str:
        return str(self.error)


class LinkStats:
    """Counters: frames and bytes each way, drops by reason, retransmissions."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "drops",
        "frames_in",
        "frames_out",
        "retransmits",
        "tx_skipped",
    )

    def __init__(self) -> None:
        self.frames_in = 0  # valid frames accepted
        self.frames_out = 0
        self.bytes_in = 0  # every byte fed to receive_bytes
        self.bytes_out = 0  # every byte queued for the line
        self.retransmits = 0
        self.tx_skipped = 0  # control frames not queued because the output was full
        self.drops = {}  # reason -> count

    @property
    def dropped(self) -> int:
        """Total frames dropped, all reasons."""
        return sum(self.drops.values())

    def __repr__(self) -> str:
        return (
            f"LinkStats(frames_in={self.frames_in}, frames_out={self.frames_out}, "
            f"bytes_in={self.bytes_in}, bytes_out={self.bytes_out}, "
            f"retransmits={self.retransmits}, tx_skipped={self.tx_skipped}, "
            f"drops={self.drops!r})"
        )


# --- the link --------------------------------------------------------------


def _topic_bytes(topic: str, what: str, limit: int) -> bytes:
    if type(topic) is not str:
        raise LinkUsageError(f"{what} should be text, got {type(topic).__name__}")
    raw = topic.encode("utf-8")
    if not raw:
        raise LinkUsageError(f"{what} must not be empty")
    if len(raw) > limit:
        raise MessageTooLarge(f"{what} of {len(raw)} bytes exceeds the {limit}-byte limit")
    return raw


def _payload_bytes(payload: "bytes | bytearray | memoryview") -> bytes:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise LinkUsageError(f"payload should be bytes, got {type(payload).__name__}")
    return bytes(payload)


def _u16(value: int, what: str) -> bytes:
    if type(value) is not int or not 0 <= value <= 0xFFFF:
        raise LinkUsageError(f"{what} should be an integer in 0..65535, got {value!r}")
    return struct.pack(">H", value)


def _take_text(fields: bytes, pos: int, what: str, kind: str) -> "tuple[str, int]":
    """Read a length-prefixed utf-8 field at ``pos``; return it and the offset after it."""
    if pos >= len(fields):
        raise BadFrame(f"bad frame: {kind} frame ends before its {what} length")
    length = fields[pos]
    stop = pos + 1 + length
    if length == 0:
        raise BadFrame(f"bad frame: {kind} frame has an empty {what}")
    if stop > len(fields):
        raise BadFrame(
            f"bad frame: {kind} frame's {what} of {length} bytes exceeds "
            f"the {len(fields) - pos - 1} bytes remaining"
        )
    try:
        text = str(fields[pos + 1 : stop], "utf-8")
    except UnicodeError:
        raise BadFrame(
            f"bad frame: {kind} frame's {what} is not valid utf-8: "
            f"{hex_preview(fields[pos + 1 : stop])}"
        ) from None
    return text, stop


class Link:
    """One end of a UART link: framing, session, keepalive, reliability, auth.

    ``role`` is "host" or "device"; ``my_id`` names this end (a device ID,
    or the host's node ID); ``epoch`` is a fresh random integer in
    1..2**32-1 for every start. ``max_frame`` caps a frame body (CRC
    excluded) in both directions; ``keepalive_*_ms`` set the timers;
    ``reliable`` asks for reliable mode (used when both ends ask); ``psk``
    (16..64 bytes) turns on authentication, which both ends must share;
    ``window``, ``send_queue`` and ``rto_ms`` size reliable mode;
    ``max_output_bytes`` caps the bytes waiting in ``bytes_to_send``.

    Raises :class:`LinkUsageError` for a bad argument.
    """

    __slots__ = (
        "_ack_pending",
        "_frame_limit",
        "_last_hello_ms",
        "_last_rx_ms",
        "_last_tx_ms",
        "_mac",
        "_out",
        "_ping_interval_ms",
        "_ping_nonce",
        "_ping_sent_ms",
        "_queue",
        "_rto_deadline_ms",
        "_rx_counter",
        "_rx_epoch",
        "_rx_expected",
        "_seen",
        "_splitter",
        "_started",
        "_their_epoch",
        "_tx_counter",
        "_tx_seq",
        "_unacked",
        "epoch",
        "is_up",
        "keepalive_interval_ms",
        "keepalive_timeout_ms",
        "max_frame",
        "max_output_bytes",
        "my_id",
        "peer_hello",
        "reliable",
        "role",
        "rto_ms",
        "rtt_ms",
        "send_queue",
        "stats",
        "want_reliable",
        "window",
    )

    def __init__(
        self,
        role: str,
        my_id: str,
        epoch: int,
        *,
        max_frame: int = 256,
        keepalive_interval_ms: int = 1000,
        keepalive_timeout_ms: int = 3000,
        reliable: bool = False,
        psk: "bytes | None" = None,
        window: int = 4,
        rto_ms: int = 300,
        send_queue: int = 8,
        max_output_bytes: "int | None" = None,
    ) -> None:
        if role not in ROLES:
            raise LinkUsageError(f"role should be 'host' or 'device', got {role!r}")
        _topic_bytes(my_id, "id", MAX_ID_BYTES)
        if type(epoch) is not int or not 1 <= epoch <= _U32_MAX:
            raise LinkUsageError(f"epoch should be an integer in 1..4294967295, got {epoch!r}")
        if type(max_frame) is not int or not MIN_FRAME_BYTES <= max_frame <= MAX_FRAME_BYTES:
            raise LinkUsageError(
                f"max_frame should be in {MIN_FRAME_BYTES}..{MAX_FRAME_BYTES}, got {max_frame!r}"
            )
        if not 0 < keepalive_interval_ms < keepalive_timeout_ms <= _U32_MAX:
            raise LinkUsageError(
                f"keepalive interval {keepalive_interval_ms!r} ms should be positive "
                f"and below the timeout {keepalive_timeout_ms!r} ms"
            )
        if not 1 <= window <= MAX_WINDOW:
            raise LinkUsageError(f"window should be in 1..{MAX_WINDOW}, got {window!r}")
        if rto_ms < 1 or send_queue < 0:
            raise LinkUsageError(
                f"rto_ms should be positive and send_queue not negative, "
                f"got {rto_ms!r} and {send_queue!r}"
            )
        if psk is not None:
            if not isinstance(psk, (bytes, bytearray)):
                raise LinkUsageError(f"psk should be bytes, got {type(psk).__name__}")
            if not MIN_PSK_BYTES <= len(psk) <= MAX_PSK_BYTES:
                # The length only: a message never shows key material.
                raise LinkUsageError(
                    f"psk of {len(psk)} bytes is outside {MIN_PSK_BYTES}..{MAX_PSK_BYTES}"
                )
        wire_max = cobs.max_encoded_len(max_frame + CRC_BYTES) + 2
        if max_output_bytes is None:
            max_output_bytes = 8 * wire_max
        elif max_output_bytes < wire_max:
            raise LinkUsageError(
                f"max_output_bytes {max_output_bytes!r} is below one largest frame "
                f"on the wire ({wire_max} bytes)"
            )
        self.role = role
        self.my_id = my_id
        self.epoch = epoch
        self.max_frame = max_frame
        self.keepalive_interval_ms = keepalive_interval_ms
        self.keepalive_timeout_ms = keepalive_timeout_ms
        self.want_reliable = bool(reliable)
        self.window = window
        self.rto_ms = rto_ms
        self.send_queue = send_queue
        self.max_output_bytes = max_output_bytes
        self._mac = None if psk is None else HmacSha256(psk)
        self._splitter = cobs.FrameSplitter(cobs.max_encoded_len(max_frame + CRC_BYTES))
        self._out = bytearray()
        self.stats = LinkStats()
        self._started = False
        self.is_up = False
        self.reliable = False  # negotiated: true while up in reliable mode
        self.peer_hello = None
        self.rtt_ms = None
        self._their_epoch = 0
        self._frame_limit = max_frame
        self._ping_interval_ms = keepalive_interval_ms
        self._last_tx_ms = 0
        self._last_rx_ms = 0
        self._last_hello_ms = 0
        self._ping_nonce = 0
        self._ping_sent_ms = None
        # Auth: our counter over this epoch; the peer's last accepted one.
        self._tx_counter = 0
        self._rx_epoch = 0
        self._rx_counter = 0
        self._seen = []  # [epoch, last counter] of earlier peer epochs, newest last
        # Reliable mode.
        self._tx_seq = 0
        self._unacked = []  # (seq, type, fields), oldest first
        self._queue = []  # (type, fields) waiting for room in the window
        self._rto_deadline_ms = None
        self._rx_expected = 0
        self._ack_pending = False

    def __repr__(self) -> str:
        state = "up with " + repr(self.peer_id) if self.is_up else "down"
        return f"Link({self.role} {self.my_id!r}, epoch={self.epoch}, {state})"

    # --- public API --------------------------------------------------------

    @property
    def peer_id(self) -> "str | None":
        """The ID in the peer's latest hello, or None before one arrived."""
        return None if self.peer_hello is None else self.peer_hello.id

    def start(self, now_ms: int) -> None:
        """Begin: queue our first hello and start the timers."""
        if self._started:
            raise LinkUsageError("link already started")
        self._started = True
        self._last_rx_ms = now_ms
        self._send_hello(now_ms)

    def receive_bytes(self, data: "bytes | bytearray | memoryview", now_ms: int) -> list:
        """Feed bytes from the line; return the events they cause, in order.

        Bad frames never raise: each becomes a :class:`Dropped` event.
        Raises :class:`LinkUsageError` before ``start()``.
        """
        if not self._started:
            raise LinkUsageError("receive_bytes before start()")
        events = []
        self.stats.bytes_in += len(data)
        for item in self._splitter.feed(data):
            if isinstance(item, FrameError):
                self._drop(item, events)
                continue
            try:
                self._receive_frame(item, now_ms, events)
            except FrameError as exc:
                self._drop(exc, events)
        if self._ack_pending:
            # One cumulative ack per batch of bytes.
            self._ack_pending = False
            if self.is_up and self.reliable:
                self._emit(ACK, bytes(((self._rx_expected - 1) & 0xFF,)), now_ms)
        return events

    def tick(self, now_ms: int) -> list:
        """Run the timers due at ``now_ms``; return the events (a SessionDown on timeout)."""
        events = []
        if not self._started:
            return events
        if not self.is_up:
            if now_ms - self._last_hello_ms >= self.keepalive_interval_ms:
                self._send_hello(now_ms)
            return events
        if now_ms - self._last_rx_ms >= self.keepalive_timeout_ms:
            self._down(DOWN_TIMEOUT, events)
            # Forget the peer's epoch: our hello then echoes 0, which tells a
            # peer that still thinks the session is up that it is not.
            self._their_epoch = 0
            self._send_hello(now_ms)
            return events
        if self._rto_deadline_ms is not None and now_ms >= self._rto_deadline_ms:
            for seq, ftype, fields in self._unacked:
                self._emit(ftype, fields, now_ms, seq)
                self.stats.retransmits += 1
            self._rto_deadline_ms = now_ms + self.rto_ms
        if now_ms - self._last_tx_ms >= self._ping_interval_ms:
            self._ping_nonce = (self._ping_nonce + 1) & 0xFFFF
            self._ping_sent_ms = now_ms
            self._emit(PING, struct.pack(">H", self._ping_nonce), now_ms)
        return events

    def room(self) -> "int | None":
        """How many more messages a send would take now; None: no limit.

        In reliable mode a send beyond the window waits in a small queue;
        beyond that it raises :class:`SendQueueFull`. Callers that can wait
        should wait for room (the peer's acknowledgements make it).
        """
        if not self.is_up:
            return 0
        if not self.reliable:
            return None
        return self.window - len(self._unacked) + self.send_queue - len(self._queue)

    def liveness(self, now_ms: int) -> "tuple[bool, bool, int]":
        """(their frames arriving, our pings answered, ms since the last frame).

        Each direction is alive when nothing has waited longer than the
        keepalive timeout: the last frame from the peer, and the oldest ping
        still unanswered.
        """
        timeout = self.keepalive_timeout_ms
        heard_ms = now_ms - self._last_rx_ms
        waiting = self._ping_sent_ms
        answered = waiting is None or now_ms - waiting < timeout
        return self.is_up and heard_ms < timeout, self.is_up and answered, heard_ms

    def next_deadline_ms(self) -> "int | None":
        """When ``tick`` next has work to do, in the ``now_ms`` scale (None before start)."""
        if not self._started:
            return None
        if not self.is_up:
            return self._last_hello_ms + self.keepalive_interval_ms
        deadline = self._last_rx_ms + self.keepalive_timeout_ms
        ping = self._last_tx_ms + self._ping_interval_ms
        if ping < deadline:
            deadline = ping
        if self._rto_deadline_ms is not None and self._rto_deadline_ms < deadline:
            deadline = self._rto_deadline_ms
        return deadline

    def bytes_to_send(self, max_bytes: "int | None" = None) -> bytes:
        """Take up to ``max_bytes`` (all if None) of the bytes waiting for the line."""
        out = self._out
        if max_bytes is None or max_bytes >= len(out):
            data = bytes(out)
            out[:] = b""
        else:
            data = bytes(out[:max_bytes])
            out[:max_bytes] = b""
        return data

    @property
    def pending_output(self) -> int:
        """Bytes waiting in ``bytes_to_send``."""
        return len(self._out)

    def send_data(self, topic: str, payload: bytes, now_ms: int) -> None:
        """Send a one-way message on ``topic``.

        Raises :class:`LinkDown`, :class:`MessageTooLarge`,
        :class:`SendQueueFull` or :class:`LinkUsageError`.
        """
        raw = _topic_bytes(topic, "topic", MAX_TOPIC_BYTES)
        fields = bytes((len(raw),)) + raw + _payload_bytes(payload)
        self._send_app(DATA, fields, now_ms)

    def send_request(self, req_id: int, topic: str, payload: bytes, now_ms: int) -> None:
        """Send a request (``req_id`` in 0..65535) on ``topic``; errors as for send_data."""
        head = _u16(req_id, "request id")
        raw = _topic_bytes(topic, "topic", MAX_TOPIC_BYTES)
        fields = head + bytes((len(raw),)) + raw + _payload_bytes(payload)
        self._send_app(REQUEST, fields, now_ms)

    def send_response(self, req_id: int, status: int, payload: "bytes | str", now_ms: int) -> None:
        """Answer request ``req_id``: status 0 with a payload, or an error code with its text.

        Errors as for send_data.
        """
        head = _u16(req_id, "request id")
        if type(status) is not int or not 0 <= status <= 0xFF:
            raise LinkUsageError(f"status should be an integer in 0..255, got {status!r}")
        if type(payload) is str:
            if status == 0:
                raise LinkUsageError("a response with status 0 carries bytes, not text")
            payload = payload.encode("utf-8")
        payload = _payload_bytes(payload)
        if status:
            try:
                str(payload, "utf-8")
            except UnicodeError:
                raise LinkUsageError(
                    f"the error text of a response must be utf-8, got {hex_preview(payload)}"
                ) from None
        fields = head + bytes((status,)) + payload
        self._send_app(RESPONSE, fields, now_ms)

    def send_to(self, dest: str, topic: str, payload: bytes, now_ms: int) -> None:
        """Ask the host to route a message to ``dest`` (a node IP, or IP/device ID).

        Device role only. Errors as for send_data.
        """
        if self.role != "device":
            raise LinkUsageError("send_to is for devices: a host routes, it does not ask")
        raw_dest = _topic_bytes(dest, "destination", MAX_DEST_BYTES)
        raw = _topic_bytes(topic, "topic", MAX_TOPIC_BYTES)
        fields = (
            bytes((len(raw_dest),)) + raw_dest + bytes((len(raw),)) + raw + _payload_bytes(payload)
        )
        self._send_app(SEND_TO, fields, now_ms)

    # --- sending -----------------------------------------------------------

    def _send_app(self, ftype: int, fields: bytes, now_ms: int) -> None:
        name = TYPE_NAMES[ftype]
        if not self.is_up:
            raise LinkDown(f"cannot send {name}: the session is not up")
        size = 1 + len(fields) + (1 if self.reliable else 0)
        if self._mac is not None:
            size += _AUTH_BYTES
        if size > self._frame_limit:
            raise MessageTooLarge(
                f"{name} frame of {size} bytes exceeds the {self._frame_limit}-byte frame limit"
            )
        if not self.reliable:
            if len(self._out) + cobs.max_encoded_len(size + CRC_BYTES) + 1 > self.max_output_bytes:
                raise SendQueueFull(
                    f"cannot send {name}: {len(self._out)} bytes already wait for the line "
                    f"(limit {self.max_output_bytes})"
                )
            self._emit(ftype, fields, now_ms)
        elif len(self._unacked) < self.window:
            self._send_reliable(ftype, fields, now_ms)
        elif len(self._queue) < self.send_queue:
            self._queue.append((ftype, fields))
        else:
            raise SendQueueFull(
                f"cannot send {name}: {len(self._unacked)} frames await acknowledgement "
                f"and {len(self._queue)} are queued (limit {self.send_queue})"
            )

    def _send_reliable(self, ftype: int, fields: bytes, now_ms: int) -> None:
        seq = self._tx_seq
        self._tx_seq = (seq + 1) & 0xFF
        self._unacked.append((seq, ftype, fields))
        if self._rto_deadline_ms is None:
            self._rto_deadline_ms = now_ms + self.rto_ms
        # Kept even if the output is full: the retransmission timer resends it.
        self._emit(ftype, fields, now_ms, seq)

    def _send_hello(self, now_ms: int) -> None:
        hello = Hello(
            self.my_id,
            self.epoch,
            self.max_frame,
            self.keepalive_interval_ms,
            self.keepalive_timeout_ms,
            self.want_reliable,
            self._mac is not None,
            self._their_epoch,
            self.is_up,
        )
        self._last_hello_ms = now_ms
        self._emit(HELLO, hello.encode(), now_ms, None, True)

    def _emit(
        self, ftype: int, fields: bytes, now_ms: int, seq: "int | None" = None, lead: bool = False
    ) -> None:
        """Frame ``fields`` as a ``ftype`` frame and queue it for the line."""
        body = bytearray(1)
        header = ftype
        if seq is not None:
            header |= FLAG_RELIABLE
            body.append(seq)
        mac = self._mac
        if mac is not None:
            header |= FLAG_AUTH
            if self._tx_counter >= _U32_MAX:
                raise LinkUsageError(
                    "auth counter exhausted after 2**32-1 frames: restart the link with a new epoch"
                )
            self._tx_counter += 1
            body += struct.pack(">I", self._tx_counter)
        body[0] = header
        body += fields
        if mac is not None:
            body += mac.digest(struct.pack(">II", self.epoch, self._their_epoch) + body)[:TAG_BYTES]
        body += struct.pack("<I", crc32(body) & _U32_MAX)
        wire = cobs.encode(body)
        extra = 2 if lead else 1
        self._last_tx_ms = now_ms  # even when skipped, or a due ping would stay due
        if len(self._out) + len(wire) + extra > self.max_output_bytes:
            # Only control frames and reliable frames get here: the owner is
            # not draining the output. Keepalive or retransmission recovers.
            self.stats.tx_skipped += 1
            return
        if lead:
            self._out += cobs.DELIMITER
        self._out += wire
        self._out += cobs.DELIMITER
        self.stats.frames_out += 1
        self.stats.bytes_out += len(wire) + extra

    # --- receiving ---------------------------------------------------------

    def _drop(self, error: FrameError, events: list) -> None:
        drops = self.stats.drops
        drops[error.reason] = drops.get(error.reason, 0) + 1
        events.append(Dropped(error))

    def _receive_frame(self, encoded: bytes, now_ms: int, events: list) -> None:
        raw = cobs.decode(encoded)
        n = len(raw)
        if n < 1 + CRC_BYTES:
            shown = ": " + hex_preview(raw) if n else ""
            raise BadFrame(
                f"bad frame: {n} bytes is shorter than the {1 + CRC_BYTES}-byte minimum{shown}"
            )
        if n - CRC_BYTES > self.max_frame:
            raise FrameTooLarge(
                f"oversize frame: body of {n - CRC_BYTES} bytes exceeds the {self.max_frame}-byte "
                f"limit: {hex_preview(raw)}"
            )
        body = raw[:-CRC_BYTES]
        sent_crc = int.from_bytes(raw[-CRC_BYTES:], "little")
        crc = crc32(body) & _U32_MAX
        if crc != sent_crc:
            raise BadCRC(
                f"bad crc: frame says 0x{sent_crc:08x}, body gives 0x{crc:08x}: {hex_preview(body)}"
            )
        header = body[0]
        ftype = header & 0x0F
        if header & _FLAGS_RESERVED:
            raise BadFrame(f"bad frame: reserved bits set in header 0x{header:02x}")
        if ftype not in TYPE_NAMES:
            raise UnknownType(f"unknown frame type {ftype} in header 0x{header:02x}")
        name = TYPE_NAMES[ftype]
        if ftype != HELLO and not self.is_up:
            # Likely the peer kept a session we lost (we restarted): tell it
            # at once, at most once per rto_ms.
            if now_ms - self._last_hello_ms >= self.rto_ms:
                self._send_hello(now_ms)
            raise NotUp(f"{name} frame before the session is up")
        pos = 1
        seq = None
        if header & FLAG_RELIABLE:
            if ftype not in _APP_TYPES or not self.reliable:
                raise BadFrame(f"bad frame: unexpected sequence number on a {name} frame")
            if len(body) < 2:
                raise BadFrame(f"bad frame: {name} frame ends before its sequence number")
            seq = body[1]
            pos = 2
        elif self.reliable and ftype in _APP_TYPES:
            raise BadFrame(f"bad frame: {name} frame without a sequence number in reliable mode")

        mac = self._mac
        counter = 0
        if mac is None:
            if header & FLAG_AUTH:
                raise AuthFailure(
                    f"auth failure: {name} frame is authenticated but no psk is configured"
                )
            fields = body[pos:]
        else:
            if not header & FLAG_AUTH:
                raise AuthFailure(
                    f"auth failure: {name} frame is not authenticated but a psk is configured"
                )
            if len(body) < pos + _AUTH_BYTES:
                raise AuthFailure(
                    f"auth failure: {name} frame of {len(body)} bytes is too short "
                    "for its counter and tag"
                )
            counter = int.from_bytes(body[pos : pos + COUNTER_BYTES], "big")
            fields = body[pos + COUNTER_BYTES : -TAG_BYTES]

        # Parse before authenticating only the hello, whose epochs the tag covers.
        hello = None
        message = None
        if ftype == HELLO:
            hello = Hello.decode(fields)
            sender, receiver = hello.epoch, hello.echo_epoch
        else:
            sender, receiver = self._their_epoch, self.epoch
        if mac is not None:
            self._check_auth(mac, body, sender, receiver, counter, name)
        # From here the frame is the peer's: it proves the peer is alive.
        self._last_rx_ms = now_ms
        if ftype == PING or ftype == PONG:
            if len(fields) != 2:
                raise BadFrame(f"bad frame: {name} of {len(fields)} bytes, expected 2")
        elif ftype == ACK:
            if not self.reliable:
                raise BadFrame("bad frame: ack outside reliable mode")
            if len(fields) != 1:
                raise BadFrame(f"bad frame: ack of {len(fields)} bytes, expected 1")
        elif ftype != HELLO:
            message = self._parse_app(ftype, fields, name)
            if seq is not None:
                self._ack_pending = True
                if seq != self._rx_expected:
                    behind = (self._rx_expected - seq) & 0xFF
                    if 1 <= behind <= 128:
                        raise Duplicate(
                            f"duplicate {name} frame: seq {seq}, expecting {self._rx_expected}"
                        )
                    raise OutOfOrder(
                        f"{name} frame out of order: seq {seq}, expecting {self._rx_expected}"
                    )
                self._rx_expected = (seq + 1) & 0xFF

        self.stats.frames_in += 1
        if ftype == HELLO:
            self._on_hello(hello, now_ms, events)
        elif ftype == PING:
            self._emit(PONG, fields, now_ms)
        elif ftype == PONG:
            if self._ping_sent_ms is not None and int.from_bytes(fields, "big") == self._ping_nonce:
                self.rtt_ms = now_ms - self._ping_sent_ms
                self._ping_sent_ms = None
        elif ftype == ACK:
            self._on_ack(fields[0], now_ms)
        else:
            events.append(message)

    def _check_auth(
        self, mac: HmacSha256, body: bytes, sender: int, receiver: int, counter: int, name: str
    ) -> None:
        signed = body[:-TAG_BYTES]
        tag = body[-TAG_BYTES:]
        if not equal(mac.digest(struct.pack(">II", sender, receiver) + signed)[:TAG_BYTES], tag):
            raise AuthFailure(
                f"auth failure: {name} frame's tag does not match (wrong key, or epochs "
                f"{sender}/{receiver} unknown to the sender): tag {hex_preview(tag)}"
            )
        last = self._last_counter(sender)
        if counter <= last:
            raise Replay(
                f"replay: {name} frame's counter {counter} is not above {last}, "
                f"the last accepted from epoch {sender}"
            )
        if sender != self._rx_epoch:
            if self._rx_epoch:
                self._seen.append([self._rx_epoch, self._rx_counter])
                if len(self._seen) > _SEEN_EPOCHS:
                    self._seen.pop(0)
            self._rx_epoch = sender
        self._rx_counter = counter

    def _last_counter(self, sender: int) -> int:
        if sender == self._rx_epoch:
            return self._rx_counter
        for epoch, counter in self._seen:
            if epoch == sender:
                return counter
        return 0

    def _parse_app(self, ftype: int, fields: bytes, name: str) -> Received:
        if ftype == DATA:
            topic, pos = _take_text(fields, 0, "topic", name)
            return Received(KIND_DATA, topic, fields[pos:])
        if ftype == SEND_TO:
            if self.role != "host":
                raise BadFrame("bad frame: send_to frame sent to a device")
            dest, pos = _take_text(fields, 0, "destination", name)
            topic, pos = _take_text(fields, pos, "topic", name)
            return Received(KIND_SEND_TO, topic, fields[pos:], dest=dest)
        if len(fields) < 3:
            raise BadFrame(f"bad frame: {name} frame of {len(fields)} bytes is too short")
        req_id = (fields[0] << 8) | fields[1]
        if ftype == REQUEST:
            topic, pos = _take_text(fields, 2, "topic", name)
            return Received(KIND_REQUEST, topic, fields[pos:], req_id=req_id)
        status = fields[2]
        payload = fields[3:]
        error = None
        if status:
            try:
                error = str(payload, "utf-8")
            except UnicodeError:
                raise BadFrame(
                    f"bad frame: response error text is not valid utf-8: {hex_preview(payload)}"
                ) from None
        return Received(KIND_RESPONSE, None, payload, req_id=req_id, status=status, error=error)

    def _on_hello(self, hello: Hello, now_ms: int, events: list) -> None:
        reply = False
        if hello.epoch != self._their_epoch:
            if self.is_up:
                self._down(DOWN_PEER_RESTART, events)
            self._their_epoch = hello.epoch
            reply = True
        self.peer_hello = hello
        if hello.echo_epoch != self.epoch:
            if self.is_up:
                self._down(DOWN_PEER_RESET, events)
            reply = True
        elif not self.is_up:
            self._up(hello, now_ms, events)
        if not hello.up:
            # The peer waits for a hello that echoes its epoch: it may have
            # lost ours (a hello that is up itself needs no answer, which
            # ends the exchange).
            reply = True
        if reply:
            self._send_hello(now_ms)

    def _up(self, hello: Hello, now_ms: int, events: list) -> None:
        self.is_up = True
        self.reliable = self.want_reliable and hello.reliable
        limit = hello.max_frame
        self._frame_limit = limit if limit < self.max_frame else self.max_frame
        # Send often enough for the peer's timeout as well as our interval.
        half = hello.keepalive_timeout_ms // 2
        interval = self.keepalive_interval_ms
        self._ping_interval_ms = half if 0 < half < interval else interval
        self._tx_seq = 0
        self._rx_expected = 0
        self._unacked = []
        self._queue = []
        self._rto_deadline_ms = None
        self._ack_pending = False
        self._ping_sent_ms = None
        events.append(SessionUp(hello))

    def _down(self, reason: str, events: list) -> None:
        lost = len(self._unacked) + len(self._queue)
        self.is_up = False
        self.reliable = False
        self._unacked = []
        self._queue = []
        self._rto_deadline_ms = None
        self._ack_pending = False
        events.append(SessionDown(reason, lost))

    def _on_ack(self, acked: int, now_ms: int) -> None:
        unacked = self._unacked
        for i in range(len(unacked)):
            if unacked[i][0] == acked:
                self._unacked = unacked = unacked[i + 1 :]
                break
        else:
            return  # a stale or repeated ack: nothing new
        while self._queue and len(unacked) < self.window:
            ftype, fields = self._queue.pop(0)
            self._send_reliable(ftype, fields, now_ms)
            unacked = self._unacked
        self._rto_deadline_ms = now_ms + self.rto_ms if unacked else None
