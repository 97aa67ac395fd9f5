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
:mod:`.hello`, :mod:`.events`, and, loaded by a Link that is configured for
them, :mod:`.auth` (a pre-shared key) and :mod:`.reliable`. This module
keeps the session and re-exports the names of the others.

The rules, in the order a link meets them:

1. Framing. Every frame is ``COBS(body + CRC-32(body), little-endian)``
   followed by 0x00. A frame that is oversize, bad COBS, short, or fails
   its CRC is dropped and counted; the reader resynchronises at the next
   0x00. Hello frames are sent with a leading 0x00 so that they also end
   any garbage the receiver holds.
2. Header. The body's first byte holds the frame type (low 4 bits) and
   two flags: RELIABLE (a 1-byte sequence number follows) and AUTH (a
   4-byte counter follows, a 16-byte HMAC-SHA256 tag ends the body).
3. Session. Each side has a boot epoch (random, 1..2**32-1, new at every
   start) and sends a hello at start. A hello names the sender's epoch,
   echoes the epoch it last heard from the peer (0 if none), and says
   whether the sender considers the session up. The session's transitions
   are the table in :meth:`Link._on_hello`. In short: a side answers a
   hello when the peer's epoch changed, when the hello does not echo our
   epoch, or when the hello says the peer is not up; the session is up
   once a hello arrives that echoes our current epoch, and goes down when
   one arrives with a new epoch (the peer restarted) or one that no longer
   echoes ours (the peer lost the session). A restart on either side
   resynchronises within about one round trip, with no reset line.
   With a pre-shared key, a hello can take an up session down only by
   proving it is fresh: a new epoch must first echo ours, which it learns
   only by our answer, so a recorded hello of an old boot cannot bounce a
   session; and a hello echoing an epoch that is neither ours nor 0 (meant
   for an old boot of ours) is answered but changes nothing.
