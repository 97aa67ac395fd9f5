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

As a library (``tests/test_floods.py``)::

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
import errno
import functools
import ipaddress
import json
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

from ..errors import EdgeNodeError
from ..proto.preamble import HEAD_BYTES, MAGIC, PREAMBLE_VERSION, encode_preamble
from .procs import NodeProcessError, read_cpu_seconds

#: Each kind of flood, in the order the tool runs them.
KINDS = (
    "connect-close",
    "stall-before-preamble",
    "stall-mid-preamble",
    "stall-mid-tls",
    "oversized-preamble",
    "forged-certificates",
    "oversized-hello",
    "many-ips-mid-tls",
)
#: What ``mixed`` cycles through, one kind per connection: none needs a key.
MIXED = (
    "connect-close",
    "stall-before-preamble",
    "stall-mid-preamble",
    "stall-mid-tls",
    "oversized-preamble",
)
#: Kinds that complete TLS and so need an authorised identity.
NEEDS_IDENTITY = frozenset({"oversized-hello"})
#: Kinds that send a preamble carrying a certificate.
NEEDS_CERT = frozenset({"stall-mid-tls", "forged-certificates", "many-ips-mid-tls", "mixed"})
MAX_COUNT = 100_000
MAX_CONCURRENCY = 1_000
RTT_TARGET_RATIO = 2.0
_CONNECT_TIMEOUT_S = 5.0
_OVERSIZED_HELLO_BYTES = 1 << 24
_RESET = (errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE)


class FloodError(EdgeNodeError):
    """A flood could not be run as asked (a bad target, or it overran its time)."""


# -- what an attacker sends ------------------------------------------------------------


