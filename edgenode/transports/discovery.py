"""LAN discovery over UDP broadcast: the thin I/O layer under the node.

The beacon format and the rate limits live in ``edgenode.proto.beacon``;
this module only moves datagrams, with two sockets:

- the *receive* socket is bound to ``bind_host:port`` (the wildcard
  address on a LAN; the broadcast address itself when only broadcasts
  should reach it, e.g. ``127.255.255.255`` in tests) with SO_REUSEADDR
  and SO_REUSEPORT, so every node on one machine hears every beacon;
- the *send* socket is bound to ``source_host`` (the node's listen address,
  or the wildcard) with SO_BROADCAST and sends to ``broadcast_host:port``.
  Its address is the beacon's source address, which peers dial.

Linux delivers a broadcast only to sockets bound to the wildcard or to the
broadcast address, never to one bound to a unicast address: that is why
the two sockets are separate.

:class:`Discovery` is driven by the node: :meth:`Discovery.run_receiver` is
a source task that posts each beacon worth a look;
:meth:`Discovery.send_beacon_nowait` is called from the dispatcher's timer
heap (timers are not tasks) and never waits. :func:`wire_discovery`
connects both to a :class:`~edgenode.node.Node` (see ``docs/discovery.md``).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
from anyio import ClosedResourceError

from ..errors import ConfigError, NodeClosed, ProtocolError, VersionMismatch
from ..proto.beacon import MAX_BEACON_BYTES, Beacon, BeaconLimiter, decode_beacon, encode_beacon

log = logging.getLogger("edgenode.discovery")

DEFAULT_DISCOVERY_PORT = 7301
DEFAULT_BROADCAST_HOST = "255.255.255.255"
DEFAULT_INTERVAL_S = 10.0
#: Each interval is drawn from interval * [1 - JITTER, 1 + JITTER].
JITTER = 0.2
#: The first beacon goes out within this long of start (or one interval, if shorter).
FIRST_BEACON_MAX_S = 1.0
#: All sources together: beacons per second looked at, and the burst allowed.
MAX_BEACONS_PER_S = 50.0
BEACON_BURST = 100
#: Datagrams read per wake-up before the receiver yields to the loop.
_BATCH = 64

PostBeacon = Callable[[Beacon, str], Awaitable[None]]


def _ipv4(host: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        raise ConfigError(f"{what}: expected an IPv4 address, got {host!r:.60}") from None


def _os_detail(exc: OSError) -> str:
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


class Discovery:
    """Beacons out and in on one UDP port: what a node needs to be found.

    ``node_id``, ``listen_port`` and ``epoch`` are what our beacon says.
    ``rand()`` returns a float in [0, 1) for the jitter; ``clock()`` is a
    monotonic clock for the rate limits; ``is_authorised(node_id)``, if
    given, lets the receiver drop beacons of unauthorised nodes before they
    reach the node's inbox (the node checks again anyway).

    Binds both sockets at once; raises :class:`ConfigError` if an address
    is not IPv4 or a socket cannot be bound, and
    :class:`~edgenode.errors.InvalidArgument` if our beacon cannot be
    encoded. Close with :meth:`aclose` once :meth:`run_receiver` has ended.
    """

    def __init__(
        self,
        node_id: str,
        listen_port: int,
        epoch: int,
        *,
        port: int = DEFAULT_DISCOVERY_PORT,
        bind_host: str = "0.0.0.0",
        broadcast_host: str = DEFAULT_BROADCAST_HOST,
        source_host: str = "0.0.0.0",
        interval_s: float = DEFAULT_INTERVAL_S,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        is_authorised: Callable[[str], bool] | None = None,
    ) -> None:
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)):
            raise ConfigError(f"discovery interval: expected a number, got {interval_s!r}")
        if not interval_s > 0:
            raise ConfigError(f"discovery interval: expected a value > 0, got {interval_s!r}")
        if type(port) is not int or not 0 <= port <= 0xFFFF:
            raise ConfigError(f"discovery port: expected 0..65535, got {port!r}")
        self.node_id = node_id
        self.epoch = epoch
        self.interval_s = float(interval_s)
        self._beacon = encode_beacon(node_id, listen_port, epoch)
        bind_host = _ipv4(bind_host, "discovery bind address")
        self.broadcast_host = _ipv4(broadcast_host, "discovery address")
        source_host = _ipv4(source_host, "discovery source address")
        self._rand = rand
        self._clock = clock
        self._is_authorised = is_authorised
        self.limiter = BeaconLimiter(self.interval_s / 2, MAX_BEACONS_PER_S, BEACON_BURST)
        self._closed = False
        self._recv_sock = self._open(bind_host, port, receive=True)
        try:
            self.port: int = self._recv_sock.getsockname()[1]
            self._send_sock = self._open(source_host, 0, receive=False)
        except BaseException:
            self._recv_sock.close()
            raise
        self.source_host: str = self._send_sock.getsockname()[0]
        # Counters, for stats and tests.
        self.beacons_sent = 0
        self.beacons_dropped = 0  # the send buffer was full
        self.send_errors = 0  # no route, interface down, ...
        self.datagrams = 0
        self.own = 0
        self.same_id = 0  # our node ID with another epoch: a clone of our state
        self.malformed = 0
        self.other_version = 0
        self.unauthorised = 0
        self.rate_limited = 0
        self.posted = 0

    @staticmethod
    def _open(host: str, port: int, *, receive: bool) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if receive:
                # Every node on this machine binds the same port and, for
                # broadcasts, each gets its own copy.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if hasattr(socket, "SO_REUSEPORT"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setblocking(False)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            what = "receive beacons on" if receive else "send beacons from"
            raise ConfigError(
                f"discovery: cannot {what} {host}:{port}: {_os_detail(exc)}"
            ) from None
        return sock

    # -- sending: called by the dispatcher, never waits ------------------------------

    def send_beacon_nowait(self) -> bool:
        """Broadcast one beacon without waiting; return whether the kernel took it.

        Never raises: a full send buffer drops the beacon (``beacons_dropped``)
        and any other socket error (no route to the broadcast address, an
        interface down) is counted in ``send_errors`` and logged; the next
        beacon tries again.
        """
        if self._closed:
            return False
        try:
            self._send_sock.sendto(self._beacon, (self.broadcast_host, self.port))
        except (BlockingIOError, InterruptedError):
            self.beacons_dropped += 1
            return False
        except OSError as exc:
            self.send_errors += 1
            if self.send_errors == 1 or self.send_errors % 100 == 0:
                log.warning(
                    "cannot send discovery beacon to %s:%d: %s (%d failures)",
                    self.broadcast_host,
                    self.port,
                    _os_detail(exc),
                    self.send_errors,
                )
            return False
        self.beacons_sent += 1
        return True

    def next_delay_s(self) -> float:
        """Return the delay until the next beacon: the interval, jittered."""
        return self.interval_s * (1.0 - JITTER + 2.0 * JITTER * self._rand())

    def first_delay_s(self) -> float:
        """Return the delay until our first beacon: soon, but not all nodes at once."""
        return min(FIRST_BEACON_MAX_S, self.interval_s) * self._rand()

    # -- receiving: a source task ---------------------------------------------------

    async def run_receiver(self, post: PostBeacon) -> None:
        """Receive beacons until cancelled; ``await post(beacon, source_ip)`` for each.

        Posts only beacons worth a look (see :meth:`screen`); everything
        else is counted and dropped. Returns when the socket is closed.
        """
        sock = self._recv_sock
        while True:
            try:
                await anyio.wait_readable(sock)
            except ClosedResourceError:
                return
            for _ in range(_BATCH):
                try:
                    data, source = sock.recvfrom(MAX_BEACON_BYTES + 1)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if self._closed:
                        return
                    log.debug("discovery receive failed: %s", _os_detail(exc))
                    break
                ip = source[0]
                beacon = self.screen(data, ip)
                if beacon is not None:
                    await post(beacon, ip)

    def screen(self, data: bytes, source_ip: str) -> Beacon | None:
        """Return the beacon in ``data`` if the node should look at it, else None.

        Drops, and counts: datagrams that are not a valid beacon
        (``malformed``, ``other_version``), our own beacons (``own``),
        beacons of unauthorised nodes (``unauthorised``) and beacons over
        the rate limits (``rate_limited``).
        """
        self.datagrams += 1
        try:
            beacon = decode_beacon(data)
        except VersionMismatch as exc:
            self.other_version += 1
            self._log_bad(self.other_version, source_ip, exc)
            return None
        except ProtocolError as exc:
            self.malformed += 1
            self._log_bad(self.malformed, source_ip, exc)
            return None
        if beacon.node_id == self.node_id:
            if beacon.epoch == self.epoch:
                self.own += 1
            else:
                self.same_id += 1
                if self.same_id == 1 or self.same_id % 100 == 0:
                    log.warning(
                        "%s announces our own node id %s: is this node's state directory "
                        "copied to another board? (%d beacons)",
                        source_ip,
                        self.node_id,
                        self.same_id,
                    )
            return None
        if self._is_authorised is not None and not self._is_authorised(beacon.node_id):
            self.unauthorised += 1
            return None
        if not self.limiter.allow(source_ip, self._clock()):
            self.rate_limited += 1
            return None
        self.posted += 1
        return beacon

    @staticmethod
    def _log_bad(count: int, source_ip: str, exc: ProtocolError) -> None:
        if count == 1 or count % 100 == 0:
            log.info("ignored datagram from %s on the discovery port: %s", source_ip, exc)

    def stats(self) -> dict[str, int]:
        """Counters of beacons sent and datagrams received, by outcome."""
        return {
            "beacons_sent": self.beacons_sent,
            "beacons_dropped": self.beacons_dropped,
            "send_errors": self.send_errors,
            "datagrams": self.datagrams,
            "own": self.own,
            "same_id": self.same_id,
            "malformed": self.malformed,
            "other_version": self.other_version,
            "unauthorised": self.unauthorised,
            "rate_limited": self.rate_limited,
            "posted": self.posted,
        }

    async def aclose(self) -> None:
        """Close both sockets; idempotent. A running receiver returns."""
        if self._closed:
            return
        self._closed = True
        for sock in (self._recv_sock, self._send_sock):
            anyio.notify_closing(sock)
            sock.close()

    async def __aenter__(self) -> Discovery:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# -- wiring into the node ----------------------------------------------------------


class BeaconHeard:
    """Inbox event: a beacon worth a look arrived from ``ip``."""

    __slots__ = ("beacon", "ip", "t")

    def __init__(self, beacon: Beacon, ip: str) -> None:
        self.beacon, self.ip, self.t = beacon, ip, time.monotonic()


class BeaconLearner(Protocol):
    """What discovery needs from the node: someone to learn peers from beacons."""

    discovered: int
    ignored_beacons: int

    def from_beacon(self, source_ip: str, listen_port: int, node_id: str, now: float) -> None:
        """Dial ``node_id`` at ``source_ip:listen_port`` if it is new and authorised."""


class DiscoveryWiring:
    """What the node calls: a source task, a dispatcher handler and a timer.

    ``run`` is the receiver task, posting :class:`BeaconHeard` events with
    ``post``; ``on_beacon`` is the dispatcher's handler for them (the node
    registers it for ``event_type``); ``on_timer`` sends a beacon from the
    dispatcher's timer heap and returns when the next one is due.
    """

    __slots__ = ("_is_closing", "discovery", "learner", "post")

    event_type = BeaconHeard

    def __init__(
        self,
        post: Callable[[BeaconHeard], Awaitable[None]],
        learner: BeaconLearner,
        is_closing: Callable[[], bool],
        discovery: Discovery,
    ) -> None:
        self.post = post
        self.learner = learner
        self._is_closing = is_closing
        self.discovery = discovery

    async def run(self) -> None:
        """Feed heard beacons to the node's inbox until cancelled or closed."""
        try:
            await self.discovery.run_receiver(self._post)
        except NodeClosed:
            pass

    async def _post(self, beacon: Beacon, ip: str) -> None:
        await self.post(BeaconHeard(beacon, ip))

    def first_due(self, now: float) -> float:
        """When the first beacon is due."""
        return now + self.discovery.first_delay_s()

    def start_beacons(self, schedule: Callable[[float, Callable[[float], None]], None]) -> None:
        """Send beacons from ``schedule`` (the dispatcher's timers) until closing."""

        def beacon(now: float) -> None:
            due = self.on_timer(now)
            if due is not None:
                schedule(due, beacon)

        schedule(self.first_due(time.monotonic()), beacon)

    def on_timer(self, now: float) -> float | None:
        """Send a beacon without waiting; return when the next one is due.

        Returns None, and sends nothing, once the node is closing: peers
        should not dial a node on its way out.
        """
        if self._is_closing():
            return None
        self.discovery.send_beacon_nowait()
        return now + self.discovery.next_delay_s()

    @property
    def discovered(self) -> int:
        """Peers found by a beacon."""
        return self.learner.discovered

    @property
    def ignored(self) -> int:
        """Beacons ignored (ours, unauthorised, forged, or with no room for them)."""
        return self.learner.ignored_beacons

    def stats(self) -> dict[str, int]:
        """The discovery counters, and the peers discovered and beacons ignored."""
        return {**self.discovery.stats(), "discovered": self.discovered, "ignored": self.ignored}

    async def aclose(self) -> None:
        """Close the discovery sockets; idempotent. Call after ``run`` has ended."""
        await self.discovery.aclose()

    def on_beacon(self, ev: BeaconHeard, now: float) -> None:
        """Dispatcher handler: learn the beacon's node, unless the node is closing."""
        if self._is_closing():
            self.learner.ignored_beacons += 1
            return
        beacon = ev.beacon
        self.learner.from_beacon(ev.ip, beacon.listen_port, beacon.node_id, now)


