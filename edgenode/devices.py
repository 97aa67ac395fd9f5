"""Device routing: microcontrollers bridged over UART, on this node and on peers.

A device is addressed as ``<bridging node's ip>/<device id>`` (``local/<id>``
works for a node listening on a wildcard address). This module routes
between the node's API, its peers and its own serial bridge:

- the devices each peer bridges (from its ``devices`` lists), which every
  node shows under that peer and can send to and ask;
- data and requests from peers for our own devices (the connection's reader
  hands them here, and waits for room in the device's link);
- what our own devices do: come up and go down (the bridge reports it
  through :class:`BridgeHost`'s methods), and publish, send to an address
  or ask (each port's delivery task, edgenode.device_delivery, routes them
  with :meth:`DeviceRouter.publish`, :meth:`DeviceRouter.route` and
  :meth:`DeviceRouter.device_asks`, and does the waiting).

The :class:`DeviceRouter` is the node's side of the bridge's typed
interface (``edgenode.bridge.BridgeHost``): the bridge never sees the node.
Its methods never wait, but for the two that send to our own devices.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .addresses import LOCAL, split_address
from .api import Incoming, PeerDown, PeerUp
from .bridge_ports import first_of_a_power_of_ten
from .device_delivery import DeviceDelivery, PeerSender
from .errors import EdgeNodeError, PeerUnavailable, RemoteError, TooManyPending
from .proto.connection import PeerProtocol
from .proto.messages import (
    ERR_BUSY,
    ERR_DEVICE_FAILED,
    ERR_NO_DEVICE,
    AnyMessage,
    DeviceRequest,
    Devices,
    ErrorResponse,
    FromDevice,
    ToDevice,
)
from .registry import UP
from .requests import Pending, Requests, answer_frame, clip

if TYPE_CHECKING:
    from .bridge import SerialBridge
    from .bridge_ports import Port
    from .connection import Connection
    from .inbox import Inbox
    from .registry import Registry
    from .subscriptions import EventFeed, Subscriptions

log = logging.getLogger("edgenode.node")

monotonic = time.monotonic


frame_of = PeerProtocol.send


class DeviceRouter:
    """Routes device traffic; see the module docstring."""

    def __init__(
        self,
        *,
        node_id: str,
        address: Callable[[], str],
        registry: Registry,
        subscriptions: Subscriptions,
        events: EventFeed,
        requests: Requests,
        inbox: Inbox,
        queue_to_peers: Callable[[bytes, bool], None],
        schedule: Callable[[float, Callable[[float], None]], None],
        task_group: Callable[[], Any],
    ) -> None:
        self.node_id = node_id
        self._address = address
        self.registry = registry
        self.subs = subscriptions
        self.events = events
        self.requests = requests
        self.inbox = inbox
        self._queue_to_peers = queue_to_peers
        self._schedule = schedule
        self._task_group = task_group
        self.bridge: SerialBridge | None = None
        #: The node's way to its peers (edgenode.sending.Sending), set by the node.
        self.sending: PeerSender | None = None
        self._delivery = DeviceDelivery(self)
        #: The devices each peer bridges, from its devices lists.
        self.remote: dict[str, tuple[str, ...]] = {}
        #: Called with an address (``ip`` or ``ip/device``) when it comes up.
        self.on_up: Callable[[str], None] = lambda address: None
        #: Device traffic that could not be routed or delivered (logged sparingly).
        self.lost_count = 0
        #: Device publishes a peer did not get because its connection was full.
        self.publish_dropped = 0

    # -- addresses -------------------------------------------------------------------

    def is_local(self, ip: str) -> bool:
        """Whether ``ip`` (as resolved from an address) is this node."""
        return ip == self._address()

    def device_address(self, device_id: str) -> str:
        """The address of a device on this node's serial ports."""
        return f"{self._address()}/{device_id}"

    def is_up(self, ip: str, device: str) -> bool:
        """Whether device ``device`` bridged by the node at ``ip`` is up."""
        if self.is_local(ip):
            return self.bridge is not None and device in self.bridge.devices
        entry = self.registry.get(ip)
        return (
            entry is not None
            and entry.state == UP
            and device in self.remote.get(ip, ())
            and getattr(entry.conn, "settled", False)
        )

    # -- peers' device lists (dispatcher) ---------------------------------------------

    def on_devices(self, conn: Connection, msg: Devices) -> None:
        """A peer listed the devices it bridges now."""
        ids = tuple(msg.device_ids)
        self.remote[conn.ip] = ids
        for device in ids:
            self.on_up(f"{conn.ip}/{device}")

    def peer_down(self, ip: str, node_id: str | None, reason: str) -> None:
        """A peer went down: so did the devices it bridged."""
        for device in self.remote.pop(ip, ()):
            self.events.publish(PeerDown(f"{ip}/{device}", node_id, reason))

    def devices_frame(self) -> bytes | None:
        """Our devices list for a peer, or None if we bridge no device."""
        if self.bridge is None or not self.bridge.devices:
            return None
        return frame_of(Devices(sorted(self.bridge.devices)))

    # -- from peers, through a connection's reader -------------------------------------

    async def to_device(self, conn: Connection, msg: ToDevice) -> None:
        """Data from a peer for one of our devices: wait for room in its link."""
        bridge = self.bridge
        if bridge is None:
            self.lost(f"{conn.ip}: message for device {msg.device_id} dropped", "no serial bridge")
            return
        while not bridge.has_room(msg.device_id):
            await bridge.wait_for_room(msg.device_id)
        why = bridge.send_data(msg.device_id, msg.topic, msg.payload, monotonic())
        if why is not None:
            self.lost(f"{conn.ip}: message for device {msg.device_id} dropped", why)

    def device_request(self, conn: Connection, msg: DeviceRequest) -> None:
        """A peer asks one of our devices; the answer goes back on ``conn``."""
        target = (conn, msg.request_id)
        if self.bridge is None:
            self.answered(target, None, PeerUnavailable(f"device {msg.device_id} is not connected"))
        else:
            self.bridge.request(msg.device_id, msg.topic, msg.payload, target, monotonic())

    # -- the API ----------------------------------------------------------------------

    async def send_local(self, device: str, topic: str, payload: bytes) -> None:
        """Send to a device on our own serial ports, waiting for room in its link."""
        bridge = self.bridge
        assert bridge is not None
        while not bridge.has_room(device):
            await bridge.wait_for_room(device)
            if device not in bridge.devices:
                raise PeerUnavailable(f"device {device} went down while the send waited")
        why = bridge.send_data(device, topic, payload, monotonic())
        if why is not None:
            raise PeerUnavailable(f"device {device}: {why}")

    def request_local(self, pending: Pending, payload: bytes) -> None:
        """Ask a device on our own serial ports; the bridge resolves ``pending``."""
        assert self.bridge is not None and pending.device is not None
        self.bridge.request(pending.device, pending.topic, payload, pending, monotonic())

    # -- BridgeHost: what our own devices do (called from the dispatcher) ----------------

    def device_changed(self, device_id: str, *, up: bool, reason: str | None) -> None:
        """One of our devices came up or went down: tell the application and peers."""
        address = self.device_address(device_id)
        if up:
            self.events.publish(PeerUp(address, self.node_id, "serial"))
            self.on_up(address)
        else:
            self.events.publish(PeerDown(address, self.node_id, reason or "down"))
        assert self.bridge is not None
        self._queue_to_peers(frame_of(Devices(sorted(self.bridge.devices))), False)

    def delivery(self, port: Port) -> Awaitable[None]:
        """The port's delivery task (edgenode.device_delivery), for the bridge to run."""
        return self._delivery.run(port)

    def publish(self, device_id: str, topic: str, payload: bytes) -> Incoming:
        """One of our devices published: queue it to every peer, best effort
        (as ``Node.broadcast``: a full connection does not get it, counted),
        and return it for our own subscribers (the delivery task waits for them)."""
        assert self.sending is not None
        _, dropped = self.sending.queue_to_all(frame_of(FromDevice(device_id, topic, payload)))
        if dropped:
            self.publish_dropped += dropped
            if first_of_a_power_of_ten(self.publish_dropped):
                log.warning(
                    "message from device %s on %r not sent to %d peer(s) whose connection is "
                    "full (best effort, as a broadcast; %d so far)",
                    device_id,
                    topic,
                    dropped,
                    self.publish_dropped,
                )
        return Incoming(self.device_address(device_id), self.node_id, topic, payload)

    def route(
        self, device_id: str, dest: str, topic: str, payload: bytes
    ) -> tuple[str | None, Any]:
        """Where one of our devices' send_to goes: ``(peer ip, frame)`` for a
        peer or a device it bridges, ``(None, device id)`` for one of ours.

        Raises :class:`PeerUnavailable` (or :class:`InvalidArgument` for a bad
        address) when it cannot go anywhere.
        """
        assert self.sending is not None
        node, device = split_address(dest)
        ip = self._address() if node == LOCAL else self.sending.resolve_node(node)
        if device is not None and self.is_local(ip):
            return None, device
        message: AnyMessage
        if device is None:
            message = FromDevice(device_id, topic, payload)
        else:
            message = ToDevice(device, topic, payload)
        return ip, frame_of(message)

    def device_asks(
        self, port: Port, session: int, device_id: str, request_id: int, topic: str, payload: bytes
    ) -> None:
        """One of our devices asks this node: run the topic's handler."""
        from .bridge import DeviceAnswer

        async def reply(status: int, answer: bytes | str) -> None:
            await self.inbox.post(DeviceAnswer(port, session, request_id, status, answer))

        incoming = Incoming(self.device_address(device_id), self.node_id, topic, payload)
        refused = self.requests.start_for_device(self._task_group(), incoming, reply)
        if refused is not None and self.bridge is not None:
            answer = DeviceAnswer(port, session, request_id, *refused)
            self.bridge.on_answer(answer, monotonic())

    def answered(self, target: Any, payload: bytes | None, error: EdgeNodeError | None) -> None:
        """A device answered (or could not answer) a request made of it."""
        if isinstance(target, Pending):
            target.finish(payload, error)
            return
        conn, request_id = target
        if conn.closing:
            return
        if error is None:
            frame = answer_frame(request_id, 0, payload or b"")
        elif isinstance(error, RemoteError):
            text = f"device error {error.code}: {error.remote_message}"
            frame = frame_of(ErrorResponse(request_id, ERR_DEVICE_FAILED, clip(text)))
        elif isinstance(error, TooManyPending):
            frame = frame_of(ErrorResponse(request_id, ERR_BUSY, clip(str(error))))
        else:
            frame = frame_of(ErrorResponse(request_id, ERR_NO_DEVICE, clip(str(error))))
        conn.queue_nowait(frame)

    def schedule_link_tick(self, port: Port, when: float) -> None:
        """Call the bridge's ``on_tick(port)`` at ``when`` (the dispatcher's timers)."""
        assert self.bridge is not None
        bridge = self.bridge

        def tick(now: float) -> None:
            if port.tick_at == when:
                bridge.on_tick(port, now)

        self._schedule(when, tick)

    def lost(self, what: str, why: str) -> None:
        """Count a message from or for a device that was not delivered; log the
        1st, 10th, 100th ... (a flood must not flood the journal)."""
        self.lost_count += 1
        if first_of_a_power_of_ten(self.lost_count):
            log.warning("%s: %s (%d device messages lost so far)", what, why, self.lost_count)
