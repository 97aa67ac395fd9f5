"""Length-prefixed stream framing.

A frame is a 4-byte big-endian unsigned length followed by that many bytes
of body (one CBOR-encoded message). The decoder refuses a length over the
limit as soon as the 4 header bytes have arrived, so a peer can never make
it buffer more than ``max_frame_bytes`` plus one read.
"""

from __future__ import annotations

from ..errors import FrameTooLarge, ProtocolError, TruncatedFrame

HEADER_BYTES = 4
DEFAULT_MAX_FRAME_BYTES = 64 * 1024
#: The largest limit a node may configure: the length field is 32 bits, but
#: nothing on an edge board needs a frame this big.
MAX_FRAME_BYTES_LIMIT = 16 * 1024 * 1024


def encode_frame(body: bytes) -> bytes:
    """Prefix ``body`` with its length."""
    return len(body).to_bytes(HEADER_BYTES, "big") + body


class FrameDecoder:
    """Splits a byte stream into frame bodies.

    ``feed()`` returns the bodies completed by the new bytes. After an
    error the decoder stays broken and raises the same error on every call,
    so a caller cannot accidentally carry on with a desynchronised stream.
    """

    __slots__ = ("_buf", "_error", "max_frame_bytes", "name")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, name: str = "peer") -> None:
        self.max_frame_bytes = max_frame_bytes
        self.name = name
        # What has arrived of the frame being collected, header included. It
        # is short or empty after most reads, so joining it to the next read
        # copies little, and frames are sliced straight out of the bytes.
        self._buf = b""
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame: of its body once its
        header is complete, else of its header."""
        held = len(self._buf)
        return held - HEADER_BYTES if held >= HEADER_BYTES else held

    @property
    def mid_frame(self) -> bool:
        """Whether part of a frame has arrived, if only some of its header."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the frame bodies it completes, in order.

        Raises :class:`FrameTooLarge` when a header declares a frame over the
        limit.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf + data if self._buf else bytes(data)
        end = len(buf)
        limit = self.max_frame_bytes
        frames: list[bytes] = []
        append = frames.append
        pos = 0
        while end - pos >= HEADER_BYTES:
            length = int.from_bytes(buf[pos : pos + HEADER_BYTES], "big")
            if length > limit:
                self._buf = b""
                self._error = FrameTooLarge(
                    f"{self.name}: frame length {length} exceeds {limit}-byte limit"
                )
                raise self._error
            stop = pos + HEADER_BYTES + length
            if stop > end:
                break
            append(buf[pos + HEADER_BYTES : stop])
            pos = stop
        self._buf = buf[pos:] if pos else buf
        return frames

    def eof(self) -> None:
        """Declare the end of the stream.

        Raises :class:`TruncatedFrame` if it ended inside a frame.
        """
        if self._error is not None:
            raise self._error
        held = len(self._buf)
        if held:
            if held >= HEADER_BYTES:
                need = int.from_bytes(self._buf[:HEADER_BYTES], "big")
                detail = f"got {held - HEADER_BYTES} of {need} body bytes"
            else:
                detail = f"got {held} of {HEADER_BYTES} header bytes"
            self._error = TruncatedFrame(f"{self.name}: stream ended mid-frame: {detail}")
            raise self._error
