"""The hello frame's fields and their CBOR form (docs/serial-protocol.md, section 4.1).

Runs unchanged on CPython 3.9+ and MicroPython.
"""

from . import cbor
from .events import Record
from .frame import (
    HELLO_AUTH,
    HELLO_RELIABLE,
    HELLO_UP,
    MAX_ID_BYTES,
    MIN_FRAME_BYTES,
    PROTOCOL_VERSION,
    U32_MAX,
    BadHello,
    hex_preview,
)


class Hello(Record):
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
        epoch = _uint(item[2], "epoch", 1, U32_MAX)
        max_frame = _uint(item[3], "max frame bytes", MIN_FRAME_BYTES, 0xFFFF)
        interval = _uint(item[4], "keepalive interval", 1, U32_MAX)
        timeout = _uint(item[5], "keepalive timeout", 1, U32_MAX)
        flags = _uint(item[6], "flags", 0, 0xFF)
        echo = _uint(item[7], "echoed epoch", 0, U32_MAX)
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
