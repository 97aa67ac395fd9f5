"""What the application sees: the types the :class:`~edgenode.node.Node` API
takes and returns.

``Incoming`` is made once per message received, so it is a plain class with
slots (a frozen dataclass costs about a microsecond more per message); the
rest are frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Union

from .errors import EdgeNodeError


class Incoming:
    """A message or request from a peer, as handed to the application.

    ``peer`` is the sender's IP (``ip/device`` for a bridged microcontroller),
    ``node_id`` the node it came through.
    """

    __slots__ = ("node_id", "payload", "peer", "topic")

    def __init__(self, peer: str, node_id: str, topic: str, payload: bytes) -> None:
        self.peer = peer
        self.node_id = node_id
        self.topic = topic
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        if type(other) is not Incoming:
            return NotImplemented
        return (self.peer, self.node_id, self.topic, self.payload) == (
            other.peer,
            other.node_id,
            other.topic,
            other.payload,
        )

    def __hash__(self) -> int:
        return hash((self.peer, self.node_id, self.topic, self.payload))

    def __repr__(self) -> str:
        return (
            f"Incoming(peer={self.peer!r}, node_id={self.node_id!r}, topic={self.topic!r}, "
            f"payload={self.payload[:32]!r}{'...' if len(self.payload) > 32 else ''})"
        )


@dataclass(frozen=True)
class PeerUp:
    """A peer's connection became live (``restarted``: it has a new session)."""

    peer: str
    node_id: str
    direction: str
    restarted: bool = False


@dataclass(frozen=True)
class PeerDown:
    """A peer's live connection ended; ``reason`` says why."""

    peer: str
    node_id: str | None
    reason: str
    error: EdgeNodeError | None = None


@dataclass(frozen=True)
class Refused:
    """A connection was refused or failed before it became live."""

    peer: str
    error: EdgeNodeError


NodeEvent = Union[PeerUp, PeerDown, Refused]


@dataclass(frozen=True)
class PeerSnapshot:
    """One row of :meth:`Node.peers`: what the node knows of a peer now."""

    ip: str
    node_id: str | None
    #: "up" (a live, settled connection), "connecting" (admitted, waiting for
    #: the peer's ready) or "down".
    state: str
    direction: str | None
    listen_port: int | None
    up_for_s: float | None
    down_reason: str | None
    rtt_s: float | None
    our_pings_answered: bool
    their_frames_arriving: bool
    last_heard_s: float | None
    bytes_in: int
    bytes_out: int
    #: Best-effort frames (broadcasts, pings, peer lists) dropped for a full outbox.
    drops: int
    #: Microcontrollers this peer bridges (addressed as ``ip/device``).
    devices: tuple[str, ...] = ()
    #: Frames waiting in the outbox.
    queued: int = 0
    #: How long our reader has been paused by a full local subscriber, if it is.
    paused_s: float | None = None
    #: When the next dial of a peer that is down is due, in seconds from now.
    redial_in_s: float | None = None
    #: The host name this peer is configured by, if it is (edgenode.names).
    name: str | None = None


#: ``await handler(request) -> bytes``: answers requests on a topic.
Handler = Callable[[Incoming], Awaitable[bytes]]
