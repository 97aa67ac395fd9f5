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

Routes, their lanes and links are in :mod:`edgenode.testing.proxy_lanes`; a
connection's two sockets and the pipes that carry its bytes through the
lanes' faults are in :mod:`edgenode.testing.proxy_conn`.

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
from collections.abc import Iterable
from typing import Any

import anyio
from anyio.from_thread import start_blocking_portal

from edgenode.errors import EdgeNodeError, InvalidArgument
from edgenode.ips import ip_sort_key, normalise_ip

from .proxy_conn import CLIENT, FIN, RST, TARGET, ProxiedConnection, Side, pipe
from .proxy_lanes import BOTH, DOWN, UP, Lane, ProxyLink, Route

_CONNECT_TIMEOUT_S = 10.0


class ProxyError(EdgeNodeError):
    """The fault-injection proxy could not listen, or was used after it closed."""


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
        self._conns: set[ProxiedConnection] = set()
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
                lane.pause()

        self._call(apply)

    def resume(self, *, direction: str = BOTH, sender: str | None = None) -> None:
        """Read on the lanes again, after :meth:`pause`."""
        lanes = self.lanes(direction, sender=sender)

        def apply() -> None:
            for lane in lanes:
                lane.resume()

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
                lane.resume()

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
            lambda reader, writer: self._handle(route, Side(reader, writer)),
            host=route.listen_host,
            port=route.port,
        )
        route.server = server
        return int(server.sockets[0].getsockname()[1])

    async def _handle(self, route: Route, client: Side) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._open += 1
        try:
            await self._proxy(route, client)
        finally:
            self._open -= 1
            self._handlers.discard(task)

    async def _proxy(self, route: Route, client: Side) -> None:
        self.accepted += 1
        route.accepted += 1
        if self._refusing is not None:
            self.refused += 1
            client.close(self._refusing)
            return
        target: Side | None = None
        try:
            with anyio.move_on_after(_CONNECT_TIMEOUT_S):
                local = None if route.source_host is None else (route.source_host, 0)
                target = Side(
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
        conn = ProxiedConnection(route, client, target)
        self._conns.add(conn)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pipe, conn, client, target, route.up)
                tg.start_soon(pipe, conn, target, client, route.down)
        finally:
            self._conns.discard(conn)
            client.close()
            target.close()

    async def _close_all(self) -> None:
        for route in self.routes:
            if route.server is not None:
                route.server.close()
        for conn in list(self._conns):
            conn.forwarding = False
            conn.client.reset()
            conn.target.reset()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()  # a paused lane or a long delay would hold them
        if handlers:
            await asyncio.wait(handlers, timeout=5)
