"""A simulated microcontroller on a pseudo-terminal, for the demo and tests.

It runs the real ``firmware_bridge.driver.Device`` (the code a board runs)
under CPython's asyncio, on the master side of a pseudo-terminal whose
slave side a node opens as its serial port. CPython and asyncio only; the
node itself never imports this module.
"""

from __future__ import annotations

import asyncio
import os
import tty
from typing import Any

from firmware_bridge.driver import Device


class PtyPair:
    """A pseudo-terminal: ``path`` is the "UART" a node opens; we hold the master."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)  # or the line discipline would echo bytes back
        self.path = os.ttyname(slave)
        # Keep the slave open until the node has it, so nothing written is lost
        # to a hang-up; the owner closes it with release_slave().
        self._slave: int | None = slave

    def release_slave(self) -> None:
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None

    def close(self) -> None:
        """Close both ends: the node's port then reads EIO, like a pulled cable."""
        self.release_slave()
        if self.master >= 0:
            try:
                os.close(self.master)
            except OSError:
                pass
            self.master = -1


async def open_streams(
    fd: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.BaseTransport]:
    """asyncio streams over a pseudo-terminal master, on duplicates of ``fd``.

    Returns (reader, writer, read transport); close the writer's transport
    and the read transport to let go of the line.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb", buffering=0)
    )
    write_transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(os.dup(fd), "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(write_transport, protocol, None, loop)
    return reader, writer, read_transport


class SimulatedDevice:
    """A Device running on a pseudo-terminal in this process's asyncio loop."""

    def __init__(self, device_id: str, pty: PtyPair | None = None, **device_kw: Any) -> None:
        self.device_id = device_id
        self.pty = pty or PtyPair()
        self.device_kw = device_kw
        self.device: Device | None = None
        self._task: asyncio.Task[Any] | None = None
        self._transports: list[asyncio.BaseTransport] = []

    async def start(self) -> Device:
        """Start (or restart, as after a reboot: a new epoch) the device."""
        await self.stop()
        reader, writer, read_transport = await open_streams(self.pty.master)
        self._transports = [read_transport, writer.transport]
        self.device = Device(reader, writer, self.device_id, **self.device_kw)
        self._task = asyncio.get_running_loop().create_task(self.device.run())
        return self.device

    async def stop(self) -> None:
        """Stop the device (it stops answering), keeping the line."""
        if self.device is not None:
            self.device.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        for transport in self._transports:
            transport.close()
        self._transports = []
        await asyncio.sleep(0)  # let the transports close their descriptors

    async def aclose(self) -> None:
        await self.stop()
        self.pty.close()
