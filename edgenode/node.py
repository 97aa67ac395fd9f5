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
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from .addresses import LOCAL, split_address
from .api import Handler, Incoming, NodeEvent, PeerDown, PeerSnapshot, PeerUp, Refused
from .config import NodeConfig, check_peer_host
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
    RequestTimeout,
)
from .handshake import Handshakes
from .identity import Identity, client_context, load_identity
from .inbox import AddPeer, Inbox, Revoked, Shutdown
from .ips import is_ip, normalise_ip
from .keepalive import Keepalive
from .learning import PeerLearning
from .mailbox import WAIT
from .names import PeerNames
from .proto.framing import encode_frame
from .proto.messages import DeviceRequest, Limits, ToDevice, encode_data, encode_request
from .refusals import RefusalLog
from .registry import Registry
from .requests import Requests
from .sending import Sending
from .snapshot import PEERS_TOPIC, node_figures, peer_rows, peers_answer
from .subscriptions import EventFeed, Stream, Subscriptions, check_policy, check_size
from .trust import Trust, TrustChange, authorised_path

if TYPE_CHECKING:
    from .bridge import SerialBridge
    from .systemd import SystemdNotifier
    from .transports.discovery import DiscoveryWiring

# The public types, importable from here as before (their home is edgenode.api).
__all__ = ["Handler", "Incoming", "Node", "NodeEvent", "PeerDown", "PeerSnapshot"]
__all__ += ["PeerUp", "Refused", "Stream"]

log = logging.getLogger("edgenode.node")

