"""The store-and-forward queue of messages for the broker (pure).

Messages wait here, in order, while the broker is away or slow, and stay
here while they are *in flight* (published, not yet acknowledged), so that
a lost connection puts them back at the front, in order, to be sent again
(at least once: the broker may have received some of them already).

The queue is bounded twice: in messages and in bytes (each message counts
its payload, its topic and :data:`ITEM_OVERHEAD_BYTES` of bookkeeping).
When a new message does not fit, the policy the user chose applies and is
counted: ``drop-oldest`` drops the oldest messages not in flight until it
fits; ``refuse-new`` refuses the new one. A message that cannot fit even in
an empty queue is refused under either policy.
"""

from __future__ import annotations

from collections import deque

from .config import DROP_OLDEST, POLICIES, REFUSE_NEW

#: What one queued message costs besides its payload and topic (the item,
#: its place in the deque or the in-flight table, the bytes and str headers).
ITEM_OVERHEAD_BYTES = 200


class Outgoing:
    """One message for the broker, numbered in the order it was accepted."""

    __slots__ = ("payload", "qos", "seq", "size", "topic")

    def __init__(self, seq: int, topic: str, payload: bytes, qos: int) -> None:
        self.seq = seq
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.size = len(payload) + len(topic.encode("utf-8", "surrogatepass")) + ITEM_OVERHEAD_BYTES

    def __repr__(self) -> str:
        return f"<Outgoing #{self.seq} {self.topic!r:.40} {len(self.payload)} B qos {self.qos}>"


class OutQueue:
    """A bounded FIFO of :class:`Outgoing` with the ones in flight."""

    def __init__(self, max_messages: int, max_bytes: int, policy: str = DROP_OLDEST) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
        if max_messages < 1 or max_bytes < 1:
            raise ValueError(f"caps: expected >= 1, got {max_messages} messages, {max_bytes} bytes")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.policy = policy
        self._waiting: deque[Outgoing] = deque()
        self._inflight: dict[int, Outgoing] = {}
        #: Bytes held, waiting and in flight.
        self.bytes = 0
        self.accepted = 0
        self.dropped_oldest = 0
        self.refused_new = 0
        self.acknowledged = 0

    def __len__(self) -> int:
        return len(self._waiting) + len(self._inflight)

    @property
    def waiting(self) -> int:
        """Messages not yet handed to the broker connection."""
        return len(self._waiting)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _fits(self, size: int) -> bool:
        return len(self) < self.max_messages and self.bytes + size <= self.max_bytes

    def offer(self, item: Outgoing) -> tuple[bool, list[Outgoing]]:
        """Queue ``item`` if the policy lets it in.

        Returns (accepted, the messages dropped to make room for it).
        """
        dropped: list[Outgoing] = []
        if not self._fits(item.size):
            if self.policy == DROP_OLDEST and item.size <= self.max_bytes:
                while self._waiting and not self._fits(item.size):
                    old = self._waiting.popleft()
                    self.bytes -= old.size
                    dropped.append(old)
                self.dropped_oldest += len(dropped)
            if not self._fits(item.size):
                self.refused_new += 1
                return False, dropped
        self._waiting.append(item)
        self.bytes += item.size
        self.accepted += 1
        return True, dropped

    def pending(self) -> list[Outgoing]:
        """Every message held, in flight or waiting, oldest first."""
        return sorted([*self._inflight.values(), *self._waiting], key=lambda item: item.seq)

    def take(self) -> Outgoing | None:
        """The oldest waiting message, now in flight; None if none waits."""
        if not self._waiting:
            return None
        item = self._waiting.popleft()
        self._inflight[item.seq] = item
        return item

    def done(self, seq: int) -> Outgoing | None:
        """The broker acknowledged message ``seq`` (or, at QoS 0, it was written)."""
        item = self._inflight.pop(seq, None)
        if item is not None:
            self.bytes -= item.size
            self.acknowledged += 1
        return item

    def requeue_inflight(self) -> int:
        """The connection was lost: put every message in flight back at the
        front, in order. Returns how many."""
        back = sorted(self._inflight.values(), key=lambda item: item.seq)
        self._inflight.clear()
        self._waiting.extendleft(reversed(back))
        return len(back)

    def drop(self, seqs: set[int]) -> list[Outgoing]:
        """Drop the waiting messages numbered ``seqs`` (the spool lost room
        for them under ``drop-oldest``); counted as dropped oldest."""
        kept: deque[Outgoing] = deque()
        dropped = []
        for item in self._waiting:
            if item.seq in seqs:
                dropped.append(item)
                self.bytes -= item.size
            else:
                kept.append(item)
        self._waiting = kept
        self.dropped_oldest += len(dropped)
        return dropped


__all__ = ["DROP_OLDEST", "ITEM_OVERHEAD_BYTES", "REFUSE_NEW", "OutQueue", "Outgoing"]
