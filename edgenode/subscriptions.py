"""Streams to the application: subscriptions to topics, and node events.

Delivery semantics (docs/architecture.md, "Delivery"): a message that
arrives on a connection is offered to every subscription whose topic
matches, in the order it arrived. A subscription opened with the default
policy, ``wait``, never drops: when it is full, the connection's reader
waits for room (``Subscriptions.wait_for``), so it stops reading, TCP
carries the pressure back to the sender, and the sender's ``send()``
waits. A subscription opened with ``drop-oldest`` or ``drop-newest`` drops
instead, and counts what it dropped.

A consumer that takes nothing for ``stall_timeout_s`` while a reader waits
on it is ended: its stream raises :class:`SubscriberStalled` once it has
handed out what it holds, the reader carries on with the other
subscriptions, and the node logs a warning and counts it. So one stuck
consumer can hold a connection for a bounded time only.

Node events (``PeerUp``, ``PeerDown``, ``Refused``) are published by the
dispatcher, which never waits: event streams drop their oldest event when
full, and count it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import anyio
from anyio import ClosedResourceError, EndOfStream, WouldBlock

from .api import Incoming
from .errors import InvalidArgument, SubscriberStalled
from .mailbox import DROP_OLDEST, POLICIES, WAIT, Mailbox

log = logging.getLogger("edgenode.node")

monotonic = time.monotonic


class Stream:
    """A bounded stream of items from the node: messages or node events.

    Iterate with ``async for``; close with ``close()`` or by leaving its
    ``with`` block. ``dropped`` counts what the stream's policy discarded
    (always 0 for the default policy) and what it held when it was ended
    for stalling.
    """

    __slots__ = ("_box", "_on_close", "delivered", "key", "policy", "stalled_at")

    def __init__(
        self, key: str, size: int, policy: str, on_close: Callable[[Stream], None]
    ) -> None:
        self.key = key
        self.policy = policy
        self._box: Mailbox[Any] = Mailbox(size, policy)
        self._on_close = on_close
        #: Items handed to this stream.
        self.delivered = 0
        #: When it was ended for stalling, if it was.
        self.stalled_at: float | None = None

    @property
    def dropped(self) -> int:
        """Items this stream's policy discarded."""
        return self._box.dropped

    @property
    def queued(self) -> int:
        """Items waiting to be received."""
        return len(self._box)

    async def receive(self) -> Any:
        """Wait for the next item.

        Raises :class:`anyio.EndOfStream` once the stream is closed, and
        :class:`SubscriberStalled` (after the items it still held) if it was
        ended because its consumer stalled.
        """
        box = self._box
        while True:
            try:
                return box.get_nowait()
            except WouldBlock:
                await box.wait_item()

    def receive_nowait(self) -> Any:
        """The next item if one is waiting; raises ``anyio.WouldBlock`` if not."""
        return self._box.get_nowait()

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except EndOfStream:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving; what the stream still holds is discarded. Idempotent."""
        self._box.clear()
        self._box.close()
        self._on_close(self)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Stream {self.key!r} {self.policy} {len(self._box)}/{self._box.capacity}>"


def check_policy(policy: str) -> str:
    """Return ``policy`` if it is a stream policy; raise :class:`InvalidArgument`."""
    if policy not in POLICIES:
        raise InvalidArgument(
            f"on_full: expected one of {', '.join(map(repr, POLICIES))}, got {policy!r:.40}"
        )
    return policy


def check_size(size: int) -> int:
    """Return ``size`` if it is a valid stream size; raise :class:`InvalidArgument`."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1_000_000:
        raise InvalidArgument(f"buffer: expected an integer in 1..1000000, got {size!r:.40}")
    return size


