"""The soak's checks, as pure bookkeeping: fed observations, they return verdicts.

:mod:`edgenode.testing.soak` drives the fleet and feeds them:

* :func:`parse_proc_net_tcp` / :func:`read_connections`: the kernel's
  established connections between node IPs, each counted once (on loopback
  both ends of a connection are listed).
* :class:`DuplicateTracker`: two connections between one IP pair seen
  together for longer than a grace.
* :class:`AgreementTracker`: a node's peer table against which processes
  are alive, within a bound.
* :func:`check_exactly_once`: the soak nodes' handled and acked logs.

No clock and no randomness: times come in as arguments.
"""

from __future__ import annotations

import socket
import struct
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

_TCP_ESTABLISHED = "01"


# -- the kernel's view of connections ------------------------------------------------------

Endpoint = tuple[str, int]
Connection = tuple[Endpoint, Endpoint]


def _hex_endpoint(text: str) -> Endpoint:
    address, _, port = text.partition(":")
    # /proc/net/tcp prints the IPv4 address as a host-order 32-bit hex number.
    ip = socket.inet_ntoa(struct.pack("=I", int(address, 16)))
    return ip, int(port, 16)


def parse_proc_net_tcp(
    text: str, ips: Iterable[str], listen: Iterable[Endpoint] | None = None
) -> set[Connection]:
    """The ESTABLISHED IPv4 connections between two of ``ips`` in ``/proc/net/tcp`` text.

    Each connection is returned once, as its two endpoints sorted, however
    many of its ends are listed (on loopback both are). With ``listen``,
    only connections with one end at one of those (ip, port) endpoints.
    """
    wanted = set(ips)
    listening = set(listen) if listen is not None else None
    found: set[Connection] = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != _TCP_ESTABLISHED:
            continue
        local, remote = _hex_endpoint(fields[1]), _hex_endpoint(fields[2])
        if local[0] not in wanted or remote[0] not in wanted:
            continue
        if listening is not None and local not in listening and remote not in listening:
            continue
        found.add((local, remote) if local <= remote else (remote, local))
    return found


def read_connections(
    ips: Iterable[str], listen: Iterable[Endpoint] | None = None, path: str = "/proc/net/tcp"
) -> set[Connection]:
    """:func:`parse_proc_net_tcp` of the live ``/proc/net/tcp``."""
    with open(path, encoding="ascii", errors="replace") as tcp_file:
        return parse_proc_net_tcp(tcp_file.read(), ips, listen)


