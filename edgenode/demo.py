"""``edgenode demo``: three real nodes on 127.0.0.2-4, each its own process.

The demo provisions four identities (the three nodes and this console),
authorises them to each other, starts the nodes with ``edgenode run``,
joins them from a console node on 127.0.0.1, sends messages and requests,
bridges a simulated microcontroller (the real firmware_bridge driver on a
pseudo-terminal) into bravo, SIGKILLs one node, shows the others notice,
restarts it, shows it rejoin and prints the peer tables. Everything it
shows goes over mutual TLS on loopback, or over the pseudo-terminal.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio
from anyio.abc import Process

from firmware_bridge import cbor

from .config import NodeConfig
from .errors import EdgeNodeError
from .identity import create_identity
from .node import Incoming, Node, PeerDown, PeerUp
from .simdevice import SimulatedDevice
from .trust import add_authorised

log = logging.getLogger("edgenode.demo")

NODES = (("alpha", "127.0.0.2"), ("bravo", "127.0.0.3"), ("charlie", "127.0.0.4"))
CONSOLE_IP = "127.0.0.1"
DEVICE_ID = "pico-sim"
BRIDGE = NODES[1]  # bravo bridges the simulated microcontroller
STEPS = 8
_TIMING = ["--keepalive-interval", "1", "--keepalive-timeout", "3", "--backoff-cap", "2"]

# Bounds on the demo's waits. On the x86-64 CI machine each wait takes 0.1-3 s
# (all connected: about 2 s); emulated ARM (qemu, a slow board's pace) took
# up to 15 s for the same step on a busy machine. The bounds leave room for a
# board ten times slower than that machine, busy; past NOTE_AFTER_S a wait says
# what it is waiting for, every NOTE_EVERY_S, so a slow board is told apart from
# a stuck one.
CONNECT_BOUND_S = 180.0  # nodes start (a Python process each) and dial each other
DOWN_BOUND_S = 60.0  # a SIGKILLed peer is seen down (at once, or the 3 s keepalive)
EXIT_BOUND_S = 60.0  # a node exits after SIGTERM (about 2 s here)
REQUEST_TIMEOUT_S = 30.0  # one request and its answer (milliseconds here)
NOTE_AFTER_S = 10.0
NOTE_EVERY_S = 10.0
_POLL_S = 0.2


class DemoError(EdgeNodeError):
    """A step of the demo did not happen within its bound."""


class _Wait:
    """A bounded wait that says what it is waiting for when it takes long.

    Call :meth:`slice_s` before each wait for an event: it returns how long
    to wait before the next check, prints a note once the wait has taken
    NOTE_AFTER_S, and raises :class:`DemoError` naming ``what`` past the bound.
    """

    def __init__(self, what: str, bound_s: float) -> None:
        self.what = what
        self.bound_s = bound_s
        self.started = time.monotonic()
        self.next_note = self.started + NOTE_AFTER_S

    def slice_s(self) -> float:
        now = time.monotonic()
        waited_s = now - self.started
        if waited_s >= self.bound_s:
            raise DemoError(f"gave up waiting for {self.what} after {self.bound_s:.0f} s")
        if now >= self.next_note:
            _say(
                f"   ... still waiting for {self.what}: {waited_s:.0f} s so far "
                f"(gives up after {self.bound_s:.0f} s)"
            )
            self.next_note = now + NOTE_EVERY_S
        return max(0.0, min(self.next_note, self.started + self.bound_s) - now)


# -- the application each demo node runs (edgenode run --demo-app) ---------------


def install_demo_app(node: Node) -> None:
    """Answer ``demo/echo``, relay ``demo/relay`` and log ``demo/#`` messages."""

    async def echo(request: Incoming) -> bytes:
        return request.payload

    async def relay(request: Incoming) -> bytes:
        target, _, text = request.payload.decode().partition("|")
        started = time.perf_counter()
        reply = await node.request(target, "demo/echo", text.encode(), timeout=REQUEST_TIMEOUT_S)
        ms = (time.perf_counter() - started) * 1000
        return f"{target} answered {reply.decode()!r} in {ms:.1f} ms".encode()

    async def show(msg: Incoming) -> None:
        log.info("message from %s on %s: %r", msg.peer, msg.topic, msg.payload.decode())

    node.handle("demo/echo", echo)
    node.handle("demo/relay", relay)
    node.on_message("demo/#", show)


# -- the demo itself -----------------------------------------------------------


