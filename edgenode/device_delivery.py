"""Each serial port's delivery task: what its devices send, delivered in order, waiting.

The dispatcher never waits, so it only puts what a device sent into the
port's bounded delivery queue (edgenode.bridge). This task takes it from
there, one message at a time and in the order the device sent them, and
is the one that waits, as a connection's reader does for data from a peer
(docs/architecture.md, "Bridged devices"):

- **publish** (data): to this node's matching subscriptions, waiting for
  room in each (a subscription that takes nothing for its stall bound is
  ended, as for any source); to every peer, best effort, as
  ``Node.broadcast`` does: a peer whose connection is full does not get it,
  counted (``device_publish_dropped``, the peer's ``drops``);
- **send_to** (data for one address): waits for room on that peer's
  connection, or in that local device's link; lost (counted and logged) only
  if the address is unknown or goes down;
- **request**: starts the node's handler for it, which never waits (a node
  too busy answers "busy").

While this task waits, the queue fills; in reliable mode the link then
holds the device's next messages back, and the device's ``publish`` waits:
the pressure reaches the device, and nothing is lost.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from firmware_bridge.frame import KIND_DATA, KIND_REQUEST, KIND_SEND_TO

from .api import Incoming
from .errors import EdgeNodeError

if TYPE_CHECKING:
    from .bridge import SerialBridge
    from .bridge_ports import Port
    from .subscriptions import Subscriptions

log = logging.getLogger("edgenode.bridge")


class PeerSender(Protocol):
    """The node's way to its peers' outboxes (edgenode.sending.Sending)."""

    async def put(self, ip: str, frame: bytes) -> Any:
        """Queue ``frame`` on the peer's connection, waiting for room; raise PeerUnavailable."""

    def queue_to_all(self, frame: bytes) -> tuple[int, int]:
        """Queue a best-effort frame to every up peer with room: (queued, dropped)."""

    def resolve_node(self, node: str) -> str:
        """An IP for the node part of an address (an IP, or a known node ID)."""


class Router(Protocol):
    """What a delivery task needs of the device router (edgenode.devices)."""

    bridge: SerialBridge | None
    subs: Subscriptions
    sending: PeerSender

    def publish(self, device_id: str, topic: str, payload: bytes) -> Incoming:
        """Queue a device's publish to every peer, best effort; return it for our subscribers."""

    def route(
        self, device_id: str, dest: str, topic: str, payload: bytes
    ) -> tuple[str | None, Any]:
        """Where a device's send_to goes: (peer ip, frame) or (None, local device id)."""

    async def send_local(self, device: str, topic: str, payload: bytes) -> None:
        """Send to a device on our own ports, waiting for room in its link."""

    def device_asks(
        self, port: Port, session: int, device_id: str, request_id: int, topic: str, payload: bytes
    ) -> None:
        """Start the node's handler for a device's request."""

    def lost(self, what: str, why: str) -> None:
        """Count and log a message from a device that was not delivered."""


class DeviceDelivery:
    """Runs the delivery task of each port (see the module docstring)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def run(self, port: Port) -> None:
        """Deliver what ``port``'s devices send, in order, until cancelled."""
        router = self.router
        box = port.delivery
        while True:
            device_id, session, msg = await box.get()
            bridge = router.bridge
            if bridge is not None:
                bridge.room_freed(port)
            try:
                await self._deliver(port, device_id, session, msg)
            except EdgeNodeError as exc:
                port.undelivered += 1
                what = f"message from device {device_id} on {msg.topic!r} not delivered"
                router.lost(what, str(exc))
            except Exception:  # a bug: keep the port's deliveries going
                port.undelivered += 1
                log.exception("delivering a message from device %s failed", device_id)

    async def _deliver(self, port: Port, device_id: str, session: int, msg: Any) -> None:
        router = self.router
        kind = msg.kind
        if kind == KIND_DATA:
            incoming = router.publish(device_id, msg.topic, msg.payload)
            await router.subs.deliver(incoming)
        elif kind == KIND_SEND_TO:
            ip, target = router.route(device_id, msg.dest, msg.topic, msg.payload)
            if ip is None:
                await router.send_local(target, msg.topic, msg.payload)
            else:
                await router.sending.put(ip, target)
        elif kind == KIND_REQUEST:
            if session == port.session:  # else asked in a session that has ended
                router.device_asks(port, session, device_id, msg.req_id, msg.topic, msg.payload)
