"""The link's frames: types, header flags, limits, errors, and the fields of each type.

The lowest layer of the UART link above COBS (docs/serial-protocol.md,
sections 2, 3 and 8): what a frame's header and fields hold, the errors of
a link's misuse, and the codecs of the application frames' fields.
:mod:`firmware_bridge.link` builds on it and re-exports what a link's
user needs (the types, limits, kinds and errors; the hello's flag bits, the
key's length limits and the protocol version are only here).

Runs unchanged on CPython 3.9+ and MicroPython.
"""

import struct

from .cobs import FrameError, LinkError, hex_preview

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
APP_TYPES = (DATA, REQUEST, RESPONSE, SEND_TO)

# Header flags (high 4 bits of the header byte).
FLAG_RELIABLE = const(0x10)
FLAG_AUTH = const(0x20)
FLAGS_RESERVED = const(0xC0)

# Bits of the hello's flags field.
HELLO_RELIABLE = const(1)
HELLO_AUTH = const(2)
HELLO_UP = const(4)  # the sender considers the session up

CRC_BYTES = const(4)
COUNTER_BYTES = const(4)
TAG_BYTES = const(16)
AUTH_BYTES = const(20)  # COUNTER_BYTES + TAG_BYTES

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
U32_MAX = const(0xFFFFFFFF)

#: A device publishes here (payload: the count, as text) after it survived a
#: MemoryError (firmware_bridge.driver), so that its node hears of it.
MEMORY_TOPIC = "$device/out_of_memory"

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
# LinkError and FrameError (whose ``reason`` tells why a frame is dropped) live
# in cobs.py, the lowest module; link.py re-exports them with these.


class LinkUsageError(LinkError):
    """The owner misused the link: a bug in the caller, not bad bytes."""


class LinkDown(LinkUsageError):
    """A message was sent while the session is not up."""


class MessageTooLarge(LinkUsageError):
    """A message or one of its fields exceeds its size limit."""


class SendQueueFull(LinkUsageError):
    """No room for a message: the reliable window and queue, or the unread output, are full."""


# --- fields ------------------------------------------------------------------


def topic_bytes(topic: str, what: str, limit: int) -> bytes:
    if type(topic) is not str:
        raise LinkUsageError(f"{what} should be text, got {type(topic).__name__}")
    raw = topic.encode("utf-8")
    if not raw:
        raise LinkUsageError(f"{what} must not be empty")
    if len(raw) > limit:
        raise MessageTooLarge(f"{what} of {len(raw)} bytes exceeds the {limit}-byte limit")
    return raw


def payload_bytes(payload: "bytes | bytearray | memoryview") -> bytes:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise LinkUsageError(f"payload should be bytes, got {type(payload).__name__}")
    return bytes(payload)


def u16(value: int, what: str) -> bytes:
    if type(value) is not int or not 0 <= value <= 0xFFFF:
        raise LinkUsageError(f"{what} should be an integer in 0..65535, got {value!r}")
    return struct.pack(">H", value)


def response_fields(req_id: int, status: int, payload: "bytes | str") -> bytes:
    """A RESPONSE frame's fields: status 0 with bytes, or an error code with its text."""
    head = u16(req_id, "request id")
    if type(status) is not int or not 0 <= status <= 0xFF:
        raise LinkUsageError(f"status should be an integer in 0..255, got {status!r}")
    if type(payload) is str:
        if status == 0:
            raise LinkUsageError("a response with status 0 carries bytes, not text")
        payload = payload.encode("utf-8")
    payload = payload_bytes(payload)
    if status:
        try:
            str(payload, "utf-8")
        except UnicodeError:
            raise LinkUsageError(
                f"the error text of a response must be utf-8, got {hex_preview(payload)}"
            ) from None
    return head + bytes((status,)) + payload


def take_text(fields: bytes, pos: int, what: str, kind: str) -> "tuple[str, int]":
    """Read a length-prefixed utf-8 field at ``pos``; return it and the offset after it."""
    if pos >= len(fields):
        raise FrameError(f"bad frame: {kind} frame ends before its {what} length", "bad frame")
    length = fields[pos]
    stop = pos + 1 + length
    if length == 0:
        raise FrameError(f"bad frame: {kind} frame has an empty {what}", "bad frame")
    if stop > len(fields):
        raise FrameError(
            f"bad frame: {kind} frame's {what} of {length} bytes exceeds "
            f"the {len(fields) - pos - 1} bytes remaining",
            "bad frame",
        )
    try:
        text = str(fields[pos + 1 : stop], "utf-8")
    except UnicodeError:
        raise FrameError(
            f"bad frame: {kind} frame's {what} is not valid utf-8: "
            f"{hex_preview(fields[pos + 1 : stop])}",
            "bad frame",
        ) from None
    return text, stop


class Record:
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

    def __repr__(self) -> str:
        parts = [f"{name}={getattr(self, name)!r}" for name in self._fields]
        return "{}({})".format(type(self).__name__, ", ".join(parts))
