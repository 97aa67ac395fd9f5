"""Each Raspberry Pi profile's node stays within its memory budget at its peer cap.

A real ``edgenode run --board NAME`` subprocess listens on 127.0.0.2; the
load generator (``edgenode.loadgen``), in this process, connects the
profile's ``peers.max`` authorised peers to it, each over mutual TLS from
its own loopback address with its own identity. Once the node's status
says they are all up, its peak RSS (VmHWM) must be under the profile's
budget with room to spare. The figures are printed for CI logs and
docs/memory.md. No timing is asserted.

Under qemu-user (CI's emulated ARM, docs/arm.md) ``/proc/PID/status``
describes the emulator, not the node: qemu's translation buffer, its binary
and its heap add about 26 MB. There the node is started with its guest
address space at a fixed place (``QEMU_GUEST_BASE``, and for a 64-bit guest
``QEMU_RESERVED_VA``), and what is measured is the resident pages of that
range only, from ``/proc/PID/smaps``: everything the node maps (its
interpreter, libraries, heap, stacks) and nothing qemu maps for itself. Its
peak is the largest of samples taken every 0.2 s, not the kernel's VmHWM,
which counts qemu too. The budget is the same.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
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


#: Under qemu-user, the node's guest address space starts here in the host's
#: (256 GiB: far from where the kernel puts qemu's own mappings) and spans
#: 16 GiB for a 64-bit guest, or a 32-bit guest's whole 4 GiB (qemu
#: reserves it by itself). A native node ignores these variables.
GUEST_BASE = 0x40_0000_0000
GUEST_SPAN = 0x4_0000_0000 if sys.maxsize > 2**32 else 0x1_0000_0000
_GUEST_ENV = {"QEMU_GUEST_BASE": hex(GUEST_BASE)}
if sys.maxsize > 2**32:
    _GUEST_ENV["QEMU_RESERVED_VA"] = hex(GUEST_SPAN)
_SMAPS_RANGE = re.compile(r"([0-9a-f]+)-([0-9a-f]+) ")
SAMPLE_EVERY_S = 0.2
START_BOUND_S = 120.0  # the node answers its control socket (about 1 s here)
CONNECT_BOUND_S = 300.0  # half the peers connect over TLS (2-10 s here)
HANDSHAKE_BOUND_S = 60.0  # one handshake among 32 at once (milliseconds here)


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0])
    return figures


def _emulator_of(pid: int) -> str | None:
    """The qemu binary running ``pid``, or None for a native process.

    Reads the kernel's map of ``pid``: qemu-user emulates only a process's
    reads of its own /proc/self/maps.
    """
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("qemu-"):
                return fields[5].strip()
    return None


def _guest_mappings(pid: int) -> list[tuple[int, int, str, int]]:
    """(start, end, path, Rss KiB) of each mapping of ``pid`` in the guest range."""
    mappings = []
    inside = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = _SMAPS_RANGE.match(line)
            if head:
                start, end = int(head.group(1), 16), int(head.group(2), 16)
                inside = GUEST_BASE <= start and end <= GUEST_BASE + GUEST_SPAN
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
            elif inside and line.startswith("Rss:"):
                mappings.append((start, end, path, int(line.split()[1])))
    return mappings


def _guest_rss_kb(pid: int) -> int:
    """Resident KiB of the guest's own address space (qemu's own excluded)."""
    return sum(rss for _, _, _, rss in _guest_mappings(pid))


class Memory:
    """The node's resident memory and its peak, in KiB, native or emulated.

    Natively: VmRSS and VmHWM. Under qemu-user: the resident pages of the
    guest range (see the module docstring), sampled every SAMPLE_EVERY_S
    in a thread from :meth:`start` to :meth:`stop`, the peak the largest.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        # execve maps qemu (the binfmt interpreter) before it returns.
        self.emulator = _emulator_of(pid)
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_guest_range(self) -> None:
        """Fail unless the node's interpreter is mapped in the guest range."""
        if self.emulator is None:
            return
        interpreter = os.path.realpath(sys.executable)
        if not any(path == interpreter for _, _, path, _ in _guest_mappings(self.pid)):
            raise AssertionError(
                f"node {self.pid} runs under {self.emulator}, but {interpreter} is not mapped "
                f"in the guest range {GUEST_BASE:#x}+{GUEST_SPAN:#x}: "
                "qemu did not take QEMU_GUEST_BASE"
            )

    def rss_kb(self) -> int:
        if self.emulator is None:
            return _proc_status(self.pid)["VmRSS"]
        rss = _guest_rss_kb(self.pid)
        self.peak_kb = max(self.peak_kb, rss)
        return rss

    def peak(self) -> int:
        if self.emulator is None:
            return _proc_status(self.pid)["VmHWM"]
        return max(self.peak_kb, self.rss_kb())

    def start(self) -> None:
        if self.emulator is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                self.rss_kb()
            except OSError:  # the node exited; the test reports why
                return


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
                # The profile's 5 s is for peers one at a time; here up to
                # 32 handshake at once, which an emulated or slow board
                # serves in more than 5 s each. Memory does not depend on it.
                "--handshake-timeout",
                str(HANDSHAKE_BOUND_S),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **_GUEST_ENV},
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
    memory = Memory(node.proc.pid)
    memory.start()
    # Bounds for a board (or an emulator) ten times slower than CI's x86-64,
    # busy: they catch a hang, they do not time anything.
    try:
        status = await _wait_for(node, 0, START_BOUND_S)
        memory.check_guest_range()
        await anyio.sleep(0.5)  # let start-up garbage settle
        idle = memory.rss_kb()
        started = time.monotonic()
        async with LoadGen(
            peers,
            NODE_IP,
            port,
            node_id=status["node"]["node_id"],
            concurrency=32,
            handshake_timeout_s=HANDSHAKE_BOUND_S,
        ) as gen:
            up = await gen.connect(half, timeout_s=CONNECT_BOUND_S)
            assert up == half, f"{up}/{half} peers up; first errors: {gen.errors[:3]}"
            await _wait_for(node, half, CONNECT_BOUND_S)
            at_half = memory.rss_kb()
            up = await gen.connect(cap - half, timeout_s=CONNECT_BOUND_S)
            assert up == cap, f"{up}/{cap} peers up; first errors: {gen.errors[:3]}"
            status = await _wait_for(node, cap, CONNECT_BOUND_S)
            connect_s = time.monotonic() - started
            await anyio.sleep(1.0)
            full = memory.rss_kb()
            peak = memory.peak()
            whole_process = _proc_status(node.proc.pid)  # qemu included, if emulated
            assert gen.up == cap, f"peers dropped: {gen.errors[:3]}"
    finally:
        memory.stop()
        node.stop()
    return {
        "board": profile.name,
        "peers": cap,
        "budget_kb": profile.memory_budget_kb,
        "measured": "native" if memory.emulator is None else "guest range under qemu-user",
        "idle_rss_kb": idle,
        "half_rss_kb": at_half,
        "full_rss_kb": full,
        "peak_kb": peak,
        "process_rss_kb": whole_process["VmRSS"],
        "node_rss_bytes": status["node"]["rss_bytes"],
        # Slope over the second half: one-time costs of the first peers excluded.
        "per_peer_kb": (full - at_half) / (cap - half),
        "per_peer_avg_kb": (full - idle) / cap,
        "connect_s": connect_s,
    }


@pytest.mark.slow
@pytest.mark.timeout(4 * START_BOUND_S)
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
        f"connected in {figures['connect_s']:.1f} s; measured: {figures['measured']}"
    )
    if figures["measured"] != "native":
        line += f" (the emulator's whole process: {figures['process_rss_kb'] / 1024:.1f} MB)"
    print(f"\nmemory {line}")
    limit_kb = profile.memory_budget_kb * MARGIN
    assert figures["peak_kb"] <= limit_kb, (
        f"peak RSS {figures['peak_kb']} KB exceeds {MARGIN:.0%} of the "
        f"{profile.memory_budget_kb} KB budget: {line}"
    )
