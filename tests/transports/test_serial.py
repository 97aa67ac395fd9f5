"""The serial transport on real pseudo-terminals opened with pyserial."""

from __future__ import annotations

import os
import tty
from collections.abc import Iterator

import anyio
import pytest

from edgenode.errors import ConfigError
from edgenode.transports.serial import SerialPort, SerialUnavailable, parse_serial_spec

pytestmark = pytest.mark.anyio


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, str]]:
    """(master fd, slave path): the test plays the microcontroller on the master."""
    master, slave = os.openpty()
    tty.setraw(slave)  # or the line discipline echoes bytes back
    path = os.ttyname(slave)
    os.close(slave)
    yield master, path
    try:
        os.close(master)
    except OSError:
        pass


async def test_port_moves_bytes_both_ways(pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    port = SerialPort.open(path, 115200)
    try:
        os.write(master, b"\x00frame\x00")
        with anyio.fail_after(2):
            got = b""
            while got != b"\x00frame\x00":
                got += await port.receive()
        await port.send(b"reply" * 1000)
        received = b""
        with anyio.fail_after(2):
            while len(received) < 5000:
                await anyio.wait_readable(master)
                received += os.read(master, 65536)
        assert received == b"reply" * 1000
    finally:
        port.close()
        port.close()  # idempotent


async def test_port_reports_unplug_as_broken(pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    port = SerialPort.open(path)
    os.close(master)  # the "cable" is pulled
    with anyio.fail_after(2), pytest.raises(anyio.BrokenResourceError, match=path):
        await port.receive()
    port.close()


async def test_closed_port_raises_closed(pty_pair: tuple[int, str]) -> None:
    _, path = pty_pair
    port = SerialPort.open(path)
    port.close()
    with pytest.raises(anyio.ClosedResourceError):
        await port.receive()
    with pytest.raises(anyio.ClosedResourceError):
        await port.send(b"x")


def test_open_rejects_missing_port(tmp_path: object) -> None:
    with pytest.raises(SerialUnavailable, match=r"cannot open serial port /dev/nonexistent-tty: "):
        SerialPort.open("/dev/nonexistent-tty")


def test_serial_spec_parsing() -> None:
    assert parse_serial_spec("/dev/ttyAMA0") == ("/dev/ttyAMA0", 115200)
    assert parse_serial_spec("/dev/ttyUSB0:9600") == ("/dev/ttyUSB0", 9600)
    with pytest.raises(ConfigError, match=r"baud rate should be 50..4000000, got 'fast'"):
        parse_serial_spec("/dev/ttyUSB0:fast")
    with pytest.raises(ConfigError, match=r"missing device path"):
        parse_serial_spec(":9600")
