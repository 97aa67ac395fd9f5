"""Redials on real nodes: a peer back after its backoff grew (issue 15, item 3).

tests/test_redial.py checks the rules (edgenode/redial.py) in simulated
time; these check the node's wiring of them end to end, with real TLS on
loopback. Node A (127.0.0.2) has B (127.0.0.3) configured. B first
*flaps*: a hand-driven peer with B's identity dials A from B's address,
comes up and drops at once, ``FLAPS`` times, while nothing listens on B's
port. Each drop is a flap, so A's next dial of B moves out exponentially
(the protection against flapping), to minutes. Then B comes back, and
each sign of life the node wires must bring it up long before that dial:

- B dials A: its connection is admitted whatever A's backoff says;
- a connection from B's address fails its handshake (edgenode/dials.py):
  A's pending dial is pulled in; so does one A refuses at a limit, even
  when the refusal log has no line left to give it (edgenode/handshake.py);
- B's discovery beacon is heard (edgenode/learning.py): the same.

Which side dialled tells the paths apart (A's dial is ``outbound`` at A),
and B never dials A in the last two. The bounds come from the config's
timings (a hint delays a dial by at most ``backoff_base_s``, a handshake
takes at most ``handshake_timeout_s``, a first beacon goes out within its
interval), ten times over for a slow board; each test first checks that
A's own pending dial lies beyond its bound, so only a sign of life can
meet it. How fast a peer is back in fact is a benchmark's figure
(docs/reliability.md), not a test's.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from edgenode.config import NodeConfig
from edgenode.control import serve_control
from edgenode.control_client import control_request
from edgenode.node import Node, PeerDown, PeerUp
from edgenode.registry import INBOUND, OUTBOUND

from .conftest import Identities, RawPeer, free_port, wait_event, wait_until

pytestmark = pytest.mark.anyio

A_IP, B_IP = "127.0.0.2", "127.0.0.3"
BROADCAST = "127.255.255.255"
#: Links that die at once: A's redial of B after the last is 2**(FLAPS - 1)
#: times the base (jittered down to half that): 102-205 s at these timings.
FLAPS = 13
#: Above every delay the flaps lead to, so that the backoff is not capped.
CAP_S = 300.0
#: A board ten times slower than this machine (docs/arm.md).
SLOW = 10
#: B's beacon interval; its first beacon goes out within it.
BEACON_INTERVAL_S = 0.2


def up(peer: str) -> Callable[[Any], bool]:
    return lambda e: isinstance(e, PeerUp) and e.peer == peer


def down(peer: str) -> Callable[[Any], bool]:
    return lambda e: isinstance(e, PeerDown) and e.peer == peer


def back_within(config: NodeConfig, *, first_beacon_s: float = 0.0) -> float:
    """How soon a sign of life must bring the peer up at a node with ``config``.

    The hint's delay (at most the backoff base), a beacon's first delay if
    the sign is a beacon, and a handshake (at most the handshake timeout),
    ten times over: it holds on a board ten times slower. Not a target.
    """
    return SLOW * (config.backoff_base_s + first_beacon_s + config.handshake_timeout_s)


def redial_in(node: Node, ip: str) -> float | None:
    [row] = [p for p in node.peers() if p.ip == ip]
    return row.redial_in_s


class Away:
    """Node A with B configured, after B flapped ``FLAPS`` times and went away."""

    def __init__(self, a: Node, events: Any, b_port: int, redial_in_s: float) -> None:
        self.a, self.events, self.b_port = a, events, b_port
        #: A's next dial of B, in seconds, just after the last flap.
        self.redial_in_s = redial_in_s


async def flap(a: Node, events: Any, identities: Identities, b_port: int) -> None:
    """A link from B's address that comes up and drops at once; nothing listens on B's port."""
    raw = await RawPeer.connect(identities["b"], A_IP, a.listen_port, local_ip=B_IP)
    try:
        await raw.hello(identities["b"], listen_port=b_port)
        await wait_event(events, up(B_IP))
    finally:
        await raw.aclose()
    await wait_event(events, down(B_IP))


def beacon_port() -> int:
    """A UDP port free on loopback's broadcast address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((BROADCAST, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def away(
    make_config: Callable[..., NodeConfig], identities: Identities
) -> AsyncIterator[Away]:
    """A (discovery heard on loopback's broadcast address) with B in deep backoff."""
    async with gone_away(make_config, identities) as it:
        yield it


