"""What a fault-injecting proxy carries: routes, each with two lanes, and links.

A :class:`Route` listens on one address and forwards to one target. Its
bytes flow in two lanes (:class:`Lane`), ``up`` (from the dialler to the
target) and ``down`` (back), each with its own faults and counters. A
:class:`ProxyLink` is the two routes that carry the link between two nodes
both ways. :class:`~edgenode.testing.proxy.TcpProxy` makes them and changes
their faults; :mod:`edgenode.testing.proxy_conn` carries a connection's bytes
through them.
"""

from __future__ import annotations

import asyncio
import random

import anyio

UP = "up"
DOWN = "down"
BOTH = "both"


class Lane:
    """One direction of a route, with its faults and counters.

    ``sender`` is the address the receiving end sees these bytes come from
    (None when the route keeps the dialler's own address). Read the
    counters from any thread; change faults through the proxy's methods.
    """

    def __init__(self, name: str, direction: str, sender: str | None, rng: random.Random) -> None:
        self.name = name
        self.direction = direction
        self.sender = sender
        self.delay_s = 0.0
        self.jitter_s = 0.0
        self.dropping = False
        self.paused = False
        #: Bytes written on to the receiving end.
        self.bytes_forwarded = 0
        #: Bytes read and thrown away (black hole, cut or half-open).
        self.bytes_dropped = 0
        #: Closes (FIN or reset) thrown away by a black hole.
        self.closes_dropped = 0
        self._rng = rng
        self._resumed = anyio.Event()
        self._resumed.set()

    def __repr__(self) -> str:
        faults = []
        if self.delay_s or self.jitter_s:
            faults.append(f"delay {self.delay_s}+{self.jitter_s} s")
        if self.dropping:
            faults.append("dropping")
        if self.paused:
            faults.append("paused")
        return f"<Lane {self.name} {', '.join(faults) or 'clear'}>"

    def hold_s(self) -> float:
        """How long to hold the next chunk: the delay plus its jitter (in the proxy's loop)."""
        if not self.jitter_s:
            return self.delay_s
        return self.delay_s + self._rng.uniform(0.0, self.jitter_s)

    def pause(self) -> None:
        """Stop reading (in the proxy's loop: use :meth:`TcpProxy.pause`)."""
        if not self.paused:
            self.paused = True
            self._resumed = anyio.Event()

    def resume(self) -> None:
        """Read again (in the proxy's loop: use :meth:`TcpProxy.resume`)."""
        self.paused = False
        self._resumed.set()

    async def wait_resumed(self) -> None:
        """Wait until the lane is no longer paused (in the proxy's loop)."""
        await self._resumed.wait()


class Route:
    """One listening address forwarding to one target, with an ``up`` and a ``down`` lane."""

    def __init__(
        self,
        index: int,
        listen: tuple[str, int],
        target: tuple[str, int],
        source_host: str | None,
        seed: int,
    ) -> None:
        self.listen_host, self.port = listen
        self.target = target
        self.source_host = source_host
        name = f"{self.listen_host}:{{port}} -> {target[0]}:{target[1]}"
        self._name = name
        self.up = Lane(f"route {index} up", UP, source_host, random.Random(f"{seed}:{index}:up"))
        self.down = Lane(
            f"route {index} down", DOWN, self.listen_host, random.Random(f"{seed}:{index}:down")
        )
        #: Connections accepted on this route.
        self.accepted = 0
        #: The listening server, once the proxy listens (closed by the proxy).
        self.server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where to connect: (listen host, bound port)."""
        return self.listen_host, self.port

    def __repr__(self) -> str:
        return f"<Route {self._name.format(port=self.port)}>"


class ProxyLink:
    """The link between two nodes, a and b, carried both ways by one proxy.

    Each node sees the other only at its alias, on its real port: a dials
    ``to_b`` and b dials ``to_a``, and each is a route of the proxy.
    """

    def __init__(self, to_a: Route, to_b: Route) -> None:
        self.to_a = to_a
        self.to_b = to_b

    @property
    def a_alias(self) -> str:
        """Node a's address as b sees it."""
        return self.to_a.listen_host

    @property
    def b_alias(self) -> str:
        """Node b's address as a sees it."""
        return self.to_b.listen_host

    @property
    def a_dials(self) -> tuple[str, int]:
        """Where node a reaches b: (b's alias, b's port). Give it to a as its peer."""
        return self.to_b.address

    @property
    def b_dials(self) -> tuple[str, int]:
        """Where node b reaches a: (a's alias, a's port)."""
        return self.to_a.address

    def __repr__(self) -> str:
        return f"<ProxyLink {self.to_b!r} / {self.to_a!r}>"
