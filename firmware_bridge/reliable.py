"""Reliable mode: sequence numbers, cumulative acks and go-back-N retransmission.

docs/serial-protocol.md, section 5. The link imports this module only when
reliable mode is asked for, so a board that runs without it never loads it.
The link frames and sends; this keeps the state of both directions.

Runs unchanged on CPython 3.9+ and MicroPython.
"""

from .frame import Duplicate, OutOfOrder


class Reliable:
    """Both directions of reliable mode for one session.

    Sender: at most ``window`` frames unacknowledged (``unacked``, oldest
    first, as (seq, type, fields)), at most ``send_queue`` more waiting in
    ``queue`` as (type, fields); ``rto_deadline_ms`` is when the
    unacknowledged frames are all sent again. Receiver: ``rx_expected`` is
    the next sequence number it delivers; ``ack_pending`` asks the link to
    acknowledge after the bytes it is reading.
    """

    __slots__ = (
        "ack_pending",
        "queue",
        "rto_deadline_ms",
        "rto_ms",
        "rx_expected",
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
        self.rx_expected = 0
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

    def accept(self, seq: int, name: str) -> None:
        """Deliver ``seq`` if it is the one expected, else raise Duplicate or OutOfOrder."""
        self.ack_pending = True
        expected = self.rx_expected
        if seq != expected:
            behind = (expected - seq) & 0xFF
            if 1 <= behind <= 128:
                raise Duplicate(f"duplicate {name} frame: seq {seq}, expecting {expected}")
            raise OutOfOrder(f"{name} frame out of order: seq {seq}, expecting {expected}")
        self.rx_expected = (seq + 1) & 0xFF

    def acked(self, seq: int) -> bool:
        """Drop the frames up to ``seq``; False for a stale or repeated ack."""
        unacked = self.unacked
        for i in range(len(unacked)):
            if unacked[i][0] == seq:
                self.unacked = unacked[i + 1 :]
                return True
        return False