def _free_port() -> int:
    """A port free on every demo address."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((NODES[0][1], 0))
            port = probe.getsockname()[1]
        try:
            for ip in [CONSOLE_IP] + [ip for _, ip in NODES]:
                with socket.socket() as s:
                    s.bind((ip, port))
            return port
        except OSError:
            continue
    raise EdgeNodeError("no port is free on all of 127.0.0.1-4")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(number: int, text: str) -> None:
    _say()
    _say(f"[{number}/{STEPS}] {text}")


class _Demo:
    def __init__(self, root: str, port: int) -> None:
        self.root = root
        self.port = port
        self.procs: dict[str, Process] = {}
        self.ids: dict[str, str] = {}
        self.started = time.monotonic()

    def elapsed(self) -> str:
        """Seconds since the demo started, padded for the log column."""
        return f"{time.monotonic() - self.started:4.1f}s"

    def name_of(self, ip: str) -> str:
        if "/" in ip:
            return ip.partition("/")[2]
        if ip == CONSOLE_IP:
            return "console"
        return next((name for name, node_ip in NODES if node_ip == ip), "?")

    def provision(self) -> None:
        names = [name for name, _ in NODES] + ["console"]
        for name in names:
            self.ids[name] = create_identity(os.path.join(self.root, name)).node_id
        for name in names:
            path = os.path.join(self.root, name, "authorised_nodes")
            for other in names:
                if other != name:
                    add_authorised(path, self.ids[other])

    async def start(
        self, tg: anyio.abc.TaskGroup, name: str, ip: str, extra: tuple[str, ...] = ()
    ) -> None:
        others = [f"{o_ip}:{self.port}" for o_name, o_ip in NODES if o_name != name]
        command = [
            sys.executable,
            "-m",
            "edgenode",
            "run",
            "--state-dir",
            os.path.join(self.root, name),
            "--listen",
            f"{ip}:{self.port}",
            *[arg for peer in others for arg in ("--peer", peer)],
            *_TIMING,
            *extra,
            "--demo-app",
        ]
        proc = await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs[name] = proc
        tg.start_soon(self._echo_log, name, proc)

    async def _echo_log(self, name: str, proc: Process) -> None:
        assert proc.stderr is not None
        buffer = b""
        async for chunk in proc.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                # Drop the timestamp the node prints; the demo shows its own clock.
                parts = text.split(None, 2)
                if len(parts) == 3 and parts[0].count(":") == 2:
                    text = f"{parts[1]:<7} {parts[2]}"
                _say(f"   {self.elapsed()}  {name:<7} | {text}")

    async def peer_table(self, console: Node, name: str, ip: str) -> list[list[Any]]:
        """Node ``name``'s peer table, as its ``edgenode/peers`` answer lists it."""
        reply = await console.request(ip, "edgenode/peers", b"", timeout=REQUEST_TIMEOUT_S)
        return cbor.decode(reply)  # type: ignore[return-value]

    async def wait_for(self, console: Node, name: str, ip: str, peer: str, state: str) -> None:
        """Wait until node ``name`` lists ``peer`` in ``state``.

        The table is another process's: the console asks for it again until
        it shows the state (the console's own waits are for its events).
        """
        wait = _Wait(f"{name} to report {self.name_of(peer)} {state}", CONNECT_BOUND_S)
        while True:
            rows = await self.peer_table(console, name, ip)
            if any(row[0] == peer and row[2] == state for row in rows):
                return
            await anyio.sleep(min(_POLL_S, wait.slice_s()))

    async def show_tables(self, console: Node) -> None:
        """Print each running node's peer table, fetched over edgenode/peers."""
        rows = []
        for name, ip in NODES:
            if self.procs[name].returncode is None:
                for row in await self.peer_table(console, name, ip):
                    rows.append((name, *row))
        # Keepalive measures the rtt after a second without traffic: in a
        # short demo there is often none yet, and a column of dashes says nothing.
        show_rtt = any(row[6] is not None for row in rows)  # microseconds
        rtt_head = f" {'rtt':>8}" if show_rtt else ""
        # Fetch first, print after: node log lines cannot land inside the table.
        _say(
            f"   {'seen by':<8} {'peer':<18} {'node id':<34} {'state':<5} "
            f"{'direction':<9}{rtt_head}"
        )
        for name, peer, node_id, state, direction, reason, rtt in rows:
            rtt_text = ""
            if show_rtt:
                rtt_text = f" {rtt / 1000:6.2f}ms" if rtt is not None else f" {'-':>8}"
            note = "" if state == "up" else f"  {reason or ''}"
            _say(
                f"   {name:<8} {self.name_of(peer):<8} {peer:<9} {node_id or '-':<34} "
                f"{state:<5} {direction or '-':<9}{rtt_text}{note}".rstrip()
            )