def wire_discovery(
    post: Callable[[BeaconHeard], Awaitable[None]],
    learner: BeaconLearner,
    is_closing: Callable[[], bool],
    discovery: Discovery,
) -> DiscoveryWiring:
    """Connect ``discovery`` to a node; see :class:`DiscoveryWiring` for the three hooks."""
    return DiscoveryWiring(post, learner, is_closing, discovery)


def discovery_for(
    config: Any,
    node_id: str,
    listen_port: int,
    epoch: int,
    *,
    wildcard: bool,
    is_authorised: Callable[[str], bool],
    post: Callable[[BeaconHeard], Awaitable[None]],
    learner: BeaconLearner,
    is_closing: Callable[[], bool],
) -> DiscoveryWiring:
    """Discovery as a node's config asks for it, wired to the node.

    Raises :class:`ConfigError` if an address is not IPv4 or a socket
    cannot be bound.
    """
    discovery = Discovery(
        node_id,
        listen_port,
        epoch,
        port=config.discovery_port,
        bind_host=config.discovery_bind_host,
        broadcast_host=config.discovery_address,
        source_host="0.0.0.0" if wildcard else config.listen_host,
        interval_s=config.discovery_interval_s,
        is_authorised=is_authorised,
    )
    return wire_discovery(post, learner, is_closing, discovery)
