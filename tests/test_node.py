"""The node over real TLS on loopback: API, loop, keepalive and registry.

Nodes listen on distinct loopback addresses (127.0.0.2, 127.0.0.3, ...);
raw peers dial from 127.0.0.9 and beyond.
"""

from __future__ import annotations

import inspect
from typing import Any

import anyio
import pytest

from edgenode.errors import (
    ConfigError,
    InvalidArgument,
    NodeClosed,
    PeerUnavailable,
    RemoteError,
    RequestTimeout,
    SubscriberStalled,
)
from edgenode.inbox import Control, Inbox
from edgenode.node import Incoming, Node, PeerDown, PeerUp, Refused
from edgenode.proto.connection import PeerProtocol
from edgenode.proto.messages import Bye, Ping, Pong, Ready
from edgenode.registry import INBOUND, OUTBOUND, UP

from .conftest import RawPeer, pending, wait_event, wait_until

pytestmark = pytest.mark.anyio


async def echo(request: Incoming) -> bytes:
    return request.payload


async def test_send_request_and_broadcast_between_two_nodes(make_config: Any) -> None:
    async with Node(make_config("a", "127.0.0.2")) as a:
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            a.handle("echo", echo)
            up = await wait_event(b.events(), lambda e: isinstance(e, PeerUp))
            assert (up.peer, up.node_id) == ("127.0.0.2", a.node_id)
            with a.subscribe("greetings") as sub, a.subscribe("sensors/#") as wild:
                await b.send("127.0.0.2", "greetings", b"hello")
                await b.send(a.node_id, "sensors/temp", b"21.5")
                with anyio.fail_after(2):
                    msg = await sub.receive()
                    reading = await wild.receive()
            assert msg == Incoming("127.0.0.3", b.node_id, "greetings", b"hello")
            assert (reading.topic, reading.payload) == ("sensors/temp", b"21.5")
            assert await b.request("127.0.0.2", "echo", b"ping", timeout=2) == b"ping"
            with a.subscribe("all") as everyone:
                assert await b.broadcast("all", b"x") == 1
                with anyio.fail_after(2):
                    assert (await everyone.receive()).payload == b"x"
            [row] = a.peers()
            assert (row.ip, row.node_id, row.state, row.direction) == (
                "127.0.0.3",
                b.node_id,
                UP,
                INBOUND,
            )


