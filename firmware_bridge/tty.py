"""A Linux tty or pty as the Device's stream, for running the driver off a board.

The Device needs a reader whose ``read(n)`` returns what has arrived (at
least one byte, at most ``n``; ``b""`` only at the end of the stream) and a
writer with ``write(data)`` and ``drain()`` (docs/microcontrollers.md, "The
stream contract"). A tty read with the default VMIN 1 and blocking file
objects break that contract: a blocking ``read(n)`` waits for ``n`` bytes and
freezes the loop. :func:`open_tty` sets the line raw with VMIN 0 and VTIME 0
(a read returns what is there at once) and gives a pair that keeps the
contract::

    reader, writer = await open_tty("/dev/ttyUSB0", 115200)
    device = Device(reader, writer, "bench-1")

On CPython the reader waits with the event loop's ``add_reader`` (no
polling, no thread). On MicroPython's unix port it wraps the file in
asyncio's own streams, which wait with ``select.poll``; the line is set raw
with ``termios`` when micropython-lib's unix-ffi ``termios`` is installed,
and must otherwise be set beforehand (``stty -F PATH raw -echo min 0 time 0
BAUD``). Not for boards: a board's ``machine.UART`` already keeps the
contract through ``asyncio.StreamReader(uart)``.

Raises OSError when the path cannot be opened or set up.
"""

import os

try:
    import asyncio
except ImportError:  # MicroPython before 1.20
    import uasyncio as asyncio  # type: ignore[no-redef]

try:
    import termios
except ImportError:  # MicroPython without micropython-lib's unix-ffi termios
    termios = None

try:
    from typing import TYPE_CHECKING
except ImportError:
    TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_BAUDS = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)


def set_raw(fd: int, baud: int) -> None:
    """Set the tty on ``fd`` raw, 8N1, at ``baud``, with VMIN 0 and VTIME 0."""
    if baud not in _BAUDS:
        raise ValueError(f"baud should be one of {', '.join(map(str, _BAUDS))}, got {baud!r}")
    attrs = termios.tcgetattr(fd)
    speed = getattr(termios, "B" + str(baud))
    attrs[0] = 0  # iflag: no break, parity, CR/NL or flow-control handling
    attrs[1] = 0  # oflag: no output processing
    attrs[2] = termios.CS8 | termios.CREAD | termios.CLOCAL  # cflag: 8N1, no modem lines
    attrs[3] = 0  # lflag: no echo, no canonical mode, no signals
    attrs[4] = speed
    attrs[5] = speed
    cc = attrs[6]
    cc[termios.VMIN] = 0  # a read returns what is there, even nothing
    cc[termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class TTYReader:
    """``read(n)`` returns what has arrived: at least one byte, or b"" at end of stream."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    async def read(self, n: int) -> bytes:
        while True:
            try:
                data = os.read(self.fd, n)
            except BlockingIOError:
                data = b""
            if data:
                return data
            # VMIN 0: nothing there yet (a pty whose other end closed raises
            # EIO instead, which ends the Device's run()).
            await self._readable()

    def _readable(self) -> "Any":
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.add_reader(self.fd, future.set_result, None)
        future.add_done_callback(lambda _: loop.remove_reader(self.fd))
        return future


class TTYWriter:
    """``write(data)`` queues, ``drain()`` waits until the line took everything."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = bytearray()

    def write(self, data: "bytes | bytearray | memoryview") -> None:
        self._pending += data

    async def drain(self) -> None:
        while self._pending:
            try:
                sent = os.write(self.fd, self._pending)
            except BlockingIOError:
                sent = 0
            self._pending[:sent] = b""
            if self._pending:
                await self._writable()

    def _writable(self) -> "Any":
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.add_writer(self.fd, future.set_result, None)
        future.add_done_callback(lambda _: loop.remove_writer(self.fd))
        return future

    def close(self) -> None:
        """Close the line (both streams share it). Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


async def open_tty(path: str, baud: int = 115200) -> "tuple[Any, Any]":
    """Open the tty or pty at ``path`` for a Device: return (reader, writer).

    Close it with ``writer.close()``. Raises OSError (or ValueError for a
    baud rate a tty cannot take).
    """
    if hasattr(os, "O_NONBLOCK"):  # CPython
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            set_raw(fd, baud)
        except BaseException:
            os.close(fd)
            raise
        writer = TTYWriter(fd)
        return TTYReader(fd), writer
    # MicroPython's unix port: asyncio's streams over the file wait with poll.
    f = open(path, "r+b")
    if termios is not None:
        set_raw(f.fileno(), baud)
    return asyncio.StreamReader(f), asyncio.StreamWriter(f, {})
