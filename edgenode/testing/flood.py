"""Floods and slow clients against a node, and what they cost its connected peer.

An attacker on the site network needs no key to make a node work: it can
open TCP connections and close them, open them and say nothing (or stop
inside the preamble), send a valid-looking preamble (certificates are
public) and leave TLS half done, send a preamble announcing an oversized
certificate, cycle forged certificates that carry an authorised node's
public key, or do any of it from many addresses at once. A peer that holds
an authorised key can also send an oversized hello. This module does each
of these (:data:`KINDS`), bounded in count, concurrency and time, against
loopback addresses only, and reports how the node answered each connection.

As a library (:mod:`edgenode.testing.flood_attack`; ``tests/test_floods.py``)::

    result = await run_flood("stall-mid-tls", "127.0.0.2", port, source_ips=["127.0.0.50"],
                             count=1000, concurrency=50, hold_s=3.0, cert_der=cert)

As a tool, it starts a node (127.0.0.2) and a connected peer (127.0.0.3),
each in its own process, measures the peer's request round-trip time when
quiet (median and p99 of N requests), then during each kind of flood from
a third process (this one), and prints the ratio to the quiet value (the
target is 2x) with the node's RSS and open file descriptors::

    python -m edgenode.testing.flood [--count 1000] [--json]

A remote attacker would not compete with the node for CPU; one on the same
machine does. So, given two CPUs or more, the attacker runs on CPUs of its
own (:func:`cpu_plan`; ``--no-pin`` turns this off). Figures from a busy
machine are noisy: compare medians of several runs.

``--target HOST:PORT --peer-state-dir DIR`` floods a node that is already
running instead (its authorised list must hold the peer's node ID; pass
``--target-pid`` for its RSS and descriptors).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from ..errors import EdgeNodeError
from .flood_attack import KINDS, MAX_CONCURRENCY, MAX_COUNT, FloodError, run_flood
from .flood_children import Child, child_node, child_peer
from .procfs import CpuMeter, cpu_seconds, process_figures

#: The most a flood may slow the peer's round trip (median), as a ratio to quiet.
RTT_TARGET_RATIO = 2.0


def cpu_plan(pin: bool) -> dict[str, list[int]]:
    """Which CPUs the node, its peer and the attacker run on (empty: anywhere).

    A remote attacker would not compete with the node, or with the peer
    measuring round trips, for CPU; one on the same machine does. So the
    attacker gets CPUs of its own: with two, the node and its peer share
    the first (as they do when quiet) and the attacker has the second.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = []
    if not pin or len(cpus) < 2:
        return {"node": [], "peer": [], "attacker": []}
    if len(cpus) == 2:
        return {"node": cpus[:1], "peer": cpus[:1], "attacker": cpus[1:]}
    return {"node": cpus[:1], "peer": cpus[1:2], "attacker": cpus[2:]}


def _ratio(value: float | None, quiet: float | None) -> float | None:
    if value is None or not quiet:
        return None
    return round(value / quiet, 2)