async def test_peers_say_up_only_once_the_peer_up_is_announced(
    make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """peers() and events() tell one story: a connection whose reader has
    read the peer's ready, but whose dispatcher has not settled it yet, is
    "connecting", not "up", until its PeerUp is published. (peers() used to
    say "up" from the reader's flag: a test polling it, then listening for
    events, could get the PeerUp late.)"""
    held: list[Control] = []
    release = anyio.Event()
    post = Inbox.post

    async def hold_readies(self: Inbox, event: Any) -> None:
        if isinstance(event, Control) and any(isinstance(m, Ready) for m in event.msgs):
            held.append(event)
            await release.wait()
        await post(self, event)

    monkeypatch.setattr(Inbox, "post", hold_readies)
    async with Node(make_config("a", "127.0.0.2")) as a:
        events = a.events()
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            await wait_until(
                lambda: any(c.conn.ip == "127.0.0.3" for c in held), what="a's reader has b's ready"
            )
            [row] = a.peers()
            assert (row.ip, row.state) == ("127.0.0.3", "connecting")
            assert a.stats()["peers_up"] == 0
            assert pending(events) == []
            release.set()
            up = await wait_event(events, lambda e: isinstance(e, PeerUp))
            assert (up.peer, up.node_id) == ("127.0.0.3", b.node_id)
            [row] = a.peers()
            assert row.state == UP
            assert a.stats()["peers_up"] == 1


async def test_request_errors_name_the_cause(make_config: Any) -> None:
    async with Node(make_config("a", "127.0.0.2")) as a:
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            await wait_event(b.events(), lambda e: isinstance(e, PeerUp))

            async def broken(request: Incoming) -> bytes:
                raise RuntimeError("boom")

            async def never(request: Incoming) -> bytes:
                await anyio.sleep_forever()
                return b""

            a.handle("broken", broken)
            a.handle("never", never)
            with pytest.raises(
                RemoteError, match=r"remote error 1: no handler for topic 'nothing'"
            ):
                await b.request("127.0.0.2", "nothing", b"")
            with pytest.raises(
                RemoteError, match=r"remote error 2: handler for 'broken' failed: RuntimeError"
            ):
                await b.request("127.0.0.2", "broken", b"")
            with pytest.raises(
                RequestTimeout,
                match=r"no response from 127.0.0.2 to request \d+ on 'never' within 0.2 s",
            ):
                await b.request("127.0.0.2", "never", b"", timeout=0.2)
            # The node carries on after each error.
            a.handle("echo", echo)
            assert await b.request("127.0.0.2", "echo", b"still here") == b"still here"


async def test_api_rejects_bad_arguments(make_config: Any) -> None:
    async with Node(make_config("a", "127.0.0.2")) as a:
        with pytest.raises(InvalidArgument, match="topic: expected non-empty text"):
            await a.send("127.0.0.3", "", b"")
        with pytest.raises(InvalidArgument, match="topic of 200 bytes exceeds 128-byte limit"):
            await a.send("127.0.0.3", "t" * 200, b"")
        with pytest.raises(InvalidArgument, match="payload: expected bytes, got str"):
            await a.send("127.0.0.3", "t", "text")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match=r"payload of 70000 bytes exceeds \d+-byte limit"):
            await a.send("127.0.0.3", "t", bytes(70000))
        with pytest.raises(
            InvalidArgument, match="peer 'nonsense' is neither an ip address nor a node id"
        ):
            await a.send("nonsense", "t", b"")
        with pytest.raises(
            PeerUnavailable, match=r"peer 127.0.0.3 is not connected \(never seen\)"
        ):
            await a.send("127.0.0.3", "t", b"")
    with pytest.raises(NodeClosed, match="node is closed"):
        await a.send("127.0.0.3", "t", b"")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_config_from_python_rejects_non_finite_numbers(make_config: Any, value: float) -> None:
    # Regression: files and flags refused NaN and infinity, NodeConfig from
    # Python did not (NaN compares false to every bound).
    with pytest.raises(ConfigError) as raised:
        Node(make_config("a", "127.0.0.2", keepalive_timeout_s=value))
    assert str(raised.value) == f"keepalive_timeout_s: expected a finite number, got {value!r}"


# -- failure 1: a starved loop ---------------------------------------------------


def test_dispatcher_handlers_are_plain_functions() -> None:
    """Nothing the dispatcher runs can await: of the dispatcher, its dials,
    the peer learning and the device router it calls, only the loop itself,
    a save (a task of its own) and the reader's routes are coroutines."""
    from edgenode.devices import DeviceRouter
    from edgenode.dials import Dials
    from edgenode.dispatcher import Dispatcher
    from edgenode.learning import PeerLearning

    allowed = {"run", "save", "to_device", "send_local"}
    checked = []
    for cls in (Dispatcher, Dials, PeerLearning, DeviceRouter):
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            checked.append(name)
            if name not in allowed:
                assert not inspect.iscoroutinefunction(fn), f"{cls.__name__}.{name} can await"
    assert len(checked) >= 30
    assert {"_on_opened", "_on_control", "_on_closed"} <= set(dir(Dispatcher))
    assert {"on_failed", "on_add_peer", "on_resolved"} <= set(dir(Dials))


async def test_message_is_delivered_promptly_while_a_handshake_hangs(make_config: Any) -> None:
    async with Node(make_config("a", "127.0.0.2", handshake_timeout_s=30)) as a:
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            await wait_event(b.events(), lambda e: isinstance(e, PeerUp))
            with a.subscribe("t") as sub:
                await b.send("127.0.0.2", "t", b"idle")
                with anyio.fail_after(0.5):
                    await sub.receive()
                # A raw TCP client that connects and never speaks.
                silent = await anyio.connect_tcp("127.0.0.2", a.listen_port, local_host="127.0.0.9")
                async with silent:
                    for i in range(20):
                        await b.send("127.0.0.2", "t", b"%d" % i)
                        with anyio.fail_after(0.5):
                            assert (await sub.receive()).payload == b"%d" % i


async def test_peer_that_takes_and_says_nothing_is_closed_while_others_flow(
    make_config: Any, identities: Any
) -> None:
    # A sender waits for room as long as the peer proves it is alive; a peer
    # that neither reads nor sends anything for the keepalive timeout is dead,
    # and the sender waiting on it is told so. Other peers never wait.
    config = make_config("a", "127.0.0.2", outbox_frames=16, keepalive_timeout_s=1.5)
    async with Node(config) as a:
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            events = a.events()
            await wait_event(b.events(), lambda e: isinstance(e, PeerUp))
            # A peer that completes the handshake and then never reads or writes.
            stuck = await RawPeer.connect(identities["raw"], "127.0.0.2", a.listen_port)
            await stuck.hello(identities["raw"])
            await wait_event(events, lambda e: isinstance(e, PeerUp) and e.peer == "127.0.0.9")
            flooded = anyio.Event()
            sent = 0

            async def flood() -> None:
                nonlocal sent
                payload = bytes(16 * 1024)
                with pytest.raises(PeerUnavailable) as raised:
                    while True:
                        await a.send("127.0.0.9", "bulk", payload)
                        sent += 1
                assert str(raised.value) == (
                    "peer 127.0.0.9 went down while the send waited for room: "
                    "no frames for 1.5 s (keepalive timeout)"
                )
                flooded.set()

            with b.subscribe("t") as sub:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(flood)
                    # While the flood waits for room, messages to the healthy
                    # peer still go straight through.
                    i = 0
                    while not flooded.is_set():
                        i += 1
                        await a.send("127.0.0.3", "t", b"%d" % i)
                        with anyio.fail_after(5):
                            assert (await sub.receive()).payload == b"%d" % i
            down = await wait_event(
                events, lambda e: isinstance(e, PeerDown) and e.peer == "127.0.0.9"
            )
            assert sent > 16
            assert down.reason == "no frames for 1.5 s (keepalive timeout)"
            assert await b.request("127.0.0.2", "edgenode/peers", b"")
            await stuck.aclose()


async def test_fast_producer_waits_for_room_instead_of_losing_its_peer(make_config: Any) -> None:
    # Regression: send() used to wait only for room in the inbox, so a
    # producer faster than the link filled the peer's outbox and the node
    # closed a healthy peer as slow. Now the caller waits for room.
    config = make_config("a", "127.0.0.2", subscription_buffer=300)
    async with Node(config) as a:
        peers = [("127.0.0.2", a.listen_port)]
        async with Node(make_config("b", "127.0.0.3", peers, outbox_frames=4)) as b:
            await wait_event(b.events(), lambda e: isinstance(e, PeerUp))
            events = b.events()
            count, payload = 300, bytes(32 * 1024)
            with a.subscribe("bulk") as sub:
                for _ in range(count):
                    await b.send("127.0.0.2", "bulk", payload)
                for _ in range(count):
                    with anyio.fail_after(5):
                        assert (await sub.receive()).payload == payload
                assert await b.send_many("127.0.0.2", "bulk", [payload] * count) == count
                for _ in range(count):
                    with anyio.fail_after(5):
                        await sub.receive()
            assert [p.state for p in b.peers()] == [UP]
            assert pending(events) == []  # no PeerDown, no Refused


async def test_full_subscriber_pauses_its_connection_until_its_stall_bound(
    make_config: Any,
) -> None:
    config = make_config("a", "127.0.0.2", subscription_buffer=4, subscriber_stall_timeout_s=1.0)
    async with Node(config) as a:
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            a.handle("echo", echo)
            await wait_event(b.events(), lambda e: isinstance(e, PeerUp))
            with a.subscribe("flood") as never_read:
                for _ in range(50):
                    await b.send("127.0.0.2", "flood", b"x")
                # The request waits behind the flood (one connection, in
                # order) until the stuck subscription is ended.
                assert await b.request("127.0.0.2", "echo", b"alive", timeout=10) == b"alive"
                got = [never_read.receive_nowait() for _ in range(4)]
                assert [m.payload for m in got] == [b"x"] * 4
                with pytest.raises(SubscriberStalled) as raised:
                    never_read.receive_nowait()
                assert str(raised.value) == (
                    "subscription to 'flood' took nothing for 1 s and was ended; "
                    "a message from 127.0.0.3 was not delivered to it"
                )
                assert never_read.dropped == 1
            stats = a.stats()
            assert stats["subscriptions_stalled"] == 1
            # The rest of the flood found no subscription: counted, not lost silently.
            assert stats["unrouted_messages"] == 45
            assert [p.state for p in b.peers()] == [UP]


async def test_subscription_with_a_drop_policy_drops_and_counts_instead(
    make_config: Any,
) -> None:
    async with Node(make_config("a", "127.0.0.2", subscription_buffer=4)) as a:
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            a.handle("echo", echo)
            await wait_event(b.events(), lambda e: isinstance(e, PeerUp))
            newest = a.subscribe("flood", on_full="drop-newest")
            oldest = a.subscribe("flood", on_full="drop-oldest", buffer=2)
            for i in range(50):
                await b.send("127.0.0.2", "flood", b"%d" % i)
            assert await b.request("127.0.0.2", "echo", b"alive", timeout=5) == b"alive"
            assert [newest.receive_nowait().payload for _ in range(4)] == [b"0", b"1", b"2", b"3"]
            assert [oldest.receive_nowait().payload for _ in range(2)] == [b"48", b"49"]
            assert (newest.dropped, oldest.dropped) == (46, 48)
            assert a.stats()["subscription_drops"] == 94


# -- failure 2: one-directional keepalive -------------------------------------------


@pytest.mark.parametrize("dialler", ["lower", "higher"])
async def test_idle_link_stays_up_and_both_ends_get_pongs(make_config: Any, dialler: str) -> None:
    timing = dict(keepalive_interval_s=0.1, keepalive_timeout_s=0.4)
    # The listener starts first; the other node dials it.
    listen_name, listen_ip, dial_name, dial_ip = (
        ("b", "127.0.0.3", "a", "127.0.0.2")
        if dialler == "lower"
        else ("a", "127.0.0.2", "b", "127.0.0.3")
    )
    async with Node(make_config(listen_name, listen_ip, **timing)) as listener:
        dial_config = make_config(dial_name, dial_ip, [(listen_ip, listener.listen_port)], **timing)
        async with Node(dial_config) as dialling:
            listener_events, dialling_events = listener.events(), dialling.events()
            await wait_event(listener_events, lambda e: isinstance(e, PeerUp))
            await wait_event(dialling_events, lambda e: isinstance(e, PeerUp))

            def pongs(node: Node, ip: str) -> int:
                live = node.keepalive.liveness(ip, anyio.current_time())
                return live.pongs_received if live else 0

            # Five intervals' worth of pongs at each end, with no data sent.
            await wait_until(
                lambda: pongs(listener, dial_ip) >= 5 and pongs(dialling, listen_ip) >= 5
            )
            for node in (listener, dialling):
                [row] = node.peers()
                assert row.state == UP and row.our_pings_answered and row.their_frames_arriving
                assert row.rtt_s is not None
            assert listener.peers()[0].direction == INBOUND
            assert dialling.peers()[0].direction == OUTBOUND
            for stream in (listener_events, dialling_events):
                with pytest.raises(anyio.WouldBlock):
                    stream.receive_nowait()  # no down, no re-up: it never cycled


async def test_silent_peer_is_declared_dead_within_the_timeout(
    make_config: Any, identities: Any
) -> None:
    timeout = 0.5
    async with Node(
        make_config("a", "127.0.0.2", keepalive_interval_s=0.1, keepalive_timeout_s=timeout)
    ) as a:
        events = a.events()
        silent = await RawPeer.connect(identities["raw"], "127.0.0.2", a.listen_port)
        await silent.hello(identities["raw"])
        up = await wait_event(events, lambda e: isinstance(e, PeerUp))
        started = anyio.current_time()
        down = await wait_event(events, lambda e: isinstance(e, PeerDown), timeout=timeout * 3)
        took = anyio.current_time() - started
        assert (up.peer, down.peer) == ("127.0.0.9", "127.0.0.9")
        assert down.reason == "no frames for 0.5 s (keepalive timeout)"
        assert took >= timeout * 0.9
        [row] = a.peers()
        assert row.state == "down" and row.down_reason == down.reason
        with pytest.raises(PeerUnavailable, match=r"peer 127.0.0.9 is not connected \(no frames"):
            await a.send("127.0.0.9", "t", b"")
        await silent.aclose()


async def test_peer_that_accepts_tcp_but_never_answers_never_counts_as_connected(
    make_config: Any,
) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.5", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    accepted: list[Any] = []

    async def hold(stream: Any) -> None:
        accepted.append(stream)
        await anyio.sleep_forever()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hold)
        config = make_config("a", "127.0.0.2", [("127.0.0.5", port)], handshake_timeout_s=0.3)
        async with Node(config) as a:
            refused = await wait_event(a.events(), lambda e: isinstance(e, Refused))
            assert (
                str(refused.error)
                == f"127.0.0.5: dial to 127.0.0.5:{port} not finished within 0.3 s"
            )
            assert [r.state for r in a.peers()] == ["down"]
        tg.cancel_scope.cancel()


# -- failure 3: a registry keyed by IP:PORT ------------------------------------------


async def test_two_connections_from_one_ip_make_one_entry(
    make_config: Any, identities: Any
) -> None:
    async with Node(make_config("a", "127.0.0.2")) as a:
        events = a.events()
        first = await RawPeer.connect(identities["raw"], "127.0.0.2", a.listen_port)
        await first.hello(identities["raw"], epoch=7)
        await wait_event(events, lambda e: isinstance(e, PeerUp))
        second = await RawPeer.connect(identities["raw"], "127.0.0.2", a.listen_port)
        await second.hello(identities["raw"], epoch=7)
        # The older connection is told why it is closed; the newer one is live.
        bye = await first.next_of(Bye)
        assert bye == Bye("superseded by a newer connection from the same session")
        assert len(a.peers()) == 1 and a.registry.get("127.0.0.9").conn is not None
        await second.send(PeerProtocol.send(Ping(5)))
        assert await second.next_of(Pong) == Pong(5)
        await first.aclose()
        await second.aclose()


async def test_simultaneous_dial_ends_with_one_connection_both_sides_agree(
    make_config: Any,
) -> None:
    async with Node(make_config("a", "127.0.0.2")) as a, Node(make_config("b", "127.0.0.3")) as b:
        async with anyio.create_task_group() as tg:  # both dial at the same moment
            tg.start_soon(a.add_peer, "127.0.0.3", b.listen_port)
            tg.start_soon(b.add_peer, "127.0.0.2", a.listen_port)
        await wait_until(
            lambda: (
                a.datapath.open_connections == 1
                and b.datapath.open_connections == 1
                and [p.state for p in a.peers()] == [UP]
                and [p.state for p in b.peers()] == [UP]
            ),
            timeout=15,  # generous: losing links close with a grace period
        )
        conn_a = a.registry.get("127.0.0.3").conn
        conn_b = b.registry.get("127.0.0.2").conn
        # Both sides hold the same TCP connection.
        local_a = conn_a.stream.extra(anyio.abc.SocketAttribute.local_port)
        local_b = conn_b.stream.extra(anyio.abc.SocketAttribute.local_port)
        assert (conn_a.port, conn_b.port) == (local_b, local_a)
        assert {conn_a.direction, conn_b.direction} == {INBOUND, OUTBOUND}
        # Both dials got through (both were sent before either handshake
        # ended), and both nodes kept the one dialled by the higher IP.
        assert (conn_a.direction, conn_b.direction) == (INBOUND, OUTBOUND)


async def test_restarted_peer_with_new_epoch_is_readmitted_at_once(
    make_config: Any, identities: Any
) -> None:
    async with Node(make_config("a", "127.0.0.2")) as a:
        events = a.events()
        old = await RawPeer.connect(identities["raw"], "127.0.0.2", a.listen_port)
        await old.hello(identities["raw"], epoch=1)
        await wait_event(events, lambda e: isinstance(e, PeerUp))
        # The old process "died" without its connection closing; a new one arrives.
        new = await RawPeer.connect(identities["raw"], "127.0.0.2", a.listen_port)
        await new.hello(identities["raw"], epoch=2)
        up = await wait_event(events, lambda e: isinstance(e, PeerUp))
        assert up.restarted
        bye = await old.next_of(Bye)
        assert bye.reason.startswith("superseded by a new session")
        await old.aclose()
        await new.aclose()


async def test_different_node_on_a_live_ip_is_refused(make_config: Any, identities: Any) -> None:
    async with Node(make_config("a", "127.0.0.2")) as a:
        events = a.events()
        first = await RawPeer.connect(identities["raw"], "127.0.0.2", a.listen_port)
        await first.hello(identities["raw"])
        await wait_event(events, lambda e: isinstance(e, PeerUp))
        other = await RawPeer.connect(identities["raw2"], "127.0.0.2", a.listen_port)
        await other.hello(identities["raw2"])
        refused = await wait_event(events, lambda e: isinstance(e, Refused))
        raw, raw2 = identities["raw"].node_id, identities["raw2"].node_id
        assert (
            str(refused.error)
            == f"127.0.0.9: ip 127.0.0.9 is connected as node {raw}; refusing node {raw2}"
        )
        [bye] = await other.messages()
        assert isinstance(bye, Bye)
        assert a.registry.get("127.0.0.9").node_id == raw
        await first.aclose()
        await other.aclose()


# -- failure 4: a registry that lies ------------------------------------------------


async def test_send_with_wait_succeeds_after_the_peer_reconnects(make_config: Any) -> None:
    async with Node(make_config("a", "127.0.0.2")) as a:
        b_config = make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])
        events = a.events()
        async with Node(b_config):
            await wait_event(events, lambda e: isinstance(e, PeerUp))
        down = await wait_event(events, lambda e: isinstance(e, PeerDown))
        assert down.reason == "peer said bye: node shutting down"
        with pytest.raises(PeerUnavailable, match="peer said bye"):
            await a.send("127.0.0.3", "t", b"now")
        with pytest.raises(PeerUnavailable, match=r"after waiting 0\.05 s"):
            await a.send("127.0.0.3", "t", b"soon", wait_s=0.05)
        async with anyio.create_task_group() as tg:

            async def restart_b() -> None:
                async with Node(b_config) as b2, b2.subscribe("t") as sub:
                    with anyio.fail_after(5):
                        assert (await sub.receive()).payload == b"later"

            tg.start_soon(restart_b)
            await a.send("127.0.0.3", "t", b"later", wait_s=5)


async def test_dial_to_a_closed_port_says_connection_refused(make_config: Any) -> None:
    from .conftest import free_port

    port = free_port("127.0.0.6")  # nothing listens there
    async with Node(make_config("a", "127.0.0.2", [("127.0.0.6", port)])) as a:
        refused = await wait_event(a.events(), lambda e: isinstance(e, Refused))
        assert str(refused.error) == f"127.0.0.6:{port}: cannot connect: connection refused"
        assert [(p.ip, p.state) for p in a.peers()] == [("127.0.0.6", "down")]


async def test_answering_pings_does_not_stop_a_node_pinging_itself(make_config: Any) -> None:
    # A pings more often than B; if B's pongs counted as traffic, B would
    # never ping and never learn that its own direction works.
    fast = dict(keepalive_interval_s=0.05, keepalive_timeout_s=1.0, keepalive_jitter=0.0)
    slow = dict(keepalive_interval_s=0.15, keepalive_timeout_s=1.0, keepalive_jitter=0.0)
    async with Node(make_config("a", "127.0.0.2", **fast)) as a:
        config_b = make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)], **slow)
        async with Node(config_b) as b:
            await wait_event(b.events(), lambda e: isinstance(e, PeerUp))

            def pongs(node: Node, ip: str) -> int:
                live = node.keepalive.liveness(ip, anyio.current_time())
                return live.pongs_received if live else 0

            await wait_until(lambda: pongs(b, "127.0.0.2") >= 3 and pongs(a, "127.0.0.3") >= 3)