class _ElapsedFilter(logging.Filter):
    """Give the console's log records the demo clock the node lines show."""

    def __init__(self, demo: _Demo) -> None:
        super().__init__()
        self.demo = demo

    def filter(self, record: logging.LogRecord) -> bool:
        record.elapsed = self.demo.elapsed()
        return True


async def _demo(duration_s: float | None, keep: bool) -> int:
    root = tempfile.mkdtemp(prefix="edgenode-demo-")
    demo = _Demo(root, _free_port())
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ElapsedFilter(demo))
    try:
        return await _run(demo, duration_s)
    finally:
        for proc in demo.procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if keep:
            _say(f"state kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


async def _run(demo: _Demo, duration_s: float | None) -> int:
    _say("edgenode demo: three nodes, alpha, bravo and charlie, on 127.0.0.2-4, each")
    _say("its own `edgenode run` process, and this console as a fourth node on 127.0.0.1.")
    _say("Every link is mutual TLS 1.3. A line that starts with a clock is a log line")
    _say("of the node named after the clock.")

    _step(1, "making an identity (key and node id) for each node; authorising them to each other")
    demo.provision()
    for name, ip in (*NODES, ("console", CONSOLE_IP)):
        _say(f"   {name:<8} {ip}:{demo.port}  node {demo.ids[name]}")

    async with anyio.create_task_group() as tg:
        _step(2, "starting the nodes, and the console, which dials all three")
        _say("   each node dials the other two; a dial to a node that is not listening yet")
        _say("   fails and is retried after a short, growing delay")
        # The microcontroller's UART is a pseudo-terminal: bravo opens one end
        # with pyserial, the real firmware_bridge driver runs on the other.
        sim = SimulatedDevice(DEVICE_ID, keepalive_interval_ms=500, keepalive_timeout_ms=1500)
        for name, ip in NODES:
            extra = ("--serial", sim.pty.path) if name == BRIDGE[0] else ()
            await demo.start(tg, name, ip, extra)
        device = await sim.start()

        async def device_echo(payload: bytes) -> bytes:
            _say(f"   {demo.elapsed()}  {DEVICE_ID:<7} | request demo/echo {payload.decode()!r}")
            return b"pico-sim heard " + payload

        device.handle("demo/echo", device_echo)
        config = NodeConfig(
            state_dir=os.path.join(demo.root, "console"),
            listen_host=CONSOLE_IP,
            listen_port=demo.port,
            peers=[(ip, demo.port) for _, ip in NODES],
            keepalive_interval_s=1,
            keepalive_timeout_s=3,
            backoff_cap_s=2,
        )
        async with Node(config) as console:
            events = console.events()
            up: set[str] = set()
            wait = _Wait("the console to connect to alpha, bravo and charlie", CONNECT_BOUND_S)
            while len(up) < len(NODES):
                with anyio.move_on_after(wait.slice_s()):
                    event = await events.receive()
                    if isinstance(event, PeerUp):
                        up.add(event.peer)
            for name, ip in NODES:
                for _, other in NODES:
                    if other != ip:
                        await demo.wait_for(console, name, ip, other, "up")
            elapsed_s = time.monotonic() - demo.started
            _step(3, f"all connected after {elapsed_s:.1f} s: each node holds one link per peer")
            await demo.show_tables(console)

            _step(4, "messages (fire and forget) and requests (with a reply)")
            count = await console.broadcast("demo/hello", b"hello from the console")
            _say(f"   console broadcast a message on topic demo/hello to {count} peers")
            for name, ip in NODES:
                started = time.perf_counter()
                reply = await console.request(
                    ip, "demo/echo", f"ping {name}".encode(), timeout=REQUEST_TIMEOUT_S
                )
                ms = (time.perf_counter() - started) * 1000
                answer = reply.decode()
                _say(f"   console -> {name}: request demo/echo {answer!r} answered in {ms:.1f} ms")
            relay = f"{NODES[1][1]}|hi bravo, alpha here".encode()
            reply = await console.request(
                NODES[0][1], "demo/relay", relay, timeout=2 * REQUEST_TIMEOUT_S
            )
            _say(f"   console asked alpha to ask bravo: {reply.decode()}")

            _step(5, f"a microcontroller on a UART joins through {BRIDGE[0]}")
            _say(f"   {DEVICE_ID} runs the firmware_bridge driver (the code a Pico or ESP32 runs)")
            _say(f"   on a pseudo-terminal; {BRIDGE[0]} opened the other end with pyserial")
            # The console learns bravo's devices from bravo's peer lists; it
            # has no event for that, so it looks at its own table.
            wait = _Wait(f"{BRIDGE[0]} to list {DEVICE_ID}", CONNECT_BOUND_S)
            while not any(DEVICE_ID in p.devices for p in console.peers()):
                await anyio.sleep(min(_POLL_S, wait.slice_s()))
            sim.pty.release_slave()
            address = f"{BRIDGE[1]}/{DEVICE_ID}"
            _say(f"   the console sees {address} listed under {BRIDGE[0]}")
            relay = f"{address}|hello from alpha".encode()
            reply = await console.request(
                NODES[0][1], "demo/relay", relay, timeout=2 * REQUEST_TIMEOUT_S
            )
            _say(
                f"   console asked alpha to ask {DEVICE_ID}, through {BRIDGE[0]}: {reply.decode()}"
            )
            await device.publish("demo/temp", b"21.5 C")
            _say(f"   {DEVICE_ID} published 'demo/temp'; every node gets it, from {address}:")
            await anyio.sleep(0.2)  # a demo may pause to let the nodes' log lines print

            name, ip = NODES[2]
            _step(6, f"killing {name} with SIGKILL, so it cannot say bye: the others must notice")
            _say("   the kernel closes a killed process's sockets, so its peers see it at once;")
            _say("   a board that loses power would be caught by the keepalive timeout (3 s here)")
            killed_at = time.monotonic()
            demo.procs[name].send_signal(signal.SIGKILL)
            await demo.procs[name].wait()
            wait = _Wait(f"the console to see {name} down", DOWN_BOUND_S)
            down: PeerDown | None = None
            while down is None:
                with anyio.move_on_after(wait.slice_s()):
                    event = await events.receive()
                    if isinstance(event, PeerDown) and event.peer == ip:
                        down = event
            down_ms = (time.monotonic() - killed_at) * 1000
            _say(f"   console saw {name} down after {down_ms:.0f} ms: {down.reason}")
            for other, other_ip in NODES[:2]:
                await demo.wait_for(console, other, other_ip, ip, "down")
                _say(f"   {other} reports {name} down")
            try:
                await console.send(ip, "demo/note", b"anyone there?")
            except EdgeNodeError as exc:
                _say(f"   a send to {name} now fails at once: {exc}")

            _step(7, f"restarting {name} with the same identity: it must rejoin by itself")
            restarted_at = time.monotonic()
            await demo.start(tg, name, ip)
            for other, other_ip in NODES[:2]:
                await demo.wait_for(console, other, other_ip, ip, "up")
                up_ms = (time.monotonic() - restarted_at) * 1000
                _say(f"   {other} reports {name} up again after {up_ms:.0f} ms")
            await console.send(ip, "demo/note", b"welcome back", wait_s=CONNECT_BOUND_S)
            _say(f"   console sent {name} 'welcome back' on topic demo/note")

            _step(8, "peer tables again: everyone is back up")
            await demo.show_tables(console)
            if duration_s:
                while time.monotonic() - demo.started < duration_s:
                    left_s = duration_s - (time.monotonic() - demo.started)
                    await anyio.sleep(min(5.0, max(0.1, left_s)))
                    _say()
                    _say(f"   at {demo.elapsed()}:")
                    await demo.show_tables(console)

            _say()
            _say("stopping: SIGTERM to one node at a time; each says bye to its peers and exits")
            await sim.aclose()
            codes = []
            for name, _ in NODES:
                proc = demo.procs[name]
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                wait = _Wait(f"{name} to exit after SIGTERM", EXIT_BOUND_S)
                while proc.returncode is None:
                    with anyio.move_on_after(wait.slice_s()):
                        await proc.wait()
                codes.append(proc.returncode)
        tg.cancel_scope.cancel()
    bad = [c for c in codes if c not in (0, -signal.SIGKILL)]
    total_s = time.monotonic() - demo.started
    _say(f"demo finished in {total_s:.1f} s" + (f"; exit codes {codes}" if bad else ""))
    return 1 if bad else 0


def run_demo(duration_s: float | None = None, keep: bool = False) -> int:
    """Run the demo; return the process exit status."""
    logging.basicConfig(
        level=logging.WARNING, format="   %(elapsed)s  console | %(levelname)-7s %(message)s"
    )
    return anyio.run(_demo, duration_s, keep)
