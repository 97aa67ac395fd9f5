"""The serial bridge: microcontrollers on UARTs join the node's network.

Each configured port has three small tasks: a source (open the port, read
it, reopen it after an unplug or a failure to open, with backoff), a
writer, and a delivery task (``DeviceRouter.delivery``: edgenode.devices).
The link state machine of each port (``firmware_bridge.link.Link``, the
same code the microcontroller runs) is changed only by the plain functions
of :class:`SerialBridge` below, each in one synchronous step: the
dispatcher calls them for the bytes the source read and for the link's
timers; senders and the delivery task call the few that queue or resume.
Nothing here awaits on the dispatcher's behalf. A device is addressed as
``<this node's ip>/<device id>`` and appears in :meth:`Node.peers` under
this node.

Data path (docs/architecture.md, "Bridged devices"): what a device sends
goes from the link into the port's bounded delivery queue, never waiting,
and the delivery task takes it from there, waiting where it must (a full
subscription, a peer's full outbox). In reliable mode the link takes no
more messages than the queue has room for: the others are held back,
unacknowledged, so the device keeps them and sends them again once the
queue has room (``resume``): nothing is lost, the device's ``publish``
waits. In unreliable mode nothing can hold the device back: a message that
finds the queue full is dropped and counted. Requests from a device go
through the queue too, in order; answers from a device complete the
waiting request at once.

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
    KIND_RESPONSE,
    MEMORY_TOPIC,
    Dropped,
    Link,
    LinkUsageError,
    Received,
    SessionDown,
    SessionUp,
)

from .api import PeerSnapshot
from .bridge_ports import Port, first_of_a_power_of_ten
from .errors import EdgeNodeError, PeerUnavailable, RemoteError, TooManyPending
from .keepalive import Backoff
from .mailbox import Mailbox
from .transports.serial import SerialPort, SerialUnavailable

log = logging.getLogger("edgenode.bridge")

#: A link request id is 16 bits; at most this many are in flight per port.
MAX_DEVICE_REQUESTS = 8
#: Messages from a port's devices waiting for its delivery task. In reliable
#: mode the link holds back what does not fit (the device resends it).
DELIVERY_SLOTS = 256
#: Writes waiting for a port. Application data waits for room below this;
#: the link's own frames (hellos, pings, acks) never wait and never drop.
_OUTBOX_CHUNKS = 64
_REQUEST_TTL_S = 60.0
#: Longest wait between two tries to open a port that is missing or in
#: error: a device plugged in is found within this (a try costs a syscall).
REOPEN_CAP_S = 5.0

OPENED = 0
BYTES = 1
LOST = 2
FAILED = 3


def now_ms(now: float) -> int:
    """The link layer's clock: integer milliseconds of the node's monotonic clock."""
    return int(now * 1000)


class SerialEvent:
    """Inbox event from a port's source task."""

    __slots__ = ("data", "kind", "port", "t")

    def __init__(self, port: Port, kind: int, data: Any) -> None:
        self.port, self.kind, self.data, self.t = port, kind, data, time.monotonic()


class DeviceAnswer:
    """Inbox event: the node's handler answered a device's request (in session ``session``)."""

    __slots__ = ("payload", "port", "request_id", "session", "status", "t")

    def __init__(
        self, port: Port, session: int, request_id: int, status: int, payload: bytes | str
    ) -> None:
        self.port, self.session, self.request_id = port, session, request_id
        self.status, self.payload = status, payload
        self.t = time.monotonic()


class BridgeHost(Protocol):
    """What the bridge tells the node about its devices (the node's device router)."""

    def device_address(self, device_id: str) -> str:
        """The address of one of our devices: ``<node ip>/<device id>``."""

    def device_changed(self, device_id: str, *, up: bool, reason: str | None) -> None:
        """A device came up or went down."""

    def delivery(self, port: Port) -> Awaitable[None]:
        """The port's delivery task: what its devices send, delivered in order."""

    def answered(self, target: Any, payload: bytes | None, error: EdgeNodeError | None) -> None:
        """A device answered (or could not answer) a request made through ``request``."""

    def lost(self, what: str, why: str) -> None:
        """Count (and log, sparingly) a message from a device that was not delivered."""

    def schedule_link_tick(self, port: Port, when: float) -> None:
        """Call :meth:`SerialBridge.on_tick` for ``port`` once ``when`` has passed."""


