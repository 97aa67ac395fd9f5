"""The serial bridge: microcontrollers on UARTs join the node's network.

Each configured port has one source task (open, read, reopen with backoff
after an unplug) and one writer task; both only move bytes. The link
state machine of each port (``firmware_bridge.link.Link``, the same code
the microcontroller runs) belongs to the node's dispatcher, which calls the
plain functions of :class:`SerialBridge` below: nothing here awaits on the
dispatcher's behalf. A device is addressed as ``<this node's ip>/<device
id>`` and appears in :meth:`Node.peers` under this node.

The bridge never sees the node: it reports what devices do through the
small typed interface :class:`BridgeHost` (the node's device router,
``edgenode.devices``) and posts its events with the ``post`` it is given.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

from firmware_bridge.link import (
    KIND_DATA,
    KIND_REQUEST,
    KIND_RESPONSE,
    KIND_SEND_TO,
    Dropped,
    Link,
    LinkUsageError,
    Received,
    SessionDown,
    SessionUp,
)

from .api import PeerSnapshot
from .errors import EdgeNodeError, PeerUnavailable, RemoteError, TooManyPending
from .keepalive import Backoff
from .mailbox import Mailbox
from .transports.serial import SerialPort, SerialUnavailable

log = logging.getLogger("edgenode.bridge")

#: A link request id is 16 bits; at most this many are in flight per port.
MAX_DEVICE_REQUESTS = 8
#: Writes waiting for a port. Application data waits for room below this;
#: the link's own frames (hellos, pings, acks) never wait and never drop.
_OUTBOX_CHUNKS = 64
_REQUEST_TTL_S = 60.0

OPENED = 0
BYTES = 1
LOST = 2


def now_ms(now: float) -> int:
    """The link layer's clock: integer milliseconds of the node's monotonic clock."""
    return int(now * 1000)


class Port:
    """One configured serial port and, while a device answers on it, its session."""

    __slots__ = (
        "baud",
        "device_id",
        "link",
        "next_request_id",
        "outbox",
        "path",
        "pending",
        "tick_at",
        "up_since",
    )

    def __init__(self, path: str, baud: int) -> None:
        self.path = path
        self.baud = baud
        self.link: Link | None = None
        self.outbox: Mailbox[bytes] | None = None  # while open
        self.device_id: str | None = None
        self.up_since: float | None = None
        self.tick_at: float | None = None
        #: link request id -> a node ``_Pending`` or (conn, peer's request id), deadline
        self.pending: dict[int, tuple[Any, float]] = {}
        self.next_request_id = 1

    def __repr__(self) -> str:
        return f"<serial {self.path} {self.device_id or '-'}>"


class SerialEvent:
    """Inbox event from a port's source task."""

    __slots__ = ("data", "kind", "port", "t")

    def __init__(self, port: Port, kind: int, data: Any) -> None:
        self.port, self.kind, self.data, self.t = port, kind, data, time.monotonic()


class DeviceAnswer:
    """Inbox event: the node's handler answered a device's request."""

    __slots__ = ("payload", "port", "request_id", "status", "t")

    def __init__(self, port: Port, request_id: int, status: int, payload: bytes | str) -> None:
        self.port, self.request_id, self.status, self.payload = port, request_id, status, payload
        self.t = time.monotonic()


class BridgeHost(Protocol):
    """What the bridge tells the node about its devices (the node's device router)."""

    def device_address(self, device_id: str) -> str:
        """The address of one of our devices: ``<node ip>/<device id>``."""

    def device_changed(self, device_id: str, *, up: bool, reason: str | None) -> None:
        """A device came up or went down."""

    def device_published(self, device_id: str, topic: str, payload: bytes, now: float) -> None:
        """A device published data."""

    def device_asks(
        self, port: Port, device_id: str, request_id: int, topic: str, payload: bytes, now: float
    ) -> None:
        """A device sent a request to this node; answer with a :class:`DeviceAnswer`."""

    def device_send_to(
        self, device_id: str, dest: str, topic: str, payload: bytes, now: float
    ) -> None:
        """A device sent data to another address."""

    def answered(self, target: Any, payload: bytes | None, error: EdgeNodeError | None) -> None:
        """A device answered (or could not answer) a request made through ``request``."""

    def schedule_link_tick(self, port: Port, when: float) -> None:
        """Call :meth:`SerialBridge.on_tick` for ``port`` once ``when`` has passed."""