monotonic = time.monotonic
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_RETRYABLE_LISTEN = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)
#: Pings due within this share of an interval go out together: one wake-up
#: for many idle peers.
_PING_SLACK = 0.05
#: send_many joins frames into outbox items of about this size.
_CHUNK_BYTES = 64 * 1024


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
        #: Whom the node trusts; :meth:`reload_trust` re-reads its file.
        self.trust = Trust(config.authorised, authorised_path(config.state_dir))
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
        #: Refused connections and failed inbound handshakes: exact counts, and
        #: the ration of log lines about them (edgenode.refusals).
        self.refusals = RefusalLog()
        self.subscriptions = Subscriptions(stall_timeout_s=config.subscriber_stall_timeout_s)
        self._events = EventFeed()
        self.requests = Requests(
            max_pending=config.max_pending_requests,
            max_inflight=config.max_inflight_handlers,
            handler_timeout_s=config.handler_timeout_s,
            traffic=self._traffic,
        )
        self.requests.handlers[PEERS_TOPIC] = lambda request: peers_answer(self)
        self.learning = PeerLearning(
            node_id=self.node_id,
            registry=self.registry,
            keepalive=self.keepalive,
            is_authorised=self.trust.allows,
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
        self.names = PeerNames(
            registry=self.registry,
            keepalive=self.keepalive,
            spawn=self._spawn,
            post=self.inbox.post,
            timeout_s=2 * config.handshake_timeout_s,
            prefer_family=socket.AF_INET6 if ":" in our_ip else socket.AF_INET,
            our_ip=lambda: self.registry.our_ip,
        )
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
            refusals=self.refusals,
            names=self.names,
            is_authorised=self.trust.allows,
        )
        self.devices.on_up = self.dispatcher.wake
        self.sending = Sending(
            limits=self._limits,
            registry=self.registry,
            keepalive=self.keepalive,
            dispatcher=self.dispatcher,
            devices=self.devices,
            address=lambda: self.address,
            is_closing=lambda: self._closing or self._tg is None,
            settle_wait_s=config.handshake_timeout_s,
        )
        self.devices.sending = self.sending
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
            is_authorised=self.trust.allows,
            limits=self._limits,
            epoch=self.epoch,
            inbox=self.inbox,
            run_connection=self.datapath.run,
            client_context=client_context(self.identity),
            refusals=self.refusals,
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
        #: systemd's notify socket, under a Type=notify unit (edgenode.systemd,
        #: loaded only then; a bad $NOTIFY_SOCKET or $WATCHDOG_USEC raises
        #: ConfigError here, before anything starts).
        self.systemd: SystemdNotifier | None = None
        if os.environ.get("NOTIFY_SOCKET"):
            from .systemd import SystemdNotifier

            self.systemd = SystemdNotifier.from_environ(
                os.environ, pid=os.getpid(), max_lag_s=config.keepalive_timeout_s
            )
        self._tg: Any = None
        self._outer: Any = None
        self._listener_scope: anyio.CancelScope | None = None
        self._all_closed: anyio.Event | None = None
        self._ran: anyio.Event | None = None
        self._closing = False
        self._closed = False
        self._started = 0.0

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
                f"cannot listen on {config.listen_host}:{config.listen_port}: {exc.strerror or exc}"
            ) from None
        self.listen_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.handshakes.listen_port = self.listen_port
        if config.discovery:
            try:
                from .transports.discovery import discovery_for

                self.discovery = discovery_for(
                    config,
                    self.node_id,
                    self.listen_port,
                    self.epoch,
                    wildcard=self._wildcard,
                    is_authorised=self.trust.allows,
                    post=self.inbox.post,
                    learner=self.learning,
                    is_closing=lambda: self._closing,
                )
                self.dispatcher.register(self.discovery.event_type, self.discovery.on_beacon)
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
            if is_ip(host):
                entry = self.registry.add_configured(host, port, now)
                self.keepalive.schedule_dial(entry.ip, now)
            else:  # a host name: resolved off the dispatcher, before each dial
                self.names.add(host, port, now)
        self.learning.dial_known(now)
        self.dispatcher.schedule(now + HOUSEKEEPING_S, self.dispatcher.housekeeping)
        if self.discovery is not None:
            self.discovery.start_beacons(self.dispatcher.schedule)
        log.info(
            "node %s listening on %s:%d (%s configured, %d authorised)",
            self.node_id,
            config.listen_host,
            self.listen_port,
            _count(len(config.peers), "peer"),
            len(self.authorised),
        )
        if self.systemd is not None:
            # READY=1 now that we listen; STATUS= when the peer count changes;
            # WATCHDOG=1 from the dispatcher's timers while its lag is bounded.
            self.dispatcher.on_peer_count = self.systemd.peer_count
            self.systemd.start_watchdog(self.dispatcher, monotonic())
            self.systemd.ready(len(self.registry))

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
        # Shielded: a caller cancelled meanwhile must not leave the node half
        # stopped. Every wait below is bounded by the grace period or is quick.
        with anyio.CancelScope(shield=True):
            await self._shut_down()
        self._closed = True
        log.info("node %s stopped", self.node_id)

    async def _shut_down(self) -> None:
        assert self._listener_scope is not None and self._all_closed is not None
        assert self._tg is not None and self._ran is not None
        if self.systemd is not None:
            self.systemd.stopping()
        self._listener_scope.cancel()
        grace = self.config.shutdown_grace_s
        if self.uplink is not None:
            with anyio.move_on_after(grace):
                try:
                    await self.uplink.aclose()
                except Exception:  # a bug in the uplink must not keep the node up
                    log.exception("closing the uplink failed")
        self.datapath.closing = True
        with anyio.move_on_after(grace):
            await self.inbox.post(Shutdown())
            await self._all_closed.wait()
        self.dispatcher.fail_everything()
        self._tg.cancel_scope.cancel()
        await self._ran.wait()
        self.inbox.box.close(NodeClosed("node is closed"))
        if self.discovery is not None:
            await self.discovery.aclose()
        final = self.learning.final_save()
        if final is not None:
            await self.learning.save(final)
        if self.systemd is not None:
            self.systemd.close()

    def _all_closed_now(self) -> None:
        if self._all_closed is not None:
            self._all_closed.set()

    def _spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._tg is not None and not self._closed:
            self._tg.start_soon(func, *args)

    def _start_dial(self, ip: str, port: int) -> None:
        self._spawn(self.handshakes.dial, ip, port)

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
        topic, payload = self.sending.check_topic(topic), self.sending.check_payload(payload)
        ip, device = await self.sending.up_peer(peer, wait_s)
        if device is None:
            await self.sending.put(ip, encode_frame(encode_data(topic, payload)))
        elif self.devices.is_local(ip):
            await self.devices.send_local(device, topic, payload)
        else:
            await self.sending.put(ip, frame_of(ToDevice(device, topic, payload)))

    async def send_many(self, peer: str, topic: str, payloads: Iterable[bytes]) -> int:
        """Send several messages on one topic to ``peer`` (an IP or node ID), in order.

        The same as :meth:`send` for each payload, with the same delivery,
        but checked all at once before any is queued and joined into as few
        outbox items and TLS writes as possible. Returns how many were
        sent. Raises :class:`InvalidArgument` (also for a device address:
        use :meth:`send`) or :class:`PeerUnavailable`.
        """
        topic = self.sending.check_topic(topic)
        frames = [encode_frame(encode_data(topic, self.sending.check_payload(p))) for p in payloads]
        if split_address(peer)[1] is not None:
            raise InvalidArgument(f"peer {peer!r:.60}: send_many does not address devices")
        ip, _ = await self.sending.up_peer(peer, None)
        chunk: list[bytes] = []
        size = 0
        for frame in frames:
            chunk.append(frame)
            size += len(frame)
            if size >= _CHUNK_BYTES:
                await self.sending.put(ip, b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            await self.sending.put(ip, b"".join(chunk))
        return len(frames)

    async def broadcast(self, topic: str, payload: bytes) -> int:
        """Send a best-effort message to every connected peer; return to how many.

        Best effort: a peer whose connection is full does not get it; each
        such drop is counted (``broadcast_dropped`` in :meth:`stats`, the
        peer's ``drops`` in :meth:`peers`). Use :meth:`send` per peer to
        wait for room instead.
        """
        checks = self.sending
        frame = encode_frame(encode_data(checks.check_topic(topic), checks.check_payload(payload)))
        self.sending.check_open()
        sent, dropped = self.sending.queue_to_all(frame)
        self.dispatcher.broadcast_dropped += dropped
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
        self.sending.check_topic(topic)
        payload = self.sending.check_payload(payload)
        self.sending.check_timeout(timeout)
        ip, device = await self.sending.up_peer(peer, wait_s)
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
                conn = await self.sending.put(ip, frame)
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
        topic, payload = self.sending.check_topic(topic), self.sending.check_payload(payload)
        self.sending.check_open()
        return await self.subscriptions.deliver(Incoming(source, self.node_id, topic, payload))

    async def add_peer(self, host: str, port: int) -> None:
        """Dial ``host:port`` now and keep it connected, as a configured peer.

        ``host`` is an IP address or a host name; a name is resolved by the
        system resolver, off the node's loop, and again before each redial.
        Raises :class:`InvalidArgument` for a host that is neither, or a
        port outside 1..65535.
        """
        self.sending.check_open()
        try:
            host = check_peer_host(host, "host")
        except EdgeNodeError as exc:
            raise InvalidArgument(str(exc)) from None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
            raise InvalidArgument(f"port: expected 1..65535, got {port!r}")
        await self.inbox.post(AddPeer(normalise_ip(host) if is_ip(host) else host, port))

    @property
    def authorised(self) -> frozenset[str]:
        """The node IDs this node trusts now (docs/architecture.md, "Trust")."""
        return self.trust.ids

    async def reload_trust(self) -> TrustChange:
        """Read the state directory's ``authorised_nodes`` file again and trust
        what it lists, besides ``config.authorised``.

        Connections of nodes no longer trusted are closed, with the reason
        "node ... is no longer authorised"; newly trusted nodes are accepted
        from now on. Raises :class:`ConfigError` for a bad file, and then
        changes nothing.
        """
        from anyio import to_thread  # loaded by the first reload only

        self.sending.check_open()
        ids = await to_thread.run_sync(self.trust.read)
        change = self.trust.replace(ids)
        log.info(
            "trust reloaded from %s: %d authorised (%d added, %d removed)",
            self.trust.path,
            len(ids),
            len(change.added),
            len(change.removed),
        )
        if change.removed:
            await self.inbox.post(Revoked(change.removed))
        return change

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
        self.sending.check_open()
        check_policy(on_full)
        size = check_size(buffer) if buffer is not None else self.config.subscription_buffer
        return self.subscriptions.subscribe(self.sending.check_topic(topic), size, on_full)

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
        self.requests.handlers[self.sending.check_topic(topic)] = handler

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
        return peer_rows(self)

    def stats(self) -> dict[str, Any]:
        """Node figures: uptime, loop lag, events and wake-ups, peers by state,
        and every count of something not delivered."""
        figures = node_figures(self, self._started)
        if self.systemd is not None:
            figures.update(self.systemd.figures())
        return figures

    @property
    def event_drops(self) -> int:
        """Node events dropped by event streams whose consumers fell behind."""
        return self._events.dropped

    @property
    def address(self) -> str:
        """This node's IP as its devices are addressed (``local`` on a wildcard listener)."""
        return LOCAL if self._wildcard else self.registry.our_ip

    def device_address(self, device_id: str) -> str:
        """The address of a device on this node's serial ports."""
        return self.devices.device_address(device_id)

    def _traffic(self, conn: Connection) -> None:
        self.keepalive.sent(conn.ip, monotonic())


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"
