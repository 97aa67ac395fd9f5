"""Tests of LAN discovery: the beacon codec, its limiter, and beacons on real sockets.

The codec and limiter are pure: bytes and times in, no sockets. The
:class:`Discovery` tests use real UDP sockets bound to 127.255.255.255,
loopback's broadcast address, to which Linux delivers a copy of every
broadcast for every socket bound there with SO_REUSEADDR/SO_REUSEPORT.
Senders bind 127.0.0.2, 127.0.0.3, ...: that is the source address peers
dial. Nothing is sent anywhere but to loopback. The byte vector is the one
docs/discovery.md shows: keep them identical.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgenode.config import NodeConfig
from edgenode.errors import (
    ConfigError,
    InvalidArgument,
    MalformedMessage,
    VersionMismatch,
)
from edgenode.node import Node, PeerUp
from edgenode.proto.beacon import (
    HEAD_BYTES,
    MAX_BEACON_BYTES,
    Beacon,
    BeaconLimiter,
    decode_beacon,
    encode_beacon,
)
from edgenode.registry import DOWN, OUTBOUND, UP
from edgenode.transports.discovery import (
    BeaconHeard,
    Discovery,
    wire_discovery,
)

from .conftest import Identities, wait_until

pytestmark = pytest.mark.anyio

BROADCAST = "127.255.255.255"
ID_A = "mmg4-2klg-yqzw-neis-krel-xms3-qjpg"
ID_B = "abcd-efgh-ijkl-mnop-qrst-uvwx-2345"
# The vector of docs/discovery.md: ID_A listening on 7300, epoch 0x0123456789abcdef.
VECTOR = bytes.fromhex(
    "45 44 47 42 01 1c 84 01 23 45 67 89 ab cd ef 22"
    " 6d 6d 67 34 2d 32 6b 6c 67 2d 79 71 7a 77 2d 6e 65 69 73"
    " 2d 6b 72 65 6c 2d 78 6d 73 33 2d 71 6a 70 67"
)


# -- the codec -------------------------------------------------------------------------


def test_beacon_vector_matches_the_documented_bytes() -> None:
    assert encode_beacon(ID_A, 7300, 0x0123456789ABCDEF) == VECTOR
    assert len(VECTOR) == 50
    assert decode_beacon(VECTOR) == Beacon(ID_A, 7300, 0x0123456789ABCDEF)


@given(
    node_id=st.text("abcdefghijklmnopqrstuvwxyz234567-", min_size=1, max_size=64),
    listen_port=st.integers(1, 65535),
    epoch=st.integers(0, 2**64 - 1),
)
def test_beacon_round_trips(node_id: str, listen_port: int, epoch: int) -> None:
    data = encode_beacon(node_id, listen_port, epoch)
    assert len(data) == HEAD_BYTES + len(node_id) <= MAX_BEACON_BYTES
    assert decode_beacon(data) == Beacon(node_id, listen_port, epoch)
    assert decode_beacon(bytearray(data)) == decode_beacon(memoryview(data))


@given(st.binary(max_size=2 * MAX_BEACON_BYTES))
def test_decode_beacon_raises_only_protocol_errors(data: bytes) -> None:
    try:
        beacon = decode_beacon(data)
    except (MalformedMessage, VersionMismatch):
        return
    assert encode_beacon(beacon.node_id, beacon.listen_port, beacon.epoch) == data


@given(st.binary(min_size=12, max_size=MAX_BEACON_BYTES - 4))
def test_decode_beacon_raises_only_protocol_errors_after_the_magic(tail: bytes) -> None:
    # Random bytes rarely start with the magic; these always do.
    for data in (b"EDGB" + tail, b"EDGB\x01" + tail):
        try:
            decode_beacon(data)
        except (MalformedMessage, VersionMismatch):
            pass


def test_decode_beacon_rejects_every_truncation() -> None:
    for n in range(len(VECTOR)):
        with pytest.raises(MalformedMessage):
            decode_beacon(VECTOR[:n])


def _with(offset: int, value: bytes, data: bytes = VECTOR) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (VECTOR + bytes(79), MalformedMessage, "beacon of 129 bytes exceeds 128-byte limit: 45 44"),
        (
            b"",
            MalformedMessage,
            r"expected beacon magic 45 44 47 42 \('EDGB'\), got an empty datagram$",
        ),
        (
            b"EDGN\x01\x00\x00",
            MalformedMessage,
            r"expected beacon magic 45 44 47 42 \('EDGB'\), got 45 44 47 4e 01 00 00$",
        ),
        (b"EDGB", MalformedMessage, "beacon of 4 bytes ends before its version: 45 44 47 42$"),
        (_with(4, b"\x02"), VersionMismatch, "beacon version 2 not supported; expected 1"),
        (b"EDGB\x02", VersionMismatch, "beacon version 2 not supported; expected 1"),
        (
            VECTOR[:15],
            MalformedMessage,
            r"beacon of 15 bytes is shorter than its 16-byte header: 45 44 47 42 01 1c 84",
        ),
        (_with(5, b"\x00\x00"), MalformedMessage, "beacon listen port should be 1..65535, got 0"),
        (_with(15, b"\x00"), MalformedMessage, "beacon node id length should be 1..64, got 0"),
        (_with(15, b"\x41"), MalformedMessage, "beacon node id length should be 1..64, got 65"),
        (
            _with(15, b"\x21"),
            MalformedMessage,
            "beacon with a 33-byte node id should be 49 bytes, got 50",
        ),
        (
            VECTOR + b"x",
            MalformedMessage,
            "beacon with a 34-byte node id should be 50 bytes, got 51",
        ),
        (
            _with(16, b"M"),
            MalformedMessage,
            r"beacon node id has byte 0x4d; expected a-z, 2-7 and '-': 4d 6d 67 34",
        ),
        (
            _with(20, b"\n"),
            MalformedMessage,
            r"beacon node id has byte 0x0a; expected a-z, 2-7 and '-': 6d 6d 67 34 0a",
        ),
    ],
)
def test_decode_beacon_rejects_bad_input(data: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        decode_beacon(data)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 7300, 1), r"beacon node id should be 1..64 characters of a-z, 2-7 and '-', got ''"),
        (("a" * 65, 7300, 1), "beacon node id should be 1..64 characters"),
        (("ABCD", 7300, 1), r"got 'ABCD'"),
        (("nœud", 7300, 1), r"got 'nœud'"),
        ((b"abcd", 7300, 1), r"got b'abcd'"),
        ((ID_A, 0, 1), "beacon listen port should be 1..65535, got 0"),
        ((ID_A, 65536, 1), "beacon listen port should be 1..65535, got 65536"),
        ((ID_A, True, 1), "beacon listen port should be 1..65535, got True"),
        ((ID_A, 7300, -1), r"beacon epoch should be 0..2\*\*64-1, got -1"),
        ((ID_A, 7300, 2**64), r"beacon epoch should be 0..2\*\*64-1, got 18446744073709551616"),
    ],
)
def test_encode_beacon_rejects_bad_arguments(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        encode_beacon(*args)


# -- the limiter -------------------------------------------------------------------------


def test_limiter_lets_each_source_through_once_per_gap() -> None:
    limiter = BeaconLimiter(min_gap_s=5.0, rate_per_s=100.0, burst=100)
    assert limiter.allow("127.0.0.2", 0.0)
    assert not limiter.allow("127.0.0.2", 4.9)
    assert limiter.allow("127.0.0.3", 4.9)
    assert limiter.allow("127.0.0.2", 5.0)
    assert not limiter.allow("127.0.0.2", 9.9)


def test_limiter_caps_all_sources_together() -> None:
    limiter = BeaconLimiter(min_gap_s=5.0, rate_per_s=2.0, burst=3)
    assert [limiter.allow(f"10.0.0.{i}", 0.0) for i in range(5)] == [True] * 3 + [False] * 2
    # Denied sources were not recorded: they pass once tokens come back.
    assert limiter.allow("10.0.0.3", 0.5)
    assert not limiter.allow("10.0.0.4", 0.5)
    assert limiter.allow("10.0.0.4", 1.0)
    # Tokens never exceed the burst, however long it was quiet.
    assert [limiter.allow(f"10.0.1.{i}", 100.0) for i in range(4)] == [True] * 3 + [False]


def test_limiter_remembers_at_most_max_sources() -> None:
    limiter = BeaconLimiter(min_gap_s=1.0, rate_per_s=1000.0, burst=1000, max_sources=2)
    assert limiter.allow("a", 0.0) and limiter.allow("b", 0.0)
    assert not limiter.allow("c", 0.5)  # table full of fresh sources
    assert not limiter.allow("c", 0.9)  # no second sweep within the gap
    assert limiter.allow("c", 1.5)  # a and b went quiet: swept
    assert limiter.allow("a", 1.5)
    assert not limiter.allow("b", 1.6)


def test_limiter_rejects_bad_settings() -> None:
    with pytest.raises(InvalidArgument, match="beacon limiter: expected min_gap_s >= 0"):
        BeaconLimiter(min_gap_s=1.0, rate_per_s=0.0, burst=1)


# -- Discovery on real loopback sockets ---------------------------------------------------


@pytest.fixture
def beacon_port() -> int:
    """A UDP port free on loopback's broadcast address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((BROADCAST, 0))
        return int(probe.getsockname()[1])


