"""The data path: each connection's reader and writer.

Data does not queue behind state (docs/architecture.md, "The data path").
A connection's reader decodes what arrives and routes each message by its
type, at once:

- data (and data a peer's device published) straight to the matching
  subscriptions. When one is full, the reader waits for room: it stops
  reading, TCP carries the pressure back, and the sender's ``send()``
  waits. While it waits the keepalive holds the peer (the silence is
  ours), and a subscription that takes nothing for its stall timeout is
  ended, so the wait is bounded;
- a request to its handler (a task of the connection's own), an answer to
  the caller waiting for it, device traffic to the device router;
- a ping is answered at once: the reader queues the pong itself (a pong
  changes no peer state, and the read already counted as a sign of life),
  sparing the dispatcher a wake-up for every ping a peer sends;
- everything that changes peer state (pong, ready, bye, peer and device
  lists) to the dispatcher's inbox, after the data read with it.

The writer drains the connection's outbox into the TLS stream, joining
what is queued into writes of up to 64 KiB. It is woken only when the
outbox goes from empty to not empty.

Nothing here changes peer state: the dispatcher does that, from the
events posted to its inbox.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

from .api import Incoming
from .errors import EdgeNodeError, HandshakeError, ProtocolError, SlowPeer
from .inbox import Closed, Control, Inbox, Opened
from .proto.connection import PeerProtocol
from .proto.messages import (
    Bye,
    Data,
    DeviceRequest,
    Devices,
    ErrorResponse,
    FromDevice,
    Peers,
    Ping,
    Pong,
    Ready,
    Request,
    Response,
    ToDevice,
)

if TYPE_CHECKING:
    from .connection import Connection
    from .keepalive import Keepalive
    from .mailbox import Mailbox
    from .requests import Requests
    from .subscriptions import Subscriptions

log = logging.getLogger("edgenode.node")

monotonic = time.monotonic

#: Bytes asked of the TLS stream per read.
READ_BYTES = 65536
#: Most bytes joined into one TLS write.
COALESCE_BYTES = 64 * 1024

_CONTROL = (Pong, Bye, Peers, Devices, Ready)
_frame = PeerProtocol.send


def os_detail(exc: BaseException) -> str:
    """A short, lowercase account of a socket-level failure."""
    # anyio's own exceptions carry no text: say what they mean, or what the OS
    # error behind them says (older anyio versions drop that error).
    if isinstance(exc, EndOfStream):
        return "connection closed by peer"
    if isinstance(exc, BrokenResourceError) and not str(exc):
        if exc.__cause__ is None:
            return "connection broken"
        exc = exc.__cause__
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


async def close_stream(stream: Any) -> None:
    """Close a connection's stream at once, even inside a cancelled scope.

    TLS streams are made with ``standard_compatible=False`` (a bye says
    goodbye, not close_notify), so closing aborts the socket and returns.
    """
    with anyio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except (OSError, BrokenResourceError, ClosedResourceError):
            pass


def take_write(box: Mailbox[bytes]) -> bytes:
    """Take the next frame from a non-empty outbox, joined with what is
    queued behind it into one write of up to :data:`COALESCE_BYTES`."""
    frame = box.get_nowait()
    size = len(frame)
    if not box or size >= COALESCE_BYTES:
        return frame
    parts = [frame]
    while box and size < COALESCE_BYTES:
        more = box.get_nowait()
        parts.append(more)
        size += len(more)
    return b"".join(parts)


class DeviceRoutes(Protocol):
    """What the reader needs from the device router (edgenode.devices)."""

    async def to_device(self, conn: Connection, msg: ToDevice) -> None:
        """Pass data from ``conn``'s peer to one of our devices (may wait for room)."""

    def device_request(self, conn: Connection, msg: DeviceRequest) -> None:
        """Ask one of our devices on behalf of ``conn``'s peer."""


