"""From an API call to a connection's outbox: checks, addresses, room.

Validation at the edge (docs/architecture.md, "Layers"): the node's API
checks its arguments here, resolves an address (an IP, a node ID,
``ip/device``) to the peer's IP, finds that peer's live, settled
connection, and queues a frame on it: in one synchronous step when the
outbox has room, or waiting for room (backpressure). If the connection is
replaced while a caller waits, the caller carries on with the one that
replaced it; if the peer goes down, it is told why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from .addresses import LOCAL, split_address
from .connection import Connection
from .errors import EdgeNodeError, InvalidArgument, NodeClosed, PeerUnavailable
from .ips import normalise_ip
from .proto.messages import Limits
from .registry import UP, Registry

if TYPE_CHECKING:
    from .devices import DeviceRouter
    from .dispatcher import Dispatcher
    from .keepalive import Keepalive

monotonic = time.monotonic


class Sending:
    """The API's way to a peer; see the module docstring."""

    def __init__(
        self,
        *,
        limits: Limits,
        registry: Registry,
        keepalive: Keepalive,
        dispatcher: Dispatcher,
        devices: DeviceRouter,
        address: Callable[[], str],
        is_closing: Callable[[], bool],
        settle_wait_s: float,
    ) -> None:
        self.limits = limits
        self.registry = registry
        self.keepalive = keepalive
        self.dispatcher = dispatcher
        self.devices = devices
        self._address = address
        self._is_closing = is_closing
        #: How long a sender whose connection was replaced waits for the new
        #: one to settle (a handshake's time).
        self.settle_wait_s = settle_wait_s
        #: Sends that waited for room in a peer's outbox (backpressure), and how long.
        self.waits = 0
        self.waited_s = 0.0

    # -- checks ----------------------------------------------------------------------

    def check_open(self) -> None:
        """Raise :class:`NodeClosed` once the node is closing."""
        if self._is_closing():
            raise NodeClosed("node is closed")

    def check_topic(self, topic: str) -> str:
        """Return ``topic``; raise :class:`InvalidArgument` if it is empty, not
        text, or over the topic limit."""
        if not isinstance(topic, str) or not topic:
            raise InvalidArgument(f"topic: expected non-empty text, got {topic!r:.40}")
        size = len(topic.encode())
        if size > self.limits.max_topic_bytes:
            raise InvalidArgument(
                f"topic of {size} bytes exceeds {self.limits.max_topic_bytes}-byte limit"
            )
        return topic

    def check_payload(self, payload: bytes) -> bytes:
        """Return ``payload`` as bytes; raise :class:`InvalidArgument` if it is not
        bytes-like or is over the payload limit."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"payload: expected bytes, got {type(payload).__name__}")
        limit = self.limits.max_frame_bytes - self.limits.max_topic_bytes - 32
        if len(payload) > limit:
            raise InvalidArgument(f"payload of {len(payload)} bytes exceeds {limit}-byte limit")
        return payload if type(payload) is bytes else bytes(payload)

    @staticmethod
    def check_timeout(timeout: float) -> float:
        """Return ``timeout``; raise :class:`InvalidArgument` unless it is a number > 0."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidArgument(f"timeout: expected a number > 0, got {timeout!r}")
        return timeout

    # -- addresses -------------------------------------------------------------------

    def resolve_node(self, node: str) -> str:
        """An IP for the node part of an address: itself, or where a node ID is."""
        try:
            return normalise_ip(node)
        except EdgeNodeError:
            pass
        entry = self.registry.by_node_id(node)
        if entry is None:
            raise PeerUnavailable(f"node {node} is not known to this node")
        return entry.ip

    def live(self, ip: str) -> Connection | None:
        """The settled connection of the peer at ``ip``, or None."""
        entry = self.registry.get(ip)
        conn = entry.conn if entry is not None else None
        if isinstance(conn, Connection) and conn.settled and not conn.closing:
            return conn
        return None

    def is_up(self, ip: str, device: str | None) -> bool:
        """Whether the peer at ``ip`` (or its device) can be sent to now."""
        if device is None:
            return self.live(ip) is not None
        return self.devices.is_up(ip, device)

    async def up_peer(self, peer: str, wait_s: float | None) -> tuple[str, str | None]:
        """Resolve ``peer`` to (ip, device or None), waiting up to ``wait_s`` for
        it to be up. Raises :class:`PeerUnavailable` saying why it is not."""
        self.check_open()
        node, device = split_address(peer)
        ip = self._address() if node == LOCAL else self.resolve_node(node)
        if self.is_up(ip, device):
            return ip, device
        key = ip if device is None else f"{ip}/{device}"
        if wait_s:
            with anyio.move_on_after(wait_s):
                while not self.is_up(ip, device):
                    waiter = self.dispatcher.waiter(key)
                    try:
                        await waiter.wait()
                    finally:
                        self.dispatcher.forget_waiter(key, waiter)
                    self.check_open()
            if self.is_up(ip, device):
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

    # -- queueing --------------------------------------------------------------------

    async def put(self, ip: str, frame: bytes) -> Connection:
        """Queue ``frame`` on the live connection to ``ip``; return that connection.

        One synchronous step when the outbox has room. Otherwise waits for
        room; if the connection is replaced meanwhile, carries on with the
        one that replaced it (which sends what the old one held first).
        Raises :class:`PeerUnavailable` if the peer is or goes down.
        """
        conn = self.live(ip)
        if conn is None:
            await self.up_peer(ip, None)  # raises, saying why
            conn = self.live(ip)
            assert conn is not None
        if conn.outbox.put_nowait(frame):
            self.keepalive.sent(ip, monotonic())
            return conn
        started = monotonic()
        self.waits += 1
        try:
            return await self._put_waiting(ip, conn, frame)
        finally:
            self.waited_s += monotonic() - started

    async def _put_waiting(self, ip: str, conn: Connection, frame: bytes) -> Connection:
        while True:
            await conn.outbox.wait_room()
            if conn.closing:
                reason = conn.close_reason
                conn = self.live(ip)  # type: ignore[assignment]
                if conn is None:
                    entry = self.registry.get(ip)
                    if entry is not None and entry.state == UP and not self._is_closing():
                        # Replaced by a connection that is settling now.
                        await self.up_peer(ip, self.settle_wait_s)
                        conn = self.live(ip)  # type: ignore[assignment]
                if conn is None:
                    raise PeerUnavailable(
                        f"peer {ip} went down while the send waited for room: {reason}"
                    )
            if conn.outbox.put_nowait(frame):
                self.keepalive.sent(ip, monotonic())
                return conn

    def queue_to_all(self, frame: bytes) -> tuple[int, int]:
        """Queue a best-effort frame to every up peer that has room; return
        (queued, dropped)."""
        sent = dropped = 0
        now = monotonic()
        for conn in list(self.dispatcher.conns):
            if not conn.settled:
                continue
            if conn.queue_nowait(frame, droppable=True):
                self.keepalive.sent(conn.ip, now)
                sent += 1
            else:
                dropped += 1
        return sent, dropped
