"""The hello frame's fields and their CBOR form (docs/serial-protocol.md, section 4.1).

A hello is a CBOR array of unsigned integers and one text string. This
module writes and reads that shape itself, so that a board never loads the
general CBOR codec (7 KB of heap as .mpy): only a hello of another shape, a
bad one or one from a later version with other kinds of fields, is handed to
:mod:`firmware_bridge.cbor`, which then decodes it or says exactly what is
wrong with it.

Runs unchanged on CPython 3.9+ and MicroPython.
"""

from .frame import (
    HELLO_AUTH,
    HELLO_RELIABLE,
    HELLO_UP,
    MAX_ID_BYTES,
    MIN_FRAME_BYTES,
    PROTOCOL_VERSION,
    U32_MAX,
    FrameError,
    Record,
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
        out = bytearray(b"\x88")  # an array of 8
        _head(out, 0, self.version)
        raw = self.id.encode("utf-8")
        _head(out, 0x60, len(raw))
        out += raw
        for value in (
            self.epoch,
            self.max_frame,
            self.keepalive_interval_ms,
            self.keepalive_timeout_ms,
            flags,
            self.echo_epoch,
        ):
            _head(out, 0, value)
        return bytes(out)

    @staticmethod
    def decode(raw: "bytes | bytearray") -> "Hello":
        """Parse a hello's CBOR array. Raises :class:`FrameError` ("bad hello")."""
        item = _read_simple(raw)
        if item is None:
            from . import cbor  # another shape: the general codec decides

            try:
                item = cbor.decode(raw, max_depth=1, max_items=32)
            except cbor.CBORError as exc:
                raise FrameError("bad hello: " + str(exc), "bad hello") from None
        if type(item) is not list or len(item) < 8:
            raise FrameError(
                f"bad hello: expected an array of at least 8 fields, got {_describe(item)}: "
                f"{hex_preview(raw)}",
                "bad hello",
            )
        version = _uint(item[0], "version", 1, 0xFFFF)
        if version != PROTOCOL_VERSION:
            raise FrameError(
                f"bad hello: unsupported protocol version {version} "
                f"(this link speaks {PROTOCOL_VERSION})",
                "bad hello",
            )
        peer_id = item[1]
        if type(peer_id) is not str:
            raise FrameError(f"bad hello: id should be text, got {_describe(peer_id)}", "bad hello")
        id_bytes = len(peer_id.encode("utf-8"))
        if not 1 <= id_bytes <= MAX_ID_BYTES:
            raise FrameError(
                f"bad hello: id of {id_bytes} bytes is outside 1..{MAX_ID_BYTES}", "bad hello"
            )
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
        raise FrameError(
            f"bad hello: {name} should be an integer, got {_describe(value)}", "bad hello"
        )
    if not low <= value <= high:
        raise FrameError(f"bad hello: {name} {value} is outside {low}..{high}", "bad hello")
    return value


def _head(out: bytearray, major: int, n: int) -> None:
    """Append a CBOR head, shortest form (``major`` is the type's top three bits)."""
    if n < 24:
        out.append(major | n)
    elif n < 0x100:
        out.append(major | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(major | 25)
        out += n.to_bytes(2, "big")
    elif n <= U32_MAX:
        out.append(major | 26)
        out += n.to_bytes(4, "big")
    else:
        out.append(major | 27)
        out += n.to_bytes(8, "big")


def _read_simple(raw: "bytes | bytearray") -> "list | None":
    """Decode an array of 1..32 unsigned integers and valid texts; None for anything else.

    Exactly what :func:`firmware_bridge.cbor.decode` returns for such input
    (any width of integer, as a receiver must accept); the rest goes there.
    """
    n = len(raw)
    if not n:
        return None
    count, pos = _read_head(raw, 0, 0x80)
    if count is None or not 1 <= count <= 32:
        return None
    items = []
    for _ in range(count):
        if pos >= n:
            return None
        major = raw[pos] & 0xE0
        value, pos = _read_head(raw, pos, major)
        if value is None:
            return None
        if major == 0x60:
            stop = pos + value
            if stop > n:
                return None
            try:
                value = str(raw[pos:stop], "utf-8")
            except UnicodeError:
                return None
            pos = stop
        elif major != 0:
            return None
        items.append(value)
    return items if pos == n else None


def _read_head(raw: "bytes | bytearray", pos: int, major: int) -> "tuple[int | None, int]":
    """The argument of the head at ``pos`` if of type ``major``, and the position after it."""
    n = len(raw)
    initial = raw[pos]
    if initial & 0xE0 != major or (major != 0 and major != 0x60 and major != 0x80):
        return None, pos
    info = initial & 0x1F
    pos += 1
    if info < 24:
        return info, pos
    if info > 27:
        return None, pos  # indefinite length or reserved: the codec's to judge
    size = 1 << (info - 24)
    if pos + size > n:
        return None, pos
    return int.from_bytes(raw[pos : pos + size], "big"), pos + size
