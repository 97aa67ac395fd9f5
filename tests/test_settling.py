"""Settling a connection: two dispatchers driven event by event, no sockets.

docs/architecture.md, "Simultaneous open". Each test plays one order of
events on the two nodes of a simultaneous open, carrying the ready frames
between them by hand, and checks that both keep the same connection, that
data could never have been queued on the one that loses, and that the
application sees one PeerUp and no PeerDown.
"""

from __future__ import annotations

import random
import socket
from types import SimpleNamespace
from typing import Any

from edgenode.api import PeerDown, PeerUp
from edgenode.connection import Connection
from edgenode.devices import DeviceRouter
from edgenode.dispatcher import Dispatcher
from edgenode.inbox import Control, Failed, Inbox, Opened, Revoked
from edgenode.keepalive import Keepalive
from edgenode.learning import PeerLearning
from edgenode.names import PeerNames
from edgenode.proto.messages import Hello, Ready
from edgenode.refusals import RefusalLog
from edgenode.registry import INBOUND, OUTBOUND, Registry
from edgenode.requests import Requests
from edgenode.subscriptions import EventFeed, Subscriptions

LOW, HIGH, OTHER = "127.0.0.2", "127.0.0.3", "127.0.0.4"
EPOCH = {LOW: 11, HIGH: 22, OTHER: 33}
READY_FRAME = b"\x00\x00\x00\x02\x81\x0d"


class Side:
    """One node's dispatcher and what it published."""

    def __init__(self, ip: str) -> None:
        config = SimpleNamespace(keepalive_timeout_s=15.0, shutdown_grace_s=1.0)
        self.ip = ip
        self.registry = Registry(ip, max_peers=8, prune_after_s=60.0, simultaneous_window_s=10.0)
        keepalive = Keepalive(interval_s=5.0, timeout_s=15.0, rand=random.Random(1).random)
        inbox = Inbox(16)
        self.events = EventFeed()
        self.stream = self.events.open(32)
        requests = Requests(max_pending=8, max_inflight=8, handler_timeout_s=5.0, traffic=print)
        learning = PeerLearning(
            node_id=f"node-{ip}",
            registry=self.registry,
            keepalive=keepalive,
            is_authorised=lambda _: True,
            learn_from_peers=False,
            state_dir=None,
            max_known_peers=8,
        )
        devices = DeviceRouter(
            node_id=f"node-{ip}",
            address=lambda: ip,
            registry=self.registry,
            subscriptions=Subscriptions(stall_timeout_s=1.0),
            events=self.events,
            requests=requests,
            inbox=inbox,
            queue_to_peers=lambda frame, droppable: None,
            schedule=lambda when, callback: None,
            task_group=lambda: None,
        )
        self.dispatcher = Dispatcher(
            config=config,
            registry=self.registry,
            keepalive=keepalive,
            inbox=inbox,
            events=self.events,
            requests=requests,
            learning=learning,
            devices=devices,
            start_dial=lambda ip, port: None,
            spawn=lambda *args: None,
            wildcard=False,
            max_peers_listed=64,
            refusals=RefusalLog(),
            names=PeerNames(
                registry=self.registry,
                keepalive=keepalive,
                spawn=lambda *args: None,
                post=inbox.post,
                timeout_s=5.0,
                prefer_family=socket.AF_INET,
                our_ip=lambda: ip,
            ),
            is_authorised=lambda node_id: node_id not in self.revoked,
        )
        #: Node IDs this side no longer trusts.
        self.revoked: set[str] = set()

    def connection(self, peer: str, direction: str, started_at: float) -> Connection:
        link = SimpleNamespace(
            stream=None, peer_ip=peer, peer_port=7300, local_ip=self.ip, peer_node_id=f"node-{peer}"
        )
        proto = SimpleNamespace(their_hello=Hello(f"node-{peer}", 7300, EPOCH[peer]))
        return Connection(link, direction, proto, 128, started_at)  # type: ignore[arg-type]

    def opened(self, conn: Connection, now: float) -> None:
        self.dispatcher.handlers[Opened](Opened(conn), now)

    def dial_failed(self, peer: str, now: float) -> None:
        from edgenode.errors import HandshakeError

        self.dispatcher.handlers[Failed](Failed(peer, HandshakeError("refused"), True), now)

    def ready_arrives(self, conn: Connection, now: float) -> None:
        """The peer's ready, read by the connection's reader, reaches us."""
        conn.ready_received = True
        self.dispatcher.handlers[Control](Control(conn, [Ready()]), now)

    def published(self) -> list[Any]:
        seen = []
        while True:
            try:
                seen.append(self.stream.receive_nowait())
            except Exception:
                return seen


def sent_ready(conn: Connection) -> bool:
    return READY_FRAME in list(conn.outbox._items)


def assert_one_peer_up(side: Side, peer: str) -> None:
    events = side.published()
    assert [e.peer for e in events if isinstance(e, PeerUp)] == [peer], events
    assert not [e for e in events if isinstance(e, PeerDown)], events


