"""Peers configured by host name (``pi-kitchen.local:7300``).

The registry is keyed by IP address, so a name has to be resolved before
its peer has an entry, and again before each redial (a board that got a new
address from DHCP is found again). Resolution uses the system resolver
(``getaddrinfo``, which is what makes ``.local`` names work on Raspberry Pi
OS) in a worker thread, never in the dispatcher, under a time bound.

The dispatcher owns :class:`PeerNames`: its methods are plain functions.
A name's dials are scheduled by the keepalive scheduler like any peer's,
keyed by a :class:`NameKey` until the name resolves; when one is due the
dispatcher starts a resolution (a task), whose :class:`Resolved` event
comes back through the inbox. A name that does not resolve is logged with
the reason (once per change of reason) and retried with the redial rules
(edgenode.redial: a peer that is away), never fatal. A name that resolves
becomes a configured registry entry for its address and is dialled at
once; if a later resolution gives another address, the old entry is no
longer configured and the new one is.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import anyio

from .errors import EdgeNodeError
from .inbox import Event
from .ips import normalise_ip
from .keepalive import Keepalive
from .registry import PeerEntry, Registry

log = logging.getLogger("edgenode.node")

monotonic = time.monotonic


class NameKey(NamedTuple):
    """A peer configured by name: the keepalive's key for its dials until resolved."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Resolved(Event):
    """Inbox event: a name's resolution ended, with its addresses or why not."""

    __slots__ = ("error", "ips", "key")

    def __init__(self, key: NameKey, ips: list[str], error: str | None) -> None:
        self.key, self.ips, self.error, self.t = key, ips, error, monotonic()


class _NameState:
    __slots__ = ("error", "ip", "resolutions", "resolving")

    def __init__(self) -> None:
        self.ip: str | None = None
        self.error: str | None = None
        self.resolving = False
        self.resolutions = 0


class PeerNames:
    """The peers configured by host name; see the module docstring."""

    def __init__(
        self,
        *,
        registry: Registry,
        keepalive: Keepalive,
        spawn: Callable[..., None],
        post: Callable[[Resolved], Awaitable[None]],
        timeout_s: float,
        prefer_family: int,
        our_ip: Callable[[], str],
    ) -> None:
        self.registry = registry
        self.keepalive = keepalive
        self._spawn = spawn
        self._post = post
        #: Longest a resolution may take (mDNS lookups can take seconds).
        self.timeout_s = timeout_s
        #: The address family our listener uses: a name's address of that
        #: family is dialled first.
        self.prefer_family = prefer_family
        self._our_ip = our_ip
        self._names: dict[NameKey, _NameState] = {}
        #: Address a name resolved to last -> the name.
        self.by_ip: dict[str, NameKey] = {}

    def add(self, host: str, port: int, now: float) -> None:
        """Keep the peer at ``host:port`` connected: resolve it now."""
        key = NameKey(host, port)
        if key not in self._names:
            self._names[key] = _NameState()
        self.keepalive.schedule_dial(key, now)

    def dial_due(self, key: object) -> bool:
        """A dial is due for ``key`` (a name, or an address): resolve first if it
        is a name's. Returns True when a resolution took the dial's place."""
        if not isinstance(key, NameKey):
            key = self.by_ip.get(key)  # type: ignore[arg-type]
            if key is None:
                return False
        state = self._names.get(key)
        if state is None:
            return False
        if not state.resolving:
            state.resolving = True
            self._spawn(self._resolve, key)
        return True

    async def _resolve(self, key: NameKey) -> None:
        ips: list[str] = []
        error: str | None = None
        try:
            with anyio.fail_after(self.timeout_s):
                infos = await anyio.getaddrinfo(key.host, key.port, type=socket.SOCK_STREAM)
            # The listener's family first, then the order the resolver gave.
            infos = sorted(infos, key=lambda info: info[0] != self.prefer_family)
            for info in infos:
                ip = normalise_ip(str(info[4][0]))
                if ip not in ips:
                    ips.append(ip)
            if not ips:
                error = "no address"
        except TimeoutError:
            error = f"no answer from the resolver within {self.timeout_s:g} s"
        except OSError as exc:  # socket.gaierror
            error = str(exc.strerror or exc)
        except EdgeNodeError as exc:
            error = str(exc)
        await self._post(Resolved(key, ips, error))

    def on_resolved(self, ev: Resolved, now: float) -> PeerEntry | None:
        """Dispatcher handler: returns the entry to dial, or None (retry scheduled)."""
        key = ev.key
        state = self._names.get(key)
        if state is None:
            return None
        state.resolving = False
        state.resolutions += 1
        ips = [ip for ip in ev.ips if ip != self._our_ip()]
        error = ev.error
        if error is None and not ips:
            error = f"resolves only to this node's own address ({', '.join(ev.ips)})"
        if error is not None:
            if error != state.error:
                log.warning(
                    "cannot resolve peer %s: %s; retrying", key, error, extra={"peer": str(key)}
                )
            state.error = error
            self.keepalive.dial_failed(key, now, reached=False)
            return None
        if state.error is not None:
            log.info("peer %s resolves again: %s", key, ips[0])
        state.error = None
        ip = ips[0]
        if state.ip is not None and state.ip != ip:
            log.info("peer %s moved from %s to %s", key, state.ip, ip)
            self.by_ip.pop(state.ip, None)
            self.registry.unconfigure(state.ip)
        state.ip = ip
        self.by_ip[ip] = key
        try:
            entry = self.registry.add_configured(ip, key.port, now)
        except EdgeNodeError as exc:
            log.warning("cannot add peer %s at %s: %s", key, ip, exc)
            self.keepalive.dial_failed(key, now, reached=False)
            return None
        return entry

    def rows(self, now: float) -> list[dict[str, Any]]:
        """For status: each name, where it resolved, or why not and when it is tried again."""
        rows = []
        for key, state in sorted(self._names.items()):
            due = self.keepalive.pending_dial(key)
            rows.append(
                {
                    "host": key.host,
                    "port": key.port,
                    "ip": state.ip,
                    "error": state.error,
                    "resolutions": state.resolutions,
                    "retry_in_s": None if due is None else max(0.0, due - now),
                }
            )
        return rows

    def name_of(self, ip: str) -> str | None:
        """The host name ``ip`` was resolved from, if any."""
        key = self.by_ip.get(ip)
        return None if key is None else key.host