def loopback_discovery(
    node_id: str, source: str, port: int, *, listen_port: int = 7300, **kw: Any
) -> Discovery:
    settings: dict[str, Any] = dict(
        port=port,
        bind_host=BROADCAST,
        broadcast_host=BROADCAST,
        source_host=source,
        clock=itertools.count(step=100).__next__,  # never rate-limited
    )
    settings.update(kw)
    return Discovery(node_id, listen_port, 1, **settings)


Heard = Callable[[Beacon, str], Awaitable[None]]


def collector() -> tuple[Heard, Any]:
    send, recv = anyio.create_memory_object_stream[tuple[Beacon, str]](16)

    async def post(beacon: Beacon, ip: str) -> None:
        await send.send((beacon, ip))

    return post, recv


async def test_discovery_instances_hear_each_other_and_not_themselves(beacon_port: int) -> None:
    a = loopback_discovery(ID_A, "127.0.0.2", beacon_port, listen_port=7302)
    b = loopback_discovery(ID_B, "127.0.0.3", beacon_port, listen_port=7303)
    assert (a.port, b.port, a.source_host, b.source_host) == (
        beacon_port,
        beacon_port,
        "127.0.0.2",
        "127.0.0.3",
    )
    post_a, heard_a = collector()
    post_b, heard_b = collector()
    async with a, b, anyio.create_task_group() as tg:
        tg.start_soon(a.run_receiver, post_a)
        tg.start_soon(b.run_receiver, post_b)
        # Each receive socket queues datagrams in the order they were sent.
        assert a.send_beacon_nowait() and b.send_beacon_nowait() and a.send_beacon_nowait()
        with anyio.fail_after(5):
            assert await heard_a.receive() == (Beacon(ID_B, 7303, 1), "127.0.0.3")
            assert await heard_b.receive() == (Beacon(ID_A, 7302, 1), "127.0.0.2")
            assert await heard_b.receive() == (Beacon(ID_A, 7302, 1), "127.0.0.2")
        # a heard its first beacon before b's; b heard its own before a's second.
        assert a.own >= 1 and b.own == 1
        assert a.beacons_sent == 2 and b.beacons_sent == 1
        tg.cancel_scope.cancel()
    assert heard_a.statistics().current_buffer_used == 0
    assert (a.malformed, b.malformed, a.posted, b.posted) == (0, 0, 1, 2)


