"""The node: one flattened event loop.

Every source of work is a small task that reads one thing and puts an event
into the node's single bounded inbox: the listener's handshake tasks, each
connection's reader, each dial, and the application API. One dispatcher
consumes the inbox and is the only code that changes peer state. Its
handlers are plain functions, never coroutines: they update the registry
and the keepalive scheduler and queue outgoing frames with ``*_nowait``, so
nothing the dispatcher does can wait on a socket, another multiplexer or a
full queue (DESIGN failure 1).

Timers are not tasks. The keepalive scheduler and the dispatcher's own
deadline heap (request timeouts, close grace periods, housekeeping) say
when the next thing is due; the dispatcher waits for the inbox until then.

Each connection has a bounded outbox drained by its writer task, which
coalesces queued frames into one TLS write. When an outbox is full the
peer is slow: best-effort traffic (pings, broadcasts, peer lists) is
dropped and counted; anything else closes the connection. Either way the
dispatcher carries on at once.

Inbound and outbound connections are one type, ``_Conn``, with one code
path: both ends ping and any frame received proves liveness (failure 2).
The registry is keyed by IP (failure 3) and is changed only here, from
transport events, so "up" always means a live transport (failure 4).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream, WouldBlock, to_thread
from anyio.abc import ByteStream, TaskGroup

from firmware_bridge import cbor

from .config import NodeConfig
from .errors import (
    AdmissionRefused,
    ConfigError,
    EdgeNodeError,
    HandshakeError,
    InvalidArgument,
    ListenError,
    NodeClosed,
    PeerUnavailable,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    SlowPeer,
    TooManyPending,
)
from .identity import (
    Identity,
    PinnedContexts,
    client_context,
    load_authorised,
    load_identity,
    parse_node_id,
)
from .keepalive import DEAD, DIAL, PING, Keepalive
from .proto.connection import PeerProtocol
from .proto.messages import (
    BYE,
    DATA,
    DEVICE_REQUEST,
    DEVICES,
    ERR_BUSY,
    ERR_DEVICE_FAILED,
    ERR_HANDLER_FAILED,
    ERR_NO_DEVICE,
    ERR_NO_HANDLER,
    ERROR,
    FROM_DEVICE,
    MAX_DEVICE_ID_BYTES,
    PEERS,
    PONG,
    REQUEST,
    RESPONSE,
    TO_DEVICE,
    AnyMessage,
    Bye,
    Data,
    DeviceRequest,
    Devices,
    ErrorResponse,
    FromDevice,
    Hello,
    Limits,
    PeerInfo,
    Peers,
    Ping,
    Pong,
    Request,
    Response,
    ToDevice,
)
from .proto.messages import (
    PING as MSG_PING,
)
from .registry import DOWN, INBOUND, OUTBOUND, UP, PeerEntry, Registry, ip_sort_key, normalise_ip
from .state import KNOWN_PEERS_FILENAME, KnownPeer, KnownPeers, save_known_peers
from .transports.tcp import HandshakeAdmission, Link, accept_link, dial_link, refuse_socket

if TYPE_CHECKING:
    from .bridge import DeviceAnswer, Port, SerialBridge
    from .transports.discovery import DiscoveryWiring

log = logging.getLogger("edgenode.node")

monotonic = time.monotonic
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_COALESCE_BYTES = 64 * 1024
_RETRYABLE_LISTEN = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)
_PING_SLACK = 0.05
_HOUSEKEEPING_S = 30.0
_READ_BYTES = 65536


# -- what the application sees ------------------------------------------------


@dataclass(frozen=True)
class Incoming:
    """A message or request from a peer, as handed to the application."""

    peer: str
    node_id: str
    topic: str
    payload: bytes


@dataclass(frozen=True)
class PeerUp:
    """A peer's connection became live (``restarted``: it has a new session)."""

    peer: str
    node_id: str
    direction: str
    restarted: bool = False


@dataclass(frozen=True)
class PeerDown:
    """A peer's live connection ended; ``reason`` says why."""

    peer: str
    node_id: str | None
    reason: str
    error: EdgeNodeError | None = None


@dataclass(frozen=True)
class Refused:
    """A connection was refused or failed before it became live."""

    peer: str
    error: EdgeNodeError


NodeEvent = Union[PeerUp, PeerDown, Refused]


@dataclass(frozen=True)
class PeerSnapshot:
    """One row of :meth:`Node.peers`: what the node knows of a peer now."""

    ip: str
    node_id: str | None
    state: str
    direction: str | None
    listen_port: int | None
    up_for_s: float | None
    down_reason: str | None
    rtt_s: float | None
    our_pings_answered: bool
    their_frames_arriving: bool
    last_heard_s: float | None
    bytes_in: int
    bytes_out: int
    drops: int
    #: Microcontrollers this peer bridges (addressed as ``ip/device``).
    devices: tuple[str, ...] = ()


class Stream:
    """A bounded stream of items from the node (messages or node events).

    Iterate with ``async for``; close with ``close()`` or by leaving its
    ``with`` block. When the consumer falls behind, new items are dropped
    and counted in ``dropped``: the node never waits for a slow consumer.
    """

    def __init__(self, node: Node, key: str, size: int) -> None:
        self._node = node
        self.key = key
        self._send, self._recv = anyio.create_memory_object_stream(size)
        self.dropped = 0

    def _offer(self, item: Any) -> bool:
        try:
            self._send.send_nowait(item)
            return True
        except WouldBlock:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("subscriber %r is slow: %d items dropped", self.key, self.dropped)
        except (ClosedResourceError, BrokenResourceError):
            pass
        return False

    async def receive(self) -> Any:
        """Wait for the next item. Raises ``anyio.EndOfStream`` once closed."""
        return await self._recv.receive()

    def receive_nowait(self) -> Any:
        """The next item if one is waiting; raises ``anyio.WouldBlock`` if not."""
        return self._recv.receive_nowait()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._recv.__aiter__()

    def close(self) -> None:
        """Stop receiving; idempotent."""
        self._node._unsubscribe(self)
        self._send.close()
        self._recv.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


Handler = Callable[[Incoming], Awaitable[bytes]]


# -- inside the loop ------------------------------------------------------------


class _Conn:
    """One live TLS link, inbound or outbound: a single type (failure 2)."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "closing",
        "direction",
        "drops",
        "early",
        "hello",
        "ip",
        "local_ip",
        "node_id",
        "outbox_recv",
        "outbox_send",
        "port",
        "progress_t",
        "proto",
        "reserved",
        "room",
        "scope",
        "stream",
    )

    def __init__(self, link: Link, direction: str, proto: PeerProtocol, outbox_frames: int):
        self.stream: ByteStream = link.stream
        self.ip = link.peer_ip
        self.port = link.peer_port
        self.local_ip = link.local_ip
        self.node_id = link.peer_node_id
        self.direction = direction
        self.proto = proto
        self.hello: Hello = proto.their_hello  # type: ignore[assignment]
        self.early: list[AnyMessage] = []
        self.outbox_send, self.outbox_recv = anyio.create_memory_object_stream(outbox_frames)
        self.scope: anyio.CancelScope | None = None
        self.closing = False
        # Backpressure for the application: places in the outbox promised to
        # callers whose frames are still in the inbox, an event set when the
        # writer takes frames out, and when it last did.
        self.reserved = 0
        self.room: anyio.Event | None = None
        self.progress_t = monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.drops = 0

    def __repr__(self) -> str:
        return f"<conn {self.direction} {self.ip}:{self.port}>"


class _Pending:
    __slots__ = (
        "conn",
        "deadline",
        "device",
        "done",
        "error",
        "ip",
        "request_id",
        "result",
        "timeout_s",
        "topic",
    )

    def __init__(self, ip: str, topic: str, timeout_s: float, device: str | None = None) -> None:
        self.ip = ip
        self.device = device
        self.topic = topic
        self.timeout_s = timeout_s
        self.request_id = 0
        self.deadline = 0.0
        #: The connection the request was sent on.
        self.conn: _Conn | None = None
        self.done = anyio.Event()
        self.result: bytes | None = None
        self.error: EdgeNodeError | None = None

    def finish(self, result: bytes | None, error: EdgeNodeError | None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


# Inbox events. Each carries the time it was queued, for the loop-lag figure.
class _Ev:
    __slots__ = ("t",)


class _Ready(_Ev):
    __slots__ = ("conn",)

    def __init__(self, conn: _Conn) -> None:
        self.conn, self.t = conn, monotonic()


class _Received(_Ev):
    __slots__ = ("conn", "msgs")

    def __init__(self, conn: _Conn, msgs: list[AnyMessage]) -> None:
        self.conn, self.msgs, self.t = conn, msgs, monotonic()


class _Closed(_Ev):
    __slots__ = ("conn", "error", "reason")

    def __init__(self, conn: _Conn, reason: str, error: EdgeNodeError | None) -> None:
        self.conn, self.reason, self.error, self.t = conn, reason, error, monotonic()


class _Failed(_Ev):
    """A handshake (inbound) or dial (outbound, ``dialled``) failed."""

    __slots__ = ("dialled", "error", "ip")

    def __init__(self, ip: str, error: EdgeNodeError, dialled: bool) -> None:
        self.ip, self.error, self.dialled, self.t = ip, error, dialled, monotonic()


class _Send(_Ev):
    """Queue ``frame`` to ``ip`` (None: every peer); or, with ``local``, data
    (device id, topic, payload) for a device on this node's serial ports."""

    __slots__ = ("droppable", "frame", "ip", "local", "reserved")

    def __init__(
        self,
        ip: str | None,
        frame: bytes,
        droppable: bool,
        local: tuple[str, str, bytes] | None = None,
        reserved: _Conn | None = None,
    ) -> None:
        self.ip, self.frame, self.droppable, self.t = ip, frame, droppable, monotonic()
        self.local = local
        # The connection whose outbox the caller reserved a place in.
        self.reserved = reserved


