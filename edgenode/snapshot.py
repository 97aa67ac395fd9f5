"""What a node reports about itself: the peer table and its figures.

Read by ``Node.peers()`` and ``Node.stats()``, hence by ``edgenode status``.
Everything here only reads: a snapshot of the state the dispatcher and the
data path keep, with every count of something not delivered, so that
nothing is lost silently.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from firmware_bridge.cbor import encode as cbor_encode

from .api import PeerSnapshot
from .connection import Connection
from .ips import ip_sort_key
from .registry import UP

if TYPE_CHECKING:
    from .bridge import SerialBridge
    from .devices import DeviceRouter
    from .dispatcher import Dispatcher
    from .keepalive import Keepalive
    from .names import PeerNames
    from .refusals import RefusalLog
    from .registry import Registry
    from .requests import Requests
    from .sending import Sending
    from .subscriptions import Subscriptions


class NodeParts(Protocol):
    """What a snapshot reads (``edgenode.node.Node`` has each of them)."""

    node_id: str
    registry: Registry
    keepalive: Keepalive
    dispatcher: Dispatcher
    subscriptions: Subscriptions
    requests: Requests
    sending: Sending
    devices: DeviceRouter
    bridge: SerialBridge | None
    refusals: RefusalLog
    names: PeerNames
    event_drops: int

    def peers(self) -> list[PeerSnapshot]:
        """The peer table (``peer_rows``)."""


monotonic = time.monotonic

#: Every node answers requests on this topic with its peer table.
PEERS_TOPIC = "edgenode/peers"


def peer_rows(node: NodeParts) -> list[PeerSnapshot]:
    """One row per registry entry, sorted by IP, then one per device on our ports."""
    now = monotonic()
    keepalive = node.keepalive
    rows = []
    for entry in sorted(node.registry, key=lambda e: ip_sort_key(e.ip)):
        live = keepalive.liveness(entry.ip, now)
        conn = entry.conn if isinstance(entry.conn, Connection) else None
        if entry.state != UP:
            state = "down"
        else:
            # Up once the dispatcher has settled it, as it announces PeerUp:
            # a connection's reader sees the peer's ready a moment sooner.
            state = "up" if conn is not None and entry.settled else "connecting"
        redial = keepalive.pending_dial(entry.ip) if entry.state != UP else None
        paused = conn.paused_since if conn is not None else None
        rows.append(
            PeerSnapshot(
                ip=entry.ip,
                node_id=entry.node_id,
                state=state,
                direction=entry.direction,
                listen_port=entry.listen_port,
                up_for_s=None
                if entry.up_since is None or entry.state != UP
                else now - entry.up_since,
                down_reason=entry.down_reason,
                rtt_s=live.rtt_s if live else None,
                our_pings_answered=bool(live and live.our_pings_answered),
                their_frames_arriving=bool(live and live.their_frames_arriving),
                last_heard_s=live.last_received_age_s if live else None,
                bytes_in=conn.bytes_in if conn else 0,
                bytes_out=conn.bytes_out if conn else 0,
                drops=conn.drops if conn else 0,
                devices=node.devices.remote.get(entry.ip, ()),
                queued=len(conn.outbox) if conn else 0,
                paused_s=None if paused is None else now - paused,
                redial_in_s=None if redial is None else max(0.0, redial - now),
                name=node.names.name_of(entry.ip),
            )
        )
    if node.bridge is not None:
        rows.extend(node.bridge.snapshot(now))
    return rows


def node_figures(node: NodeParts, started: float) -> dict[str, Any]:
    """Uptime, loop lag, events and wake-ups, peers by state, and every count
    of something not delivered (drops, stalls, timeouts, lost device traffic)."""
    up_entries = [e for e in node.registry if e.state == UP]
    up = sum(1 for e in up_entries if isinstance(e.conn, Connection) and e.settled)
    d = node.dispatcher
    subs = node.subscriptions
    requests = node.requests
    return {
        "node_id": node.node_id,
        "uptime_s": monotonic() - started if started else 0.0,
        "loop_lag_last_ms": d.lag_last_s * 1000,
        "loop_lag_max_ms": d.lag_max_s * 1000,
        "loop_lag_avg_ms": d.lag_sum_s * 1000 / max(1, d.events_handled),
        "events_handled": d.events_handled,
        "wakeups": d.wakeups,
        "peers_up": up,
        "peers_connecting": len(up_entries) - up,
        "peers_down": len(node.registry) - len(up_entries),
        "send_waits": node.sending.waits,
        "send_waited_s": node.sending.waited_s,
        "pending_requests": requests.pending,
        "handlers_running": requests.inflight,
        "handler_timeouts": requests.handler_timeouts,
        "answers_dropped": requests.answers_dropped,
        "subscriptions": sum(1 for _ in subs),
        "unrouted_messages": subs.unrouted,
        "subscriptions_stalled": subs.stalled,
        "subscription_drops": subs.dropped,
        "readers_waited_s": subs.waited_s,
        "event_drops": node.event_drops,
        "broadcast_dropped": d.broadcast_dropped,
        "device_messages_lost": node.devices.lost_count,
        "device_publish_dropped": node.devices.publish_dropped,
        "serial_ports": node.bridge.port_rows(monotonic()) if node.bridge is not None else [],
        "peer_names": node.names.rows(monotonic()),
        "refused_connections": node.refusals.total,
        "dials_failed": d.dials.failed,
    }


async def peers_answer(node: NodeParts) -> bytes:
    """The answer to ``edgenode/peers`` (docs/protocol.md, "Built-in topics"):
    a CBOR array of ``[ip, node_id, state, direction, down_reason, rtt_us]``,
    the round-trip time in integer microseconds (the codec has no floats)."""
    return cbor_encode(
        [
            [
                p.ip,
                p.node_id,
                p.state,
                p.direction,
                p.down_reason,
                None if p.rtt_s is None else round(p.rtt_s * 1e6),
            ]
            for p in node.peers()
        ]
    )