class Subscriptions:
    """The table of subscriptions by topic, and delivery into them."""

    def __init__(self, *, stall_timeout_s: float) -> None:
        self.stall_timeout_s = stall_timeout_s
        self._exact: dict[str, list[Stream]] = {}
        #: Subscriptions to ``prefix/#`` (or ``#``), with the prefix.
        self._wild: list[tuple[str, Stream]] = []
        #: Messages no subscription matched.
        self.unrouted = 0
        #: Subscriptions ended because their consumer stalled.
        self.stalled = 0
        #: Time readers have spent waiting for room, in all.
        self.waited_s = 0.0
        #: Messages dropped by subscriptions that have since closed.
        self._closed_drops = 0

    def subscribe(self, topic: str, size: int, policy: str = WAIT) -> Stream:
        """Open a subscription to ``topic`` (``prefix/#`` or ``#`` for many)."""
        stream = Stream(topic, size, policy, self._remove)
        if topic.endswith("#"):
            self._wild.append((topic[:-1], stream))
        else:
            self._exact.setdefault(topic, []).append(stream)
        return stream

    @property
    def dropped(self) -> int:
        """Messages dropped by drop-policy subscriptions, open or closed since."""
        return self._closed_drops + sum(s.dropped for s in self)

    def _remove(self, stream: Stream) -> None:
        group = self._exact.get(stream.key)
        if group is not None and stream in group:
            group.remove(stream)
            if not group:
                del self._exact[stream.key]
        elif any(s is stream for _, s in self._wild):
            self._wild = [(p, s) for p, s in self._wild if s is not stream]
        else:
            return  # closed already
        self._closed_drops += stream.dropped

    def __iter__(self) -> Any:
        for group in self._exact.values():
            yield from group
        for _, stream in self._wild:
            yield stream

    def offer(self, incoming: Incoming) -> list[Stream] | None:
        """Hand ``incoming`` to every matching subscription that has room.

        Returns the subscriptions that were full and wait for room (pass
        them to :meth:`wait_for`), or None when nothing has to wait. Never
        waits itself: the fast path of every message.
        """
        topic = incoming.topic
        full: list[Stream] | None = None
        matched = False
        for stream in self._exact.get(topic, ()):
            matched = True
            full = self._put(stream, incoming, full)
        for prefix, stream in self._wild:
            if topic.startswith(prefix):
                matched = True
                full = self._put(stream, incoming, full)
        if not matched:
            self.unrouted += 1
        return full

    @staticmethod
    def _put(stream: Stream, item: Any, full: list[Stream] | None) -> list[Stream] | None:
        try:
            if stream._box.put_nowait(item) or stream.policy != WAIT:
                stream.delivered += 1
                return full
        except ClosedResourceError:  # closed by its consumer a moment ago
            return full
        if full is None:
            return [stream]
        full.append(stream)
        return full

    async def wait_for(self, streams: Iterable[Stream], item: Any, source: str) -> None:
        """Put ``item`` into each of ``streams``, waiting for room in each.

        A stream whose consumer takes nothing for ``stall_timeout_s`` is
        ended with :class:`SubscriberStalled` and skipped.
        """
        started = monotonic()
        try:
            for stream in streams:
                await self._wait_one(stream, item, source)
        finally:
            self.waited_s += monotonic() - started

    async def _wait_one(self, stream: Stream, item: Any, source: str) -> None:
        box = stream._box
        with anyio.move_on_after(self.stall_timeout_s):
            try:
                await box.put(item)
            except ClosedResourceError:
                return
            stream.delivered += 1
            return
        self._stall(stream, source)

    def _stall(self, stream: Stream, source: str) -> None:
        self.stalled += 1
        stream.stalled_at = monotonic()
        error = SubscriberStalled(
            f"subscription to {stream.key!r} took nothing for {self.stall_timeout_s:g} s "
            f"and was ended; a message from {source} was not delivered to it"
        )
        log.warning("%s (%d messages still queued for it)", error, len(stream._box))
        stream._box.dropped += 1
        stream._box.close(error)
        self._remove(stream)

    async def deliver(self, incoming: Incoming) -> int:
        """Offer ``incoming`` and wait for room where needed; return how many
        subscriptions it reached (for sources that may wait, like the uplink)."""
        reached = sum(1 for _ in self._matching(incoming.topic))
        full = self.offer(incoming)
        if full:
            await self.wait_for(full, incoming, incoming.peer)
        return reached

    def _matching(self, topic: str) -> Iterable[Stream]:
        yield from self._exact.get(topic, ())
        for prefix, stream in self._wild:
            if topic.startswith(prefix):
                yield stream


class EventFeed:
    """Node events to every stream that asked for them; never waits."""

    def __init__(self) -> None:
        self._streams: list[Stream] = []
        self._closed_drops = 0

    def open(self, size: int) -> Stream:
        """A new stream of node events; it drops its oldest event when full."""
        stream = Stream("events", size, DROP_OLDEST, self._forget)
        self._streams.append(stream)
        return stream

    def _forget(self, stream: Stream) -> None:
        if stream in self._streams:
            self._closed_drops += stream.dropped
            self._streams.remove(stream)

    def publish(self, event: Any) -> None:
        """Offer ``event`` to every open event stream (dispatcher only)."""
        for stream in self._streams:
            stream._box.put_nowait(event)
            stream.delivered += 1

    @property
    def dropped(self) -> int:
        """Events dropped by streams whose consumers fell behind, closed ones included."""
        return self._closed_drops + sum(s.dropped for s in self._streams)
