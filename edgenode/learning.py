"""Peer learning: peers a node hears of, besides the ones it is configured with.

Three sources name peers to dial: the peer lists connected peers send,
discovery beacons, and ``known_peers.json`` (the peers that were up before a
restart). Only authorised node IDs are ever dialled. A learned entry is a
hint: it never displaces another entry, and it is pruned after
``prune_after_s`` down (the registry's rules). Peers that come up are
remembered, and saved from a worker thread, never from the dispatcher.

:class:`PeerLearning` belongs to the dispatcher: its methods are plain
functions, except :meth:`save` (a task of its own).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import anyio

from .errors import EdgeNodeError
from .ips import normalise_ip
from .keepalive import Keepalive
from .proto.messages import Peers
from .registry import DOWN, PeerEntry, Registry
from .state import KNOWN_PEERS_FILENAME, KnownPeer, KnownPeers, save_known_peers

log = logging.getLogger("edgenode.node")


class PeerLearning:
    """Which peers to dial beyond the configured ones, and what to remember."""

    def __init__(
        self,
        *,
        node_id: str,
        registry: Registry,
        keepalive: Keepalive,
        is_authorised: Callable[[str], bool],
        learn_from_peers: bool,
        state_dir: str | os.PathLike[str] | None,
        max_known_peers: int,
    ) -> None:
        self.node_id = node_id
        self.registry = registry
        self.keepalive = keepalive
        self.is_authorised = is_authorised
        self.learn_from_peers = learn_from_peers
        #: Peers remembered across restarts, or None when the node does not remember.
        self.known: KnownPeers | None = None
        if state_dir is not None:
            path = os.path.join(state_dir, KNOWN_PEERS_FILENAME)
            self.known = KnownPeers.load(path, cap=max_known_peers)
        self._save_lock: anyio.Lock | None = None  # made in the loop, on first save
        #: Peers found by a beacon, and beacons ignored.
        self.discovered = 0
        self.ignored_beacons = 0

    def _dial(self, entry: PeerEntry | None, now: float) -> None:
        self.forget_pruned()
        if entry is not None:
            self.keepalive.schedule_dial(entry.ip, now)

    def forget_pruned(self) -> None:
        """Forget the timers of entries the registry pruned to make room."""
        for entry in self.registry.take_pruned():
            self.keepalive.forget(entry.ip)
            log.info("forgot peer %s to make room: down since %s", entry.ip, entry.down_reason)

    def dial_known(self, now: float) -> None:
        """Dial the authorised peers remembered from earlier runs."""
        if self.known is None:
            return
        for known in self.known.peers:
            if not self.is_authorised(known.node_id) or known.node_id == self.node_id:
                continue
            if known.ip in self.registry:
                continue
            try:
                entry = self.registry.learn(known.ip, known.port, known.node_id, now)
            except EdgeNodeError as exc:
                log.debug("ignored known peer %s: %s", known.ip, exc)
                continue
            self._dial(entry, now)

    def from_peer_list(self, msg: Peers, now: float) -> None:
        """A connected peer told us of its peers: dial the authorised new ones."""
        if not self.learn_from_peers:
            return
        for info in msg.peers:
            if info.node_id is None or not self.is_authorised(info.node_id):
                continue
            if info.node_id == self.node_id:
                continue
            try:
                ip = normalise_ip(info.ip)
                if ip in self.registry:
                    continue
                entry = self.registry.learn(ip, info.port, info.node_id, now)
            except EdgeNodeError as exc:  # the peer's data: ignored, never a config error
                log.debug("ignored peer list entry %r: %s", info, exc)
                continue
            if entry is not None:
                log.info("learned peer %s:%d (node %s)", ip, info.port, info.node_id)
            self._dial(entry, now)

    def from_beacon(self, source_ip: str, listen_port: int, node_id: str, now: float) -> None:
        """A discovery beacon named ``node_id`` at ``source_ip``: dial it if it is
        new and authorised.

        Ignores our own node ID, unauthorised IDs, addresses the registry
        already knows (keepalive and backoff look after them; a beacon of
        the node known there, or of any node where none is known yet, pulls
        a pending dial in) and an ID that is connected at another address
        (a forged or cloned beacon).
        """
        if node_id == self.node_id or not self.is_authorised(node_id):
            self.ignored_beacons += 1
            return
        try:
            ip = normalise_ip(source_ip)
        except EdgeNodeError:
            self.ignored_beacons += 1
            return
        known = self.registry.get(ip)
        if known is not None:
            # A configured peer never reached yet has no node ID: its beacon
            # is a sign of life too. Pulling in a dial of an address we dial
            # anyway is harmless even if the beacon is forged (TLS checks
            # who answers; hints come at most once per hint interval).
            if known.state == DOWN and known.node_id in (None, node_id):
                # It is back: dial it soon, whatever its backoff says.
                self.keepalive.peer_alive(ip, now)
            return
        holder = self.registry.by_node_id(node_id)
        if holder is not None and holder.state == "up":
            self.ignored_beacons += 1
            log.info("ignored beacon from %s: node %s is connected at %s", ip, node_id, holder.ip)
            return
        try:
            entry = self.registry.learn(ip, listen_port, node_id, now)
        except EdgeNodeError:
            self.ignored_beacons += 1
            return
        if entry is None:
            self.ignored_beacons += 1
            self.forget_pruned()
            return
        self.discovered += 1
        log.info("discovered peer %s:%d (node %s)", ip, listen_port, node_id)
        self._dial(entry, now)

    def seen(self, ip: str, port: int | None, node_id: str | None, now: float) -> None:
        """A peer was up at ``ip``: remember it (where it listens, not its source port)."""
        if self.known is not None and port and node_id:
            self.known.seen(ip, port, node_id, wall_now=time.time(), now=now)

    def due_save(self, now: float) -> list[KnownPeer] | None:
        """What to save now, if a save is due (housekeeping)."""
        return self.known.take_due(now) if self.known is not None else None

    def final_save(self) -> list[KnownPeer] | None:
        """What to save at shutdown, if anything changed."""
        return self.known.take() if self.known is not None else None

    async def save(self, peers: list[KnownPeer]) -> None:
        """Write ``peers`` to ``known_peers.json`` from a worker thread.

        A write and two fsyncs can take 100 ms or more on an SD card: a
        worker thread, never the dispatcher. Saves land in the order taken.
        """
        assert self.known is not None
        if self._save_lock is None:
            self._save_lock = anyio.Lock()
        async with self._save_lock:
            try:
                await anyio.to_thread.run_sync(save_known_peers, self.known.path, peers)
            except OSError as exc:
                log.warning(
                    "cannot save known peers to %s: %s", self.known.path, exc.strerror or exc
                )
