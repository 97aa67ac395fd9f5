"""The UART link between a host node and a microcontroller, as a pure state machine.

One class, :class:`Link`, runs both ends (``role`` "host" or "device").
It never touches a UART and never reads a clock: bytes from the line go
into ``receive_bytes(data, now_ms)``, events come out, and bytes for the
line come out of ``bytes_to_send()``. Time is an integer millisecond count
``now_ms`` that never goes backwards; randomness (the boot epoch) is an
argument. The owner calls ``tick(now_ms)`` once ``next_deadline_ms()`` has
passed; the link has no timers of its own. docs/serial-protocol.md gives
the wire format byte by byte.

The parts, one module each, imported only when used (as micropython-lib
splits optional features): :mod:`.frame` (types, limits, errors, fields),
:mod:`.hello`, :mod:`.events`, :mod:`.session` (hellos, the session,
keepalive: the base class of :class:`Link`), and, for a Link configured
for them, :mod:`.auth` (a pre-shared key) and :mod:`.reliable`. This
module frames, sends and receives, and re-exports the names a link's user
needs from the others.

The rules, in the order a link meets them (docs/serial-protocol.md):

1. Framing: ``COBS(body + CRC-32(body), little-endian)`` and 0x00. A bad
   frame is dropped and counted; the reader resynchronises at the next
   0x00. Hellos are sent with a leading 0x00 that ends any garbage.
2. Header: the frame type (low 4 bits), RELIABLE (a sequence number
   follows) and AUTH (a counter follows, a 16-byte tag ends the body).
3. The session and keepalive: :mod:`.session`.
4. Reliable mode, when both hellos ask for it: exactly once and in order,
   cumulative acks, at most ``window`` frames unacknowledged, go-back-N
   after ``rto_ms`` without progress (then 2 and 4 times that), at most
   ``send_queue`` more queued.
5. Flow control (reliable mode): ``receive_bytes(..., room=n)`` takes at
   most ``n`` new DATA, REQUEST and SEND_TO frames; the next ones are held
   back unacknowledged, for their sender to resend (``stats.held_back``,
   not drops). ``resume()`` acknowledges again once there is room; an ack
   of the frame just before a sender's oldest unacknowledged one makes it
   resend at once, once per such frame.
6. Authentication with a shared key: a counter that strictly increases per
   direction and a tag over (sender epoch, receiver epoch, body).

Bad bytes from the line never raise: each bad frame becomes a
:class:`Dropped` event and a count in ``stats.drops``, and the session
stays as it was. Misuse by the owner (sending while down, a field too
long) raises a :class:`LinkUsageError`.

Runs unchanged on CPython 3.9+ and MicroPython.
"""

import struct
from binascii import crc32

from . import cobs
from .cobs import FrameError, LinkError, hex_preview  # noqa: F401 (LinkError re-exported)
from .events import (
    Dropped,
    LinkStats,
    Received,  # noqa: F401 (re-exported)
    SessionDown,  # noqa: F401 (re-exported)
    SessionUp,  # noqa: F401 (re-exported)
    parse_app,
)
from .frame import (
    ACK,
    APP_TYPES,
    AUTH_BYTES,
    COUNTER_BYTES,
    CRC_BYTES,
    DATA,
    FLAG_AUTH,
    FLAG_RELIABLE,
    FLAGS_RESERVED,
    HELLO,
    KIND_DATA,  # noqa: F401 (re-exported)
    KIND_REQUEST,  # noqa: F401 (re-exported)
    KIND_RESPONSE,  # noqa: F401 (re-exported)
    KIND_SEND_TO,  # noqa: F401 (re-exported)
    MAX_DEST_BYTES,
    MAX_FRAME_BYTES,
    MAX_ID_BYTES,
    MAX_TOPIC_BYTES,
    MAX_WINDOW,
    MEMORY_TOPIC,  # noqa: F401 (re-exported)
    MIN_FRAME_BYTES,
    PING,
    PONG,
    REQUEST,
    RESPONSE,
    ROLES,
    SEND_TO,
    TAG_BYTES,
    TYPE_NAMES,
    U32_MAX,
    LinkDown,
    LinkUsageError,
    MessageTooLarge,
    SendQueueFull,
    payload_bytes,
    response_fields,
    topic_bytes,
    u16,
)
from .hello import Hello
from .session import Session


