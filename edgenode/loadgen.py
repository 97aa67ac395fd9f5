"""A load generator: many authorised peers connected to one node, from one process.

Used to measure a node under load on its own (``tests/test_memory_budget.py``,
``docs/memory.md``). Each simulated peer is a real connection, as a node's
would be: TCP from its own loopback source address (``127.0.1.1``,
``127.0.1.2``, ...), the preamble, mutual TLS 1.3 with its own Ed25519
identity, and the hello exchange. After that a peer only answers pings with
pongs, which is all a node needs to keep it up (any frame proves liveness,
and a node pings a peer it has sent nothing to for an interval).
:meth:`LoadGen.ping_every` makes the peers ping the node too, every
interval less a random jitter, as real nodes do (both ends ping; a pong
does not postpone a node's own ping), for figures that should count the
node's work of answering them (``edgenode bench``).

Each peer has an identity of its own, not one shared by all. The registry
would accept one node ID on many IPs, but a listener keeps one pinned TLS
context per distinct dialler certificate (``tls.PinnedContexts``): a
shared identity would hide that per-peer cost and measure a node no real
fleet runs. Identities are made once with ``cryptography`` and cached in a
directory (about 2 ms each), so only the caller's process ever loads it.

Everything is bounded: the number of peers (the source addresses run out
after 127.0.254.254), the handshakes in flight at once, each handshake's
time, and the whole connect phase.

From the command line, for a node already running::

    python -m edgenode.loadgen --node 127.0.0.2:7400 --peers 64 \\
        --identities /tmp/loadgen-ids --hold 60

prints the node IDs to authorise with ``--print-ids`` first.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

from .errors import EdgeNodeError, HandshakeError
from .identity import Identity, create_identity, load_identity
from .proto.connection import PeerProtocol
from .proto.messages import BYE, PING, PONG, Hello, Ping, Pong, Ready
from .tls import client_context
from .transports.tcp import dial_link

#: Most simulated peers one generator holds: 127.0.1.1 .. 127.0.254.254.
MAX_PEERS = 254 * 254
_READ_BYTES = 65536


class LoadGenError(EdgeNodeError):
    """The load generator could not connect the peers it was asked for."""


def source_ip(index: int) -> str:
    """The loopback source address of peer ``index`` (0 -> ``127.0.1.1``).

    Skips .0 and .255 in the last octet. Raises :class:`ValueError` past
    :data:`MAX_PEERS`.
    """
    if not 0 <= index < MAX_PEERS:
        raise ValueError(f"peer index {index} outside 0..{MAX_PEERS - 1}")
    return f"127.0.{1 + index // 254}.{1 + index % 254}"


def load_identities(root: str | os.PathLike[str], count: int) -> list[Identity]:
    """Return ``count`` peer identities kept under ``root`` (``peer-0000``, ...).

    Loads the ones already there and creates the rest (this imports
    ``cryptography``). Raises :class:`IdentityError` if one cannot be
    read or written.
    """
    base = Path(root)
    found = []
    for index in range(count):
        state = base / f"peer-{index:05d}"
        if (state / "node.crt").exists():
            found.append(load_identity(state))
        else:
            found.append(create_identity(state, overwrite=True))
    return found


def write_authorised(path: str | os.PathLike[str], identities: Sequence[Identity]) -> None:
    """Write an authorised-nodes file listing every identity in ``identities``."""
    text = "".join(f"{identity.node_id}\n" for identity in identities)
    Path(path).write_text("# load generator peers\n" + text)


class LoadPeer:
    """One simulated peer: its connection and what it has seen."""

    __slots__ = (
        "early",
        "error",
        "identity",
        "index",
        "local_ip",
        "pinging",
        "pings",
        "pings_sent",
        "pongs",
        "proto",
        "send_lock",
        "stream",
        "up",
    )

    def __init__(self, index: int, identity: Identity) -> None:
        self.index = index
        self.identity = identity
        self.local_ip = source_ip(index)
        self.stream: Any = None
        self.proto: PeerProtocol | None = None
        self.early: list[Any] = []
        self.up = False
        self.pings = 0
        self.pinging = False
        self.pings_sent = 0
        self.pongs = 0
        self.send_lock = anyio.Lock()  # pongs and our own pings share the stream
        self.error: str | None = None


class LoadGen:
    """Hold many authorised peers connected to one node.

    ``async with LoadGen(identities, "127.0.0.2", port) as gen:`` then
    ``await gen.connect(64)``; leaving the block closes every connection.
    """

    def __init__(
        self,
        identities: Sequence[Identity],
        host: str,
        port: int,
        *,
        node_id: str | None = None,
        concurrency: int = 32,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency: expected >= 1, got {concurrency}")
        self.identities = list(identities)
        self.host = host
        self.port = port
        self.node_id = node_id
        self.concurrency = concurrency
        self.handshake_timeout_s = handshake_timeout_s
        self.peers: list[LoadPeer] = []
        self._tg: Any = None
        self._epoch = random.getrandbits(62)

    @property
    def up(self) -> int:
        """How many peers have completed the hello exchange and are still open."""
        return sum(1 for p in self.peers if p.up)

    @property
    def errors(self) -> list[str]:
        """The first failure of each peer that failed."""
        return [f"{p.local_ip}: {p.error}" for p in self.peers if p.error]

    async def __aenter__(self) -> LoadGen:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(*exc_info)

    async def connect(self, count: int, *, timeout_s: float = 120.0) -> int:
        """Connect ``count`` more peers, at most ``concurrency`` handshakes at once.

        Returns once each has finished its hello exchange or failed, and
        returns how many are up. Raises :class:`LoadGenError` when there
        are not enough identities or the whole phase takes over
        ``timeout_s``.
        """
        first = len(self.peers)
        if first + count > len(self.identities):
            raise LoadGenError(
                f"{first + count} peers asked for, only {len(self.identities)} identities"
            )
        limiter = anyio.CapacityLimiter(self.concurrency)
        new = [LoadPeer(i, self.identities[i]) for i in range(first, first + count)]
        self.peers.extend(new)
        try:
            with anyio.fail_after(timeout_s):
                async with anyio.create_task_group() as handshakes:
                    for peer in new:
                        handshakes.start_soon(self._start_peer, peer, limiter)
        except TimeoutError:
            raise LoadGenError(
                f"connecting {count} peers took over {timeout_s} s ({self.up} up)"
            ) from None
        return self.up

    async def _start_peer(self, peer: LoadPeer, limiter: anyio.CapacityLimiter) -> None:
        async with limiter:
            try:
                with anyio.fail_after(self.handshake_timeout_s):
                    await self._handshake(peer)
            except TimeoutError:
                peer.error = f"handshake not finished within {self.handshake_timeout_s} s"
            except EdgeNodeError as exc:
                peer.error = str(exc)
            except (OSError, BrokenResourceError, EndOfStream) as exc:
                peer.error = f"connection failed during handshake: {type(exc).__name__}"
        if peer.up:
            self._tg.start_soon(self._answer_pings, peer)
        elif peer.stream is not None:
            await anyio.aclose_forcefully(peer.stream)

    def ping_every(self, interval_s: float, *, jitter: float = 0.1) -> int:
        """Make each peer that is up ping the node every ``interval_s``, as a node does.

        Each wait is shortened by a random fraction of up to ``jitter``
        (the node's own rule). Returns how many peers now ping. A peer that
        already pings is left as it is.
        """
        if not (interval_s > 0 and 0 <= jitter < 1):
            raise ValueError(f"ping_every: interval {interval_s!r} s, jitter {jitter!r}")
        started = 0
        for peer in self.peers:
            if peer.up and not peer.pinging:
                peer.pinging = True
                self._tg.start_soon(self._ping, peer, interval_s, jitter)
                started += 1
        return started

    async def _ping(self, peer: LoadPeer, interval_s: float, jitter: float) -> None:
        nonce = 0
        try:
            while peer.up:
                await anyio.sleep(interval_s * (1.0 - jitter * random.random()))
                if not peer.up:
                    break
                nonce = (nonce + 1) & 0xFFFFFFFF
                async with peer.send_lock:
                    await peer.stream.send(PeerProtocol.send(Ping(nonce)))
                peer.pings_sent += 1
        except (BrokenResourceError, ClosedResourceError, OSError):
            pass  # the answering task sees the connection end and records why

    async def _handshake(self, peer: LoadPeer) -> None:
        expected = self.node_id
        link = await dial_link(
            self.host,
            self.port,
            context=client_context(peer.identity),
            cert_der=peer.identity.cert_der,
            local_host=peer.local_ip,
            is_authorised=lambda node_id: expected is None or node_id == expected,
        )
        peer.stream = link.stream
        proto = PeerProtocol(name=peer.local_ip)
        # Hello, then ready at once: a load peer keeps whatever it is given.
        hello = Hello(peer.identity.node_id, 0, self._epoch)
        await link.stream.send(PeerProtocol.send(hello) + PeerProtocol.send(Ready()))
        early: list[Any] = []
        while proto.their_hello is None:
            early = proto.receive_data(await link.stream.receive(_READ_BYTES))
        peer.proto, peer.early, peer.up = proto, early[1:], True

    async def _answer_pings(self, peer: LoadPeer) -> None:
        proto, stream = peer.proto, peer.stream
        assert proto is not None
        messages, peer.early = peer.early, []
        try:
            while True:
                for msg in messages:
                    if msg.code == PING:
                        peer.pings += 1
                        async with peer.send_lock:
                            await stream.send(PeerProtocol.send(Pong(msg.nonce)))
                    elif msg.code == PONG:
                        peer.pongs += 1
                    elif msg.code == BYE:
                        raise HandshakeError(f"node said bye: {msg.reason}")
                messages = proto.receive_data(await stream.receive(_READ_BYTES))
        except EndOfStream:
            peer.error = "connection closed by node"
        except (EdgeNodeError, BrokenResourceError, ClosedResourceError, OSError) as exc:
            peer.error = str(exc) or type(exc).__name__
        finally:
            peer.up = False
            await anyio.aclose_forcefully(stream)


# -- command line ----------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _hold(args: argparse.Namespace, identities: list[Identity]) -> int:
    host, port = args.node
    async with LoadGen(identities, host, port, concurrency=args.concurrency) as gen:
        up = await gen.connect(args.peers, timeout_s=args.timeout)
        print(f"{up}/{args.peers} peers up", flush=True)
        for line in gen.errors[:10]:
            print(f"  {line}", file=sys.stderr)
        await anyio.sleep(args.hold)
        print(f"{gen.up}/{args.peers} peers still up after {args.hold:g} s", flush=True)
    return 0 if up == args.peers else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgenode.loadgen``: hold peers connected to a running node."""
    parser = argparse.ArgumentParser(prog="python -m edgenode.loadgen", description=__doc__)
    parser.add_argument("--node", type=_address, metavar="HOST:PORT", help="the node to load")
    parser.add_argument("--peers", type=int, default=32, help="peers to connect (default 32)")
    parser.add_argument("--identities", type=Path, required=True, help="identity cache dir")
    parser.add_argument("--concurrency", type=int, default=32, help="handshakes at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="connect phase limit, s")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds to hold them up")
    parser.add_argument("--print-ids", action="store_true", help="print the node IDs and exit")
    args = parser.parse_args(argv)
    if not 1 <= args.peers <= MAX_PEERS:
        parser.error(f"--peers: expected 1..{MAX_PEERS}")
    if not 0 < args.hold <= 24 * 3600:
        parser.error("--hold: expected 0 < S <= 86400")
    identities = load_identities(args.identities, args.peers)
    if args.print_ids:
        print("\n".join(i.node_id for i in identities))
        return 0
    if args.node is None:
        parser.error("--node is required unless --print-ids")
    return anyio.run(_hold, args, identities)


if __name__ == "__main__":
    sys.exit(main())
