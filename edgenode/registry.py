"""The peer registry: one entry per peer IP address, and the rules of admission.

The rules
---------

The registry is the node's answer to "who are my peers, and which of them can
I reach right now?". It is keyed by the peer's IP address, normalised so that
one machine is one key however its address is spelt (an IPv4-mapped IPv6
address is the IPv4 address; IPv6 is in compressed canonical form; brackets
and a ``%zone`` are dropped). A registry keyed by ``IP:PORT`` counted one
machine as many peers and made both sides dial each other (docs/architecture.md, failure 3).

Each entry is UP or DOWN. UP means exactly one thing: the entry holds a live
connection (``entry.conn is not None``), and the node's loop changes it only
from transport events. When a transport closes, the loop calls
:meth:`Registry.closed` and the entry is DOWN at once, so the registry never
lists a peer as connected after its transport is gone (docs/architecture.md, failure 4).

A connection becomes an entry's connection only through :meth:`Registry.admit`,
after the TLS handshake and the hello exchange have verified the peer's node
ID. Admission is decided in that one method, in this order:

1. Our own address is refused: ``connection from our own address {ip}``.
2. An IP with no entry gets a new entry if the table has room. A full table
   is pruned first (see below); if it is still full the connection is
   refused: ``peer table full ({max_peers} entries)``. Entries count whether
   they are up or down, configured or learned.
3. An IP whose entry is DOWN is accepted. A node ID different from the one
   recorded is fine (the board was re-provisioned) and replaces it.
4. An IP whose entry is UP, with its current connection X, keeps one live
   connection per IP:

   a. A different node ID is refused while X is alive:
      ``ip {ip} is connected as node {old}; refusing node {new}``.
   b. A different session epoch means the peer restarted and X is stale. The
      new connection is accepted at once and X is replaced: a restarted peer
      is never refused as "already connected".
   c. The same epoch and the same direction as X: the dialler dialled again
      because it believes X is dead, so the newer connection wins and X is
      replaced.
   d. The same epoch and the other direction is a simultaneous open: both
      sides dialled. Both nodes keep the connection dialled by the higher IP
      (by :func:`ip_sort_key`; we dialled an OUTBOUND connection, the peer
      dialled an INBOUND one). Each node computes the same answer from the
      same two addresses, so both keep the same TCP connection and close the
      other, whichever order the two connections arrive in.
   e. Except when the new connection was *started* (its TCP connection
      accepted or dialled, ``started_at``) after X *settled*
      (:meth:`Registry.settle`: both sides said, with a ready message, that
      they keep X, and neither had a dial of its own on its way then), or
      when X was made longer ago than ``simultaneous_window_s`` (when set;
      the node sets two handshake timeouts). A peer that agreed to keep X
      and dials afterwards, or that dials so long after X was made that no
      simultaneous open explains it, dialled because it lost X, which is
      half-open here. The new connection wins, as in c; without this, the
      higher address would refuse every redial of the lower until its
      keepalive gave X up. A connection started before X settled is an
      ordinary simultaneous open (d), however late it arrives.

A replaced connection leaves the registry's index at once. The node must
close it, sending ``Admission.replaced_reason`` in its bye; when its
transport then reports the close, :meth:`Registry.closed` returns ``None``
because a replaced (or refused) connection closing is not a state change.

Entries that are DOWN and were not configured are pruned after
``prune_after_s``; configured entries are never pruned and are always
redialled. Pruning happens when the node calls :meth:`Registry.prune`, and
implicitly when a new entry needs room; implicitly pruned entries are kept
for :meth:`Registry.take_pruned` so that the node can forget their timers.

A verified connection (:meth:`admit`) or a configured peer that finds the
table still full after pruning evicts the longest-waiting *unproven* entry:
learned from a peer list or a beacon, not configured, DOWN, and never once
connected. Such an entry is only a hint, and anyone who can forge a beacon
with an authorised node ID from many source addresses could otherwise fill
the table and keep real peers out until the prune delay. :meth:`learn`
never evicts: a hint does not displace another.

This module is pure: no clock, no sockets, no randomness. Time comes in as
``now`` (monotonic seconds). Connections are opaque objects owned by the
node; the registry compares them by identity only.
"""