async def _tool(args: argparse.Namespace) -> dict[str, Any]:
    from ..identity import create_identity, load_identity

    work = Path(tempfile.mkdtemp(prefix="edgenode-flood-"))
    cpus = cpu_plan(args.pin)
    own_cpus = os.sched_getaffinity(0) if cpus["attacker"] else None
    node: Child | None = None
    peer: Child | None = None
    try:
        probe = "echo"
        if args.target is None:
            attacker = create_identity(work / "attacker")
            a, b = create_identity(work / "a"), create_identity(work / "b")
            authorised = [a.node_id, b.node_id, attacker.node_id]
            node_config = {
                "handshake_timeout_s": args.handshake_timeout,
                "max_handshakes_per_ip": args.max_handshakes_per_ip,
            }
            if args.max_handshakes is not None:
                node_config["max_handshakes"] = args.max_handshakes
            node = await Child.start(
                "node",
                {
                    "state_dir": str(a.state_dir),
                    "host": "127.0.0.2",
                    "authorised": authorised,
                    "log_file": str(work / "node.log"),
                    "log_level": args.node_log_level,
                    "config": node_config,
                    "cpus": cpus["node"],
                },
            )
            hello = await node.read()
            target = ("127.0.0.2", int(hello["port"]))
            target_pid: int | None = node.process.pid
            peer_state = b.state_dir
            peer_cert = b.cert_der
            peer_authorised = [hello["node_id"]]
        else:
            target = args.target
            target_pid = args.target_pid
            peer_identity = load_identity(args.peer_state_dir)
            peer_state, peer_cert = peer_identity.state_dir, peer_identity.cert_der
            attacker = peer_identity  # the one identity the target is known to authorise
            peer_authorised = [args.target_node_id] if args.target_node_id else []
            if not peer_authorised:
                raise FloodError("--target needs --target-node-id, the node's id")
            probe = "edgenode/peers"  # every node answers it
        peer = await Child.start(
            "peer",
            {
                "state_dir": str(peer_state),
                "host": args.peer_host,
                "authorised": peer_authorised,
                "target": list(target),
                "topic": probe,
                "cpus": cpus["peer"],
            },
        )
        await peer.read()
        if own_cpus is not None:
            os.sched_setaffinity(0, cpus["attacker"])
        report: dict[str, Any] = {
            "target": f"{target[0]}:{target[1]}",
            "count": args.count,
            "concurrency": args.concurrency,
            "rtt_target_ratio": RTT_TARGET_RATIO,
            "cpus": cpus if args.target is None else {**cpus, "node": "not managed"},
        }
        await peer.ask({"cmd": "rtt", "n": 50})  # warm up
        quiet = await peer.ask({"cmd": "rtt", "n": args.rtt_samples})
        report["quiet"] = quiet
        report["node_before"] = process_figures(target_pid) if target_pid else {}
        floods = []
        for kind in args.kinds:
            sources = [args.attacker_ip]
            count = args.count
            concurrency = args.concurrency
            if kind == "many-ips-mid-tls":
                sources = [f"127.0.{100 + i // 250}.{1 + i % 250}" for i in range(args.many_ips)]
                # Each address up to its per-IP cap at once: the global cap binds.
                concurrency = min(MAX_CONCURRENCY, max(concurrency, 4 * args.many_ips))
            if kind == "oversized-hello":
                count = min(count, args.tls_count)
            # A quiet baseline just before each flood: a shared machine's
            # load drifts over a run, and the ratio should not.
            quiet_cpu = CpuMeter(target_pid)
            before = await peer.ask({"cmd": "rtt", "n": args.baseline_samples})
            quiet_cpu.stop()
            flood_cpu = CpuMeter(target_pid)
            await peer.ask({"cmd": "start"})
            flood = functools.partial(
                run_flood,
                kind,
                target[0],
                target[1],
                source_ips=sources,
                count=count,
                concurrency=concurrency,
                hold_s=args.hold,
                cert_der=peer_cert,
                identity=attacker,
                limit_s=args.limit,
            )
            result = await flood()
            during = await peer.ask({"cmd": "stop"})
            flood_cpu.stop()
            row = result.as_dict()
            row["quiet_before"] = before
            row["rtt"] = during
            row["rtt_median_ratio"] = _ratio(during["median_ms"], before["median_ms"])
            row["rtt_p99_ratio"] = _ratio(during["p99_ms"], before["p99_ms"])
            row["node"] = process_figures(target_pid) if target_pid else {}
            # The node's CPU use while answering the peer's back-to-back
            # requests, quiet and during the flood.
            row["node_cpu_quiet_pct"] = quiet_cpu.percent
            row["node_cpu_flood_pct"] = flood_cpu.percent
            if args.cpu_pass and target_pid:
                # The same flood again with the peer idle: the node's CPU time
                # is then the flood's alone (to the 10 ms tick).
                cpu_start = cpu_seconds(target_pid)
                await flood()
                cpu_end = cpu_seconds(target_pid)
                if cpu_start is not None and cpu_end is not None:
                    row["node_cpu_ms_per_1000"] = round((cpu_end - cpu_start) * 1e6 / count)
            floods.append(row)
        report["floods"] = floods
        report["after"] = await peer.ask({"cmd": "rtt", "n": args.rtt_samples})
        if target_pid:
            baseline = report["node_before"].get("fds")
            with anyio.move_on_after(args.hold):
                while process_figures(target_pid)["fds"] != baseline:
                    await anyio.sleep(0.05)
            report["node_after"] = process_figures(target_pid)
        if node is not None:
            stats = await node.ask({"cmd": "stats"})
            report["refused"] = stats["refused"]
            report["node_log_lines"] = stats["log_lines"]
            report["node_stats"] = stats["stats"]
        return report
    finally:
        if own_cpus is not None:
            os.sched_setaffinity(0, own_cpus)
        for child in (peer, node):
            if child is not None:
                await child.aclose()
        shutil.rmtree(work, ignore_errors=True)


