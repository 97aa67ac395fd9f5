"""The per-connection protocol state machine.

Rules, in the order a connection meets them:

1. Each side sends a hello as its first message. The first message received
   must be a hello of our protocol version whose node ID is the one the TLS
   certificate proved; anything else first is :class:`UnexpectedMessage`.
2. After the hello, the connection is OPEN: keepalive (ping, pong), peer
   and device lists, a bye, and the peer's ready may arrive. Data,
   requests, responses and device traffic may not yet: the peer sends
   them only once both sides have sent ready (docs/protocol.md), so one
   arriving first is :class:`UnexpectedMessage`.
3. After the peer's ready the connection is READY: any message but a
   second hello or a second ready may arrive.
4. A bye closes the connection: nothing may follow it.
5. The stream may end only between frames; ending mid-frame is
   :class:`TruncatedFrame`.

Any violation puts the machine in the ERROR state for good: every later
call raises the same error, as h11 does, so no caller can carry on with a
broken stream by mistake.

``PeerProtocol`` never touches a socket: ``receive_data`` takes bytes and
returns messages; ``send`` takes a message and returns bytes.
"""

from __future__ import annotations

from ..errors import HandshakeError, ProtocolError, UnexpectedMessage
from .decoding import decode_message
from .framing import FrameDecoder, encode_frame
from .messages import (
    BYE,
    DEFAULT_LIMITS,
    DEVICES,
    HELLO,
    PEERS,
    PING,
    PONG,
    READY,
    AnyMessage,
    Hello,
    Limits,
    encode_message,
    message_name,
)

AWAIT_HELLO = "await-hello"
OPEN = "open"
READY_STATE = "ready"
CLOSED = "closed"
ERROR = "error"

#: What may arrive before the peer's ready (rule 2).
_BEFORE_READY = frozenset((PING, PONG, BYE, PEERS, DEVICES, READY))


class PeerProtocol:
    """One connection's framing, decoding and message-order rules."""

    __slots__ = ("_decoder", "_error", "expected_node_id", "limits", "name", "state", "their_hello")

    def __init__(
        self,
        *,
        expected_node_id: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        name: str = "peer",
    ) -> None:
        self.expected_node_id = expected_node_id
        self.limits = limits
        self.name = name
        self.state = AWAIT_HELLO
        self.their_hello: Hello | None = None
        self._decoder = FrameDecoder(limits.max_frame_bytes, name)
        self._error: ProtocolError | HandshakeError | None = None

    def _fail(self, exc: ProtocolError | HandshakeError) -> ProtocolError | HandshakeError:
        self.state = ERROR
        self._error = exc
        return exc

    def receive_data(self, data: bytes) -> list[AnyMessage]:
        """Feed bytes from the peer; return the messages they complete.

        The peer's hello is returned as the first message. Raises a
        :class:`ProtocolError` (or :class:`HandshakeError` for a hello whose
        node ID differs from the certificate's) on bad input.
        """
        if self._error is not None:
            raise self._error
        if self.state == CLOSED:
            if data:
                raise self._fail(UnexpectedMessage(f"{self.name}: bytes after bye"))
            return []
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            raise self._fail(exc) from None
        messages: list[AnyMessage] = []
        # Decode and check one frame at a time, in order, so that the outcome
        # does not depend on how the stream was cut into reads.
        for frame in frames:
            if self.state == CLOSED:
                raise self._fail(UnexpectedMessage(f"{self.name}: bytes after bye"))
            try:
                msg = decode_message(frame, self.limits)
            except ProtocolError as exc:
                raise self._fail(exc) from None
            code = msg.code
            if self.state == AWAIT_HELLO:
                if code != HELLO:
                    raise self._fail(
                        UnexpectedMessage(
                            f"{self.name}: expected hello as the first message, "
                            f"got {message_name(code)}"
                        )
                    )
                assert isinstance(msg, Hello)
                if self.expected_node_id is not None and msg.node_id != self.expected_node_id:
                    raise self._fail(
                        HandshakeError(
                            f"{self.name}: hello names node {msg.node_id!r:.70} but the "
                            f"certificate belongs to {self.expected_node_id}"
                        )
                    )
                self.their_hello = msg
                self.state = OPEN
            elif code == HELLO:
                raise self._fail(UnexpectedMessage(f"{self.name}: second hello on one connection"))
            elif code == BYE:
                self.state = CLOSED
            elif self.state == OPEN:
                if code not in _BEFORE_READY:
                    raise self._fail(
                        UnexpectedMessage(f"{self.name}: {message_name(code)} before ready")
                    )
                if code == READY:
                    self.state = READY_STATE
            elif code == READY:
                raise self._fail(UnexpectedMessage(f"{self.name}: second ready on one connection"))
            messages.append(msg)
        if self.state == CLOSED and self._decoder.mid_frame:
            # Part of a frame after the bye, if only a header: as wrong as a whole one.
            raise self._fail(UnexpectedMessage(f"{self.name}: bytes after bye"))
        return messages

    def receive_eof(self) -> None:
        """Declare the peer's end of the stream.

        Raises :class:`TruncatedFrame` if it ended inside a frame.
        """
        if self._error is not None:
            raise self._error
        try:
            self._decoder.eof()
        except ProtocolError as exc:
            raise self._fail(exc) from None
        self.state = CLOSED

    @staticmethod
    def send(msg: AnyMessage) -> bytes:
        """Return the framed bytes of ``msg``."""
        return encode_frame(encode_message(msg))
