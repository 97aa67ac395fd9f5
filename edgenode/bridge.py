"""The serial bridge: microcontrollers on UARTs join the node's network.

Each configured port has one source task (open, read, reopen with backoff
after an unplug) and one writer task; both only move bytes. The link
state machine of each port (``firmware_bridge.link.Link``, the same code
the microcontroller runs) belongs to the node's dispatcher, which calls the
plain functions of :class:`SerialBridge` below: nothing here awaits on the
dispatcher's behalf. A device is addressed as ``<this node's ip>/<device
id>`` and appears in :meth:`Node.peers` under this node.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Any

import anyio
from anyio import BrokenResourceError, ClosedResourceError, WouldBlock

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

from .errors import EdgeNodeError, PeerUnavailable, RemoteError, TooManyPending
from .keepalive import Backoff
from .transports.serial import SerialPort, SerialUnavailable

if TYPE_CHECKING:
    from .node import Node, PeerSnapshot

log = logging.getLogger("edgenode.bridge")

#: A link request id is 16 bits; at most this many are in flight per port.
MAX_DEVICE_REQUESTS = 8
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
        self.outbox: Any = None  # memory object send stream while open
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


class SerialBridge:
    """The node's serial ports and the devices on them (dispatcher-owned state)."""

    def __init__(self, node: Node) -> None:
        config = node.config
        self.node = node
        self.ports = [Port(path, baud) for path, baud in config.serial_ports]
        self.devices: dict[str, Port] = {}
        #: Devices seen before and down now, with the reason.
        self.down: dict[str, str] = {}
        #: Senders waiting for room in a device's reliable send queue, and
        #: messages sent through the inbox but not handled yet, per device.
        self._room: dict[str, anyio.Event] = {}
        self._reserved: dict[str, int] = {}
        self._drop_logs: dict[tuple[str, str], int] = {}
        self.dropped_messages = 0  # serial output that found the port's outbox full

    # -- sources: one task per port ---------------------------------------------------

    async def run_port(self, port: Port) -> None:
        """Open ``port``, feed its bytes to the inbox, reopen it after an unplug."""
        config = self.node.config
        backoff = Backoff(config.backoff_base_s, config.backoff_cap_s)
        post = self.node._post
        while True:
            try:
                serial = SerialPort.open(port.path, port.baud)
            except SerialUnavailable as exc:
                await post(SerialEvent(port, LOST, str(exc)))
                await anyio.sleep(backoff.next_delay(random.random()))
                continue
            opened = time.monotonic()
            send, recv = anyio.create_memory_object_stream(_OUTBOX_CHUNKS)
            await post(SerialEvent(port, OPENED, send))
            reason = "closed"
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._write, serial, recv)
                    try:
                        while True:
                            await post(SerialEvent(port, BYTES, await serial.receive()))
                    except (BrokenResourceError, ClosedResourceError, OSError) as exc:
                        reason = str(exc) or type(exc).__name__
                    tg.cancel_scope.cancel()
            finally:
                serial.close()
            await post(SerialEvent(port, LOST, reason))
            if time.monotonic() - opened > config.keepalive_timeout_s:
                backoff.reset()
            await anyio.sleep(backoff.next_delay(random.random()))

    @staticmethod
    async def _write(serial: SerialPort, chunks: Any) -> None:
        try:
            async for chunk in chunks:
                await serial.send(chunk)
        except (BrokenResourceError, ClosedResourceError, OSError):
            pass  # the reader reports the lost port

    # -- dispatcher side: plain functions ----------------------------------------------

    def on_event(self, ev: SerialEvent, now: float) -> None:
        port = ev.port
        if ev.kind == BYTES:
            if port.link is not None:
                self._handle(port, port.link.receive_bytes(ev.data, now_ms(now)), now)
        elif ev.kind == OPENED:
            config = self.node.config
            port.outbox = ev.data
            port.link = Link(
                "host",
                self.node.node_id,
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
        node = self.node
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
                log.info("device up %s on %s", node.device_address(device_id), port.path)
                node._device_changed(device_id, up=True, reason=None)
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
        log.warning("device down %s: %s", self.node.device_address(device_id), reason)
        self.node._device_changed(device_id, up=False, reason=reason)

    def _received(self, port: Port, msg: Received, now: float) -> None:
        node = self.node
        device_id = port.device_id
        if device_id is None:
            return
        kind = msg.kind
        if kind == KIND_DATA:
            node._device_published(device_id, msg.topic or "", msg.payload, now)
        elif kind == KIND_REQUEST:
            node._device_request(
                port, device_id, msg.req_id or 0, msg.topic or "", msg.payload, now
            )
        elif kind == KIND_RESPONSE:
            entry = port.pending.pop(msg.req_id or 0, None)
            if entry is None:
                log.debug("%s: answer to unknown request %s", port.path, msg.req_id)
            elif msg.status == 0:
                self._succeed(entry[0], msg.payload, now)
            else:
                self._fail(entry[0], RemoteError(msg.status or 0, msg.error or ""), now)
        elif kind == KIND_SEND_TO:
            node._device_send_to(device_id, msg.dest or "", msg.topic or "", msg.payload, now)

    def _succeed(self, target: Any, payload: bytes, now: float) -> None:
        self.node._device_answered(target, payload, None, now)

    def _fail(self, target: Any, error: EdgeNodeError, now: float) -> None:
        self.node._device_answered(target, None, error, now)

    def _flush(self, port: Port, now: float) -> None:
        link = port.link
        if link is None:
            return
        if port.device_id is not None and port.device_id in self._room:
            if self.has_room(port.device_id):
                self._room.pop(port.device_id).set()
        out = link.bytes_to_send()
        if out and port.outbox is not None:
            try:
                port.outbox.send_nowait(out)
            except WouldBlock:
                self.dropped_messages += 1
                log.warning("%s: serial outbox full; dropped %d bytes", port.path, len(out))
            except (ClosedResourceError, BrokenResourceError):
                pass
        deadline_ms = link.next_deadline_ms()
        if deadline_ms is not None:
            when = deadline_ms / 1000
            if port.tick_at is None or when < port.tick_at:
                port.tick_at = when
                self.node._schedule_link_tick(port, when)

    # -- what the node asks of a device -------------------------------------------------

    def has_room(self, device_id: str) -> bool:
        """Whether one more message to a local device would be taken (Link.room),
        counting those already on their way through the inbox."""
        port = self.devices.get(device_id)
        if port is None or port.link is None:
            return True  # the send fails as "not connected", not by waiting
        room = port.link.room()
        return room is None or room > self._reserved.get(device_id, 0)

    def reserve(self, device_id: str) -> None:
        """A message to ``device_id`` is on its way through the inbox."""
        self._reserved[device_id] = self._reserved.get(device_id, 0) + 1

    async def wait_for_room(self, device_id: str) -> None:
        """Wait until the device's link takes messages again, or the device goes down."""
        event = self._room.get(device_id)
        if event is None:
            event = self._room[device_id] = anyio.Event()
        await event.wait()

    def send_data(
        self, device_id: str, topic: str, payload: bytes, now: float, *, reserved: bool = False
    ) -> str | None:
        """Queue data to a local device; return why it could not be, or None."""
        if reserved:
            left = self._reserved.get(device_id, 0) - 1
            if left > 0:
                self._reserved[device_id] = left
            else:
                self._reserved.pop(device_id, None)
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
        from .node import PeerSnapshot

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
                    ip=self.node.device_address(device_id),
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
