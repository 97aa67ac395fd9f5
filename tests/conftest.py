"""Shared fixtures: identities made once per session, nodes on loopback IPs."""

from __future__ import annotations

import inspect
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from edgenode.config import NodeConfig
from edgenode.identity import Identity, create_identity


def pytest_configure(config: pytest.Config) -> None:
    """Give Ctrl-C back its default when this run was started with it ignored.

    A shell without job control (a script) starts a background command,
    such as ``.ci/run &``, with SIGINT ignored, and every process it starts
    inherits that: the tests that press Ctrl-C on ``edgenode watch`` would
    then wait for an exit that never comes. With Python's own handler here,
    the processes the tests start get the default.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Identities:
    """Lazily created node identities, shared by the whole session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, Identity] = {}

    def __getitem__(self, name: str) -> Identity:
        if name not in self._made:
            self._made[name] = create_identity(self.root / name)
        return self._made[name]

    def ids(self, *names: str) -> frozenset[str]:
        return frozenset(self[n].node_id for n in names)


@pytest.fixture(scope="session")
def identities(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    return Identities(tmp_path_factory.mktemp("identities"))


#: Names of the trusted test nodes; "outsider" is never authorised.
TRUSTED = ("a", "b", "c", "d", "raw", "raw2")


@pytest.fixture
def make_config(identities: Identities) -> Callable[..., NodeConfig]:
    """``make_config(name, ip, peers=[...], **overrides)`` -> a fast-timing config."""

    def make(
        name: str, ip: str, peers: list[tuple[str, int]] | None = None, **overrides: Any
    ) -> NodeConfig:
        settings: dict[str, Any] = dict(
            state_dir=identities[name].state_dir,
            listen_host=ip,
            listen_port=0,
            peers=list(peers or []),
            authorised=identities.ids(*TRUSTED),
            keepalive_interval_s=0.5,
            keepalive_timeout_s=2.0,
            backoff_base_s=0.05,
            backoff_cap_s=0.5,
            handshake_timeout_s=2.0,
            shutdown_grace_s=1.0,
            # Identities (and so state dirs) are shared across tests: only a
            # test with its own state dir should remember peers.
            remember_peers=False,
        )
        settings.update(overrides)
        return NodeConfig(**settings)

    return make


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short, owner-only directory for control sockets (their paths are limited to
    107 bytes, which pytest's tmp_path can pass)."""
    path = Path(tempfile.mkdtemp(prefix="en-ctl-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


#: How long the helpers below wait by default: a hang guard that holds on a
#: board (or emulated ARM in CI, docs/arm.md) ten times slower than CI's
#: x86-64 and busy. Natively the events arrive within milliseconds.
WAIT_BOUND_S = 30.0


async def wait_event(
    stream: Any, predicate: Callable[[Any], bool], timeout: float = WAIT_BOUND_S, what: str = ""
) -> Any:
    """Wait for the first event on ``stream`` that satisfies ``predicate``.

    On timeout, the TimeoutError says what was awaited (``what``, or the
    predicate as written) and shows the last events that did not match.
    """
    others: deque[Any] = deque(maxlen=10)
    try:
        with anyio.fail_after(timeout):
            while True:
                event = await stream.receive()
                if predicate(event):
                    return event
                others.append(event)
    except TimeoutError:
        raise TimeoutError(
            f"no event within {timeout} s for: {what or described(predicate)}; "
            f"the last that came instead: {list(others)!r:.2000}"
        ) from None


def pending(stream: Any) -> list[Any]:
    """Everything already waiting on ``stream``, without waiting for more.

    For checks that nothing happened: the list shows what did.
    """
    items = []
    while True:
        try:
            items.append(stream.receive_nowait())
        except anyio.WouldBlock:
            return items


async def wait_until(
    condition: Callable[[], bool], timeout: float = WAIT_BOUND_S, what: str = ""
) -> None:
    """Wait until ``condition()`` holds, checking after each loop turn.

    For state the node exposes no event for (e.g. pong counters). On
    timeout, the TimeoutError says what was awaited (``what``, or the
    condition as written).
    """
    try:
        with anyio.fail_after(timeout):
            while not condition():
                await anyio.sleep(0.01)
    except TimeoutError:
        awaited = what or described(condition)
        raise TimeoutError(f"not true within {timeout} s: {awaited}") from None


def described(function: Callable[..., Any]) -> str:
    """A condition as its test wrote it (a lambda's source line), for a timeout's message."""
    name = getattr(function, "__name__", "")
    if name and name != "<lambda>":
        return name
    try:
        return " ".join(inspect.getsource(function).split())[:200]
    except (OSError, TypeError):
        return repr(function)


def free_port(ip: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((ip, 0))
        return int(probe.getsockname()[1])


class RawPeer:
    """A hand-driven peer: real preamble and TLS, then whatever bytes a test sends.

    It speaks the protocol only as far as a test asks, so tests can send
    bad input at any point of a connection.
    """

    def __init__(self, link: Any) -> None:
        self.link = link
        self.stream = link.stream
        self.proto: Any = None

    @classmethod
    async def connect(
        cls, identity: Identity, ip: str, port: int, *, local_ip: str = "127.0.0.9"
    ) -> RawPeer:
        from edgenode.tls import client_context
        from edgenode.transports.tcp import dial_link

        link = await dial_link(
            ip,
            port,
            context=client_context(identity),
            cert_der=identity.cert_der,
            local_host=local_ip,
            is_authorised=lambda _node_id: True,
        )
        return cls(link)

    async def hello(
        self, identity: Identity, *, epoch: int = 1, listen_port: int = 0, ready: bool = True
    ) -> Any:
        """Send our hello (and, with ``ready``, our ready) and read theirs; return
        their hello. The node announces the peer once both have said ready."""
        from edgenode.proto.connection import PeerProtocol
        from edgenode.proto.messages import Hello, Ready

        self.proto = PeerProtocol(name="raw")
        opening = PeerProtocol.send(Hello(identity.node_id, listen_port, epoch))
        if ready:
            opening += PeerProtocol.send(Ready())
        await self.send(opening)
        while self.proto.their_hello is None:
            self.proto.receive_data(await self.stream.receive())
        return self.proto.their_hello

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def messages(self) -> list[Any]:
        """Read until at least one message arrives; raises EndOfStream at the end."""
        while True:
            got = self.proto.receive_data(await self.stream.receive())
            if got:
                return got

    async def next_of(self, kind: type) -> Any:
        """Read until a message of type ``kind`` arrives (skipping the node's
        ready, pings and peer lists); raises EndOfStream at the end."""
        while True:
            for msg in await self.messages():
                if type(msg) is kind:
                    return msg

    async def aclose(self) -> None:
        await anyio.aclose_forcefully(self.stream)


async def echo(request: Any) -> bytes:
    """A request handler that answers with the request's payload."""
    return bytes(request.payload)


class Pair:
    """Two connected nodes, A on 127.0.0.2 and B on 127.0.0.3, answering "echo"."""

    def __init__(self, a: Any, b: Any, events: Any) -> None:
        self.a, self.b, self.events = a, b, events

    async def still_working(self) -> None:
        """The bad input cost nothing: A and B still talk both ways, B is up at A."""
        assert await self.b.request("127.0.0.2", "echo", b"b->a", timeout=5) == b"b->a"
        assert await self.a.request("127.0.0.3", "echo", b"a->b", timeout=5) == b"a->b"
        assert [p.state for p in self.a.peers() if p.ip == "127.0.0.3"] == ["up"]


@pytest.fixture
async def pair(make_config: Callable[..., NodeConfig]) -> AsyncIterator[Pair]:
    from edgenode.node import Node, PeerUp

    async with Node(make_config("a", "127.0.0.2")) as a:
        events = a.events()
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            a.handle("echo", echo)
            b.handle("echo", echo)
            b_events = b.events()
            await wait_event(events, lambda e: isinstance(e, PeerUp))
            await wait_event(b_events, lambda e: isinstance(e, PeerUp))
            yield Pair(a, b, events)