async def test_discovery_counts_and_ignores_bad_datagrams(beacon_port: int) -> None:
    a = loopback_discovery(ID_A, "127.0.0.2", beacon_port)
    b = loopback_discovery(ID_B, "127.0.0.3", beacon_port)
    post_b, heard_b = collector()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        raw.bind(("127.0.0.4", 0))
        async with a, b, anyio.create_task_group() as tg:
            tg.start_soon(b.run_receiver, post_b)
            for junk in (b"garbage", bytes(200), _with(4, b"\x02")):
                raw.sendto(junk, (BROADCAST, beacon_port))
            assert a.send_beacon_nowait()
            with anyio.fail_after(5):
                assert await heard_b.receive() == (Beacon(ID_A, 7300, 1), "127.0.0.2")
            assert b.stats() == {
                "beacons_sent": 0,
                "beacons_dropped": 0,
                "send_errors": 0,
                "datagrams": 4,
                "own": 0,
                "same_id": 0,
                "malformed": 2,
                "other_version": 1,
                "unauthorised": 0,
                "rate_limited": 0,
                "posted": 1,
            }
            tg.cancel_scope.cancel()


async def test_receiver_returns_when_closed(beacon_port: int) -> None:
    a = loopback_discovery(ID_A, "127.0.0.2", beacon_port)
    post, _ = collector()
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run_receiver, post)
        await anyio.wait_all_tasks_blocked()
        await a.aclose()
        await a.aclose()  # idempotent
    assert not a.send_beacon_nowait()


