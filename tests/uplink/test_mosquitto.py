"""The uplink against a real Mosquitto: two sites through the broker, and every way it fails.

Site A is node ``a`` (127.0.0.2, the uplink) and node ``b`` (127.0.0.3, its
peer); site B is node ``c`` (127.0.0.4, the uplink) and node ``d``
(127.0.0.5). Faults between a node and the broker come from the fault
kit's TCP proxy (``tcp_proxy``) or from signals to the broker's PID.
"""

from __future__ import annotations

import logging
import re
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from edgenode.config import NodeConfig
from edgenode.node import Node
from edgenode.testing.proxy import TcpProxy
from edgenode.uplink.brokers import Mosquitto
from edgenode.uplink.config import InMap, OutMap, UplinkConfig
from edgenode.uplink.uplink import INBOUND_HIGH

from ..conftest import wait_until
from .conftest import Certs, fast_uplink

pytestmark = pytest.mark.anyio

A, B, C, D = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
#: Bounds for things that take a round trip or a reconnect: generous, for a
#: board ten times slower than this machine.
SETTLE_S = 20.0


async def take(stream: Any, count: int, timeout: float = SETTLE_S) -> list[Any]:
    got = []
    with anyio.fail_after(timeout):
        while len(got) < count:
            got.append(await stream.receive())
    return got


async def connected(*nodes: Node, timeout: float = SETTLE_S) -> None:
    await wait_until(lambda: all(n.uplink.state == "connected" for n in nodes), timeout)


def uplink_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "edgenode.uplink" and text in r.getMessage()
    ]


@pytest.fixture
def proxied(tcp_proxy: TcpProxy, mosquitto: Mosquitto) -> Iterator[str]:
    """A route to Mosquitto's plain listener through the fault proxy; yields its URL."""
    route = tcp_proxy.add_route(("127.0.0.1", 0), ("127.0.0.1", mosquitto.port))
    yield f"mqtt://127.0.0.1:{route.port}"


# -- two sites ------------------------------------------------------------------------


async def test_sites_a_and_b_talk_through_the_broker_both_ways(
    mosquitto: Mosquitto,
    certs: Certs,
    uplink_config: Callable[..., NodeConfig],
    make_config: Callable[..., NodeConfig],
) -> None:
    site_a = fast_uplink(
        mosquitto.url("tls"),
        ca_file=certs.ca,
        prefix="fleet/site-a",
        outbound=(OutMap("sensors/#"),),
        inbound=(InMap("fleet/site-b/commands/#", to="commands/#", deliver=f"peer:{B}"),),
    )
    site_b = fast_uplink(
        mosquitto.url("tls"),
        "site-b",
        ca_file=certs.ca,
        prefix="fleet/site-b",
        outbound=(OutMap("commands/#"),),
        inbound=(InMap("fleet/site-a/sensors/#", to="remote/site-a/#", deliver="site"),),
    )
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node(uplink_config("a", A, site_a)))
        b = await stack.enter_async_context(Node(make_config("b", B, peers=[(A, a.listen_port)])))
        c = await stack.enter_async_context(Node(uplink_config("c", C, site_b)))
        d = await stack.enter_async_context(Node(make_config("d", D, peers=[(C, c.listen_port)])))
        await connected(a, c)
        await wait_until(lambda: [p.state for p in (*a.peers(), *c.peers())] == ["up", "up"])
        with d.subscribe("remote/#") as at_d, b.subscribe("commands/#") as at_b:
            for i in range(20):
                await b.send(A, f"sensors/t{i % 3}", b"%d" % i)
            got = await take(at_d, 20)
            assert [(m.topic, m.payload) for m in got] == [
                (f"remote/site-a/t{i % 3}", b"%d" % i) for i in range(20)
            ]
            assert {m.peer for m in got} == {C}  # broadcast by site B's uplink node
            await d.send(C, "commands/reboot", b"now")
            (command,) = await take(at_b, 1)
            assert (command.peer, command.topic, command.payload) == (A, "commands/reboot", b"now")
        # "published" counts the broker's acknowledgements, which may come
        # after the broker has forwarded the message.
        await wait_until(lambda: a.uplink.status()["published"] == 20)
        status = a.uplink.status()
        assert (status["state"], status["queue_messages"]) == ("connected", 0)
        assert c.uplink.status()["delivered"] == 20