@asynccontextmanager
async def gone_away(
    make_config: Callable[..., NodeConfig], identities: Identities, **settings: Any
) -> AsyncIterator[Away]:
    """The ``away`` fixture, with A's ``settings`` besides."""
    b_port = free_port(B_IP)
    config = make_config(
        "a",
        A_IP,
        [(B_IP, b_port)],
        backoff_cap_s=CAP_S,
        # The flaps come faster than the default rate from one address: a
        # refused one would be a sign of life and spend the hint allowance.
        max_handshake_rate_per_ip=1000.0,
        discovery=True,
        discovery_port=beacon_port(),
        discovery_address=BROADCAST,
        discovery_bind_host=BROADCAST,
        **settings,
    )
    async with Node(config) as a:
        events = a.events()
        for _ in range(FLAPS):
            await flap(a, events, identities, b_port)
        pending = redial_in(a, B_IP)
        assert pending is not None
        assert a.refusals.total == 0, a.refusals.counters(0.0)
        yield Away(a, events, b_port, pending)


async def wait_up(away: Away, bound: float) -> PeerUp:
    """Wait for B's PeerUp at A, within ``bound``, which A's own redial is beyond."""
    pending = redial_in(away.a, B_IP)
    assert pending is not None and pending > bound, (pending, bound)
    event: PeerUp = await wait_event(away.events, up(B_IP), bound)
    return event


# -- signs of life ---------------------------------------------------------------------------


async def test_a_peer_in_backoff_that_dials_us_is_up_at_once(
    away: Away, make_config: Callable[..., NodeConfig]
) -> None:
    a = away.a
    b_config = make_config("b", B_IP, [(A_IP, a.listen_port)], listen_port=away.b_port)
    async with Node(b_config):
        event = await wait_up(away, back_within(a.config))
        assert event.direction == INBOUND
        # Up: A's pending dial is gone, and status says no redial.
        assert redial_in(a, B_IP) is None
        assert await a.request(B_IP, "edgenode/peers", b"", timeout=5)


async def test_a_failed_connection_from_a_peer_in_backoff_pulls_our_redial_in(
    away: Away, make_config: Callable[..., NodeConfig]
) -> None:
    a = away.a
    # B is back and listens, but does not dial A (no peers, no discovery).
    async with Node(make_config("b", B_IP, listen_port=away.b_port)):
        failed = a.refusals.total
        # A connection from B's address that ends before the handshake: B's
        # own dial to A, lost on the way (edgenode/dials.py, Dials.on_failed).
        stream = await anyio.connect_tcp(A_IP, a.listen_port, local_host=B_IP)
        await stream.aclose()
        event = await wait_up(away, back_within(a.config))
        assert event.direction == OUTBOUND  # A dialled B
        assert a.refusals.total == failed + 1  # the failed handshake, counted


