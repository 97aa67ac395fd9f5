"""One live TLS link to a peer, inbound or outbound: a single type.

Inbound and outbound connections are one :class:`Connection` with one code
path (docs/architecture.md, failure 2): both ends ping, any frame received
proves liveness. A connection holds its TLS stream and protocol state, its
bounded outbox (frames waiting for its writer), the requests sent on it
that wait for an answer, and its counters.

Who touches what: the connection's reader and writer tasks
(:mod:`edgenode.datapath`) own the stream; the node's API and request
handlers put frames into the outbox (waiting for room); the dispatcher
queues control frames with :meth:`Connection.queue_nowait`, which never
waits, and alone decides when the connection is admitted, settled or
closed.

Settling: a connection carries data only once both sides have sent a
ready message, which each sends once it has admitted the connection and
knows no simultaneous open can displace it. So nothing that ``send()``
accepted is ever queued on a connection that loses a tie
(docs/protocol.md, "Ready").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .mailbox import Mailbox
from .proto.decoding import is_data_frame

if TYPE_CHECKING:
    import anyio
    from anyio.abc import ByteStream, TaskGroup

    from .proto.connection import PeerProtocol
    from .proto.messages import Hello
    from .transports.tcp import Link

log = logging.getLogger("edgenode.node")

#: Frames that may not wait or be lost (answers, device lists, a bye) may go
#: beyond a full outbox by this many; past that the peer is too slow.
CONTROL_RESERVE = 16


class Connection:
    """One live link: its stream, protocol state, outbox and pending requests."""

    __slots__ = (
        "admitted",
        "bytes_in",
        "bytes_out",
        "carried",
        "close_reason",
        "closing",
        "direction",
        "drops",
        "early",
        "hello",
        "ip",
        "local_ip",
        "node_id",
        "outbox",
        "paused_since",
        "pending",
        "port",
        "proto",
        "ready_received",
        "ready_sent",
        "restarted",
        "scope",
        "started_at",
        "stream",
        "tg",
    )

    def __init__(
        self,
        link: Link,
        direction: str,
        proto: PeerProtocol,
        outbox_frames: int,
        started_at: float,
    ) -> None:
        self.stream: ByteStream = link.stream
        #: When its TCP connection was accepted or dialled (registry rule 4e).
        self.started_at = started_at
        self.ip = link.peer_ip
        self.port = link.peer_port
        self.local_ip = link.local_ip
        self.node_id = link.peer_node_id
        self.direction = direction
        self.proto = proto
        self.hello: Hello = proto.their_hello  # type: ignore[assignment]
        #: Messages that arrived in the same read as the peer's hello.
        self.early: list[Any] = []
        self.outbox: Mailbox[bytes] = Mailbox(outbox_frames)
        #: The scope of its reader and writer, and their task group (request
        #: handlers for this peer run in it, so they end with the connection).
        self.scope: anyio.CancelScope | None = None
        self.tg: TaskGroup | None = None
        #: Set by the dispatcher: admitted to the registry; each side's ready.
        self.admitted = False
        self.ready_sent = False
        self.ready_received = False
        #: The peer has a new session since its last connection (set at admission).
        self.restarted = False
        #: Data frames moved here from the connection this one replaced,
        #: queued ahead of anything else once this one settles.
        self.carried: list[bytes] = []
        self.closing = False
        self.close_reason: str | None = None
        #: request id -> requests.Pending, for requests sent on this connection.
        self.pending: dict[int, Any] = {}
        #: When our reader stopped to wait for a full subscriber, if it did.
        self.paused_since: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        #: Best-effort frames dropped because the outbox was full.
        self.drops = 0

    @property
    def settled(self) -> bool:
        """Both sides said ready: data may flow, and no tie can displace it."""
        return self.ready_sent and self.ready_received

    def queue_nowait(self, frame: bytes, *, droppable: bool = False) -> bool:
        """Queue a frame without waiting (for the dispatcher and the reader).

        A full outbox drops a ``droppable`` frame and counts it; any other
        frame goes beyond capacity, up to :data:`CONTROL_RESERVE` frames.
        Returns False when the frame was not queued: dropped, or the
        reserve is used up too (the caller then closes the connection as a
        slow peer), or the outbox is closed.
        """
        box = self.outbox
        if box.closed:
            return False
        if box.put_nowait(frame):
            return True
        if droppable:
            self.drops += 1
            return False
        if len(box) >= box.capacity + CONTROL_RESERVE:
            return False
        box.put_beyond_capacity(frame)
        return True

    def queue_droppable(self, frame: bytes) -> bool:
        """Queue a best-effort frame (a ping, a pong, a peer list) without waiting.

        A full outbox drops it, counted in ``drops`` and logged at the first
        drop and every 100th after. Returns whether it was queued.
        """
        if self.queue_nowait(frame, droppable=True):
            return True
        drops = self.drops
        if not self.outbox.closed and (drops == 1 or drops % 100 == 0):
            log.warning(
                "peer %s is not reading: outbox full (%d frames); dropped "
                "best-effort traffic (%d drops)",
                self.ip,
                self.outbox.capacity,
                drops,
            )
        return False

    def take_unsent_data(self) -> list[bytes]:
        """Remove and return the data frames not yet written, oldest first.

        For a connection being replaced (docs/architecture.md): what
        ``send()`` accepted onto it moves to the connection that replaces it.
        """
        frames = [frame for frame in self.outbox.drain() if is_data_frame(frame)]
        return self.carried + frames if self.carried else frames

    def __repr__(self) -> str:
        return f"<conn {self.direction} {self.ip}:{self.port}>"