class SerialBridge:
    """The node's serial ports and the devices on them; see the module docstring."""

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
        self.ports = [self._port(spec) for spec in config.serial_ports]
        self.devices: dict[str, Port] = {}
        #: Devices seen before and down now, with the reason.
        self.down: dict[str, str] = {}
        #: Senders waiting for room in a device's reliable send queue.
        self._room: dict[str, anyio.Event] = {}
        self._drop_logs: dict[tuple[str, str], int] = {}

    def _port(self, spec: tuple[Any, ...]) -> Port:
        config = self.config
        dtr = spec[2] if len(spec) > 2 and spec[2] is not None else config.serial_dtr
        rts = spec[3] if len(spec) > 3 and spec[3] is not None else config.serial_rts
        return Port(spec[0], spec[1], dtr=dtr, rts=rts, delivery_slots=DELIVERY_SLOTS)

    # -- the port's tasks --------------------------------------------------------------

    async def run_port(self, port: Port) -> None:
        """Run ``port``'s source and its delivery task (until cancelled)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._deliver, port)
            await self._source(port)

    async def _deliver(self, port: Port) -> None:
        await self.host.delivery(port)

    async def _source(self, port: Port) -> None:
        """Open ``port``, feed its bytes to the inbox, reopen it after an unplug."""
        config = self.config
        backoff = Backoff(config.backoff_base_s, min(config.backoff_cap_s, REOPEN_CAP_S))
        post = self._post
        while True:
            try:
                serial = SerialPort.open(port.path, port.baud, dtr=port.dtr, rts=port.rts)
            except SerialUnavailable as exc:
                await post(SerialEvent(port, FAILED, exc))
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
        kind = ev.kind
        if kind == BYTES:
            link = port.link
            if link is not None:
                # Reliable mode: no more messages than the delivery queue takes.
                box = port.delivery
                room = box.capacity - len(box) if link.reliable else None
                self._handle(port, link.receive_bytes(ev.data, now_ms(now), room), now)
        elif kind == OPENED:
            self._opened(port, ev.data, now)
        elif kind == FAILED:
            line = port.open_failed(ev.data, now)
            if line is not None:
                log.warning("%s", line)
            else:
                log.debug("serial port %s still unavailable: %s", port.path, ev.data)
        else:
            if port.link is not None or port.outbox is not None:
                self._session_down(port, f"serial port lost: {ev.data}", now)
                log.warning("%s", port.lost(ev.data, now))
            port.link_ended()
            port.link = None
            port.outbox = None

    def _opened(self, port: Port, outbox: Mailbox[bytes], now: float) -> None:
        config = self.config
        port.outbox = outbox
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
        line = port.opened(now)
        if line is not None:
            log.warning("%s", line)
        else:
            log.info("serial port %s open at %d baud", port.path, port.baud)
        self._flush(port, now)

    def on_answer(self, ev: DeviceAnswer, now: float) -> None:
        port = ev.port
        link = port.link
        if link is None or not link.is_up or ev.session != port.session:
            return  # asked in a session that has ended: nobody waits for it
        try:
            link.send_response(ev.request_id, ev.status, ev.payload, now_ms(now))
        except LinkUsageError as exc:
            log.warning(
                "%s: answer to device request %d dropped: %s", port.path, ev.request_id, exc
            )
        self._flush(port, now)

    def on_tick(self, port: Port, now: float) -> None:
        port.tick_at = None
        if port.link is not None:
            self._handle(port, port.link.tick(now_ms(now)), now)

    def room_freed(self, port: Port) -> None:
        """The delivery task took a message from ``port``'s queue: if the link
        held frames back for want of room, it asks for them now."""
        link = port.link
        if link is not None and link.reliable:
            now = time.monotonic()
            link.resume(now_ms(now))
            if link.pending_output:
                self._flush(port, now)

    def _handle(self, port: Port, events: list[Any], now: float) -> None:
        for event in events:
            if isinstance(event, Received):
                self._received(port, event, now)
            elif isinstance(event, SessionUp):
                self._session_up(port, event.peer_hello.id, now)
            elif isinstance(event, SessionDown):
                self._session_down(port, f"device link down: {event.reason}", now)
            elif isinstance(event, Dropped):
                # Log the 1st, 10th, 100th ... drop of each reason: a noisy line
                # or a device with the wrong key must not flood the journal.
                key = (port.path, event.reason)
                count = self._drop_logs.get(key, 0) + 1
                self._drop_logs[key] = count
                if first_of_a_power_of_ten(count):
                    log.info(
                        "%s: dropped a frame (%s #%d): %s",
                        port.path,
                        event.reason,
                        count,
                        event.message,
                    )
        self._flush(port, now)

    def _session_up(self, port: Port, device_id: str, now: float) -> None:
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
            return
        port.device_id = device_id
        port.up_since = now
        port.session += 1
        self.devices[device_id] = port
        self.down.pop(device_id, None)
        log.info("device up %s on %s", self.host.device_address(device_id), port.path)
        self.host.device_changed(device_id, up=True, reason=None)

    def _session_down(self, port: Port, reason: str, now: float) -> None:
        device_id = port.device_id
        for target, _ in port.pending.values():
            self._fail(target, PeerUnavailable(f"device {device_id} went down: {reason}"))
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
        device_id = port.device_id
        if device_id is None:
            return
        kind = msg.kind
        if kind == KIND_RESPONSE:
            entry = port.pending.pop(msg.req_id or 0, None)
            if entry is None:
                log.debug("%s: answer to unknown request %s", port.path, msg.req_id)
            elif msg.status == 0:
                self.host.answered(entry[0], msg.payload, None)
            else:
                self._fail(entry[0], RemoteError(msg.status or 0, msg.error or ""))
        elif kind == KIND_DATA and msg.topic == MEMORY_TOPIC:
            self._memory_report(port, device_id, msg.payload)
        elif not port.delivery.put_nowait((device_id, port.session, msg)):
            # Only in unreliable mode: in reliable mode the link took no more
            # than the queue had room for.
            port.undelivered += 1
            self.host.lost(
                f"message from device {device_id} on {port.path} dropped",
                f"its delivery queue is full ({port.delivery.capacity} messages; "
                f"unreliable mode cannot hold the device back)",
            )

    def _memory_report(self, port: Port, device_id: str, payload: bytes) -> None:
        """A device says how many MemoryErrors it has survived (firmware_bridge.driver)."""
        try:
            count = int(payload.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            log.info("%s: device %s sent a bad %s: %r", port.path, device_id, MEMORY_TOPIC, payload)
            return
        before = port.device_memory_errors or 0
        port.device_memory_errors = count
        # Said at the first report, then as the count reaches 10, 100, ...
        if count > before and (before == 0 or len(str(count)) > len(str(before))):
            log.warning(
                "device %s on %s has survived %d MemoryError(s): its heap is too small or "
                'too fragmented (docs/microcontrollers.md, "When the heap runs out")',
                self.host.device_address(device_id),
                port.path,
                count,
            )

    def _fail(self, target: Any, error: EdgeNodeError) -> None:
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
            self._fail(target, PeerUnavailable(f"device {device_id} is not connected"))
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
            )
            return
        rid = port.next_request_id
        port.next_request_id = rid % 0xFFFF + 1
        try:
            port.link.send_request(rid, topic, payload, now_ms(now))
        except LinkUsageError as exc:
            self._fail(target, PeerUnavailable(f"device {device_id}: {exc}"))
            return
        port.pending[rid] = (target, now + _REQUEST_TTL_S)
        self._flush(port, now)

    # -- status ------------------------------------------------------------------------

    def port_rows(self, now: float) -> list[dict[str, Any]]:
        """One object per configured port, for ``edgenode status`` (``serial_ports``)."""
        return [port.row(now) for port in self.ports]

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
                    queued=len(port.delivery) if port is not None else 0,
                )
            )
        return rows
