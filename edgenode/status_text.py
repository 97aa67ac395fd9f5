"""What ``edgenode status`` prints: a status response rendered as text.

The response is the control socket's (``edgenode.control_ops.node_status``,
also ``edgenode status --json``); this module only formats it, so it runs
in the command-line process and needs nothing of the node.
"""

from __future__ import annotations

from typing import Any

_COLUMNS = (
    "PEER",
    "NODE ID",
    "DEVICES",
    "DIRECTION",
    "STATE",
    "LIVE IN/OUT",
    "RTT MS",
    "HEARD",
    "BYTES IN",
    "BYTES OUT",
    "DROPS",
)


def format_status(response: dict[str, Any]) -> str:
    """Render a status response as text: node figures, then a table of peers."""
    node = response.get("node", {})
    peers = response.get("peers", [])
    lines = [
        f"node {node.get('node_id')}  (pid {node.get('pid')}, edgenode {node.get('version')})",
        f"  listening  {node.get('listen_host')}:{node.get('listen_port')}",
        f"  uptime     {_duration(node.get('uptime_s'))}",
        f"  loop lag   last {_ms(node.get('loop_lag_last_ms'))}, "
        f"avg {_ms(node.get('loop_lag_avg_ms'))}, max {_ms(node.get('loop_lag_max_ms'))}",
        f"  rss        {_size(node.get('rss_bytes'))}",
        f"  peers      {_by_state(node.get('peers_by_state') or {})}",
        *_delivery_lines(node),
        *_serial_lines(node.get("serial_ports")),
        *_uplink_lines(response.get("uplink")),
        *_refused(node.get("refusals")),
        *_unresolved(node.get("peer_names")),
        "",
    ]
    if not peers:
        lines.append("no peers")
        return "\n".join(lines)
    rows = [_COLUMNS]
    notes = []
    for peer in peers:
        up = peer.get("state") == "up"
        rows.append(
            (
                str(peer.get("ip")) + (f" ({peer['name']})" if peer.get("name") else ""),
                _short_id(peer.get("node_id")),
                ",".join(peer.get("devices") or ()) or "-",
                peer.get("direction") or "-",
                str(peer.get("state")),
                _liveness(peer) if up else "-",
                "-" if peer.get("rtt_s") is None else f"{peer['rtt_s'] * 1000:.1f}",
                "-"
                if peer.get("last_heard_s") is None
                else _duration(peer["last_heard_s"]) + " ago",
                _size(peer.get("bytes_in")),
                _size(peer.get("bytes_out")),
                str(peer.get("drops", 0)),
            )
        )
        if up and (peer.get("paused_s") is not None or peer.get("queued")):
            paused = peer.get("paused_s")
            held = f"; reading paused {paused:.1f} s by a full subscriber" if paused else ""
            queued = peer.get("queued", 0)
            frames = "frame" if queued == 1 else "frames"
            notes.append(f"{peer.get('ip')}: {queued} {frames} queued{held}")
        redial = peer.get("redial_in_s")
        if not up and (peer.get("down_reason") or redial is not None):
            note = f"{peer.get('ip')}: {peer.get('down_reason') or 'down'}"
            if redial is not None:
                note += f"; redial in {max(0.0, redial):.1f} s"
            notes.append(note)
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)


def _delivery_lines(node: dict[str, Any]) -> list[str]:
    """What the node did not deliver, or made wait (docs/architecture.md, Delivery)."""
    lines = [
        f"  sends      waited for room {node.get('send_waits', 0):,} times "
        f"({node.get('send_waited_s', 0.0):.1f} s in all); requests pending "
        f"{node.get('pending_requests', 0)}, handlers running {node.get('handlers_running', 0)}"
    ]
    undelivered = [  # key, what one is, what several are
        ("unrouted_messages", "unrouted (no subscriber)", "unrouted (no subscriber)"),
        (
            "subscriptions_stalled",
            "subscription ended for stalling",
            "subscriptions ended for stalling",
        ),
        ("subscription_drops", "dropped by drop-policy subscriptions", ""),
        ("broadcast_dropped", "broadcast skipped (peer full)", "broadcasts skipped (peer full)"),
        ("event_drops", "node event dropped", "node events dropped"),
        ("device_messages_lost", "device message lost", "device messages lost"),
        (
            "device_publish_dropped",
            "device publish skipped (peer full)",
            "device publishes skipped (peer full)",
        ),
        ("handler_timeouts", "handler timed out", "handlers timed out"),
        ("answers_dropped", "answer given up", "answers given up"),
    ]
    counts = [
        f"{node[key]:,} {one if node[key] == 1 else many or one}"
        for key, one, many in undelivered
        if node.get(key)
    ]
    lines.append(f"  not delivered  {'; '.join(counts) if counts else 'nothing'}")
    return lines


_PORT_COUNTS = ("frames_in", "frames_out", "dropped", "retransmits", "held_back", "queued")
_PORT_COUNTS += ("undelivered",)