class _Ask(_Ev):
    __slots__ = ("payload", "pending", "reserved")

    def __init__(self, pending: _Pending, payload: bytes, reserved: _Conn | None = None) -> None:
        self.pending, self.payload, self.t = pending, payload, monotonic()
        self.reserved = reserved


class _Answer(_Ev):
    __slots__ = ("conn", "msg")

    def __init__(self, conn: _Conn, msg: AnyMessage) -> None:
        self.conn, self.msg, self.t = conn, msg, monotonic()


class _AddPeer(_Ev):
    __slots__ = ("ip", "port")

    def __init__(self, ip: str, port: int) -> None:
        self.ip, self.port, self.t = ip, port, monotonic()


class _Shutdown(_Ev):
    __slots__ = ()

    def __init__(self) -> None:
        self.t = monotonic()


_HARD_CLOSE = 0
_REQUEST_DEADLINE = 1
_HOUSEKEEPING = 2
_LINK_TICK = 3
_BEACON = 4


class Node:
    """A running edgenode: ``async with Node(config) as node: ...``.

    On entry it loads its identity, starts listening and dials the
    configured peers; on exit it says bye to every peer and closes within
    ``config.shutdown_grace_s``.
    """

    def __init__(self, config: NodeConfig, *, identity: Identity | None = None) -> None:
        self.config = config.validate()
        self.identity = identity if identity is not None else load_identity(config.state_dir)
        self.node_id = self.identity.node_id
        if config.authorised is not None:
            self.authorised = frozenset(parse_node_id(i) for i in config.authorised)
        else:
            self.authorised = load_authorised(os.path.join(config.state_dir, "authorised_nodes"))
        # Peers known from earlier runs (a small file, read before the loop runs).
        self._known: KnownPeers | None = None
        if config.remember_peers:
            path = os.path.join(config.state_dir, KNOWN_PEERS_FILENAME)
            self._known = KnownPeers.load(path, cap=config.max_known_peers)
        self._known_lock: anyio.Lock | None = None
        #: A new random epoch per process: peers see a restart as a new session.
        self.epoch = random.getrandbits(62)
        self.listen_port = config.listen_port
        self._wildcard = config.listen_host in _WILDCARD_HOSTS
        our_ip = "0.0.0.0" if self._wildcard else normalise_ip(config.listen_host)
        self.registry = Registry(
            our_ip,
            max_peers=config.max_peers,
            prune_after_s=config.prune_after_s,
            # Each side's handshake ends within its timeout: two of them bound
            # how far apart the two halves of a simultaneous open can be.
            simultaneous_window_s=2 * config.handshake_timeout_s,
        )
        self.keepalive = Keepalive(
            interval_s=config.keepalive_interval_s,
            timeout_s=config.keepalive_timeout_s,
            rand=random.random,
            jitter=config.keepalive_jitter,
            backoff_base_s=config.backoff_base_s,
            backoff_cap_s=config.backoff_cap_s,
            # Pings due within 5 % of an interval go out together: one
            # wake-up for many idle peers.
            ping_slack_s=config.keepalive_interval_s * _PING_SLACK,
        )
        self._limits = Limits(max_frame_bytes=config.max_frame_bytes)
        self._server_contexts = PinnedContexts(self.identity, max_entries=config.max_peers)
        self._client_ctx = client_context(self.identity)
        self._tg: TaskGroup | None = None
        self._listener_scope: anyio.CancelScope | None = None
        self._inbox_send, self._inbox_recv = anyio.create_memory_object_stream(config.inbox_size)
        self._conns: set[_Conn] = set()
        self._open_conns = 0
        self._all_closed: anyio.Event | None = None
        self._dialing: set[str] = set()
        self._timers: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()
        self._request_ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._handlers: dict[str, Handler] = {"edgenode/peers": self._peers_handler}
        self._inflight_handlers = 0
        self._subs: dict[str, list[Stream]] = {}
        self._wild_subs: list[Stream] = []
        self._event_streams: list[Stream] = []
        self._up_waiters: dict[str, list[anyio.Event]] = {}
        #: The devices each peer bridges, from its devices messages.
        self._remote_devices: dict[str, tuple[str, ...]] = {}
        self.discovery: DiscoveryWiring | None = None
        self.bridge: SerialBridge | None = None
        #: The MQTT uplink when configured (edgenode.uplink; loaded only then).
        self.uplink: Any = None
        if config.serial_ports:
            from .bridge import SerialBridge  # pyserial and the link load only when needed

            self.bridge = SerialBridge(self)
        self._closing = False
        self._started = 0.0
        # Loop figures.
        self.events_handled = 0
        self.wakeups = 0
        self.lag_last_s = 0.0
        self.lag_max_s = 0.0
        self._lag_sum_s = 0.0
        self.unrouted = 0
        self.lost_sends = 0
        self.refused = 0

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Node:
        if not self.authorised:
            log.warning(
                "no authorised nodes: every peer will be refused "
                "(add IDs with: edgenode authorise NODE_ID)"
            )
        self._listener_scope = anyio.CancelScope()
        self._all_closed = anyio.Event()
        self._known_lock = anyio.Lock()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        if self.config.control_socket is not None:
            from .control import serve_control

            try:
                await tg.start(serve_control, self, self.config.control_socket)
            except BaseException:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
                raise
        try:
            listener = await anyio.create_tcp_listener(
                local_host=None if self._wildcard else self.config.listen_host,
                local_port=self.config.listen_port,
            )
        except OSError as exc:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            # Busy, or the address is not up yet (at boot): a restart may
            # succeed. Anything else (a privileged port, ...) is configuration.
            error = ListenError if exc.errno in _RETRYABLE_LISTEN else ConfigError
            raise error(
                f"cannot listen on {self.config.listen_host}:{self.config.listen_port}: "
                f"{exc.strerror or exc}"
            ) from None
        self.listen_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        if self.config.discovery:
            try:
                self.discovery = self._start_discovery()
            except ConfigError:
                await listener.aclose()
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
                raise
        self._started = monotonic()
        tg.start_soon(self._serve, listener, tg)
        tg.start_soon(self._dispatch)
        if self.discovery is not None:
            tg.start_soon(self.discovery.run)
        if self.bridge is not None:
            for port in self.bridge.ports:
                tg.start_soon(self.bridge.run_port, port)
        if self.config.uplink is not None:
            from .uplink import Uplink  # the MQTT client library loads only here

            self.uplink = Uplink(self, self.config.uplink)
            tg.start_soon(self.uplink.run)
        now = monotonic()
        for host, port in self.config.peers:
            ip = normalise_ip(host)
            self.registry.add_configured(ip, port, now)
            self.keepalive.schedule_dial(ip, now)
        self._dial_known(now)
        self._push_timer(now + _HOUSEKEEPING_S, _HOUSEKEEPING, None)
        if self.discovery is not None:
            self._push_timer(self.discovery.first_due(now), _BEACON, None)
        log.info(
            "node %s listening on %s:%d (%d peers configured, %d authorised)",
            self.node_id,
            self.config.listen_host,
            self.listen_port,
            len(self.config.peers),
            len(self.authorised),
        )
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        await self.aclose()
        return None

    async def aclose(self) -> None:
        """Say bye to every peer and stop, within ``shutdown_grace_s``. Idempotent."""
        tg = self._tg
        if tg is None:
            return
        self._tg = None
        if not self._closing:
            self._closing = True
            assert self._listener_scope is not None and self._all_closed is not None
            self._listener_scope.cancel()
            if self.uplink is not None:
                with anyio.move_on_after(self.config.shutdown_grace_s):
                    await self.uplink.aclose()
            with anyio.move_on_after(self.config.shutdown_grace_s):
                await self._inbox_send.send(_Shutdown())
                if self._open_conns:
                    await self._all_closed.wait()
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)
        if self.discovery is not None:
            await self.discovery.aclose()
        final = self._known.take() if self._known is not None else None
        if final is not None:
            with anyio.CancelScope(shield=True):
                await self._save_known_peers(final)
        log.info("node %s stopped", self.node_id)

    # -- application API -------------------------------------------------------------

    async def send(
        self, peer: str, topic: str, payload: bytes, *, wait_s: float | None = None
    ) -> None:
        """Queue a message to ``peer``: an IP, a node ID, or ``ip/device`` for a
        microcontroller bridged by the node at ``ip``.

        Raises :class:`PeerUnavailable` at once if the peer is not connected,
        or, with ``wait_s``, after waiting that long for it to (re)connect.
        While the peer's outbox is full the call waits for room
        (backpressure); a peer that takes nothing for a whole keepalive
        timeout is closed as a slow peer. Delivery is not confirmed; use
        :meth:`request` for that.
        """
        topic, payload = self._check_topic(topic), self._check_payload(payload)
        ip, device = await self._up_peer(peer, wait_s)
        if device is None:
            frame = PeerProtocol.send(Data(topic, payload))
            await self._post(_Send(ip, frame, False, reserved=await self._reserve(ip)))
        elif self._is_local(ip):
            assert self.bridge is not None
            # Reliable links take a few messages at a time: wait for room
            # here, in the caller, rather than lose the message later.
            while not self.bridge.has_room(device):
                await self.bridge.wait_for_room(device)
                if not self._is_up(ip, device):
                    raise PeerUnavailable(f"device {device} went down while the send waited")
            self.bridge.reserve(device)
            await self._post(_Send(ip, b"", False, local=(device, topic, payload)))
        else:
            frame = PeerProtocol.send(ToDevice(device, topic, payload))
            await self._post(_Send(ip, frame, False, reserved=await self._reserve(ip)))

    async def send_many(self, peer: str, topic: str, payloads: Iterable[bytes]) -> int:
        """Queue several messages on one topic to ``peer`` (an IP or node ID), in order.

        The same as :meth:`send` for each payload, but the messages cross
        the loop as one event per 64 KiB and leave in as few TLS writes as
        possible. Every payload is checked before any is queued. Returns
        how many were queued. Raises :class:`InvalidArgument` (also for a
        device address: use :meth:`send`) or :class:`PeerUnavailable`.
        """
        topic = self._check_topic(topic)
        frames = [PeerProtocol.send(Data(topic, self._check_payload(p))) for p in payloads]
        if self._resolve(peer)[1] is not None:
            raise InvalidArgument(f"peer {peer!r:.60}: send_many does not address devices")
        ip, _ = await self._up_peer(peer, None)
        chunk: list[bytes] = []
        size = 0
        for frame in frames:
            chunk.append(frame)
            size += len(frame)
            if size >= _COALESCE_BYTES:
                reserved = await self._reserve(ip)
                await self._post(_Send(ip, b"".join(chunk), False, reserved=reserved))
                chunk, size = [], 0
        if chunk:
            await self._post(_Send(ip, b"".join(chunk), False, reserved=await self._reserve(ip)))
        return len(frames)

    async def broadcast(self, topic: str, payload: bytes) -> int:
        """Queue a best-effort message to every connected peer; return how many."""
        frame = PeerProtocol.send(Data(self._check_topic(topic), self._check_payload(payload)))
        self._check_open()
        await self._post(_Send(None, frame, True))
        return len(self.registry.up())

    async def request(
        self,
        peer: str,
        topic: str,
        payload: bytes,
        *,
        timeout: float = 10.0,
        wait_s: float | None = None,
    ) -> bytes:
        """Send a request and return the response payload.

        Raises :class:`PeerUnavailable` (down, or went down before answering),
        :class:`RequestTimeout`, :class:`RemoteError` (the peer's handler
        failed or none exists) or :class:`TooManyPending`.
        """
        self._check_topic(topic)
        self._check_payload(payload)
        if not timeout > 0:
            raise InvalidArgument(f"timeout: expected a number > 0, got {timeout!r}")
        ip, device = await self._up_peer(peer, wait_s)
        pending = _Pending(ip, topic, timeout, device)
        reserved = None if device is not None and self._is_local(ip) else await self._reserve(ip)
        await self._post(_Ask(pending, bytes(payload), reserved))
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def publish_local(self, topic: str, payload: bytes, *, source: str = "local") -> int:
        """Deliver a message to this node's own subscribers, as if it had
        arrived from ``source`` (for example ``"mqtt"`` for the uplink).

        Returns how many subscriptions it reached. Raises
        :class:`InvalidArgument` for a bad topic or payload and
        :class:`NodeClosed` once the node is closing.
        """
        topic, payload = self._check_topic(topic), self._check_payload(payload)
        self._check_open()
        return self._deliver(Incoming(source, self.node_id, topic, payload))

    async def add_peer(self, host: str, port: int) -> None:
        """Dial ``host:port`` now and keep it connected, as a configured peer."""
        self._check_open()
        ip = normalise_ip(host)
        if not 0 < port <= 65535:
            raise InvalidArgument(f"port: expected 1..65535, got {port!r}")
        await self._post(_AddPeer(ip, port))

    def subscribe(self, topic: str) -> Stream:
        """Receive data messages on ``topic`` (``prefix/#`` or ``#`` for many).

        Returns a :class:`Stream` of :class:`Incoming`.
        """
        self._check_open()
        sub = Stream(self, topic, self.config.subscription_buffer)
        if topic.endswith("#"):
            self._wild_subs.append(sub)
        else:
            self._subs.setdefault(self._check_topic(topic), []).append(sub)
        return sub

    def on_message(self, topic: str, callback: Callable[[Incoming], Awaitable[None]]) -> Stream:
        """Run ``await callback(msg)`` for each message on ``topic``, in order.

        The callback runs in its own task, never in the dispatcher; an
        exception from it is logged and the subscription carries on.
        """
        sub = self.subscribe(topic)
        assert self._tg is not None

        async def consume() -> None:
            async for msg in sub:
                try:
                    await callback(msg)
                except Exception:
                    log.exception("message callback for %r failed", topic)

        self._tg.start_soon(consume)
        return sub

    def handle(self, topic: str, handler: Handler) -> None:
        """Answer requests on ``topic`` with ``await handler(request)`` (bytes)."""
        self._handlers[self._check_topic(topic)] = handler

    def events(self) -> Stream:
        """A stream of :class:`PeerUp`, :class:`PeerDown` and :class:`Refused`."""
        sub = Stream(self, "events", self.config.subscription_buffer)
        self._event_streams.append(sub)
        return sub

    def peers(self) -> list[PeerSnapshot]:
        """A snapshot of the registry, one row per known peer, sorted by IP.

        Devices on this node's serial ports follow, one row each, with
        ``ip`` set to their address (``ip/device``) and direction "serial".
        """
        now = monotonic()
        rows = []
        for entry in sorted(self.registry, key=lambda e: ip_sort_key(e.ip)):
            live = self.keepalive.liveness(entry.ip, now)
            conn = entry.conn if isinstance(entry.conn, _Conn) else None
            rows.append(
                PeerSnapshot(
                    ip=entry.ip,
                    node_id=entry.node_id,
                    state=entry.state,
                    direction=entry.direction,
                    listen_port=entry.listen_port,
                    up_for_s=None
                    if entry.up_since is None or entry.state != UP
                    else now - entry.up_since,
                    down_reason=entry.down_reason,
                    rtt_s=live.rtt_s if live else None,
                    our_pings_answered=bool(live and live.our_pings_answered),
                    their_frames_arriving=bool(live and live.their_frames_arriving),
                    last_heard_s=live.last_received_age_s if live else None,
                    bytes_in=conn.bytes_in if conn else 0,
                    bytes_out=conn.bytes_out if conn else 0,
                    drops=conn.drops if conn else 0,
                    devices=self._remote_devices.get(entry.ip, ()),
                )
            )
        if self.bridge is not None:
            rows.extend(self.bridge.snapshot(now))
        return rows

    def stats(self) -> dict[str, Any]:
        """Node figures: uptime, loop lag, events and wake-ups, peers by state."""
        up = len(self.registry.up())
        return {
            "node_id": self.node_id,
            "uptime_s": monotonic() - self._started if self._started else 0.0,
            "loop_lag_last_ms": self.lag_last_s * 1000,
            "loop_lag_max_ms": self.lag_max_s * 1000,
            "loop_lag_avg_ms": self._lag_sum_s * 1000 / max(1, self.events_handled),
            "events_handled": self.events_handled,
            "wakeups": self.wakeups,
            "peers_up": up,
            "peers_down": len(self.registry) - up,
            "pending_requests": len(self._pending),
            "unrouted_messages": self.unrouted,
            "lost_sends": self.lost_sends,
            "refused_connections": self.refused,
        }

    # -- API helpers -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing or self._tg is None:
            raise NodeClosed("node is closed")

    def _check_topic(self, topic: str) -> str:
        if not isinstance(topic, str) or not topic:
            raise InvalidArgument(f"topic: expected non-empty text, got {topic!r:.40}")
        size = len(topic.encode())
        if size > self._limits.max_topic_bytes:
            raise InvalidArgument(
                f"topic of {size} bytes exceeds {self._limits.max_topic_bytes}-byte limit"
            )
        return topic

    def _check_payload(self, payload: bytes) -> bytes:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"payload: expected bytes, got {type(payload).__name__}")
        limit = self._limits.max_frame_bytes - self._limits.max_topic_bytes - 32
        if len(payload) > limit:
            raise InvalidArgument(f"payload of {len(payload)} bytes exceeds {limit}-byte limit")
        return bytes(payload)

    def _resolve_node(self, text: str) -> str:
        try:
            return normalise_ip(text)
        except ConfigError:
            pass
        try:
            node_id = parse_node_id(text)
        except ConfigError:
            raise InvalidArgument(
                f"peer {text!r:.60} is neither an ip address nor a node id"
            ) from None
        entry = self.registry.by_node_id(node_id)
        if entry is None:
            raise PeerUnavailable(f"node {node_id} is not known to this node")
        return entry.ip

    def _resolve(self, peer: str) -> tuple[str, str | None]:
        """Split ``peer`` into (node ip, device id or None)."""
        node, slash, device = peer.partition("/")
        if not slash:
            return self._resolve_node(peer), None
        if not device or len(device.encode()) > MAX_DEVICE_ID_BYTES:
            raise InvalidArgument(
                f"peer {peer!r:.60}: device id should be 1..{MAX_DEVICE_ID_BYTES} bytes"
            )
        return (self.address if node == "local" else self._resolve_node(node)), device

    @property
    def address(self) -> str:
        """This node's IP as its devices are addressed (``local`` on a wildcard listener)."""
        return "local" if self._wildcard else self.registry.our_ip

    def device_address(self, device_id: str) -> str:
        """The address of a device on this node's serial ports."""
        return f"{self.address}/{device_id}"

    def _is_local(self, ip: str) -> bool:
        return ip == self.address

    def _is_up(self, ip: str, device: str | None) -> bool:
        if device is not None and self._is_local(ip):
            return self.bridge is not None and device in self.bridge.devices
        entry = self.registry.get(ip)
        if entry is None or entry.state != UP:
            return False
        return device is None or device in self._remote_devices.get(ip, ())

    async def _up_peer(self, peer: str, wait_s: float | None) -> tuple[str, str | None]:
        self._check_open()
        ip, device = self._resolve(peer)
        if self._is_up(ip, device):
            return ip, device
        key = ip if device is None else f"{ip}/{device}"
        if wait_s:
            with anyio.move_on_after(wait_s):
                while not self._is_up(ip, device):
                    event = anyio.Event()
                    waiters = self._up_waiters.setdefault(key, [])
                    waiters.append(event)
                    try:
                        await event.wait()
                    finally:
                        waiters.remove(event)
                        if not waiters:
                            self._up_waiters.pop(key, None)
                    self._check_open()
            if self._is_up(ip, device):
                return ip, device
        waited = f" after waiting {wait_s} s" if wait_s else ""
        if device is not None:
            where = "this node" if self._is_local(ip) else ip
            raise PeerUnavailable(f"device {device} is not connected to {where}{waited}")
        entry = self.registry.get(ip)
        if entry is None:
            raise PeerUnavailable(f"peer {ip} is not connected (never seen)")
        raise PeerUnavailable(
            f"peer {ip} is not connected{waited} ({entry.down_reason or 'not connected yet'})"
        )

    async def _reserve(self, ip: str) -> _Conn | None:
        """Wait for room in the outbox of the peer at ``ip`` and reserve a place.

        Backpressure for the application: a caller that produces faster
        than the peer takes waits here, instead of filling the outbox
        until the slow-peer policy closes the link. The dispatcher never
        waits; it releases the place when it queues the frame. If the
        writer takes nothing for a whole keepalive timeout, returns
        without a reservation: the frame then meets the full outbox and
        the slow-peer policy (DESIGN: the peer is slow, not the node).
        """
        limit = self.config.outbox_frames
        while True:
            entry = self.registry.get(ip)
            conn = entry.conn if entry is not None else None
            if not isinstance(conn, _Conn) or conn.closing:
                raise PeerUnavailable(f"peer {ip} went down while the send waited for room")
            if conn.outbox_send.statistics().current_buffer_used + conn.reserved < limit:
                conn.reserved += 1
                return conn
            stalled = monotonic() - conn.progress_t
            left = self.config.keepalive_timeout_s - stalled
            if left <= 0:
                return None
            if conn.room is None:
                conn.room = anyio.Event()
            with anyio.move_on_after(left):
                await conn.room.wait()

    def _wake(self, key: str) -> None:
        for waiter in self._up_waiters.get(key, ()):
            waiter.set()

    async def _post(self, event: _Ev) -> None:
        # Sources may wait for room in the inbox; the dispatcher never does.
        try:
            await self._inbox_send.send(event)
        except (ClosedResourceError, BrokenResourceError):
            raise NodeClosed("node is closed") from None

    async def _peers_handler(self, request: Incoming) -> bytes:
        # firmware_bridge's codec has no floats: the round trip goes as
        # integer microseconds.
        return cbor.encode(
            [
                [
                    p.ip,
                    p.node_id,
                    p.state,
                    p.direction,
                    p.down_reason,
                    None if p.rtt_s is None else round(p.rtt_s * 1_000_000),
                ]
                for p in self.peers()
            ]
        )

    def _unsubscribe(self, sub: Stream) -> None:
        for group in (self._wild_subs, self._event_streams, self._subs.get(sub.key, [])):
            if sub in group:
                group.remove(sub)
        if not self._subs.get(sub.key, True):
            del self._subs[sub.key]

    # -- sources: listener, handshakes, dials, connections ------------------------------

    async def _serve(self, listener: anyio.abc.Listener[Any], tg: TaskGroup) -> None:
        # Only the accept loops live in the listener's scope; connections run
        # in the node's task group, so stopping the listener at shutdown
        # leaves them open long enough to say bye.
        #
        # The node accepts from the listening sockets itself rather than with
        # listener.serve(): a connection over a handshake limit is reset
        # before anyio wraps it or a task starts for it, so a flood costs the
        # loop little; and accept() failing for want of descriptors or memory
        # is waited out, where it used to end the listener and the node.
        assert self._listener_scope is not None
        config = self.config
        admission = HandshakeAdmission(
            max_per_ip=config.max_handshakes_per_ip,
            max_total=config.max_handshakes,
            rate_per_ip=config.max_handshake_rate_per_ip,
        )
        accept_batch = 8  # connections taken per wake-up; other tasks run in between
        backoff_s = 0.1  # after running out of descriptors, as trio does
        out_of_resources = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
        failures = 0

        async def accept_from(sock: socket.socket) -> None:
            nonlocal failures
            while True:
                due = admission.next_report_at()
                with anyio.move_on_after(None if due is None else max(0.0, due - monotonic())):
                    await anyio.wait_readable(sock)
                now = monotonic()
                for ip, message in admission.due_reports(now):
                    await self._post(_Failed(ip, HandshakeError(message), False))
                for _ in range(accept_batch):
                    try:
                        client, address = sock.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno not in out_of_resources:
                            continue  # that one connection failed (reset while queued)
                        failures += 1
                        if failures in (1, 10, 100) or failures % 1000 == 0:
                            log.error(
                                "cannot accept connections: %s (failure #%d); retrying every %g s",
                                _os_detail(exc),
                                failures,
                                backoff_s,
                            )
                        await anyio.sleep(backoff_s)
                        break
                    ip = normalise_ip(address[0])
                    refusal = admission.admit(ip, now)
                    if refusal is None:
                        tg.start_soon(self._accept, client, ip, admission)
                        continue
                    refuse_socket(client)
                    message = admission.refused(ip, refusal, now)
                    if message is not None:
                        await self._post(_Failed(ip, HandshakeError(message), False))

        sockets = [
            one.extra(anyio.abc.SocketAttribute.raw_socket)
            for one in getattr(listener, "listeners", [listener])
        ]
        with self._listener_scope:
            async with listener:
                async with anyio.create_task_group() as accepting:
                    for sock in sockets:
                        accepting.start_soon(accept_from, sock)

    async def _accept(self, sock: socket.socket, ip: str, admission: HandshakeAdmission) -> None:
        # The accept loop counted this handshake in; count it out however it ends.
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                stream: ByteStream = await anyio.abc.SocketStream.from_socket(sock)
            except (OSError, ValueError):  # reset before we could wrap it
                sock.close()
                return
            log.debug(
                "handshake with %s started (%d in progress from it, %d in all)",
                ip,
                admission.in_progress_from(ip),
                admission.in_progress,
            )
            conn = await self._handshake(ip, stream, None)
        finally:
            admission.finished(ip)
        if conn is not None:
            await self._run_connection(conn)

    async def _dial(self, ip: str, port: int) -> None:
        conn = await self._handshake(ip, None, port)
        if conn is not None:
            await self._run_connection(conn)

    async def _handshake(
        self, ip: str, stream: ByteStream | None, port: int | None
    ) -> _Conn | None:
        """Run one side of the handshake under the handshake timeout.

        Returns the connection with both hellos exchanged, or None after
        posting the failure to the inbox.
        """
        timeout = self.config.handshake_timeout_s
        link: Link | None = None
        error: EdgeNodeError
        try:
            with anyio.fail_after(timeout):
                if stream is not None:
                    link = await accept_link(
                        stream,
                        contexts=self._server_contexts,
                        is_authorised=self.authorised.__contains__,
                        name=ip,
                    )
                else:
                    assert port is not None
                    link = await dial_link(
                        ip,
                        port,
                        context=self._client_ctx,
                        cert_der=self.identity.cert_der,
                        local_host=None if self._wildcard else self.config.listen_host,
                        is_authorised=self.authorised.__contains__,
                    )
                return await self._exchange_hellos(
                    link, INBOUND if stream is not None else OUTBOUND
                )
        except TimeoutError:
            what = "handshake" if stream is not None else f"dial to {ip}:{port}"
            error = HandshakeError(f"{ip}: {what} not finished within {timeout} s")
        except EdgeNodeError as exc:
            error = exc
        except EndOfStream:
            # A port scanner, or a peer that gave up: it said nothing wrong.
            error = HandshakeError(f"{ip}: connection closed by the peer during the handshake")
        except (OSError, BrokenResourceError) as exc:
            error = HandshakeError(f"{ip}: connection failed during handshake: {_os_detail(exc)}")
        except Exception as exc:  # a bug: contain it, the listener serves everyone
            log.exception("handshake with %s failed", ip)
            error = HandshakeError(f"{ip}: internal error during handshake: {exc!r:.100}")
        closing = link.stream if link is not None else stream
        if closing is not None:
            await _close_stream(closing)
        await self._post(_Failed(ip, error, stream is None))
        return None

    async def _exchange_hellos(self, link: Link, direction: str) -> _Conn:
        proto = PeerProtocol(
            expected_node_id=link.peer_node_id, limits=self._limits, name=link.peer_ip
        )
        await link.stream.send(PeerProtocol.send(Hello(self.node_id, self.listen_port, self.epoch)))
        messages: list[AnyMessage] = []
        while proto.their_hello is None:
            try:
                data = await link.stream.receive(_READ_BYTES)
            except EndOfStream:
                raise HandshakeError(f"{link.peer_ip}: connection closed before hello") from None
            messages = proto.receive_data(data)
        conn = _Conn(link, direction, proto, self.config.outbox_frames)
        conn.early = messages[1:]
        return conn

    async def _run_connection(self, conn: _Conn) -> None:
        self._open_conns += 1
        try:
            await self._connection_tasks(conn)
        except Exception as exc:
            # A bug, not a peer's doing. The other connections share the
            # listener's task group, so contain it here and keep the registry
            # truthful.
            log.exception("connection %r failed", conn)
            if not conn.closing:
                await self._inbox_send.send(_Closed(conn, f"internal error: {exc!r:.100}", None))
        finally:
            self._open_conns -= 1
            if self._closing and not self._open_conns and self._all_closed is not None:
                self._all_closed.set()
            await _close_stream(conn.stream)

    async def _connection_tasks(self, conn: _Conn) -> None:
        with anyio.CancelScope() as scope:
            conn.scope = scope
            await self._post(_Ready(conn))
            # The reader reports the end of the stream to the dispatcher,
            # which cancels this scope, or first lets the writer flush a
            # bye that tells the peer why.
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer, conn)
                await self._reader(conn)

    async def _reader(self, conn: _Conn) -> None:
        stream, proto, post = conn.stream, conn.proto, self._inbox_send.send
        error: EdgeNodeError | None = None
        try:
            while True:
                data = await stream.receive(_READ_BYTES)
                conn.bytes_in += len(data)
                messages = proto.receive_data(data)
                if messages:
                    await post(_Received(conn, messages))
        except EndOfStream:
            try:
                proto.receive_eof()
                reason = "connection closed by peer"
            except ProtocolError as exc:
                reason, error = str(exc), exc
        except (ProtocolError, HandshakeError) as exc:
            reason, error = str(exc), exc
        except (BrokenResourceError, ClosedResourceError, OSError) as exc:
            reason = f"connection lost: {_os_detail(exc)}"
        await post(_Closed(conn, reason, error))

    async def _writer(self, conn: _Conn) -> None:
        recv, stream = conn.outbox_recv, conn.stream
        try:
            async for frame in recv:
                room = conn.room
                if room is not None:
                    conn.room = None
                    room.set()
                size = len(frame)
                if size < _COALESCE_BYTES:
                    # Coalesce what is already queued into one TLS write.
                    batch = [frame]
                    while size < _COALESCE_BYTES:
                        try:
                            more = recv.receive_nowait()
                        except (WouldBlock, EndOfStream):
                            break
                        batch.append(more)
                        size += len(more)
                    if len(batch) > 1:
                        frame = b"".join(batch)
                await stream.send(frame)
                conn.bytes_out += size
                conn.progress_t = monotonic()
        except (BrokenResourceError, ClosedResourceError, EndOfStream, OSError) as exc:
            # EndOfStream: TLS needed to read while writing and the peer had gone.
            reason = f"connection lost while sending: {_os_detail(exc)}"
            await self._inbox_send.send(_Closed(conn, reason, None))
            return
        # The dispatcher closed the outbox: everything, including the bye,
        # has been written.
        assert conn.scope is not None
        conn.scope.cancel()

    # -- the dispatcher ---------------------------------------------------------------

    async def _dispatch(self) -> None:
        recv = self._inbox_recv
        handlers: dict[type, Callable[[Any, float], None]] = {
            _Received: self._on_received,
            _Send: self._on_send,
            _Ready: self._on_ready,
            _Closed: self._on_closed,
            _Failed: self._on_failed,
            _Ask: self._on_ask,
            _Answer: self._on_answer,
            _Shutdown: self._on_shutdown,
            _AddPeer: self._on_add_peer,
        }
        if self.discovery is not None:
            from .transports.discovery import BeaconHeard

            handlers[BeaconHeard] = self.discovery.on_beacon
        if self.bridge is not None:
            from .bridge import DeviceAnswer, SerialEvent

            handlers[SerialEvent] = self.bridge.on_event
            handlers[DeviceAnswer] = self.bridge.on_answer
        next_due = self._next_deadline()
        event: Any = None
        while True:
            try:
                event = recv.receive_nowait()
            except WouldBlock:
                now = monotonic()
                if next_due is not None and now >= next_due:
                    self._run_timers(now)
                    next_due = self._next_deadline()
                    continue
                self.wakeups += 1
                if next_due is None:
                    event = await recv.receive()
                else:
                    event = None
                    with anyio.move_on_after(next_due - now):
                        event = await recv.receive()
                    if event is None:
                        continue
            now = monotonic()
            lag = now - event.t
            self.lag_last_s = lag
            self._lag_sum_s += lag
            if lag > self.lag_max_s:
                self.lag_max_s = lag
            self.events_handled += 1
            handlers[type(event)](event, now)
            next_due = self._next_deadline()
            if next_due is not None and now >= next_due:
                self._run_timers(now)
                next_due = self._next_deadline()
            event = None

    def _next_deadline(self) -> float | None:
        keepalive_due = self.keepalive.next_deadline()
        if self._timers:
            own = self._timers[0][0]
            return own if keepalive_due is None or own < keepalive_due else keepalive_due
        return keepalive_due

    def _push_timer(self, when: float, kind: int, obj: Any) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), kind, obj))

    def _run_timers(self, now: float) -> None:
        for action, ip, nonce in self.keepalive.due(now):
            entry = self.registry.get(ip)
            if action == PING:
                if entry is not None and isinstance(entry.conn, _Conn):
                    self._queue(entry.conn, PeerProtocol.send(Ping(nonce)), now, droppable=True)
            elif action == DEAD:
                if entry is not None and isinstance(entry.conn, _Conn):
                    timeout = self.config.keepalive_timeout_s
                    self._drop(entry.conn, f"no frames for {timeout} s (keepalive timeout)", now)
            elif action == DIAL:
                self._start_dial(entry)
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, kind, obj = heapq.heappop(timers)
            if kind == _BEACON:
                if self.discovery is not None:
                    due = self.discovery.on_timer(now)
                    if due is not None:
                        self._push_timer(due, _BEACON, None)
            elif kind == _LINK_TICK:
                if obj.tick_at == when and self.bridge is not None:
                    self.bridge.on_tick(obj, now)
            elif kind == _HARD_CLOSE:
                if obj.scope is not None:
                    obj.scope.cancel()
            elif kind == _REQUEST_DEADLINE:
                pending = self._pending.pop(obj.request_id, None)
                if pending is not None:
                    pending.finish(
                        None,
                        RequestTimeout(
                            f"no response from {pending.ip} to request {pending.request_id} "
                            f"on {pending.topic!r} within {pending.timeout_s} s"
                        ),
                    )
            elif kind == _HOUSEKEEPING:
                for entry in self.registry.prune(now):
                    self.keepalive.forget(entry.ip)
                    log.info("forgot peer %s: down since %s", entry.ip, entry.down_reason)
                if self._known is not None and self._tg is not None:
                    due = self._known.take_due(now)
                    if due is not None:
                        self._tg.start_soon(self._save_known_peers, due)
                self._push_timer(now + _HOUSEKEEPING_S, _HOUSEKEEPING, None)

    def _start_dial(self, entry: PeerEntry | None) -> None:
        if entry is None or entry.state == UP or self._closing or not entry.listen_port:
            return
        if entry.ip in self._dialing or self._tg is None:
            return
        self._dialing.add(entry.ip)
        self._tg.start_soon(self._dial, entry.ip, entry.listen_port)

    def _queue(
        self,
        conn: _Conn,
        frame: bytes,
        now: float,
        *,
        droppable: bool = False,
        is_traffic: bool = True,
    ) -> bool:
        """Queue a frame without waiting; apply the slow-peer policy if full.

        A frame that ``is_traffic`` postpones our next ping; a pong does not,
        or the side that answers pings would never ping itself, and only one
        direction would ever be proved alive (DESIGN failure 2).
        """
        try:
            conn.outbox_send.send_nowait(frame)
        except WouldBlock:
            conn.drops += 1
            if droppable:
                if conn.drops == 1 or conn.drops % 100 == 0:
                    log.warning(
                        "slow peer %s: outbox full (%d frames); dropped best-effort "
                        "traffic (%d drops)",
                        conn.ip,
                        self.config.outbox_frames,
                        conn.drops,
                    )
                return False
            reason = f"slow peer: outbox full ({self.config.outbox_frames} frames)"
            self._drop(conn, reason, now, error=SlowPeer(f"{conn.ip}: {reason}"), bye=False)
            return False
        except (ClosedResourceError, BrokenResourceError):
            return False
        if is_traffic:
            self.keepalive.sent(conn.ip, now)
        return True

    def _drop(
        self,
        conn: _Conn,
        reason: str,
        now: float,
        *,
        error: EdgeNodeError | None = None,
        bye: bool = True,
    ) -> None:
        """Close ``conn``; if it was its peer's live connection, the peer is down."""
        if conn.closing:
            return
        conn.closing = True
        if conn.room is not None:
            conn.room.set()  # callers waiting for room see the link close
            conn.room = None
        self._conns.discard(conn)
        entry = self.registry.closed(conn, reason, now)
        if entry is not None:
            if self._known is not None and entry.listen_port and entry.node_id:
                self._known.seen(
                    conn.ip, entry.listen_port, entry.node_id, wall_now=time.time(), now=now
                )
            for device in self._remote_devices.pop(conn.ip, ()):
                self._publish(PeerDown(f"{conn.ip}/{device}", entry.node_id, reason))
            redial = bool(entry.listen_port) and not self._closing
            delay = self.keepalive.link_down(conn.ip, now, redial=redial)
            if self._closing:
                log.info(
                    "closed link to %s (node %s): %s",
                    conn.ip,
                    entry.node_id,
                    reason,
                    extra={"peer": conn.ip, "node_id": entry.node_id, "reason": reason},
                )
            else:
                retry = f"; redial in {delay:.1f} s" if delay is not None else ""
                log.warning(
                    "peer down %s (node %s): %s%s",
                    conn.ip,
                    entry.node_id,
                    reason,
                    retry,
                    extra={"peer": conn.ip, "node_id": entry.node_id, "reason": reason},
                )
            self._publish(PeerDown(conn.ip, entry.node_id, reason, error))
        # Requests sent on this connection can no longer be answered: the
        # peer went down, or (replaced) it is up on another connection.
        lost = [p for p in self._pending.values() if p.conn is conn]
        if lost:
            why = (
                f"peer {conn.ip} went down: {reason}"
                if entry is not None
                else f"peer {conn.ip}: connection replaced before the response arrived ({reason})"
            )
            for pending in lost:
                del self._pending[pending.request_id]
                pending.finish(None, PeerUnavailable(why))
        if bye:
            try:
                conn.outbox_send.send_nowait(PeerProtocol.send(Bye(_clip(reason))))
            except (WouldBlock, ClosedResourceError, BrokenResourceError):
                bye = False
        conn.outbox_send.close()
        if bye:
            self._push_timer(now + self.config.shutdown_grace_s, _HARD_CLOSE, conn)
        elif conn.scope is not None:
            conn.scope.cancel()

    def _start_discovery(self) -> DiscoveryWiring:
        from .transports.discovery import Discovery, wire_discovery

        config = self.config
        return wire_discovery(
            self,
            Discovery(
                self.node_id,
                self.listen_port,
                self.epoch,
                port=config.discovery_port,
                bind_host=config.discovery_bind_host,
                broadcast_host=config.discovery_address,
                source_host="0.0.0.0" if self._wildcard else config.listen_host,
                interval_s=config.discovery_interval_s,
                is_authorised=self.authorised.__contains__,
            ),
        )

    def _dial_known(self, now: float) -> None:
        """Dial the authorised peers remembered from earlier runs."""
        if self._known is None:
            return
        for known in self._known.peers:
            if known.node_id not in self.authorised or known.node_id == self.node_id:
                continue
            if known.ip in self.registry:
                continue
            try:
                entry = self.registry.learn(known.ip, known.port, known.node_id, now)
            except ConfigError as exc:
                log.debug("ignored known peer %s: %s", known.ip, exc)
                continue
            if entry is not None:
                self.keepalive.schedule_dial(known.ip, now)
        self._forget_pruned()

    async def _save_known_peers(self, peers: list[KnownPeer]) -> None:
        # A write and two fsyncs can take 100 ms or more on an SD card: a
        # worker thread, never the dispatcher.
        assert self._known is not None and self._known_lock is not None
        async with self._known_lock:  # saves land in the order they were taken
            try:
                await to_thread.run_sync(save_known_peers, self._known.path, peers)
            except OSError as exc:
                log.warning(
                    "cannot save known peers to %s: %s", self._known.path, exc.strerror or exc
                )

    def _forget_pruned(self) -> None:
        for entry in self.registry.take_pruned():
            self.keepalive.forget(entry.ip)
            log.info("forgot peer %s to make room: down since %s", entry.ip, entry.down_reason)

    def _publish(self, event: NodeEvent) -> None:
        for stream in self._event_streams:
            stream._offer(event)

    # -- dispatcher handlers: plain functions, never coroutines ------------------------

    def _on_ready(self, ev: _Ready, now: float) -> None:
        conn = ev.conn
        if conn.direction == OUTBOUND:
            self._dialing.discard(conn.ip)
        if self._closing:
            self._drop(conn, "node shutting down", now)
            return
        if self._wildcard:
            # Our address as this peer sees it decides the simultaneous-open rule.
            self.registry.our_ip = conn.local_ip
        before = self.registry.get(conn.ip)
        old_epoch = before.epoch if before is not None and before.state == UP else None
        hello = conn.hello
        admission = self.registry.admit(
            conn, conn.ip, conn.node_id, hello.epoch, conn.direction, hello.listen_port or None, now
        )
        self._forget_pruned()
        if not admission.accepted:
            reason = admission.reason or "refused"
            self.refused += 1
            log.info(
                "not admitting %s connection with %s: %s",
                conn.direction,
                conn.ip,
                reason,
                extra={"peer": conn.ip, "node_id": conn.node_id, "reason": reason},
            )
            self._publish(Refused(conn.ip, AdmissionRefused(f"{conn.ip}: {reason}")))
            self._drop(conn, reason, now)
            return
        replaced = admission.replaced
        if isinstance(replaced, _Conn):
            self._drop(replaced, admission.replaced_reason or "replaced", now)
        self._conns.add(conn)
        self.keepalive.link_up(conn.ip, now)
        entry = admission.entry
        if self._known is not None and entry is not None and entry.listen_port:
            # The listen port, not the source port: that is where to redial.
            self._known.seen(
                conn.ip, entry.listen_port, conn.node_id, wall_now=time.time(), now=now
            )
        restarted = old_epoch is not None and old_epoch != hello.epoch
        if replaced is None or restarted:
            log.info(
                "peer up %s (node %s, %s)%s",
                conn.ip,
                conn.node_id,
                conn.direction,
                " after a restart" if restarted else "",
                extra={"peer": conn.ip, "node_id": conn.node_id},
            )
            self._publish(PeerUp(conn.ip, conn.node_id, conn.direction, restarted))
        self._wake(conn.ip)
        known = [
            PeerInfo(e.ip, e.listen_port, e.node_id)
            for e in self.registry.up()
            if e.ip != conn.ip and e.listen_port
        ][: self._limits.max_peers_listed]
        if known:
            self._queue(conn, PeerProtocol.send(Peers(known)), now, droppable=True)
        if self.bridge is not None and self.bridge.devices:
            self._queue(conn, self._devices_message(), now)
        if conn.early:
            self._on_received(_Received(conn, conn.early), now)
            conn.early = []

    def _on_received(self, ev: _Received, now: float) -> None:
        conn = ev.conn
        if conn.closing:
            return
        ip = conn.ip
        self.keepalive.received(ip, now)
        for msg in ev.msgs:
            code = msg.code
            if code == DATA:
                self._deliver(Incoming(ip, conn.node_id, msg.topic, msg.payload))  # type: ignore[union-attr]
            elif code == MSG_PING:
                pong = PeerProtocol.send(Pong(msg.nonce))  # type: ignore[union-attr]
                self._queue(conn, pong, now, droppable=True, is_traffic=False)
            elif code == PONG:
                self.keepalive.pong(ip, msg.nonce, now)  # type: ignore[union-attr]
            elif code == REQUEST:
                self._on_request(conn, msg, now)  # type: ignore[arg-type]
            elif code == RESPONSE or code == ERROR:
                pending = self._pending.get(msg.request_id)  # type: ignore[union-attr]
                if pending is None or pending.ip != ip:
                    log.debug("%s: response to unknown or expired request %s", ip, msg.request_id)  # type: ignore[union-attr]
                    continue
                del self._pending[pending.request_id]
                if code == RESPONSE:
                    pending.finish(msg.payload, None)  # type: ignore[union-attr]
                else:
                    pending.finish(None, RemoteError(msg.error_code, msg.message))  # type: ignore[union-attr]
            elif code == BYE:
                self._drop(conn, f"peer said bye: {msg.reason}", now, bye=False)  # type: ignore[union-attr]
                return
            elif code == PEERS:
                self._learn(msg, now)  # type: ignore[arg-type]
            elif code >= TO_DEVICE:
                self._on_device_message(conn, msg, now)

    def _deliver(self, incoming: Incoming) -> int:
        topic = incoming.topic
        subs = self._subs.get(topic)
        delivered = 0
        for sub in subs or ():
            sub._offer(incoming)
            delivered += 1
        for sub in self._wild_subs:
            if topic.startswith(sub.key[:-1]):
                sub._offer(incoming)
                delivered += 1
        if not delivered:
            self.unrouted += 1
            log.debug("%s: no subscriber for topic %r", incoming.peer, topic)
        return delivered

    def _on_request(self, conn: _Conn, msg: Request, now: float) -> None:
        request_id = msg.request_id

        def reply(status: int, payload: bytes | str) -> _Answer:
            return _Answer(conn, _answer(request_id, status, payload))

        refused = self._start_handler(
            Incoming(conn.ip, conn.node_id, msg.topic, msg.payload), reply
        )
        if refused is not None:
            self._queue(conn, PeerProtocol.send(_answer(request_id, *refused)), now)

    def _start_handler(
        self, incoming: Incoming, reply: Callable[[int, bytes | str], Any]
    ) -> tuple[int, str] | None:
        """Run the handler for ``incoming.topic`` in a task of its own.

        The task posts ``reply(status, payload)`` to the inbox (status 0:
        success). Returns (error code, message) at once if it cannot run.
        """
        handler = self._handlers.get(incoming.topic)
        if handler is None:
            return ERR_NO_HANDLER, _clip(f"no handler for topic {incoming.topic!r}")
        if self._inflight_handlers >= self.config.max_inflight_handlers or self._tg is None:
            return (
                ERR_BUSY,
                f"busy: {self.config.max_inflight_handlers} requests already in progress",
            )
        self._inflight_handlers += 1
        self._tg.start_soon(self._run_handler, handler, incoming, reply)
        return None

    async def _run_handler(
        self, handler: Handler, incoming: Incoming, reply: Callable[[int, bytes | str], Any]
    ) -> None:
        try:
            result = await handler(incoming)
            if not isinstance(result, (bytes, bytearray, memoryview)):
                raise TypeError(f"handler returned {type(result).__name__}, expected bytes")
            status, payload = 0, bytes(result)
        except Exception as exc:
            log.exception("request handler for %r failed", incoming.topic)
            status = ERR_HANDLER_FAILED
            payload = _clip(f"handler for {incoming.topic!r} failed: {type(exc).__name__}")
        finally:
            self._inflight_handlers -= 1
        await self._inbox_send.send(reply(status, payload))

    def _on_answer(self, ev: _Answer, now: float) -> None:
        if not ev.conn.closing:
            self._queue(ev.conn, PeerProtocol.send(ev.msg), now)

    def _on_ask(self, ev: _Ask, now: float) -> None:
        if ev.reserved is not None:
            ev.reserved.reserved -= 1
        pending = ev.pending
        if len(self._pending) >= self.config.max_pending_requests:
            pending.finish(
                None,
                TooManyPending(
                    f"{len(self._pending)} requests already pending "
                    f"(limit {self.config.max_pending_requests})"
                ),
            )
            return
        pending.request_id = next(self._request_ids)
        pending.deadline = now + pending.timeout_s
        if pending.device is not None and self._is_local(pending.ip):
            self._pending[pending.request_id] = pending
            self._push_timer(pending.deadline, _REQUEST_DEADLINE, pending)
            assert self.bridge is not None
            self.bridge.request(pending.device, pending.topic, ev.payload, pending, now)
            return
        entry = self.registry.get(pending.ip)
        if entry is None or not isinstance(entry.conn, _Conn):
            pending.finish(
                None, PeerUnavailable(f"peer {pending.ip} went down before the request was sent")
            )
            return
        if pending.device is None:
            message: AnyMessage = Request(pending.request_id, pending.topic, ev.payload)
        else:
            message = DeviceRequest(pending.request_id, pending.device, pending.topic, ev.payload)
        if not self._queue(entry.conn, PeerProtocol.send(message), now):
            pending.finish(
                None, PeerUnavailable(f"peer {pending.ip} is too slow to take the request")
            )
            return
        pending.conn = entry.conn
        self._pending[pending.request_id] = pending
        self._push_timer(pending.deadline, _REQUEST_DEADLINE, pending)

    def _on_send(self, ev: _Send, now: float) -> None:
        if ev.reserved is not None:
            ev.reserved.reserved -= 1
        if ev.local is not None:
            device, topic, payload = ev.local
            assert self.bridge is not None
            why = self.bridge.send_data(device, topic, payload, now, reserved=True)
            if why is not None:
                self.lost_sends += 1
                log.warning("message to device %s lost: %s", device, why)
            return
        if ev.ip is None:
            for entry in self.registry.up():
                if isinstance(entry.conn, _Conn):
                    self._queue(entry.conn, ev.frame, now, droppable=True)
            return
        entry = self.registry.get(ev.ip)
        if entry is None or not isinstance(entry.conn, _Conn):
            self.lost_sends += 1
            log.warning("message to %s lost: the peer went down before it was queued", ev.ip)
            return
        self._queue(entry.conn, ev.frame, now, droppable=ev.droppable)

    # -- bridged devices: called by the dispatcher and by SerialBridge ------------------

    def _on_device_message(self, conn: _Conn, msg: AnyMessage, now: float) -> None:
        code = msg.code
        if code == FROM_DEVICE:
            address = f"{conn.ip}/{msg.device_id}"  # type: ignore[union-attr]
            self._deliver(Incoming(address, conn.node_id, msg.topic, msg.payload))  # type: ignore[union-attr]
        elif code == TO_DEVICE:
            to_device: ToDevice = msg  # type: ignore[assignment]
            why = (
                self.bridge.send_data(to_device.device_id, to_device.topic, to_device.payload, now)
                if self.bridge is not None
                else "no serial bridge on this node"
            )
            if why is not None:
                self.lost_sends += 1
                log.info("%s: message for device %s dropped: %s", conn.ip, to_device.device_id, why)
        elif code == DEVICE_REQUEST:
            target = (conn, msg.request_id)  # type: ignore[union-attr]
            if self.bridge is None:
                self._device_answered(
                    target,
                    None,
                    PeerUnavailable(f"device {msg.device_id} is not connected"),
                    now,  # type: ignore[union-attr]
                )
            else:
                self.bridge.request(msg.device_id, msg.topic, msg.payload, target, now)  # type: ignore[union-attr]
        elif code == DEVICES:
            ids = tuple(msg.device_ids)  # type: ignore[union-attr]
            self._remote_devices[conn.ip] = ids
            for device in ids:
                self._wake(f"{conn.ip}/{device}")

    def _devices_message(self) -> bytes:
        devices = sorted(self.bridge.devices) if self.bridge is not None else []
        return PeerProtocol.send(Devices(devices))

    def _device_changed(self, device_id: str, *, up: bool, reason: str | None) -> None:
        address = self.device_address(device_id)
        if up:
            self._publish(PeerUp(address, self.node_id, "serial"))
            self._wake(address)
        else:
            self._publish(PeerDown(address, self.node_id, reason or "down"))
        now = monotonic()
        frame = self._devices_message()
        for entry in self.registry.up():
            if isinstance(entry.conn, _Conn):
                self._queue(entry.conn, frame, now)

    def _device_published(self, device_id: str, topic: str, payload: bytes, now: float) -> None:
        self._deliver(Incoming(self.device_address(device_id), self.node_id, topic, payload))
        frame = PeerProtocol.send(FromDevice(device_id, topic, payload))
        for entry in self.registry.up():
            if isinstance(entry.conn, _Conn):
                self._queue(entry.conn, frame, now, droppable=True)

    def _device_request(
        self, port: Port, device_id: str, request_id: int, topic: str, payload: bytes, now: float
    ) -> None:
        from .bridge import DeviceAnswer

        def reply(status: int, answer: bytes | str) -> DeviceAnswer:
            return DeviceAnswer(port, request_id, status, answer)

        incoming = Incoming(self.device_address(device_id), self.node_id, topic, payload)
        refused = self._start_handler(incoming, reply)
        if refused is not None and self.bridge is not None:
            self.bridge.on_answer(reply(*refused), now)

    def _device_send_to(
        self, device_id: str, dest: str, topic: str, payload: bytes, now: float
    ) -> None:
        try:
            ip, device = self._resolve(dest)
        except EdgeNodeError as exc:
            self.lost_sends += 1
            log.warning("device %s: cannot route to %r: %s", device_id, dest, exc)
            return
        if device is not None and self._is_local(ip):
            assert self.bridge is not None
            why = self.bridge.send_data(device, topic, payload, now)
            if why is not None:
                self.lost_sends += 1
                log.warning("device %s: cannot route to %s: %s", device_id, dest, why)
            return
        entry = self.registry.get(ip)
        if entry is None or not isinstance(entry.conn, _Conn):
            self.lost_sends += 1
            log.warning("device %s: cannot route to %s: not connected", device_id, dest)
            return
        if device is None:
            message: AnyMessage = FromDevice(device_id, topic, payload)
        else:
            message = ToDevice(device, topic, payload)
        self._queue(entry.conn, PeerProtocol.send(message), now)

    def _device_answered(
        self, target: Any, payload: bytes | None, error: EdgeNodeError | None, now: float
    ) -> None:
        """A device answered (or could not answer) a request made of it."""
        if isinstance(target, _Pending):
            if self._pending.pop(target.request_id, None) is not None:
                target.finish(payload, error)
            return
        conn, request_id = target
        if conn.closing:
            return
        if error is None:
            reply: AnyMessage = Response(request_id, payload or b"")
        elif isinstance(error, RemoteError):
            text = f"device error {error.code}: {error.remote_message}"
            reply = ErrorResponse(request_id, ERR_DEVICE_FAILED, _clip(text))
        elif isinstance(error, TooManyPending):
            reply = ErrorResponse(request_id, ERR_BUSY, _clip(str(error)))
        else:
            reply = ErrorResponse(request_id, ERR_NO_DEVICE, _clip(str(error)))
        self._queue(conn, PeerProtocol.send(reply), now)

    def _schedule_link_tick(self, port: Port, when: float) -> None:
        self._push_timer(when, _LINK_TICK, port)

    def _on_add_peer(self, ev: _AddPeer, now: float) -> None:
        try:
            self.registry.add_configured(ev.ip, ev.port, now)
        except ConfigError as exc:
            log.warning("cannot add peer %s:%d: %s", ev.ip, ev.port, exc)
            return
        self._forget_pruned()
        self.keepalive.schedule_dial(ev.ip, now)

    def _on_closed(self, ev: _Closed, now: float) -> None:
        self._drop(ev.conn, ev.reason, now, error=ev.error, bye=ev.error is not None)

    def _on_failed(self, ev: _Failed, now: float) -> None:
        ip, error = ev.ip, ev.error
        self.refused += 1
        self._publish(Refused(ip, error))
        if ev.dialled:
            self._dialing.discard(ip)
            entry = self.registry.get(ip)
            if entry is not None and entry.state == DOWN and not self._closing:
                delay = self.keepalive.dial_failed(ip, now)
                log.info(
                    "dial %s failed: %s; retry in %.1f s",
                    ip,
                    error,
                    delay,
                    extra={"peer": ip, "reason": str(error)},
                )
        else:
            log.warning(
                "refused connection from %s: %s",
                ip,
                error,
                extra={"peer": ip, "reason": str(error)},
            )

    def _learn(self, msg: Peers, now: float) -> None:
        if not self.config.learn_peers:
            return
        for info in msg.peers:
            if info.node_id is None or info.node_id not in self.authorised:
                continue
            if info.node_id == self.node_id:
                continue
            try:
                ip = normalise_ip(info.ip)
                if ip in self.registry:
                    continue
                entry = self.registry.learn(ip, info.port, info.node_id, now)
            except ConfigError as exc:
                log.debug("ignored peer list entry %r: %s", info, exc)
                continue
            self._forget_pruned()
            if entry is not None:
                log.info("learned peer %s:%d (node %s)", ip, info.port, info.node_id)
                self.keepalive.schedule_dial(ip, now)

    def _on_shutdown(self, ev: _Shutdown, now: float) -> None:
        self._closing = True
        for conn in list(self._conns):
            self._drop(conn, "node shutting down", now)  # the peer logs "peer said bye: ..."
        for pending in self._pending.values():
            pending.finish(None, NodeClosed("node closed before the response arrived"))
        self._pending.clear()
        for waiters in self._up_waiters.values():
            for waiter in waiters:
                waiter.set()
        if not self._open_conns and self._all_closed is not None:
            self._all_closed.set()


def _os_detail(exc: BaseException) -> str:
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


def _answer(request_id: int, status: int, payload: bytes | str) -> AnyMessage:
    """The answer to a request: a response (status 0) or an error."""
    if status == 0:
        return Response(request_id, payload if isinstance(payload, bytes) else payload.encode())
    text = payload if isinstance(payload, str) else payload.decode(errors="replace")
    return ErrorResponse(request_id, status, _clip(text))


def _clip(text: str, limit_bytes: int = 256) -> str:
    """Cut ``text`` to fit the peer's text limit (it counts UTF-8 bytes)."""
    return text.encode()[:limit_bytes].decode(errors="ignore")


async def _close_stream(stream: ByteStream) -> None:
    """Close a connection's stream at once, even inside a cancelled scope.

    TLS streams are made with ``standard_compatible=False`` (a bye says
    goodbye, not close_notify), so closing aborts the socket and returns.
    """
    with anyio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except (OSError, BrokenResourceError, ClosedResourceError):
            pass
