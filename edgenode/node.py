"""The node: ``async with Node(config) as node:`` and the application API.

A node is a few parts on one event loop (docs/architecture.md):

- the dispatcher (:mod:`edgenode.dispatcher`), the one owner of peer state,
  fed by one bounded inbox (:mod:`edgenode.inbox`);
- the listener and dialler (:mod:`edgenode.handshake`), which turn sockets
  into connections (:mod:`edgenode.connection`);
- the data path (:mod:`edgenode.datapath`): each connection's reader,
  which hands data straight to the subscriptions
  (:mod:`edgenode.subscriptions`) and requests to their handlers
  (:mod:`edgenode.requests`), and its writer;
- optional sources, loaded only when configured: the serial bridge
  (:mod:`edgenode.bridge`, with :mod:`edgenode.devices`), discovery, the
  control socket, the MQTT uplink.

This module builds them, runs them in one task group, and offers the API.
An application message goes from ``send()`` to its connection's outbox in
one synchronous step when there is room, and waits for room otherwise: it
never crosses the dispatcher.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from firmware_bridge.cbor import encode as cbor_encode

from .addresses import LOCAL, split_address
from .api import Handler, Incoming, NodeEvent, PeerDown, PeerSnapshot, PeerUp, Refused
from .config import NodeConfig
from .connection import Connection
from .datapath import DataPath
from .devices import DeviceRouter, frame_of
from .dispatcher import HOUSEKEEPING_S, Dispatcher
from .errors import (
    ConfigError,
    EdgeNodeError,
    InvalidArgument,
    ListenError,
    NodeClosed,
    PeerUnavailable,
    RequestTimeout,
)
from .handshake import Handshakes
from .identity import Identity, client_context, load_authorised, load_identity, parse_node_id
from .inbox import AddPeer, Inbox, Shutdown
from .keepalive import Keepalive
from .learning import PeerLearning
from .mailbox import WAIT
from .proto.framing import encode_frame
from .proto.messages import DeviceRequest, Limits, ToDevice, encode_data, encode_request
from .registry import UP, Registry, ip_sort_key, normalise_ip
from .requests import Requests
from .subscriptions import EventFeed, Stream, Subscriptions, check_policy, check_size

if TYPE_CHECKING:
    from .bridge import SerialBridge
    from .transports.discovery import DiscoveryWiring

__all__ = [
    "Handler",
    "Incoming",
    "Node",
    "NodeEvent",
    "PeerDown",
    "PeerSnapshot",
    "PeerUp",
    "Refused",
    "Stream",
]

log = logging.getLogger("edgenode.node")

monotonic = time.monotonic
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_RETRYABLE_LISTEN = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)
#: Pings due within this share of an interval go out together: one wake-up
#: for many idle peers.
_PING_SLACK = 0.05
#: send_many joins frames into outbox items of about this size.
_CHUNK_BYTES = 64 * 1024
#: Every node answers requests on this topic with its peer table.
PEERS_TOPIC = "edgenode/peers"


class Node:
    """A running edgenode: ``async with Node(config) as node: ...``.

    On entry it loads its identity, starts listening and dials the
    configured peers; on exit it says bye to every peer and closes within
    ``config.shutdown_grace_s``. :meth:`aclose` stops it from any task.
    """

    def __init__(self, config: NodeConfig, *, identity: Identity | None = None) -> None:
        self.config = config = config.validate()
        self.identity = identity if identity is not None else load_identity(config.state_dir)
        self.node_id = self.identity.node_id
        if config.authorised is not None:
            self.authorised = frozenset(parse_node_id(i) for i in config.authorised)
        else:
            self.authorised = load_authorised(os.path.join(config.state_dir, "authorised_nodes"))
        #: A new random epoch per process: peers see a restart as a new session.
        self.epoch = random.getrandbits(62)
        self.listen_port = config.listen_port
        self._wildcard = config.listen_host in _WILDCARD_HOSTS
        our_ip = "0.0.0.0" if self._wildcard else normalise_ip(config.listen_host)
        self._limits = Limits(max_frame_bytes=config.max_frame_bytes)
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
            ping_slack_s=config.keepalive_interval_s * _PING_SLACK,
        )
        self.inbox = Inbox(config.inbox_size)
        self.subscriptions = Subscriptions(stall_timeout_s=config.subscriber_stall_timeout_s)
        self._events = EventFeed()
        self.requests = Requests(
            max_pending=config.max_pending_requests,
            max_inflight=config.max_inflight_handlers,
            handler_timeout_s=config.handler_timeout_s,
            traffic=self._traffic,
        )
        self.requests.handlers[PEERS_TOPIC] = self._peers_handler
        self.learning = PeerLearning(
            node_id=self.node_id,
            registry=self.registry,
            keepalive=self.keepalive,
            is_authorised=self.authorised.__contains__,
            learn_from_peers=config.learn_peers,
            state_dir=config.state_dir if config.remember_peers else None,
            max_known_peers=config.max_known_peers,
        )
        self.devices = DeviceRouter(
            node_id=self.node_id,
            address=lambda: self.address,
            registry=self.registry,
            subscriptions=self.subscriptions,
            events=self._events,
            requests=self.requests,
            inbox=self.inbox,
            queue_to_peers=lambda frame, droppable: self.dispatcher.queue_to_peers(
                frame, droppable
            ),
            schedule=lambda when, callback: self.dispatcher.schedule(when, callback),
            task_group=lambda: self._tg,
        )
        self.devices.resolve_node = self._resolve_node
        self.dispatcher = Dispatcher(
            config=config,
            registry=self.registry,
            keepalive=self.keepalive,
            inbox=self.inbox,
            events=self._events,
            requests=self.requests,
            learning=self.learning,
            devices=self.devices,
            start_dial=self._start_dial,
            spawn=self._spawn,
            wildcard=self._wildcard,
            max_peers_listed=self._limits.max_peers_listed,
        )
        self.devices.on_up = self.dispatcher.wake
        self.datapath = DataPath(
            subscriptions=self.subscriptions,
            requests=self.requests,
            inbox=self.inbox,
            keepalive=self.keepalive,
            devices=self.devices,
            on_all_closed=self._all_closed_now,
        )
        self.dispatcher.on_all_closed = self._all_closed_now
        self.dispatcher.open_connections = lambda: self.datapath.open_connections
        self.handshakes = Handshakes(
            config=config,
            identity=self.identity,
            is_authorised=self.authorised.__contains__,
            limits=self._limits,
            epoch=self.epoch,
            inbox=self.inbox,
            run_connection=self.datapath.run,
            client_context=client_context(self.identity),
        )
        self.discovery: DiscoveryWiring | None = None
        self.bridge: SerialBridge | None = None
        if config.serial_ports:
            from .bridge import SerialBridge  # pyserial and the link load only when needed

            self.bridge = SerialBridge(self.devices, config, self.node_id, self.inbox.post)
            self.devices.bridge = self.bridge
            for event_type, handler in self.bridge.handlers().items():
                self.dispatcher.register(event_type, handler)
        #: The MQTT uplink when configured (edgenode.uplink; loaded only then).
        self.uplink: Any = None
        self._tg: Any = None
        self._outer: Any = None
        self._owner: int | None = None
        self._listener_scope: anyio.CancelScope | None = None
        self._all_closed: anyio.Event | None = None
        self._ran: anyio.Event | None = None
        self._closing = False
        self._closed = False
        self._started = 0.0
        #: Sends that waited for room in a peer's outbox (backpressure), and how long.
        self.send_waits = 0
        self.send_waited_s = 0.0

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        if not self.authorised:
            log.warning(
                "no authorised nodes: every peer will be refused "
                "(add IDs with: edgenode authorise NODE_ID)"
            )
        self._listener_scope = anyio.CancelScope()
        self._all_closed = anyio.Event()
        self._ran = anyio.Event()
        # The node's tasks run in a task group of a runner task of their own,
        # so that aclose() can stop them from any task; only leaving the
        # ``async with`` block exits this outer group, in the task that
        # entered it (anyio requires that).
        self._owner = anyio.get_current_task().id
        outer = anyio.create_task_group()
        await outer.__aenter__()
        try:
            await outer.start(self._run)
        except BaseException:
            outer.cancel_scope.cancel()
            await outer.__aexit__(None, None, None)
            raise
        self._outer = outer
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        await self.aclose()
        outer, self._outer = self._outer, None
        if outer is not None:
            await outer.__aexit__(None, None, None)
        return None

    async def _run(self, *, task_status: TaskStatus[None]) -> None:
        failed: EdgeNodeError | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    await self._start(tg)
                except EdgeNodeError as exc:
                    # Raised from outside the task group, so that the caller
                    # gets the error itself, not a group of one.
                    failed = exc
                    tg.cancel_scope.cancel()
                else:
                    task_status.started()
        finally:
            assert self._ran is not None
            self._ran.set()
        if failed is not None:
            self._tg = None
            raise failed

    async def _start(self, tg: Any) -> None:
        config = self.config
        if config.control_socket is not None:
            from .control import serve_control

            await tg.start(serve_control, self, config.control_socket)
        try:
            listener = await anyio.create_tcp_listener(
                local_host=None if self._wildcard else config.listen_host,
                local_port=config.listen_port,
            )
        except OSError as exc:
            # Busy, or the address is not up yet (at boot): a restart may
            # succeed. Anything else (a privileged port, ...) is configuration.
            error = ListenError if exc.errno in _RETRYABLE_LISTEN else ConfigError
            raise error(
                f"cannot listen on {config.listen_host}:{config.listen_port}: "
                f"{exc.strerror or exc}"
            ) from None
        self.listen_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.handshakes.listen_port = self.listen_port
        if config.discovery:
            try:
                self.discovery = self._start_discovery()
            except ConfigError:
                await listener.aclose()
                raise
        self._started = monotonic()
        assert self._listener_scope is not None
        tg.start_soon(self.handshakes.serve, listener, self._listener_scope, tg)
        tg.start_soon(self.dispatcher.run)
        if self.discovery is not None:
            tg.start_soon(self.discovery.run)
        if self.bridge is not None:
            for port in self.bridge.ports:
                tg.start_soon(self.bridge.run_port, port)
        if config.uplink is not None:
            from .uplink import Uplink  # the MQTT client library loads only here

            self.uplink = Uplink(self, config.uplink)
            tg.start_soon(self.uplink.run)
        now = monotonic()
        for host, port in config.peers:
            ip = normalise_ip(host)
            self.registry.add_configured(ip, port, now)
            self.keepalive.schedule_dial(ip, now)
        self.learning.dial_known(now)
        self.dispatcher.schedule(now + HOUSEKEEPING_S, self.dispatcher.housekeeping)
        if self.discovery is not None:
            self.dispatcher.schedule(self.discovery.first_due(now), self._beacon)
        log.info(
            "node %s listening on %s:%d (%s configured, %d authorised)",
            self.node_id,
            config.listen_host,
            self.listen_port,
            _count(len(config.peers), "peer"),
            len(self.authorised),
        )

    async def aclose(self) -> None:
        """Say bye to every peer and stop, within ``shutdown_grace_s``.

        Idempotent, and callable from any task; a second caller waits for
        the first to finish.
        """
        if self._tg is None:
            return
        if self._closing:
            assert self._ran is not None
            await self._ran.wait()
            return
        self._closing = True
        assert self._listener_scope is not None and self._all_closed is not None
        self._listener_scope.cancel()
        grace = self.config.shutdown_grace_s
        if self.uplink is not None:
            with anyio.move_on_after(grace):
                await self.uplink.aclose()
        self.datapath.closing = True
        with anyio.move_on_after(grace):
            await self.inbox.post(Shutdown())
            await self._all_closed.wait()
        self.dispatcher.fail_everything()
        self._tg.cancel_scope.cancel()
        assert self._ran is not None
        await self._ran.wait()
        self.inbox.box.close(NodeClosed("node is closed"))
        if self.discovery is not None:
            await self.discovery.aclose()
        final = self.learning.final_save()
        if final is not None:
            with anyio.CancelScope(shield=True):
                await self.learning.save(final)
        self._closed = True
        log.info("node %s stopped", self.node_id)

    def _all_closed_now(self) -> None:
        if self._all_closed is not None:
            self._all_closed.set()

    def _spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._tg is not None and not self._closed:
            self._tg.start_soon(func, *args)

    def _start_dial(self, ip: str, port: int) -> None:
        self._spawn(self.handshakes.dial, ip, port)

    def _beacon(self, now: float) -> None:
        if self.discovery is not None:
            due = self.discovery.on_timer(now)
            if due is not None:
                self.dispatcher.schedule(due, self._beacon)

    def _start_discovery(self) -> DiscoveryWiring:
        from .transports.discovery import Discovery, wire_discovery

        config = self.config
        wiring = wire_discovery(
            self.inbox.post,
            self.learning,
            lambda: self._closing,
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
        self.dispatcher.register(wiring.event_type, wiring.on_beacon)
        return wiring

    # -- sending ---------------------------------------------------------------------

    async def send(
        self, peer: str, topic: str, payload: bytes, *, wait_s: float | None = None
    ) -> None:
        """Send a message to ``peer``: an IP, a node ID, or ``ip/device`` for a
        microcontroller bridged by the node at ``ip``.

        Delivery: while the peer stays connected, every message ``send``
        returned for reaches each of the peer's subscriptions to ``topic``
        exactly once and in the order sent (docs/architecture.md,
        "Delivery"). When the peer's connection is full (the peer, or a
        subscriber of its, is slower than this sender), the call waits for
        room: nothing is dropped. It is queued on the connection in one
        step when there is room, without waiting.

        Raises :class:`PeerUnavailable` at once if the peer is not
        connected, or, with ``wait_s``, after waiting that long for it to
        (re)connect; also if it goes down while the call waits for room.
        Raises :class:`InvalidArgument` for a bad topic, payload or address
        and :class:`NodeClosed` once the node is closing.
        """
        topic, payload = self._check_topic(topic), self._check_payload(payload)
        ip, device = await self._up_peer(peer, wait_s)
        if device is None:
            await self._put(ip, encode_frame(encode_data(topic, payload)))
        elif self.devices.is_local(ip):
            await self.devices.send_local(device, topic, payload)
        else:
            await self._put(ip, frame_of(ToDevice(device, topic, payload)))

    async def send_many(self, peer: str, topic: str, payloads: Iterable[bytes]) -> int:
        """Send several messages on one topic to ``peer`` (an IP or node ID), in order.

        The same as :meth:`send` for each payload, with the same delivery,
        but checked all at once before any is queued and joined into as few
        outbox items and TLS writes as possible. Returns how many were
        sent. Raises :class:`InvalidArgument` (also for a device address:
        use :meth:`send`) or :class:`PeerUnavailable`.
        """
        topic = self._check_topic(topic)
        frames = [encode_frame(encode_data(topic, self._check_payload(p))) for p in payloads]
        if split_address(peer)[1] is not None:
            raise InvalidArgument(f"peer {peer!r:.60}: send_many does not address devices")
        ip, _ = await self._up_peer(peer, None)
        chunk: list[bytes] = []
        size = 0
        for frame in frames:
            chunk.append(frame)
            size += len(frame)
            if size >= _CHUNK_BYTES:
                await self._put(ip, b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            await self._put(ip, b"".join(chunk))
        return len(frames)

    async def broadcast(self, topic: str, payload: bytes) -> int:
        """Send a best-effort message to every connected peer; return to how many.

        Best effort: a peer whose connection is full does not get it; each
        such drop is counted (``broadcast_dropped`` in :meth:`stats`, the
        peer's ``drops`` in :meth:`peers`). Use :meth:`send` per peer to
        wait for room instead.
        """
        frame = encode_frame(encode_data(self._check_topic(topic), self._check_payload(payload)))
        self._check_open()
        sent = 0
        now = monotonic()
        for conn in list(self.dispatcher.conns):
            if not conn.settled:
                continue
            if conn.queue_nowait(frame, droppable=True):
                self.keepalive.sent(conn.ip, now)
                sent += 1
            else:
                self.dispatcher.broadcast_dropped += 1
        await anyio.lowlevel.checkpoint()
        return sent

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

        Raises :class:`PeerUnavailable` (down, or went down before
        answering), :class:`RequestTimeout`, :class:`RemoteError` (the
        peer's handler failed, timed out, or none exists) or
        :class:`TooManyPending`.
        """
        self._check_topic(topic)
        payload = self._check_payload(payload)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidArgument(f"timeout: expected a number > 0, got {timeout!r}")
        ip, device = await self._up_peer(peer, wait_s)
        requests = self.requests
        pending = requests.open(ip, topic, timeout, device)
        try:
            rid = pending.request_id
            if device is not None and self.devices.is_local(ip):
                self.devices.request_local(pending, payload)
            else:
                if device is None:
                    frame = encode_frame(encode_request(rid, topic, payload))
                else:
                    frame = frame_of(DeviceRequest(rid, device, topic, payload))
                conn = await self._put(ip, frame)
                requests.attach(pending, conn)
            with anyio.move_on_after(timeout):
                await pending.done.wait()
            if not pending.done.is_set():
                raise RequestTimeout(
                    f"no response from {peer} to request {rid} on {topic!r} within {timeout} s"
                )
            if pending.error is not None:
                raise pending.error
            assert pending.result is not None
            return pending.result
        finally:
            requests.close(pending)

    async def publish_local(self, topic: str, payload: bytes, *, source: str = "local") -> int:
        """Deliver a message to this node's own subscribers, as if it had
        arrived from ``source`` (for example ``"mqtt"`` for the uplink).

        Waits for room in full subscriptions, as a connection's reader does.
        Returns how many subscriptions it reached. Raises
        :class:`InvalidArgument` for a bad topic or payload and
        :class:`NodeClosed` once the node is closing.
        """
        topic, payload = self._check_topic(topic), self._check_payload(payload)
        self._check_open()
        return await self.subscriptions.deliver(Incoming(source, self.node_id, topic, payload))

    async def add_peer(self, host: str, port: int) -> None:
        """Dial ``host:port`` now and keep it connected, as a configured peer."""
        self._check_open()
        try:
            ip = normalise_ip(host)
        except EdgeNodeError:
            raise InvalidArgument(f"host: expected an ip address, got {host!r:.60}") from None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
            raise InvalidArgument(f"port: expected 1..65535, got {port!r}")
        await self.inbox.post(AddPeer(ip, port))

    # -- receiving -------------------------------------------------------------------

    def subscribe(self, topic: str, *, on_full: str = WAIT, buffer: int | None = None) -> Stream:
        """Receive data messages on ``topic`` (``prefix/#`` or ``#`` for many).

        Returns a :class:`Stream` of :class:`Incoming`. With the default
        ``on_full="wait"`` nothing is ever dropped: when the stream is full
        the connections feeding it pause, and their senders wait. A stream
        that takes nothing for ``subscriber_stall_timeout_s`` while a
        message waits for it is ended with :class:`SubscriberStalled`.
        ``on_full="drop-oldest"`` or ``"drop-newest"`` keeps the senders
        going instead and counts what it drops (``stream.dropped``).
        ``buffer`` sets its size (``subscription_buffer`` by default).
        """
        self._check_open()
        check_policy(on_full)
        size = check_size(buffer) if buffer is not None else self.config.subscription_buffer
        return self.subscriptions.subscribe(self._check_topic(topic), size, on_full)

    def on_message(self, topic: str, callback: Callable[[Incoming], Awaitable[None]]) -> Stream:
        """Run ``await callback(msg)`` for each message on ``topic``, in order.

        The callback runs in its own task, never in the dispatcher; an
        exception from it is logged and the subscription carries on.
        """
        sub = self.subscribe(topic)

        async def consume() -> None:
            async for msg in sub:
                try:
                    await callback(msg)
                except Exception:
                    log.exception("message callback for %r failed", topic)

        self._spawn(consume)
        return sub

    def handle(self, topic: str, handler: Handler) -> None:
        """Answer requests on ``topic`` with ``await handler(request)`` (bytes).

        A handler runs in a task of its own, for at most
        ``handler_timeout_s``, and is cancelled if the asking peer's
        connection closes.
        """
        self.requests.handlers[self._check_topic(topic)] = handler

    def events(self) -> Stream:
        """A stream of :class:`PeerUp`, :class:`PeerDown` and :class:`Refused`.

        The node never waits for it: when it is full its oldest event is
        dropped and counted (``stream.dropped``).
        """
        return self._events.open(self.config.subscription_buffer)

    # -- what the node knows -------------------------------------------------------------

    def peers(self) -> list[PeerSnapshot]:
        """A snapshot of the registry, one row per known peer, sorted by IP.

        Devices on this node's serial ports follow, one row each, with
        ``ip`` set to their address (``ip/device``) and direction "serial".
        """
        now = monotonic()
        rows = []
        for entry in sorted(self.registry, key=lambda e: ip_sort_key(e.ip)):
            live = self.keepalive.liveness(entry.ip, now)
            conn = entry.conn if isinstance(entry.conn, Connection) else None
            if entry.state != UP:
                state = "down"
            else:
                state = "up" if conn is not None and conn.settled else "connecting"
            redial = self.keepalive.pending_dial(entry.ip) if entry.state != UP else None
            paused = conn.paused_since if conn is not None else None
            rows.append(
                PeerSnapshot(
                    ip=entry.ip,
                    node_id=entry.node_id,
                    state=state,
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
                    devices=self.devices.remote.get(entry.ip, ()),
                    queued=len(conn.outbox) if conn else 0,
                    paused_s=None if paused is None else now - paused,
                    redial_in_s=None if redial is None else max(0.0, redial - now),
                )
            )
        if self.bridge is not None:
            rows.extend(self.bridge.snapshot(now))
        return rows

    def stats(self) -> dict[str, Any]:
        """Node figures: uptime, loop lag, events and wake-ups, peers by state,
        and every count of something not delivered."""
        rows = [e for e in self.registry if e.state == UP]
        up = sum(1 for e in rows if isinstance(e.conn, Connection) and e.conn.settled)
        d = self.dispatcher
        subs = self.subscriptions
        return {
            "node_id": self.node_id,
            "uptime_s": monotonic() - self._started if self._started else 0.0,
            "loop_lag_last_ms": d.lag_last_s * 1000,
            "loop_lag_max_ms": d.lag_max_s * 1000,
            "loop_lag_avg_ms": d.lag_sum_s * 1000 / max(1, d.events_handled),
            "events_handled": d.events_handled,
            "wakeups": d.wakeups,
            "peers_up": up,
            "peers_connecting": len(rows) - up,
            "peers_down": len(self.registry) - len(rows),
            "send_waits": self.send_waits,
            "send_waited_s": self.send_waited_s,
            "pending_requests": self.requests.pending,
            "handlers_running": self.requests.inflight,
            "handler_timeouts": self.requests.handler_timeouts,
            "answers_dropped": self.requests.answers_dropped,
            "subscriptions": sum(1 for _ in subs),
            "unrouted_messages": subs.unrouted,
            "subscriptions_stalled": subs.stalled,
            "subscription_drops": sum(s.dropped for s in subs),
            "readers_waited_s": subs.waited_s,
            "event_drops": self._events.dropped,
            "broadcast_dropped": d.broadcast_dropped,
            "device_messages_lost": self.devices.lost,
            "refused_connections": d.refused,
        }

    @property
    def address(self) -> str:
        """This node's IP as its devices are addressed (``local`` on a wildcard listener)."""
        return LOCAL if self._wildcard else self.registry.our_ip

    def device_address(self, device_id: str) -> str:
        """The address of a device on this node's serial ports."""
        return self.devices.device_address(device_id)

    # -- helpers -----------------------------------------------------------------------

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
        return payload if type(payload) is bytes else bytes(payload)

    def _resolve_node(self, node: str) -> str:
        """An IP for the node part of an address: itself, or where a node ID is."""
        try:
            return normalise_ip(node)
        except EdgeNodeError:
            pass
        entry = self.registry.by_node_id(node)
        if entry is None:
            raise PeerUnavailable(f"node {node} is not known to this node")
        return entry.ip

    def _live(self, ip: str) -> Connection | None:
        """The settled connection of the peer at ``ip``, or None."""
        entry = self.registry.get(ip)
        conn = entry.conn if entry is not None else None
        if isinstance(conn, Connection) and conn.settled and not conn.closing:
            return conn
        return None

    def _is_up(self, ip: str, device: str | None) -> bool:
        if device is None:
            return self._live(ip) is not None
        return self.devices.is_up(ip, device)

    async def _up_peer(self, peer: str, wait_s: float | None) -> tuple[str, str | None]:
        self._check_open()
        node, device = split_address(peer)
        ip = self.address if node == LOCAL else self._resolve_node(node)
        if self._is_up(ip, device):
            return ip, device
        key = ip if device is None else f"{ip}/{device}"
        if wait_s:
            with anyio.move_on_after(wait_s):
                while not self._is_up(ip, device):
                    waiter = self.dispatcher.waiter(key)
                    try:
                        await waiter.wait()
                    finally:
                        self.dispatcher.forget_waiter(key, waiter)
                    self._check_open()
            if self._is_up(ip, device):
                return ip, device
        waited = f" after waiting {wait_s} s" if wait_s else ""
        if device is not None:
            where = "this node" if self.devices.is_local(ip) else ip
            raise PeerUnavailable(f"device {device} is not connected to {where}{waited}")
        entry = self.registry.get(ip)
        if entry is None:
            raise PeerUnavailable(f"peer {ip} is not connected (never seen)")
        if entry.state == UP:
            why = "connecting: waiting for its ready"
        else:
            why = entry.down_reason or "not connected yet"
        raise PeerUnavailable(f"peer {ip} is not connected{waited} ({why})")

    async def _put(self, ip: str, frame: bytes) -> Connection:
        """Queue ``frame`` on the live connection to ``ip``; return that connection.

        One synchronous step when the outbox has room. Otherwise waits for
        room; if the connection is replaced meanwhile, carries on with the
        one that replaced it (which sends what the old one held first).
        """
        conn = self._live(ip)
        if conn is None:
            await self._up_peer(ip, None)  # raises, saying why
            conn = self._live(ip)
            assert conn is not None
        if conn.outbox.put_nowait(frame):
            self.keepalive.sent(ip, monotonic())
            return conn
        started = monotonic()
        self.send_waits += 1
        try:
            return await self._put_waiting(ip, conn, frame)
        finally:
            self.send_waited_s += monotonic() - started

    async def _put_waiting(self, ip: str, conn: Connection, frame: bytes) -> Connection:
        while True:
            await conn.outbox.wait_room()
            if conn.closing:
                reason = conn.close_reason
                conn = self._live(ip)
                if conn is None:
                    entry = self.registry.get(ip)
                    if entry is not None and entry.state == UP and not self._closing:
                        # Replaced by a connection that is settling now.
                        await self._up_peer(ip, self.config.handshake_timeout_s)
                        conn = self._live(ip)
                if conn is None:
                    raise PeerUnavailable(
                        f"peer {ip} went down while the send waited for room: {reason}"
                    )
            if conn.outbox.put_nowait(frame):
                self.keepalive.sent(ip, monotonic())
                return conn

    def _traffic(self, conn: Connection) -> None:
        self.keepalive.sent(conn.ip, monotonic())

    async def _peers_handler(self, request: Incoming) -> bytes:
        """The built-in ``edgenode/peers`` topic (docs/protocol.md, "Built-in topics")."""
        return cbor_encode(
            [
                [
                    p.ip,
                    p.node_id,
                    p.state,
                    p.direction,
                    p.down_reason,
                    None if p.rtt_s is None else round(p.rtt_s * 1e6),
                ]
                for p in self.peers()
            ]
        )


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"