def _serial_lines(ports: list[dict[str, Any]] | None) -> list[str]:
    """One or two lines per configured serial port (edgenode.bridge_ports, ``Port.row``)."""
    lines = []
    for i, port in enumerate(ports or ()):
        head = "  serial     " if i == 0 else "             "
        state = str(port.get("state"))
        where = f"{port.get('path')} at {port.get('baud')} baud"
        if state == "open":
            device = port.get("device")
            mode = "reliable" if port.get("reliable") else "unreliable"
            who = f"device {device} up ({mode})" if device else "no device answering"
            lines.append(f"{head}{where}: open for {_duration(port.get('for_s'))}, {who}")
            memory = port.get("out_of_memory", 0)
            reported = port.get("device_out_of_memory")
            if reported is not None:
                memory = f"{memory} here, {reported} on the device"
            count = {k: f"{port.get(k, 0):,}" for k in _PORT_COUNTS}
            lines.append(
                f"             frames {count['frames_in']} in, {count['frames_out']} out; "
                f"{count['dropped']} dropped, {count['retransmits']} resent, "
                f"{count['held_back']} held back; out of memory {memory}; "
                f"{count['queued']} queued, {count['undelivered']} undelivered"
            )
        else:
            line = f"{head}{where}: {state} for {_duration(port.get('for_s'))}"
            if port.get("attempts"):
                line += f" ({port['attempts']:,} tries)"
            if port.get("error"):
                line += f": {port['error']}"
            lines.append(line)
    return lines


def _uplink_lines(uplink: dict[str, Any] | None) -> list[str]:
    """The uplink's lines in ``edgenode status`` (edgenode.uplink's ``status()``)."""
    if not uplink:
        return []
    state = str(uplink.get("state"))
    if state == "connected":
        state += f" for {_duration(uplink.get('connected_for_s'))}"
    elif uplink.get("retry_in_s") is not None:
        state += f", retry in {_duration(uplink['retry_in_s'])}"
    lines = [f"  uplink     {state}  {uplink.get('broker')} as {uplink.get('client_id')}"]
    if uplink.get("last_error"):
        lines.append(
            f"             last error {_duration(uplink.get('last_error_age_s'))} ago: "
            f"{uplink['last_error']}"
        )
    lines.append(
        f"             queue {uplink.get('queue_messages')}/{uplink.get('queue_max_messages')} "
        f"msgs, {_size(uplink.get('queue_bytes'))}/{_size(uplink.get('queue_max_bytes'))} "
        f"({uplink.get('queue_policy')}: {uplink.get('dropped_oldest')} dropped, "
        f"{uplink.get('refused_new')} refused; {uplink.get('qos0_dropped_offline')} qos 0 "
        f"dropped offline)"
    )
    if uplink.get("spool_max_bytes"):
        spool = f"{_size(uplink.get('spool_bytes'))}/{_size(uplink['spool_max_bytes'])}"
        if uplink.get("spool_error"):
            spool = f"off: {uplink['spool_error']}"
        lines.append(f"             spool {spool}")
    lines.append(
        f"             out {uplink.get('published')} published, {uplink.get('rejected')} rejected, "
        f"{uplink.get('unmappable')} unmappable; in {uplink.get('received')} received, "
        f"{uplink.get('delivered')} delivered, {uplink.get('undeliverable')} undeliverable, "
        f"{uplink.get('unrouted')} unrouted"
    )
    return lines


def _refused(refusals: dict[str, Any] | None) -> list[str]:
    """The status lines about refused connections (exact counts; see edgenode.refusals)."""
    if not refusals:
        return []
    total = refusals.get("total", 0)
    if not total:
        return ["  refused    none"]
    top = ", ".join(f"{ip} ({count:,})" for ip, count in refusals.get("top_addresses", []))
    lines = [f"  refused    {total:,} connections, most from {top}"]
    reasons = sorted((refusals.get("by_reason") or {}).items(), key=lambda item: -item[1])
    for kind, count in reasons[:3]:
        lines.append(f"             {count:,} {kind}")
    if len(reasons) > 3:
        lines.append(f"             {sum(c for _, c in reasons[3:]):,} for other reasons")
    last = refusals.get("last")
    if last:
        age = _duration(last.get("age_s"))
        lines.append(f"  last       {age} ago, {last.get('ip')}: {last.get('reason')}")
    return lines


def _unresolved(names: list[dict[str, Any]] | None) -> list[str]:
    """Peers configured by a host name that does not resolve (yet): no row in the table."""
    lines = []
    for name in names or ():
        if name.get("ip") is None:
            retry = name.get("retry_in_s")
            when = "" if retry is None else f"; tried again in {max(0.0, retry):.1f} s"
            why = name.get("error") or "not resolved yet"
            head = "  unresolved " if not lines else "             "
            lines.append(f"{head}{name.get('host')}:{name.get('port')}: {why}{when}")
    return lines


def _liveness(peer: dict[str, Any]) -> str:
    """``in/out``: their frames arriving / our pings answered."""
    arriving = "ok" if peer.get("their_frames_arriving") else "no"
    answered = "ok" if peer.get("our_pings_answered") else "no"
    return f"{arriving}/{answered}"


def _short_id(node_id: str | None) -> str:
    if not node_id:
        return "-"
    groups = node_id.split("-")
    return f"{groups[0]}..{groups[-1]}" if len(groups) > 2 else node_id


def _by_state(counts: dict[str, int]) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover
