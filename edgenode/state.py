"""Peers this node has seen up, remembered across restarts.

``known_peers.json`` in the state directory lists the peers that were up at
some point: IP, listen port, verified node ID and when they were last seen
up. On start the node adds the authorised ones as learned dial targets, so
a board that reboots finds its mesh again even if its config names only one
peer and that peer is down.

The file is a cache the node writes itself, not configuration:

- A bad file never stops the node. It is moved aside to
  ``known_peers.json.bad``, a warning says why, and the node starts without
  known peers. Refusing to start (a :class:`ConfigError`) would turn a
  file truncated by a power cut into a board that stays off the network
  under systemd's restart loop, with nobody at its console; starting empty
  costs only the hints, which peers' lists and the config give back.
  Moving it aside, rather than letting the next save overwrite it, keeps
  the evidence: nothing is lost silently.
- It is written atomically (temp file, fsync, rename, fsync of the
  directory) and owner-only, like the node's key.
- Order, not clocks. The list is kept most recently seen first, and the cap
  drops from the end. ``last_seen`` is wall-clock time and informational
  only: a board without a real-time clock can boot in 1970 or jump hours
  when NTP answers, so no decision here depends on it.

:func:`merge` and :class:`KnownPeers` are pure (time comes in as an
argument). :func:`load_known_peers` and :func:`save_known_peers` do blocking
file I/O: a node loads once before its loop starts, and saves from a worker
thread, never from its dispatcher (a write and two fsyncs on an SD card can
take 100 ms and more).
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgeNodeError
from .identity import parse_node_id, write_atomic
from .ips import normalise_ip

__all__ = [
    "KNOWN_PEERS_FILENAME",
    "MAX_KNOWN_PEERS",
    "REFRESH_DELAY_S",
    "SAVE_DELAY_S",
    "KnownPeer",
    "KnownPeers",
    "known_peers_path",
    "load_known_peers",
    "merge",
    "save_known_peers",
]

log = logging.getLogger("edgenode.state")

KNOWN_PEERS_FILENAME = "known_peers.json"
#: Most peers remembered; the least recently seen go first.
MAX_KNOWN_PEERS = 256
#: Wait after a new peer (or a new address) before saving, so that a burst
#: of peers coming up costs one write, not one each.
SAVE_DELAY_S = 10.0
#: Wait before saving when only ``last_seen`` or the order changed: a peer
#: that flaps must not write the SD card every few seconds for weeks.
REFRESH_DELAY_S = 3600.0

_FORMAT_VERSION = 1
_FILE_MODE = 0o600
# A peer is about 130 bytes of indented JSON; leave room for IPv6 and edits.
_BYTES_PER_PEER = 512
_MIN_FILE_LIMIT_BYTES = 64 * 1024


@dataclass(frozen=True)
class KnownPeer:
    """A peer seen up: where it listens, who it proved to be, and when."""

    ip: str
    port: int
    node_id: str
    #: Wall-clock seconds (``time.time()``) when it was last seen up; informational.
    last_seen: float


def known_peers_path(state_dir: str | os.PathLike[str]) -> Path:
    """Return the known-peers file of a state directory."""
    return Path(state_dir) / KNOWN_PEERS_FILENAME


def merge(
    known: Sequence[KnownPeer],
    ip: str,
    port: int,
    node_id: str,
    now: float,
    *,
    cap: int = MAX_KNOWN_PEERS,
) -> list[KnownPeer]:
    """Return a new list with the peer at ``ip`` first, last seen ``now``.

    Drops the older entry for ``ip``, and any older entry for ``node_id``:
    a node that moved address (DHCP) is only reachable at its new one, and
    dialling the old one would fail or reach another node. Keeps the first
    ``cap`` entries. ``known`` is not changed. The arguments come from a
    verified connection and are not checked here.
    """
    merged = [KnownPeer(ip, port, node_id, now)]
    merged.extend(p for p in known if p.ip != ip and p.node_id != node_id)
    return merged[: max(cap, 0)]


def _dedupe(peers: Iterable[KnownPeer], cap: int) -> list[KnownPeer]:
    """Keep the first entry per IP and per node ID, up to ``cap``."""
    kept: list[KnownPeer] = []
    ips: set[str] = set()
    node_ids: set[str] = set()
    for peer in peers:
        if len(kept) >= cap:
            break
        if peer.ip in ips or peer.node_id in node_ids:
            continue
        ips.add(peer.ip)
        node_ids.add(peer.node_id)
        kept.append(peer)
    return kept


# -- the file -----------------------------------------------------------------


class _BadFile(Exception):
    """The file's contents are not a known-peers list (the reason is the message)."""


def _parse_entry(index: int, raw: Any) -> KnownPeer:
    where = f"entry {index}"
    if not isinstance(raw, dict):
        raise _BadFile(f"{where}: expected an object, got {type(raw).__name__}")
    ip, port, node_id, last_seen = (raw.get(k) for k in ("ip", "port", "node_id", "last_seen"))
    if not isinstance(ip, str):
        raise _BadFile(f"{where}: expected ip as text, got {ip!r:.60}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _BadFile(f"{where}: expected port 1..65535, got {port!r:.60}")
    if not isinstance(node_id, str):
        raise _BadFile(f"{where}: expected node_id as text, got {node_id!r:.60}")
    if (
        isinstance(last_seen, bool)
        or not isinstance(last_seen, (int, float))
        or not math.isfinite(last_seen)
    ):
        raise _BadFile(f"{where}: expected last_seen in seconds, got {last_seen!r:.60}")
    try:
        return KnownPeer(normalise_ip(ip), port, parse_node_id(node_id), float(last_seen))
    except EdgeNodeError as exc:
        raise _BadFile(f"{where}: {exc}") from None


def _parse(data: bytes, cap: int) -> list[KnownPeer]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _BadFile("not utf-8 text") from None
    except ValueError as exc:  # json.JSONDecodeError
        raise _BadFile(f"not json: {exc}") from None
    if not isinstance(doc, dict):
        raise _BadFile(f"expected a json object, got {type(doc).__name__}")
    version = doc.get("version")
    if version != _FORMAT_VERSION:
        raise _BadFile(f"expected format version {_FORMAT_VERSION}, got {version!r:.20}")
    entries = doc.get("peers")
    if not isinstance(entries, list):
        raise _BadFile(f"expected a list of peers, got {type(entries).__name__}")
    # Every entry is checked, even those past the cap: one bad entry means
    # the file is not what this node wrote, and none of it is trusted.
    return _dedupe([_parse_entry(i, raw) for i, raw in enumerate(entries)], cap)


def _set_aside(path: Path, reason: str) -> list[KnownPeer]:
    bad = path.with_name(path.name + ".bad")
    try:
        os.replace(path, bad)  # replaces an older .bad: that one was reported when it was made
        kept = f"moved it to {bad}"
    except OSError as exc:
        kept = f"could not move it to {bad} ({exc.strerror}); the next save replaces it"
    log.warning(
        "known peers file %s is not valid (%s); starting without known peers; %s",
        path,
        reason,
        kept,
    )
    return []


def _remove_stale_temp_files(path: Path) -> None:
    # A power cut between writing a temp file and renaming it leaves the
    # temp file behind; on a board that loses power often they would pile up.
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    prefix = f".{path.name}."
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass


def _unreadable(path: Path, exc: OSError) -> list[KnownPeer]:
    log.warning(
        "cannot read known peers file %s: %s; starting without known peers", path, exc.strerror
    )
    return []


def load_known_peers(
    path: str | os.PathLike[str], *, cap: int = MAX_KNOWN_PEERS
) -> list[KnownPeer]:
    """Return the peers listed in a known-peers file, most recently seen first.

    Never raises for a bad file. A missing file is an empty list. A file
    that cannot be read, is not a regular file, or is writable by group or
    others is ignored with a warning (the next save replaces it). A file
    whose contents are not valid is moved to ``<name>.bad`` with a warning.
    Entries beyond ``cap``, and later duplicates of an IP or node ID, are
    dropped. Blocking file I/O.
    """
    path = Path(path)
    _remove_stale_temp_files(path)
    limit = max(_MIN_FILE_LIMIT_BYTES, cap * _BYTES_PER_PEER)
    try:
        # O_NONBLOCK: a FIFO put in the file's place must not hang the start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return []
    except OSError as exc:
        return _unreadable(path, exc)
    # Checked on the open file, so the file checked is the file read.
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        log.warning("known peers file %s is not a regular file; starting without known peers", path)
        return []
    if mode & 0o022:
        os.close(fd)
        # Whoever can write it chooses the addresses this node dials.
        log.warning(
            "known peers file %s is writable by others (mode %04o); ignoring it "
            "(the next save replaces it, mode 0600)",
            path,
            mode,
        )
        return []
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            return _unreadable(path, exc)
    if len(data) > limit:
        return _set_aside(path, f"larger than the {limit}-byte limit")
    try:
        return _parse(data, cap)
    except _BadFile as exc:
        return _set_aside(path, str(exc))


def save_known_peers(path: str | os.PathLike[str], peers: Sequence[KnownPeer]) -> None:
    """Write ``peers`` to ``path`` atomically, mode 0600.

    A temp file in the same directory is written and fsynced, renamed over
    ``path``, and the directory is fsynced: after a crash or a power cut the
    file is either the old one or the new one, whole. Blocking file I/O.
    Raises :class:`OSError` if the file cannot be written (the old file is
    then untouched).
    """
    doc = {
        "version": _FORMAT_VERSION,
        "peers": [
            {"ip": p.ip, "port": p.port, "node_id": p.node_id, "last_seen": round(p.last_seen)}
            for p in peers
        ],
    }
    data = (json.dumps(doc, indent=1) + "\n").encode("utf-8")
    write_atomic(Path(path), data, _FILE_MODE)


# -- the list of a running node ------------------------------------------------


class KnownPeers:
    """A running node's known peers, and when they are due to be saved.

    Pure: the node's dispatcher calls :meth:`seen` when a peer comes up, and
    :meth:`take_due` from its housekeeping timer, saving what it returns
    from a worker thread; :meth:`take` gives the final list at shutdown. A
    new peer or address is due for saving after :data:`SAVE_DELAY_S`, a
    change of ``last_seen`` or order alone after :data:`REFRESH_DELAY_S`.
    Riding the housekeeping timer costs no timer of its own, and its period
    bounds how often the file is written.
    """

    __slots__ = ("_due", "_saved_keys", "cap", "path", "peers")

    def __init__(
        self,
        path: str | os.PathLike[str],
        peers: Sequence[KnownPeer] = (),
        *,
        cap: int = MAX_KNOWN_PEERS,
    ) -> None:
        self.path = Path(path)
        self.cap = cap
        #: Most recently seen first. Replaced, never changed in place.
        self.peers: list[KnownPeer] = _dedupe(peers, cap)
        self._saved_keys = _keys(self.peers)
        # When (monotonic) unsaved changes are due to be saved; None: nothing unsaved.
        self._due: float | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, cap: int = MAX_KNOWN_PEERS) -> KnownPeers:
        """Load ``path`` with :func:`load_known_peers` (blocking file I/O)."""
        return cls(path, load_known_peers(path, cap=cap), cap=cap)

    def seen(self, ip: str, port: int, node_id: str, *, wall_now: float, now: float) -> None:
        """Record the peer at ``ip`` up, last seen at wall-clock ``wall_now``.

        ``now`` is the caller's monotonic clock, which :meth:`take_due` reads too.
        """
        self.peers = merge(self.peers, ip, port, node_id, wall_now, cap=self.cap)
        changed = _keys(self.peers) != self._saved_keys
        due = now + (SAVE_DELAY_S if changed else REFRESH_DELAY_S)
        if self._due is None or due < self._due:
            self._due = due

    def take_due(self, now: float) -> list[KnownPeer] | None:
        """Return the list to save if unsaved changes are due by ``now``, else None."""
        if self._due is None or now < self._due:
            return None
        return self.take()

    def take(self) -> list[KnownPeer] | None:
        """Return the list to save now if anything is unsaved, else None (at shutdown)."""
        if self._due is None:
            return None
        self._due = None
        self._saved_keys = _keys(self.peers)
        return list(self.peers)


def _keys(peers: Iterable[KnownPeer]) -> frozenset[tuple[str, int, str]]:
    return frozenset((p.ip, p.port, p.node_id) for p in peers)