async def test_a_message_from_the_broker_is_never_sent_back_to_it(
    mosquitto: Mosquitto, uplink_config: Callable[..., NodeConfig]
) -> None:
    # One map each way on the same node topic: the message arrives, is
    # delivered here, and is not echoed to the broker.
    config = fast_uplink(
        mosquitto.url(),
        prefix="loop",
        outbound=(OutMap("x/#", to="shared/#"),),
        inbound=(InMap("shared/#", to="x/#"),),
    )
    async with Node(uplink_config("a", A, config)) as a:
        await connected(a)
        with a.subscribe("x/#") as sub:
            await a.publish_local("x/1", b"hello", source="app")
            first, back = await take(sub, 2)
            assert (first.peer, back.peer, back.topic) == ("app", "mqtt", "x/1")
            await wait_until(lambda: a.uplink.status()["published"] == 1)
            with anyio.move_on_after(0.5):
                extra = await sub.receive()
                pytest.fail(f"echoed back: {extra}")
        assert a.uplink.status()["received"] == 1


# -- availability -------------------------------------------------------------------------


async def test_status_is_online_while_connected_and_the_will_says_offline(
    mosquitto: Mosquitto,
    proxied: str,
    tcp_proxy: TcpProxy,
    uplink_config: Callable[..., NodeConfig],
) -> None:
    watcher = fast_uplink(
        mosquitto.url(), "site-b", prefix="w", inbound=(InMap("fleet/a/status", to="a-status"),)
    )
    async with Node(uplink_config("c", C, watcher)) as c:
        await connected(c)
        with c.subscribe("a-status") as statuses:
            async with Node(uplink_config("a", A, fast_uplink(proxied, prefix="fleet/a"))) as a:
                await connected(a)
                assert (await take(statuses, 1))[0].payload == b"online"
                tcp_proxy.cut()  # the broker loses us without a DISCONNECT: our will
                assert (await take(statuses, 1))[0].payload == b"offline"
                assert (await take(statuses, 1))[0].payload == b"online"  # reconnected
            assert (await take(statuses, 1))[0].payload == b"offline"  # a clean stop


async def test_each_bridged_device_has_its_availability_on_the_broker(
    mosquitto: Mosquitto, uplink_config: Callable[..., NodeConfig]
) -> None:
    from edgenode.simdevice import SimulatedDevice

    watcher = fast_uplink(
        mosquitto.url(), "site-b", prefix="w", inbound=(InMap("fleet/a/devices/#", to="dev/#"),)
    )
    sim = SimulatedDevice("esp1", keepalive_interval_ms=500, keepalive_timeout_ms=2000)
    async with Node(uplink_config("c", C, watcher)) as c:
        await connected(c)
        with c.subscribe("dev/#") as statuses:
            config = uplink_config(
                "a",
                A,
                fast_uplink(mosquitto.url(), prefix="fleet/a"),
                serial_ports=[(sim.pty.path, 115200)],
            )
            async with Node(config) as a:
                await connected(a)
                await sim.start()
                online = await take(statuses, 1)
                assert [(m.topic, m.payload) for m in online] == [("dev/esp1/status", b"online")]
                sim.pty.release_slave()
                await sim.aclose()
                offline = await take(statuses, 1)
                assert [(m.topic, m.payload) for m in offline] == [("dev/esp1/status", b"offline")]
                assert a.uplink.status()["devices"] == {"esp1": False}


# -- the broker goes away -------------------------------------------------------------------


