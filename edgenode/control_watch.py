"""The control socket's ``watch`` op: what ``edgenode watch TOPIC...`` prints.

A watch is a connection given over to messages: the client asks
``{"op": "watch", "topics": [...]}``, the node answers ``{"ok": true,
"watching": [...]}``, then sends one line per message that arrives on those
topics, until the client closes its end (anything else it sends is
ignored). The protocol is written down at the top of
:mod:`edgenode.control`.

A watch must never slow the node. Its subscriptions are opened with the
``drop-oldest`` policy, so a connection's reader never waits for a watcher
(docs/architecture.md, "Delivery"): when the client falls behind (a slow
terminal, a paused pipe), its socket fills, the subscriptions fill, and the
oldest messages are dropped and counted. Nor may it take the node's loop
for itself: it sends at most :data:`MAX_WATCH_LINES_PER_S` messages a
second (each costs the loop some microseconds of encoding and writing;
measured, an unpaced watch of a flood cost the node 45 % of its delivered
rate), and drops the oldest of the rest the same way. The count goes to
the client in a ``{"event": "dropped", "dropped": N}`` line before the next
messages, and is in ``subscription_drops`` of ``edgenode status`` while
the watch lasts.

Bounded: :data:`MAX_WATCH_TOPICS` topics a watch, :data:`MAX_WATCHERS`
watches at once (so that ``edgenode status`` always finds a place among
the control socket's clients), :data:`WATCH_BUFFER` messages held per
watch, :data:`MAX_WATCH_PAYLOAD_BYTES` of each payload sent,
:data:`MAX_WATCH_LINES_PER_S` messages a second.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable
from typing import Any, Protocol

import anyio
from anyio import EndOfStream, WouldBlock

from .errors import InvalidArgument

#: Topics one watch may name.
MAX_WATCH_TOPICS = 8
#: Connections watching at once; more are refused (TooManyPending).
MAX_WATCHERS = 4
#: Messages a watch holds for a client that falls behind, shared among its
#: topics; beyond them the oldest are dropped and counted.
WATCH_BUFFER = 128
#: Payload bytes a message line carries; the rest is cut ("truncated": true).
MAX_WATCH_PAYLOAD_BYTES = 64 * 1024
#: Messages a watch sends a second, at most: more than a person can read,
#: and a bound on what a watch costs the node's loop.
MAX_WATCH_LINES_PER_S = 1000

#: Lines joined into one write.
_BATCH = 64
_MIN_TOPIC_BUFFER = 16


class _Stream(Protocol):
    """What a watch needs of a subscription (:class:`edgenode.subscriptions.Stream`)."""

    @property
    def dropped(self) -> int: ...

    async def receive(self) -> Any: ...

    def receive_nowait(self) -> Any: ...

    def close(self) -> None: ...


class _Subscriber(Protocol):
    def subscribe(self, topic: str, *, on_full: str = ..., buffer: int | None = ...) -> Any: ...


def watch_topics(topics: object) -> list[str]:
    """Check a watch request's ``topics``; return them, each once.

    A topic that another one of the list already covers (``a/b`` or
    ``a/c/#`` beside ``a/#``) is left out, so that no message is sent twice.
    Raises :class:`InvalidArgument` unless ``topics`` is a list of 1 to
    :data:`MAX_WATCH_TOPICS` non-empty strings (the node checks each as
    ``subscribe`` does).
    """
    if not isinstance(topics, list) or not topics:
        raise InvalidArgument(
            f"watch: expected a list of 1..{MAX_WATCH_TOPICS} topics, got {topics!r:.60}"
        )
    if len(topics) > MAX_WATCH_TOPICS:
        raise InvalidArgument(f"watch: {len(topics)} topics exceed the limit of {MAX_WATCH_TOPICS}")
    for topic in topics:
        if not isinstance(topic, str) or not topic:
            raise InvalidArgument(
                f"watch: expected each topic as non-empty text, got {topic!r:.60}"
            )
    unique = list(dict.fromkeys(topics))
    return [t for t in unique if not any(_covers(other, t) for other in unique if other != t)]


def _covers(wildcard: str, topic: str) -> bool:
    """Whether every message ``topic`` matches also matches ``wildcard`` (``prefix#``)."""
    return wildcard.endswith("#") and topic.startswith(wildcard[:-1])


class Watch:
    """A watch's subscriptions, one per topic, each dropping its oldest when full."""

    def __init__(self, topics: list[str], streams: list[_Stream]) -> None:
        self.topics = topics
        self.streams = streams
        #: Drops already told to the client.
        self.reported = 0
        #: Messages sent to the client.
        self.sent = 0
        self._lock = anyio.Lock()
        #: When the next batch may go, to keep to MAX_WATCH_LINES_PER_S.
        self._next_at = 0.0

    @classmethod
    def open(cls, node: _Subscriber, topics: object) -> Watch:
        """Subscribe ``node`` to the checked ``topics`` with the drop-oldest policy.

        Raises :class:`InvalidArgument` for bad topics, and whatever
        ``node.subscribe`` raises (:class:`NodeClosed`).
        """
        checked = watch_topics(topics)
        size = max(_MIN_TOPIC_BUFFER, WATCH_BUFFER // len(checked))
        streams: list[_Stream] = []
        try:
            for topic in checked:
                streams.append(node.subscribe(topic, on_full="drop-oldest", buffer=size))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return cls(checked, streams)

    @property
    def dropped(self) -> int:
        """Messages the watch's subscriptions dropped because the client fell behind."""
        return sum(stream.dropped for stream in self.streams)

    def close(self) -> None:
        """Close the subscriptions. Idempotent."""
        for stream in self.streams:
            stream.close()

    async def run(self, sock: socket.socket) -> None:
        """Send the client a line per message until it closes its end.

        Returns when the client has gone (end of file, or an error on its
        socket) or a subscription has ended; closes the subscriptions.
        Waits for the client to take each batch of lines as long as it
        takes: meanwhile the subscriptions drop their oldest messages.
        """
        try:
            async with anyio.create_task_group() as tg:
                for stream in self.streams:
                    tg.start_soon(self._forward, stream, sock, tg.cancel_scope)
                await _until_closed(sock)
                tg.cancel_scope.cancel()
        finally:
            self.close()

    async def _forward(
        self, stream: _Stream, sock: socket.socket, scope: anyio.CancelScope
    ) -> None:
        try:
            while True:
                batch = [await stream.receive()]
                async with self._lock:
                    # Paced: what arrives meanwhile waits in the stream, which
                    # drops its oldest when full.
                    delay = self._next_at - time.monotonic()
                    if delay > 0:
                        await anyio.sleep(delay)
                    while len(batch) < _BATCH:
                        try:
                            batch.append(stream.receive_nowait())
                        except WouldBlock:
                            break
                    await _send_all(sock, self._lines(batch))
                    now = time.monotonic()
                    self._next_at = max(now, self._next_at) + len(batch) / MAX_WATCH_LINES_PER_S
                self.sent += len(batch)
        except (EndOfStream, OSError):
            scope.cancel()  # the subscription ended, or the client went away

    def _lines(self, batch: Iterable[Any]) -> bytes:
        lines = []
        dropped = self.dropped
        if dropped > self.reported:
            self.reported = dropped
            lines.append(_line({"event": "dropped", "dropped": dropped}))
        now = round(time.time(), 6)
        lines.extend(_line(message_event(message, now)) for message in batch)
        return b"".join(lines)


def message_event(message: Any, now: float) -> dict[str, Any]:
    """A watch's line for one :class:`~edgenode.api.Incoming` message."""
    payload = message.payload
    event: dict[str, Any] = {
        "event": "message",
        "time": now,
        "peer": message.peer,
        "node_id": message.node_id,
        "topic": message.topic,
        "size": len(payload),
        "hex": payload[:MAX_WATCH_PAYLOAD_BYTES].hex(),
    }
    if len(payload) > MAX_WATCH_PAYLOAD_BYTES:
        event["truncated"] = True
    return event


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def _send_all(sock: socket.socket, data: bytes) -> None:
    """Write ``data``, waiting for the client to take it; raises OSError if it has gone."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await anyio.wait_writable(sock)


async def _until_closed(sock: socket.socket) -> None:
    """Return once the client has closed its end; what it sends meanwhile is ignored."""
    while True:
        await anyio.wait_readable(sock)
        try:
            if not sock.recv(4096):
                return
        except BlockingIOError:
            continue
        except OSError:
            return
