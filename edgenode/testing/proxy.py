"""A TCP proxy that injects network faults: delay, black hole, cut, half-open, pause.

The proxy runs an event loop of its own in a background thread, so one object
serves both kinds of test: async tests that run nodes in-process and plain
tests that run node processes. Every method is a plain call, safe from any
thread; it returns once the change is in force.

Routes
------

A route listens on a loopback address and forwards each connection to its
target. Bytes flow in two *lanes*: ``up`` (from the dialler to the target)
and ``down`` (back). Each lane has its own faults, changed at run time:

* ``delay(s, jitter_s)``: hold each chunk for ``s`` plus a uniform
  ``0..jitter_s`` seconds. Order is kept: a chunk never overtakes the one
  before it, so a TLS stream survives any jitter.
* ``drop()``: a black hole. Bytes are read and discarded, the connection
  stays open, and a close from one side is not passed on either: each end
  must notice the silence by itself, as after a dead router.
* ``pause()`` / ``resume()``: stop reading. Bytes wait in the kernel's
  buffers, the sender's writes fill them and then block; nothing is lost.

and the proxy acts on the connections open now:

* ``cut(how=RST)``: close both sides at once, with a reset (``SO_LINGER``
  0) or a FIN. Both ends notice promptly.
* ``half_open(close=TARGET)``: close one side (which notices at once) and
  keep the other open and silent (it must notice by keepalive).

``refuse_new()`` resets new connections as soon as they arrive (a peer
whose service is down); ``heal()`` clears every fault.

Keeping the true peer address
-----------------------------

An edgenode registry is keyed by the peer's IP address, and peers redial the
address they saw at the port the other announced: a proxy in the middle must
neither change the one nor be bypassed by the other. On loopback every
127.x.y.z address is ours, so a route can connect out *bound to* an address
(``source_host``): the target sees that address, not the proxy's.
:meth:`TcpProxy.add_link` gives each of two nodes an alias, listens on each
alias at its node's real port and connects out from the dialler's alias, so
each node sees the other only at its alias and every dial and redial, in
either direction, goes through the proxy. See docs/testing.md.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import socket
import struct
from collections.abc import Iterable
from typing import Any

import anyio
from anyio.from_thread import start_blocking_portal

from edgenode.errors import EdgeNodeError, InvalidArgument
from edgenode.ips import ip_sort_key, normalise_ip

UP = "up"
DOWN = "down"
BOTH = "both"
RST = "rst"
FIN = "fin"
CLIENT = "client"
TARGET = "target"

_READ_BYTES = 65536
# Chunks a lane may hold in its delay line before its reader waits.
_DELAY_LINE_CHUNKS = 4096
_CONNECT_TIMEOUT_S = 10.0
# Markers in a delay line, after the data: the sender closed (FIN) or reset.
_EOF = b""
_RESET = None


class ProxyError(EdgeNodeError):
    """The fault-injection proxy could not listen, or was used after it closed."""


class _Side:
    """One socket of a proxied connection (asyncio streams: the proxy's loop is asyncio)."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes | None:
        """The next chunk; b"" at the end of the stream; None if it was reset."""
        try:
            return await self.reader.read(_READ_BYTES)
        except OSError:
            return _RESET

    async def write(self, data: bytes) -> bool:
        """Write ``data`` and wait for room; False if the socket is gone."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (OSError, RuntimeError):  # RuntimeError: the transport is closing
            return False
        return True

    def send_eof(self) -> None:
        """Send a FIN (half-close); we may still read."""
        transport = self.writer.transport
        if not transport.is_closing():
            try:
                self.writer.write_eof()
            except OSError:
                pass

    def reset(self) -> None:
        """Close at once with a reset (RST): SO_LINGER 0, then abort."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # already closed
        self.writer.transport.abort()

    def close(self, how: str | None = None) -> None:
        """Close: RST, FIN, or (None) as the kernel sees fit."""
        if how == RST:
            self.reset()
        elif not self.writer.transport.is_closing():
            if how == FIN:
                self.send_eof()
            self.writer.transport.close()


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

    def _hold_s(self) -> float:
        if not self.jitter_s:
            return self.delay_s
        return self.delay_s + self._rng.uniform(0.0, self.jitter_s)

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self._resumed = anyio.Event()

    def _resume(self) -> None:
        self.paused = False
        self._resumed.set()


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
        self._server: asyncio.AbstractServer | None = None

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


class _Conn:
    __slots__ = ("client", "forwarding", "route", "target")

    def __init__(self, route: Route, client: _Side, target: _Side) -> None:
        self.route = route
        self.client = client
        self.target = target
        # False once cut or half-opened: nothing is passed on any more.
        self.forwarding = True


class TcpProxy:
    """A fault-injecting TCP proxy on loopback, running in a thread of its own.

    Use as a context manager (or call :meth:`start` and :meth:`close`).
    ``seed`` makes jitter reproducible. Counters: ``accepted`` connections,
    ``open_connections``, ``cuts``, ``half_opens``, ``refused`` and
    ``connect_failures`` (the target did not answer), plus each lane's.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed
        self.routes: list[Route] = []
        self.accepted = 0
        self.cuts = 0
        self.half_opens = 0
        self.refused = 0
        self.connect_failures = 0
        self._refusing: str | None = None
        self._conns: set[_Conn] = set()
        self._open = 0
        self._handlers: set[asyncio.Task[Any]] = set()
        self._portal_cm: Any = None
        self._portal: Any = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Start the proxy's thread and event loop; return self."""
        if self._portal is None:
            self._portal_cm = start_blocking_portal("asyncio")
            self._portal = self._portal_cm.__enter__()
        return self

    def close(self) -> None:
        """Reset every connection, stop listening and end the thread. Idempotent."""
        if self._portal is None:
            return
        try:
            self._portal.call(self._close_all)
        finally:
            cm, self._portal, self._portal_cm = self._portal_cm, None, None
            cm.__exit__(None, None, None)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, func: Any, *args: Any) -> Any:
        if self._portal is None:
            raise ProxyError("the proxy is not running (start it, or use it in a with block)")
        return self._portal.call(func, *args)

    # -- routes ------------------------------------------------------------------

    def add_route(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        *,
        source_host: str | None = None,
    ) -> Route:
        """Listen on ``listen`` (port 0: any free port) and forward to ``target``.

        With ``source_host``, connections to the target are made from that
        address, so the target sees it as the peer's. Returns the
        :class:`Route`; its ``port`` is the bound port. Raises
        :class:`ProxyError` when the address cannot be bound.
        """
        host, port = listen
        index = len(self.routes)
        route = self._call(self._make_route, index, (host, port), target, source_host)
        try:
            bound = self._call(self._listen, route)
        except OSError as exc:
            detail = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ProxyError(f"cannot listen on {host}:{port}: {detail}") from None
        route.port = bound
        self.routes.append(route)
        return route

    def _make_route(
        self,
        index: int,
        listen: tuple[str, int],
        target: tuple[str, int],
        source_host: str | None,
    ) -> Route:
        return Route(index, listen, target, source_host, self.seed)

    def add_link(
        self,
        a: tuple[str, int],
        b: tuple[str, int],
        *,
        a_alias: str,
        b_alias: str,
    ) -> ProxyLink:
        """Carry the whole link between nodes a and b, both ways, through this proxy.

        ``a`` and ``b`` are where the nodes listen (IP, port). Each node
        then sees the other only at an alias (another loopback address) on
        the other's real port: a reaches b at ``(b_alias, b's port)``
        (``link.a_dials``) and b reaches a at ``(a_alias, a's port)``
        (``link.b_dials``). The proxy listens on both and connects out bound
        to the dialler's alias. A node redials its peer at the address it
        saw and the port its peer announced, so every redial, whoever makes
        it, goes through the proxy too.

        The nodes must agree which is the higher address (their rule for a
        simultaneous open): a compares its IP with ``b_alias``, b compares
        its IP with ``a_alias``. Raises :class:`InvalidArgument` when they
        would disagree or addresses repeat, and :class:`ProxyError` when an
        alias cannot be bound on that port.
        """
        (a_ip, a_port), (b_ip, b_port) = a, b
        a_ip, b_ip = normalise_ip(a_ip), normalise_ip(b_ip)
        a_alias, b_alias = normalise_ip(a_alias), normalise_ip(b_alias)
        for name, port in (("a", a_port), ("b", b_port)):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
                raise InvalidArgument(f"{name}'s port: expected 1..65535, got {port!r}")
        if len({a_ip, b_ip, a_alias, b_alias}) < 4:
            raise InvalidArgument(
                f"expected four different addresses, got a {a_ip}, b {b_ip}, "
                f"a_alias {a_alias}, b_alias {b_alias}"
            )
        a_is_higher = ip_sort_key(a_ip) > ip_sort_key(b_alias)
        if a_is_higher != (ip_sort_key(a_alias) > ip_sort_key(b_ip)):
            raise InvalidArgument(
                f"a at {a_ip} and b at {b_ip} would disagree which is the higher address "
                f"(a sees b at {b_alias}, b sees a at {a_alias}): put both of one node's "
                "addresses above both of the other's"
            )
        to_b = self.add_route((b_alias, b_port), (b_ip, b_port), source_host=a_alias)
        to_a = self.add_route((a_alias, a_port), (a_ip, a_port), source_host=b_alias)
        return ProxyLink(to_a, to_b)

    # -- faults: lanes -------------------------------------------------------------

    def lanes(self, direction: str = BOTH, *, sender: str | None = None) -> list[Lane]:
        """The lanes a fault applies to: ``direction`` UP, DOWN or BOTH, on every
        route; with ``sender``, only lanes whose bytes come from that address."""
        if direction not in (UP, DOWN, BOTH):
            raise InvalidArgument(
                f"direction: expected {UP!r}, {DOWN!r} or {BOTH!r}, got {direction!r}"
            )
        if sender is not None:
            sender = normalise_ip(sender)
        chosen = []
        for route in self.routes:
            for lane in (route.up, route.down):
                if direction != BOTH and lane.direction != direction:
                    continue
                if sender is not None and lane.sender != sender:
                    continue
                chosen.append(lane)
        if sender is not None and not chosen:
            raise InvalidArgument(f"sender: no lane carries bytes from {sender}")
        return chosen

    def delay(
        self,
        delay_s: float,
        jitter_s: float = 0.0,
        *,
        direction: str = BOTH,
        sender: str | None = None,
    ) -> None:
        """Hold every chunk for ``delay_s`` plus up to ``jitter_s`` seconds, in order."""
        for name, value in (("delay_s", delay_s), ("jitter_s", jitter_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgument(f"{name}: expected a number, got {value!r}")
            if not (value >= 0 and math.isfinite(value)):
                raise InvalidArgument(f"{name}: expected a finite number >= 0, got {value!r}")
        lanes = self.lanes(direction, sender=sender)

        def apply() -> None:
            for lane in lanes:
                lane.delay_s, lane.jitter_s = float(delay_s), float(jitter_s)

        self._call(apply)

    def drop(self, *, direction: str = BOTH, sender: str | None = None) -> None:
        """Black-hole the lanes: read and discard, connections stay open."""
        lanes = self.lanes(direction, sender=sender)
        self._call(self._set_dropping, lanes, True)

    def undrop(self, *, direction: str = BOTH, sender: str | None = None) -> None:
        """Stop black-holing the lanes (bytes dropped so far stay lost)."""
        lanes = self.lanes(direction, sender=sender)
        self._call(self._set_dropping, lanes, False)

    @staticmethod
    def _set_dropping(lanes: Iterable[Lane], dropping: bool) -> None:
        for lane in lanes:
            lane.dropping = dropping

    def pause(self, *, direction: str = BOTH, sender: str | None = None) -> None:
        """Stop reading on the lanes; bytes wait (and back up) until :meth:`resume`."""
        lanes = self.lanes(direction, sender=sender)

        def apply() -> None:
            for lane in lanes:
                lane._pause()

        self._call(apply)

    def resume(self, *, direction: str = BOTH, sender: str | None = None) -> None:
        """Read on the lanes again, after :meth:`pause`."""
        lanes = self.lanes(direction, sender=sender)

        def apply() -> None:
            for lane in lanes:
                lane._resume()

        self._call(apply)

    def refuse_new(self, how: str | None = RST) -> None:
        """Close new connections as they arrive (``how``: RST or FIN); None accepts again."""
        if how not in (RST, FIN, None):
            raise InvalidArgument(f"how: expected {RST!r}, {FIN!r} or None, got {how!r}")
        self._call(setattr, self, "_refusing", how)

    def heal(self) -> None:
        """Clear every fault: no delay, no black hole, nothing paused, accept again."""

        def apply() -> None:
            self._refusing = None
            for lane in self.lanes():
                lane.delay_s = lane.jitter_s = 0.0
                lane.dropping = False
                lane._resume()

        self._call(apply)

    # -- faults: connections ---------------------------------------------------------

    def cut(self, how: str = RST) -> int:
        """Close both sides of every open connection; return how many.

        ``how``: RST (reset) or FIN (an orderly close).
        """
        if how not in (RST, FIN):
            raise InvalidArgument(f"how: expected {RST!r} or {FIN!r}, got {how!r}")
        return int(self._call(self._cut, how))

    def _cut(self, how: str) -> int:
        conns = [c for c in self._conns if c.forwarding]
        for conn in conns:
            conn.forwarding = False
            if how == RST:
                conn.client.reset()
                conn.target.reset()
            else:
                conn.client.send_eof()
                conn.target.send_eof()
        self.cuts += len(conns)
        return len(conns)

    def half_open(self, close: str = TARGET, how: str = RST) -> int:
        """Close one side of every open connection, keep the other open and silent.

        ``close``: TARGET or CLIENT, the side to close (with RST or FIN).
        The kept side's bytes are read and discarded and nothing is sent to
        it, until it closes by itself. Returns how many connections.
        """
        if close not in (TARGET, CLIENT):
            raise InvalidArgument(f"close: expected {TARGET!r} or {CLIENT!r}, got {close!r}")
        if how not in (RST, FIN):
            raise InvalidArgument(f"how: expected {RST!r} or {FIN!r}, got {how!r}")
        return int(self._call(self._half_open, close, how))

    def _half_open(self, close: str, how: str) -> int:
        conns = [c for c in self._conns if c.forwarding]
        for conn in conns:
            conn.forwarding = False
            closing = conn.target if close == TARGET else conn.client
            if how == RST:
                closing.reset()
            else:
                closing.send_eof()
        self.half_opens += len(conns)
        return len(conns)

    # -- counters -------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet ended (either side still open)."""
        return self._open

    def stats(self) -> dict[str, Any]:
        """Every counter, and each lane's, as one dict."""
        return {
            "accepted": self.accepted,
            "open_connections": self.open_connections,
            "cuts": self.cuts,
            "half_opens": self.half_opens,
            "refused": self.refused,
            "connect_failures": self.connect_failures,
            "lanes": {
                lane.name: {
                    "bytes_forwarded": lane.bytes_forwarded,
                    "bytes_dropped": lane.bytes_dropped,
                    "closes_dropped": lane.closes_dropped,
                }
                for lane in self.lanes()
            },
        }

    def __repr__(self) -> str:
        state = "running" if self._portal is not None else "closed"
        return f"<TcpProxy {state}, {len(self.routes)} routes, {self.open_connections} open>"

    # -- inside the proxy's loop -------------------------------------------------------

    async def _listen(self, route: Route) -> int:
        server = await asyncio.start_server(
            lambda reader, writer: self._handle(route, _Side(reader, writer)),
            host=route.listen_host,
            port=route.port,
        )
        route._server = server
        return int(server.sockets[0].getsockname()[1])

    async def _handle(self, route: Route, client: _Side) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._open += 1
        try:
            await self._proxy(route, client)
        finally:
            self._open -= 1
            self._handlers.discard(task)

    async def _proxy(self, route: Route, client: _Side) -> None:
        self.accepted += 1
        route.accepted += 1
        if self._refusing is not None:
            self.refused += 1
            client.close(self._refusing)
            return
        target: _Side | None = None
        try:
            with anyio.move_on_after(_CONNECT_TIMEOUT_S):
                local = None if route.source_host is None else (route.source_host, 0)
                target = _Side(
                    *await asyncio.open_connection(
                        route.target[0], route.target[1], local_addr=local
                    )
                )
        except OSError:
            pass
        if target is None:
            self.connect_failures += 1
            client.reset()
            return
        conn = _Conn(route, client, target)
        self._conns.add(conn)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pipe, conn, client, target, route.up)
                tg.start_soon(self._pipe, conn, target, client, route.down)
        finally:
            self._conns.discard(conn)
            client.close()
            target.close()

    async def _pipe(self, conn: _Conn, src: _Side, dst: _Side, lane: Lane) -> None:
        """Carry one direction of ``conn``: a reader feeding a delay line, and a writer."""
        line_send, line_recv = anyio.create_memory_object_stream(_DELAY_LINE_CHUNKS)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._write, conn, dst, line_recv, lane)
            async with line_send:
                last_due = 0.0
                while True:
                    while lane.paused:
                        await lane._resumed.wait()
                    item = await src.read()
                    # A read already waiting when the pause began holds its chunk.
                    while lane.paused:
                        await lane._resumed.wait()
                    due = anyio.current_time() + lane._hold_s()
                    last_due = due = max(due, last_due)
                    if not conn.forwarding:
                        if item:
                            lane.bytes_dropped += len(item)
                            continue
                        return
                    await line_send.send((due, item))
                    if not item:
                        return

    async def _write(self, conn: _Conn, dst: _Side, line: Any, lane: Lane) -> None:
        broken = False
        async with line:
            async for due, item in line:
                wait_s = due - anyio.current_time()
                if wait_s > 0:
                    await anyio.sleep(wait_s)
                if broken or lane.dropping or not conn.forwarding:
                    # A close is black-holed too: the far end is left to notice.
                    if item:
                        lane.bytes_dropped += len(item)
                    else:
                        lane.closes_dropped += 1
                    continue
                if item is _RESET:
                    dst.reset()
                elif not item:
                    dst.send_eof()
                elif await dst.write(item):
                    lane.bytes_forwarded += len(item)
                else:
                    broken = True
                    lane.bytes_dropped += len(item)

    async def _close_all(self) -> None:
        for route in self.routes:
            if route._server is not None:
                route._server.close()
        for conn in list(self._conns):
            conn.forwarding = False
            conn.client.reset()
            conn.target.reset()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()  # a paused lane or a long delay would hold them
        if handlers:
            await asyncio.wait(handlers, timeout=5)
