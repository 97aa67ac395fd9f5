"""The fault kit (edgenode.testing), and two nodes living through its faults.

First the kit's tools on their own, over plain sockets, pseudo-terminals and
processes: the TCP proxy, the pty relay, the signal helpers, the plugin.
Then two real nodes whose whole link runs through the proxy (each sees the
other only at an alias the proxy owns, so every dial and redial goes through
it): under delay, a black hole, a cut, a half-open connection and a stopped
process, each node notices what it should, when it should, and carries on.
The faults found three bugs; each has a regression test here.
"""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from edgenode.errors import InvalidArgument, PeerUnavailable
from edgenode.node import Incoming, Node, PeerDown, PeerUp, Refused
from edgenode.proto.messages import Request
from edgenode.testing import wait_for
from edgenode.testing.proxy import CLIENT, FIN, RST, TARGET, ProxyError, ProxyLink, TcpProxy
from edgenode.testing.ptyrelay import PtyRelay
from edgenode.testing.signals import cont, kill, pid_of, process_state, stop, stopped

from .conftest import RawPeer, free_port, wait_event, wait_until

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent

# -- the proxy over plain sockets ---------------------------------------------------------


class EchoServer:
    """A threaded TCP echo server on 127.0.0.2 that records who connected."""

    def __init__(self, host: str = "127.0.0.2") -> None:
        self.sock = socket.create_server((host, 0))
        self.address = self.sock.getsockname()[:2]
        self.peers: list[tuple[str, int]] = []
        self.closed_by_peer: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        self.closed_by_peer.append("fin")
                        return
                    conn.sendall(data)
            except ConnectionResetError:
                self.closed_by_peer.append("rst")
            except OSError:
                self.closed_by_peer.append("error")

    def close(self) -> None:
        self.sock.close()


@contextmanager
def echo_route(
    proxy: TcpProxy, source_host: str | None = "127.0.0.9"
) -> Iterator[tuple[EchoServer, socket.socket]]:
    """An echo server behind a route of ``proxy``, and a client connected through it."""
    server = EchoServer()
    route = proxy.add_route(("127.0.0.2", 0), server.address, source_host=source_host)
    client = socket.create_connection(route.address, timeout=5)
    try:
        client.sendall(b"hello")
        assert recv_exactly(client, 5) == b"hello"
        yield server, client
    finally:
        client.close()
        server.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def assert_silent(sock: socket.socket, for_s: float = 0.3) -> None:
    """A bounded negative check: nothing arrives, and the connection stays open."""
    sock.settimeout(for_s)
    with pytest.raises(socket.timeout):
        sock.recv(1)
    sock.settimeout(5)


def assert_reset(address: tuple[str, int]) -> None:
    """A connection to ``address`` is reset: while connecting, or at the first read."""
    with pytest.raises(ConnectionResetError):  # from either call
        with socket.create_connection(address, timeout=5) as client:
            client.recv(1)


def test_proxy_connects_out_from_the_source_host(tcp_proxy: TcpProxy) -> None:
    with echo_route(tcp_proxy, source_host="127.0.0.9") as (server, _):
        assert [peer[0] for peer in server.peers] == ["127.0.0.9"]
    assert tcp_proxy.accepted == 1 and tcp_proxy.routes[0].accepted == 1


def test_proxy_delay_with_jitter_keeps_order(tcp_proxy: TcpProxy) -> None:
    with echo_route(tcp_proxy) as (_, client):
        tcp_proxy.delay(0.05, jitter_s=0.05)
        sent = b"".join(b"%04d" % i for i in range(300))
        started = time.monotonic()
        for i in range(0, len(sent), 40):  # many chunks, each with its own jitter
            client.sendall(sent[i : i + 40])
        assert recv_exactly(client, len(sent)) == sent
        # There and back: at least the fixed delay twice (a lower bound only).
        assert time.monotonic() - started >= 0.1
        lanes = tcp_proxy.stats()["lanes"]
        assert lanes["route 0 up"]["bytes_forwarded"] == 5 + len(sent)