async def test_a_peer_in_backoff_refused_at_a_limit_pulls_our_redial_in_even_unlogged(
    make_config: Callable[..., NodeConfig], identities: Identities
) -> None:
    """Under a flood the refusal log soon has no line left to give. A
    refused connection was a sign of life only when it got a line, so a peer
    in backoff that reached us then waited out its backoff."""
    # Two handshakes that never go on fill A's cap while the rest happens
    # (they end at the handshake timeout: ten times what it takes here).
    limits = {"max_handshakes": 2, "handshake_timeout_s": 5.0}
    async with gone_away(make_config, identities, **limits) as away:
        a = away.a
        log = a.refusals
        async with Node(make_config("b", B_IP, listen_port=away.b_port)):
            held = [
                await anyio.connect_tcp(A_IP, a.listen_port, local_host=ip)
                for ip in ("127.0.0.9", "127.0.0.10")
            ]
            try:
                # Refused at the cap (accepted in order, after the two), until
                # the log has no line left.
                while True:
                    total, lines = log.total, log.lines
                    knock = await anyio.connect_tcp(A_IP, a.listen_port, local_host="127.0.0.11")
                    await knock.aclose()
                    await wait_until(lambda: log.total == total + 1)  # noqa: B023
                    if log.lines == lines:
                        break
                assert log.lines >= log.burst
                bound = back_within(a.config)
                pending = redial_in(a, B_IP)
                assert pending is not None and pending > bound, (pending, bound)
                # B's address, refused at the cap too, with no line.
                knock = await anyio.connect_tcp(A_IP, a.listen_port, local_host=B_IP)
                await knock.aclose()
                event: PeerUp = await wait_event(away.events, up(B_IP), bound)
                assert event.direction == OUTBOUND  # A dialled B
                assert log.lines == lines, "B's refusal had a line: this tests nothing"
            finally:
                for stream in held:
                    await stream.aclose()


async def test_a_beacon_from_a_peer_in_backoff_pulls_our_redial_in(
    away: Away, make_config: Callable[..., NodeConfig]
) -> None:
    a = away.a
    b_config = make_config(
        "b",
        B_IP,
        listen_port=away.b_port,
        discovery=True,
        discovery_port=a.config.discovery_port,
        discovery_address=BROADCAST,
        # B hears only beacons sent to its own address: not A's, so B never dials A.
        discovery_bind_host=B_IP,
        discovery_interval_s=BEACON_INTERVAL_S,
    )
    async with Node(b_config) as b:
        bound = back_within(a.config, first_beacon_s=BEACON_INTERVAL_S)
        event = await wait_up(away, bound)
        assert event.direction == OUTBOUND  # A dialled B
        assert b.discovery is not None and b.discovery.discovery.beacons_sent >= 1
        assert a.discovery is not None and a.discovery.discovered == 0  # known, not new


# -- status while the peer is away -------------------------------------------------------------


async def test_a_flapping_peer_is_redialled_ever_more_slowly_and_status_says_when(
    away: Away, sock_dir: Path, tmp_path: Path
) -> None:
    # Flapping protection, on the node: each flap moved A's redial of B out
    # by a step (a whole step allowed for what the short links paid back),
    # where a redial at the base would have dialled a flapping peer in a
    # tight loop.
    base_s = away.a.config.backoff_base_s
    assert away.redial_in_s >= 0.5 * base_s * 2 ** (FLAPS - 2), away.redial_in_s
    path = sock_dir / "control.sock"
    async with anyio.create_task_group() as tg:
        assert await tg.start(serve_control, away.a, path) == path
        status = await anyio.to_thread.run_sync(control_request, path, {"op": "status"})
        env = dict(os.environ, EDGENODE_STATE_DIR=str(tmp_path / "default-state"))
        env.pop("XDG_STATE_HOME", None)
        with anyio.fail_after(30):
            text = await anyio.run_process(
                [sys.executable, "-m", "edgenode", "status", "--socket", str(path)], env=env
            )
        tg.cancel_scope.cancel()
    [row] = [p for p in status["peers"] if p["ip"] == B_IP]
    assert row["state"] == "down"
    assert 0 < row["redial_in_s"] <= away.redial_in_s <= CAP_S
    lines = text.stdout.decode().splitlines()
    [note] = [line for line in lines if line.startswith(f"{B_IP}: ")]
    match = re.search(r"; redial in (\d+\.\d) s$", note)
    assert match is not None, note
    assert 0 < float(match.group(1)) <= CAP_S
