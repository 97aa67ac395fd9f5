"""The fleet figures of ``edgenode bench``: medians, spreads and targets of
the runs :mod:`edgenode.bench_fleet` makes, and their table."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench_fleet import (
    CPU_TARGET_PCT,
    DETECT_INTERVAL_S,
    DETECT_TIMEOUT_S,
    FLEET_PEERS,
    HOUSEKEEPING_PER_S,
    IDLE_WINDOW_S,
    IDLE_WINDOWS,
    KILL_TARGET_S,
    QUICK_IDLE_WINDOW_S,
    QUICK_PEERS,
    RSS_PER_PEER_TARGET_KB,
    RSS_STEPS,
    STOP_TARGET_FACTOR,
    WAKEUP_ALLOWANCE_PER_S,
    FleetNode,
    detection_runs,
    fleet_steps,
    idle_windows,
    memory_runs,
    prepare_fleet,
)


def _figure(
    unit: str, values: list[float], bound: float, note: str, *, strict: bool = False
) -> dict[str, Any]:
    """Median, spread and the target ``median <= bound`` (``<`` if ``strict``)."""
    median = statistics.median(values)
    met = median < bound if strict else median <= bound
    return {
        "unit": unit,
        "median": median,
        "min": min(values),
        "max": max(values),
        "runs": len(values),
        "values": values,
        "target": f"{'<' if strict else '<='} {bound:g} {unit}",
        "bound": bound,
        "target_met": met,
        # Positive: missed by this much; negative: met with this much to spare.
        "over_by": median - bound,
        "over_by_pct": 100 * (median - bound) / bound,
        "note": note,
    }


def fleet_figures(
    runs: int,
    quick: bool,
    peers: int | None = None,
    window_s: float | None = None,
) -> dict[str, Any]:
    """Memory per peer, idle CPU and wake-ups, and dead-peer detection (see the module doc)."""
    peers = peers if peers is not None else (QUICK_PEERS if quick else FLEET_PEERS)
    window_s = (
        window_s if window_s is not None else (QUICK_IDLE_WINDOW_S if quick else IDLE_WINDOW_S)
    )
    windows = 2 if quick else IDLE_WINDOWS
    runs = 1 if quick else runs
    if peers < RSS_STEPS:
        raise ValueError(f"peers: expected at least {RSS_STEPS}, got {peers}")
    idle: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgenode-bench-") as name:
        tmp = Path(name)
        ids, config = prepare_fleet(tmp, peers)
        interval, jitter = config.keepalive_interval_s, config.keepalive_jitter

        def measure_idle(fleet: FleetNode) -> None:
            time.sleep(0.2 if quick else 1.0)  # past the handshakes' tail
            idle["answering"] = idle_windows(fleet, windows, window_s / windows)
            assert fleet.loadgen is not None
            fleet.loadgen.ask({"op": "ping", "interval_s": interval, "jitter": jitter})
            time.sleep(min(interval, window_s / 2))  # into the peers' first ping cycle
            idle["pinging"] = idle_windows(fleet, windows, window_s / windows)
            idle["loadgen"] = fleet.loadgen.ask({"op": "state"})

        started = time.monotonic()
        memory = memory_runs(tmp, ids, peers, runs, 0.1 if quick else 0.3, measure_idle)
        memory_s = time.monotonic() - started
        started = time.monotonic()
        detect = detection_runs(tmp, runs, DETECT_INTERVAL_S, DETECT_TIMEOUT_S)
        detect_s = time.monotonic() - started

    slots = interval * (1 - jitter / 2)  # the mean time between two pings of one link
    wake_bound = peers / interval + WAKEUP_ALLOWANCE_PER_S
    representative = window_s / windows >= interval
    rss = _figure(
        "KB",
        [run["slope_kb"] for run in memory],
        RSS_PER_PEER_TARGET_KB,
        f"VmRSS slope, least squares over {fleet_steps(peers)} peers, one fresh node per run",
    )
    for key in ("after_first_step", "before_status"):
        rss[key] = statistics.median(run[f"slope_kb_{key}"] for run in memory)
    figures: dict[str, Any] = {"rss_per_peer_kb": rss}
    for kind, per_ping, who in (
        ("answering", 2, "peers only answer the node's pings"),
        ("pinging", 3, "peers also ping the node each interval, as nodes do"),
    ):
        windows_seen = idle[kind]
        events = statistics.median(w["events_per_s"] for w in windows_seen)
        cpu = _figure(
            "%",
            [w["cpu_pct"] for w in windows_seen],
            CPU_TARGET_PCT,
            f"{peers} idle peers, {who}; % of one core, user + system",
            strict=True,
        )
        cpu["user_pct"] = statistics.median(w["cpu_user_pct"] for w in windows_seen)
        cpu["system_pct"] = statistics.median(w["cpu_system_pct"] for w in windows_seen)
        # CPU per event the dispatcher handled (a pong, or a peer's ping).
        cpu["us_per_event"] = cpu["median"] * 1e4 / events if events else None
        wake = _figure(
            "/s",
            [w["wakeups_per_s"] for w in windows_seen],
            wake_bound,
            f"{peers} idle peers, {who}; bound = peers / interval + {WAKEUP_ALLOWANCE_PER_S:g}",
        )
        # What the loop's design predicts: one wake-up per ping timer, one
        # per pong (and one per peer's ping), unless some coincide.
        wake["expected"] = per_ping * peers / slots + HOUSEKEEPING_PER_S
        wake["expected_note"] = (
            f"{per_ping} x peers / mean ping interval ({slots:g} s) + 1/30 (housekeeping)"
        )
        wake["events_per_s"] = events
        for fig in (cpu, wake):
            if not representative:
                fig["target_met"] = None  # a part of a ping cycle: not a figure to judge
        figures[f"idle_cpu_pct_{kind}"] = cpu
        figures[f"wakeups_per_s_{kind}"] = wake
    figures["detect_kill_s"] = _figure(
        "s",
        detect["kill"],
        KILL_TARGET_S,
        "SIGKILL of an `edgenode run` peer to the observer's PeerDown",
        strict=True,
    )
    figures["detect_stop_s"] = _figure(
        "s",
        detect["stop"],
        DETECT_TIMEOUT_S * STOP_TARGET_FACTOR,
        f"SIGSTOP of the peer to PeerDown; keepalive {DETECT_INTERVAL_S:g} s / "
        f"timeout {DETECT_TIMEOUT_S:g} s, bound = timeout + 10 %",
    )
    figures["detect_stop_s"]["timeout_s"] = DETECT_TIMEOUT_S
    figures["detect_stop_s"]["of_timeout"] = figures["detect_stop_s"]["median"] / DETECT_TIMEOUT_S
    return {
        "peers": peers,
        "runs": runs,
        "keepalive": {
            "interval_s": interval,
            "timeout_s": config.keepalive_timeout_s,
            "jitter": jitter,
        },
        "detect_keepalive": {"interval_s": DETECT_INTERVAL_S, "timeout_s": DETECT_TIMEOUT_S},
        "idle_window_s": window_s,
        "idle_windows": windows,
        # A window shorter than the keepalive interval sees a part of a ping
        # cycle: its CPU and wake-up figures are not representative (--quick).
        "idle_representative": representative,
        "memory_runs": memory,
        "idle": idle,
        "detect_reasons": detect["reasons"],
        "detect_phase_s": detect["phase"],
        "elapsed_s": {"memory_and_idle": memory_s, "detection": detect_s},
        "figures": figures,
    }


def print_fleet_table(fleet: dict[str, Any]) -> None:
    ka = fleet["keepalive"]
    print(
        f"fleet: an `edgenode run` node and {fleet['peers']} load-generator peers "
        f"(own process, own identities and loopback IPs), mutual TLS 1.3; "
        f"median of {fleet['runs']} runs (spread min..max)"
    )
    print(
        f"  idle figures: default keepalive {ka['interval_s']:g} s / {ka['timeout_s']:g} s, "
        f"jitter {ka['jitter']:g}; {fleet['idle_windows']} windows over "
        f"{fleet['idle_window_s']:g} s per peer behaviour"
    )
    if not fleet["idle_representative"]:
        print(
            "  (idle windows shorter than the keepalive interval: the idle cpu and wake-up "
            "figures are not representative)"
        )
    print(f"  {'figure':<24} {'median':>9} {'spread':>17} {'expected':>9}  target")
    for name, fig in fleet["figures"].items():
        digits = 3 if fig["unit"] in ("s", "%") else 1
        spread = f"{fig['min']:.{digits}f}..{fig['max']:.{digits}f}"
        expected = f"{fig['expected']:.1f}" if "expected" in fig else ""
        if fig["target_met"] is None:
            verdict = "not judged (window shorter than the keepalive interval)"
        elif fig["target_met"]:
            verdict = f"met ({-fig['over_by']:.{digits}f} {fig['unit']} to spare)"
        else:
            verdict = (
                f"MISSED by {fig['over_by']:.{digits}f} {fig['unit']} ({fig['over_by_pct']:+.0f} %)"
            )
        print(
            f"  {name:<24} {fig['median']:>9.{digits}f} {spread:>17} {expected:>9}  "
            f"{fig['target']}: {verdict}"
        )
    print(
        "  units: rss KB (KiB) per peer; cpu % of one core; wake-ups of the dispatcher /s; detect s"
    )
    figs, dk = fleet["figures"], fleet["detect_keepalive"]
    rss = figs["rss_per_peer_kb"]
    print(
        f"  - rss: {rss['note']}; slope above the first step {rss['after_first_step']:.1f} KB, "
        f"from RSS read before each step's status {rss['before_status']:.1f} KB"
    )
    for kind in ("answering", "pinging"):
        cpu, wake = figs[f"idle_cpu_pct_{kind}"], figs[f"wakeups_per_s_{kind}"]
        per_event = "-" if cpu["us_per_event"] is None else f"{cpu['us_per_event']:.0f}"
        print(
            f"  - {kind}: {wake['note'].partition('; ')[0].partition(', ')[2]}; "
            f"cpu user {cpu['user_pct']:.2f} % + system {cpu['system_pct']:.2f} %, "
            f"{wake['events_per_s']:.1f} events/s, {per_event} us of cpu per event; "
            f"expected wake-ups: {wake['expected_note']}"
        )
    if rss["target_met"] is False:
        print(
            "  - rss per peer missed: about 40 KB a TLS connection is native (OpenSSL's SSL "
            "object, buffers, one pinned SSL_CTX per peer) and about 20 KB Python objects "
            "(docs/performance.md, 'Why the missed targets are missed')"
        )
    stop = figs["detect_stop_s"]
    print(
        f"  - detect: observer keepalive {dk['interval_s']:g} s / timeout {dk['timeout_s']:g} s; "
        f"a stopped peer noticed after {stop['of_timeout']:.2f} x the timeout (median)"
    )