def test_proxy_black_hole_keeps_connections_open_and_hides_closes(tcp_proxy: TcpProxy) -> None:
    with echo_route(tcp_proxy) as (server, client):
        tcp_proxy.drop()
        client.sendall(b"lost")
        assert_silent(client)
        client.close()  # the FIN falls into the hole too: the server never hears it
        up = tcp_proxy.routes[0].up
        # Wait for the close as well: undropping while it is still on its way
        # would let it through.
        wait_for(lambda: up.bytes_dropped == 4 and up.closes_dropped == 1, what="the drop")
        assert server.closed_by_peer == [] and tcp_proxy.open_connections == 1
        tcp_proxy.undrop()
        assert tcp_proxy.open_connections == 1


@pytest.mark.parametrize(("how", "seen"), [(RST, "rst"), (FIN, "fin")])
def test_proxy_cut_closes_both_sides(tcp_proxy: TcpProxy, how: str, seen: str) -> None:
    with echo_route(tcp_proxy) as (server, client):
        assert tcp_proxy.cut(how) == 1
        if how == RST:
            with pytest.raises(ConnectionResetError):
                client.recv(1)
        else:
            assert client.recv(1) == b""
        wait_for(lambda: server.closed_by_peer, what="the server noticing")
        assert server.closed_by_peer == [seen]
        assert tcp_proxy.cuts == 1 and tcp_proxy.cut() == 0
        client.close()  # after a FIN, the proxy holds each side until it closes
        wait_for(lambda: tcp_proxy.open_connections == 0, what="the proxy letting go")


def test_proxy_half_open_closes_one_side_and_silences_the_other(tcp_proxy: TcpProxy) -> None:
    with echo_route(tcp_proxy) as (server, client):
        assert tcp_proxy.half_open(close=TARGET) == 1
        wait_for(lambda: server.closed_by_peer, what="the server noticing")
        assert server.closed_by_peer == ["rst"]
        client.sendall(b"anyone?")
        assert_silent(client)
        assert tcp_proxy.open_connections == 1  # until the client gives up
        client.close()
        wait_for(lambda: tcp_proxy.open_connections == 0, what="the proxy letting go")
    with echo_route(tcp_proxy) as (server, client):
        assert tcp_proxy.half_open(close=CLIENT) == 1
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        assert server.closed_by_peer == []


def test_proxy_pause_holds_bytes_until_resume(tcp_proxy: TcpProxy) -> None:
    with echo_route(tcp_proxy) as (_, client):
        tcp_proxy.pause(direction="up")
        client.sendall(b"held")
        assert_silent(client)
        assert tcp_proxy.routes[0].up.bytes_forwarded == 5
        tcp_proxy.resume(direction="up")
        assert recv_exactly(client, 4) == b"held"


def test_proxy_refuses_new_connections_then_heals(tcp_proxy: TcpProxy) -> None:
    server = EchoServer()
    try:
        route = tcp_proxy.add_route(("127.0.0.2", 0), server.address)
        tcp_proxy.refuse_new()
        assert_reset(route.address)
        assert tcp_proxy.refused == 1 and server.peers == []
        tcp_proxy.heal()
        with socket.create_connection(route.address, timeout=5) as client:
            client.sendall(b"ok")
            assert recv_exactly(client, 2) == b"ok"
    finally:
        server.close()


