"""Dials: the peers a node reaches out to, and what a failed handshake changes.

Part of the dispatcher (:mod:`edgenode.dispatcher`), which owns
:class:`Dials` and calls its methods from its loop: they are plain
functions that never await (docs/architecture.md, failure 1). A dial
itself is a task of the node's (:mod:`edgenode.handshake`); here is only
the bookkeeping around it:

- which peers a dial of ours is on its way to (:attr:`Dials.dialing`;
  settling reads it: docs/architecture.md, "Simultaneous open");
- a dial that failed: the peer stays down with the reason, and is redialled
  with backoff (edgenode.redial);
- an inbound handshake that failed: counted exactly, logged while the
  refusal log's budget lasts and summarised after that (edgenode.refusals);
- peers added while the node runs (``Node.add_peer``), and host names
  resolved (edgenode.names), which become peers to dial.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .api import Refused
from .errors import EdgeNodeError
from .handshake import log_refusal_summary
from .inbox import AddPeer, Failed
from .ips import is_ip
from .keepalive import Keepalive
from .names import PeerNames, Resolved
from .refusals import RefusalLog
from .registry import DOWN, UP, PeerEntry, Registry
from .transports.tcp import Unreachable

if TYPE_CHECKING:
    from .learning import PeerLearning
    from .subscriptions import EventFeed

log = logging.getLogger("edgenode.node")


class Dials:
    """Starts dials, and handles their failures, added peers and resolved names."""

    def __init__(
        self,
        *,
        registry: Registry,
        keepalive: Keepalive,
        events: EventFeed,
        learning: PeerLearning,
        names: PeerNames,
        refusals: RefusalLog,
        start_dial: Callable[[str, int], None],
        schedule: Callable[[float, Callable[[float], None]], None],
        after_own_dial: Callable[[str, float], None],
        is_closing: Callable[[], bool],
    ) -> None:
        self.registry = registry
        self.keepalive = keepalive
        self.events = events
        self.learning = learning
        #: Peers configured by host name (edgenode.names).
        self.names = names
        #: Refused connections and failed inbound handshakes (edgenode.refusals).
        self.refusals = refusals
        self._start_dial_task = start_dial
        #: The dispatcher's timers (``Dispatcher.schedule``).
        self._schedule = schedule
        #: Settling's turn once a dial of ours has ended (it may say ready now).
        self._after_own_dial = after_own_dial
        self._is_closing = is_closing
        self._refusal_summary_due: float | None = None
        #: Peers a dial is on its way to (from its start to its outcome).
        self.dialing: set[str] = set()
        #: Dials of ours that failed.
        self.failed = 0
        #: Inbound handshakes that failed or were refused.
        self.refused = 0

    def start(self, entry: PeerEntry | None) -> None:
        """Dial ``entry``'s peer unless it is up, being dialled, or has no port."""
        if entry is None or entry.state == UP or self._is_closing() or not entry.listen_port:
            return
        if entry.ip in self.dialing:
            return
        self.dialing.add(entry.ip)
        self._start_dial_task(entry.ip, entry.listen_port)

    def awaits_sign_of_life(self, ip: str, now: float) -> bool:
        """Whether a connection from ``ip`` now would pull our dial of it in:
        a peer that is down, with a dial pending well after now. Changes
        nothing: the listener asks it of a connection it refused unlogged."""
        entry = self.registry.get(ip)
        if entry is None or entry.state != DOWN:
            return False
        return self.keepalive.awaits_sign_of_life(ip, now)

    def on_failed(self, ev: Failed, now: float) -> None:
        """A dial of ours, or an inbound handshake, failed."""
        ip, error = ev.ip, ev.error
        self.events.publish(Refused(ip, error))
        if not ev.dialled:
            self.refused += 1
            if not ev.recorded:
                # Counted exactly; logged while the log's budget lasts, the
                # rest summarised across all addresses (bounded under a flood).
                line = self.refusals.record(ip, str(error), now)
                if line is not None:
                    log.warning(line, extra={"peer": ip, "reason": str(error)})
                else:
                    self._arm_refusal_summary()
            entry = self.registry.get(ip)
            if entry is not None and entry.state == DOWN:
                # Its address tried to reach us: it is back, dial it soon.
                self.keepalive.peer_alive(ip, now)
            return
        self.failed += 1
        self.dialing.discard(ip)
        entry = self.registry.get(ip)
        if entry is None or self._is_closing():
            return
        # Our dial failed while the peer's connection waited for it: that one
        # is ours to keep now.
        self._after_own_dial(ip, now)
        if entry.state == DOWN:
            # Status, and a send to the peer, say why it is still down.
            entry.down_reason = f"dial failed: {error}"
            # A connect nobody answered is not a flap: the peer is away.
            reached = not isinstance(error, Unreachable)
            delay = self.keepalive.dial_failed(ip, now, reached=reached)
            log.info(
                "dial %s failed: %s; retry in %.1f s",
                ip,
                error,
                delay,
                extra={"peer": ip, "reason": str(error)},
            )

    def _arm_refusal_summary(self) -> None:
        """Wake the dispatcher when the refusal log's summary falls due."""
        due = self.refusals.next_summary_at()
        if due is None or self._refusal_summary_due is not None:
            return
        self._refusal_summary_due = due

        def summary(now: float) -> None:
            self._refusal_summary_due = None
            log_refusal_summary(self.refusals, now)
            self._arm_refusal_summary()

        self._schedule(due, summary)

    def on_resolved(self, ev: Resolved, now: float) -> None:
        """A host name's resolution ended: dial the address it gave, if any."""
        entry = self.names.on_resolved(ev, now)
        if entry is not None:
            self.learning.forget_pruned()
            self.start(entry)

    def on_add_peer(self, ev: AddPeer, now: float) -> None:
        """``Node.add_peer``: keep a peer (an IP, or a host name) connected."""
        if not is_ip(ev.ip):
            self.names.add(ev.ip, ev.port, now)
            return
        try:
            self.registry.add_configured(ev.ip, ev.port, now)
        except EdgeNodeError as exc:
            log.warning("cannot add peer %s:%d: %s", ev.ip, ev.port, exc)
            return
        self.learning.forget_pruned()
        self.keepalive.schedule_dial(ev.ip, now)
