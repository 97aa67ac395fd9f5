"""The soak's checks, as pure bookkeeping: fed observations, they return verdicts.

:mod:`edgenode.testing.soak_runner` drives the fleet and feeds them, and
:mod:`edgenode.testing.soak_verdict` turns their results into the soak's checks:

* :func:`parse_proc_net_tcp` / :func:`read_connections`: the kernel's
  established connections between node IPs, each counted once (on loopback
  both ends of a connection are listed).
* :class:`DuplicateTracker`: two connections between one IP pair seen
  together for longer than a grace.
* :class:`AgreementTracker`: a node's peer table against which processes
  are alive, within a bound.
* :func:`check_exactly_once`: the soak nodes' handled and acked logs.
* :func:`check_sends`: the soak nodes' sent and received logs, against the
  faults the soak made.

No clock and no randomness: times come in as arguments.
"""

from __future__ import annotations

import bisect
import socket
import struct
from collections import Counter, defaultdict
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


# -- exactly once, in order, for send() -----------------------------------------------------------

#: Something that happened to a node that may cost it messages: (``time.monotonic()``, what).
Fault = tuple[float, str]


class _Message:
    """What the logs say of one message."""

    __slots__ = ("called_at", "deliveries", "refused", "returned_at", "sender", "to")

    def __init__(self, sender: str, to: str, called_at: float) -> None:
        self.sender = sender
        self.to = to
        self.called_at = called_at
        self.returned_at: float | None = None
        self.refused: str | None = None
        self.deliveries = 0


@dataclass
class Sends:
    """The send check's figures; ``ok`` when every list of trouble is empty."""

    #: How far from a fault a message's send may be for the fault to explain its loss.
    window_s: float
    #: ``send()`` calls logged, and those that returned (the messages checked).
    called: int = 0
    sent: int = 0
    #: Calls that raised, by error.
    refused: Counter[str] = field(default_factory=Counter)
    #: Calls whose process ended inside them (neither returned nor raised in the log).
    unfinished: int = 0
    #: Deliveries logged, and how many of them were of unfinished calls.
    delivered: int = 0
    delivered_unfinished: int = 0
    #: Lost messages that a fault explains, by whose fault and which.
    excused: Counter[str] = field(default_factory=Counter)
    #: Longest from ``send()`` returning to the delivery, and of which message.
    slowest_s: float = 0.0
    slowest: str = ""
    lost: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    phantoms: list[str] = field(default_factory=list)
    delivered_refused: list[str] = field(default_factory=list)
    misrouted: list[str] = field(default_factory=list)
    receiver_troubles: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)

    def troubles(self) -> list[str]:
        """Every finding, one line each, prefixed with its kind."""
        return [
            *(f"lost, no fault explains it: {x}" for x in self.lost),
            *(f"delivered more than once: {x}" for x in self.duplicates),
            *(f"out of order: {x}" for x in self.out_of_order),
            *(f"delivered, never sent: {x}" for x in self.phantoms),
            *(f"delivered although send() raised: {x}" for x in self.delivered_refused),
            *(f"misrouted: {x}" for x in self.misrouted),
            *(f"receiver: {x}" for x in self.receiver_troubles),
            *(f"malformed: {x}" for x in self.malformed),
        ]

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.delivered > 0 and not self.troubles()

    def describe(self) -> str:
        """One line of figures for the soak's report."""
        excused = sum(self.excused.values())
        why = ", ".join(f"{what} {n}" for what, n in self.excused.most_common())
        refused = ", ".join(f"{what} {n}" for what, n in self.refused.most_common())
        return (
            f"{self.sent} messages sent (send() returned), {self.delivered} deliveries; "
            f"lost to a fault within {self.window_s:.2f} s of the send {excused}"
            + (f" ({why})" if why else "")
            + f"; lost with no fault to explain it {len(self.lost)}, delivered more than once "
            f"{len(self.duplicates)}, out of order {len(self.out_of_order)}, never sent "
            f"{len(self.phantoms)}, delivered although send() raised "
            f"{len(self.delivered_refused)}, misrouted {len(self.misrouted)}, receiver troubles "
            f"{len(self.receiver_troubles)}, malformed lines {len(self.malformed)}; "
            f"send() raised {sum(self.refused.values())}"
            + (f" ({refused})" if refused else "")
            + f", {self.unfinished} calls cut by their process's end "
            f"({self.delivered_unfinished} of them delivered); slowest delivery "
            f"{self.slowest_s:.2f} s" + (f" ({self.slowest})" if self.slowest else "")
        )