class DuplicateTracker:
    """Counts times two connections between one IP pair were established at once.

    Feed it :meth:`sample` with the connections seen at a time. Two
    connections seen together in samples spanning more than ``grace_s``
    are a violation.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.samples = 0
        self.most_at_once = 0
        self.episodes = 0
        self.longest_s = 0.0
        self.violations: list[str] = []
        self._first_seen: dict[Connection, float] = {}
        self._episode: dict[tuple[str, str], tuple[Connection, Connection]] = {}
        self._reported: set[tuple[Connection, Connection]] = set()

    def restart_counts(self) -> None:
        """Forget the figures and violations so far; keep tracking what is open."""
        self.samples = self.most_at_once = self.episodes = 0
        self.longest_s = 0.0
        self.violations = []
        self._reported.clear()

    def sample(self, now: float, connections: Iterable[Connection]) -> None:
        """Take one sample of the established connections at time ``now``."""
        current = set(connections)
        self.samples += 1
        for gone in [c for c in self._first_seen if c not in current]:
            del self._first_seen[gone]
        by_pair: dict[tuple[str, str], list[Connection]] = defaultdict(list)
        for conn in current:
            self._first_seen.setdefault(conn, now)
            (ip_a, _), (ip_b, _) = conn
            by_pair[(min(ip_a, ip_b), max(ip_a, ip_b))].append(conn)
        episodes: dict[tuple[str, str], tuple[Connection, Connection]] = {}
        for pair, conns in by_pair.items():
            self.most_at_once = max(self.most_at_once, len(conns))
            if len(conns) < 2:
                continue
            conns.sort(key=lambda c: (self._first_seen[c], c))
            two = (conns[0], conns[1])
            if self._episode.get(pair) != two:
                self.episodes += 1
            episodes[pair] = two
            together_s = now - self._first_seen[two[1]]
            self.longest_s = max(self.longest_s, together_s)
            if together_s > self.grace_s and two not in self._reported:
                self._reported.add(two)
                self.violations.append(
                    f"{pair[0]} and {pair[1]}: connections {_fmt_conn(two[0])} and "
                    f"{_fmt_conn(two[1])} both established for {together_s:.2f} s "
                    f"(grace {self.grace_s:.2f} s)"
                )
        self._episode = episodes


def _fmt_conn(conn: Connection) -> str:
    return f"{conn[0][0]}:{conn[0][1]}-{conn[1][0]}:{conn[1][1]}"


# -- registry agreement ----------------------------------------------------------------------


@dataclass
class Expected:
    """What every node should say of one node now."""

    name: str
    ip: str
    node_id: str
    up: bool
    #: When its state last changed (``time.monotonic()``).
    changed_at: float


class AgreementTracker:
    """Checks nodes' peer tables against which processes are alive.

    :meth:`observe` takes one node's status rows; a row that disagrees with
    the expectation for longer than ``bound_s`` (counted from the later of
    the last change of either node and the last poll that agreed) is a
    violation, reported once per disagreement.
    """

    def __init__(self, bound_s: float) -> None:
        self.bound_s = bound_s
        self.statuses = 0
        self.disagreements_seen = 0
        self.longest_s = 0.0
        self.violations: list[str] = []
        self.wrong_ids: list[str] = []
        self._last_ok: dict[tuple[str, str], float] = {}
        self._reported: set[tuple[str, str]] = set()

    def restart_counts(self) -> None:
        """Forget the figures and violations so far; keep each pair's last agreement."""
        self.statuses = self.disagreements_seen = 0
        self.longest_s = 0.0
        self.violations = []
        self.wrong_ids = []
        self._reported.clear()

    def observe(
        self,
        now: float,
        observer: Expected,
        others: Iterable[Expected],
        rows: Iterable[Mapping[str, Any]],
    ) -> bool:
        """Check ``observer``'s status ``rows`` at ``now``; True if it agrees on every node."""
        self.statuses += 1
        by_ip = {row.get("ip"): row for row in rows}
        agrees = True
        for other in others:
            row = by_ip.get(other.ip)
            up = row is not None and row.get("state") == "up"
            key = (observer.name, other.name)
            if up and row is not None and row.get("node_id") != other.node_id:
                self.wrong_ids.append(
                    f"{observer.name} lists {other.ip} up as node {row.get('node_id')}, "
                    f"expected {other.node_id}"
                )
            if up == other.up:
                self._last_ok[key] = now
                self._reported.discard(key)
                continue
            agrees = False
            self.disagreements_seen += 1
            since = max(self._last_ok.get(key, 0.0), observer.changed_at, other.changed_at)
            lag = now - since
            self.longest_s = max(self.longest_s, lag)
            if lag > self.bound_s and key not in self._reported:
                self._reported.add(key)
                actual = "up" if up else (row.get("state") if row else "absent")
                self.violations.append(
                    f"{observer.name} listed {other.name} ({other.ip}) as {actual} for "
                    f"{lag:.2f} s while it was {'running' if other.up else 'not running'} "
                    f"(bound {self.bound_s:.2f} s)"
                )
        return agrees


# -- exactly once -------------------------------------------------------------------------------


@dataclass
class ExactlyOnce:
    """The exactly-once check's figures; ``ok`` when every count of trouble is 0."""

    acknowledged: int = 0
    handled: int = 0
    handled_not_acknowledged: int = 0
    duplicates: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    misrouted: list[str] = field(default_factory=list)
    wrong_answers: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        troubles = (self.duplicates, self.missing, self.misrouted, self.wrong_answers)
        return self.acknowledged > 0 and not any(troubles) and not self.malformed


def check_exactly_once(
    handled: Mapping[str, Iterable[str]], acked: Mapping[str, Iterable[str]]
) -> ExactlyOnce:
    """Check the soak nodes' logs.

    ``handled`` maps a node's IP to the lines of its handled log (``ID
    FROM_IP``); ``acked`` maps a node's IP to the lines of its acked log
    (``ID TO_IP``, or ``! ID TO_IP REPLY`` for an answer that did not match).
    """
    result = ExactlyOnce()
    seen: dict[str, list[tuple[str, str]]] = defaultdict(list)  # id -> [(handler, from)]
    for handler_ip, lines in handled.items():
        for line in lines:
            fields = line.split()
            if len(fields) != 2:
                result.malformed.append(f"handled log of {handler_ip}: {line!r:.80}")
                continue
            seen[fields[0]].append((handler_ip, fields[1]))
            result.handled += 1
    for request_id, where in seen.items():
        if len(where) > 1:
            result.duplicates.append(f"{request_id} handled {len(where)} times: {where}")
    acknowledged: set[str] = set()
    for asker_ip, lines in acked.items():
        for line in lines:
            fields = line.split()
            if fields and fields[0] == "!":
                result.wrong_answers.append(f"{asker_ip}: {line:.120}")
                continue
            if len(fields) != 2:
                result.malformed.append(f"acked log of {asker_ip}: {line!r:.80}")
                continue
            request_id, target_ip = fields
            result.acknowledged += 1
            acknowledged.add(request_id)
            where = seen.get(request_id)
            if not where:
                result.missing.append(f"{request_id} from {asker_ip} to {target_ip}")
            elif where[0] != (target_ip, asker_ip):
                result.misrouted.append(
                    f"{request_id} from {asker_ip} to {target_ip} handled by {where[0][0]} "
                    f"as from {where[0][1]}"
                )
    result.handled_not_acknowledged = sum(1 for r in seen if r not in acknowledged)
    return result