def client_hello() -> bytes:
    """A real TLS 1.3 ClientHello, to leave a listener's handshake half done."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def forged_certificate(cert_der: bytes, number: int) -> bytes:
    """``cert_der`` with another serial number: the same public key, so the same
    node ID, but a certificate nobody signed (its signature no longer matches).

    Each ``number`` gives a distinct certificate. Raises :class:`FloodError`
    if ``cert_der`` does not start like an X.509 v3 certificate.
    """
    der = bytearray(cert_der)
    pos = _skip_header(der, 0)  # Certificate SEQUENCE
    pos = _skip_header(der, pos)  # tbsCertificate SEQUENCE
    if der[pos] != 0xA0:
        raise FloodError("expected an x.509 v3 certificate (a [0] version field)")
    pos += 2 + der[pos + 1]  # the version field
    if der[pos] != 0x02:
        raise FloodError(f"expected the serial number integer at offset {pos}")
    length = der[pos + 1]
    if length < 5 or length > 0x7F:
        raise FloodError(f"expected a serial number of 5..127 bytes, got {length}")
    end = pos + 2 + length
    der[end - 4 : end] = (number & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(der)


def _skip_header(der: bytearray, pos: int) -> int:
    if der[pos] != 0x30:
        raise FloodError(f"expected a der sequence at offset {pos}")
    first = der[pos + 1]
    return pos + 2 + (first - 0x80 if first & 0x80 else 0)


def oversized_preamble() -> bytes:
    """A preamble head announcing a 65535-byte certificate (the limit is 2048)."""
    return MAGIC + bytes([PREAMBLE_VERSION]) + (0xFFFF).to_bytes(2, "big")


# -- a flood -------------------------------------------------------------------------------


class FloodResult:
    """What one flood did and how the node answered each connection."""

    __slots__ = (
        "attempts",
        "close_delays_s",
        "connect_errors",
        "connected",
        "duration_s",
        "errors",
        "kind",
        "refused_at_connect",
        "still_open",
    )

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.attempts = 0
        self.connected = 0
        #: Connections the node reset before we could use them (over a limit).
        self.refused_at_connect = 0
        #: Connections that failed otherwise (a connect timeout: a full backlog).
        self.connect_errors = 0
        #: For each connection the node closed: seconds from our last byte to its close.
        self.close_delays_s: list[float] = []
        #: Connections the node had not closed when we stopped waiting (hold_s).
        self.still_open = 0
        self.duration_s = 0.0
        #: The first few unexpected failures, as text.
        self.errors: list[str] = []

    def closed_within(self, seconds: float) -> int:
        """How many connections the node closed within ``seconds`` of our last byte."""
        return sum(1 for d in self.close_delays_s if d <= seconds)

    def as_dict(self) -> dict[str, Any]:
        delays = sorted(self.close_delays_s)
        return {
            "kind": self.kind,
            "attempts": self.attempts,
            "connected": self.connected,
            "refused_at_connect": self.refused_at_connect,
            "connect_errors": self.connect_errors,
            "closed_by_node": len(delays),
            "still_open": self.still_open,
            "close_delay_median_s": round(statistics.median(delays), 4) if delays else None,
            "close_delay_max_s": round(delays[-1], 4) if delays else None,
            "duration_s": round(self.duration_s, 3),
            "errors": self.errors[:5],
        }


def _check_target(host: str, source_ips: Sequence[str]) -> None:
    for what, address in [("target", host), *(("source", ip) for ip in source_ips)]:
        try:
            loopback = ipaddress.ip_address(address).is_loopback
        except ValueError:
            raise FloodError(f"{what} {address!r}: expected an ip address") from None
        if not loopback:
            raise FloodError(f"{what} {address}: floods target loopback addresses only")


async def run_flood(
    kind: str,
    host: str,
    port: int,
    *,
    source_ips: Sequence[str],
    count: int,
    concurrency: int = 50,
    hold_s: float = 10.0,
    cert_der: bytes | None = None,
    identity: Any = None,
    limit_s: float = 120.0,
) -> FloodResult:
    """Open ``count`` connections of ``kind`` to ``host:port``, ``concurrency`` at once.

    ``kind`` is one of :data:`KINDS`, or ``mixed``: each connection in turn
    one of :data:`MIXED`.

    Connections come from ``source_ips`` in turn. After its last byte each
    connection waits up to ``hold_s`` for the node to close it (make it
    longer than the node's handshake timeout). ``cert_der`` is an
    authorised node's certificate for the preamble kinds; ``identity`` an
    authorised :class:`~edgenode.identity.Identity` for ``oversized-hello``.
    Raises :class:`FloodError` for a target or source off loopback, a
    missing argument, or a flood that takes over ``limit_s``.
    """
    if kind not in KINDS and kind != "mixed":
        raise FloodError(f"flood kind {kind!r}: expected mixed or one of {', '.join(KINDS)}")
    if not source_ips:
        raise FloodError("source_ips: expected at least one address")
    _check_target(host, source_ips)
    if not 1 <= count <= MAX_COUNT:
        raise FloodError(f"count: expected 1..{MAX_COUNT}, got {count}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise FloodError(f"concurrency: expected 1..{MAX_CONCURRENCY}, got {concurrency}")
    if kind in NEEDS_CERT and cert_der is None:
        raise FloodError(f"{kind}: needs cert_der, an authorised node's certificate")
    if kind in NEEDS_IDENTITY and identity is None:
        raise FloodError(f"{kind}: needs identity, an authorised identity")
    result = FloodResult(kind)
    hello = client_hello() if kind in NEEDS_CERT else b""
    client_ctx = None
    if kind in NEEDS_IDENTITY:
        from ..tls import client_context

        client_ctx = client_context(identity)
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(index: int) -> None:
        async with limiter:
            await _one(
                MIXED[index % len(MIXED)] if kind == "mixed" else kind,
                host,
                port,
                source_ips[index % len(source_ips)],
                index,
                result,
                hold_s=hold_s,
                cert_der=cert_der,
                hello=hello,
                identity=identity,
                client_ctx=client_ctx,
            )

    started = time.monotonic()
    try:
        with anyio.fail_after(limit_s):
            async with anyio.create_task_group() as tg:
                for index in range(count):
                    tg.start_soon(one, index)
    except TimeoutError:
        raise FloodError(
            f"{kind}: {count} connections took over {limit_s} s ({result.attempts} started)"
        ) from None
    result.duration_s = time.monotonic() - started
    return result


async def _one(
    kind: str,
    host: str,
    port: int,
    source_ip: str,
    index: int,
    result: FloodResult,
    *,
    hold_s: float,
    cert_der: bytes | None,
    hello: bytes,
    identity: Any,
    client_ctx: Any,
) -> None:
    result.attempts += 1
    stream: Any = None
    try:
        with anyio.fail_after(_CONNECT_TIMEOUT_S):
            if kind == "oversized-hello":
                from ..transports.tcp import dial_link

                link = await dial_link(
                    host,
                    port,
                    context=client_ctx,
                    cert_der=identity.cert_der,
                    local_host=source_ip,
                    is_authorised=lambda _node_id: True,
                )
                stream = link.stream
            else:
                stream = await anyio.connect_tcp(host, port, local_host=source_ip)
    except (OSError, TimeoutError, EdgeNodeError, BrokenResourceError, EndOfStream) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        if getattr(cause, "errno", None) in _RESET or isinstance(exc, EdgeNodeError):
            # The node reset it at once (over a limit): the connect, or the
            # TLS handshake of an oversized-hello, failed.
            result.refused_at_connect += 1
        else:
            result.connect_errors += 1
            if len(result.errors) < 5:
                result.errors.append(f"connect: {type(exc).__name__}: {exc}")
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        return
    result.connected += 1
    try:
        if kind == "connect-close":
            return
        if kind == "stall-mid-preamble":
            await stream.send(MAGIC[:3])
        elif kind in ("stall-mid-tls", "many-ips-mid-tls"):
            assert cert_der is not None
            await stream.send(encode_preamble(cert_der) + hello)
        elif kind == "forged-certificates":
            assert cert_der is not None
            await stream.send(encode_preamble(forged_certificate(cert_der, index)) + hello)
        elif kind == "oversized-preamble":
            await stream.send(oversized_preamble() + bytes(HEAD_BYTES))
        elif kind == "oversized-hello":
            await stream.send(_OVERSIZED_HELLO_BYTES.to_bytes(4, "big") + b"\xa0" * 64)
        # stall-before-preamble: send nothing.
        delay = await _wait_for_close(stream, hold_s)
        if delay is None:
            result.still_open += 1
        else:
            result.close_delays_s.append(delay)
    except (OSError, BrokenResourceError, EndOfStream) as exc:
        # The node closed before we finished sending: as good as refused at once.
        result.close_delays_s.append(0.0)
        if len(result.errors) < 5 and not isinstance(exc, (EndOfStream, BrokenResourceError)):
            result.errors.append(f"send: {type(exc).__name__}: {exc}")
    finally:
        await anyio.aclose_forcefully(stream)


async def _wait_for_close(stream: Any, hold_s: float) -> float | None:
    """Read until the node closes the stream; return how long that took, or None."""
    started = time.monotonic()
    with anyio.move_on_after(hold_s):
        try:
            while True:
                await stream.receive()
        except (EndOfStream, BrokenResourceError, ClosedResourceError, OSError, ssl.SSLError):
            return time.monotonic() - started
    return None


# -- measuring a peer's round-trip time -----------------------------------------------------


def summarise_rtts(samples_s: Sequence[float]) -> dict[str, Any]:
    """Median, p99 and max of round-trip times, in milliseconds."""
    if not samples_s:
        return {"n": 0, "median_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "n": len(ordered),
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(p99 * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


async def request_rtts(
    node: Any, peer: str, count: int, *, topic: str = "echo", timeout_s: float = 5.0
) -> list[float]:
    """Send ``count`` requests on ``topic`` to ``peer`` one after another; return their times."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await node.request(peer, topic, b"rtt", timeout=timeout_s)
        samples.append(time.perf_counter() - started)
    return samples


async def echo(request: Any) -> bytes:
    """The request handler the tool's node answers with."""
    return bytes(request.payload)


# -- the tool: a node and its peer in child processes --------------------------------------


def process_figures(pid: int) -> dict[str, Any]:
    """RSS, peak RSS (MB) and open file descriptors of process ``pid`` (Linux /proc)."""
    figures: dict[str, Any] = {"rss_mb": None, "peak_rss_mb": None, "fds": None}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    figures["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
                elif line.startswith("VmHWM:"):
                    figures["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
        figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return figures


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process ``pid`` has used, in seconds; None if it is gone."""
    try:
        return sum(read_cpu_seconds(pid))
    except NodeProcessError:
        return None


class _CpuMeter:
    """A process's CPU use, in % of one CPU, from now until :meth:`stop`."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.percent: float | None = None
        self._cpu = cpu_seconds(pid) if pid else None
        self._started = time.monotonic()

    def stop(self) -> None:
        end = cpu_seconds(self.pid) if self.pid else None
        elapsed = time.monotonic() - self._started
        if self._cpu is not None and end is not None and elapsed > 0:
            self.percent = round((end - self._cpu) * 100 / elapsed, 1)


async def _child_node(spec: dict[str, Any]) -> None:
    from ..config import NodeConfig
    from ..logs import setup_logging
    from ..node import Node, Refused

    _pin(spec)
    log_file = open(spec["log_file"], "a")  # lives as long as the process
    setup_logging(spec.get("log_level", "info"), stream=log_file)
    config = NodeConfig(
        state_dir=Path(spec["state_dir"]),
        listen_host=spec["host"],
        listen_port=spec.get("port", 0),
        authorised=frozenset(spec["authorised"]),
        remember_peers=False,
        **spec.get("config", {}),
    )
    refused: dict[str, int] = {}
    async with Node(config) as node:
        node.handle("echo", echo)
        events = node.events()

        async def count_refusals() -> None:
            async for event in events:
                if isinstance(event, Refused):
                    key = f"{type(event.error).__name__}: {_shape(str(event.error))}"
                    refused[key] = refused.get(key, 0) + 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(count_refusals)
            _say({"port": node.listen_port, "node_id": node.node_id})
            async for command in _commands():
                if command["cmd"] == "stats":
                    _say({"stats": node.stats(), "refused": refused, "log_lines": _lines(spec)})
            tg.cancel_scope.cancel()


def _lines(spec: dict[str, Any]) -> int:
    with open(spec["log_file"], "rb") as f:
        return sum(1 for _ in f)


def _shape(message: str) -> str:
    """A refusal message with its numbers and addresses blanked, for counting kinds."""
    out = []
    for word in message.split():
        out.append("N" if any(ch.isdigit() for ch in word) else word)
    return " ".join(out)[:100]


async def _child_peer(spec: dict[str, Any]) -> None:
    from ..config import NodeConfig
    from ..node import Node

    _pin(spec)
    target_host, target_port = spec["target"]
    config = NodeConfig(
        state_dir=Path(spec["state_dir"]),
        listen_host=spec["host"],
        listen_port=0,
        peers=[(target_host, target_port)],
        authorised=frozenset(spec["authorised"]),
        remember_peers=False,
    )
    async with Node(config) as node:
        node.handle("echo", echo)
        topic = spec.get("topic", "echo")
        # Up and answering: the first request may wait for the connection.
        await node.request(target_host, topic, b"ready", timeout=10, wait_s=10)
        _say({"ready": True})
        samples: list[float] = []
        errors: list[str] = []
        stop = anyio.Event()

        async def sample() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    await node.request(target_host, topic, b"rtt", timeout=5)
                    samples.append(time.perf_counter() - started)
                except EdgeNodeError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            async for command in _commands():
                if command["cmd"] == "rtt":
                    try:
                        rtts = await request_rtts(node, target_host, int(command["n"]), topic=topic)
                        _say({**summarise_rtts(rtts), "errors": []})
                    except EdgeNodeError as exc:
                        _say({**summarise_rtts([]), "errors": [f"{type(exc).__name__}: {exc}"]})
                elif command["cmd"] == "start":
                    samples.clear()
                    errors.clear()
                    stop = anyio.Event()
                    tg.start_soon(sample)
                    _say({"started": True})
                elif command["cmd"] == "stop":
                    stop.set()
                    await anyio.sleep(0)
                    _say({**summarise_rtts(samples), "errors": errors[:5]})
            stop.set()


def _pin(spec: dict[str, Any]) -> None:
    if spec.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec["cpus"])


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


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _commands() -> Any:
    """JSON commands from stdin, one a line, until it closes."""
    while True:
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        if not line:
            return
        yield json.loads(line)


class _Child:
    """A child process speaking JSON lines on stdin and stdout."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self._buffer = b""

    @classmethod
    async def start(cls, role: str, spec: dict[str, Any]) -> _Child:
        command = [
            sys.executable,
            "-m",
            "edgenode.testing.flood",
            "--child",
            role,
            "--spec",
            json.dumps(spec),
        ]
        return cls(await anyio.open_process(command, stderr=None))

    async def read(self, timeout_s: float = 30.0) -> dict[str, Any]:
        with anyio.fail_after(timeout_s):
            while b"\n" not in self._buffer:
                try:
                    self._buffer += await self.process.stdout.receive()
                except EndOfStream:
                    raise FloodError(
                        f"child process {self.process.pid} ended before answering"
                    ) from None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    async def ask(self, command: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
        await self.process.stdin.send((json.dumps(command) + "\n").encode())
        return await self.read(timeout_s)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.process.stdin.aclose()
            except (OSError, BrokenResourceError, ClosedResourceError):
                pass
            with anyio.move_on_after(10):
                await self.process.wait()
                return
            self.process.kill()
            await self.process.wait()


def _ratio(value: float | None, quiet: float | None) -> float | None:
    if value is None or not quiet:
        return None
    return round(value / quiet, 2)


async def _tool(args: argparse.Namespace) -> dict[str, Any]:
    from ..identity import create_identity, load_identity

    work = Path(tempfile.mkdtemp(prefix="edgenode-flood-"))
    cpus = cpu_plan(args.pin)
    own_cpus = os.sched_getaffinity(0) if cpus["attacker"] else None
    node: _Child | None = None
    peer: _Child | None = None
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
            node = await _Child.start(
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
        peer = await _Child.start(
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
            quiet_cpu = _CpuMeter(target_pid)
            before = await peer.ask({"cmd": "rtt", "n": args.baseline_samples})
            quiet_cpu.stop()
            flood_cpu = _CpuMeter(target_pid)
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
        runner = _child_node if args.child == "node" else _child_peer
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
