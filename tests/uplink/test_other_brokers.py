"""Not tied to one broker or one protocol version: nats-server's MQTT, and MQTT 5 with Mosquitto."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack

import anyio
import pytest

from edgenode.config import NodeConfig
from edgenode.node import Node
from edgenode.uplink.brokers import Mosquitto, NatsServer
from edgenode.uplink.config import InMap, OutMap

from ..conftest import wait_until
from .conftest import fast_uplink
from .test_mosquitto import A, C, connected, take

pytestmark = pytest.mark.anyio


async def test_a_round_trip_through_nats_server(
    nats_server: NatsServer, uplink_config: Callable[..., NodeConfig]
) -> None:
    site_a = fast_uplink(
        nats_server.url(),
        None,
        prefix="fleet/a",
        outbound=(OutMap("up/#"),),
        inbound=(InMap("fleet/c/up/#", to="from-c/#"),),
    )
    site_c = fast_uplink(
        nats_server.url(),
        None,
        prefix="fleet/c",
        outbound=(OutMap("up/#"),),
        inbound=(InMap("fleet/a/up/#", to="from-a/#"),),
    )
    async with Node(uplink_config("a", A, site_a)) as a, Node(uplink_config("c", C, site_c)) as c:
        await connected(a, c)
        with a.subscribe("from-c/#") as at_a, c.subscribe("from-a/#") as at_c:
            # nats-server may take a moment to route a new subscription: resend until seen.
            with anyio.fail_after(20):
                while True:
                    await a.publish_local("up/hello", b"from a", source="app")
                    with anyio.move_on_after(0.5):
                        first = await at_c.receive()
                        break
            assert (first.topic, first.payload) == ("from-a/hello", b"from a")
            await c.publish_local("up/reply", b"from c", source="app")
            (reply,) = await take(at_a, 1)
            assert (reply.topic, reply.payload) == ("from-c/reply", b"from c")


async def test_mqtt_5_tells_the_broker_the_largest_packet_we_take(
    mosquitto: Mosquitto, uplink_config: Callable[..., NodeConfig]
) -> None:
    sender = fast_uplink(
        mosquitto.url(), protocol="5", prefix="s", outbound=(OutMap("n", to="big"),)
    )
    receiver = fast_uplink(
        mosquitto.url(), "site-b", protocol="5", prefix="r", inbound=(InMap("big", to="n"),)
    )
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node(uplink_config("a", A, sender)))
        c = await stack.enter_async_context(
            Node(uplink_config("c", C, receiver, max_frame_bytes=4096))
        )
        await connected(a, c)
        with c.subscribe("n") as sub:
            await a.publish_local("n", b"x" * 8000, source="app")  # over c's limit: not sent to c
            await a.publish_local("n", b"small", source="app")
            (got,) = await take(sub, 1)
            assert got.payload == b"small"
        # The broker forwards a message and acknowledges it in either order:
        # "published" counts acknowledgements (seen late on emulated armhf).
        await wait_until(lambda: a.uplink.status()["published"] == 2)
        assert c.uplink.status()["received"] == 1