async def test_broker_killed_mid_stream_everything_queued_arrives_after_it_returns(
    mosquitto: Mosquitto,
    proxied: str,
    tcp_proxy: TcpProxy,
    uplink_config: Callable[..., NodeConfig],
) -> None:
    sender = fast_uplink(proxied, prefix="s", outbound=(OutMap("n", to="stream"),))
    receiver = fast_uplink(
        mosquitto.url(), "site-b", prefix="r", inbound=(InMap("stream", to="n"),)
    )
    total, kill_at, restart_at = 600, 200, 400
    async with Node(uplink_config("a", A, sender)) as a, Node(uplink_config("c", C, receiver)) as c:
        await connected(a, c)
        with c.subscribe("n") as sub:
            seen: set[int] = set()

            async def consume() -> None:
                async for msg in sub:
                    seen.add(int(msg.payload))

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                for n in range(1, total + 1):
                    await a.publish_local("n", b"%d" % n, source="app")
                    if n == kill_at:
                        await anyio.to_thread.run_sync(mosquitto.kill)
                        await wait_until(lambda: a.uplink.state != "connected", SETTLE_S)
                        # What the broker never acknowledged: all of it must arrive.
                        owed = {int(i.payload) for i in a.uplink.queue.pending()}
                        # Keep the sender away until the receiver has subscribed again
                        # (the killed broker kept no sessions: it saved nothing).
                        tcp_proxy.refuse_new()
                    if n == restart_at:
                        await wait_until(
                            lambda: a.uplink.status()["queue_messages"] >= restart_at - kill_at
                        )
                        assert a.uplink.status()["last_error_type"] == "BrokerUnavailable"
                        subscribed = c.uplink.status()["subscriptions"]
                        await anyio.to_thread.run_sync(mosquitto.start)
                        await wait_until(
                            lambda s=subscribed: c.uplink.status()["subscriptions"] > s, SETTLE_S
                        )
                        tcp_proxy.heal()
                    await anyio.sleep(0.001)
                must = owed | set(range(kill_at + 1, total + 1))
                await wait_until(lambda: must <= seen, SETTLE_S)
                tg.cancel_scope.cancel()
        status = a.uplink.status()
        assert status["connections"] >= 2 and status["dropped_oldest"] == 0
        # Acknowledged before the kill and lost by the killed broker is the broker's loss:
        lost_by_broker = set(range(1, kill_at + 1)) - seen - owed
        logging.getLogger(__name__).info(
            "broker lost %d acknowledged messages", len(lost_by_broker)
        )