async def test_restarted_node_redials_the_peers_it_knew(make_config: Any, tmp_path: Any) -> None:
    import shutil

    # A state dir of its own (copied identity), so remembering peers is safe here.
    state = tmp_path / "a"
    shutil.copytree(make_config("a", "127.0.0.2").state_dir, state)
    async with Node(make_config("b", "127.0.0.3")) as b:
        config = make_config(
            "a", "127.0.0.2", [("127.0.0.3", b.listen_port)], state_dir=state, remember_peers=True
        )
        async with Node(config) as a:
            await wait_event(a.events(), lambda e: isinstance(e, PeerUp))
        assert (state / "known_peers.json").exists()
        # Restarted with no peer list: it dials the peer it knew.
        async with Node(config.replace(peers=[])) as a:
            up = await wait_event(a.events(), lambda e: isinstance(e, PeerUp))
            assert (up.peer, up.direction) == ("127.0.0.3", OUTBOUND)


async def test_send_many_delivers_in_order_and_checks_everything_first(make_config: Any) -> None:
    async with Node(make_config("a", "127.0.0.2", subscription_buffer=1024)) as a:
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            await wait_event(b.events(), lambda e: isinstance(e, PeerUp))
            with a.subscribe("bulk") as sub:
                with pytest.raises(InvalidArgument, match="payload: expected bytes, got str"):
                    await b.send_many("127.0.0.2", "bulk", [b"ok", "not bytes"])  # type: ignore[list-item]
                with pytest.raises(InvalidArgument, match="send_many does not address devices"):
                    await b.send_many("127.0.0.2/pico", "bulk", [b"x"])
                payloads = [b"%04d" % i + bytes(200) for i in range(500)]
                assert await b.send_many("127.0.0.2", "bulk", payloads) == 500
                with anyio.fail_after(5):
                    got = [(await sub.receive()).payload for _ in range(500)]
                assert got == payloads  # nothing from the refused calls came through


async def test_a_dialler_the_listener_does_not_trust_is_told_so(
    make_config: Any, identities: Any
) -> None:
    """Regression: a node refused for not being authorised saw only the
    connection closing (EndOfStream), and nothing said what to do."""
    from edgenode.errors import PeerRefused

    strict = make_config("a", "127.0.0.2", authorised=identities.ids("c"))  # not b
    async with Node(strict) as a:
        b_config = make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])
        async with Node(b_config) as b:
            refused = await wait_event(
                b.events(), lambda e: isinstance(e, Refused) and e.peer == "127.0.0.2", 20
            )
            assert type(refused.error) is PeerRefused
            b_id = identities["b"].node_id
            assert str(refused.error) == (
                f"127.0.0.2: the peer refused this node: not authorised; it does not trust "
                f"this node {b_id} (there: edgenode authorise {b_id})"
            )
            [row] = b.peers()
            assert row.state == "down" and row.redial_in_s is not None  # retried, not fatal


@pytest.mark.parametrize(("peers", "said"), [(0, "0 peers"), (1, "1 peer"), (2, "2 peers")])
async def test_the_start_line_counts_peers_in_english(
    make_config: Any, caplog: pytest.LogCaptureFixture, peers: int, said: str
) -> None:
    # Regression: a node with one peer said "(1 peers configured, ...)".
    caplog.set_level("INFO", logger="edgenode.node")
    configured = [(f"127.0.93.{i}", 7300) for i in range(2, 2 + peers)]
    async with Node(make_config("a", "127.0.93.1", configured)) as a:
        [line] = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    assert line.startswith(f"node {a.node_id} listening on 127.0.93.1:")
    assert f"({said} configured, " in line
