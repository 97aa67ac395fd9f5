"""A connection through the fault-injecting proxy, and the pipes that carry its bytes.

Each accepted connection is a :class:`ProxiedConnection`: the dialler's
socket (the ``client`` side) and the target's (the ``target`` side), each a
:class:`Side`. :func:`pipe` carries one direction through its
:class:`~edgenode.testing.proxy_lanes.Lane`: a reader feeding a delay line,
and a writer that holds each chunk until it is due, in order, and drops
what the lane black-holes. Everything here runs in the proxy's own loop
(:class:`~edgenode.testing.proxy.TcpProxy`).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import anyio

from .proxy_lanes import Lane, Route

RST = "rst"
FIN = "fin"
CLIENT = "client"
TARGET = "target"

_READ_BYTES = 65536
# Chunks a lane may hold in its delay line before its reader waits.
_DELAY_LINE_CHUNKS = 4096
# Markers in a delay line, after the data: the sender closed (FIN) or reset.
_EOF = b""
_RESET = None


class Side:
    """One socket of a proxied connection (asyncio streams: the proxy's loop is asyncio)."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes | None:
        """The next chunk; b"" at the end of the stream; None if it was reset."""
        try:
            return await self.reader.read(_READ_BYTES)
        except OSError:
            return _RESET

    async def write(self, data: bytes) -> bool:
        """Write ``data`` and wait for room; False if the socket is gone."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (OSError, RuntimeError):  # RuntimeError: the transport is closing
            return False
        return True

    def send_eof(self) -> None:
        """Send a FIN (half-close); we may still read."""
        transport = self.writer.transport
        if not transport.is_closing():
            try:
                self.writer.write_eof()
            except OSError:
                pass

    def reset(self) -> None:
        """Close at once with a reset (RST): SO_LINGER 0, then abort."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # already closed
        self.writer.transport.abort()

    def close(self, how: str | None = None) -> None:
        """Close: RST, FIN, or (None) as the kernel sees fit."""
        if how == RST:
            self.reset()
        elif not self.writer.transport.is_closing():
            if how == FIN:
                self.send_eof()
            self.writer.transport.close()


class ProxiedConnection:
    """One connection through a route: the dialler's socket (``client``) and the target's."""

    __slots__ = ("client", "forwarding", "route", "target")

    def __init__(self, route: Route, client: Side, target: Side) -> None:
        self.route = route
        self.client = client
        self.target = target
        # False once cut or half-opened: nothing is passed on any more.
        self.forwarding = True


async def pipe(conn: ProxiedConnection, src: Side, dst: Side, lane: Lane) -> None:
    """Carry one direction of ``conn``: a reader feeding a delay line, and a writer."""
    line_send, line_recv = anyio.create_memory_object_stream(_DELAY_LINE_CHUNKS)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_write, conn, dst, line_recv, lane)
        async with line_send:
            last_due = 0.0
            while True:
                while lane.paused:
                    await lane.wait_resumed()
                item = await src.read()
                # A read already waiting when the pause began holds its chunk.
                while lane.paused:
                    await lane.wait_resumed()
                due = anyio.current_time() + lane.hold_s()
                last_due = due = max(due, last_due)
                if not conn.forwarding:
                    if item:
                        lane.bytes_dropped += len(item)
                        continue
                    return
                await line_send.send((due, item))
                if not item:
                    return


async def _write(conn: ProxiedConnection, dst: Side, line: Any, lane: Lane) -> None:
    broken = False
    async with line:
        async for due, item in line:
            wait_s = due - anyio.current_time()
            if wait_s > 0:
                await anyio.sleep(wait_s)
            if broken or lane.dropping or not conn.forwarding:
                # A close is black-holed too: the far end is left to notice.
                if item:
                    lane.bytes_dropped += len(item)
                else:
                    lane.closes_dropped += 1
                continue
            if item is _RESET:
                dst.reset()
            elif not item:
                dst.send_eof()
            elif await dst.write(item):
                lane.bytes_forwarded += len(item)
            else:
                broken = True
                lane.bytes_dropped += len(item)
