"""Serial ports driven from the node's anyio loop, without threads.

pyserial opens and configures the port (baud rate, raw mode, exclusive
access); after that the node reads and writes the port's file descriptor
itself, waiting with ``anyio.wait_readable`` / ``wait_writable``. Nothing
here polls, sleeps or calls another ``select``: the port is one more source
for the node's single loop.

A port that vanishes (USB unplugged, the other end of a pseudo-terminal
closed) reads as end-of-file or fails with EIO; both surface as
``anyio.BrokenResourceError`` so the owner can reopen it with backoff. A
port that cannot be opened raises :class:`SerialUnavailable`, whose
``kind`` says why (missing, busy, denied, or another error) and whose
message says what to do about it. pyserial is imported only when a port is
opened.

DTR and RTS: pyserial applies the states set on an unopened ``Serial`` when
it opens it (``serialposix.Serial.open`` sets DTR, then RTS, right after
configuring the port; both default to asserted). The kernel asserts both
as the device file opens, so a line asked to be off is asserted for the
moment between the two (docs/microcontrollers.md, "DTR and RTS").
"""

from __future__ import annotations

import errno
import os
from typing import Any

import anyio

from ..errors import EdgeNodeError

DEFAULT_BAUD = 115200
_GONE = (errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF)


#: SerialUnavailable.kind values.
MISSING = "missing"
BUSY = "busy"
DENIED = "denied"
FAILED = "error"

_MISSING = (errno.ENOENT, errno.ENODEV, errno.ENXIO)
_BUSY = (errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK)
_DENIED = (errno.EACCES, errno.EPERM)


class SerialUnavailable(EdgeNodeError):
    """A serial port cannot be opened (missing, busy, or not permitted).

    ``kind`` is one of ``MISSING``, ``BUSY``, ``DENIED`` or ``FAILED``; the
    message says what was tried, what went wrong, and the fix.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def unavailable(path: str, exc: BaseException) -> SerialUnavailable:
    """The :class:`SerialUnavailable` for a failure to open ``path``, with the fix."""
    number = getattr(exc, "errno", None)
    detail = os.strerror(number).lower() if isinstance(number, int) else str(exc)
    if number in _MISSING:
        return SerialUnavailable(
            f"serial port {path} is missing ({detail}): waiting for it; plug the device in, "
            f"or check the path (ls -l /dev/serial/by-id/)",
            MISSING,
        )
    if number in _DENIED:
        user, group = _user_and_group(path)
        return SerialUnavailable(
            f"serial port {path}: {detail}: the node's user {user} may not open it; add it "
            f"to the port's group (sudo usermod -aG {group} {user}) and restart the node",
            DENIED,
        )
    if number in _BUSY:
        return SerialUnavailable(
            f"serial port {path} is busy ({detail}): another program has it open; "
            f"stop that program (sudo fuser -v {path} names it)",
            BUSY,
        )
    return SerialUnavailable(f"cannot open serial port {path}: {exc}", FAILED)


def _user_and_group(path: str) -> tuple[str, str]:
    """This process's user name and the group of the device file (``dialout`` if unknown)."""
    import grp
    import pwd

    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(os.stat(path).st_gid).gr_name
    except (KeyError, OSError):
        group = "dialout"
    if group == "root":
        group = "dialout"  # no one should join root's group: give the usual serial group
    return user, group


class SerialPort:
    """One open serial port: ``await receive()``, ``await send()``, ``close()``."""

    __slots__ = ("_port", "baud", "fd", "path")

    def __init__(self, port: Any, path: str, baud: int) -> None:
        self._port = port
        self.path = path
        self.baud = baud
        self.fd: int = port.fileno()

    @classmethod
    def open(
        cls, path: str, baud: int = DEFAULT_BAUD, *, dtr: bool = True, rts: bool = True
    ) -> SerialPort:
        """Open ``path`` at ``baud``, raw, non-blocking and exclusive, with the
        DTR and RTS lines as given (True: asserted).

        Raises :class:`SerialUnavailable` with the reason and the fix.
        """
        import serial  # pyserial: only nodes with a serial bridge load it

        try:
            port = serial.Serial(baudrate=baud, timeout=0, write_timeout=0, exclusive=True)
            # Set before open(): pyserial applies them as it opens the port.
            port.dtr = dtr
            port.rts = rts
            port.port = path
            port.open()
        except (serial.SerialException, OSError, ValueError) as exc:
            raise unavailable(path, exc) from None
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
