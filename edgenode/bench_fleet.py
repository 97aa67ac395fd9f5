"""Fleet figures of ``edgenode bench``: a node with many peers, and dead-peer detection.

Every side runs in its own process, over real mutual TLS 1.3 on loopback:

*Memory per peer.* A real ``edgenode run`` process (default settings, but
``peers.max`` raised to hold the fleet) listens on 127.0.0.2. A load
generator process (``python -m edgenode.bench_fleet loadgen``, built on
:mod:`edgenode.loadgen`: one identity and one loopback source address per
peer) connects peers in steps (0, 50, 100, 150, 200). After each step the
bench waits until the node's own status (its control socket) reports them
all up, then reads the node's ``VmRSS`` from ``/proc``. The per-peer
figure is the slope of a least-squares fit of RSS against peers, one slope
per run (a fresh node each run); the figure is their median and spread.

*Idle CPU and loop wake-ups.* The last run's node, its peers connected and
idle at the default keepalive, is measured over equal windows: CPU from
``/proc/PID/stat`` (utime + stime), wake-ups of the dispatcher from the
``wakeups`` counter of its status, per second of the node's own uptime. Twice:
with peers that only answer the node's pings (the load generator's
default), then with peers that also ping the node every interval, as real
nodes do (both ends ping).

*Dead-peer detection.* An observer node (``python -m edgenode.bench_fleet
observer``, one :class:`~edgenode.node.Node` in its own process) listens on
127.0.0.5; a real ``edgenode run`` process on 127.0.0.6 dials it. Once the
observer's ``PeerUp`` event has arrived, the bench sends the peer SIGKILL
(the kernel closes its sockets) or SIGSTOP (it falls silent, its sockets
open), and notes ``time.monotonic()``. The observer prints the
``time.monotonic()`` at which its ``PeerDown`` event arrives (the same
system-wide clock), and the difference is the time to notice.

Workers print one JSON object per line on stdout; each wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .testing.procfs import read_cpu_seconds, read_rss_bytes

FLEET_HOST = "127.0.0.2"
OBSERVER_HOST = "127.0.0.5"
DETECT_PEER_HOST = "127.0.0.6"

#: Peers connected at the end of each memory run, and in the idle figures.
FLEET_PEERS = 200
QUICK_PEERS = 20
#: Connection steps per memory run (0 included): 0, 50, 100, 150, 200.
RSS_STEPS = 4
#: Seconds of CPU and wake-up measurement per peer behaviour, in equal windows.
IDLE_WINDOW_S = 30.0
QUICK_IDLE_WINDOW_S = 0.5
IDLE_WINDOWS = 3
#: The short keepalive the detection runs use, so that a silent peer is seen quickly.
DETECT_INTERVAL_S = 0.5
DETECT_TIMEOUT_S = 1.5
#: Targets (issue 5).
RSS_PER_PEER_TARGET_KB = 32.0
CPU_TARGET_PCT = 1.0
#: Wake-ups a node may add to peers / interval; its own housekeeping is one per 30 s.
WAKEUP_ALLOWANCE_PER_S = 1.0
KILL_TARGET_S = 1.0
STOP_TARGET_FACTOR = 1.10
#: The node's housekeeping timer (``node._HOUSEKEEPING_S``): one wake-up per 30 s.
HOUSEKEEPING_PER_S = 1 / 30

LINE_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 60.0


def _print(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- processes ---------------------------------------------------------------------------


class Worker:
    """A child process we started: JSON lines out (and in), stderr to a file."""

    def __init__(self, argv: list[str], log: Path, *, stdin: bool = False) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def line(self, timeout_s: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        """The next JSON line the worker prints; raises RuntimeError past ``timeout_s``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self._name()}: no answer within {timeout_s} s\n{self.tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    self.proc.wait(timeout=5)
                    raise RuntimeError(
                        f"{self._name()} exited {self.proc.returncode}:\n{self.tail()}"
                    )
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self.proc.stdin.flush()

    def ask(self, obj: dict[str, Any], timeout_s: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        self.send(obj)
        return self.line(timeout_s)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the worker: close its stdin, signal it, wait (then kill) and reap it."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def _name(self) -> str:
        return " ".join(self.proc.args[2:4])  # type: ignore[index]


def _edgenode_run(state: Path, config: Path, listen: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edgenode",
        "run",
        "--state-dir",
        str(state),
        "--config",
        str(config),
        "--listen",
        listen,
        "--log-level",
        "warning",
        *extra,
    ]


def _fleet_worker(role: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "edgenode.bench_fleet", role, *args]


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    return read_rss_bytes(pid) // 1024


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


class FleetNode:
    """An ``edgenode run`` process on FLEET_HOST and a load generator process for it."""

    def __init__(self, tmp: Path, identities: Path, run: int) -> None:
        from .identity import CERT_FILENAME, KEY_FILENAME

        self.state = tmp / f"fleet-node-{run}"
        self.state.mkdir(mode=0o700)
        for name in (KEY_FILENAME, CERT_FILENAME, "authorised_nodes"):
            shutil.copy2(tmp / "fleet-node" / name, self.state / name)
        self.socket = self.state / "control.sock"
        self.node = Worker(
            _edgenode_run(self.state, tmp / "fleet.toml", f"{FLEET_HOST}:0"),
            self.state / "node.log",
        )
        self.loadgen: Worker | None = None
        try:
            status = self.wait_up(0)
            port = status["node"]["listen_port"]
            self.loadgen = Worker(
                _fleet_worker(
                    "loadgen", FLEET_HOST, str(port), status["node"]["node_id"], str(identities)
                ),
                self.state / "loadgen.log",
                stdin=True,
            )
            self.loadgen.line()  # ready
        except BaseException:
            self.stop()
            raise
        self.peers = 0

    def status(self) -> dict[str, Any] | None:
        from .control_client import ControlError, control_request

        if not self.socket.exists():
            return None
        try:
            response = control_request(self.socket, {"op": "status"}, timeout_s=10.0)
        except ControlError:
            return None
        return response if response.get("ok") else None

    def wait_up(self, peers: int, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        """Poll the node's status until it reports exactly ``peers`` peers up."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            if self.node.proc.poll() is not None:
                raise RuntimeError(f"node exited {self.node.proc.returncode}:\n{self.node.tail()}")
            last = self.status()
            # The control socket answers before the node listens (listen_port 0 then).
            if (
                last is not None
                and last["node"]["listen_port"]
                and last["node"]["peers_up"] == peers
            ):
                return last
            if time.monotonic() > deadline:
                got = None if last is None else last["node"]["peers_up"]
                raise RuntimeError(f"node reported {got} peers up, expected {peers}")
            time.sleep(0.05)

    def connect(self, count: int) -> None:
        """Connect ``count`` more peers (their hello exchanges done, as the peers see it)."""
        assert self.loadgen is not None
        if count:
            answer = self.loadgen.ask({"op": "connect", "count": count}, CONNECT_TIMEOUT_S + 10)
            if answer["up"] != self.peers + count:
                raise RuntimeError(f"load generator: {answer}")
            self.peers += count

    def stop(self) -> None:
        if self.loadgen is not None:
            self.loadgen.stop()
        self.node.stop()


def prepare_fleet(tmp: Path, peers: int) -> tuple[Path, Any]:
    """Identities for the fleet node and its peers; the node's config file."""
    from .identity import create_identity
    from .loadgen import load_identities, write_authorised
    from .settings import resolve

    ids = tmp / "loadgen-ids"
    identities = load_identities(ids, peers)
    create_identity(tmp / "fleet-node")
    write_authorised(tmp / "fleet-node" / "authorised_nodes", identities)
    config = tmp / "fleet.toml"
    # Defaults everywhere (keepalive included) but the registry's cap.
    config.write_text(f"[peers]\nmax = {max(64, peers)}\nremember = false\n")
    return ids, resolve(config_file=config).config


def fleet_steps(peers: int) -> list[int]:
    return sorted({round(peers * i / RSS_STEPS) for i in range(RSS_STEPS + 1)})


def memory_runs(
    tmp: Path, ids: Path, peers: int, runs: int, settle_s: float, idle: Any = None
) -> list[dict[str, Any]]:
    """Per run: RSS at each step and its slope. ``idle(fleet)`` runs on the last run's node."""
    results = []
    steps = fleet_steps(peers)
    for run in range(runs):
        fleet = FleetNode(tmp, ids, run)
        try:
            points, unconfirmed = [], []
            for target in steps:
                fleet.connect(target - fleet.peers)
                time.sleep(settle_s)
                unconfirmed.append((target, rss_kb(fleet.node.pid)))
                fleet.wait_up(target)  # the node's own status says they are up
                points.append((target, rss_kb(fleet.node.pid)))
            xs, ys = [float(p) for p, _ in points], [float(r) for _, r in points]
            results.append(
                {
                    "points": points,
                    "slope_kb": slope(xs, ys),
                    # The first peers partly reuse heap that start-up left free.
                    "slope_kb_after_first_step": slope(xs[1:], ys[1:]),
                    # RSS read before the status requests that confirm the step:
                    # a status of N peers allocates a response of N rows.
                    "points_before_status": unconfirmed,
                    "slope_kb_before_status": slope(xs, [float(r) for _, r in unconfirmed]),
                }
            )
            if idle is not None and run == runs - 1:
                idle(fleet)
        finally:
            fleet.stop()
    return results


def idle_windows(fleet: FleetNode, windows: int, window_s: float) -> list[dict[str, float]]:
    """CPU % of one core and dispatcher wake-ups/s over ``windows`` windows of ``window_s``.

    The status requests fall between the CPU windows, not in them (a status
    of 200 peers is a few milliseconds of the node's CPU).
    """
    pid = fleet.node.pid
    before = fleet.wait_up(fleet.peers)
    cpu0, t0 = read_cpu_seconds(pid), time.monotonic()
    figures = []
    for _ in range(windows):
        time.sleep(window_s)
        cpu1, t1 = read_cpu_seconds(pid), time.monotonic()
        after = fleet.wait_up(fleet.peers)  # every peer still up
        uptime = after["node"]["uptime_s"] - before["node"]["uptime_s"]
        user, system = (100 * (b - a) / (t1 - t0) for a, b in zip(cpu0, cpu1))
        figures.append(
            {
                "cpu_pct": user + system,
                "cpu_user_pct": user,
                "cpu_system_pct": system,
                "wakeups_per_s": (after["node"]["wakeups"] - before["node"]["wakeups"]) / uptime,
                "events_per_s": (after["node"]["events_handled"] - before["node"]["events_handled"])
                / uptime,
            }
        )
        before = after
        cpu0, t0 = read_cpu_seconds(pid), time.monotonic()
    return figures


def detection_runs(tmp: Path, runs: int, interval_s: float, timeout_s: float) -> dict[str, Any]:
    """Seconds from SIGKILL / SIGSTOP of a peer to the observer's PeerDown event."""
    from .identity import CERT_FILENAME, KEY_FILENAME, create_identity

    observer_dir, peer_dir = tmp / "observer", tmp / "detect-peer"
    observer_id = create_identity(observer_dir).node_id
    peer_id = create_identity(peer_dir).node_id
    config = tmp / "detect.toml"
    config.write_text("[peers]\nremember = false\nlearn = false\n")
    observer = Worker(
        _fleet_worker(
            "observer",
            str(observer_dir),
            peer_id,
            OBSERVER_HOST,
            str(interval_s),
            str(timeout_s),
        ),
        tmp / "observer.log",
    )
    found: dict[str, Any] = {
        "kill": [],
        "stop": [],
        "reasons": {"kill": [], "stop": []},
        # Seconds from the observer's PeerUp to the signal.
        "phase": {"kill": [], "stop": []},
    }
    try:
        port = observer.line()["port"]
        for run in range(runs):
            for kind, sig in (("kill", signal.SIGKILL), ("stop", signal.SIGSTOP)):
                state = tmp / f"detect-peer-{kind}-{run}"
                state.mkdir(mode=0o700)
                for name in (KEY_FILENAME, CERT_FILENAME):
                    shutil.copy2(peer_dir / name, state / name)
                peer = Worker(
                    _edgenode_run(
                        state,
                        config,
                        f"{DETECT_PEER_HOST}:0",
                        "--peer",
                        f"{OBSERVER_HOST}:{port}",
                        "--authorise",
                        observer_id,
                        "--keepalive-interval",
                        str(interval_s),
                        "--keepalive-timeout",
                        str(timeout_s),
                    ),
                    state / "node.log",
                )
                try:
                    event = observer.line()
                    if event["event"] != "up":
                        raise RuntimeError(f"observer: expected the peer up, got {event}")
                    # At a random phase of the keepalive cycle.
                    # Past the first cycle (until then the last frame heard is the
                    # hello), at a random phase of the steady cycle.
                    time.sleep(interval_s * (1.0 + random.random()))
                    signalled = time.monotonic()
                    found["phase"][kind].append(signalled - event["t"])
                    os.kill(peer.pid, sig)
                    event = observer.line(timeout_s * 3 + 10)
                    if event["event"] != "down" or event["t"] < signalled:
                        raise RuntimeError(f"observer: peer went down before the signal: {event}")
                    found[kind].append(event["t"] - signalled)
                    found["reasons"][kind].append(event["reason"])
                finally:
                    peer.stop(signal.SIGKILL)  # SIGKILL ends a stopped process too
    finally:
        observer.stop()
    return found


# -- workers -----------------------------------------------------------------------------


async def loadgen_worker(host: str, port: int, node_id: str, ids: Path) -> None:
    """Hold peers for the bench: JSON commands on stdin, one JSON answer line each."""
    import anyio

    from .loadgen import LoadGen, load_identities

    count = sum(1 for p in ids.iterdir() if p.name.startswith("peer-"))
    identities = load_identities(ids, count)
    async with LoadGen(identities, host, port, node_id=node_id, concurrency=32) as gen:
        _print({"ready": count})
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                break
            command = json.loads(line)
            op = command["op"]
            if op == "connect":
                up = await gen.connect(int(command["count"]), timeout_s=CONNECT_TIMEOUT_S)
                _print({"up": up, "errors": gen.errors[:3]})
            elif op == "ping":
                started = gen.ping_every(float(command["interval_s"]), jitter=command["jitter"])
                _print({"pinging": started})
            elif op == "state":
                _print(
                    {
                        "up": gen.up,
                        "pings_answered": sum(p.pings for p in gen.peers),
                        "pings_sent": sum(p.pings_sent for p in gen.peers),
                        "pongs_received": sum(p.pongs for p in gen.peers),
                        "errors": gen.errors[:3],
                    }
                )
            else:
                _print({"error": f"unknown op {op!r}"})


async def observer_worker(
    state_dir: Path, peer_id: str, host: str, interval_s: float, timeout_s: float
) -> None:
    """A node that prints each PeerUp / PeerDown with the monotonic time of its arrival."""
    from .config import NodeConfig
    from .node import Node, PeerDown, PeerUp

    config = NodeConfig(
        state_dir=state_dir,
        listen_host=host,
        listen_port=0,
        authorised=frozenset([peer_id]),
        keepalive_interval_s=interval_s,
        keepalive_timeout_s=timeout_s,
        remember_peers=False,
        learn_peers=False,
    )
    async with Node(config) as node:
        events = node.events()
        _print({"port": node.listen_port})
        async for event in events:
            now = time.monotonic()
            if isinstance(event, PeerDown):
                _print({"event": "down", "t": now, "peer": event.peer, "reason": event.reason})
            elif isinstance(event, PeerUp):
                _print({"event": "up", "t": now, "peer": event.peer})


_USAGE = "loadgen HOST PORT NODE_ID IDS_DIR | observer STATE PEER_ID HOST INTERVAL TIMEOUT"


def main(argv: list[str]) -> int:
    """Run a worker of ``edgenode bench``: ``loadgen ...`` or ``observer ...``."""
    import logging

    import anyio

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    if argv and argv[0] == "loadgen" and len(argv) == 5:
        anyio.run(loadgen_worker, argv[1], int(argv[2]), argv[3], Path(argv[4]))
    elif argv and argv[0] == "observer" and len(argv) == 6:
        args = (Path(argv[1]), argv[2], argv[3], float(argv[4]), float(argv[5]))
        anyio.run(observer_worker, *args)
    else:
        print(f"usage: python -m edgenode.bench_fleet {_USAGE}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
