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

    __slots__ = ("_buf", "_error", "_need", "max_frame_bytes", "name")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, name: str = "peer") -> None:
        self.max_frame_bytes = max_frame_bytes
        self.name = name
        self._buf = bytearray()
        self._need = 0  # length of the frame being collected, 0 while reading a header
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    @property
    def mid_frame(self) -> bool:
        """Whether part of a frame has arrived, if only its header (then ``buffered`` is 0)."""
        return bool(self._need or self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the frame bodies it completes, in order.

        Raises :class:`FrameTooLarge` when a header declares a frame over the
        limit.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while True:
            if self._need == 0:
                if end - pos < HEADER_BYTES:
                    break
                length = int.from_bytes(buf[pos : pos + HEADER_BYTES], "big")
                if length > self.max_frame_bytes:
                    self._error = FrameTooLarge(
                        f"{self.name}: frame length {length} exceeds "
                        f"{self.max_frame_bytes}-byte limit"
                    )
                    raise self._error
                pos += HEADER_BYTES
                self._need = length
                if length == 0:
                    frames.append(b"")
                    continue
            if end - pos < self._need:
                break
            frames.append(bytes(buf[pos : pos + self._need]))
            pos += self._need
            self._need = 0
        if pos:
            buf[:pos] = b""
        return frames

    def eof(self) -> None:
        """Declare the end of the stream.

        Raises :class:`TruncatedFrame` if it ended inside a frame.
        """
        if self._error is not None:
            raise self._error
        if self._need or self._buf:
            if self._need:
                detail = f"got {len(self._buf)} of {self._need} body bytes"
            else:
                detail = f"got {len(self._buf)} of {HEADER_BYTES} header bytes"
            self._error = TruncatedFrame(f"{self.name}: stream ended mid-frame: {detail}")
            raise self._error