def _format(report: dict[str, Any]) -> str:
    quiet = report["quiet"]
    lines = [
        f"target {report['target']}: {report['count']} connections per flood, "
        f"{report['concurrency']} at once; cpus {report['cpus'] or 'not pinned'}",
        f"quiet rtt: median {quiet['median_ms']} ms, p99 {quiet['p99_ms']} ms "
        f"({quiet['n']} requests)",
        "",
        "rtt: the peer's requests, quiet just before the flood -> during it (median, p99 ms);",
        "reset/closed: connections the node reset at once / closed (max s after our last byte);",
        "cpu: the node's CPU time per 1000 flood connections (the flood again, peer idle)",
        "",
        f"{'flood':<20} {'reset':>5} {'closed':>6} {'max s':>6} {'open':>4} "
        f"{'rtt median':>15} {'x':>5} {'rtt p99':>15} {'x':>5} "
        f"{'cpu ms':>6} {'rss MB':>6} {'fds':>3}",
    ]
    for row in report["floods"]:
        rtt, before, node = row["rtt"], row["quiet_before"], row["node"]
        flag = ""
        if row["rtt_median_ratio"] is not None and row["rtt_median_ratio"] > RTT_TARGET_RATIO:
            flag = "  over target"
        if rtt.get("errors"):
            flag += f"  {len(rtt['errors'])}+ request errors: {rtt['errors'][0]}"
        median = f"{before['median_ms']}->{rtt['median_ms']}"
        p99 = f"{before['p99_ms']}->{rtt['p99_ms']}"
        lines.append(
            f"{row['kind']:<20} {row['refused_at_connect']:>5} {row['closed_by_node']:>6} "
            f"{row['close_delay_max_s'] or 0:>6.2f} {row['still_open']:>4} "
            f"{median:>15} {row['rtt_median_ratio']!s:>5} {p99:>15} {row['rtt_p99_ratio']!s:>5} "
            f"{row.get('node_cpu_ms_per_1000', '-')!s:>6} "
            f"{node.get('rss_mb')!s:>6} {node.get('fds')!s:>3}{flag}"
        )
    after = report["after"]
    lines.append("")
    lines.append(f"after: rtt median {after['median_ms']} ms, p99 {after['p99_ms']} ms")
    before, end = report.get("node_before", {}), report.get("node_after", {})
    if before:
        lines.append(
            f"node: rss {before['rss_mb']} -> {end.get('rss_mb')} MB "
            f"(peak {end.get('peak_rss_mb')} MB), fds {before['fds']} -> {end.get('fds')}"
        )
    if "refused" in report:
        lines.append(f"node log lines: {report['node_log_lines']}; refusals by kind:")
        for key, n in sorted(report["refused"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n:>6}  {key}")
    return "\n".join(lines)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgenode.testing.flood``: flood a node, report its peer's round trips."""
    parser = argparse.ArgumentParser(
        prog="python -m edgenode.testing.flood",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=1000, help="connections per flood")
    parser.add_argument("--concurrency", type=int, default=50, help="connections at once")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--rtt-samples", type=int, default=300, help="quiet requests")
    parser.add_argument(
        "--baseline-samples", type=int, default=200, help="quiet requests before each flood"
    )
    parser.add_argument(
        "--no-cpu-pass",
        dest="cpu_pass",
        action="store_false",
        help="do not repeat each flood with the peer idle to time the node's CPU",
    )
    parser.add_argument("--handshake-timeout", type=float, default=1.0, help="node's, s")
    parser.add_argument("--max-handshakes-per-ip", type=int, default=4)
    parser.add_argument("--max-handshakes", type=int, default=None, help="node's global cap")
    parser.add_argument(
        "--tls-count",
        type=int,
        default=200,
        help="connections for oversized-hello (each a full TLS handshake)",
    )
    parser.add_argument("--many-ips", type=int, default=64, help="sources for many-ips-mid-tls")
    parser.add_argument(
        "--hold",
        type=float,
        default=5.0,
        help="how long a connection waits for the node to close it, s",
    )
    parser.add_argument("--limit", type=float, default=120.0, help="longest flood, s")
    parser.add_argument(
        "--node-log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--attacker-ip", default="127.0.0.50")
    parser.add_argument("--peer-host", default="127.0.0.3")
    parser.add_argument("--target", type=_address, help="flood this running node instead")
    parser.add_argument("--target-node-id", help="its node id (with --target)")
    parser.add_argument("--target-pid", type=int, help="its process id, for RSS and fds")
    parser.add_argument("--peer-state-dir", type=Path, help="an identity it authorises")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the node, its peer and the attacker to CPUs",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--child", choices=["node", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        runner = child_node if args.child == "node" else child_peer
        anyio.run(runner, json.loads(args.spec))
        return 0
    if not 1 <= args.count <= MAX_COUNT:
        parser.error(f"--count: expected 1..{MAX_COUNT}")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency: expected 1..{MAX_CONCURRENCY}")
    if args.hold <= args.handshake_timeout:
        parser.error("--hold: expected more than --handshake-timeout")
    if args.target is not None and args.peer_state_dir is None:
        parser.error("--target needs --peer-state-dir")
    try:
        report = anyio.run(_tool, args)
    except (FloodError, EdgeNodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else _format(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
