"""Reliable mode: sequence numbers, cumulative acks, go-back-N, and flow control.

docs/serial-protocol.md, section 5. The link imports this module only when
reliable mode is asked for, so a board that runs without it never loads it.
The link frames and sends; this keeps the state of both directions.

Runs unchanged on CPython 3.9+ and MicroPython.
"""

from .cobs import FrameError
from .frame import RESPONSE

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef]
        return x


_MAX_BACKOFF = const(2)  # retransmission timeout at most 4 x rto_ms
# Receiver's ``held``: nothing held back since the last frame delivered (0);
# frames held back, the sender not yet asked to resend them (_HELD); asked
# (_ASKED): frames it sent before our ack are still on the line, and they
# are held back too, not taken as out of order.
_HELD = const(1)
_ASKED = const(2)


class Reliable:
    """Both directions of reliable mode for one session.

    Sender: at most ``window`` frames unacknowledged (``unacked``, oldest
    first, as (seq, type, fields)), at most ``send_queue`` more waiting in
    ``queue`` as (type, fields); ``rto_deadline_ms`` is when the
    unacknowledged frames are all sent again, ``backoff`` how many times
    that happened without progress, ``fast`` the ack that last made us
    resend at once (-1: none since the last progress). Receiver:
    ``rx_expected`` is the next sequence number it delivers; ``rx_room`` how
    many more frames the owner takes in this batch (None: no limit);
    ``held`` whether frames were held back for want of room since the last
    one delivered (0, _HELD, or _ASKED once ``resumed`` asked for them);
    ``ack_pending`` asks the link to acknowledge after the bytes it is
    reading.
    """

    __slots__ = (
        "ack_pending",
        "backoff",
        "fast",
        "held",
        "queue",
        "rto_deadline_ms",
        "rto_ms",
        "rx_expected",
        "rx_room",
        "send_queue",
        "tx_seq",
        "unacked",
        "window",
    )

    def __init__(self, window: int, send_queue: int, rto_ms: int) -> None:
        # The link checked the three.
        self.window = window
        self.send_queue = send_queue
        self.rto_ms = rto_ms
        self.reset()

    def reset(self) -> None:
        """Start afresh, as when a session comes up."""
        self.tx_seq = 0
        self.unacked = []
        self.queue = []
        self.rto_deadline_ms = None
        self.backoff = 0
        self.fast = -1
        self.rx_expected = 0
        self.rx_room = None
        self.held = 0
        self.ack_pending = False

    def lost(self) -> int:
        """Messages sent or queued that were never acknowledged."""
        return len(self.unacked) + len(self.queue)

    def room(self) -> int:
        return self.window - len(self.unacked) + self.send_queue - len(self.queue)

    def take_seq(self, ftype: int, fields: bytes, now_ms: int) -> int:
        """Number a new frame and keep it until it is acknowledged."""
        seq = self.tx_seq
        self.unacked.append((seq, ftype, fields))  # first: a MemoryError here changes nothing
        self.tx_seq = (seq + 1) & 0xFF
        if self.rto_deadline_ms is None:
            self.rto_deadline_ms = now_ms + self.rto_ms
        return seq

    def next_timeout_ms(self) -> int:
        """The retransmission timeout now: ``rto_ms``, doubled per round without progress."""
        backoff = self.backoff if self.backoff < _MAX_BACKOFF else _MAX_BACKOFF
        return self.rto_ms << backoff

    def hold(self, seq: int, ftype: int) -> bool:
        """Whether frame ``seq`` must wait: it is the next one and the owner
        has no room for it (a RESPONSE needs none), or a frame before it
        waits. A duplicate never waits: it is acknowledged as usual."""
        ahead = (seq - self.rx_expected) & 0xFF
        if ahead == 0:
            room = self.rx_room
            if room is None or room > 0 or ftype == RESPONSE:
                return False
            self.held = _HELD
        elif not self.held or ahead >= 128:
            return False
        return True

    def resumed(self) -> bool:
        """Room is back: whether to acknowledge once more, which asks the
        sender to resend what was held back (once per hold). Until the
        expected frame arrives, the frames after it still wait."""
        if self.held != _HELD:
            return False
        self.held = _ASKED
        return True

    def accept(self, seq: int, ftype: int, name: str) -> None:
        """Deliver ``seq`` if it is the one expected, else raise FrameError
        ("duplicate" or "out of order")."""
        self.ack_pending = True
        expected = self.rx_expected
        if seq != expected:
            behind = (expected - seq) & 0xFF
            if 1 <= behind <= 128:
                raise FrameError(
                    f"duplicate {name} frame: seq {seq}, expecting {expected}", "duplicate"
                )
            raise FrameError(
                f"{name} frame out of order: seq {seq}, expecting {expected}", "out of order"
            )
        self.rx_expected = (seq + 1) & 0xFF
        self.held = 0
        if self.rx_room is not None and ftype != RESPONSE:
            self.rx_room -= 1

    def acked(self, seq: int) -> bool:
        """Drop the frames up to ``seq``; False for a stale or repeated ack."""
        unacked = self.unacked
        for i in range(len(unacked)):
            if unacked[i][0] == seq:
                self.unacked = unacked[i + 1 :]
                self.backoff = 0
                self.fast = -1
                return True
        return False

    def asks_again(self, seq: int) -> bool:
        """Whether an ack of ``seq``, which acknowledges nothing new, asks for
        our oldest unacknowledged frame (it acks the one just before it) for
        the first time since the last progress: then resend at once."""
        unacked = self.unacked
        if not unacked or (unacked[0][0] - 1) & 0xFF != seq or self.fast == seq:
            return False
        self.fast = seq
        return True