class DataPath:
    """Runs connections: their reader and writer tasks."""

    def __init__(
        self,
        *,
        subscriptions: Subscriptions,
        requests: Requests,
        inbox: Inbox,
        keepalive: Keepalive,
        devices: DeviceRoutes,
        on_all_closed: Callable[[], None],
    ) -> None:
        self.subs = subscriptions
        self.requests = requests
        self.inbox = inbox
        self.keepalive = keepalive
        self.devices = devices
        self._on_all_closed = on_all_closed
        #: Connections whose tasks are running.
        self.open_connections = 0
        #: Set once the node is closing (the last connection to end says so).
        self.closing = False

    async def run(self, conn: Connection) -> None:
        """Run ``conn`` until it closes: tell the dispatcher, then read and write."""
        self.open_connections += 1
        try:
            # The reader reports the end of the stream to the dispatcher,
            # which cancels this task group, or first lets the writer flush a
            # bye that tells the peer why. Its own cancel scope is the
            # connection's: one scope less per connection.
            async with anyio.create_task_group() as tg:
                conn.tg, conn.scope = tg, tg.cancel_scope
                await self.inbox.post(Opened(conn))
                tg.start_soon(self._write, conn)
                await self._read(conn)
        except Exception as exc:
            # A bug, not a peer's doing. The other connections share the
            # node's task group, so contain it here and keep the registry
            # truthful.
            log.exception("connection %r failed", conn)
            if not conn.closing:
                await self.inbox.post(Closed(conn, f"internal error: {exc!r:.100}", None))
        finally:
            self.open_connections -= 1
            if self.closing and not self.open_connections:
                self._on_all_closed()
            await close_stream(conn.stream)

    # -- the reader ----------------------------------------------------------------

    async def _read(self, conn: Connection) -> None:
        stream, proto = conn.stream, conn.proto
        error: EdgeNodeError | None = None
        try:
            if conn.early:
                await self._route_early(conn)
            while True:
                data = await stream.receive(READ_BYTES)
                conn.bytes_in += len(data)
                self.keepalive.received(conn.ip, monotonic())
                messages = proto.receive_data(data)
                if messages:
                    await self._route(conn, messages)
                # Nothing read is kept alive while the next read waits: on an
                # idle connection that was busy, up to a 64 KiB read.
                del data, messages
        except EndOfStream:
            try:
                proto.receive_eof()
                reason = "connection closed by peer"
            except ProtocolError as exc:
                reason, error = str(exc), exc
        except (ProtocolError, HandshakeError, SlowPeer) as exc:
            reason, error = str(exc), exc
        except (BrokenResourceError, ClosedResourceError, OSError) as exc:
            reason = f"connection lost: {os_detail(exc)}"
        await self.inbox.post(Closed(conn, reason, error))

    async def _route_early(self, conn: Connection) -> None:
        early, conn.early = conn.early, []
        await self._route(conn, early)

    async def _route(self, conn: Connection, messages: list[Any]) -> None:
        """Route each message by its type; control messages go to the inbox last."""
        control: list[Any] | None = None
        subs = self.subs
        for msg in messages:
            kind = type(msg)
            if kind is Data:
                incoming = Incoming(conn.ip, conn.node_id, msg.topic, msg.payload)
                full = subs.offer(incoming)
                if full:
                    await self._wait_for_room(conn, full, incoming)
            elif kind is Response or kind is ErrorResponse:
                self.requests.answered(conn, msg)
            elif kind is Request:
                refusal = self.requests.serve(conn, msg)
                # The reader never waits for room in its own connection's
                # outbox (two nodes doing so at once would wait for each other
                # for ever): an answer goes beyond a full outbox, up to a
                # reserve; past it the peer asks without reading answers.
                if refusal is not None and not conn.queue_nowait(refusal):
                    raise SlowPeer(f"{conn.ip}: slow peer: it sends requests but reads no answers")
            elif kind is Ping:
                # Best effort, as every pong is (a full outbox drops it,
                # counted); not traffic: a pong does not postpone our own
                # ping (failure 2).
                conn.queue_droppable(_frame(Pong(msg.nonce)))
            elif kind in _CONTROL:
                if kind is Ready:
                    conn.ready_received = True
                if control is None:
                    control = [msg]
                else:
                    control.append(msg)
            elif kind is FromDevice:
                address = f"{conn.ip}/{msg.device_id}"
                incoming = Incoming(address, conn.node_id, msg.topic, msg.payload)
                full = subs.offer(incoming)
                if full:
                    await self._wait_for_room(conn, full, incoming)
            elif kind is ToDevice:
                await self.devices.to_device(conn, msg)
            elif kind is DeviceRequest:
                self.devices.device_request(conn, msg)
        if control is not None:
            await self.inbox.post(Control(conn, control))

    async def _wait_for_room(self, conn: Connection, full: list[Any], item: Incoming) -> None:
        """Wait until every full subscription took ``item`` (or was ended for
        stalling); meanwhile the keepalive does not count the peer's silence."""
        now = monotonic()
        conn.paused_since = now
        self.keepalive.hold(conn.ip, now)
        try:
            await self.subs.wait_for(full, item, conn.ip)
        finally:
            conn.paused_since = None
            self.keepalive.release(conn.ip, monotonic())

    # -- the writer ----------------------------------------------------------------

    async def _write(self, conn: Connection) -> None:
        box, stream = conn.outbox, conn.stream
        try:
            while True:
                if not box:
                    if box.closed:
                        break
                    await box.wait_item()
                    continue
                frame = take_write(box)
                await stream.send(frame)
                conn.bytes_out += len(frame)
                # Not kept alive while the writer waits: up to 64 KiB.
                del frame
        except (BrokenResourceError, ClosedResourceError, EndOfStream, OSError) as exc:
            # EndOfStream: TLS needed to read while writing and the peer had gone.
            reason = f"connection lost while sending: {os_detail(exc)}"
            await self.inbox.post(Closed(conn, reason, None))
            return
        # The dispatcher closed the outbox: everything, the bye included, is
        # written.
        assert conn.scope is not None
        conn.scope.cancel()
