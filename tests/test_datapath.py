"""The data path: a connection's reader and writer (edgenode/datapath.py) and the
connection's best-effort queueing (edgenode/connection.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from edgenode.connection import Connection
from edgenode.datapath import COALESCE_BYTES, take_write
from edgenode.mailbox import Mailbox
from edgenode.node import Node, PeerUp
from edgenode.proto.connection import PeerProtocol
from edgenode.proto.messages import Hello, Ping, Pong

from .conftest import RawPeer, wait_event

pytestmark = pytest.mark.anyio


def connection(outbox_frames: int) -> Connection:
    link = SimpleNamespace(
        stream=None, peer_ip="127.0.0.9", peer_port=7300, local_ip="127.0.0.2", peer_node_id="n"
    )
    proto = SimpleNamespace(their_hello=Hello("n", 7300, 1))
    return Connection(link, "inbound", proto, outbox_frames, 0.0)  # type: ignore[arg-type]


def test_queue_droppable_drops_on_a_full_outbox_counts_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = connection(outbox_frames=2)
    caplog.set_level(logging.WARNING, logger="edgenode.node")
    assert conn.queue_droppable(b"1") and conn.queue_droppable(b"2")
    assert [conn.queue_droppable(b"x") for _ in range(100)] == [False] * 100
    assert (conn.drops, len(conn.outbox)) == (100, 2)
    # A line at the first drop and at every 100th, not one per drop.
    assert [r.getMessage() for r in caplog.records] == [
        "peer 127.0.0.9 is not reading: outbox full (2 frames); dropped "
        f"best-effort traffic ({n} drops)"
        for n in (1, 100)
    ]


def test_queue_droppable_on_a_closed_outbox_neither_counts_nor_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = connection(outbox_frames=2)
    conn.outbox.close()
    with caplog.at_level(logging.WARNING, logger="edgenode.node"):
        assert not conn.queue_droppable(b"late pong")
    assert conn.drops == 0 and not caplog.records


def test_take_write_joins_queued_frames_up_to_the_coalescing_bound() -> None:
    box: Mailbox[bytes] = Mailbox(1000)
    small = b"s" * 1000
    for _ in range(100):
        box.put_nowait(small)
    first = take_write(box)
    # Frames are never split: the write that crosses the bound ends it.
    assert len(first) == 1000 * -(-COALESCE_BYTES // 1000)
    assert len(take_write(box)) == 100 * 1000 - len(first)
    assert not box


def test_take_write_sends_a_large_frame_alone() -> None:
    box: Mailbox[bytes] = Mailbox(8)
    big, small = b"b" * COALESCE_BYTES, b"s"
    for frame in (big, small, small):
        box.put_nowait(frame)
    assert take_write(box) == big
    assert take_write(box) == small + small


async def test_a_peers_pings_are_answered_by_its_reader_not_the_dispatcher(
    make_config: Any, identities: Any
) -> None:
    # The node's own keepalive is slow, so nothing but the peer's pings
    # crosses the connection: each is answered, and none costs the
    # dispatcher an event (or a wake-up).
    config = make_config("a", "127.0.0.2", keepalive_interval_s=30.0, keepalive_timeout_s=90.0)
    async with Node(config) as a:
        events = a.events()
        peer = await RawPeer.connect(identities["raw"], "127.0.0.2", a.listen_port)
        try:
            await peer.hello(identities["raw"])
            await wait_event(events, lambda e: isinstance(e, PeerUp) and e.peer == "127.0.0.9")
            before = a.dispatcher.events_handled
            for nonce in range(1, 21):
                await peer.send(PeerProtocol.send(Ping(nonce)))
                with anyio.fail_after(10):
                    pong = await peer.next_of(Pong)
                assert pong.nonce == nonce
            assert a.dispatcher.events_handled == before
            [row] = a.peers()
            assert row.their_frames_arriving
        finally:
            await peer.aclose()


async def test_an_idle_connection_keeps_no_message_or_write_alive(make_config: Any) -> None:
    # A connection that carried a large message and fell idle must not pin
    # it while its reader and writer wait: with 200 such peers that was up
    # to 25 MB (the last message read and the last write, per connection).
    import gc
    import tracemalloc

    async with Node(make_config("a", "127.0.0.2")) as a:
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            await wait_event(b.events(), lambda e: isinstance(e, PeerUp))
            with a.subscribe("t") as at_a, b.subscribe("t") as at_b:
                tracing = tracemalloc.is_tracing()
                if not tracing:
                    tracemalloc.start()
                try:
                    for i in range(3):
                        await b.send("127.0.0.2", "t", bytes([i]) * 60_000)
                        with anyio.fail_after(10):
                            assert len((await at_a.receive()).payload) == 60_000
                        await a.send("127.0.0.3", "t", bytes([i]) * 60_000)
                        with anyio.fail_after(10):
                            assert len((await at_b.receive()).payload) == 60_000
                    await anyio.wait_all_tasks_blocked()
                    gc.collect()
                    snapshot = tracemalloc.take_snapshot()
                finally:
                    if not tracing:
                        tracemalloc.stop()
    pinned = [
        str(trace.traceback)
        for trace in snapshot.traces
        if trace.size >= 60_000 and "edgenode" in str(trace.traceback)
    ]
    assert pinned == []
