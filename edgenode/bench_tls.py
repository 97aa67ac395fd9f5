"""Worker processes of ``edgenode bench``: node-to-node figures over TLS.

Run as ``python -m edgenode.bench_tls ROLE ...``; ``edgenode.bench`` spawns
them, one process per side, so that each side has its own interpreter and
its own event loop, as two boards would.

Roles:

``ref-server`` / ``ref-client``
    The reference: plain anyio over mutual TLS 1.3 with the same identities
    and the same framing (4-byte big-endian length + body), one TLS write
    per message and no dispatcher, registry or codec. It is the practical
    limit of per-message Python I/O that the node is compared with.
``node-server`` / ``node-client``
    Two real :class:`~edgenode.node.Node` objects with default settings,
    the client dialling the server, used as the README shows: the sender
    a loop of ``await node.send()`` (and, separately, ``send_many`` in
    batches), the receiver one default ``subscribe()`` read by a trivial
    ``async for`` loop. No pacing, no tuned buffer: what a user gets.

Both pairs run the same tests: one-way throughput (messages/s counted at
the receiver, from the first message received to the last, with the
count of any message lost) and sequential request/response round trips.
A server prints one JSON line (``{"port": ...}``) when it listens; a client
prints one JSON line with its figures and exits. Every wait is bounded.
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream

from .identity import CERT_FILENAME, KEY_FILENAME, load_identity

HEADER_BYTES = 4
READ_BYTES = 65536
WAIT_S = 60.0  # the longest any single test may take before the worker gives up
TOPIC_DATA = "bench/data"
TOPIC_ECHO = "bench/echo"
TOPIC_SINK = "bench/sink"
TOPIC_RESULT = "bench/result"

perf_counter = time.perf_counter


def _print(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- the reference: plain anyio TLS --------------------------------------------------


def _ref_context(state_dir: Path, peer_cert_der: bytes, *, server: bool) -> ssl.SSLContext:
    """A mutual TLS 1.3 context that presents ours and trusts exactly the peer's cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(state_dir / CERT_FILENAME), str(state_dir / KEY_FILENAME))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=peer_cert_der)
    if server:
        ctx.num_tickets = 0
    return ctx


class _Frames:
    """Reads length-prefixed frames from a stream (the reference's decoder)."""

    __slots__ = ("buf", "pos", "stream")

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buf = b""
        self.pos = 0

    async def next(self) -> bytes:
        while True:
            buf, pos = self.buf, self.pos
            if len(buf) - pos >= HEADER_BYTES:
                end = pos + HEADER_BYTES + int.from_bytes(buf[pos : pos + HEADER_BYTES], "big")
                if len(buf) >= end:
                    self.pos = end
                    return buf[pos + HEADER_BYTES : end]
            self.buf = buf[pos:] + await self.stream.receive(READ_BYTES)
            self.pos = 0


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(HEADER_BYTES, "big") + body


async def _ref_serve_one(stream: ByteStream, ctx: ssl.SSLContext) -> None:
    tls = await TLSStream.wrap(stream, server_side=True, ssl_context=ctx, standard_compatible=False)
    frames = _Frames(tls)
    try:
        while True:
            command = json.loads(await frames.next())
            count = int(command["count"])
            if command["op"] == "sink":
                await frames.next()
                first = perf_counter()
                for _ in range(count - 1):
                    await frames.next()
                elapsed = perf_counter() - first
                await tls.send(_frame(json.dumps({"count": count, "elapsed_s": elapsed}).encode()))
            else:  # echo
                for _ in range(count):
                    await tls.send(_frame(await frames.next()))
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        pass
    finally:
        await anyio.aclose_forcefully(tls)


async def ref_server(state_dir: Path, peer_dir: Path, host: str, port: int) -> None:
    ctx = _ref_context(state_dir, load_identity(peer_dir).cert_der, server=True)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    _print({"port": listener.extra(anyio.abc.SocketAttribute.local_port)})

    async def handle(stream: ByteStream) -> None:
        try:
            await _ref_serve_one(stream, ctx)
        except (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream):
            pass  # the start-up probe connects and leaves without TLS

    await listener.serve(handle)


async def ref_client(
    state_dir: Path, peer_dir: Path, host: str, port: int, plan: dict[str, Any]
) -> dict[str, Any]:
    ctx = _ref_context(state_dir, load_identity(peer_dir).cert_der, server=False)
    tls = await anyio.connect_tcp(
        host, port, local_host=plan["local_host"], ssl_context=ctx, tls_standard_compatible=False
    )
    frames = _Frames(tls)
    result: dict[str, Any] = {"throughput": {}, "rtt": []}
    messages = plan["messages"]
    with anyio.fail_after(WAIT_S * plan["runs"]):
        for _ in range(plan["runs"]):
            for size in plan["sizes"]:
                frame = _frame(bytes(size))
                await tls.send(_frame(json.dumps({"op": "sink", "count": messages}).encode()))
                for _ in range(messages):
                    await tls.send(frame)  # one write per message, by design
                report = json.loads(await frames.next())
                rate = (messages - 1) / report["elapsed_s"]
                result["throughput"].setdefault(str(size), []).append(rate)
            requests = plan["requests"]
            frame = _frame(bytes(plan["rtt_bytes"]))
            await tls.send(_frame(json.dumps({"op": "echo", "count": requests}).encode()))
            times = []
            for _ in range(requests):
                started = perf_counter()
                await tls.send(frame)
                await frames.next()
                times.append(perf_counter() - started)
            result["rtt"].append(times)
    await tls.aclose()
    return result


