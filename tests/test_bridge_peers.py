"""Device traffic between nodes: publish is best effort to peers, send_to waits, no starvation.

Node A (127.0.0.2) bridges the real driver on a pseudo-terminal (as in
tests/test_bridge_delivery.py); node B (127.0.0.3) is its peer.
docs/architecture.md, "Bridged devices".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from edgenode.node import Node, PeerUp

from .conftest import RawPeer, echo, wait_event, wait_until
from .test_bridge_delivery import DEVICE, TtyDevice, number, numbered

pytestmark = pytest.mark.anyio


class Rig:
    def __init__(self, a: Node, b: Node, line: TtyDevice) -> None:
        self.a, self.b, self.line = a, b, line


@asynccontextmanager
async def two_nodes(make_config: Any, **a_overrides: Any) -> AsyncIterator[Rig]:
    line = TtyDevice(reliable=True)
    a_config = make_config(
        "a", "127.0.0.2", serial_ports=[(line.path, 115200)], serial_reliable=True, **a_overrides
    )
    try:
        async with Node(a_config) as a:
            a_events = a.events()
            async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
                await wait_event(a_events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
                with anyio.fail_after(10):
                    await line.device.wait_up()
                line.release_slave()
                await wait_until(lambda: any(p.devices == ("pico-1",) for p in b.peers()))
                yield Rig(a, b, line)
    finally:
        await line.aclose()


async def test_device_send_to_a_peer_arrives_once_each_in_order(make_config: Any) -> None:
    count = 500
    async with two_nodes(make_config) as rig:
        with rig.b.subscribe("direct") as sub:
            async with anyio.create_task_group() as tg:

                async def produce() -> None:
                    for i in range(count):
                        await rig.line.device.send_to("127.0.0.3", "direct", numbered(i))

                tg.start_soon(produce)
                with anyio.fail_after(60):
                    for i in range(count):
                        msg = await sub.receive()
                        assert (msg.peer, number(msg.payload)) == (DEVICE, i)
        assert rig.a.stats()["device_messages_lost"] == 0


async def test_device_send_to_an_unknown_address_is_counted(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with two_nodes(make_config) as rig:
        await rig.line.device.send_to("127.0.0.99", "direct", b"x")
        await wait_until(lambda: rig.a.stats()["device_messages_lost"] == 1)
        assert rig.a.stats()["serial_ports"][0]["undelivered"] == 1
        assert (
            "message from device pico-1 on 'direct' not delivered: peer 127.0.0.99 is not "
            "connected (never seen) (1 device messages lost so far)"
        ) in [r.getMessage() for r in caplog.records]


async def test_device_publish_reaches_peers_best_effort_and_counts_a_full_one(
    make_config: Any, identities: Any
) -> None:
    """A device's publish is a broadcast: a peer whose connection is full
    does not get it, counted; the other peers and our subscribers do."""
    async with two_nodes(make_config, keepalive_timeout_s=60.0) as rig:
        # A peer that completes its handshake and then never reads.
        stuck = await RawPeer.connect(identities["raw"], "127.0.0.2", rig.a.listen_port)
        await stuck.hello(identities["raw"])
        await wait_until(
            lambda: any(p.ip == "127.0.0.9" and p.state == "up" for p in rig.a.peers())
        )
        async with anyio.create_task_group() as tg:

            async def fill() -> None:
                while True:
                    await rig.a.send("127.0.0.9", "bulk", bytes(60_000))

            tg.start_soon(fill)
            # send() waits for room once the stuck peer's outbox is full.
            await wait_until(lambda: rig.a.stats()["send_waits"] > 0, timeout=60)
            with rig.a.subscribe("temp") as at_a, rig.b.subscribe("temp") as at_b:
                # Its outbox drains until the TCP buffers are full too: publish
                # until one publish finds it full (a few, natively).
                published = 0
                with anyio.fail_after(60):
                    while rig.a.stats()["device_publish_dropped"] == 0:
                        await rig.line.device.publish("temp", numbered(published))
                        published += 1
                        assert number((await at_a.receive()).payload) == published - 1
                    for i in range(published):
                        assert number((await at_b.receive()).payload) == i
            assert rig.a.stats()["device_publish_dropped"] >= 1
            [row] = [p for p in rig.a.peers() if p.ip == "127.0.0.9"]
            assert row.drops >= 1
            tg.cancel_scope.cancel()
        await stuck.aclose()


async def test_a_held_back_device_does_not_delay_other_traffic(make_config: Any) -> None:
    """While a stuck subscriber holds the device back (its port's delivery
    task waits, the link holds frames), the node's peers are unaffected:
    their messages and requests go through at once."""
    async with two_nodes(make_config, subscriber_stall_timeout_s=60.0) as rig:
        rig.a.handle("echo", echo)
        with rig.a.subscribe("seq", buffer=4) as stuck, rig.a.subscribe("t") as healthy:
            async with anyio.create_task_group() as tg:

                async def produce() -> None:
                    for i in range(10_000):
                        await rig.line.device.publish("seq", numbered(i))

                tg.start_soon(produce)
                link = rig.a.bridge.ports[0].link  # type: ignore[union-attr]
                assert link is not None
                await wait_until(lambda: link.stats.held_back > 0, timeout=60)
                for i in range(30):
                    with anyio.fail_after(5):
                        await rig.b.send("127.0.0.2", "t", b"%d" % i)
                        assert (await healthy.receive()).payload == b"%d" % i
                        assert await rig.b.request("127.0.0.2", "echo", b"e", timeout=5) == b"e"
                assert rig.line.device.is_up
                assert stuck.queued == 4
                tg.cancel_scope.cancel()