def test_proxy_resets_the_client_when_the_target_is_down(tcp_proxy: TcpProxy) -> None:
    dead = ("127.0.0.2", free_port("127.0.0.2"))
    route = tcp_proxy.add_route(("127.0.0.2", 0), dead)
    assert_reset(route.address)
    assert tcp_proxy.connect_failures == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.delay(-1), "delay_s: expected a finite number >= 0, got -1"),
        (lambda p: p.delay(0.1, "x"), "jitter_s: expected a number, got 'x'"),
        (lambda p: p.delay(float("inf")), "delay_s: expected a finite number >= 0, got inf"),
        (
            lambda p: p.drop(direction="sideways"),
            "direction: expected 'up', 'down' or 'both', got 'sideways'",
        ),
        (lambda p: p.drop(sender="127.0.0.77"), "sender: no lane carries bytes from 127.0.0.77"),
        (lambda p: p.cut("slam"), "how: expected 'rst' or 'fin', got 'slam'"),
        (lambda p: p.half_open(close="both"), "close: expected 'target' or 'client', got 'both'"),
        (lambda p: p.refuse_new("no"), "how: expected 'rst', 'fin' or None, got 'no'"),
        (
            lambda p: p.add_link(
                ("127.0.0.3", 7300), ("127.0.0.2", 7300), a_alias="127.0.0.13", b_alias="127.0.0.12"
            ),
            "a at 127.0.0.3 and b at 127.0.0.2 would disagree which is the higher address "
            "(a sees b at 127.0.0.12, b sees a at 127.0.0.13): put both of one node's "
            "addresses above both of the other's",
        ),
        (
            lambda p: p.add_link(
                ("127.0.0.3", 7300), ("127.0.0.2", 7300), a_alias="127.0.0.2", b_alias="127.0.0.4"
            ),
            "expected four different addresses, got a 127.0.0.3, b 127.0.0.2, "
            "a_alias 127.0.0.2, b_alias 127.0.0.4",
        ),
        (
            lambda p: p.add_link(
                ("127.0.0.3", 0), ("127.0.0.2", 7300), a_alias="127.0.0.13", b_alias="127.0.0.1"
            ),
            "a's port: expected 1..65535, got 0",
        ),
    ],
    ids=[
        "negative delay",
        "jitter not a number",
        "infinite delay",
        "bad direction",
        "unknown sender",
        "bad cut",
        "bad half-open side",
        "bad refusal",
        "aliases out of order",
        "alias is a node's address",
        "port 0",
    ],
)
def test_proxy_rejects_bad_arguments(tcp_proxy: TcpProxy, call: Any, message: str) -> None:
    tcp_proxy.add_route(("127.0.0.2", 0), ("127.0.0.2", 9), source_host="127.0.0.9")
    with pytest.raises(InvalidArgument) as caught:
        call(tcp_proxy)
    assert str(caught.value) == message


def test_proxy_rejects_a_taken_address_and_use_after_close() -> None:
    with socket.create_server(("127.0.0.2", 0)) as taken:
        port = taken.getsockname()[1]
        with TcpProxy() as proxy:
            with pytest.raises(ProxyError) as caught:
                proxy.add_route(("127.0.0.2", port), ("127.0.0.2", 9))
            assert str(caught.value) == f"cannot listen on 127.0.0.2:{port}: Address already in use"
    with pytest.raises(ProxyError) as caught:
        proxy.drop()
    assert str(caught.value) == "the proxy is not running (start it, or use it in a with block)"
    proxy.close()  # idempotent


# -- the pty relay --------------------------------------------------------------------------