@pytest.mark.parametrize("policy", ["drop-oldest", "refuse-new"])
async def test_the_queue_cap_applies_its_policy_counted_and_in_status(
    policy: str,
    mosquitto: Mosquitto,
    proxied: str,
    tcp_proxy: TcpProxy,
    uplink_config: Callable[..., NodeConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tcp_proxy.refuse_new()  # the broker is unreachable from the start
    sender = fast_uplink(
        proxied,
        prefix="s",
        outbound=(OutMap("n", to="q1"), OutMap("n", to="q0", qos=0)),
        queue_messages=10,
        queue_policy=policy,
    )
    receiver = fast_uplink(mosquitto.url(), "site-b", prefix="r", inbound=(InMap("q1", to="n"),))
    async with Node(uplink_config("a", A, sender)) as a, Node(uplink_config("c", C, receiver)) as c:
        await connected(c)
        for n in range(1, 26):
            await a.publish_local("n", b"%d" % n, source="app")
        await wait_until(lambda: a.uplink.status()["qos0_dropped_offline"] == 25)
        status = a.uplink.status()
        assert status["queue_messages"] == 10 and status["queue_policy"] == policy
        counted = "dropped_oldest" if policy == "drop-oldest" else "refused_new"
        assert status[counted] == 15
        full = uplink_lines(caplog, "queue full")
        assert len(full) == 1, full
        action = "dropping the oldest" if policy == "drop-oldest" else "refusing new messages"
        assert re.fullmatch(
            rf"uplink: queue full \(10 messages, \d+ bytes; caps 10 and "
            rf"{status['queue_max_bytes']}\): {action}",
            full[0],
        ), full[0]
        with c.subscribe("n") as sub:
            tcp_proxy.heal()
            got = [int(m.payload) for m in await take(sub, 10)]
        assert got == (list(range(16, 26)) if policy == "drop-oldest" else list(range(1, 11)))
        await wait_until(lambda: a.uplink.status()["queue_messages"] == 0)


def spooling_a(
    tmp_path: Path, identities: Any, proxied: str, tcp_proxy: TcpProxy, to: str
) -> tuple[Path, UplinkConfig]:
    """Node a's own state directory (the spool lives there) and an uplink that
    spools topic n to ``to``, its broker behind a proxy that refuses for now."""
    import shutil

    state = tmp_path / "a-state"
    shutil.copytree(identities["a"].state_dir, state)
    tcp_proxy.refuse_new()
    return state, fast_uplink(
        proxied, prefix="s", outbound=(OutMap("n", to=to),), spool_bytes=1 << 20
    )


async def test_the_spool_keeps_queued_messages_across_a_restart(
    tmp_path: Path,
    mosquitto: Mosquitto,
    proxied: str,
    tcp_proxy: TcpProxy,
    identities: Any,
    uplink_config: Callable[..., NodeConfig],
) -> None:
    state, sender = spooling_a(tmp_path, identities, proxied, tcp_proxy, "spooled")
    receiver = fast_uplink(
        mosquitto.url(), "site-b", prefix="r", inbound=(InMap("spooled", to="n"),)
    )
    async with Node(uplink_config("a", A, sender, state_dir=state)) as a:
        for n in range(1, 51):
            await a.publish_local("n", b"%d" % n, source="app")
        await wait_until(lambda: a.uplink.status()["queue_messages"] == 50)
    assert list((state / "uplink-spool").glob("*.seg"))
    async with Node(uplink_config("c", C, receiver)) as c:
        await connected(c)
        with c.subscribe("n") as sub:
            async with Node(uplink_config("a", A, sender, state_dir=state)) as a:
                await wait_until(lambda: a.uplink.status()["spool_restored"] == 50)
                tcp_proxy.heal()
                got = [int(m.payload) for m in await take(sub, 50)]
                assert got == list(range(1, 51))
                await wait_until(lambda: a.uplink.status()["queue_messages"] == 0)
                await wait_until(lambda: a.uplink.status()["spool_bytes"] < 1000)


async def test_a_message_published_as_the_node_starts_goes_out_behind_the_restored_spool(
    tmp_path: Path,
    mosquitto: Mosquitto,
    proxied: str,
    tcp_proxy: TcpProxy,
    identities: Any,
    uplink_config: Callable[..., NodeConfig],
) -> None:
    # Regression (034d97a): the out maps' subscriptions were made only once
    # the spool had been read back, so a message published meanwhile reached
    # no subscription and never left the node.
    state, sender = spooling_a(tmp_path, identities, proxied, tcp_proxy, "early")
    receiver = fast_uplink(mosquitto.url(), "site-b", prefix="r", inbound=(InMap("early", to="n"),))
    async with Node(uplink_config("a", A, sender, state_dir=state)) as a:
        await wait_until(lambda: a.uplink.status()["attempts"] >= 1)  # it runs: it subscribed
        for n in (1, 2, 3):
            await a.publish_local("n", b"%d" % n, source="app")
        await wait_until(lambda: a.uplink.status()["queue_messages"] == 3)
    async with Node(uplink_config("c", C, receiver)) as c:
        await connected(c)
        with c.subscribe("n") as sub:
            async with Node(uplink_config("a", A, sender, state_dir=state)) as a:
                # The first thing after the start: the uplink has not run yet,
                # let alone read its spool back.
                reached = await a.publish_local("n", b"4", source="app")
                assert reached == 1, "no out-map subscription when the node started"
                await wait_until(lambda: a.uplink.status()["queue_messages"] == 4)
                assert a.uplink.status()["spool_restored"] == 3
                tcp_proxy.heal()
                got = [int(m.payload) for m in await take(sub, 4)]
                assert got == [1, 2, 3, 4]


# -- the broker refuses us, or is not who it says -----------------------------------------------


async def request_rtts(asker: Node, peer: str, count: int) -> list[float]:
    rtts = []
    for _ in range(count):
        started = time.perf_counter()
        assert await asker.request(peer, "echo", b"x", timeout=2.0) == b"x"
        rtts.append(time.perf_counter() - started)
    return rtts


async def failing_uplink_leaves_the_node_alone(
    uplink: Any,
    expected_type: str,
    expected_error: str,
    make_config: Callable[..., NodeConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Run node a with a failing uplink beside its peer b: the error shows once in
    the log and in status, retries go on, and b's requests keep their round trip."""

    async def echo(request: Any) -> bytes:
        return request.payload

    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node(make_config("a", A, uplink=uplink)))
        b = await stack.enter_async_context(Node(make_config("b", B, peers=[(A, a.listen_port)])))
        a.handle("echo", echo)
        await wait_until(lambda: [p.state for p in b.peers()] == ["up"])
        before = await request_rtts(b, A, 20)
        await wait_until(lambda: a.uplink.status()["attempts"] >= 3, SETTLE_S)
        during = await request_rtts(b, A, 20)
        status = a.uplink.status()
        assert status["state"] in ("error", "connecting")
        assert (status["last_error_type"], status["last_error"]) == (expected_type, expected_error)
        assert uplink_lines(caplog, expected_error) == [
            f"uplink: {expected_error}; retrying with backoff"
        ]
        assert statistics.median(during) <= max(5 * statistics.median(before), 0.05)
        assert a.stats()["loop_lag_max_ms"] < 500


async def test_a_wrong_password_gives_one_clear_line_and_the_node_carries_on(
    mosquitto: Mosquitto, make_config: Callable[..., NodeConfig], caplog: pytest.LogCaptureFixture
) -> None:
    uplink = fast_uplink(mosquitto.url(), password="wrong")
    await failing_uplink_leaves_the_node_alone(
        uplink,
        "BrokerRefused",
        f"broker {mosquitto.url()} refused the connection: not authorized "
        "(check uplink.username and uplink.password_file)",
        make_config,
        caplog,
    )


async def test_an_untrusted_broker_certificate_gives_one_clear_line(
    mosquitto: Mosquitto,
    certs: Certs,
    make_config: Callable[..., NodeConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    uplink = fast_uplink(mosquitto.url("tls"), ca_file=certs.other_ca)
    # OpenSSL's words for a chain that ends in a CA we do not trust (the
    # broker sends its CA along, so OpenSSL 3 names that one).
    await failing_uplink_leaves_the_node_alone(
        uplink,
        "BrokerUntrusted",
        f"broker {mosquitto.url('tls')}: certificate not trusted: "
        "self-signed certificate in certificate chain",
        make_config,
        caplog,
    )


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections (in the kernel's backlog) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("scheme", ["mqtt", "mqtts"])
async def test_a_broker_that_accepts_tcp_and_never_answers(
    scheme: str,
    silent_listener: int,
    make_config: Callable[..., NodeConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"{scheme}://127.0.0.1:{silent_listener}"
    uplink = fast_uplink(url, connect_timeout_s=0.5)
    what = (
        "connected, but no connack" if scheme == "mqtt" else "no tcp connection and tls handshake"
    )
    await failing_uplink_leaves_the_node_alone(
        uplink, "BrokerUnavailable", f"broker {url}: {what} within 0.5 s", make_config, caplog
    )


async def test_a_client_certificate_opens_a_listener_that_requires_one(
    mosquitto: Mosquitto, certs: Certs, uplink_config: Callable[..., NodeConfig]
) -> None:
    uplink = fast_uplink(
        mosquitto.url("mtls"),
        ca_file=certs.ca,
        cert_file=certs.client_cert,
        key_file=certs.client_key,
    )
    async with Node(uplink_config("a", A, uplink)) as a:
        await connected(a)


@pytest.mark.slow
async def test_a_broker_that_stops_reading_is_left_and_rejoined(
    mosquitto: Mosquitto,
    proxied: str,
    tcp_proxy: TcpProxy,
    uplink_config: Callable[..., NodeConfig],
) -> None:
    sender = fast_uplink(proxied, prefix="s", outbound=(OutMap("n", to="stall"),), keepalive_s=5)
    receiver = fast_uplink(mosquitto.url(), "site-b", prefix="r", inbound=(InMap("stall", to="n"),))
    async with Node(uplink_config("a", A, sender)) as a, Node(uplink_config("c", C, receiver)) as c:
        await connected(a, c)
        with c.subscribe("n") as sub:
            tcp_proxy.pause(direction="up")  # the broker reads nothing more from us
            for n in range(1, 101):
                await a.publish_local("n", b"%d" % n, source="app")
            await wait_until(lambda: a.uplink.state != "connected", 30.0)
            assert a.uplink.status()["last_error"] == (
                f"broker {proxied}: no answer to a keepalive ping within 5 s"
            )
            tcp_proxy.resume(direction="up")  # the broker reads again, on a new connection
            got: set[int] = set()
            while len(got) < 100:  # at least once: a message may come twice
                got.add(int((await take(sub, 1, 30.0))[0].payload))
        assert a.uplink.status()["connections"] == 2


async def test_inbound_messages_wait_for_a_slow_subscriber_and_none_is_dropped(
    mosquitto: Mosquitto, uplink_config: Callable[..., NodeConfig]
) -> None:
    sender = fast_uplink(mosquitto.url(), prefix="s", outbound=(OutMap("n", to="slow"),))
    receiver = fast_uplink(mosquitto.url(), "site-b", prefix="r", inbound=(InMap("slow", to="n"),))
    total = 1000
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node(uplink_config("a", A, sender)))
        c = await stack.enter_async_context(
            Node(uplink_config("c", C, receiver, subscription_buffer=16))
        )
        await connected(a, c)
        with c.subscribe("n") as sub:
            for n in range(1, total + 1):
                await a.publish_local("n", b"%d" % n, source="app")
            await wait_until(lambda: c.uplink.status()["inbound_waiting"] >= INBOUND_HIGH // 2)
            # The consumer has not read: the uplink holds a bounded backlog, and
            # the rest waits in TCP and at the broker.
            assert c.uplink.status()["inbound_waiting"] <= INBOUND_HIGH + 40
            got = [int(m.payload) for m in await take(sub, total)]
        assert got == list(range(1, total + 1))
        assert sub.dropped == 0
