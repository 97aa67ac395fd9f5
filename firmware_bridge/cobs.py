"""COBS framing for the UART link: encode, decode, and split a byte stream.

Consistent Overhead Byte Stuffing (Cheshire and Baker, 1999) rewrites a
frame so that it contains no 0x00 byte; a 0x00 then marks the end of each
frame on the line. The cost is one byte per 254 bytes of frame (at least
one), and a reader that loses its place resynchronises at the next 0x00.

Runs unchanged on CPython 3.9+ and MicroPython: no typing at run time, no
``from __future__`` import, annotations only as strings.

This module also opens the link's error hierarchy (:class:`LinkError`), as
the lowest module of the link; :mod:`firmware_bridge.link` adds the rest
and re-exports these.
"""

try:
    from typing import TYPE_CHECKING
except ImportError:
    TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef]
        return x


DELIMITER = b"\x00"
_HEX_LIMIT = const(16)
_BLOCK = const(254)  # data bytes in a full COBS block (code byte 0xff)


# --- errors ----------------------------------------------------------------


class LinkError(Exception):
    """Base of every error raised by firmware_bridge's link layer."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)


class FrameError(LinkError):
    """Bytes from the line do not form a frame the link accepts; it is dropped and counted.

    ``reason`` names the failure in a few words, as docs/serial-protocol.md
    (section 7) lists them: "bad cobs", "oversize", "bad crc", "bad frame",
    "unknown type", "bad hello", "not up", "auth failure", "replay",
    "duplicate" or "out of order". It is the key the drop is counted under in
    ``Link.stats.drops`` and the ``reason`` of its :class:`Dropped` event.
    (One class with a reason rather than a class per reason, as h11 has one
    RemoteProtocolError: a frame error is data about the line, which code
    tells apart by ``reason``, and each class would keep about 120 bytes of a
    microcontroller's heap.)
    """

    def __init__(self, msg: str, reason: str) -> None:
        super().__init__(msg)
        self.reason = reason


def hex_preview(data: "bytes | bytearray | memoryview") -> str:
    """Return ``data`` as spaced hex, cut after 16 bytes (for error messages)."""
    # bytes.hex(sep) is missing on some MicroPython ports.
    shown = " ".join(f"{b:02x}" for b in bytes(data[:_HEX_LIMIT]))
    if len(data) > _HEX_LIMIT:
        shown += f" ... ({len(data)} bytes)"
    return shown


# --- the codec -------------------------------------------------------------


def max_encoded_len(n: int) -> int:
    """Return the longest COBS encoding of ``n`` bytes (without the delimiter)."""
    return n + 1 + n // _BLOCK


def encode(data: "bytes | bytearray | memoryview") -> bytes:
    """Return the COBS encoding of ``data``: no 0x00 byte, delimiter not included.

    Canonical form: a full block (code 0xff) that ends the data is not
    followed by an empty block, so 254 non-zero bytes encode to 255 bytes.
    (:func:`encode_into` a new buffer: one encoder, the one the link uses.)
    """
    out = bytearray(max_encoded_len(len(data)))
    return bytes(out[: encode_into(data, out, 0)])


def encode_into(data: "bytes | bytearray | memoryview", out: bytearray, pos: int) -> int:
    """Write the COBS encoding of ``data`` into ``out`` at ``pos``; return the position after it.

    No allocation beyond the caller's buffer, which must hold
    ``max_encoded_len(len(data))`` more bytes.
    """
    n = len(data)
    code_at = pos
    pos += 1
    code = 1
    for i in range(n):
        byte = data[i]
        if byte:
            out[pos] = byte
            pos += 1
            code += 1
            if code == 0xFF:
                out[code_at] = 0xFF
                if i + 1 == n:
                    return pos  # canonical: no empty block after a full one
                code_at = pos
                pos += 1
                code = 1
        else:
            out[code_at] = code
            code_at = pos
            pos += 1
            code = 1
    out[code_at] = code
    return pos


def decode_into(data: "bytes | bytearray | memoryview", out: bytearray) -> int:
    """Decode one COBS frame (without its delimiter) into ``out``; return its length.

    ``out`` must hold ``len(data)`` bytes. Raises :class:`FrameError` ("bad cobs") for an
    empty frame, a 0x00 inside it (the first one), or a block whose code
    byte points past the end of the frame.
    """
    n = len(data)
    if n == 0:
        raise FrameError("bad cobs: empty frame", "bad cobs")
    pos = 0
    length = 0
    while pos < n:
        code = data[pos]
        if code == 0:
            raise FrameError(
                f"bad cobs: 0x00 at offset {pos} inside a frame: {hex_preview(data)}", "bad cobs"
            )
        stop = pos + code
        if stop > n:
            for i in range(pos + 1, n):
                if data[i] == 0:
                    raise FrameError(
                        f"bad cobs: 0x00 at offset {i} inside a frame: {hex_preview(data)}",
                        "bad cobs",
                    )
            raise FrameError(
                f"bad cobs: block at offset {pos} claims {code - 1} bytes, "
                f"only {n - pos - 1} remain: {hex_preview(data)}",
                "bad cobs",
            )
        for i in range(pos + 1, stop):
            byte = data[i]
            if byte == 0:
                raise FrameError(
                    f"bad cobs: 0x00 at offset {i} inside a frame: {hex_preview(data)}", "bad cobs"
                )
            out[length] = byte
            length += 1
        pos = stop
        if code != 0xFF and pos < n:
            out[length] = 0
            length += 1
    return length


def decode(data: "bytes | bytearray | memoryview") -> bytes:
    """Decode one COBS frame (without its delimiter) and return the original bytes.

    Raises :class:`FrameError` as :func:`decode_into` does (into a new buffer).
    """
    out = bytearray(len(data))
    return bytes(out[: decode_into(data, out)])


# --- stream splitting ------------------------------------------------------


class FrameSplitter:
    """Cuts a byte stream into 0x00-delimited frames of at most ``max_frame_bytes``.

    ``feed()`` takes any chunk and returns, in line order, each completed
    frame (``bytes``, still COBS-encoded, delimiter removed) and a
    :class:`FrameError` ("oversize") for each frame over the limit. An oversize
    frame is never buffered past the limit: its bytes are counted and
    skipped up to the next delimiter. Empty frames (two delimiters in a
    row) are ignored: a sender may lead with a 0x00 to end any garbage.
    ``frames()`` does the same one frame at a time without copying: the
    splitter's one buffer, of ``max_frame_bytes``, is allocated once.
    """

    __slots__ = ("_buf", "_head", "_n", "_skipped", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int) -> None:
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray(max_frame_bytes)
        self._n = 0  # bytes of the current frame held in _buf
        self._skipped = -1  # bytes of the oversize frame skipped so far; -1 when not skipping
        self._head = b""  # the first bytes of the oversize frame, for its error message

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet delimited."""
        return self._n

    def feed(self, data: "bytes | bytearray | memoryview") -> list:
        """Add ``data``; return the frames and oversize :class:`FrameError` it completes."""
        items = []
        for item in self.frames(data):
            items.append(item if isinstance(item, FrameError) else bytes(item))
        return items

    def frames(self, data: "bytes | bytearray | memoryview") -> "Any":
        """Add ``data``; yield each frame it completes, or an oversize :class:`FrameError`.

        A frame is a memoryview of the splitter's buffer, valid until the
        next one is asked for.
        """
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)  # for find()
        n = len(data)
        source = memoryview(data)
        buf = self._buf
        view = memoryview(buf)  # made per call: a memoryview cannot be pickled
        cap = self.max_frame_bytes
        pos = 0
        while pos < n:
            zero = data.find(DELIMITER, pos)
            stop = n if zero < 0 else zero
            if self._skipped >= 0:
                self._skipped += stop - pos
            elif self._n + stop - pos > cap:
                # At most the first 16 bytes of this frame, for the message.
                head = bytes(buf[: min(self._n, _HEX_LIMIT)])
                self._head = head + data[pos : min(stop, pos + _HEX_LIMIT - len(head))]
                self._skipped = self._n + stop - pos
                self._n = 0
            else:
                end = self._n + stop - pos
                view[self._n : end] = source[pos:stop]
                self._n = end
            if zero < 0:
                break
            pos = zero + 1
            if self._skipped >= 0:
                error = FrameError(
                    f"oversize frame: {self._skipped} bytes exceed the {cap}-byte limit: "
                    f"{hex_preview(self._head)}",
                    "oversize",
                )
                self._skipped = -1
                self._head = b""
                yield error
            elif self._n:
                length = self._n
                self._n = 0
                yield view[:length]

    def reset(self) -> None:
        """Forget any partial frame (for example after the line was reopened)."""
        self._n = 0
        self._skipped = -1
        self._head = b""
