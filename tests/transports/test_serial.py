"""The serial transport on real pseudo-terminals opened with pyserial."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tty
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import serial

from edgenode.config import SerialPortSpec, parse_serial_spec
from edgenode.errors import ConfigError
from edgenode.transports.serial import (
    BUSY,
    DENIED,
    MISSING,
    SerialPort,
    SerialUnavailable,
)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize(("dtr", "rts"), [(True, True), (False, False), (True, False)])
def test_open_sets_dtr_and_rts_before_opening(
    pty_pair: tuple[int, str], dtr: bool, rts: bool
) -> None:
    # A pty has no modem lines (pyserial ignores the ioctl's ENOTTY there);
    # what is checked is what pyserial was told, before open() applied it.
    _, path = pty_pair
    port = SerialPort.open(path, dtr=dtr, rts=rts)
    try:
        assert port._port.is_open
        assert (port._port.dtr, port._port.rts) == (dtr, rts)
    finally:
        port.close()


def test_open_rejects_missing_port_with_the_fix() -> None:
    with pytest.raises(SerialUnavailable) as raised:
        SerialPort.open("/dev/ttyNOPE0")
    assert raised.value.kind == MISSING
    assert str(raised.value) == (
        "serial port /dev/ttyNOPE0 is missing (no such file or directory): waiting for it; "
        "plug the device in, or check the path (ls -l /dev/serial/by-id/)"
    )


def test_open_rejects_busy_port_with_the_fix(pty_pair: tuple[int, str]) -> None:
    _, path = pty_pair
    other = serial.Serial(path, exclusive=True)  # another program holds it
    try:
        with pytest.raises(SerialUnavailable) as raised:
            SerialPort.open(path)
    finally:
        other.close()
    assert raised.value.kind == BUSY
    assert str(raised.value) == (
        f"serial port {path} is busy (resource temporarily unavailable): another program "
        f"has it open; stop that program (sudo fuser -v {path} names it)"
    )
    SerialPort.open(path).close()  # free again


_OPEN_AS_OTHER = """
import sys
from edgenode.transports.serial import SerialPort, SerialUnavailable
try:
    SerialPort.open(sys.argv[1])
except SerialUnavailable as exc:
    print(exc.kind)
    print(exc)
"""


def without_the_right_to_open_anything() -> list[str]:
    """A command prefix under which this user is refused a file its mode
    refuses: as root, root without the capabilities that override file
    modes (setpriv); otherwise, nothing."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot drop the right to open a tty")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", caps, "--inh-caps", caps]


def port_group(path: str) -> str:
    """The group the fix names: the device file's (dialout for a root-owned one)."""
    import grp

    group = grp.getgrgid(os.stat(path).st_gid).gr_name
    return "dialout" if group == "root" else group


def test_open_rejects_a_port_it_may_not_open_with_the_fix(pty_pair: tuple[int, str]) -> None:
    _, path = pty_pair
    os.chmod(path, 0)  # as a tty a user is not in the group of
    command = [*without_the_right_to_open_anything(), sys.executable, "-c", _OPEN_AS_OTHER, path]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    kind, message = result.stdout.splitlines()
    assert kind == DENIED, result.stderr
    import pwd

    user = pwd.getpwuid(os.geteuid()).pw_name
    group = port_group(path)
    assert message == (
        f"serial port {path}: permission denied: the node's user {user} may not open it; "
        f"add it to the port's group (sudo usermod -aG {group} {user}) and restart the node"
    )


def test_serial_spec_parsing() -> None:
    assert parse_serial_spec("/dev/ttyAMA0") == SerialPortSpec("/dev/ttyAMA0")
    assert parse_serial_spec("/dev/ttyUSB0:9600") == ("/dev/ttyUSB0", 9600, None, None)
    spec = parse_serial_spec("/dev/ttyUSB0:9600,dtr=off,rts=on")
    assert spec == SerialPortSpec("/dev/ttyUSB0", 9600, False, True)
    assert str(spec) == "/dev/ttyUSB0:9600,dtr=off,rts=on"
    assert parse_serial_spec("/dev/serial/by-id/usb-x,rts=OFF") == (
        "/dev/serial/by-id/usb-x",
        None,
        None,
        False,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "/dev/ttyUSB0:fast",
            "serial port '/dev/ttyUSB0:fast': baud rate should be 50..4000000, got 'fast'",
        ),
        (":9600", "serial port ':9600': missing device path"),
        (",dtr=on", "serial port ',dtr=on': missing device path"),
        (
            "/dev/ttyUSB0,dtr=maybe",
            "serial port '/dev/ttyUSB0,dtr=maybe': dtr should be on or off, got 'maybe'",
        ),
        (
            "/dev/ttyUSB0,parity=even",
            "serial port '/dev/ttyUSB0,parity=even': unknown option 'parity=even', "
            "expected dtr=on|off or rts=on|off",
        ),
        (
            "/dev/ttyUSB0,rts",
            "serial port '/dev/ttyUSB0,rts': unknown option 'rts', "
            "expected dtr=on|off or rts=on|off",
        ),
    ],
)
def test_serial_spec_rejects_bad_text(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_serial_spec(text)
    assert str(raised.value) == message