async def test_screen_drops_own_unauthorised_and_rate_limited(
    beacon_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    times = iter([0.0, 1.0, 6.0])
    a = loopback_discovery(
        ID_A,
        "127.0.0.2",
        beacon_port,
        interval_s=10.0,
        clock=times.__next__,
        is_authorised={ID_A, ID_B}.__contains__,
    )
    async with a:
        assert a.screen(encode_beacon(ID_A, 7300, 1), "127.0.0.2") is None
        assert a.own == 1 and a.same_id == 0
        # Our node ID from another run: our state directory copied to another board.
        assert a.screen(encode_beacon(ID_A, 7300, 2), "127.0.0.9") is None
        assert a.same_id == 1
        assert "127.0.0.9 announces our own node id" in caplog.text
        assert a.screen(encode_beacon("abcd", 7300, 1), "127.0.0.5") is None
        assert a.unauthorised == 1
        beacon = encode_beacon(ID_B, 7301, 5)
        assert a.screen(beacon, "127.0.0.3") == Beacon(ID_B, 7301, 5)  # t=0
        assert a.screen(beacon, "127.0.0.3") is None  # t=1: within half an interval
        assert a.screen(beacon, "127.0.0.3") == Beacon(ID_B, 7301, 5)  # t=6
        assert (a.rate_limited, a.posted, a.datagrams) == (1, 2, 6)


class _FailingSocket:
    def __init__(self, error: OSError) -> None:
        self.error = error

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        raise self.error


async def test_send_beacon_nowait_drops_and_counts_failures(
    beacon_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    a = loopback_discovery(ID_A, "127.0.0.2", beacon_port)
    async with a:
        real = a._send_sock
        try:
            a._send_sock = _FailingSocket(BlockingIOError())  # type: ignore[assignment]
            assert not a.send_beacon_nowait()
            a._send_sock = _FailingSocket(OSError(101, "Network is unreachable"))  # type: ignore[assignment]
            assert not a.send_beacon_nowait()
        finally:
            a._send_sock = real
        assert (a.beacons_dropped, a.send_errors, a.beacons_sent) == (1, 1, 0)
        expected = (
            f"cannot send discovery beacon to {BROADCAST}:{beacon_port}: network is unreachable"
        )
        assert expected in caplog.text


def test_next_delay_is_the_jittered_interval(beacon_port: int) -> None:
    draws = iter([0.0, 0.5, 0.999999, 0.5])
    a = loopback_discovery(ID_A, "127.0.0.2", beacon_port, interval_s=10.0, rand=draws.__next__)
    try:
        assert a.next_delay_s() == pytest.approx(8.0)
        assert a.next_delay_s() == pytest.approx(10.0)
        assert a.next_delay_s() == pytest.approx(12.0, abs=1e-4)
        assert a.first_delay_s() == pytest.approx(0.5)  # within 1 s of start
    finally:
        a._recv_sock.close()
        a._send_sock.close()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"bind_host": "localhost"}, "discovery bind address: expected an IPv4 address, got"),
        ({"broadcast_host": "::1"}, "discovery address: expected an IPv4 address, got '::1'"),
        ({"source_host": "127.0.0.300"}, "discovery source address: expected an IPv4 address"),
        ({"interval_s": 0}, "discovery interval: expected a value > 0, got 0"),
        ({"interval_s": "5"}, "discovery interval: expected a number, got '5'"),
        ({"port": 70000}, "discovery port: expected 0..65535, got 70000"),
    ],
)
def test_discovery_rejects_bad_settings(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings = dict(kw)
        loopback_discovery(ID_A, "127.0.0.2", settings.pop("port", 0), **settings)


def test_discovery_reports_an_address_it_cannot_bind() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface: bind fails, nothing is sent.
    with pytest.raises(
        ConfigError, match=r"discovery: cannot send beacons from 192.0.2.1:0: cannot assign"
    ):
        loopback_discovery(ID_A, "192.0.2.1", 0)


# -- the node: beacons lead to dials, through the dispatcher ------------------------------


@pytest.fixture
async def outsider(identities: Identities, beacon_port: int) -> AsyncIterator[Discovery]:
    """Beacons of a node nobody authorises, from 127.0.0.4."""
    async with loopback_discovery(identities["outsider"].node_id, "127.0.0.4", beacon_port) as d:
        yield d


async def test_nodes_find_each_other_by_beacon_and_refuse_outsiders(
    make_config: Callable[..., NodeConfig], beacon_port: int, outsider: Discovery
) -> None:
    # A long backoff: when b stops first, a must not redial b's closing
    # listener (asyncio's accept then trips on CPython issue #153761).
    slow_redial = dict(backoff_base_s=10.0, backoff_cap_s=10.0)
    beacons = dict(
        discovery=True,
        discovery_port=beacon_port,
        discovery_address=BROADCAST,
        discovery_bind_host=BROADCAST,
        discovery_interval_s=0.1,
    )
    a_config = make_config("a", "127.0.0.2", **slow_redial, **beacons)
    b_config = make_config("b", "127.0.0.3", **slow_redial, **beacons)
    assert not a_config.peers and not b_config.peers
    seen: dict[str, list[Any]] = {"a": [], "b": []}

    async def record(name: str, node: Node, up: anyio.Event) -> None:
        async for event in node.events():
            seen[name].append(event)
            if isinstance(event, PeerUp):
                up.set()

    async with Node(a_config) as a, Node(b_config) as b, anyio.create_task_group() as tg:
        a_up, b_up = anyio.Event(), anyio.Event()
        tg.start_soon(record, "a", a, a_up)
        tg.start_soon(record, "b", b, b_up)
        assert outsider.send_beacon_nowait()
        with anyio.fail_after(5):
            await a_up.wait()
            await b_up.wait()
        for node, other in ((a, b), (b, a)):
            entry = node.registry.get(other.config.listen_host)
            assert entry is not None and entry.node_id == other.node_id
            assert (entry.state, entry.listen_port) == (UP, other.listen_port)
            assert len(node.registry.up()) == 1
        # The outsider's beacon reached both nodes and was dropped unseen.
        assert a.discovery is not None and b.discovery is not None
        a_seen, b_seen = a.discovery.discovery, b.discovery.discovery
        await wait_until(lambda: a_seen.unauthorised >= 1 and b_seen.unauthorised >= 1)
        assert "127.0.0.4" not in a.registry and "127.0.0.4" not in b.registry
        await wait_until(lambda: a_seen.beacons_sent >= 1 and b_seen.beacons_sent >= 1)
        tg.cancel_scope.cancel()
    # No dial to the outsider, no connection from it: no event names it.
    assert [e for e in seen["a"] + seen["b"] if e.peer == "127.0.0.4"] == []
    assert [e.peer for e in seen["a"] if isinstance(e, PeerUp)] == ["127.0.0.3"]
    assert [e.peer for e in seen["b"] if isinstance(e, PeerUp)] == ["127.0.0.2"]


async def test_dispatcher_learns_only_new_authorised_peers(
    make_config: Callable[..., NodeConfig], identities: Identities, beacon_port: int
) -> None:
    node = Node(make_config("a", "127.0.0.2"))
    b_id, outsider_id = identities["b"].node_id, identities["outsider"].node_id
    closing = False
    async with loopback_discovery(node.node_id, "127.0.0.2", beacon_port) as discovery:
        wiring = wire_discovery(node.inbox.post, node.learning, lambda: closing, discovery)

        def hear(node_id: str, ip: str, port: int = 7300) -> None:
            wiring.on_beacon(BeaconHeard(Beacon(node_id, port, 1), ip), 100.0)

        hear(node.node_id, "127.0.0.9")
        hear(outsider_id, "127.0.0.4")
        assert len(node.registry) == 0 and wiring.ignored == 2
        hear(b_id, "127.0.0.3", 7303)
        entry = node.registry.get("127.0.0.3")
        assert entry is not None
        assert (entry.node_id, entry.listen_port, entry.state) == (b_id, 7303, DOWN)
        assert node.keepalive.pending_dial("127.0.0.3") == 100.0
        assert wiring.discovered == 1
        # Known addresses are left to keepalive and backoff.
        hear(b_id, "127.0.0.3", 9999)
        assert node.registry.get("127.0.0.3").listen_port == 7303  # type: ignore[union-attr]
        # While b is connected at .3, a beacon claiming b from elsewhere is ignored.
        node.registry.admit(object(), "127.0.0.3", b_id, 1, OUTBOUND, 7303, 100.0)
        hear(b_id, "127.0.0.8")
        assert "127.0.0.8" not in node.registry
        assert (wiring.discovered, wiring.ignored) == (1, 3)
        assert wiring.stats()["discovered"] == 1 and wiring.stats()["ignored"] == 3
        # The beacon timer: one beacon now, the next within the jittered interval.
        due = wiring.on_timer(100.0)
        assert due is not None and 108.0 <= due <= 112.0 and discovery.beacons_sent == 1
        closing = True  # a closing node stops announcing itself
        assert wiring.on_timer(200.0) is None and discovery.beacons_sent == 1


async def test_beacon_pulls_in_the_dial_of_a_configured_peer_never_reached(
    make_config: Callable[..., NodeConfig], identities: Identities, beacon_port: int
) -> None:
    # A configured peer has no node ID until it first connects, and its
    # beacon was ignored: a board that booted minutes after us waited up to
    # a backoff cap for our dial (issue 15, item 3).
    node = Node(make_config("a", "127.0.0.2", backoff_cap_s=30.0))
    b_id = identities["b"].node_id
    async with loopback_discovery(node.node_id, "127.0.0.2", beacon_port) as discovery:
        wiring = wire_discovery(node.inbox.post, node.learning, lambda: False, discovery)
        entry = node.registry.add_configured("127.0.0.3", 7303, 0.0)
        assert entry.node_id is None
        # Away for five minutes: the next dial is a cap away (edgenode.redial, rule 3).
        node.keepalive.dial_failed("127.0.0.3", 0.0, reached=False)
        node.keepalive.dial_failed("127.0.0.3", 300.0, reached=False)
        pending = node.keepalive.pending_dial("127.0.0.3")
        assert pending is not None and pending >= 315.0
        wiring.on_beacon(BeaconHeard(Beacon(b_id, 7303, 1), "127.0.0.3"), 301.0)
        pending = node.keepalive.pending_dial("127.0.0.3")
        assert pending is not None and pending <= 301.0 + node.config.backoff_base_s
        # Known, not discovered: the entry stays the configured one.
        assert (wiring.discovered, wiring.ignored) == (0, 0)
        assert (entry.listen_port, entry.node_id) == (7303, None)