# -- the node --------------------------------------------------------------------------


def _node_config(state_dir: Path, host: str, port: int, peer_id: str, **extra: Any) -> Any:
    from .config import NodeConfig

    return NodeConfig(
        state_dir=state_dir,
        listen_host=host,
        listen_port=port,
        authorised=frozenset([peer_id]),
        remember_peers=False,
        **extra,
    )


async def node_server(state_dir: Path, peer_dir: Path, host: str, port: int) -> None:
    """A node as a user runs it: default settings, one default subscription
    read by a trivial ``async for`` loop, and handlers to start and end a run."""
    from .node import Incoming, Node

    peer_id = load_identity(peer_dir).node_id
    async with Node(_node_config(state_dir, host, port, peer_id)) as node:
        expected = 0
        received = 0
        first = last = 0.0
        done = anyio.Event()

        async def echo(req: Incoming) -> bytes:
            return req.payload

        async def sink(req: Incoming) -> bytes:
            nonlocal expected, received, done
            expected, received, done = int(req.payload), 0, anyio.Event()
            return b"ok"

        async def result(req: Incoming) -> bytes:
            # Everything sent before this request was read before it (one
            # connection, in order); wait for the consumer to take it all.
            with anyio.move_on_after(WAIT_S):
                await done.wait()
            body = {"count": received, "elapsed_s": last - first, "dropped": sub.dropped}
            return json.dumps(body).encode()

        node.handle(TOPIC_ECHO, echo)
        node.handle(TOPIC_SINK, sink)
        node.handle(TOPIC_RESULT, result)
        with node.subscribe(TOPIC_DATA) as sub:  # the README's way, default buffer and policy
            _print({"port": node.listen_port})
            async for _ in sub:
                received += 1
                if received == 1:
                    first = perf_counter()
                if received == expected:
                    last = perf_counter()
                    done.set()


async def _run_sink(node: Any, host: str, send: Any, messages: int) -> dict[str, Any]:
    """One throughput run: announce it, send with ``send()``, ask what arrived."""
    await node.request(host, TOPIC_SINK, str(messages).encode())
    await send()
    report = json.loads(await node.request(host, TOPIC_RESULT, b"", timeout=WAIT_S + 5))
    report["lost"] = messages - report["count"]
    return report


async def node_client(
    state_dir: Path, peer_dir: Path, host: str, port: int, plan: dict[str, Any]
) -> dict[str, Any]:
    """The sender as a user writes it: ``await node.send()`` in a loop (and,
    separately, ``send_many`` in batches), default settings, no pacing."""
    from .node import Node

    peer_id = load_identity(peer_dir).node_id
    config = _node_config(state_dir, plan["local_host"], 0, peer_id, peers=[(host, port)])
    result: dict[str, Any] = {"throughput": {}, "send_many": [], "rtt": [], "lost": 0}
    messages, batch = plan["messages"], plan["batch"]
    async with Node(config) as node:
        # The first call waits for the dial and the handshake.
        await node.request(host, TOPIC_ECHO, b"", wait_s=10)
        with anyio.fail_after(WAIT_S * plan["runs"] * 4):
            for _ in range(plan["runs"]):
                for size in plan["sizes"]:
                    payload = bytes(size)

                    async def one_by_one(payload: bytes = payload) -> None:
                        for _ in range(messages):
                            await node.send(host, TOPIC_DATA, payload)

                    report = await _run_sink(node, host, one_by_one, messages)
                    result["lost"] += report["lost"]
                    rate = (report["count"] - 1) / report["elapsed_s"]
                    result["throughput"].setdefault(str(size), []).append(rate)
                payloads = [bytes(plan["send_many_bytes"])] * batch

                async def in_batches(payloads: list[bytes] = payloads) -> None:
                    for _ in range(messages // batch):
                        await node.send_many(host, TOPIC_DATA, payloads)

                report = await _run_sink(node, host, in_batches, messages // batch * batch)
                result["lost"] += report["lost"]
                result["send_many"].append((report["count"] - 1) / report["elapsed_s"])
                payload = bytes(plan["rtt_bytes"])
                times = []
                for _ in range(plan["requests"]):
                    started = perf_counter()
                    await node.request(host, TOPIC_ECHO, payload)
                    times.append(perf_counter() - started)
                result["rtt"].append(times)
        result["stats"] = node.stats()
    return result


# -- entry point ---------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``ROLE STATE_DIR PEER_STATE_DIR HOST PORT [PLAN_JSON]``; returns the exit status."""
    import logging

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    role, state_dir, peer_dir, host, port = argv[0], Path(argv[1]), Path(argv[2]), argv[3], argv[4]
    plan: dict[str, Any] = json.loads(argv[5]) if len(argv) > 5 else {}
    if role == "ref-server":
        anyio.run(ref_server, state_dir, peer_dir, host, int(port))
    elif role == "node-server":
        anyio.run(node_server, state_dir, peer_dir, host, int(port))
    elif role == "ref-client":
        _print(anyio.run(ref_client, state_dir, peer_dir, host, int(port), plan))
    elif role == "node-client":
        _print(anyio.run(node_client, state_dir, peer_dir, host, int(port), plan))
    else:
        print(f"error: unknown role {role!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