from __future__ import annotations

from collections.abc import Iterator

from edgenode.errors import ConfigError, InvalidAddress

from .ips import ip_sort_key, normalise_ip

UP = "up"
DOWN = "down"
INBOUND = "inbound"
OUTBOUND = "outbound"

_DIRECTIONS = (INBOUND, OUTBOUND)
_MAX_SHOWN_CHARS = 64


def _shown(value: object) -> str:
    text = repr(value)
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[:_MAX_SHOWN_CHARS] + "..."
    return text


def _check_port(ip: str, port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidAddress(f"invalid port {_shown(port)} for {ip}: expected 1..65535")


class PeerEntry:
    """What the node knows about the peer at one IP address.

    Plain attributes, read by the node; only the :class:`Registry` writes them.
    """

    __slots__ = (
        "configured",
        "conn",
        "direction",
        "down_reason",
        "epoch",
        "ip",
        "last_change",
        "listen_port",
        "node_id",
        "settled",
        "settled_at",
        "state",
        "times_up",
        "up_since",
    )

    def __init__(
        self,
        ip: str,
        now: float,
        *,
        listen_port: int | None = None,
        node_id: str | None = None,
        configured: bool = False,
    ) -> None:
        self.ip: str = ip
        self.node_id: str | None = node_id
        self.epoch: int | None = None
        self.state: str = DOWN
        self.conn: object | None = None
        #: Both sides have said they keep ``conn`` (rule 4e).
        self.settled: bool = False
        self.settled_at: float | None = None
        self.direction: str | None = None
        self.listen_port: int | None = listen_port
        self.configured: bool = configured
        self.up_since: float | None = None
        self.last_change: float = now
        self.down_reason: str | None = None
        self.times_up: int = 0

    def __repr__(self) -> str:
        parts = [f"<PeerEntry {self.ip} {self.state}"]
        if self.node_id is not None:
            parts.append(f"node={self.node_id}")
        if self.epoch is not None:
            parts.append(f"epoch={self.epoch}")
        if self.direction is not None:
            parts.append(self.direction)
        if self.listen_port is not None:
            parts.append(f"port={self.listen_port}")
        if self.configured:
            parts.append("configured")
        if self.state == DOWN and self.down_reason is not None:
            parts.append(f"reason={self.down_reason!r}")
        parts.append(f"changed={self.last_change:.3f}")
        return " ".join(parts) + ">"


class Admission:
    """The registry's verdict on a connection offered to :meth:`Registry.admit`.

    ``entry`` is the entry the connection now belongs to when accepted; when
    refused, it is the existing entry that caused the refusal (or ``None``).
    """

    __slots__ = ("accepted", "entry", "reason", "replaced", "replaced_reason")

    def __init__(
        self,
        accepted: bool,
        *,
        reason: str | None = None,
        replaced: object | None = None,
        replaced_reason: str | None = None,
        entry: PeerEntry | None = None,
    ) -> None:
        self.accepted: bool = accepted
        self.reason: str | None = reason
        self.replaced: object | None = replaced
        self.replaced_reason: str | None = replaced_reason
        self.entry: PeerEntry | None = entry

    def __repr__(self) -> str:
        if not self.accepted:
            return f"<Admission refused: {self.reason}>"
        ip = self.entry.ip if self.entry is not None else "?"
        if self.replaced is None:
            return f"<Admission accepted {ip}>"
        return f"<Admission accepted {ip}, replacing: {self.replaced_reason}>"


class Registry:
    """The IP-keyed peer table; see the module docstring for its rules."""

    def __init__(
        self,
        our_ip: str,
        *,
        max_peers: int,
        prune_after_s: float,
        simultaneous_window_s: float | None = None,
    ) -> None:
        """Create an empty table for the node at ``our_ip``.

        Raises :class:`ConfigError` for an invalid address, a ``max_peers``
        below 1 or a negative ``prune_after_s``.
        """
        if not isinstance(max_peers, int) or isinstance(max_peers, bool) or max_peers < 1:
            raise ConfigError(f"max_peers must be an integer >= 1, got {_shown(max_peers)}")
        if not prune_after_s >= 0:
            raise ConfigError(f"prune_after_s must be >= 0, got {_shown(prune_after_s)}")
        try:
            self.our_ip: str = normalise_ip(our_ip)
        except InvalidAddress as exc:
            raise ConfigError(f"our address: {exc}") from None
        self.max_peers: int = max_peers
        self.prune_after_s: float = prune_after_s
        #: A connection older than this cannot be half of a simultaneous open.
        self.simultaneous_window_s: float | None = simultaneous_window_s
        self._entries: dict[str, PeerEntry] = {}
        # id(conn) -> entry, for current connections only. The entry holds a
        # reference to conn, so the id cannot be reused while it is indexed.
        self._by_conn: dict[int, PeerEntry] = {}
        # node_id -> entries recording it (usually one; a board that moved IP
        # leaves its old entry DOWN until it is pruned).
        self._by_node_id: dict[str, list[PeerEntry]] = {}
        self._pruned: list[PeerEntry] = []

    # -- building the table ------------------------------------------------

    def add_configured(self, ip: str, port: int, now: float) -> PeerEntry:
        """Add a peer from the config (DOWN, to be dialled), or update its port.

        Raises :class:`ConfigError` for an invalid address or port, for our
        own address, or when the table is full of entries that cannot be
        pruned: a configured peer is the user's setting.
        """
        try:
            ip = normalise_ip(ip)
            _check_port(ip, port)
        except InvalidAddress as exc:
            raise ConfigError(str(exc)) from None
        if ip == self.our_ip:
            raise ConfigError(f"configured peer {ip} is our own address")
        entry = self._entries.get(ip)
        if entry is None:
            if not self._make_room(now, evict_unproven=True):
                raise ConfigError(
                    f"peer table full ({self.max_peers} entries): cannot add configured peer {ip}"
                )
            entry = self._new_entry(ip, now, listen_port=port, configured=True)
        else:
            entry.configured = True
            entry.listen_port = port
        return entry

    def unconfigure(self, ip: str) -> None:
        """A configured peer is no longer (its host name moved to another
        address): its entry stays as if learned, and is pruned once down."""
        entry = self._entries.get(normalise_ip(ip))
        if entry is not None:
            entry.configured = False

    def learn(self, ip: str, port: int, node_id: str | None, now: float) -> PeerEntry | None:
        """Record a peer heard of in a peer list; return its entry.

        Returns ``None`` for our own address or when the table is full. An
        existing entry keeps its state and node ID; only an unknown listen
        port is filled in. Raises :class:`InvalidAddress` for an invalid
        address or port (a peer's data: never a configuration error).
        """
        ip = normalise_ip(ip)
        _check_port(ip, port)
        if ip == self.our_ip:
            return None
        entry = self._entries.get(ip)
        if entry is not None:
            if entry.listen_port is None:
                entry.listen_port = port
            return entry
        if not self._make_room(now):
            return None
        entry = self._new_entry(ip, now, listen_port=port)
        self._set_node_id(entry, node_id)
        return entry

    # -- admission: the rules of the module docstring, in one place ---------

    def admit(
        self,
        conn: object,
        ip: str,
        node_id: str,
        epoch: int,
        direction: str,
        listen_port: int | None,
        now: float,
        started_at: float | None = None,
    ) -> Admission:
        """Decide whether ``conn``, a verified connection from ``ip``, becomes its peer's.

        ``started_at`` is when its TCP connection was accepted or dialled
        (rule 4e); None counts as "before anything settled".

        Returns an :class:`Admission`; when it names a ``replaced``
        connection, the node must close that one with ``replaced_reason``.
        Raises :class:`InvalidAddress` for an invalid address and
        :class:`ValueError` for a bad direction or a connection that is
        already admitted (both are bugs in the caller).
        """
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be {INBOUND!r} or {OUTBOUND!r}, got {direction!r}")
        if id(conn) in self._by_conn:
            raise ValueError(f"connection {conn!r} is already admitted")
        ip = normalise_ip(ip)

        # 1. Our own address.
        if ip == self.our_ip:
            return Admission(False, reason=f"connection from our own address {ip}")

        entry = self._entries.get(ip)
        # 2. A new IP needs room.
        if entry is None:
            if not self._make_room(now, evict_unproven=True):
                return Admission(False, reason=f"peer table full ({self.max_peers} entries)")
            entry = self._new_entry(ip, now)
            return self._accept(entry, conn, node_id, epoch, direction, listen_port, now)

        # 3. A down entry takes any verified node.
        current = entry.conn
        if current is None:
            return self._accept(entry, conn, node_id, epoch, direction, listen_port, now)

        # 4a. Another node on a live IP.
        if node_id != entry.node_id:
            return Admission(
                False,
                reason=f"ip {ip} is connected as node {entry.node_id}; refusing node {node_id}",
                entry=entry,
            )
        # 4b. The peer restarted.
        if epoch != entry.epoch:
            reason = f"superseded by a new session of {node_id} (epoch {epoch})"
            return self._accept(
                entry, conn, node_id, epoch, direction, listen_port, now, current, reason
            )
        # 4c. The dialler dialled again.
        if direction == entry.direction:
            reason = "superseded by a newer connection from the same session"
            return self._accept(
                entry, conn, node_id, epoch, direction, listen_port, now, current, reason
            )
        # 4e. The peer agreed to keep the current connection, or dialled long
        # after it was made: no simultaneous open explains that, so it has
        # lost that connection (half-open at our end) and the newer one
        # wins, as in 4c.
        window = self.simultaneous_window_s
        aged = window is not None and entry.up_since is not None and now - entry.up_since > window
        settled_at = entry.settled_at
        dialled_after_settling = (
            settled_at is not None and started_at is not None and started_at > settled_at
        )
        if dialled_after_settling or aged:
            reason = "superseded by a newer connection: the peer had lost this one"
            return self._accept(
                entry, conn, node_id, epoch, direction, listen_port, now, current, reason
            )
        # 4d. Simultaneous open: keep the connection dialled by the higher IP.
        we_are_higher = ip_sort_key(self.our_ip) > ip_sort_key(ip)
        higher_ip = self.our_ip if we_are_higher else ip
        reason = f"simultaneous open: keeping the connection dialled by {higher_ip}"
        new_is_keeper = (direction == OUTBOUND) == we_are_higher
        if new_is_keeper:
            return self._accept(
                entry, conn, node_id, epoch, direction, listen_port, now, current, reason
            )
        return Admission(False, reason=reason, entry=entry)

    def _accept(
        self,
        entry: PeerEntry,
        conn: object,
        node_id: str,
        epoch: int,
        direction: str,
        listen_port: int | None,
        now: float,
        replaced: object | None = None,
        replaced_reason: str | None = None,
    ) -> Admission:
        if replaced is not None:
            del self._by_conn[id(replaced)]
        self._by_conn[id(conn)] = entry
        self._set_node_id(entry, node_id)
        entry.conn = conn
        entry.settled = False
        entry.settled_at = None
        entry.state = UP
        entry.direction = direction
        entry.epoch = epoch
        # A configured peer is dialled where the configuration says (a port
        # forward, a proxy); others where they say they listen.
        if listen_port is not None and not entry.configured:
            entry.listen_port = listen_port
        entry.up_since = now
        entry.last_change = now
        entry.times_up += 1
        entry.down_reason = None
        return Admission(True, replaced=replaced, replaced_reason=replaced_reason, entry=entry)

    def closed(self, conn: object, reason: str, now: float) -> PeerEntry | None:
        """Record that ``conn``'s transport closed; return the entry it took DOWN.

        Returns ``None`` when ``conn`` is not an entry's current connection
        (a replaced or refused connection closing, or an unknown one): that
        is not a state change.
        """
        entry = self._by_conn.pop(id(conn), None)
        if entry is None:
            return None
        entry.conn = None
        entry.settled = False
        entry.settled_at = None
        entry.state = DOWN
        entry.up_since = None
        entry.last_change = now
        entry.down_reason = reason
        return entry

    def settle(self, conn: object, now: float) -> PeerEntry | None:
        """Record that both sides keep ``conn`` (each sent a ready message).

        Returns its entry, or ``None`` if ``conn`` is not an entry's current
        connection. A connection started after ``now`` that arrives for the
        same session replaces it: the peer lost it (rule 4e).
        """
        entry = self._by_conn.get(id(conn))
        if entry is not None and not entry.settled:
            entry.settled = True
            entry.settled_at = now
        return entry

    # -- lookups ----------------------------------------------------------

    def get(self, ip: str) -> PeerEntry | None:
        """Return the entry for ``ip`` (normalised first), or ``None``.

        Raises :class:`InvalidAddress` for an invalid address.
        """
        return self._entries.get(normalise_ip(ip))

    def by_node_id(self, node_id: str) -> PeerEntry | None:
        """Return the entry recording ``node_id``, preferring one that is UP."""
        entries = self._by_node_id.get(node_id)
        if not entries:
            return None
        return max(entries, key=lambda e: (e.state == UP, e.last_change))

    def by_conn(self, conn: object) -> PeerEntry | None:
        """Return the entry whose current connection is ``conn``, or ``None``."""
        return self._by_conn.get(id(conn))

    def up(self) -> list[PeerEntry]:
        """Return the entries that hold a live connection."""
        return list(self._by_conn.values())

    # -- pruning ----------------------------------------------------------

    def prune(self, now: float) -> list[PeerEntry]:
        """Remove and return DOWN, non-configured entries down for at least ``prune_after_s``."""
        stale = [
            entry
            for entry in self._entries.values()
            if entry.state == DOWN
            and not entry.configured
            and now - entry.last_change >= self.prune_after_s
        ]
        for entry in stale:
            del self._entries[entry.ip]
            self._unindex_node_id(entry)
        return stale

    def take_pruned(self) -> list[PeerEntry]:
        """Return, and clear, the entries pruned implicitly to make room.

        :meth:`admit`, :meth:`learn` and :meth:`add_configured` prune a full
        table before adding to it; the node calls this afterwards to forget
        those peers' timers.
        """
        pruned, self._pruned = self._pruned, []
        return pruned

    def _make_room(self, now: float, *, evict_unproven: bool = False) -> bool:
        if len(self._entries) >= self.max_peers:
            self._pruned.extend(self.prune(now))
        if len(self._entries) >= self.max_peers and evict_unproven:
            unproven = [
                entry
                for entry in self._entries.values()
                if entry.state == DOWN and not entry.configured and entry.times_up == 0
            ]
            if unproven:
                oldest = min(unproven, key=lambda entry: entry.last_change)
                del self._entries[oldest.ip]
                self._unindex_node_id(oldest)
                self._pruned.append(oldest)
        return len(self._entries) < self.max_peers

    # -- internals ----------------------------------------------------------

    def _new_entry(
        self, ip: str, now: float, *, listen_port: int | None = None, configured: bool = False
    ) -> PeerEntry:
        entry = PeerEntry(ip, now, listen_port=listen_port, configured=configured)
        self._entries[ip] = entry
        return entry

    def _set_node_id(self, entry: PeerEntry, node_id: str | None) -> None:
        if entry.node_id == node_id:
            return
        self._unindex_node_id(entry)
        entry.node_id = node_id
        if node_id is not None:
            self._by_node_id.setdefault(node_id, []).append(entry)

    def _unindex_node_id(self, entry: PeerEntry) -> None:
        if entry.node_id is None:
            return
        entries = self._by_node_id[entry.node_id]
        entries.remove(entry)
        if not entries:
            del self._by_node_id[entry.node_id]

    # -- container protocol -----------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[PeerEntry]:
        # A copy, so the node may prune or admit while iterating.
        return iter(list(self._entries.values()))

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str):
            return False
        try:
            return normalise_ip(ip) in self._entries
        except InvalidAddress:
            return False

    def __repr__(self) -> str:
        return (
            f"<Registry {self.our_ip}: {len(self._by_conn)} up, "
            f"{len(self._entries)}/{self.max_peers} entries>"
        )
