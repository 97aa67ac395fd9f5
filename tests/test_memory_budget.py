"""Each Raspberry Pi profile's node stays within its memory budget at its peer cap.

A real ``edgenode run --board NAME`` subprocess listens on 127.0.0.2; the
load generator (``edgenode.loadgen``), in this process, connects the
profile's ``peers.max`` authorised peers to it, each over mutual TLS from
its own loopback address with its own identity. Once the node's status
says they are all up, its peak RSS (VmHWM) must be under the profile's
budget with room to spare. The figures are printed for CI logs and
docs/memory.md. No timing is asserted.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from edgenode.control_client import control_request
from edgenode.identity import Identity, create_identity
from edgenode.loadgen import LoadGen, load_identities, write_authorised
from edgenode.profiles import Profile, list_profiles

from .conftest import free_port

NODE_IP = "127.0.0.2"
#: The node's peak must stay under this share of its budget. The host is
#: x86-64 (a 64-bit Pi OS has the same object sizes); the other 10 % is for
#: what traffic adds to a node measured right after its peers connect
#: (one frame per reader at most, queued outbox frames, allocator slack).
MARGIN = 0.90
PI_PROFILES = [p for p in list_profiles() if p.is_node and p.name.startswith("pi-")]
MAX_CAP = max(int(p.settings["peers.max"]) for p in PI_PROFILES)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def peer_identities(tmp_path_factory: pytest.TempPathFactory) -> list[Identity]:
    return load_identities(tmp_path_factory.mktemp("loadgen-ids"), MAX_CAP)


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0])
    return figures


class NodeProcess:
    """An ``edgenode run --board NAME`` subprocess on NODE_IP."""

    def __init__(self, board: str, state_dir: Path, port: int) -> None:
        self.socket = state_dir / "control.sock"
        self.log = open(state_dir / "node.log", "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgenode",
                "run",
                "--board",
                board,
                "--state-dir",
                str(state_dir),
                "--listen",
                f"{NODE_IP}:{port}",
                "--log-level",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def status(self) -> dict[str, Any] | None:
        """The node's status response, or None while its socket is not up."""
        if not self.socket.exists():
            return None
        try:
            response = control_request(self.socket, {"op": "status"}, timeout_s=5.0)
        except Exception:
            return None
        return response if response.get("ok") else None

    def tail(self) -> str:
        self.log.flush()
        text = (self.socket.parent / "node.log").read_text(errors="replace")
        return text[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


async def _wait_for(node: NodeProcess, peers_up: int, timeout_s: float) -> dict[str, Any]:
    """Poll the node's status until it reports ``peers_up`` peers up."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        assert node.proc.poll() is None, f"node exited {node.proc.returncode}:\n{node.tail()}"
        last = await anyio.to_thread.run_sync(node.status)
        if last is not None and last["node"]["peers_up"] >= peers_up:
            return last
        await anyio.sleep(0.2)
    got = None if last is None else last["node"]["peers_up"]
    raise AssertionError(f"node reported {got} peers up, expected {peers_up}:\n{node.tail()}")


async def _measure(profile: Profile, identities: list[Identity], state_dir: Path) -> dict[str, Any]:
    cap = int(profile.settings["peers.max"])  # type: ignore[call-overload]
    half = cap // 2
    peers = identities[:cap]
    write_authorised(state_dir / "authorised_nodes", peers)
    # As `edgenode keygen` before the first run: a node that makes its own
    # identity at start-up has loaded cryptography (about 11 MB) for good.
    create_identity(state_dir)
    port = free_port(NODE_IP)
    node = NodeProcess(profile.name, state_dir, port)
    try:
        status = await _wait_for(node, 0, 20.0)
        await anyio.sleep(0.5)  # let start-up garbage settle
        idle = _proc_status(node.proc.pid)
        started = time.monotonic()
        async with LoadGen(
            peers, NODE_IP, port, node_id=status["node"]["node_id"], concurrency=32
        ) as gen:
            up = await gen.connect(half, timeout_s=120.0)
            assert up == half, f"{up}/{half} peers up; first errors: {gen.errors[:3]}"
            await _wait_for(node, half, 30.0)
            at_half = _proc_status(node.proc.pid)
            up = await gen.connect(cap - half, timeout_s=120.0)
            assert up == cap, f"{up}/{cap} peers up; first errors: {gen.errors[:3]}"
            status = await _wait_for(node, cap, 30.0)
            connect_s = time.monotonic() - started
            await anyio.sleep(1.0)
            full = _proc_status(node.proc.pid)
            assert gen.up == cap, f"peers dropped: {gen.errors[:3]}"
    finally:
        node.stop()
    return {
        "board": profile.name,
        "peers": cap,
        "budget_kb": profile.memory_budget_kb,
        "idle_rss_kb": idle["VmRSS"],
        "half_rss_kb": at_half["VmRSS"],
        "full_rss_kb": full["VmRSS"],
        "peak_kb": full["VmHWM"],
        "node_rss_bytes": status["node"]["rss_bytes"],
        # Slope over the second half: one-time costs of the first peers excluded.
        "per_peer_kb": (full["VmRSS"] - at_half["VmRSS"]) / (cap - half),
        "per_peer_avg_kb": (full["VmRSS"] - idle["VmRSS"]) / cap,
        "connect_s": connect_s,
    }


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("profile", PI_PROFILES, ids=lambda p: p.name)
def test_node_at_peer_cap_stays_within_memory_budget(
    profile: Profile,
    peer_identities: list[Identity],
    tmp_path: Path,
    record_property: Any,
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    figures = anyio.run(_measure, profile, peer_identities, state_dir)
    for key, value in figures.items():
        record_property(key, value)
    line = (
        f"{figures['board']}: {figures['peers']} peers, "
        f"idle {figures['idle_rss_kb'] / 1024:.1f} MB, "
        f"full {figures['full_rss_kb'] / 1024:.1f} MB, "
        f"peak {figures['peak_kb'] / 1024:.1f} MB of {figures['budget_kb'] / 1024:.0f} MB budget, "
        f"{figures['per_peer_kb']:.1f} KB/peer marginal "
        f"({figures['per_peer_avg_kb']:.1f} KB/peer average), "
        f"connected in {figures['connect_s']:.1f} s"
    )
    print(f"\nmemory {line}")
    limit_kb = profile.memory_budget_kb * MARGIN
    assert figures["peak_kb"] <= limit_kb, (
        f"peak RSS {figures['peak_kb']} KB exceeds {MARGIN:.0%} of the "
        f"{profile.memory_budget_kb} KB budget: {line}"
    )
