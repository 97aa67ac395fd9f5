"""What a link hands its owner: session changes, messages, drops, and its counters.

And :func:`parse_app`, which reads an application frame's fields into the
:class:`Received` it hands on.

Runs unchanged on CPython 3.9+ and MicroPython.
"""

from .frame import (
    DATA,
    KIND_DATA,
    KIND_REQUEST,
    KIND_RESPONSE,
    KIND_SEND_TO,
    REQUEST,
    SEND_TO,
    FrameError,
    Record,
    hex_preview,
    take_text,
)

try:
    from typing import TYPE_CHECKING
except ImportError:
    TYPE_CHECKING = False
if TYPE_CHECKING:
    from .hello import Hello


class SessionUp(Record):
    """The session is up: the peer's hello echoed our epoch."""

    __slots__ = ("peer_hello",)
    _fields = ("peer_hello",)

    def __init__(self, peer_hello: "Hello") -> None:
        self.peer_hello = peer_hello


class SessionDown(Record):
    """The session went down; ``lost`` reliable messages were never acknowledged."""

    __slots__ = ("lost", "reason")
    _fields = ("reason", "lost")

    def __init__(self, reason: str, lost: int = 0) -> None:
        self.reason = reason
        self.lost = lost


class Received(Record):
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


class Dropped(Record):
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
    """Counters: frames and bytes each way, drops by reason, retransmissions, held back."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "drops",
        "frames_in",
        "frames_out",
        "held_back",
        "out_of_memory",
        "retransmits",
        "tx_skipped",
    )

    def __init__(self) -> None:
        self.frames_in = 0  # valid frames accepted
        self.frames_out = 0
        self.bytes_in = 0  # every byte fed to receive_bytes
        self.bytes_out = 0  # every byte queued for the line
        self.retransmits = 0
        self.held_back = 0  # frames not taken for want of room (flow control): resent
        self.out_of_memory = 0  # frames lost to a MemoryError while being read
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
            f"retransmits={self.retransmits}, held_back={self.held_back}, "
            f"tx_skipped={self.tx_skipped}, "
            f"out_of_memory={self.out_of_memory}, "
            f"drops={self.drops!r})"
        )


def parse_app(ftype: int, fields: bytes, name: str, role: str) -> Received:
    """The :class:`Received` for an application frame's fields (docs/serial-protocol.md,
    section 3), for a link of ``role``. Raises :class:`FrameError`
    ("bad frame")."""
    if ftype == DATA:
        topic, pos = take_text(fields, 0, "topic", name)
        return Received(KIND_DATA, topic, bytes(fields[pos:]))
    if ftype == SEND_TO:
        if role != "host":
            raise FrameError("bad frame: send_to frame sent to a device", "bad frame")
        dest, pos = take_text(fields, 0, "destination", name)
        topic, pos = take_text(fields, pos, "topic", name)
        return Received(KIND_SEND_TO, topic, bytes(fields[pos:]), dest=dest)
    if len(fields) < 3:
        raise FrameError(
            f"bad frame: {name} frame of {len(fields)} bytes is too short", "bad frame"
        )
    req_id = (fields[0] << 8) | fields[1]
    if ftype == REQUEST:
        topic, pos = take_text(fields, 2, "topic", name)
        return Received(KIND_REQUEST, topic, bytes(fields[pos:]), req_id=req_id)
    status = fields[2]
    payload = bytes(fields[3:])
    error = None
    if status:
        try:
            error = str(payload, "utf-8")
        except UnicodeError:
            raise FrameError(
                f"bad frame: response error text is not valid utf-8: {hex_preview(payload)}",
                "bad frame",
            ) from None
    return Received(KIND_RESPONSE, None, payload, req_id=req_id, status=status, error=error)