class Link(Session):
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
        "_auth",
        "_out",
        "_out_len",
        "_rel",
        "_rx",
        "_splitter",
        "_tx",
        "max_output_bytes",
        "rto_ms",
        "send_queue",
        "stats",
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
        topic_bytes(my_id, "id", MAX_ID_BYTES)
        if type(epoch) is not int or not 1 <= epoch <= U32_MAX:
            raise LinkUsageError(f"epoch should be an integer in 1..4294967295, got {epoch!r}")
        if type(max_frame) is not int or not MIN_FRAME_BYTES <= max_frame <= MAX_FRAME_BYTES:
            raise LinkUsageError(
                f"max_frame should be in {MIN_FRAME_BYTES}..{MAX_FRAME_BYTES}, got {max_frame!r}"
            )
        if not 0 < keepalive_interval_ms < keepalive_timeout_ms <= U32_MAX:
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
        self._auth = None
        if psk is not None:
            from .auth import Auth  # only a board with a key loads it

            self._auth = Auth(psk)
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
        self._rel = None
        if self.want_reliable:
            from .reliable import Reliable  # only a board in reliable mode loads it

            self._rel = Reliable(window, send_queue, rto_ms)
        wire_frame = cobs.max_encoded_len(max_frame + CRC_BYTES)
        self._splitter = cobs.FrameSplitter(wire_frame)
        self._rx = bytearray(wire_frame)  # a frame decoded: at most as long as on the wire
        # Fixed buffers, allocated once: a frame's body as it is built, and
        # the bytes waiting for the line (with room for one more frame past
        # the limit, so that a frame is encoded in place before it is known
        # to fit).
        self._tx = bytearray(max_frame + CRC_BYTES)
        self._out = bytearray(max_output_bytes + wire_max)
        self._out_len = 0
        self.stats = LinkStats()
        self._started = False
        self.is_up = False
        self.reliable = False  # negotiated: true while up in reliable mode
        self.peer_hello = None
        self.rtt_ms = None
        self._their_epoch = 0
        self._challenge = 0  # with a key: a new peer epoch we answered, not yet proven
        self._frame_limit = max_frame
        self._ping_interval_ms = keepalive_interval_ms
        self._last_tx_ms = 0
        self._last_rx_ms = 0
        self._last_hello_ms = 0
        self._ping_nonce = 0
        self._ping_sent_ms = None

    # --- public API --------------------------------------------------------

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
        # A MemoryError must not take accepted frames' events with it. The frame it cuts
        # short is lost, counted only; a reliable one is accepted last, so it is resent.
        try:
            for item in self._splitter.frames(data):
                try:
                    if isinstance(item, FrameError):
                        self._drop(item, events)
                    else:
                        self._receive_frame(item, now_ms, events)
                except FrameError as exc:
                    self._drop(exc, events)
                except MemoryError:
                    self.stats.out_of_memory += 1
        except MemoryError:  # in the splitter: the rest of ``data`` is lost too
            self.stats.out_of_memory += 1
            self._splitter.reset()
        if rel is not None and rel.ack_pending:  # one cumulative ack per batch
            try:
                self._ack(now_ms)
                rel.ack_pending = False
            except MemoryError:  # it goes with the next batch, or answers a resend
                self.stats.out_of_memory += 1
        return events

    def resume(self, now_ms: int) -> None:
        """Say there is room again (reliable mode): if frames were held back, ack what
        was delivered once more, which makes the sender resend the rest at once.
        Does nothing otherwise; call it whenever room appears."""
        rel = self._rel
        if rel is not None and rel.resumed():
            self._ack(now_ms)

    def _ack(self, now_ms: int) -> None:
        if self.is_up and self.reliable:
            self._emit(ACK, bytes(((self._rel.rx_expected - 1) & 0xFF,)), now_ms)

    def room(self) -> "int | None":
        """How many more messages a send would take now (beyond it a send raises
        :class:`SendQueueFull`: wait for the peer's acks); None: no limit (unreliable)."""
        if not self.is_up:
            return 0
        if not self.reliable:
            return None
        return self._rel.room()

    def bytes_to_send(self, max_bytes: "int | None" = None) -> bytes:
        """Take up to ``max_bytes`` (all if None) of the bytes waiting for the line."""
        out = self._out
        n = self._out_len
        k = n if max_bytes is None or max_bytes >= n else max_bytes
        data = bytes(memoryview(out)[:k])
        if k < n:
            out[0 : n - k] = out[k:n]
        self._out_len = n - k
        return data

    def forget_partial(self) -> None:
        """Drop any partial frame read so far (after a MemoryError cut a read short)."""
        self._splitter.reset()

    @property
    def pending_output(self) -> int:
        """Bytes waiting in ``bytes_to_send``."""
        return self._out_len

    def send_data(self, topic: str, payload: bytes, now_ms: int) -> None:
        """Send a one-way message on ``topic``. Raises :class:`LinkDown`,
        :class:`MessageTooLarge`, :class:`SendQueueFull` or :class:`LinkUsageError`."""
        raw = topic_bytes(topic, "topic", MAX_TOPIC_BYTES)
        fields = bytes((len(raw),)) + raw + payload_bytes(payload)
        self._send_app(DATA, fields, now_ms)

    def send_request(self, req_id: int, topic: str, payload: bytes, now_ms: int) -> None:
        """Send a request (``req_id`` in 0..65535) on ``topic``; errors as for send_data."""
        head = u16(req_id, "request id")
        raw = topic_bytes(topic, "topic", MAX_TOPIC_BYTES)
        fields = head + bytes((len(raw),)) + raw + payload_bytes(payload)
        self._send_app(REQUEST, fields, now_ms)

    def send_response(self, req_id: int, status: int, payload: "bytes | str", now_ms: int) -> None:
        """Answer request ``req_id``: status 0 with a payload, or an error code with its text.

        Errors as for send_data.
        """
        fields = response_fields(req_id, status, payload)
        self._send_app(RESPONSE, fields, now_ms)

    def send_to(self, dest: str, topic: str, payload: bytes, now_ms: int) -> None:
        """Ask the host to route a message to ``dest`` (a node IP, or IP/device ID).

        Device role only. Errors as for send_data.
        """
        if self.role != "device":
            raise LinkUsageError("send_to is for devices: a host routes, it does not ask")
        raw_dest = topic_bytes(dest, "destination", MAX_DEST_BYTES)
        raw = topic_bytes(topic, "topic", MAX_TOPIC_BYTES)
        fields = (
            bytes((len(raw_dest),)) + raw_dest + bytes((len(raw),)) + raw + payload_bytes(payload)
        )
        self._send_app(SEND_TO, fields, now_ms)

    # --- sending -----------------------------------------------------------

    def _send_app(self, ftype: int, fields: bytes, now_ms: int) -> None:
        name = TYPE_NAMES[ftype]
        if not self.is_up:
            raise LinkDown(f"cannot send {name}: the session is not up")
        size = 1 + len(fields) + (1 if self.reliable else 0)
        if self._auth is not None:
            size += AUTH_BYTES
        if size > self._frame_limit:
            raise MessageTooLarge(
                f"{name} frame of {size} bytes exceeds the {self._frame_limit}-byte frame limit"
            )
        rel = self._rel
        if not self.reliable:
            waiting = self._out_len
            if waiting + cobs.max_encoded_len(size + CRC_BYTES) + 1 > self.max_output_bytes:
                raise SendQueueFull(
                    f"cannot send {name}: {waiting} bytes already wait for the line "
                    f"(limit {self.max_output_bytes})"
                )
            self._emit(ftype, fields, now_ms)
        elif len(rel.unacked) < self.window:
            seq = rel.take_seq(ftype, fields, now_ms)
            try:
                self._emit(ftype, fields, now_ms, seq)
            except MemoryError:
                # Kept, as when the output is full: the retransmission timer
                # resends it. The caller must not send it again.
                self.stats.tx_skipped += 1
        elif len(rel.queue) < self.send_queue:
            rel.queue.append((ftype, fields))
        else:
            raise SendQueueFull(
                f"cannot send {name}: {len(rel.unacked)} frames await acknowledgement "
                f"and {len(rel.queue)} are queued (limit {self.send_queue})"
            )

    def _emit(
        self,
        ftype: int,
        fields: bytes,
        now_ms: int,
        seq: "int | None" = None,
        lead: bool = False,
        receiver: "int | None" = None,
    ) -> None:
        """Frame ``fields`` as a ``ftype`` frame and queue it for the line.

        Built in the link's own buffers: the frame is never copied whole.
        """
        tx = self._tx
        body = memoryview(tx)
        header = ftype
        n = 1
        if seq is not None:
            header |= FLAG_RELIABLE
            tx[1] = seq
            n = 2
        auth = self._auth
        if auth is not None:
            header |= FLAG_AUTH
            body[n : n + COUNTER_BYTES] = auth.next_counter()
            n += COUNTER_BYTES
        tx[0] = header
        end = n + len(fields)
        body[n:end] = fields
        n = end
        if auth is not None:
            receiver = self._their_epoch if receiver is None else receiver
            body[n : n + TAG_BYTES] = auth.tag(self.epoch, receiver, body[:n])
            n += TAG_BYTES
        struct.pack_into("<I", tx, n, crc32(body[:n]) & U32_MAX)
        n += CRC_BYTES
        self._last_tx_ms = now_ms  # even when skipped, or a due ping would stay due
        out = self._out
        start = self._out_len
        pos = start
        if lead:
            out[pos] = 0
            pos += 1
        pos = cobs.encode_into(body[:n], out, pos)
        out[pos] = 0
        pos += 1
        if pos > self.max_output_bytes:
            # Only control frames and reliable frames get here: the owner is
            # not draining the output. Keepalive or retransmission recovers.
            self.stats.tx_skipped += 1
            return
        self._out_len = pos
        self.stats.frames_out += 1
        self.stats.bytes_out += pos - start

    # --- receiving ---------------------------------------------------------

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
            raise FrameError(
                f"bad frame: {n} bytes is shorter than the {1 + CRC_BYTES}-byte minimum{shown}",
                "bad frame",
            )
        if n - CRC_BYTES > self.max_frame:
            raise FrameError(
                f"oversize frame: body of {n - CRC_BYTES} bytes exceeds the {self.max_frame}-byte "
                f"limit: {hex_preview(raw)}",
                "oversize",
            )
        body = raw[:-CRC_BYTES]
        sent_crc = int.from_bytes(raw[-CRC_BYTES:], "little")
        crc = crc32(body) & U32_MAX
        if crc != sent_crc:
            raise FrameError(
                f"bad crc: frame says 0x{sent_crc:08x}, body gives 0x{crc:08x}: "
                f"{hex_preview(body)}",
                "bad crc",
            )
        header = body[0]
        ftype = header & 0x0F
        if header & FLAGS_RESERVED:
            raise FrameError(f"bad frame: reserved bits set in header 0x{header:02x}", "bad frame")
        if ftype not in TYPE_NAMES:
            raise FrameError(f"unknown frame type {ftype} in header 0x{header:02x}", "unknown type")
        name = TYPE_NAMES[ftype]
        if ftype != HELLO and not self.is_up:
            # Likely the peer kept a session we lost (we restarted): tell it
            # at once, at most once per rto_ms.
            if now_ms - self._last_hello_ms >= self.rto_ms:
                self._send_hello(now_ms)
            raise FrameError(f"{name} frame before the session is up", "not up")
        pos = 1
        seq = None
        if header & FLAG_RELIABLE:
            if ftype not in APP_TYPES or not self.reliable:
                raise FrameError(
                    f"bad frame: unexpected sequence number on a {name} frame", "bad frame"
                )
            if len(body) < 2:
                raise FrameError(
                    f"bad frame: {name} frame ends before its sequence number", "bad frame"
                )
            seq = body[1]
            pos = 2
        elif self.reliable and ftype in APP_TYPES:
            raise FrameError(
                f"bad frame: {name} frame without a sequence number in reliable mode", "bad frame"
            )

        auth = self._auth
        counter = 0
        if auth is None:
            if header & FLAG_AUTH:
                raise FrameError(
                    f"auth failure: {name} frame is authenticated but no psk is configured",
                    "auth failure",
                )
            fields = body[pos:]
        else:
            if not header & FLAG_AUTH:
                raise FrameError(
                    f"auth failure: {name} frame is not authenticated but a psk is configured",
                    "auth failure",
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
                raise FrameError(
                    f"bad frame: {name} of {len(fields)} bytes, expected 2", "bad frame"
                )
        elif ftype == ACK:
            if not self.reliable:
                raise FrameError("bad frame: ack outside reliable mode", "bad frame")
            if len(fields) != 1:
                raise FrameError(f"bad frame: ack of {len(fields)} bytes, expected 1", "bad frame")
        elif ftype != HELLO:
            if seq is not None and self._rel.hold(seq, ftype):
                # No room for it: not acknowledged, so its sender keeps it
                # (flow control, not a fault: counted apart from drops).
                self.stats.held_back += 1
                return
            message = parse_app(ftype, fields, name, self.role)
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

    def _on_ack(self, acked: int, now_ms: int) -> None:
        rel = self._rel
        if not rel.acked(acked):
            # Nothing new. But an ack of the frame just before our oldest
            # asks for that one (the receiver has room again, or saw a gap):
            # resend now, once, rather than after the timeout.
            if rel.asks_again(acked):
                self._retransmit(now_ms)
            return
        while rel.queue and len(rel.unacked) < self.window:
            ftype, fields = rel.queue.pop(0)
            self._emit(ftype, fields, now_ms, rel.take_seq(ftype, fields, now_ms))
        rel.rto_deadline_ms = now_ms + self.rto_ms if rel.unacked else None

    def _retransmit(self, now_ms: int) -> None:
        """Send every unacknowledged frame again, oldest first (go-back-N)."""
        rel = self._rel
        for seq, ftype, fields in rel.unacked:
            self._emit(ftype, fields, now_ms, seq)
            self.stats.retransmits += 1
        rel.rto_deadline_ms = now_ms + rel.next_timeout_ms()
