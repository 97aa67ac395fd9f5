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
:mod:`.hello`, :mod:`.events`, :mod:`.session` (hellos, the session's
transitions, keepalive: the base class of :class:`Link`), and, loaded by a
Link that is configured for them, :mod:`.auth` (a pre-shared key) and
:mod:`.reliable`. This module frames, sends and receives, and re-exports
the names of the others.

The rules, in the order a link meets them:

1. Framing. Every frame is ``COBS(body + CRC-32(body), little-endian)``
   followed by 0x00. A frame that is oversize, bad COBS, short, or fails
   its CRC is dropped and counted; the reader resynchronises at the next
   0x00. Hello frames are sent with a leading 0x00 so that they also end
   any garbage the receiver holds.
2. Header. The body's first byte holds the frame type (low 4 bits) and
   two flags: RELIABLE (a 1-byte sequence number follows) and AUTH (a
   4-byte counter follows, a 16-byte HMAC-SHA256 tag ends the body).
3. The session and keepalive: :mod:`.session`.
4. Reliable mode, when both hellos ask for it: application frames carry an
   8-bit sequence number; the receiver delivers them exactly once and in
   order and acknowledges cumulatively; the sender keeps at most ``window``
   frames unacknowledged, retransmits all of them (go-back-N) after
   ``rto_ms`` without progress (then after 2, 4, 8 times that while none
   comes), and queues at most ``send_queue`` more.
5. Flow control, in reliable mode: ``receive_bytes(..., room=n)`` takes at
   most ``n`` new DATA, REQUEST and SEND_TO frames (a RESPONSE needs no
   room); the next ones are held back, not acknowledged, so their sender
   keeps them and sends them again. They are counted in
   ``stats.held_back``, not as drops. When the owner has room again,
   ``resume()`` acknowledges what it has (a repeated ack), and a sender
   that gets an ack of the frame just before its oldest unacknowledged one
   resends at once, once per such frame, instead of waiting for ``rto_ms``.
6. Authentication, when both sides hold the same pre-shared key: each frame
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
    AUTH_BYTES,
    COUNTER_BYTES,
    CRC_BYTES,
    DATA,
    FLAG_AUTH,
    FLAG_RELIABLE,
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
    topic_bytes,
    u16,
)
from .hello import Hello
from .receive import Receiver

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


class Link(Receiver):
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
