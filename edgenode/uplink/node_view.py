"""The node as the uplink sees it: a typing Protocol of the public API it uses.

:class:`~.uplink.Uplink` is handed the running ``edgenode.node.Node`` but
never imports that module: the node imports the uplink (when one is
configured), so an import the other way would be a circle. This Protocol
names the part of the node's public API the uplink calls, so the uplink is
type-checked against it; any object with these members (the node) fits.
It holds no code that runs, and imports the node's types for type checking
only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..api import PeerSnapshot
    from ..config import NodeConfig
    from ..subscriptions import Stream


class Node(Protocol):
    """The node's public API, as far as the uplink uses it (``edgenode.node.Node``)."""

    config: NodeConfig
    node_id: str

    async def send(
        self, peer: str, topic: str, payload: bytes, *, wait_s: float | None = None
    ) -> None:
        """Send to a peer or a device."""

    async def broadcast(self, topic: str, payload: bytes) -> int:
        """Best-effort to every peer."""

    async def publish_local(self, topic: str, payload: bytes, *, source: str = "local") -> int:
        """Deliver to this node's own subscribers."""

    def subscribe(self, topic: str) -> Stream:
        """Messages on a topic."""

    def events(self) -> Stream:
        """PeerUp, PeerDown, Refused."""

    def peers(self) -> list[PeerSnapshot]:
        """The peer table."""

    def device_address(self, device_id: str) -> str:
        """The address of a device on this node's ports."""
