"""Delivery: what send() accepted reaches the subscriber exactly once, in order.

docs/architecture.md, "Delivery". Real nodes over TLS on loopback; every
message carries its sender's sequence number, and the receiver checks
that it got each one once, in order. No test here tunes a buffer to make
it pass: the nodes run with the defaults a user has, except the keepalive
timings (short, so that "several keepalive timeouts" is a few seconds).
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest

from edgenode.errors import NodeClosed, RemoteError, SubscriberStalled
from edgenode.node import Incoming, Node, PeerDown, PeerUp

from .conftest import echo, pending, wait_event, wait_until

pytestmark = pytest.mark.anyio

SEQ = struct.Struct(">Q")
A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"
#: Generous bounds: they must hold on a board ten times slower than this machine.
EVENT_S = 20.0


def numbered(seq: int, size: int = SEQ.size) -> bytes:
    return SEQ.pack(seq) + bytes(max(0, size - SEQ.size))


def seq_of(message: Incoming) -> int:
    return int(SEQ.unpack_from(message.payload)[0])


@asynccontextmanager
async def mesh(make_config: Any, count: int, **overrides: Any) -> AsyncIterator[list[Node]]:
    """``count`` nodes on A, B, C..., each dialling the ones before it, all up."""
    ips = [A, B, C][:count]
    names = ["a", "b", "c"][:count]
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for name, ip in zip(names, ips):
            peers = [(n.config.listen_host, n.listen_port) for n in nodes]
            node = await stack.enter_async_context(
                Node(make_config(name, ip, peers, **overrides))
            )
            node.handle("echo", echo)
            nodes.append(node)

        def all_up() -> bool:
            return all(
                sorted(p.ip for p in n.peers() if p.state == "up")
                == sorted(ip for ip in ips if ip != n.config.listen_host)
                for n in nodes
            )

        await wait_until(all_up, timeout=EVENT_S)
        yield nodes


async def test_hundred_thousand_messages_arrive_once_and_in_order(make_config: Any) -> None:
    count = 100_000
    async with mesh(make_config, 2) as (a, b):
        with b.subscribe("seq") as sub:  # a default subscription, as the README shows

            async def produce() -> None:
                for seq in range(count):
                    await a.send(B, "seq", numbered(seq))

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                with anyio.fail_after(120):
                    for expected in range(count):
                        message = await sub.receive()
                        assert seq_of(message) == expected
                        assert message.peer == A
        assert b.stats()["subscription_drops"] == 0
        assert b.stats()["unrouted_messages"] == 0


async def test_send_many_at_volume_arrives_once_and_in_order(make_config: Any) -> None:
    count, batch = 100_000, 500
    async with mesh(make_config, 2) as (a, b):
        with b.subscribe("seq") as sub:

            async def produce() -> None:
                for start in range(0, count, batch):
                    payloads = [numbered(s) for s in range(start, start + batch)]
                    assert await a.send_many(B, "seq", payloads) == batch

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                with anyio.fail_after(120):
                    for expected in range(count):
                        assert seq_of(await sub.receive()) == expected


async def test_slow_consumer_slows_the_sender_and_loses_nothing(make_config: Any) -> None:
    """A consumer that sleeps per message, a sender as fast as it can go: the
    sender's send() waits, nothing is lost, neither node declares the other
    dead over several keepalive timeouts, and a third node's round trips to
    both stay as quick as before the transfer."""
    size = 32 * 1024  # big enough that the sockets' own buffers fill in a few seconds
    async with mesh(make_config, 3) as (a, b, c):
        timeout_s = a.config.keepalive_timeout_s
        events = [n.events() for n in (a, b)]
        received: list[int] = []
        sent = 0
        stop = anyio.Event()

        async def round_trips(rounds: int | None) -> list[float]:
            times = []
            while (rounds is None and not stop.is_set()) or len(times) < (rounds or 0):
                for ip in (A, B):
                    t0 = time.monotonic()
                    assert await c.request(ip, "echo", b"rtt", timeout=EVENT_S) == b"rtt"
                    times.append(time.monotonic() - t0)
                await anyio.sleep(0.05)  # a probe's own rhythm, not synchronisation
            return times

        before = await round_trips(20)
        during: list[float] = []

        async def consume(sub: Any) -> None:
            async for message in sub:
                received.append(seq_of(message))
                await anyio.sleep(0.002)  # a slow consumer
                if stop.is_set() and len(received) == sent:
                    return

        async def produce() -> None:
            nonlocal sent
            started = time.monotonic()
            # Until the sender has been held back for three keepalive
            # timeouts in all, and the transfer has lasted at least that long.
            while a.stats()["send_waited_s"] < 3 * timeout_s or (
                time.monotonic() - started < 3 * timeout_s
            ):
                await a.send(B, "bulk", numbered(sent, size))
                sent += 1
            stop.set()

        async def probe() -> None:
            during.extend(await round_trips(None))

        with b.subscribe("bulk") as sub:
            with anyio.fail_after(240):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume, sub)
                    tg.start_soon(probe)
                    await produce()
        assert received == list(range(sent))
        assert a.stats()["send_waits"] > 0
        for stream in events:  # no PeerDown on either side, no Refused
            assert pending(stream) == []
        assert all(p.state == "up" for p in a.peers() + b.peers() + c.peers())
        # The third node's requests never queued behind the bulk transfer.
        # Medians, against the same machine a moment before, with room for a
        # loaded machine: a figure belongs in the benchmark, not here.
        usual, now = statistics.median(before), statistics.median(during)
        assert now < max(10 * usual, 0.25), f"median round trip {now:.4f} s, before {usual:.4f} s"


async def test_stuck_consumer_is_ended_with_a_clear_error_and_the_node_carries_on(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with mesh(make_config, 3, subscriber_stall_timeout_s=1.0) as (a, b, c):
        stuck = b.subscribe("alerts")
        other = b.subscribe("alerts")
        for seq in range(300):
            await a.send(B, "alerts", numbered(seq))
        # The stuck subscription ends after its bound; the other kept up.
        for expected in range(300):
            with anyio.fail_after(EVENT_S):
                assert seq_of(await other.receive()) == expected
        held = []
        with pytest.raises(SubscriberStalled) as raised:
            while True:
                held.append(seq_of(await stuck.receive()))
        # It hands out what it held first, in order, then the error.
        assert held == list(range(len(held)))
        assert str(raised.value) == (
            "subscription to 'alerts' took nothing for 1 s and was ended; "
            "a message from 127.0.0.2 was not delivered to it"
        )
        assert "subscription to 'alerts' took nothing for 1 s" in caplog.text
        assert b.stats()["subscriptions_stalled"] == 1
        # The node and its peers carry on.
        assert await c.request(B, "echo", b"x", timeout=5) == b"x"
        assert await a.request(B, "echo", b"y", timeout=5) == b"y"


async def test_stuck_consumer_for_one_peer_does_not_slow_another(make_config: Any) -> None:
    async with mesh(make_config, 3) as (a, b, c):
        stuck = b.subscribe("data")  # never read (until the end)
        with c.subscribe("data") as fine:
            blocked = anyio.Event()

            async def flood_b() -> None:
                seq = 0
                while True:
                    await a.send(B, "data", numbered(seq, 16 * 1024))
                    seq += 1
                    if a.stats()["send_waits"]:
                        blocked.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(flood_b)
                with anyio.fail_after(EVENT_S * 3):
                    await blocked.wait()
                # While the sender is held back by b, c gets everything at once.
                for seq in range(2000):
                    await a.send(C, "data", numbered(seq))
                for seq in range(2000):
                    with anyio.fail_after(EVENT_S):
                        assert seq_of(await fine.receive()) == seq
                tg.cancel_scope.cancel()
        stuck.close()


async def test_simultaneous_open_shows_one_peer_up_and_loses_nothing(make_config: Any) -> None:
    """Both nodes dial at once; the application on each side sees one PeerUp and
    no PeerDown, and messages sent from the first moment arrive once, in order."""
    count = 2000
    async with Node(make_config("a", A)) as a, Node(make_config("b", B)) as b:
        a_events, b_events = a.events(), b.events()
        with a.subscribe("seq") as at_a, b.subscribe("seq") as at_b:

            async def send_from_the_start(node: Node, to: str) -> None:
                for seq in range(count):
                    await node.send(to, "seq", numbered(seq), wait_s=EVENT_S)

            async with anyio.create_task_group() as tg:
                tg.start_soon(a.add_peer, B, b.listen_port)
                tg.start_soon(b.add_peer, A, a.listen_port)
                tg.start_soon(send_from_the_start, a, B)
                tg.start_soon(send_from_the_start, b, A)
                for sub in (at_a, at_b):
                    for expected in range(count):
                        with anyio.fail_after(EVENT_S):
                            assert seq_of(await sub.receive()) == expected
        for events, peer in ((a_events, B), (b_events, A)):
            seen = pending(events)
            assert [e.peer for e in seen if isinstance(e, PeerUp)] == [peer], seen
            assert not [e for e in seen if isinstance(e, PeerDown)], seen


# -- bugs found while reading --------------------------------------------------------


async def test_aclose_from_another_task_stops_the_node(make_config: Any) -> None:
    """Regression: aclose() from a task other than the one that entered
    ``async with Node(...)`` raised RuntimeError (a cancel scope exited in
    another task)."""
    async with mesh(make_config, 2) as (a, b):
        down = b.events()
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.aclose)
            tg.start_soon(a.aclose)  # twice, at once: idempotent
        with pytest.raises(NodeClosed):
            await a.send(B, "t", b"")
        gone = await wait_event(down, lambda e: isinstance(e, PeerDown), EVENT_S)
        assert gone.reason == "peer said bye: node shutting down"


async def test_aclose_by_a_caller_cancelled_meanwhile_still_stops_the_node(
    make_config: Any,
) -> None:
    """Regression (dc6a9f6): a caller cancelled while the node said bye left
    it half stopped; aclose() is shielded, so the node stops all the same."""
    async with mesh(make_config, 2) as (a, b):
        down = b.events()
        with anyio.CancelScope() as scope:
            scope.cancel()  # cancelled before aclose() even starts its waits
            await a.aclose()
        with pytest.raises(NodeClosed):
            await a.send(B, "t", b"")
        gone = await wait_event(down, lambda e: isinstance(e, PeerDown), EVENT_S)
        assert gone.reason == "peer said bye: node shutting down"


async def test_hung_handlers_time_out_and_the_node_still_answers(make_config: Any) -> None:
    """Regression: handlers had no deadline, so 32 hung handlers made every
    later request answer "busy"."""
    async with mesh(make_config, 2, handler_timeout_s=1.0) as (a, b):
        release = anyio.Event()

        async def hang(request: Incoming) -> bytes:
            await release.wait()
            return b"never"

        b.handle("hang", hang)
        limit = b.config.max_inflight_handlers
        results: list[BaseException] = []

        async def ask() -> None:
            try:
                await a.request(B, "hang", b"", timeout=EVENT_S)
            except RemoteError as exc:
                results.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(limit):
                tg.start_soon(ask)
        assert len(results) == limit
        assert all(e.code == 6 for e in results)  # ERR_HANDLER_TIMEOUT
        assert str(results[0]) == "remote error 6: handler for 'hang' took longer than 1 s"
        assert b.stats()["handler_timeouts"] == limit
        assert b.stats()["handlers_running"] == 0
        assert await a.request(B, "echo", b"ok", timeout=5) == b"ok"


async def test_handlers_end_with_their_connection(make_config: Any) -> None:
    async with Node(make_config("b", B)) as b:
        started, cancelled = anyio.Event(), anyio.Event()

        async def hang(request: Incoming) -> bytes:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()
            return b""

        b.handle("hang", hang)
        async with Node(make_config("a", A, [(B, b.listen_port)])) as a:
            await wait_until(lambda: [p.state for p in a.peers()] == ["up"], EVENT_S)
            async with anyio.create_task_group() as tg:

                async def ask() -> None:
                    with pytest.raises(Exception):  # noqa: B017 - PeerUnavailable or NodeClosed
                        await a.request(B, "hang", b"", timeout=EVENT_S)

                tg.start_soon(ask)
                with anyio.fail_after(EVENT_S):
                    await started.wait()
                await a.aclose()
        with anyio.fail_after(EVENT_S):
            await cancelled.wait()  # a's connection closed: b cancelled the handler
        assert b.stats()["handlers_running"] == 0


def test_answering_edgenode_peers_loads_no_cbor2(tmp_path: Any) -> None:
    """Regression: the built-in edgenode/peers topic imported cbor2 into a running node."""
    import subprocess
    import sys

    code = (
        "import anyio, sys\n"
        "from pathlib import Path\n"
        "from edgenode.config import NodeConfig\n"
        "from edgenode.identity import create_identity\n"
        "from edgenode.node import Node\n"
        "from firmware_bridge.cbor import decode\n"
        "root = Path(sys.argv[1])\n"
        "a, b = create_identity(root / 'a'), create_identity(root / 'b')\n"
        "ids = frozenset([a.node_id, b.node_id])\n"
        "async def main():\n"
        "    ca = NodeConfig(state_dir=root / 'a', listen_host='127.0.0.2', listen_port=0,\n"
        "                    authorised=ids, remember_peers=False)\n"
        "    async with Node(ca) as na:\n"
        "        cb = NodeConfig(state_dir=root / 'b', listen_host='127.0.0.3', listen_port=0,\n"
        "                        peers=[('127.0.0.2', na.listen_port)], authorised=ids,\n"
        "                        remember_peers=False)\n"
        "        async with Node(cb) as nb:\n"
        "            rows = decode(await nb.request('127.0.0.2', 'edgenode/peers', b'',\n"
        "                                           timeout=20, wait_s=20))\n"
        "            assert rows[0][:3] == ['127.0.0.3', b.node_id, 'up'], rows\n"
        "    print('cbor2' in sys.modules)\n"
        "anyio.run(main)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"



async def test_a_replaced_connection_hands_what_it_had_not_written_to_its_successor(
    make_config: Any, identities: Any
) -> None:
    """The peer dials again (it lost its connection): what send() had queued on
    the old connection and not written goes out first on the new one, and
    what was written arrives on the old one: every message once, in order."""
    from edgenode.proto.messages import Bye, Data

    from .conftest import RawPeer

    count, size = 600, 32 * 1024  # far more than the old connection's buffers hold
    # Raw peers do not answer pings: keepalive must not end the link first.
    config = make_config("a", A, keepalive_interval_s=30, keepalive_timeout_s=60)
    async with Node(config) as a:
        events = a.events()
        raw = identities["raw"]
        old = await RawPeer.connect(raw, A, a.listen_port)
        await old.hello(raw, epoch=7)
        await wait_event(events, lambda e: isinstance(e, PeerUp), EVENT_S)
        sent = 0

        async def produce() -> None:
            nonlocal sent
            while sent < count:
                await a.send("127.0.0.9", "seq", numbered(sent, size))
                sent += 1

        async def read_data(peer: RawPeer, until: int | None) -> list[int]:
            seqs: list[int] = []
            try:
                while until is None or not seqs or seqs[-1] < until:
                    for msg in await peer.messages():
                        if isinstance(msg, Data):
                            seqs.append(int(SEQ.unpack_from(msg.payload)[0]))
                        elif isinstance(msg, Bye):
                            return seqs
            except anyio.EndOfStream:
                pass
            return seqs

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            with anyio.fail_after(EVENT_S):
                await wait_until(lambda: a.stats()["send_waits"] > 0, EVENT_S)
            # The old connection is full both ways; the peer dials again.
            new = await RawPeer.connect(raw, A, a.listen_port)
            await new.hello(raw, epoch=7)
            with anyio.fail_after(EVENT_S * 3):
                on_old = await read_data(old, None)
                on_new = await read_data(new, count - 1)
        assert on_old + on_new == list(range(count))
        assert on_old and on_new  # both connections carried some
        down = await wait_event(events, lambda e: isinstance(e, PeerDown), EVENT_S)
        assert down.reason == "superseded by a newer connection from the same session"
        await wait_event(events, lambda e: isinstance(e, PeerUp), EVENT_S)
        await old.aclose()
        await new.aclose()