@contextmanager
def relay_ends(relay: PtyRelay) -> Iterator[tuple[int, int]]:
    """Our own two ends of ``relay``: the near port (as a node opens it) and the far master."""
    near = os.open(relay.near.path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(near)
    relay.near.release_slave()
    try:
        yield near, relay.far.master
    finally:
        os.close(near)


def read_exactly(fd: int, size: int, timeout_s: float = 5.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout_s
    while len(data) < size:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"{len(data)} of {size} bytes within {timeout_s} s")
        data += os.read(fd, size - len(data))
    return data


def test_pty_relay_passes_bytes_both_ways_while_quiet(pty_relay: PtyRelay) -> None:
    with relay_ends(pty_relay) as (near, far):
        os.write(near, b"to the device")
        assert read_exactly(far, 13) == b"to the device"
        os.write(far, b"to the node")
        assert read_exactly(near, 11) == b"to the node"
    assert pty_relay.counts == {"bytes": 24, "corrupted": 0, "dropped": 0, "inserted": 0}


def test_pty_relay_corrupts_drops_and_inserts_at_its_rates(pty_relay: PtyRelay) -> None:
    data = bytes(range(200))
    pty_relay.resync = b"\x00"
    with relay_ends(pty_relay) as (near, far):
        pty_relay.set_noise(corrupt=1.0, direction="to_far")
        pty_relay.noisy = True
        os.write(near, data)
        got = read_exactly(far, len(data))
        assert all(bin(a ^ b).count("1") == 1 for a, b in zip(data, got))  # one bit each
        pty_relay.set_noise(corrupt=0.0, insert=1.0, direction="to_far")
        os.write(near, data)
        got = read_exactly(far, 2 * len(data))
        assert got[1::2] == data  # a random byte before every byte
        pty_relay.set_noise(insert=0.0, drop=1.0, direction="to_far")
        os.write(near, data)
        os.write(far, b"back")  # the other way is quiet
        assert read_exactly(near, 4) == b"back"
        wait_for(lambda: pty_relay.to_far.dropped == len(data), what="the drops")
        pty_relay.noisy = False
        os.write(near, b"clean")
        assert read_exactly(far, 6) == b"\x00clean"  # the resync byte, then the bytes
    assert pty_relay.counts == {"bytes": 609, "corrupted": 200, "dropped": 200, "inserted": 200}


def test_pty_relay_carries_on_when_the_port_is_closed_and_reopened(pty_relay: PtyRelay) -> None:
    with relay_ends(pty_relay) as (near, far):
        os.write(near, b"before")
        assert read_exactly(far, 6) == b"before"
    # Nothing holds the near port open now (a node restarting): the relay waits.
    wait_for(lambda: pty_relay.to_far.hangups > 0, what="the relay seeing the hang-up")
    with relay_ends(pty_relay) as (near, far):
        os.write(far, b"after")
        assert read_exactly(near, 5) == b"after"
        os.write(near, b"again")
        assert read_exactly(far, 5) == b"again"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"corrupt": 2}, "corrupt: expected a rate in 0..1, got 2"),
        ({"drop": "x"}, "drop: expected a number, got 'x'"),
        ({"drop": 0.6, "corrupt": 0.6}, "drop + corrupt: expected at most 1, got 0.6 + 0.6"),
        (
            {"insert": 0.1, "direction": "up"},
            "direction: expected 'to_far', 'to_near' or 'both', got 'up'",
        ),
    ],
)
def test_pty_relay_rejects_bad_rates(
    pty_relay: PtyRelay, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        pty_relay.set_noise(**kwargs)
    assert str(caught.value) == message


# -- the signal helpers ----------------------------------------------------------------------


def test_signal_helpers_stop_continue_and_kill_a_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stop(proc)
        assert process_state(proc) == "T"
        cont(proc)
        # Continued: any state but stopped or dead ("D" too, on a busy machine).
        assert process_state(proc) in ("R", "S", "D")
        with stopped(proc.pid):
            assert process_state(proc.pid) == "T"
        assert process_state(proc) in ("R", "S", "D")
        assert kill(proc) == -9
        assert process_state(proc) is None
        cont(proc)  # gone: not an error
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("bad", ["12", True, 0, None])
def test_signal_helpers_reject_what_is_not_a_process(bad: Any) -> None:
    with pytest.raises(InvalidArgument) as caught:
        pid_of(bad)
    assert str(caught.value) == f"expected a pid or a process with one, got {bad!r}"


# -- two nodes through the proxy ------------------------------------------------------------

# Each node sees the other only at its alias; every address of a is above
# every address of b, so both agree a is the higher (for simultaneous opens).
A_IP, A_ALIAS = "127.0.77.3", "127.0.77.13"
B_IP, B_ALIAS = "127.0.66.2", "127.0.66.12"
INTERVAL_S = 0.3
TIMEOUT_S = 1.2
HANDSHAKE_S = 1.0
BACKOFF_CAP_S = 0.5
TIMINGS = dict(
    keepalive_interval_s=INTERVAL_S,
    keepalive_timeout_s=TIMEOUT_S,
    handshake_timeout_s=HANDSHAKE_S,
    backoff_cap_s=BACKOFF_CAP_S,
)
KEEPALIVE = f"no frames for {TIMEOUT_S} s (keepalive timeout)"
#: How a node reports a connection reset (anyio 4.12, on Python 3.9, loses the OS error), or
#: a closed one.
RESET = re.compile(
    r"connection lost( while sending)?: (connection reset by peer|broken pipe|connection broken)"
)
CLOSED = re.compile(r"connection closed by peer")
#: Slack for a busy machine on top of what the rules allow; never a target.
MARGIN_S = 3.0


async def echo(request: Incoming) -> bytes:
    return request.payload


def down(peer: str) -> Any:
    return lambda e: isinstance(e, PeerDown) and e.peer == peer


def up(peer: str) -> Any:
    return lambda e: isinstance(e, PeerUp) and e.peer == peer


def last_frame_at(node: Node, ip: str) -> float:
    """When ``node`` last heard from ``ip`` (on the loop's clock, which is the node's)."""
    [row] = [p for p in node.peers() if p.ip == ip]
    assert row.last_heard_s is not None
    return anyio.current_time() - row.last_heard_s


def assert_silence_lasted_the_timeout(last_frame: float) -> None:
    """Keepalive declares a peer dead no sooner than the timeout after its last frame."""
    assert anyio.current_time() - last_frame >= TIMEOUT_S - 0.01


class Pair:
    """Nodes a and b, linked through the proxy, with their event streams.

    ``a_events``/``b_events`` are for waiting; ``history`` keeps every event.
    """

    def __init__(self, a: Node, b: Node, link: ProxyLink, proxy: TcpProxy) -> None:
        self.a, self.b, self.link, self.proxy = a, b, link, proxy
        self.a_events = a.events()
        self.b_events = b.events()
        self.history: list[tuple[str, Any]] = []

    async def record(self, name: str, node: Node) -> None:
        with node.events() as events:
            async for event in events:
                self.history.append((name, event))

    async def wait_down(self, timeout: float) -> tuple[PeerDown, PeerDown]:
        """Both nodes' PeerDown for each other."""
        a_down = await wait_event(self.a_events, down(B_ALIAS), timeout)
        b_down = await wait_event(self.b_events, down(A_ALIAS), timeout)
        return a_down, b_down

    async def wait_up(self, timeout: float) -> None:
        await wait_event(self.a_events, up(B_ALIAS), timeout)
        await wait_event(self.b_events, up(A_ALIAS), timeout)

    async def settled(self) -> None:
        """Wait until one connection carries the link and no other is being made.

        When both nodes redial at once (a simultaneous open), the losing
        connection is closed just after both sides came up; a request sent
        on it is lost (see test_request_on_a_replaced_connection_fails_fast).
        """

        def one_connection() -> bool:
            nodes = (self.a, self.b)
            return (
                self.proxy.open_connections == 1
                and not any(node.dispatcher.dials.dialing for node in nodes)  # none on its way
                and all(node.peers()[0].state == "up" for node in nodes)
            )

        await wait_until(one_connection, timeout=MARGIN_S)

    async def round_trip(self) -> None:
        """A request each way, and neither node sees the other at another address."""
        await self.settled()
        assert await self.a.request(B_ALIAS, "echo", b"a->b", timeout=5, wait_s=5) == b"a->b"
        assert await self.b.request(A_ALIAS, "echo", b"b->a", timeout=5, wait_s=5) == b"b->a"
        assert [p.ip for p in self.a.peers()] == [B_ALIAS]
        assert [p.ip for p in self.b.peers()] == [A_ALIAS]  # never bypassed the proxy


@asynccontextmanager
async def proxied_pair(make_config: Any, proxy: TcpProxy, **overrides: Any) -> AsyncIterator[Pair]:
    """a and b up, linked through ``proxy``; a has b as its configured peer."""
    settings = {**TIMINGS, **overrides}
    async with Node(make_config("b", B_IP, **settings)) as b:
        async with Node(make_config("a", A_IP, **settings)) as a:
            link = proxy.add_link(
                (A_IP, a.listen_port), (B_IP, b.listen_port), a_alias=A_ALIAS, b_alias=B_ALIAS
            )
            pair = Pair(a, b, link, proxy)
            a.handle("echo", echo)
            b.handle("echo", echo)
            async with anyio.create_task_group() as tg:
                tg.start_soon(pair.record, "a", a)
                tg.start_soon(pair.record, "b", b)
                await a.add_peer(*link.a_dials)
                await pair.wait_up(5)
                yield pair
                tg.cancel_scope.cancel()


async def test_nodes_through_the_proxy_see_aliases_and_redial_through_it(
    make_config: Any, tcp_proxy: TcpProxy
) -> None:
    async with proxied_pair(make_config, tcp_proxy) as pair:
        await pair.round_trip()
        assert (pair.link.to_b.accepted, pair.link.to_a.accepted) == (1, 0)
        # Both redial after a cut, each through the proxy.
        tcp_proxy.cut()
        await pair.wait_down(5)
        await pair.wait_up(5)
        await pair.round_trip()
        assert pair.link.to_b.accepted + pair.link.to_a.accepted >= 2


async def test_delay_keeps_peers_up_and_shows_in_rtt(make_config: Any, tcp_proxy: TcpProxy) -> None:
    async with proxied_pair(make_config, tcp_proxy) as pair:
        delay_s = 0.15
        tcp_proxy.delay(delay_s, jitter_s=0.05)
        # Pongs measured after the delay began: at least the delay both ways.
        rtt = lambda node: node.peers()[0].rtt_s or 0.0  # noqa: E731
        await wait_until(lambda: rtt(pair.a) >= 2 * delay_s and rtt(pair.b) >= 2 * delay_s)
        started = anyio.current_time()
        await pair.round_trip()
        assert anyio.current_time() - started >= 4 * delay_s  # two requests, each there and back
        tcp_proxy.heal()
        await pair.round_trip()
        assert pair.a.peers()[0].state == "up" and pair.b.peers()[0].state == "up"
        # Up all along: one PeerUp each, from the start.
        assert sorted((name, type(e).__name__) for name, e in pair.history) == [
            ("a", "PeerUp"),
            ("b", "PeerUp"),
        ]


async def test_black_hole_is_noticed_by_keepalive_then_heals(
    make_config: Any, tcp_proxy: TcpProxy
) -> None:
    async with proxied_pair(make_config, tcp_proxy) as pair:
        tcp_proxy.drop()
        a_heard = last_frame_at(pair.a, B_ALIAS)
        b_heard = last_frame_at(pair.b, A_ALIAS)
        a_down = await wait_event(pair.a_events, down(B_ALIAS), TIMEOUT_S + MARGIN_S)
        assert_silence_lasted_the_timeout(a_heard)
        b_down = await wait_event(pair.b_events, down(A_ALIAS), TIMEOUT_S + MARGIN_S)
        assert_silence_lasted_the_timeout(b_heard)
        # Silence, not a close: each side decided by keepalive.
        assert (a_down.reason, b_down.reason) == (KEEPALIVE, KEEPALIVE)
        # Redials go into the hole and time out in their handshake.
        refused = await wait_event(
            pair.a_events, lambda e: isinstance(e, Refused), HANDSHAKE_S + BACKOFF_CAP_S + MARGIN_S
        )
        assert str(refused.error) in (
            f"{B_ALIAS}: dial to {B_ALIAS}:{pair.b.listen_port} not finished within "
            f"{HANDSHAKE_S} s",
            f"{B_ALIAS}: handshake not finished within {HANDSHAKE_S} s",  # b's redial, inbound
        )
        tcp_proxy.heal()
        # A dial in the hole ends within a handshake timeout; the next is within the cap.
        await pair.wait_up(HANDSHAKE_S + BACKOFF_CAP_S + MARGIN_S)
        await pair.round_trip()


@pytest.mark.parametrize(("how", "reason"), [(RST, RESET), (FIN, CLOSED)])
async def test_cut_is_noticed_at_once_by_both_then_reconnects(
    make_config: Any, tcp_proxy: TcpProxy, how: str, reason: re.Pattern[str]
) -> None:
    async with proxied_pair(make_config, tcp_proxy) as pair:
        assert tcp_proxy.cut(how) == 1
        a_down, b_down = await pair.wait_down(TIMEOUT_S + MARGIN_S)
        # Noticed from the transport, not by keepalive.
        assert KEEPALIVE not in (a_down.reason, b_down.reason)
        if how == FIN:
            assert CLOSED.fullmatch(a_down.reason) and CLOSED.fullmatch(b_down.reason)
        await pair.wait_up(BACKOFF_CAP_S + MARGIN_S)
        await pair.round_trip()


async def test_reset_connection_is_reported_as_a_reset(
    make_config: Any, tcp_proxy: TcpProxy
) -> None:
    """Regression: a reset was reported as "connection lost: brokenResourceError"."""
    async with proxied_pair(make_config, tcp_proxy) as pair:
        tcp_proxy.cut(RST)
        a_down, b_down = await pair.wait_down(MARGIN_S)
        assert RESET.fullmatch(a_down.reason), a_down.reason
        assert RESET.fullmatch(b_down.reason), b_down.reason


async def test_half_open_is_noticed_within_the_keepalive_timeout(
    make_config: Any, tcp_proxy: TcpProxy
) -> None:
    async with proxied_pair(make_config, tcp_proxy) as pair:
        # a dialled: b is the target side. b is reset; a is left open and silent.
        assert tcp_proxy.half_open(close=TARGET) == 1
        b_down = await wait_event(pair.b_events, down(A_ALIAS), MARGIN_S)
        assert b_down.reason != KEEPALIVE  # noticed from the transport
        # a hears nothing on its end, and would end it by keepalive; but b
        # redials first, and as the two had settled on the old connection,
        # a takes the redial as proof that b lost it (registry rule 4e).
        a_down = await wait_event(pair.a_events, down(B_ALIAS), TIMEOUT_S + MARGIN_S)
        assert a_down.reason == "superseded by a newer connection: the peer had lost this one"
        await pair.wait_up(BACKOFF_CAP_S + HANDSHAKE_S + MARGIN_S)
        await pair.round_trip()


async def test_half_open_at_the_higher_address_does_not_make_the_lower_flap(
    make_config: Any, tcp_proxy: TcpProxy
) -> None:
    """Regression: while a (the higher address, which wins simultaneous opens)
    held a half-open connection, each of b's redials was admitted by b (PeerUp)
    and refused by a (PeerDown), until a's keepalive timeout: b's application
    saw the peer flap up and down, and a stale connection outlived a redial.

    A redial that arrives long after the connection it contradicts was made
    (two handshake timeouts: no simultaneous open lasts that long) means the
    dialler has lost that connection.
    """
    async with proxied_pair(make_config, tcp_proxy) as pair:
        await wait_until(lambda: (pair.a.peers()[0].up_for_s or 0.0) > 2 * HANDSHAKE_S + 0.2)
        tcp_proxy.half_open(close=TARGET)
        await wait_event(pair.b_events, down(A_ALIAS), MARGIN_S)
        await pair.settled()
        await pair.round_trip()
        b_saw = [type(e).__name__ for name, e in pair.history if name == "b"]
        assert b_saw == ["PeerUp", "PeerDown", "PeerUp"]


async def test_request_on_a_replaced_connection_fails_fast(
    make_config: Any, identities: Any
) -> None:
    """Regression: a request in flight on a connection that a newer one replaced
    (both nodes dialled at once, or the peer redialled) was lost with it, and
    the caller waited out the request's whole timeout."""
    # Raw peers do not answer pings: keepalive must not end the link first.
    config = make_config("a", "127.0.0.2", keepalive_interval_s=30, keepalive_timeout_s=60)
    async with Node(config) as a:
        events = a.events()
        first = await RawPeer.connect(identities["raw"], "127.0.0.2", a.listen_port)
        await first.hello(identities["raw"], epoch=7)
        await wait_event(events, up("127.0.0.9"))
        outcome: dict[str, Exception] = {}

        async def ask() -> None:
            try:
                await a.request("127.0.0.9", "question", b"?", timeout=60)
            except Exception as exc:
                outcome["error"] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            while not any(isinstance(m, Request) for m in await first.messages()):
                pass  # the request is on the first connection, unanswered
            second = await RawPeer.connect(identities["raw"], "127.0.0.2", a.listen_port)
            await second.hello(identities["raw"], epoch=7)  # replaces the first
            await wait_until(lambda: "error" in outcome, timeout=MARGIN_S)  # not 60 s
        error = outcome["error"]
        assert isinstance(error, PeerUnavailable), repr(error)
        assert str(error) == (
            "peer 127.0.0.9: connection replaced before the response arrived "
            "(superseded by a newer connection from the same session)"
        )
        await first.aclose()
        await second.aclose()


# -- a configured peer behind a port forward ---------------------------------------------


def test_registry_keeps_a_configured_peers_port_over_its_hello() -> None:
    """Regression: the port a peer announces replaced the configured one."""
    from edgenode.registry import INBOUND, Registry

    registry = Registry("127.0.0.3", max_peers=4, prune_after_s=60)
    registry.add_configured("127.0.0.2", 17300, 0.0)  # a port forward to its 7300
    conn = object()
    admission = registry.admit(conn, "127.0.0.2", "node-b", 1, INBOUND, 7300, 1.0)
    assert admission.accepted
    registry.closed(conn, "gone", 2.0)
    assert registry.get("127.0.0.2").listen_port == 17300  # type: ignore[union-attr]
    # A peer nobody configured is redialled where it says it listens.
    registry.admit(object(), "127.0.0.4", "node-c", 1, INBOUND, 7300, 3.0)
    assert registry.get("127.0.0.4").listen_port == 7300  # type: ignore[union-attr]


async def test_configured_peer_behind_a_port_forward_is_redialled_through_it(
    make_config: Any, tcp_proxy: TcpProxy
) -> None:
    """Regression: after the first connection a node redialled a configured peer
    at the port from its hello, past the forward that is the only way to it."""
    async with Node(make_config("b", B_IP, **TIMINGS)) as b:
        # b's real port is unknown to a: a knows only the forward's.
        forward = tcp_proxy.add_route((B_IP, 0), (B_IP, b.listen_port), source_host=A_IP)
        async with Node(make_config("a", A_IP, [forward.address], **TIMINGS)) as a:
            events = a.events()
            await wait_event(events, up(B_IP), 5)
            assert a.peers()[0].listen_port == forward.port


# -- a node process stopped, continued, killed ---------------------------------------------


async def test_stopped_node_process_is_declared_down_and_rejoins_when_continued(
    make_config: Any, identities: Any, tmp_path: Path
) -> None:
    from edgenode.identity import create_identity

    b_ip = "127.0.88.4"
    b_port = free_port(b_ip)
    b_id = create_identity(tmp_path / "b").node_id  # its own state: known peers, socket
    config = make_config(
        "a", A_IP, [(b_ip, b_port)], authorised=identities.ids("a") | {b_id}, **TIMINGS
    )
    argv = [
        sys.executable, "-m", "edgenode", "run",
        "--state-dir", str(tmp_path / "b"),
        "--listen", f"{b_ip}:{b_port}",
        "--authorise", identities["a"].node_id,
        "--keepalive-interval", str(INTERVAL_S),
        "--keepalive-timeout", str(TIMEOUT_S),
        "--handshake-timeout", str(HANDSHAKE_S),
        "--backoff-cap", str(BACKOFF_CAP_S),
    ]  # fmt: skip
    with open(tmp_path / "b.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with Node(config) as a:
            events = a.events()
            await wait_event(events, up(b_ip), 10)  # the process's start-up included
            stop(proc)
            heard = last_frame_at(a, b_ip)
            gone = await wait_event(events, down(b_ip), TIMEOUT_S + MARGIN_S)
            assert gone.reason == KEEPALIVE
            assert_silence_lasted_the_timeout(heard)
            cont(proc)
            await wait_event(events, up(b_ip), BACKOFF_CAP_S + HANDSHAKE_S + MARGIN_S)
            assert await a.request(b_ip, "edgenode/peers", b"", timeout=5, wait_s=5)
            await to_thread_kill(proc)
            killed = await wait_event(events, down(b_ip), MARGIN_S)
            assert CLOSED.fullmatch(killed.reason), killed.reason
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def to_thread_kill(proc: subprocess.Popen[Any]) -> None:
    # kill() reaps the process: a blocking wait, kept off the node's loop.
    assert await anyio.to_thread.run_sync(kill, proc) == -9


# -- the plugin -----------------------------------------------------------------------------


def test_plugin_imports_nothing_heavy() -> None:
    code = (
        "import sys, edgenode.testing.plugin, edgenode.testing\n"
        "heavy = ['anyio', 'ssl', 'cryptography', 'edgenode.node', 'edgenode.testing.proxy']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == ""


def test_plugin_is_registered_with_pytest() -> None:
    from importlib.metadata import entry_points

    found = entry_points()
    group = (
        found.select(group="pytest11") if hasattr(found, "select") else found.get("pytest11", ())
    )
    # A source checkout on sys.path may list the distribution twice.
    assert {(e.name, e.value) for e in group if e.name == "edgenode"} == {
        ("edgenode", "edgenode.testing.plugin")
    }


def quick_pytest(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    """Run pytest in-process with only the plugins named (others take a second to load)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins = ("anyio.pytest_plugin", "edgenode.testing.plugin")
    return pytester.runpytest(
        "-p", "no:cacheprovider", *(a for p in plugins for a in ("-p", p)), *args
    )


def test_plugin_reports_the_seed_of_a_failing_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        def test_fails(fault_seed):
            assert fault_seed < 0
        """
    )
    result = quick_pytest(pytester, monkeypatch, "--fault-seed", "1234")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*edgenode fault seed*", "1234 (rerun with --fault-seed=1234)"])


DOC = ROOT / "docs" / "testing.md"


def test_the_documented_example_runs(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/testing.md's example test file, as a user would run it."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    examples = [b for b in blocks if b.startswith("# test_my_app.py")]
    assert len(examples) == 1, "docs/testing.md should hold one '# test_my_app.py' example"
    pytester.makepyfile(test_my_app=examples[0])
    result = quick_pytest(pytester, monkeypatch, "-q")
    result.assert_outcomes(passed=1)