def test_the_lower_side_waits_for_its_own_dial_before_saying_ready() -> None:
    """Regression (found by the soak): the lower IP said ready at once on the
    higher IP's connection while its own dial was on its way; when that dial
    arrived after the connection had settled, rule 4e took it for a redial
    after a loss and replaced the settled connection on both sides: PeerUp,
    PeerDown, PeerUp, and what had been written on it was lost."""
    low, high = Side(LOW), Side(HIGH)
    low.dispatcher.dials.dialing.add(HIGH)  # both dial at once
    high.dispatcher.dials.dialing.add(LOW)
    # The higher side's dial lands first on both sides.
    h_at_high, h_at_low = high.connection(LOW, OUTBOUND, 1.0), low.connection(HIGH, INBOUND, 1.0)
    high.opened(h_at_high, 2.0)
    low.opened(h_at_low, 2.0)
    assert sent_ready(h_at_high)  # its own dial: nothing can displace it
    assert not sent_ready(h_at_low)  # the lower side's dial is still on its way
    # The lower side's dial lands late, on both sides.
    l_at_low, l_at_high = low.connection(HIGH, OUTBOUND, 1.0), high.connection(LOW, INBOUND, 1.0)
    low.opened(l_at_low, 3.0)  # refused: the tie keeps the higher's dial
    assert l_at_low.closing and sent_ready(h_at_low)
    # Worst order on the higher side: the lower's ready before its late dial.
    high.ready_arrives(h_at_high, 3.1)
    high.opened(l_at_high, 3.2)
    low.ready_arrives(h_at_low, 3.3)
    for side, conn, peer in ((low, h_at_low, HIGH), (high, h_at_high, LOW)):
        entry = side.registry.get(peer)
        assert entry is not None and entry.conn is conn and conn.settled
        assert_one_peer_up(side, peer)
    assert l_at_high.closing


def test_the_higher_side_waits_for_its_own_dial_and_keeps_it() -> None:
    low, high = Side(LOW), Side(HIGH)
    low.dispatcher.dials.dialing.add(HIGH)
    high.dispatcher.dials.dialing.add(LOW)
    # The lower side's dial lands first on both sides.
    l_at_low, l_at_high = low.connection(HIGH, OUTBOUND, 1.0), high.connection(LOW, INBOUND, 1.0)
    low.opened(l_at_low, 2.0)
    high.opened(l_at_high, 2.0)
    assert sent_ready(l_at_low) and not sent_ready(l_at_high)
    h_at_high, h_at_low = high.connection(LOW, OUTBOUND, 1.0), low.connection(HIGH, INBOUND, 1.0)
    high.opened(h_at_high, 3.0)  # the tie keeps it; the lower's is replaced
    low.opened(h_at_low, 3.0)
    assert l_at_high.closing and l_at_low.closing
    assert not l_at_low.settled and not l_at_high.settled  # never carried data
    high.ready_arrives(h_at_high, 3.1)
    low.ready_arrives(h_at_low, 3.1)
    assert h_at_high.settled and h_at_low.settled
    assert_one_peer_up(low, HIGH)
    assert_one_peer_up(high, LOW)


def test_a_dial_that_fails_releases_the_ready_it_held() -> None:
    low, high = Side(LOW), Side(HIGH)
    low.dispatcher.dials.dialing.add(HIGH)
    h_at_low, h_at_high = low.connection(HIGH, INBOUND, 1.0), high.connection(LOW, OUTBOUND, 1.0)
    high.opened(h_at_high, 2.0)
    low.opened(h_at_low, 2.0)
    assert not sent_ready(h_at_low)
    low.dial_failed(HIGH, 2.5)
    assert sent_ready(h_at_low)
    low.ready_arrives(h_at_low, 2.6)
    high.ready_arrives(h_at_high, 2.6)
    assert h_at_low.settled and h_at_high.settled


def test_a_dial_started_after_settling_replaces_the_settled_connection() -> None:
    """Rule 4e: the peer lost the settled connection and dialled again."""
    low, high = Side(LOW), Side(HIGH)
    h_at_high, h_at_low = high.connection(LOW, OUTBOUND, 1.0), low.connection(HIGH, INBOUND, 1.0)
    high.opened(h_at_high, 2.0)
    low.opened(h_at_low, 2.0)
    high.ready_arrives(h_at_high, 2.1)
    low.ready_arrives(h_at_low, 2.1)
    assert h_at_high.settled
    redial = high.connection(LOW, INBOUND, 5.0)  # low lost its end and dialled again
    high.opened(redial, 5.5)
    assert h_at_high.closing and high.registry.get(LOW).conn is redial  # type: ignore[union-attr]
    events = high.published()
    assert [type(e) for e in events] == [PeerUp, PeerDown]
    assert events[1].reason == "superseded by a newer connection: the peer had lost this one"


# -- trust revoked -----------------------------------------------------------------------


def test_a_connection_whose_node_was_revoked_during_its_handshake_is_refused() -> None:
    # The handshake checked trust before the revoke; the dispatcher checks again.
    low = Side(LOW)
    conn = low.connection(HIGH, INBOUND, started_at=0.0)
    low.revoked.add(f"node-{HIGH}")
    low.opened(conn, 1.0)
    assert conn.closing and conn.close_reason == f"node node-{HIGH} is no longer authorised"
    assert low.registry.get(HIGH) is None or low.registry.get(HIGH).state != "up"
    assert [type(e).__name__ for e in low.published()] == ["Refused"]


def test_revoking_a_node_closes_its_connection_and_no_other() -> None:
    low = Side(LOW)
    conns = {peer: low.connection(peer, INBOUND, started_at=0.0) for peer in (HIGH, OTHER)}
    for conn in conns.values():
        low.opened(conn, 1.0)
        low.ready_arrives(conn, 1.1)
    low.published()
    low.revoked.add(f"node-{HIGH}")
    low.dispatcher.handlers[Revoked](Revoked(frozenset([f"node-{HIGH}"])), 2.0)
    assert conns[HIGH].closing
    assert conns[HIGH].close_reason == f"node node-{HIGH} is no longer authorised"
    assert not conns[OTHER].closing
    assert [(type(e).__name__, e.peer) for e in low.published()] == [("PeerDown", HIGH)]
