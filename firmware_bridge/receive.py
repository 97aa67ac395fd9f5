"""The receiving half of the UART link: a frame from the line, checked and dispatched.

:class:`Receiver` is the base of :class:`firmware_bridge.link.Link` (which
frames and sends) and derives from :class:`firmware_bridge.session.Session`
(hellos and keepalive). A frame meets the checks of docs/serial-protocol.md,
section 7, in order; a frame that fails one is dropped with its reason and
counted, and the session stays as it was. In reliable mode the receiver
delivers each frame exactly once and in order, acknowledges cumulatively
(one ack per batch of bytes), and holds back what its owner has no room
for (``room``): such frames are not acknowledged, so their sender keeps
them and sends them again (section 5.1).

Runs unchanged on CPython 3.9+ and MicroPython.
"""

from binascii import crc32

from . import cobs
from .cobs import FrameError, FrameTooLarge, hex_preview
from .events import Dropped, Received
from .frame import (
    ACK,
    APP_TYPES,
    CRC_BYTES,
    DATA,
    FLAG_AUTH,
    FLAG_RELIABLE,
    FLAGS_RESERVED,
    HELLO,
    KIND_DATA,
    KIND_REQUEST,
    KIND_RESPONSE,
    KIND_SEND_TO,
    PING,
    PONG,
    REQUEST,
    SEND_TO,
    TYPE_NAMES,
    U32_MAX,
    AuthFailure,
    BadCRC,
    BadFrame,
    LinkUsageError,
    NotUp,
    UnknownType,
    take_text,
)
from .hello import Hello
from .session import Session


class Receiver(Session):
    """Bytes from the line in, events out; see the module docstring.

    Not used alone: :class:`firmware_bridge.link.Link` derives from it and
    sets every field at construction.
    """

    __slots__ = ()

    def receive_bytes(
        self, data: "bytes | bytearray | memoryview", now_ms: int, room: "int | None" = None
    ) -> list:
        """Feed bytes from the line; return the events they cause, in order.

        ``room``, in reliable mode: take at most this many new DATA, REQUEST
        and SEND_TO frames; the next ones are held back, unacknowledged, for
        their sender to send again (call :meth:`resume` once there is room).
        None takes everything. Bad frames never raise: each becomes a
        :class:`Dropped` event. Raises :class:`LinkUsageError` before
        ``start()``.
        """
        if not self._started:
            raise LinkUsageError("receive_bytes before start()")
        events = []
        self.stats.bytes_in += len(data)
        rel = self._rel
        if rel is not None:
            rel.rx_room = room
        for item in self._splitter.frames(data):
            if isinstance(item, FrameError):
                self._drop(item, events)
                continue
            try:
                self._receive_frame(item, now_ms, events)
            except FrameError as exc:
                self._drop(exc, events)
            except MemoryError:
                # Lost, but the link stays consistent: a reliable frame is
                # accepted last, so its sender retransmits it. Counted only
                # (an event would need memory too).
                self.stats.out_of_memory += 1
        if rel is not None and rel.ack_pending:
            # One cumulative ack per batch of bytes.
            rel.ack_pending = False
            self._ack(now_ms)
        return events

    def resume(self, now_ms: int) -> None:
        """Say there is room again (reliable mode): if frames were held back,
        acknowledge what was delivered once more, which makes the sender
        resend the rest at once. Does nothing otherwise; call it whenever
        room appears."""
        rel = self._rel
        if rel is not None and rel.held:
            rel.held = False
            self._ack(now_ms)

    def _ack(self, now_ms: int) -> None:
        if self.is_up and self.reliable:
            self._emit(ACK, bytes(((self._rel.rx_expected - 1) & 0xFF,)), now_ms)

    def _drop(self, error: FrameError, events: list) -> None:
        drops = self.stats.drops
        drops[error.reason] = drops.get(error.reason, 0) + 1
        events.append(Dropped(error))

    def _receive_frame(self, encoded: memoryview, now_ms: int, events: list) -> None:
        # Decoded into the link's own buffer: no copy of the frame is made,
        # only of what an event carries (its topic and payload).
        n = cobs.decode_into(encoded, self._rx)
        raw = memoryview(self._rx)[:n]
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
        crc = crc32(body) & U32_MAX
        if crc != sent_crc:
            raise BadCRC(
                f"bad crc: frame says 0x{sent_crc:08x}, body gives 0x{crc:08x}: {hex_preview(body)}"
            )
        header = body[0]
        ftype = header & 0x0F
        if header & FLAGS_RESERVED:
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
            if ftype not in APP_TYPES or not self.reliable:
                raise BadFrame(f"bad frame: unexpected sequence number on a {name} frame")
            if len(body) < 2:
                raise BadFrame(f"bad frame: {name} frame ends before its sequence number")
            seq = body[1]
            pos = 2
        elif self.reliable and ftype in APP_TYPES:
            raise BadFrame(f"bad frame: {name} frame without a sequence number in reliable mode")

        auth = self._auth
        counter = 0
        if auth is None:
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
            counter, fields = auth.open(body, pos, name)

        # Parse before authenticating only the hello, whose epochs the tag covers.
        hello = None
        message = None
        if ftype == HELLO:
            hello = Hello.decode(fields)
            sender, receiver = hello.epoch, hello.echo_epoch
        else:
            sender, receiver = self._their_epoch, self.epoch
        if auth is not None:
            auth.check(body, sender, receiver, counter, name)
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
            if seq is not None and self._rel.hold(seq, ftype):
                # No room for it: not acknowledged, so its sender keeps it
                # (flow control, not a fault: counted apart from drops).
                self.stats.held_back += 1
                return
            message = self._parse_app(ftype, fields, name)
            events.append(message)  # before the sequence moves: a MemoryError loses nothing
            if seq is not None:
                try:
                    self._rel.accept(seq, ftype, name)
                except FrameError:
                    events.pop()
                    raise

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

    def _parse_app(self, ftype: int, fields: bytes, name: str) -> Received:
        if ftype == DATA:
            topic, pos = take_text(fields, 0, "topic", name)
            return Received(KIND_DATA, topic, bytes(fields[pos:]))
        if ftype == SEND_TO:
            if self.role != "host":
                raise BadFrame("bad frame: send_to frame sent to a device")
            dest, pos = take_text(fields, 0, "destination", name)
            topic, pos = take_text(fields, pos, "topic", name)
            return Received(KIND_SEND_TO, topic, bytes(fields[pos:]), dest=dest)
        if len(fields) < 3:
            raise BadFrame(f"bad frame: {name} frame of {len(fields)} bytes is too short")
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
                raise BadFrame(
                    f"bad frame: response error text is not valid utf-8: {hex_preview(payload)}"
                ) from None
        return Received(KIND_RESPONSE, None, payload, req_id=req_id, status=status, error=error)
