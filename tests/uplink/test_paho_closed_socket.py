"""A connection paho closed by itself: the session's tasks notice it and the uplink reconnects.

paho closes its socket as it sees a loss (a failed read or write, a missed
keepalive) and says so to whoever called it; the session's other tasks
learn of it only when they next look. These tests make paho close its
socket with its own routine for a loss, called directly between two of
the session's steps (no fault from outside made paho close its socket
without telling the caller), against a real Mosquitto.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from edgenode.config import NodeConfig
from edgenode.node import Node
from edgenode.uplink.brokers import Mosquitto
from edgenode.uplink.config import InMap, OutMap
from edgenode.uplink.uplink import INBOUND_HIGH

from ..conftest import wait_until
from .conftest import fast_uplink
from .test_mosquitto import SETTLE_S, A, C, connected, take

pytestmark = pytest.mark.anyio


async def test_a_connection_paho_closed_behind_the_paused_reader_is_reopened_when_it_reads_again(
    mosquitto: Mosquitto, uplink_config: Callable[..., NodeConfig]
) -> None:
    # Regression (034d97a), the reader's half: paho closed its socket while a
    # slow subscriber kept the reader paused; when the subscriber caught up,
    # the reader waited on the closed socket (fd -1) and the uplink stopped
    # for good.
    sender = fast_uplink(mosquitto.url(), prefix="s", outbound=(OutMap("n", to="slow"),))
    # Keepalive checks every 15 s: the next comes long after the reader wakes.
    receiver = fast_uplink(
        mosquitto.url(), "site-b", prefix="r", inbound=(InMap("slow", to="n"),), keepalive_s=60
    )
    total = 200
    async with (
        Node(uplink_config("a", A, sender)) as a,
        Node(uplink_config("c", C, receiver, subscription_buffer=16)) as c,
    ):
        await connected(a, c)
        with c.subscribe("n") as sub:
            for n in range(1, total + 1):
                await a.publish_local("n", b"%d" % n, source="app")
            # The reader stops reading at INBOUND_HIGH waiting messages.
            await wait_until(lambda: c.uplink.status()["inbound_waiting"] >= INBOUND_HIGH)
            c.uplink._session.client._sock_close()
            seen: set[int] = set()

            async def consume() -> None:
                async for msg in sub:
                    seen.add(int(msg.payload))

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                # At least once: the broker sends what was not acknowledged again.
                await wait_until(
                    lambda: len(seen) == total or c.uplink.state == "stopped", SETTLE_S
                )
                tg.cancel_scope.cancel()
            status = c.uplink.status()
        assert status["state"] == "connected", status["last_error"]
        assert seen == set(range(1, total + 1))
        assert status["connections"] == 2
        assert status["last_error"] == (
            f"broker {mosquitto.url()}: connection lost (closed or reset by the broker)"
        )


async def test_a_writer_woken_as_paho_closes_its_socket_reports_the_loss_and_reconnects(
    mosquitto: Mosquitto, uplink_config: Callable[..., NodeConfig]
) -> None:
    # Regression (034d97a), the writer's half: paho closed its socket in the
    # step that queued a message; the message woke the writer, which waited
    # on the closed socket (fd -1), and the uplink stopped for good.
    sender = fast_uplink(mosquitto.url(), prefix="s", outbound=(OutMap("n", to="w"),))
    receiver = fast_uplink(mosquitto.url(), "site-b", prefix="r", inbound=(InMap("w", to="n"),))
    async with Node(uplink_config("a", A, sender)) as a, Node(uplink_config("c", C, receiver)) as c:
        await connected(a, c)
        session = a.uplink._session
        session.publish("s/probe", b"x", 1)  # paho asks for the writer...
        session.client._sock_close()  # ...and closes its socket before the writer runs
        await wait_until(
            lambda: a.uplink.status()["connections"] == 2 or a.uplink.state == "stopped", SETTLE_S
        )
        status = a.uplink.status()
        assert status["state"] == "connected", status["last_error"]
        assert status["last_error"] == (
            f"broker {mosquitto.url()}: connection lost (closed or reset by the broker)"
        )
        with c.subscribe("n") as sub:
            await a.publish_local("n", b"after", source="app")
            assert [m.payload for m in await take(sub, 1)] == [b"after"]
