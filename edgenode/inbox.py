"""The dispatcher's inbox: what sources tell the owner of peer state.

Sources (a connection's reader, handshakes and dials, the serial bridge,
discovery, ``add_peer`` and shutdown) post the events below and may wait
for room; the dispatcher takes them and never waits on anything else.
Only what changes peer state comes through here: connections opened and
closed, handshakes that failed, pongs (our pings' round trips), bye,
ready, peer and device lists. Application data does not, nor do the
peer's pings, which its connection's reader answers itself
(docs/architecture.md, "The data path").

Each event records when it was posted, for the loop-lag figure.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from anyio import ClosedResourceError

from .errors import EdgeNodeError, NodeClosed
from .mailbox import Mailbox

if TYPE_CHECKING:
    from .connection import Connection
    from .proto.messages import AnyMessage

monotonic = time.monotonic


class Event:
    """Base of inbox events: ``t`` is when it was posted."""

    __slots__ = ("t",)


class Opened(Event):
    """A connection finished its handshake: hellos exchanged, not yet admitted."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn, self.t = conn, monotonic()


class Control(Event):
    """Messages for the dispatcher from a connection's reader, in arrival order."""

    __slots__ = ("conn", "msgs")

    def __init__(self, conn: Connection, msgs: list[AnyMessage]) -> None:
        self.conn, self.msgs, self.t = conn, msgs, monotonic()


class Closed(Event):
    """A connection's transport ended, or its reader or writer failed."""

    __slots__ = ("conn", "error", "reason")

    def __init__(self, conn: Connection, reason: str, error: EdgeNodeError | None) -> None:
        self.conn, self.reason, self.error, self.t = conn, reason, error, monotonic()


class Failed(Event):
    """A handshake (inbound) or dial (outbound, ``dialled``) failed.

    ``recorded``: the listener already counted it in the node's refusal
    log (and logged the line the log allowed).
    """

    __slots__ = ("dialled", "error", "ip", "recorded")

    def __init__(
        self, ip: str, error: EdgeNodeError, dialled: bool, recorded: bool = False
    ) -> None:
        self.ip, self.error, self.dialled, self.t = ip, error, dialled, monotonic()
        self.recorded = recorded


class AddPeer(Event):
    """``Node.add_peer``: dial ``ip:port`` and keep it connected."""

    __slots__ = ("ip", "port")

    def __init__(self, ip: str, port: int) -> None:
        self.ip, self.port, self.t = ip, port, monotonic()


class Revoked(Event):
    """``Node.reload_trust``: these node IDs are no longer trusted."""

    __slots__ = ("node_ids",)

    def __init__(self, node_ids: frozenset[str]) -> None:
        self.node_ids, self.t = node_ids, monotonic()


class Shutdown(Event):
    """The node is closing: say bye to every peer."""

    __slots__ = ()

    def __init__(self) -> None:
        self.t = monotonic()


class Inbox:
    """The bounded queue of events for the dispatcher."""

    __slots__ = ("box",)

    def __init__(self, size: int) -> None:
        self.box: Mailbox[Event] = Mailbox(size)

    async def post(self, event: Event) -> None:
        """Queue ``event``, waiting for room. Raises :class:`NodeClosed` once
        the dispatcher has stopped."""
        try:
            await self.box.put(event)
        except ClosedResourceError:
            raise NodeClosed("node is closed") from None

    def __len__(self) -> int:
        return len(self.box)
