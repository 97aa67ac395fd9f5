"""The flood tool's node and its peer, each in a child process speaking JSON lines.

``python -m edgenode.testing.flood`` runs a node (:func:`child_node`) and a
connected peer (:func:`child_peer`), each in a process of its own started
with ``--child node`` or ``--child peer`` and a JSON spec. The tool drives
them through :class:`Child`: one JSON command a line on the child's stdin,
one JSON answer a line on its stdout. The node answers ``echo`` requests and
counts its refusals (``Refused`` events) and log lines; the peer measures its
round-trip time to the node (:func:`request_rtts`, :func:`summarise_rtts`),
quiet or while a flood runs.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

from ..errors import EdgeNodeError
from .flood_attack import FloodError

# -- measuring a peer's round-trip time --------------------------------------------------


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


# -- the child processes ----------------------------------------------------------------


async def child_node(spec: dict[str, Any]) -> None:
    """``--child node``: run the node that is flooded, answer ``stats`` until stdin closes."""
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


async def child_peer(spec: dict[str, Any]) -> None:
    """``--child peer``: run the node's connected peer, measure round trips on command."""
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


class Child:
    """A child process speaking JSON lines on stdin and stdout."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self._buffer = b""

    @classmethod
    async def start(cls, role: str, spec: dict[str, Any]) -> Child:
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
