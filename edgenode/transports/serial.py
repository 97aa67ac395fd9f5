"""Serial ports driven from the node's anyio loop, without threads.

pyserial opens and configures the port (baud rate, raw mode, exclusive
access); after that the node reads and writes the port's file descriptor
itself, waiting with ``anyio.wait_readable`` / ``wait_writable``. Nothing
here polls, sleeps or calls another ``select``: the port is one more source
for the node's single loop.

A port that vanishes (USB unplugged, the other end of a pseudo-terminal
closed) reads as end-of-file or fails with EIO; both surface as
``anyio.BrokenResourceError`` so the owner can reopen it with backoff.
pyserial is imported only when a port is opened.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import anyio

from ..config import MAX_BAUD, MIN_BAUD
from ..errors import ConfigError, EdgeNodeError

DEFAULT_BAUD = 115200
_GONE = (errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF)


class SerialUnavailable(EdgeNodeError):
    """A serial port cannot be opened (missing, busy, or not permitted)."""


def parse_serial_spec(text: str) -> tuple[str, int]:
    """Parse ``PORT[:BAUD]`` (``/dev/ttyAMA0:115200``); raise :class:`ConfigError`."""
    path, sep, baud_text = text.rpartition(":")
    if not sep or "/" in baud_text:
        return text, DEFAULT_BAUD
    if not path:
        raise ConfigError(f"serial port {text!r}: missing device path")
    if not baud_text.isdigit() or not MIN_BAUD <= int(baud_text) <= MAX_BAUD:
        raise ConfigError(
            f"serial port {text!r}: baud rate should be {MIN_BAUD}..{MAX_BAUD}, got {baud_text!r}"
        )
    return path, int(baud_text)


class SerialPort:
    """One open serial port: ``await receive()``, ``await send()``, ``close()``."""

    __slots__ = ("_port", "baud", "fd", "path")

    def __init__(self, port: Any, path: str, baud: int) -> None:
        self._port = port
        self.path = path
        self.baud = baud
        self.fd: int = port.fileno()

    @classmethod
    def open(cls, path: str, baud: int = DEFAULT_BAUD) -> SerialPort:
        """Open ``path`` at ``baud``, raw and non-blocking.

        Raises :class:`SerialUnavailable` with the reason.
        """
        import serial  # pyserial: only nodes with a serial bridge load it

        try:
            port = serial.Serial(
                port=path, baudrate=baud, timeout=0, write_timeout=0, exclusive=True
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise SerialUnavailable(f"cannot open serial port {path}: {exc}") from None
        return cls(port, path, baud)

    async def receive(self, max_bytes: int = 4096) -> bytes:
        """Wait for and return the bytes available (at most ``max_bytes``).

        Raises ``anyio.BrokenResourceError`` when the port has gone away and
        ``anyio.ClosedResourceError`` after :meth:`close`.
        """
        while True:
            if self.fd < 0:
                raise anyio.ClosedResourceError
            await anyio.wait_readable(self.fd)
            try:
                data = os.read(self.fd, max_bytes)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise self._gone(exc) from None
            if not data:
                raise anyio.BrokenResourceError(f"{self.path}: end of file (unplugged?)")
            return data

    async def send(self, data: bytes) -> None:
        """Write all of ``data``, waiting for room without blocking the loop."""
        view = memoryview(data)
        while view:
            if self.fd < 0:
                raise anyio.ClosedResourceError
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                await anyio.wait_writable(self.fd)
                continue
            except OSError as exc:
                raise self._gone(exc) from None
            view = view[written:]

    def _gone(self, exc: OSError) -> Exception:
        """The error to raise for a failed read or write: a vanished port is
        ``BrokenResourceError``; anything else stays what it was."""
        if exc.errno in _GONE:
            return anyio.BrokenResourceError(f"{self.path}: {os.strerror(exc.errno)}")
        return exc

    def close(self) -> None:
        """Close the port; idempotent."""
        if self.fd >= 0:
            self.fd = -1
            try:
                self._port.close()
            except OSError:
                pass