4. While the session is down, every frame but a hello is dropped ("not
   up") and answered with a hello (at most once per ``rto_ms``), and hellos
   are repeated every keepalive interval. After a keepalive timeout a side
   forgets the peer's epoch, so its hellos echo 0 and take the peer's
   session down too.
5. Keepalive. Once up, each side pings when it has sent nothing for its
   interval (and for less than half the peer's timeout), and declares the
   session down when nothing valid has arrived for its timeout. Any valid
   frame proves liveness.
6. Reliable mode, when both hellos ask for it: application frames carry an
   8-bit sequence number; the receiver delivers them exactly once and in
   order and acknowledges cumulatively; the sender keeps at most ``window``
   frames unacknowledged, retransmits all of them (go-back-N) after
   ``rto_ms`` without progress, and queues at most ``send_queue`` more.
7. Authentication, when both sides hold the same pre-shared key: each frame
   carries a counter that strictly increases per direction and a tag over
   (sender epoch, receiver epoch, body). A bad tag is "auth failure"; a
   counter not above the last accepted is "replay".

Bad bytes from the line never raise: each bad frame becomes a
:class:`Dropped` event and a count in ``stats.drops``, and the session
stays as it was. Misuse by the owner (sending while down, a field too
long) raises a :class:`LinkUsageError`.

Runs unchanged on CPython 3.9+ and MicroPython.
"""

import struct
from binascii import crc32

from . import cobs
from .cobs import BadCOBS, FrameError, FrameTooLarge, LinkError, hex_preview
from .events import Dropped, LinkStats, Received, SessionDown, SessionUp
from .frame import (
    ACK,
    APP_TYPES,
    AUTH_BYTES,
    COUNTER_BYTES,
    CRC_BYTES,
    DATA,
    DOWN_PEER_RESET,
    DOWN_PEER_RESTART,
    DOWN_TIMEOUT,
    FLAG_AUTH,
    FLAG_RELIABLE,
    FLAGS_RESERVED,
    HELLO,
    HELLO_AUTH,
    HELLO_RELIABLE,
    HELLO_UP,
    KIND_DATA,
    KIND_REQUEST,
    KIND_RESPONSE,
    KIND_SEND_TO,
    MAX_DEST_BYTES,
    MAX_FRAME_BYTES,
    MAX_ID_BYTES,
    MAX_PSK_BYTES,
    MAX_TOPIC_BYTES,
    MAX_WINDOW,
    MEMORY_TOPIC,
    MIN_FRAME_BYTES,
    MIN_PSK_BYTES,
    PING,
    PONG,
    PROTOCOL_VERSION,
    REQUEST,
    RESPONSE,
    ROLES,
    SEND_TO,
    TAG_BYTES,
    TYPE_NAMES,
    U32_MAX,
    AuthFailure,
    BadCRC,
    BadFrame,
    BadHello,
    Duplicate,
    LinkDown,
    LinkUsageError,
    MessageTooLarge,
    NotUp,
    OutOfOrder,
    Replay,
    SendQueueFull,
    UnknownType,
    payload_bytes,
    take_text,
    topic_bytes,
    u16,
)
from .hello import Hello

__all__ = [
    "ACK",
    "AUTH_BYTES",
    "COUNTER_BYTES",
    "CRC_BYTES",
    "DATA",
    "FLAG_AUTH",
    "FLAG_RELIABLE",
    "HELLO",
    "HELLO_AUTH",
    "HELLO_RELIABLE",
    "HELLO_UP",
    "KIND_DATA",
    "KIND_REQUEST",
    "KIND_RESPONSE",
    "KIND_SEND_TO",
    "MAX_DEST_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_ID_BYTES",
    "MAX_PSK_BYTES",
    "MAX_TOPIC_BYTES",
    "MAX_WINDOW",
    "MEMORY_TOPIC",
    "MIN_FRAME_BYTES",
    "MIN_PSK_BYTES",
    "PING",
    "PONG",
    "PROTOCOL_VERSION",
    "REQUEST",
    "RESPONSE",
    "SEND_TO",
    "TAG_BYTES",
    "TYPE_NAMES",
    "AuthFailure",
    "BadCOBS",
    "BadCRC",
    "BadFrame",
    "BadHello",
    "Dropped",
    "Duplicate",
    "FrameError",
    "FrameTooLarge",
    "Hello",
    "Link",
    "LinkDown",
    "LinkError",
    "LinkStats",
    "LinkUsageError",
    "MessageTooLarge",
    "NotUp",
    "OutOfOrder",
    "Received",
    "Replay",
    "SendQueueFull",
    "SessionDown",
    "SessionUp",
    "UnknownType",
]


class Link:
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
        "_challenge",
        "_frame_limit",
        "_last_hello_ms",
        "_last_rx_ms",
        "_last_tx_ms",
        "_out",
        "_out_len",
        "_ping_interval_ms",
        "_ping_nonce",
        "_ping_sent_ms",
        "_rel",
        "_rx",
        "_splitter",
        "_started",
        "_their_epoch",
        "_tx",
        "epoch",
        "is_up",
        "keepalive_interval_ms",
        "keepalive_timeout_ms",
        "max_frame",
        "max_output_bytes",
        "my_id",
        "peer_hello",
        "reliable",
        "role",
        "rto_ms",
        "rtt_ms",
        "send_queue",
        "stats",
        "want_reliable",
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

    def __repr__(self) -> str:
        state = "up with " + repr(self.peer_id) if self.is_up else "down"
        return f"Link({self.role} {self.my_id!r}, epoch={self.epoch}, {state})"

    # --- public API --------------------------------------------------------

    @property
    def peer_id(self) -> "str | None":
        """The ID in the peer's latest hello, or None before one arrived."""
        return None if self.peer_hello is None else self.peer_hello.id

    def start(self, now_ms: int) -> None:
        """Begin: queue our first hello and start the timers."""
        if self._started:
            raise LinkUsageError("link already started")
        self._started = True
        self._last_rx_ms = now_ms
        self._send_hello(now_ms)

    def receive_bytes(self, data: "bytes | bytearray | memoryview", now_ms: int) -> list:
        """Feed bytes from the line; return the events they cause, in order.

        Bad frames never raise: each becomes a :class:`Dropped` event.
        Raises :class:`LinkUsageError` before ``start()``.
        """
        if not self._started:
            raise LinkUsageError("receive_bytes before start()")
        events = []
        self.stats.bytes_in += len(data)
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
        rel = self._rel
        if rel is not None and rel.ack_pending:
            # One cumulative ack per batch of bytes.
            rel.ack_pending = False
            if self.is_up and self.reliable:
                self._emit(ACK, bytes(((rel.rx_expected - 1) & 0xFF,)), now_ms)
        return events

    def tick(self, now_ms: int) -> list:
        """Run the timers due at ``now_ms``; return the events (a SessionDown on timeout)."""
        events = []
        if not self._started:
            return events
        if not self.is_up:
            if now_ms - self._last_hello_ms >= self.keepalive_interval_ms:
                self._send_hello(now_ms)
            return events
        if now_ms - self._last_rx_ms >= self.keepalive_timeout_ms:
            self._down(DOWN_TIMEOUT, events)
            # Forget the peer's epoch: our hello then echoes 0, which tells a
            # peer that still thinks the session is up that it is not.
            self._their_epoch = 0
            self._send_hello(now_ms)
            return events
        rel = self._rel
        if rel is not None and rel.rto_deadline_ms is not None and now_ms >= rel.rto_deadline_ms:
            for seq, ftype, fields in rel.unacked:
                self._emit(ftype, fields, now_ms, seq)
                self.stats.retransmits += 1
            rel.rto_deadline_ms = now_ms + self.rto_ms
        if now_ms - self._last_tx_ms >= self._ping_interval_ms:
            self._ping_nonce = (self._ping_nonce + 1) & 0xFFFF
            self._ping_sent_ms = now_ms
            self._emit(PING, struct.pack(">H", self._ping_nonce), now_ms)
        return events

    def room(self) -> "int | None":
        """How many more messages a send would take now; None: no limit.

        In reliable mode a send beyond the window waits in a small queue;
        beyond that it raises :class:`SendQueueFull`. Callers that can wait
        should wait for room (the peer's acknowledgements make it).
        """
        if not self.is_up:
            return 0
        if not self.reliable:
            return None
        return self._rel.room()

    def liveness(self, now_ms: int) -> "tuple[bool, bool, int]":
        """(their frames arriving, our pings answered, ms since the last frame).

        Each direction is alive when nothing has waited longer than the
        keepalive timeout: the last frame from the peer, and the oldest ping
        still unanswered.
        """
        timeout = self.keepalive_timeout_ms
        heard_ms = now_ms - self._last_rx_ms
        waiting = self._ping_sent_ms
        answered = waiting is None or now_ms - waiting < timeout
        return self.is_up and heard_ms < timeout, self.is_up and answered, heard_ms

    def next_deadline_ms(self) -> "int | None":
        """When ``tick`` next has work to do, in the ``now_ms`` scale (None before start)."""
        if not self._started:
            return None
        if not self.is_up:
            return self._last_hello_ms + self.keepalive_interval_ms
        deadline = self._last_rx_ms + self.keepalive_timeout_ms
        ping = self._last_tx_ms + self._ping_interval_ms
        if ping < deadline:
            deadline = ping
        rel = self._rel
        if rel is not None and rel.rto_deadline_ms is not None and rel.rto_deadline_ms < deadline:
            deadline = rel.rto_deadline_ms
        return deadline

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
        """Send a one-way message on ``topic``.

        Raises :class:`LinkDown`, :class:`MessageTooLarge`,
        :class:`SendQueueFull` or :class:`LinkUsageError`.
        """
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
        fields = head + bytes((status,)) + payload
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

    def _send_hello(self, now_ms: int, echo: "int | None" = None, up: "bool | None" = None) -> None:
        hello = Hello(
            self.my_id,
            self.epoch,
            self.max_frame,
            self.keepalive_interval_ms,
            self.keepalive_timeout_ms,
            self.want_reliable,
            self._auth is not None,
            self._their_epoch if echo is None else echo,
            self.is_up if up is None else up,
        )
        self._last_hello_ms = now_ms
        self._emit(HELLO, hello.encode(), now_ms, None, True, hello.echo_epoch)

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
            message = self._parse_app(ftype, fields, name)
            events.append(message)  # before the sequence moves: a MemoryError loses nothing
            if seq is not None:
                try:
                    self._rel.accept(seq, name)
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

    # --- the session -------------------------------------------------------

    def _on_hello(self, hello: Hello, now_ms: int, events: list) -> None:
        """The session's transitions on a valid hello, as one table.

        =====================  ===================  =============================
        the hello's epoch      the hello's echo     then
        =====================  ===================  =============================
        new (not theirs)       any                  down if up (peer restart);
                                                    learn it; answer
        theirs                 not ours             down if up (peer lost it);
                                                    answer
        theirs                 ours                 up if down
        any, not up flag       any                  answer (it waits for us)
        =====================  ===================  =============================

        With a key, while up, a new epoch or an echo of neither ours nor 0
        must prove itself first (see the module docstring): a new epoch is
        answered with a hello echoing it, and replaces the session only once
        a hello of that epoch echoes ours; an echo of an old epoch of ours is
        answered and changes nothing.
        """
        if self._auth is not None and self.is_up and self._guard_hello(hello, now_ms):
            return
        reply = False
        if hello.epoch != self._their_epoch:
            if self.is_up:
                self._down(DOWN_PEER_RESTART, events)
            self._their_epoch = hello.epoch
            reply = True
        self._challenge = 0
        self.peer_hello = hello
        if hello.echo_epoch != self.epoch:
            if self.is_up:
                self._down(DOWN_PEER_RESET, events)
            reply = True
        elif not self.is_up:
            self._up(hello, now_ms, events)
        if not hello.up:
            # The peer waits for a hello that echoes its epoch: it may have
            # lost ours (a hello that is up itself needs no answer, which
            # ends the exchange).
            reply = True
        if reply:
            self._send_hello(now_ms)

    def _guard_hello(self, hello: Hello, now_ms: int) -> bool:
        """With a key and the session up: True if ``hello`` must not change the session yet."""
        if hello.epoch != self._their_epoch:
            if hello.echo_epoch == self.epoch and hello.epoch == self._challenge:
                return False  # the new epoch answered our challenge: a live restart
            # Challenge it: only a live peer of that epoch can echo ours back
            # (not up, so that it answers). Our session stays as it is meanwhile.
            self._challenge = hello.epoch
            self._send_hello(now_ms, hello.epoch, False)
            return True
        echo = hello.echo_epoch
        if echo != self.epoch and echo != 0:
            # Meant for an old boot of ours: answer, so a live peer learns
            # our epoch, but keep the session.
            self._send_hello(now_ms)
            return True
        return False

    def _up(self, hello: Hello, now_ms: int, events: list) -> None:
        self.is_up = True
        self.reliable = self.want_reliable and hello.reliable
        limit = hello.max_frame
        self._frame_limit = limit if limit < self.max_frame else self.max_frame
        # Send often enough for the peer's timeout as well as our interval.
        half = hello.keepalive_timeout_ms // 2
        interval = self.keepalive_interval_ms
        self._ping_interval_ms = half if 0 < half < interval else interval
        if self._rel is not None:
            self._rel.reset()
        self._ping_sent_ms = None
        events.append(SessionUp(hello))

    def _down(self, reason: str, events: list) -> None:
        rel = self._rel
        lost = 0
        if rel is not None:
            lost = rel.lost()
            rel.reset()
        self.is_up = False
        self.reliable = False
        events.append(SessionDown(reason, lost))

    def _on_ack(self, acked: int, now_ms: int) -> None:
        rel = self._rel
        if not rel.acked(acked):
            return  # a stale or repeated ack: nothing new
        while rel.queue and len(rel.unacked) < self.window:
            ftype, fields = rel.queue.pop(0)
            self._emit(ftype, fields, now_ms, rel.take_seq(ftype, fields, now_ms))
        rel.rto_deadline_ms = now_ms + self.rto_ms if rel.unacked else None