def check_sends(
    sent: Mapping[str, Iterable[str]],
    received: Mapping[str, Iterable[str]],
    faults: Mapping[str, Iterable[Fault]],
    window_s: float,
    origin: float = 0.0,
    starts: Mapping[str, Iterable[float]] | None = None,
) -> Sends:
    """Check the soak nodes' sent and received logs against the faults the soak made.

    ``sent`` maps a node's IP to the lines of its sent log (``> ID TO_IP T``
    before a ``send()``, then ``= ID TO_IP T`` once it returned or ``x ID
    TO_IP ERROR`` if it raised); ``received`` maps a node's IP to its
    received log, in arrival order (``ID FROM_IP T``, or ``! WHAT`` for
    trouble); an ID is ``SENDER.SEQ``. ``faults`` maps a node's IP to what
    was done to it and when. Times are ``time.monotonic()`` (one clock for
    every process on the machine); ``origin`` is subtracted in messages.
    ``starts`` maps a node's IP to when its processes were started: shown
    beside a loss that no fault explains, never an excuse (a new process's
    connections are new, and carry everything ``send()`` queues on them).

    Checked: no message is delivered twice, or anywhere but to the node it
    was sent to from the node that sent it; per (sender, receiver) the
    sequence numbers delivered strictly increase; nothing is delivered that
    was never sent or whose ``send()`` raised; and every message whose
    ``send()`` returned is delivered, unless its sender or its receiver had
    a fault within ``window_s`` of the moment ``send()`` returned, either
    side (see :attr:`~edgenode.testing.soak_options.SoakOptions.send_loss_window_s`
    for why such a fault explains a loss and a later or earlier one does
    not).
    """
    result = Sends(window_s)
    messages: dict[str, _Message] = {}
    for sender_ip, lines in sent.items():
        for line in lines:
            _read_sent_line(result, messages, sender_ip, line)
    highest: dict[tuple[str, str], tuple[int, str]] = {}  # (sender, receiver) -> seq, id
    for receiver_ip, lines in received.items():
        for line in lines:
            _read_received_line(result, messages, highest, receiver_ip, line)
    by_ip = {ip: sorted(events) for ip, events in faults.items()}
    context = {ip: list(events) for ip, events in by_ip.items()}
    for ip, times in (starts or {}).items():
        context[ip] = sorted([*context.get(ip, []), *((t, "start") for t in times)])
    for message_id, m in sorted(messages.items(), key=lambda item: item[1].called_at):
        if m.returned_at is None:
            if m.refused is None:
                result.unfinished += 1
                result.delivered_unfinished += m.deliveries > 0
            continue
        result.sent += 1
        if m.deliveries:
            continue
        near = _nearest(by_ip, m, window_s)
        if near is not None:
            (_, what), role = near
            result.excused[f"{role} {what}"] += 1
            continue
        result.lost.append(
            f"{message_id} from {m.sender} to {m.to}, send() returned at "
            f"{m.returned_at - origin:.2f} s; {_faults_around(context, m, origin)}"
        )
    return result


def _read_sent_line(
    result: Sends, messages: dict[str, _Message], sender_ip: str, line: str
) -> None:
    fields = line.split()
    try:
        mark, message_id, to = fields[0], fields[1], fields[2]
        if len(fields) != 4 or mark not in (">", "=", "x") or not _parse_id(message_id):
            raise ValueError(line)
        if mark == ">":
            if message_id in messages:
                raise ValueError("a message ID used twice")
            messages[message_id] = _Message(sender_ip, to, float(fields[3]))
            result.called += 1
            return
        m = messages[message_id]
        if (
            m.sender != sender_ip
            or m.to != to
            or m.returned_at is not None
            or m.refused is not None
        ):
            raise ValueError("an outcome that does not match its call")
        if mark == "=":
            m.returned_at = float(fields[3])
        else:
            m.refused = fields[3]
            result.refused[fields[3]] += 1
    except (IndexError, KeyError, ValueError):
        result.malformed.append(f"sent log of {sender_ip}: {line!r:.80}")


