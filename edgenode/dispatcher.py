"""The dispatcher: the one owner of peer state.

Every change to the registry, the keepalive scheduler, connection admission
and settling happens here, in plain functions that never await: no I/O, no
full queue, no other multiplexer (docs/architecture.md, failure 1). The
dispatcher waits for one thing only, its inbox, and only until the next
timer is due. Timers are not tasks: the keepalive scheduler knows its next
deadline and :meth:`Dispatcher.schedule` keeps the few others (closing
grace, housekeeping, beacons, serial link ticks) in one heap.

What it decides, from transport events (so "up" always means a live,
settled transport: failure 4):

- Admission. A connection whose hellos are exchanged is offered to the
  registry (keyed by IP, one connection per IP: failure 3). A refused one
  is closed with its reason; a replaced one is closed too, and the data
  frames it had not written yet move to the one that replaced it.
- Settling. Each side sends ready once it keeps the connection. The side
  whose own dial would win a simultaneous open (the higher IP) waits for
  that dial to end before it sends ready on the other side's connection.
  A connection is up for the application once both readies are sent: then
  ``PeerUp``, and data may flow. So a simultaneous open never flaps and
  never strands data on the losing connection.
- Keepalive. Both ends ping (failure 2); any frame proves liveness; a peer
  silent for the timeout is closed; down peers are redialled with backoff
  (:mod:`edgenode.dials` starts the dials and handles their failures).
- Closing. A closed connection's peer is down at once; requests waiting
  on it fail with the reason.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio import WouldBlock

from .api import PeerDown, PeerUp, Refused
from .connection import Connection
from .dials import Dials
from .errors import AdmissionRefused, EdgeNodeError, NodeClosed, PeerUnavailable, SlowPeer
from .inbox import AddPeer, Closed, Control, Failed, Inbox, Opened, Revoked, Shutdown
from .keepalive import DEAD, DIAL, PING, Keepalive
from .memtrim import trim as trim_heap
from .names import PeerNames, Resolved
from .proto.connection import PeerProtocol
from .proto.messages import Bye, Devices, PeerInfo, Peers, Ping, Pong, Ready
from .refusals import RefusalLog
from .registry import INBOUND, UP, PeerEntry, Registry
from .requests import Requests, clip

if TYPE_CHECKING:
    from .devices import DeviceRouter
    from .learning import PeerLearning
    from .subscriptions import EventFeed

log = logging.getLogger("edgenode.node")

monotonic = time.monotonic

#: Seconds between housekeeping runs (pruning, saving known peers).
HOUSEKEEPING_S = 30.0

_frame = PeerProtocol.send
_READY_FRAME = _frame(Ready())


class Dispatcher:
    """Owns peer state; handles the inbox's events and the timers."""

    def __init__(
        self,
        *,
        config: Any,
        registry: Registry,
        keepalive: Keepalive,
        inbox: Inbox,
        events: EventFeed,
        requests: Requests,
        learning: PeerLearning,
        devices: DeviceRouter,
        start_dial: Callable[[str, int], None],
        spawn: Callable[..., None],
        wildcard: bool,
        max_peers_listed: int,
        refusals: RefusalLog,
        names: PeerNames,
        is_authorised: Callable[[str], bool],
    ) -> None:
        self.config = config
        self.registry = registry
        self.keepalive = keepalive
        self.inbox = inbox
        self.events = events
        self.requests = requests
        self.learning = learning
        self.devices = devices
        #: Start a task in the node's task group (a save, never I/O here).
        self._spawn = spawn
        self.wildcard = wildcard
        self.max_peers_listed = max_peers_listed
        #: Peers configured by host name (edgenode.names).
        self.names = names
        #: Whether a node ID is trusted now (edgenode.trust).
        self.is_authorised = is_authorised
        #: Dials, their failures, failed inbound handshakes, added peers (edgenode.dials).
        self.dials = Dials(
            registry=registry,
            keepalive=keepalive,
            events=events,
            learning=learning,
            names=names,
            refusals=refusals,
            start_dial=start_dial,
            schedule=self.schedule,
            after_own_dial=self._after_own_dial,
            is_closing=lambda: self.closing,
        )
        self.handlers: dict[type, Callable[[Any, float], None]] = {
            Opened: self._on_opened,
            Control: self._on_control,
            Closed: self._on_closed,
            Failed: self.dials.on_failed,
            AddPeer: self.dials.on_add_peer,
            Shutdown: self._on_shutdown,
            Resolved: self.dials.on_resolved,
            Revoked: self._on_revoked,
        }
        self._control: dict[type, Callable[[Connection, Any, float], None]] = {
            Pong: self._on_pong,
            Bye: self._on_bye,
            Peers: lambda conn, msg, now: self.learning.from_peer_list(msg, now),
            Devices: lambda conn, msg, now: self.devices.on_devices(conn, msg),
            Ready: lambda conn, msg, now: self._settle(conn, now),
        }
        self._timers: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        #: Admitted connections that are not closing.
        self.conns: set[Connection] = set()
        #: Peers the application was told are up (PeerUp without PeerDown since).
        self._announced: set[str] = set()
        #: Callers waiting for an address (``ip`` or ``ip/device``) to come up.
        self._up_waiters: dict[str, list[anyio.Event]] = {}
        self.closing = False
        #: Called once every connection has closed after a shutdown.
        self.on_all_closed: Callable[[], None] = lambda: None
        self.open_connections: Callable[[], int] = lambda: 0
        # Loop figures.
        self.events_handled = 0
        self.wakeups = 0
        self.lag_last_s = 0.0
        self.lag_max_s = 0.0
        self.lag_sum_s = 0.0
        self._admissions_refused = 0
        self.broadcast_dropped = 0
        #: Told (peers up, peers known) when either has changed, at most once
        #: per wake-up, before the loop waits (systemd's status line:
        #: edgenode.systemd). None: nobody asked, nothing is counted.
        self.on_peer_count: Callable[[int, int], None] | None = None
        self._peer_count = (-1, -1)

    @property
    def refused(self) -> int:
        """Connections refused at admission, and inbound handshakes that failed."""
        return self._admissions_refused + self.dials.refused

    # -- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Handle inbox events and due timers until cancelled."""
        box = self.inbox.box
        handlers = self.handlers
        next_due = self._next_deadline()
        while True:
            try:
                event = box.get_nowait()
            except WouldBlock:
                now = monotonic()
                if next_due is not None and now >= next_due:
                    self._run_timers(now)
                    next_due = self._next_deadline()
                    continue
                self.wakeups += 1
                if self.on_peer_count is not None:
                    self._report_peer_count(self.on_peer_count)
                if next_due is None:
                    await box.wait_item()
                else:
                    with anyio.move_on_after(next_due - now):
                        await box.wait_item()
                continue
            now = monotonic()
            lag = now - event.t
            self.lag_last_s = lag
            self.lag_sum_s += lag
            if lag > self.lag_max_s:
                self.lag_max_s = lag
            self.events_handled += 1
            handlers[type(event)](event, now)
            next_due = self._next_deadline()
            if next_due is not None and now >= next_due:
                self._run_timers(now)
                next_due = self._next_deadline()

    def register(self, event_type: type, handler: Callable[[Any, float], None]) -> None:
        """Handle inbox events of ``event_type`` (the bridge's, discovery's) with ``handler``."""
        self.handlers[event_type] = handler

    def schedule(self, when: float, callback: Callable[[float], None]) -> None:
        """Call ``callback(now)`` from the dispatcher once ``when`` has passed."""
        heapq.heappush(self._timers, (when, next(self._seq), callback))

    def _report_peer_count(self, report: Callable[[int, int], None]) -> None:
        count = (len(self._announced), len(self.registry))
        if count != self._peer_count:
            self._peer_count = count
            report(*count)

    def _next_deadline(self) -> float | None:
        keepalive_due = self.keepalive.next_deadline()
        if self._timers:
            own = self._timers[0][0]
            return own if keepalive_due is None or own < keepalive_due else keepalive_due
        return keepalive_due

    def _run_timers(self, now: float) -> None:
        for action, ip, nonce in self.keepalive.due(now):
            # Keys are addresses, or names not resolved yet (edgenode.names).
            entry = self.registry.get(ip) if isinstance(ip, str) else None
            conn = entry.conn if entry is not None else None
            if action == PING:
                if isinstance(conn, Connection):
                    self.queue(conn, _frame(Ping(nonce)), now, droppable=True)
            elif action == DEAD:
                if isinstance(conn, Connection):
                    timeout = self.config.keepalive_timeout_s
                    self.drop(conn, f"no frames for {timeout} s (keepalive timeout)", now)
            elif action == DIAL:
                # A name's peer is resolved again before each dial.
                if not self.names.dial_due(ip):
                    self.dials.start(entry)
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, callback = heapq.heappop(timers)
            callback(now)

    def housekeeping(self, now: float) -> None:
        """Prune long-down peers, save known peers; every HOUSEKEEPING_S."""
        for entry in self.registry.prune(now):
            self.keepalive.forget(entry.ip)
            log.info("forgot peer %s: down since %s", entry.ip, entry.down_reason)
        due = self.learning.due_save(now)
        if due is not None:
            self._spawn(self.learning.save, due)
        # Give the heap that floods and restarts freed back to the OS (glibc
        # keeps it otherwise): the soak's survivors' drift fell from about
        # 1.5 to 0.5 MB with it.
        trim_heap()
        self.schedule(now + HOUSEKEEPING_S, self.housekeeping)

    # -- up and down, for the application ------------------------------------------

    def waiter(self, key: str) -> anyio.Event:
        """An event set when ``key`` (``ip`` or ``ip/device``) may have come up."""
        event = anyio.Event()
        self._up_waiters.setdefault(key, []).append(event)
        return event

    def forget_waiter(self, key: str, event: anyio.Event) -> None:
        """Drop a waiter made by :meth:`waiter` (it was set, or gave up)."""
        waiters = self._up_waiters.get(key)
        if waiters is not None and event in waiters:
            waiters.remove(event)
            if not waiters:
                del self._up_waiters[key]

    def wake(self, key: str) -> None:
        """Wake the callers waiting for ``key``."""
        for waiter in self._up_waiters.get(key, ()):
            waiter.set()

    # -- queueing without waiting ----------------------------------------------------

    def queue(
        self,
        conn: Connection,
        frame: bytes,
        now: float,
        *,
        droppable: bool = False,
    ) -> bool:
        """Queue a frame without waiting; apply the slow-peer policy if full.

        A full outbox drops a ``droppable`` frame (counted); a peer that lets
        the reserve for other frames fill up too is closed as slow. A frame
        queued postpones our next ping. (Pongs are queued by the connection's
        reader, and are not traffic: failure 2, edgenode.datapath.)
        """
        if conn.closing:
            return False
        if droppable:
            if not conn.queue_droppable(frame):
                return False
        elif not conn.queue_nowait(frame):
            reason = f"slow peer: outbox full ({conn.outbox.capacity} frames and the reserve)"
            self.drop(conn, reason, now, error=SlowPeer(f"{conn.ip}: {reason}"), bye=False)
            return False
        self.keepalive.sent(conn.ip, now)
        return True

    def queue_to_peers(self, frame: bytes, droppable: bool) -> None:
        """Queue ``frame`` to every peer whose connection is up."""
        now = monotonic()
        for conn in list(self.conns):
            if conn.settled:
                self.queue(conn, frame, now, droppable=droppable)

    # -- admission and settling ----------------------------------------------------

    def _on_opened(self, ev: Opened, now: float) -> None:
        conn = ev.conn
        if conn.direction != INBOUND:
            self.dials.dialing.discard(conn.ip)
        if self.closing:
            self.drop(conn, "node shutting down", now)
            return
        if not self.is_authorised(conn.node_id):
            # Trust was revoked while its handshake was under way.
            self._refuse(conn, f"node {conn.node_id} is no longer authorised", now)
            return
        if self.wildcard:
            # Our address as this peer sees it decides the simultaneous-open rule.
            self.registry.our_ip = conn.local_ip
        before = self.registry.get(conn.ip)
        old_epoch = before.epoch if before is not None and before.state == UP else None
        hello = conn.hello
        admission = self.registry.admit(
            conn,
            conn.ip,
            conn.node_id,
            hello.epoch,
            conn.direction,
            hello.listen_port or None,
            now,
            started_at=conn.started_at,
        )
        self.learning.forget_pruned()
        if conn.direction != INBOUND:
            # Our dial has ended, whatever admission says of it: a connection
            # the peer dialled may have waited for it before we said ready.
            self._after_own_dial(conn.ip, now)
        if not admission.accepted:
            self._refuse(conn, admission.reason or "refused", now)
            return
        conn.admitted = True
        conn.restarted = old_epoch is not None and old_epoch != hello.epoch
        replaced = admission.replaced
        if isinstance(replaced, Connection):
            # What send() accepted onto the old connection and it has not
            # written yet goes out on this one, first, once it settles.
            conn.carried = replaced.take_unsent_data()
            reason = admission.replaced_reason or "replaced"
            if replaced.settled and not conn.restarted and conn.ip in self._announced:
                # The peer lost the old connection (half-open here) and dialled
                # again: what was in flight on it may be lost, so the
                # application hears of the outage (a simultaneous open never
                # gets here: its loser never settled).
                self._announced.discard(conn.ip)
                log.warning(
                    "peer down %s (node %s): %s",
                    conn.ip,
                    conn.node_id,
                    reason,
                    extra={"peer": conn.ip, "node_id": conn.node_id, "reason": reason},
                )
                self.events.publish(PeerDown(conn.ip, conn.node_id, reason))
            self.drop(replaced, reason, now)
        self.conns.add(conn)
        self.keepalive.link_up(conn.ip, now)
        entry = admission.entry
        if entry is not None:
            # The listen port, not the source port: that is where to redial.
            self.learning.seen(conn.ip, entry.listen_port, conn.node_id, now)
        self._send_ready(conn, now)

    def _refuse(self, conn: Connection, reason: str, now: float) -> None:
        self._admissions_refused += 1
        log.info(
            "not admitting %s connection with %s: %s",
            conn.direction,
            conn.ip,
            reason,
            extra={"peer": conn.ip, "node_id": conn.node_id, "reason": reason},
        )
        self.events.publish(Refused(conn.ip, AdmissionRefused(f"{conn.ip}: {reason}")))
        self.drop(conn, reason, now)

    def _on_revoked(self, ev: Revoked, now: float) -> None:
        for conn in list(self.conns):
            if conn.node_id in ev.node_ids:
                self.drop(conn, f"node {conn.node_id} is no longer authorised", now)

    def _send_ready(self, conn: Connection, now: float) -> None:
        """Say ready on ``conn`` unless a dial of ours to its peer is on its way.

        That dial may yet become a connection that settles the tie (rule 4d),
        so neither side says ready while it has one: then, once both have,
        neither has a dial that could arrive later, and a connection that
        does arrive later was dialled after a loss (rule 4e). When the dial
        ends, :meth:`_after_own_dial` says ready on whichever connection
        is the peer's then.
        """
        if conn.ready_sent or conn.closing or not conn.admitted:
            return
        if conn.direction == INBOUND and conn.ip in self.dials.dialing:
            return
        if not self.queue(conn, _READY_FRAME, now):
            return
        conn.ready_sent = True
        self._settle(conn, now)

    def _after_own_dial(self, ip: str, now: float) -> None:
        """Our dial to ``ip`` ended: say ready on the peer's connection now."""
        entry = self.registry.get(ip)
        if entry is not None and isinstance(entry.conn, Connection):
            self._send_ready(entry.conn, now)

    def _settle(self, conn: Connection, now: float) -> None:
        """Both readies are sent: the connection is up for the application."""
        if not conn.settled or conn.closing:
            return
        entry = self.registry.settle(conn, now)
        if entry is None:
            return
        for frame in conn.carried:
            conn.outbox.put_beyond_capacity(frame)
        conn.carried = []
        ip = conn.ip
        if ip not in self._announced or conn.restarted:
            self._announced.add(ip)
            log.info(
                "peer up %s (node %s, %s)%s",
                ip,
                conn.node_id,
                conn.direction,
                " after a restart" if conn.restarted else "",
                extra={"peer": ip, "node_id": conn.node_id},
            )
            self.events.publish(PeerUp(ip, conn.node_id, conn.direction, conn.restarted))
        self.wake(ip)
        known = [
            PeerInfo(e.ip, e.listen_port, e.node_id)
            for e in self.registry.up()
            if e.ip != ip and e.listen_port and e.settled
        ][: self.max_peers_listed]
        if known:
            self.queue(conn, _frame(Peers(known)), now, droppable=True)
        devices = self.devices.devices_frame()
        if devices is not None:
            self.queue(conn, devices, now)

    # -- control messages from a connection's reader ------------------------------------

    def _on_control(self, ev: Control, now: float) -> None:
        conn = ev.conn
        handlers = self._control
        for msg in ev.msgs:
            if conn.closing:
                return
            handlers[type(msg)](conn, msg, now)

    def _on_pong(self, conn: Connection, msg: Pong, now: float) -> None:
        self.keepalive.pong(conn.ip, msg.nonce, now)

    def _on_bye(self, conn: Connection, msg: Bye, now: float) -> None:
        self.drop(conn, f"peer said bye: {msg.reason}", now, bye=False)

    # -- closing ---------------------------------------------------------------------

    def _on_closed(self, ev: Closed, now: float) -> None:
        self.drop(ev.conn, ev.reason, now, error=ev.error, bye=ev.error is not None)

    def drop(
        self,
        conn: Connection,
        reason: str,
        now: float,
        *,
        error: EdgeNodeError | None = None,
        bye: bool = True,
    ) -> None:
        """Close ``conn``; if it was its peer's live connection, the peer is down."""
        if conn.closing:
            return
        conn.closing = True
        conn.close_reason = reason
        self.conns.discard(conn)
        entry = self.registry.closed(conn, reason, now)
        if entry is not None:
            self._peer_down(conn, entry, reason, error, now)
        # Requests sent on this connection can no longer be answered: the
        # peer went down, or (replaced) it is up on another connection.
        if conn.pending:
            why = (
                f"peer {conn.ip} went down: {reason}"
                if entry is not None
                else f"peer {conn.ip}: connection replaced before the response arrived ({reason})"
            )
            self.requests.fail_connection(conn, PeerUnavailable(why))
        box = conn.outbox
        if bye and not box.closed:
            box.put_beyond_capacity(_frame(Bye(clip(reason))))
        box.close()
        if bye:
            scope = conn.scope

            def hard_close(now: float) -> None:
                if scope is not None:
                    scope.cancel()

            self.schedule(now + self.config.shutdown_grace_s, hard_close)
        elif conn.scope is not None:
            conn.scope.cancel()

    def _peer_down(
        self,
        conn: Connection,
        entry: PeerEntry,
        reason: str,
        error: EdgeNodeError | None,
        now: float,
    ) -> None:
        ip = conn.ip
        self.learning.seen(ip, entry.listen_port, entry.node_id, now)
        self.devices.peer_down(ip, entry.node_id, reason)
        redial = bool(entry.listen_port) and not self.closing
        delay = self.keepalive.link_down(ip, now, redial=redial)
        extra = {"peer": ip, "node_id": entry.node_id, "reason": reason}
        if self.closing:
            log.info("closed link to %s (node %s): %s", ip, entry.node_id, reason, extra=extra)
        elif ip not in self._announced:
            log.info(
                "link to %s (node %s) closed before it was ready: %s",
                ip,
                entry.node_id,
                reason,
                extra=extra,
            )
        else:
            retry = f"; redial in {delay:.1f} s" if delay is not None else ""
            log.warning(
                "peer down %s (node %s): %s%s", ip, entry.node_id, reason, retry, extra=extra
            )
        if ip in self._announced:
            self._announced.discard(ip)
            self.events.publish(PeerDown(ip, entry.node_id, reason, error))

    # -- shutting down ---------------------------------------------------------------

    def _on_shutdown(self, ev: Shutdown, now: float) -> None:
        self.closing = True
        for conn in list(self.conns):
            self.drop(conn, "node shutting down", now)  # the peer logs "peer said bye: ..."
        for waiters in self._up_waiters.values():
            for waiter in waiters:
                waiter.set()
        if not self.open_connections():
            self.on_all_closed()

    def fail_everything(self) -> None:
        """At shutdown: nothing waits for an answer any more."""
        error = NodeClosed("node closed before the response arrived")
        for conn in list(self.conns):
            self.requests.fail_connection(conn, error)
