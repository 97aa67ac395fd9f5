"""The uplink: a source like the node's others, bridging chosen topics to an MQTT broker.

Started by the node when ``NodeConfig.uplink`` is set (``Uplink(node,
config)``, ``run()`` in the node's task group, ``aclose()`` before the node
says bye to its peers), it uses only the node's public API (the part named
by :class:`.node_view.Node`):

* **Out.** One subscription per ``out`` map. Its task maps each message to
  a broker topic and puts it in the store-and-forward queue (:mod:`.queue`,
  and the disk spool, :mod:`.spool`, when configured) in one synchronous
  step: the uplink never makes the node's subscriptions, and so its peers,
  wait for the broker. A full queue applies the chosen policy (drop oldest
  or refuse new), counted. QoS 0 messages are not kept for a broker that is
  away (at most once); they are counted as dropped while it is. Messages
  the uplink itself delivered from the broker are not sent back to it.
* **The connection** (:mod:`.client`): one at a time, opened again after
  any failure with capped, jittered exponential backoff (reset after a
  connection that lasted a keepalive interval), the reason logged once per
  change and kept in :meth:`status`. While connected, a publisher task
  hands queued messages to the connection, at most
  :data:`~.client.MAX_INFLIGHT` unacknowledged at once; an acknowledgement
  removes a message from the queue (and the spool). A lost connection puts
  the unacknowledged ones back at the front: at least once, in order.
* **In.** Messages from the broker matching an ``in`` map wait in a small
  buffer and are delivered in order by one task (this node's subscribers,
  the site, a peer or a device); each is acknowledged to the broker only
  once delivered. While the buffer is full the connection stops reading:
  the node's backpressure reaches the broker through TCP, nothing is
  dropped.
* **Availability.** ``{prefix}/status`` is ``online`` (retained) while
  connected, and ``offline`` when the node stops or, as the MQTT will,
  when the broker loses it; ``{prefix}/devices/<id>/status`` says the same
  of each microcontroller on this node's serial ports.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import EdgeNodeError, NodeClosed
from ..keepalive import Backoff
from .client import MAX_INFLIGHT, Session
from .config import (
    DEVICE_PREFIX,
    LOCAL,
    PEER_PREFIX,
    SITE,
    UplinkConfig,
    compile_routes,
    derived_queue_caps,
)
from .errors import BrokerUnavailable, SpoolError, UplinkError
from .node_view import Node
from .queue import Outgoing, OutQueue
from .spool import SPOOL_DIR_NAME, Spool
from .topics import InRoute, OutRoute, first_match, is_topic_name

if TYPE_CHECKING:
    from ..api import Incoming


log = logging.getLogger("edgenode.uplink")

#: The ``source`` of messages the uplink delivers on this node (``Incoming.peer``).
MQTT_SOURCE = "mqtt"
CONNECTED = "connected"
CONNECTING = "connecting"
ERROR = "error"
STOPPED = "stopped"
ONLINE = b"online"
OFFLINE = b"offline"
#: Inbound messages waiting for delivery before the connection stops
#: reading; it reads again below the low mark. One read may add a few more
#: (paho reads up to one packet per message in flight).
INBOUND_HIGH = 64
INBOUND_LOW = 32
_SPOOL_SYNC_S = 1.0


class _InMessage:
    __slots__ = ("mid", "payload", "qos", "route", "session", "topic")

    def __init__(
        self, session: Session, route: InRoute, topic: str, payload: bytes, qos: int, mid: int
    ) -> None:
        self.session, self.route, self.topic = session, route, topic
        self.payload, self.qos, self.mid = payload, qos, mid


class Uplink:
    """The node's MQTT uplink (see the module docstring)."""

    def __init__(self, node: Node, config: UplinkConfig) -> None:
        self.node = node
        self.config = config.validate()
        self.broker = config.parsed_broker
        self.client_id = config.client_id or f"edgenode-{node.node_id}"
        self.prefix, self.out_routes, self.in_routes = compile_routes(config, node.node_id)
        self.status_topic = f"{self.prefix}/status"
        derived_messages, derived_bytes = derived_queue_caps(node.config.memory_budget_mb)
        self.queue = OutQueue(
            config.queue_messages or derived_messages,
            config.queue_bytes or derived_bytes,
            config.queue_policy,
        )
        self.spool: Spool | None = None
        if config.spool_bytes:
            directory = node.config.state_dir / SPOOL_DIR_NAME
            self.spool = Spool(directory, config.spool_bytes, config.queue_policy)
        self.spool_error: str | None = None
        self.state = CONNECTING
        self.last_error: UplinkError | None = None
        self._last_error_t: float | None = None
        self._logged: tuple[str, str] | None = None
        self._connected_t: float | None = None
        self._retry_t: float | None = None
        self._session: Session | None = None
        self._by_mid: dict[int, int] = {}
        self._next_seq = 1
        self._work = anyio.Event()
        self._inbound: deque[_InMessage] = deque()
        self._inbound_ready = anyio.Event()
        self._inbound_room = anyio.Event()
        self._spool_dirty = anyio.Event()
        self._devices: dict[str, bool] = {}
        self._once: set[str] = set()
        self._closing = False
        self._scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()
        # Subscribed at once, with the node: messages published while the
        # spool is read back wait in these streams, behind the restored ones.
        self._streams = [(route, node.subscribe(route.node_pattern)) for route in self.out_routes]
        # Figures for status().
        self.connections = 0
        self.attempts = 0
        self.sent = 0
        self.rejected = 0
        self.unmappable = 0
        self.qos0_dropped_offline = 0
        self.received = 0
        self.delivered = 0
        self.undeliverable = 0
        self.unrouted = 0
        self.restored = 0
        self.subscriptions = 0

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`aclose` (or the node's task group) stops it."""
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                await self._restore()
                streams = self._streams
                try:
                    async with anyio.create_task_group() as tg:
                        for route, stream in streams:
                            tg.start_soon(self._forward, route, stream)
                        tg.start_soon(self._deliver_inbound)
                        tg.start_soon(self._watch_devices)
                        if self.spool is not None:
                            tg.start_soon(self._sync_spool)
                        await self._connect_loop()
                        tg.cancel_scope.cancel()
                finally:
                    for _, stream in streams:
                        stream.close()
        except Exception as exc:  # a bug here must not stop the node: say so, stop the uplink
            self.last_error = UplinkError(f"uplink stopped by an internal error: {exc!r}")
            log.exception("uplink: stopped by an internal error")
        finally:
            self.state = STOPPED
            if self.spool is not None:
                try:
                    self.spool.close()
                except OSError as exc:
                    log.warning("uplink: cannot flush the spool: %s", exc.strerror)
            self._stopped.set()

    async def aclose(self) -> None:
        """Say ``offline`` on the broker and disconnect cleanly, then stop.

        The node bounds this by its ``shutdown_grace_s``. Idempotent.
        """
        self._closing = True
        session = self._session
        if session is not None and session.connected.is_set() and session.error is None:
            for device in sorted(self._devices):
                session.publish(self._device_topic(device), OFFLINE, 1, retain=True)
            session.publish(self.status_topic, OFFLINE, 1, retain=True)
            session.disconnect()
            await session.ended.wait()
        if self._scope is not None:
            self._scope.cancel()
            await self._stopped.wait()

    # -- the connection ----------------------------------------------------------------

    async def _connect_loop(self) -> None:
        backoff = Backoff(self.config.reconnect_base_s, self.config.reconnect_cap_s)
        while not self._closing:
            self.state = CONNECTING
            self.attempts += 1
            error = await self._connect_once()
            up_s = None if self._connected_t is None else anyio.current_time() - self._connected_t
            self._session = None
            self._connected_t = None
            self._by_mid.clear()
            self.queue.requeue_inflight()
            if self._closing:
                return
            if up_s is not None and up_s >= self.config.keepalive_s:
                backoff.reset()
            self._failed(error)
            delay = backoff.next_delay(random.random())
            self._retry_t = anyio.current_time() + delay
            await anyio.sleep(delay)
            self._retry_t = None

    async def _connect_once(self) -> UplinkError:
        session = Session(
            self.config,
            client_id=self.client_id,
            will_topic=self.status_topic,
            max_packet_bytes=self.node.config.max_frame_bytes,
            sink=self,
            room=self._room,
        )
        self._session = session
        timeout_s = self.config.connect_timeout_s
        deadline = anyio.current_time() + timeout_s
        try:
            with anyio.fail_after(timeout_s):
                await session.open()
        except TimeoutError:
            session.abort()
            what = "tcp connection and tls handshake" if self.broker.tls else "tcp connection"
            return BrokerUnavailable(f"broker {self.broker}: no {what} within {timeout_s:g} s")
        except UplinkError as exc:
            return exc
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve, session, deadline)
            error = await session.run()
            tg.cancel_scope.cancel()
        return error

    async def _serve(self, session: Session, deadline: float) -> None:
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await session.connected.wait()
        if not session.connected.is_set():
            session.fail(
                BrokerUnavailable(
                    f"broker {self.broker}: connected, but no connack within "
                    f"{self.config.connect_timeout_s:g} s"
                )
            )
            return
        self.state = CONNECTED
        self.connections += 1
        self._connected_t = anyio.current_time()
        self._logged = None
        log.info(
            "uplink connected to %s as %s (%d queued)", self.broker, self.client_id, len(self.queue)
        )
        session.subscribe([(route.filter, route.qos) for route in self.in_routes])
        session.publish(self.status_topic, ONLINE, 1, retain=True)
        for device, up in sorted(self._devices.items()):
            session.publish(self._device_topic(device), ONLINE if up else OFFLINE, 1, retain=True)
        await self._publish_queue(session)

    async def _publish_queue(self, session: Session) -> None:
        queue = self.queue
        while session.error is None:
            while queue.inflight < MAX_INFLIGHT:
                item = queue.take()
                if item is None:
                    break
                self._by_mid[session.publish(item.topic, item.payload, item.qos)] = item.seq
            self._work = anyio.Event()
            await self._work.wait()

    def _failed(self, error: UplinkError) -> None:
        self.state = ERROR
        self.last_error = error
        self._last_error_t = anyio.current_time()
        key = (type(error).__name__, str(error))
        if key != self._logged:
            self._logged = key
            log.warning("uplink: %s; retrying with backoff", error)
        else:
            log.debug("uplink: %s (again)", error)

    # -- what the connection reports (paho's callbacks, in the loop) -------------------

    def published(self, mid: int, failure: str | None) -> None:
        seq = self._by_mid.pop(mid, None)
        if seq is None:
            return  # a status message
        if self.queue.done(seq) is not None:
            self.sent += 1
        if self.spool is not None:
            self._spool_call(self.spool.done, seq)
        if failure is not None:
            self.rejected += 1
            self._warn_once(
                f"rejected:{failure}", "uplink: the broker rejected a message: %s", failure
            )
        self._work.set()

    def message(
        self, session: Session, topic: str | None, payload: bytes, qos: int, mid: int
    ) -> None:
        self.received += 1
        route = first_match(self.in_routes, topic) if topic is not None else None
        node_topic = route.node_topic(topic) if route is not None and topic is not None else None
        if route is None or node_topic is None:
            self.unrouted += 1
            session.ack(mid, qos)
            return
        self._inbound.append(_InMessage(session, route, node_topic, payload, qos, mid))
        self._inbound_ready.set()

    def subscribed(self, failures: list[str]) -> None:
        self.subscriptions += 1
        for failure in failures:
            self._warn_once(
                f"subscribe:{failure}", "uplink: the broker refused a subscription: %s", failure
            )

    async def _room(self) -> None:
        while len(self._inbound) >= INBOUND_HIGH:
            self._inbound_room = anyio.Event()
            await self._inbound_room.wait()

    # -- out: node -> queue ----------------------------------------------------------------

    async def _forward(self, route: OutRoute, stream: Any) -> None:
        async for msg in stream:
            if msg.peer == MQTT_SOURCE:
                continue  # came from the broker: never echoed back
            self.accept(route, msg)

    def accept(self, route: OutRoute, msg: Incoming) -> bool:
        """Queue one node message for the broker; False if it was not accepted."""
        topic = route.broker_topic(msg.topic)
        if topic is None:
            self.unmappable += 1
            self._warn_once(
                "unmappable",
                "uplink: node topic %r makes no valid mqtt topic (a '+', '#' or nul); not sent",
                msg.topic,
            )
            return False
        if route.qos == 0 and self.state != CONNECTED:
            self.qos0_dropped_offline += 1
            return False
        item = Outgoing(self._next_seq, topic, msg.payload, route.qos)
        self._next_seq += 1
        spool = self.spool if route.qos else None
        if spool is not None:
            room = spool.make_room(item)
            if room is None:
                self.queue.refused_new += 1
                self._queue_full()
                return False
            if room:
                self.queue.drop(room)
                self._queue_full()
        accepted, dropped = self.queue.offer(item)
        if dropped or not accepted:
            self._queue_full()
        if self.spool is not None:
            for old in dropped:
                self._spool_call(self.spool.done, old.seq)
        if not accepted:
            return False
        if spool is not None:
            self._spool_call(spool.append, item)
        self._work.set()
        return True

    def _queue_full(self) -> None:
        q = self.queue
        self._warn_once(
            "queue-full",
            "uplink: queue full (%d messages, %d bytes; caps %d and %d): %s",
            len(q),
            q.bytes,
            q.max_messages,
            q.max_bytes,
            "dropping the oldest" if q.policy == "drop-oldest" else "refusing new messages",
        )

    # -- in: queue -> node -------------------------------------------------------------------

    async def _deliver_inbound(self) -> None:
        while True:
            while not self._inbound:
                self._inbound_ready = anyio.Event()
                await self._inbound_ready.wait()
            item = self._inbound[0]
            try:
                await self._deliver(item.route, item.topic, item.payload)
                self.delivered += 1
            except NodeClosed:
                return
            except EdgeNodeError as exc:
                self.undeliverable += 1
                self._warn_once(
                    f"undeliverable:{type(exc).__name__}",
                    "uplink: cannot deliver %r from the broker: %s",
                    item.topic,
                    exc,
                )
            self._inbound.popleft()
            item.session.ack(item.mid, item.qos)
            if len(self._inbound) < INBOUND_LOW:
                self._inbound_room.set()

    async def _deliver(self, route: InRoute, topic: str, payload: bytes) -> None:
        node = self.node
        deliver = route.deliver
        if deliver == LOCAL:
            await node.publish_local(topic, payload, source=MQTT_SOURCE)
        elif deliver == SITE:
            await node.broadcast(topic, payload)
            await node.publish_local(topic, payload, source=MQTT_SOURCE)
        elif deliver.startswith(PEER_PREFIX):
            await node.send(deliver[len(PEER_PREFIX) :].strip(), topic, payload)
        else:
            device = deliver[len(DEVICE_PREFIX) :].strip()
            await node.send(node.device_address(device), topic, payload)

    # -- availability of this node's devices ---------------------------------------------------

    def _device_topic(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/status"

    async def _watch_devices(self) -> None:
        with self.node.events() as events:
            self._sync_devices()
            async for event in events:
                if "/" in getattr(event, "peer", ""):
                    self._sync_devices()

    def _sync_devices(self) -> None:
        """Publish each local device's availability when it changed (from
        ``node.peers()``, so a missed event costs nothing)."""
        now = {}
        for row in self.node.peers():
            if row.direction == "serial":
                device = row.ip.partition("/")[2]
                if is_topic_name(device) and "/" not in device:
                    now[device] = row.state == "up"
        session = self._session if self.state == CONNECTED else None
        for device, up in now.items():
            if self._devices.get(device) != up and session is not None:
                session.publish(
                    self._device_topic(device), ONLINE if up else OFFLINE, 1, retain=True
                )
        self._devices.update(now)

    # -- the spool ---------------------------------------------------------------------

    async def _restore(self) -> None:
        spool = self.spool
        if spool is None:
            return
        try:
            items = await anyio.to_thread.run_sync(spool.open)
        except SpoolError as exc:
            self._spool_failed(exc)
            return
        for item in items:
            accepted, dropped = self.queue.offer(item)
            for old in dropped:
                self._spool_call(spool.done, old.seq)
            if accepted:
                self.restored += 1
            else:
                self._spool_call(spool.done, item.seq)
        self._next_seq = spool.next_seq
        if items:
            log.info("uplink: %d queued messages restored from the spool", self.restored)
        if spool.truncated_bytes:
            log.warning(
                "uplink: spool ended in %d bytes of an unfinished record; cut off",
                spool.truncated_bytes,
            )

    def _spool_call(self, method: Any, arg: Any) -> None:
        if self.spool is None:
            return
        try:
            method(arg)
        except SpoolError as exc:
            self._spool_failed(exc)
            return
        self._spool_dirty.set()

    def _spool_failed(self, exc: SpoolError) -> None:
        self.spool_error = str(exc)
        log.error("uplink: %s; queueing in memory only from now on", exc)
        spool, self.spool = self.spool, None
        if spool is not None:
            try:
                spool.close()
            except OSError:
                pass

    async def _sync_spool(self) -> None:
        while self.spool is not None:
            await self._spool_dirty.wait()
            self._spool_dirty = anyio.Event()
            await anyio.sleep(_SPOOL_SYNC_S)
            spool = self.spool
            if spool is None:
                return
            dirty, closed = spool.take_sync_work()
            await anyio.to_thread.run_sync(Spool.sync, dirty, closed)

    # -- reporting ------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._once:
            self._once.add(key)
            log.warning(message, *args)

    def status(self) -> dict[str, Any]:
        """The uplink's state and figures, JSON-serialisable (``edgenode status``)."""
        now = anyio.current_time()
        error = self.last_error
        queue = self.queue
        return {
            "state": self.state,
            "broker": str(self.broker),
            "client_id": self.client_id,
            "protocol": self.config.protocol,
            "prefix": self.prefix,
            "connected_for_s": None if self._connected_t is None else now - self._connected_t,
            "connections": self.connections,
            "attempts": self.attempts,
            "last_error": None if error is None else str(error),
            "last_error_type": None if error is None else type(error).__name__,
            "last_error_age_s": None if self._last_error_t is None else now - self._last_error_t,
            "retry_in_s": None if self._retry_t is None else max(0.0, self._retry_t - now),
            "queue_messages": len(queue),
            "queue_bytes": queue.bytes,
            "queue_inflight": queue.inflight,
            "queue_max_messages": queue.max_messages,
            "queue_max_bytes": queue.max_bytes,
            "queue_policy": queue.policy,
            "dropped_oldest": queue.dropped_oldest,
            "refused_new": queue.refused_new,
            "qos0_dropped_offline": self.qos0_dropped_offline,
            "published": self.sent,
            "rejected": self.rejected,
            "unmappable": self.unmappable,
            "received": self.received,
            "delivered": self.delivered,
            "undeliverable": self.undeliverable,
            "unrouted": self.unrouted,
            "inbound_waiting": len(self._inbound),
            "subscriptions": self.subscriptions,
            "spool_bytes": None if self.spool is None else self.spool.bytes,
            "spool_max_bytes": self.config.spool_bytes or None,
            "spool_restored": self.restored,
            "spool_error": self.spool_error,
            "devices": dict(sorted(self._devices.items())),
        }