def _read_received_line(
    result: Sends,
    messages: dict[str, _Message],
    highest: dict[tuple[str, str], tuple[int, str]],
    receiver_ip: str,
    line: str,
) -> None:
    if line.startswith("!"):
        result.receiver_troubles.append(f"{receiver_ip}: {line[1:].strip():.200}")
        return
    fields = line.split()
    parsed = _parse_id(fields[0]) if len(fields) == 3 else None
    try:
        delivered_at = float(fields[2])
    except (IndexError, ValueError):
        parsed = None
    if parsed is None:
        result.malformed.append(f"received log of {receiver_ip}: {line!r:.80}")
        return
    message_id, from_ip = fields[0], fields[1]
    sender, seq = parsed
    result.delivered += 1
    m = messages.get(message_id)
    if m is None:
        result.phantoms.append(f"{message_id} from {from_ip} at {receiver_ip}")
        return
    m.deliveries += 1
    if m.deliveries > 1:
        result.duplicates.append(
            f"{message_id} from {m.sender} to {m.to}: delivery {m.deliveries}, at {receiver_ip}"
        )
        return
    if m.refused is not None:
        result.delivered_refused.append(
            f"{message_id} from {m.sender} to {m.to}: send() raised {m.refused}"
        )
    if receiver_ip != m.to or from_ip != m.sender:
        result.misrouted.append(
            f"{message_id} sent from {m.sender} to {m.to}, delivered at {receiver_ip} "
            f"as from {from_ip}"
        )
    key = (sender, receiver_ip)
    before = highest.get(key)
    if before is not None and seq < before[0]:
        result.out_of_order.append(f"{message_id} delivered at {receiver_ip} after {before[1]}")
    else:
        highest[key] = (seq, message_id)
    if m.returned_at is not None and delivered_at - m.returned_at > result.slowest_s:
        result.slowest_s = delivered_at - m.returned_at
        result.slowest = message_id


def _parse_id(message_id: str) -> tuple[str, int] | None:
    """(sender, sequence number) of ``SENDER.SEQ``, or None."""
    sender, dot, seq = message_id.rpartition(".")
    if not dot or not sender or not seq.isdigit():
        return None
    return sender, int(seq)


def _nearest(
    faults: Mapping[str, list[Fault]], m: _Message, window_s: float
) -> tuple[Fault, str] | None:
    """The fault of ``m``'s sender or receiver nearest its send within the window."""
    assert m.returned_at is not None
    best: tuple[Fault, str] | None = None
    for ip, role in ((m.sender, "sender"), (m.to, "receiver")):
        for fault in _around(faults.get(ip, []), m.returned_at, window_s):
            if best is None or abs(fault[0] - m.returned_at) < abs(best[0][0] - m.returned_at):
                best = (fault, role)
    return best


def _around(faults: list[Fault], at: float, window_s: float) -> list[Fault]:
    start = bisect.bisect_left(faults, (at - window_s, ""))
    return [f for f in faults[start:] if f[0] <= at + window_s]


def _faults_around(faults: Mapping[str, list[Fault]], m: _Message, origin: float) -> str:
    """The events of ``m``'s two nodes nearest its send, one either side, for a report."""
    assert m.returned_at is not None
    parts = []
    for ip, role in ((m.sender, "sender"), (m.to, "receiver")):
        events = faults.get(ip, [])
        at = bisect.bisect_left(events, (m.returned_at, ""))
        described = ", ".join(
            f"{what} at {t - origin:.2f} s ({t - m.returned_at:+.2f} s)"
            for t, what in events[max(0, at - 1) : at + 1]
        )
        parts.append(f"{role} {ip}: {described or 'none'}")
    return "nearest events: " + "; ".join(parts)