class SerialBridge:
    """The node's serial ports and the devices on them (dispatcher-owned state)."""

    def __init__(
        self,
        host: BridgeHost,
        config: Any,
        node_id: str,
        post: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.host = host
        self.config = config
        self.node_id = node_id
        self._post = post
        self.ports = [Port(path, baud) for path, baud in config.serial_ports]
        self.devices: dict[str, Port] = {}
        #: Devices seen before and down now, with the reason.
        self.down: dict[str, str] = {}
        #: Senders waiting for room in a device's reliable send queue.
        self._room: dict[str, anyio.Event] = {}
        self._drop_logs: dict[tuple[str, str], int] = {}
        #: Serial output dropped (none since application data waits for room;
        #: kept for status and the tests that say so).
        self.dropped_messages = 0

    # -- sources: one task per port ---------------------------------------------------

    async def run_port(self, port: Port) -> None:
        """Open ``port``, feed its bytes to the inbox, reopen it after an unplug."""
        config = self.config
        backoff = Backoff(config.backoff_base_s, config.backoff_cap_s)
        post = self._post
        while True:
            try:
                serial = SerialPort.open(port.path, port.baud)
            except SerialUnavailable as exc:
                await post(SerialEvent(port, LOST, str(exc)))
                await anyio.sleep(backoff.next_delay(random.random()))
                continue
            opened = time.monotonic()
            outbox: Mailbox[bytes] = Mailbox(_OUTBOX_CHUNKS)
            await post(SerialEvent(port, OPENED, outbox))
            reason = "closed"
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._write, port, serial, outbox)
                    try:
                        while True:
                            await post(SerialEvent(port, BYTES, await serial.receive()))
                    except (BrokenResourceError, ClosedResourceError, OSError) as exc:
                        reason = str(exc) or type(exc).__name__
                    tg.cancel_scope.cancel()
            finally:
                serial.close()
                outbox.close()
            await post(SerialEvent(port, LOST, reason))
            if time.monotonic() - opened > config.keepalive_timeout_s:
                backoff.reset()
            await anyio.sleep(backoff.next_delay(random.random()))

    async def _write(self, port: Port, serial: SerialPort, outbox: Mailbox[bytes]) -> None:
        try:
            while True:
                await serial.send(await outbox.get())
                device_id = port.device_id  # its senders may have waited for room
                if device_id is not None and device_id in self._room and self.has_room(device_id):
                    self._room.pop(device_id).set()
        except (BrokenResourceError, ClosedResourceError, EndOfStream, OSError):
            pass  # the reader reports the lost port

    # -- dispatcher side: plain functions ----------------------------------------------

    def handlers(self) -> dict[type, Callable[[Any, float], None]]:
        """The dispatcher's handlers for the bridge's inbox events."""
        return {SerialEvent: self.on_event, DeviceAnswer: self.on_answer}

    def on_event(self, ev: SerialEvent, now: float) -> None:
        port = ev.port
        if ev.kind == BYTES:
            if port.link is not None:
                self._handle(port, port.link.receive_bytes(ev.data, now_ms(now)), now)
        elif ev.kind == OPENED:
            config = self.config
            port.outbox = ev.data
            port.link = Link(
                "host",
                self.node_id,
                random.randrange(1, 1 << 32),
                max_frame=config.serial_max_frame,
                keepalive_interval_ms=int(config.serial_keepalive_interval_s * 1000),
                keepalive_timeout_ms=int(config.serial_keepalive_timeout_s * 1000),
                reliable=config.serial_reliable,
                psk=config.serial_psk,
            )
            port.link.start(now_ms(now))
            log.info("serial port %s open at %d baud", port.path, port.baud)
            self._flush(port, now)
        else:
            if port.link is not None or port.outbox is not None:
                self._session_down(port, f"serial port lost: {ev.data}", now)
                log.warning("serial port %s lost: %s", port.path, ev.data)
            else:
                log.debug("serial port %s unavailable: %s", port.path, ev.data)
            port.link = None
            port.outbox = None

    def on_answer(self, ev: DeviceAnswer, now: float) -> None:
        port = ev.port
        if port.link is None or not port.link.is_up:
            return
        try:
            port.link.send_response(ev.request_id, ev.status, ev.payload, now_ms(now))
        except LinkUsageError as exc:
            log.warning(
                "%s: answer to device request %d dropped: %s", port.path, ev.request_id, exc
            )
        self._flush(port, now)

    def on_tick(self, port: Port, now: float) -> None:
        port.tick_at = None
        if port.link is not None:
            self._handle(port, port.link.tick(now_ms(now)), now)

    def _handle(self, port: Port, events: list[Any], now: float) -> None:
        host = self.host
        for event in events:
            if isinstance(event, Received):
                self._received(port, event, now)
            elif isinstance(event, SessionUp):
                device_id = event.peer_hello.id
                if port.device_id is not None:
                    self._session_down(port, "device restarted", now)
                other = self.devices.get(device_id)
                if other is not None and other is not port:
                    log.warning(
                        "device %s on %s is already up on %s; ignoring it",
                        device_id,
                        port.path,
                        other.path,
                    )
                    continue
                port.device_id = device_id
                port.up_since = now
                self.devices[device_id] = port
                self.down.pop(device_id, None)
                log.info("device up %s on %s", host.device_address(device_id), port.path)
                host.device_changed(device_id, up=True, reason=None)
            elif isinstance(event, SessionDown):
                self._session_down(port, f"device link down: {event.reason}", now)
            elif isinstance(event, Dropped):
                # Log the 1st, 10th, 100th ... drop of each reason: a noisy line
                # or a device with the wrong key must not flood the journal.
                key = (port.path, event.reason)
                count = self._drop_logs.get(key, 0) + 1
                self._drop_logs[key] = count
                if count == 10 ** (len(str(count)) - 1):
                    log.info(
                        "%s: dropped a frame (%s #%d): %s",
                        port.path,
                        event.reason,
                        count,
                        event.message,
                    )
        self._flush(port, now)

    def _session_down(self, port: Port, reason: str, now: float) -> None:
        device_id = port.device_id
        for target, _ in port.pending.values():
            self._fail(target, PeerUnavailable(f"device {device_id} went down: {reason}"), now)
        port.pending.clear()
        if device_id is None:
            return
        port.device_id = None
        port.up_since = None
        room = self._room.pop(device_id, None)
        if room is not None:
            room.set()  # its senders find the device down
        if self.devices.get(device_id) is port:
            del self.devices[device_id]
            self.down[device_id] = reason
        log.warning("device down %s: %s", self.host.device_address(device_id), reason)
        self.host.device_changed(device_id, up=False, reason=reason)

    def _received(self, port: Port, msg: Received, now: float) -> None:
        host = self.host
        device_id = port.device_id
        if device_id is None:
            return
        kind = msg.kind
        if kind == KIND_DATA:
            host.device_published(device_id, msg.topic or "", msg.payload, now)
        elif kind == KIND_REQUEST:
            host.device_asks(port, device_id, msg.req_id or 0, msg.topic or "", msg.payload, now)
        elif kind == KIND_RESPONSE:
            entry = port.pending.pop(msg.req_id or 0, None)
            if entry is None:
                log.debug("%s: answer to unknown request %s", port.path, msg.req_id)
            elif msg.status == 0:
                self._succeed(entry[0], msg.payload, now)
            else:
                self._fail(entry[0], RemoteError(msg.status or 0, msg.error or ""), now)
        elif kind == KIND_SEND_TO:
            host.device_send_to(device_id, msg.dest or "", msg.topic or "", msg.payload, now)

    def _succeed(self, target: Any, payload: bytes, now: float) -> None:
        self.host.answered(target, payload, None)

    def _fail(self, target: Any, error: EdgeNodeError, now: float) -> None:
        self.host.answered(target, None, error)

    def _flush(self, port: Port, now: float) -> None:
        link = port.link
        if link is None:
            return
        if port.device_id is not None and port.device_id in self._room:
            if self.has_room(port.device_id):
                self._room.pop(port.device_id).set()
        out = link.bytes_to_send()
        if out and port.outbox is not None and not port.outbox.closed:
            # Never dropped: application data only comes in while there is
            # room (has_room), and the link's own frames are few and small.
            port.outbox.put_beyond_capacity(out)
        deadline_ms = link.next_deadline_ms()
        if deadline_ms is not None:
            when = deadline_ms / 1000
            if port.tick_at is None or when < port.tick_at:
                port.tick_at = when
                self.host.schedule_link_tick(port, when)

    # -- what the node asks of a device -------------------------------------------------

    def has_room(self, device_id: str) -> bool:
        """Whether one more message to a local device would be taken now: its
        link has room (reliable mode's queue) and so has its port's outbox."""
        port = self.devices.get(device_id)
        if port is None or port.link is None:
            return True  # the send fails as "not connected", not by waiting
        if port.outbox is not None and len(port.outbox) >= _OUTBOX_CHUNKS:
            return False
        room = port.link.room()
        return room is None or room > 0

    async def wait_for_room(self, device_id: str) -> None:
        """Wait until the device's link takes messages again, or the device goes down."""
        event = self._room.get(device_id)
        if event is None:
            event = self._room[device_id] = anyio.Event()
        await event.wait()

    def send_data(self, device_id: str, topic: str, payload: bytes, now: float) -> str | None:
        """Queue data to a local device; return why it could not be, or None."""
        port = self.devices.get(device_id)
        if port is None or port.link is None:
            return "the device is not connected"
        try:
            port.link.send_data(topic, payload, now_ms(now))
        except LinkUsageError as exc:
            return str(exc)
        self._flush(port, now)
        return None

    def request(self, device_id: str, topic: str, payload: bytes, target: Any, now: float) -> None:
        """Send a request to a local device; its answer goes to ``target``."""
        port = self.devices.get(device_id)
        if port is None or port.link is None:
            self._fail(target, PeerUnavailable(f"device {device_id} is not connected"), now)
            return
        for rid in [r for r, (_, deadline) in port.pending.items() if deadline < now]:
            del port.pending[rid]
        if len(port.pending) >= MAX_DEVICE_REQUESTS:
            self._fail(
                target,
                TooManyPending(
                    f"{len(port.pending)} requests already pending on device {device_id} "
                    f"(limit {MAX_DEVICE_REQUESTS})"
                ),
                now,
            )
            return
        rid = port.next_request_id
        port.next_request_id = rid % 0xFFFF + 1
        try:
            port.link.send_request(rid, topic, payload, now_ms(now))
        except LinkUsageError as exc:
            self._fail(target, PeerUnavailable(f"device {device_id}: {exc}"), now)
            return
        port.pending[rid] = (target, now + _REQUEST_TTL_S)
        self._flush(port, now)

    def snapshot(self, now: float) -> list[PeerSnapshot]:
        """One row per device seen on this node's ports, for :meth:`Node.peers`."""
        rows = []
        for device_id in sorted(set(self.devices) | set(self.down)):
            port = self.devices.get(device_id)
            link = port.link if port is not None else None
            up = port is not None and link is not None and link.is_up
            stats = link.stats if link is not None else None
            arriving, answered, heard_ms = (
                link.liveness(now_ms(now)) if up and link is not None else (False, False, None)
            )
            rows.append(
                PeerSnapshot(
                    ip=self.host.device_address(device_id),
                    node_id=None,
                    state="up" if up else "down",
                    direction="serial",
                    listen_port=None,
                    up_for_s=now - port.up_since if up and port and port.up_since else None,
                    down_reason=None if up else self.down.get(device_id),
                    rtt_s=link.rtt_ms / 1000 if up and link and link.rtt_ms is not None else None,
                    our_pings_answered=answered,
                    their_frames_arriving=arriving,
                    last_heard_s=heard_ms / 1000 if heard_ms is not None else None,
                    bytes_in=stats.bytes_in if stats else 0,
                    bytes_out=stats.bytes_out if stats else 0,
                    drops=stats.dropped if stats else 0,
                )
            )
        return rows
