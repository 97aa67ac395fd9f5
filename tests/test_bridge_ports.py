"""Serial ports as a user sees them: faults logged once with the fix, status, DTR/RTS.

Real pseudo-terminals opened with pyserial; a real ``edgenode run`` process
where the log a user sees at the default level is what is checked.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import serial

from edgenode.config import SerialPortSpec
from edgenode.node import Node, PeerDown, PeerUp
from edgenode.settings import resolve
from edgenode.simdevice import PtyPair, SimulatedDevice
from edgenode.status_text import format_status
from firmware_bridge.link import MEMORY_TOPIC

from .conftest import wait_event, wait_until
from .test_cli import NodeProcess, _env, edgenode, free_port, keygen
from .transports.test_serial import port_group, without_the_right_to_open_anything

pytestmark = pytest.mark.anyio

DEVICE = "127.0.0.2/pico-1"
FAST = dict(keepalive_interval_ms=100, keepalive_timeout_ms=400)
#: Reopen quickly, so that a test sees several tries in a moment.
QUICK_REOPEN = dict(
    backoff_base_s=0.02,
    backoff_cap_s=0.05,
    serial_keepalive_interval_s=0.1,
    serial_keepalive_timeout_s=0.4,
)


def warnings_about(caplog: pytest.LogCaptureFixture, path: object) -> list[str]:
    """The WARNING lines the node logged that name ``path``, in order."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and str(path) in r.getMessage()
    ]


def row_of(node: Node, index: int = 0) -> dict[str, Any]:
    return node.stats()["serial_ports"][index]  # type: ignore[no-any-return]


async def wait_for_tries(node: Node, tries: int, index: int = 0) -> None:
    await wait_until(lambda: row_of(node, index)["attempts"] >= tries)


@pytest.fixture
def pty_pair() -> Iterator[PtyPair]:
    pty = PtyPair()
    yield pty
    pty.close()


# -- faults: once each, and once more when the port is back --------------------------------


async def test_missing_port_is_waited_for_and_said_once_then_when_it_appears(
    make_config: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "edgenode")
    link = tmp_path / "ttyLATER"  # as /dev/serial/by-id/... appears when plugged in
    config = make_config("a", "127.0.0.2", serial_ports=[(str(link), 115200)], **QUICK_REOPEN)
    sim = SimulatedDevice("pico-1", **FAST)
    try:
        async with Node(config) as a:
            events = a.events()
            await wait_for_tries(a, 5)
            row = row_of(a)
            assert (row["state"], row["error"], row["device"]) == (
                "waiting for the device",
                None,
                None,
            )
            assert warnings_about(caplog, link) == [
                f"serial port {link} is missing (no such file or directory): waiting for it; "
                "plug the device in, or check the path (ls -l /dev/serial/by-id/)"
            ]
            os.symlink(sim.pty.path, link)  # plugged in
            await sim.start()
            await wait_event(events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
            sim.pty.release_slave()
            said = warnings_about(caplog, link)
            assert len(said) == 2
            assert said[1].startswith(
                f"serial port {link} is open again at 115200 baud (it was waiting for the "
                "device for "
            )
            row = row_of(a)
            assert (row["state"], row["device"], row["session"], row["attempts"]) == (
                "open",
                "pico-1",
                "up",
                0,
            )
    finally:
        await sim.aclose()


async def test_busy_port_is_said_once_with_the_fix_then_when_it_is_free(
    make_config: Any, pty_pair: PtyPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "edgenode")
    other = serial.Serial(pty_pair.path, exclusive=True)  # another program has it
    config = make_config("a", "127.0.0.2", serial_ports=[(pty_pair.path, 115200)], **QUICK_REOPEN)
    busy = (
        f"serial port {pty_pair.path} is busy (resource temporarily unavailable): another "
        f"program has it open; stop that program (sudo fuser -v {pty_pair.path} names it)"
    )
    try:
        async with Node(config) as a:
            await wait_for_tries(a, 5)
            assert warnings_about(caplog, pty_pair.path) == [busy]
            row = row_of(a)
            assert (row["state"], row["error"]) == ("error", busy)
            text = format_status({"node": a.stats(), "peers": []})
            assert f"  serial     {pty_pair.path} at 115200 baud: error for " in text
            assert f" tries): {busy}" in text
            other.close()
            await wait_until(lambda: row_of(a)["state"] == "open")
            said = warnings_about(caplog, pty_pair.path)
            assert said[1].startswith(
                f"serial port {pty_pair.path} is open again at 115200 baud (it was in error "
                "(busy) for "
            )
            assert len(said) == 2
    finally:
        other.close()


async def test_port_lost_while_open_is_said_once_and_again_when_it_is_back(
    make_config: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "edgenode")
    link = tmp_path / "ttyPICO"
    sim = SimulatedDevice("pico-1", **FAST)
    os.symlink(sim.pty.path, link)
    config = make_config("a", "127.0.0.2", serial_ports=[(str(link), 115200)], **QUICK_REOPEN)
    try:
        async with Node(config) as a:
            events = a.events()
            await sim.start()
            await wait_event(events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
            sim.pty.release_slave()
            assert warnings_about(caplog, link) == []  # open at once: nothing to warn of
            await sim.stop()
            sim.pty.close()  # unplugged: the port reads EOF, then its file is gone
            os.unlink(link)
            await wait_event(events, lambda e: isinstance(e, PeerDown) and e.peer == DEVICE)
            await wait_for_tries(a, 5)
            lost = (
                f"serial port {link} lost: {link}: end of file (unplugged?); "
                "waiting for it to come back"
            )
            # The device going down is said too; the port's missing file is no new fault.
            assert [w for w in warnings_about(caplog, link) if w.startswith("serial port")] == [
                lost
            ]
            sim.pty = PtyPair()
            os.symlink(sim.pty.path, link)
            await sim.start()
            await wait_event(events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
            sim.pty.release_slave()
            said = [w for w in warnings_about(caplog, link) if w.startswith("serial port")]
            assert said[1].startswith(
                f"serial port {link} is open again at 115200 baud (it was lost for "
            )
            assert len(said) == 2
    finally:
        await sim.aclose()


# Its own waits (keygen, two log lines, a status, the exit) fail with what the
# node printed. It used to hang now and then on a loaded CI run: it selected on
# the pipe under a text reader that had already buffered the line it wanted.
@pytest.mark.timeout(300)
def test_port_not_permitted_is_said_once_with_the_fix_then_when_permitted(
    pty_pair: PtyPair, tmp_path: Path
) -> None:
    """A real ``edgenode run`` whose user may not open the port: one warning
    with the fix at the default log level, the node runs on, and one more
    line once the port is made available."""
    os.chmod(pty_pair.path, 0)  # as a tty a user is not in the group of
    state = tmp_path / "state"
    keygen(tmp_path, state)
    prefix = without_the_right_to_open_anything()
    port = free_port("127.0.0.2")
    args = ["--state-dir", str(state)]
    run = [*args, "--listen", f"127.0.0.2:{port}", "--serial", pty_pair.path]
    node = NodeProcess(tmp_path, [*run, "--backoff-cap", "0.5"], prefix=prefix)
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = port_group(pty_pair.path)
        denied = (
            f"WARNING serial port {pty_pair.path}: permission denied: the node's user {user} "
            f"may not open it; add it to the port's group (sudo usermod -aG {group} {user}) "
            "and restart the node"
        )
        node.wait_for("serial port .* permission denied", timeout_s=60)
        status = _status(prefix, args, tmp_path)
        [row] = status["node"]["serial_ports"]
        assert row["state"] == "error" and "permission denied" in row["error"]
        os.chmod(pty_pair.path, 0o666)  # the user was given the port
        node.wait_for("is open again", timeout_s=60)
    finally:
        node.stop(signal.SIGTERM, timeout_s=30)
    about = [line for line in node.lines if f"serial port {pty_pair.path}" in line]
    assert [line.split(" ", 1)[1] for line in about[:1]] == [denied]
    assert len(about) == 2, node.log()
    assert (
        about[1]
        .split(" ", 1)[1]
        .startswith(
            f"WARNING serial port {pty_pair.path} is open again at 115200 baud (it was in "
            "error (denied) for "
        )
    )


def _status(prefix: list[str], args: list[str], tmp_path: Path) -> dict[str, Any]:
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "edgenode", "status", "--json", *args],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.timeout(120)
def test_edgenode_run_with_a_missing_port_says_so_once_and_shows_it_in_status(
    tmp_path: Path,
) -> None:
    """Regression: ``--serial /dev/ttyNOPE0`` was silent at the default log level."""
    state = tmp_path / "state"
    keygen(tmp_path, state)
    port = free_port("127.0.0.2")
    args = ["--state-dir", str(state), "--listen", f"127.0.0.2:{port}", "--serial", "/dev/ttyNOPE0"]
    node = NodeProcess(tmp_path, [*args, "--backoff-cap", "0.5"])
    try:
        node.wait_for("listening on")
        node.wait_for("serial port /dev/ttyNOPE0 is missing")
        end = time.monotonic() + 60  # a bound for a slow board: natively about 2 s
        while True:  # until the node has tried the port a few times
            result = edgenode(tmp_path, "status", "--json", "--state-dir", str(state))
            assert result.returncode == 0, result.stderr
            [row] = json.loads(result.stdout)["node"]["serial_ports"]
            if row["attempts"] >= 4:
                break
            assert time.monotonic() < end, row
        assert (row["path"], row["state"], row["error"]) == (
            "/dev/ttyNOPE0",
            "waiting for the device",
            None,
        )
        text = edgenode(tmp_path, "status", "--state-dir", str(state)).stdout
        assert "  serial     /dev/ttyNOPE0 at 115200 baud: waiting for the device for " in text
    finally:
        code = node.stop(signal.SIGTERM)
    assert code == 0, node.log()
    said = [line for line in node.lines if "/dev/ttyNOPE0" in line]
    assert said == [
        said[0].split(" ", 1)[0] + " WARNING serial port /dev/ttyNOPE0 is missing (no such file "
        "or directory): waiting for it; plug the device in, or check the path "
        "(ls -l /dev/serial/by-id/)"
    ], node.log()


# -- DTR and RTS ---------------------------------------------------------------------------


async def test_dtr_and_rts_come_from_the_port_spec_else_the_node_setting(
    make_config: Any, tmp_path: Path
) -> None:
    file = tmp_path / "edgenode.toml"
    file.write_text(
        '[serial]\nrts = false\nports = ["/dev/ttyA", "/dev/ttyB:9600,dtr=off,rts=on"]\n'
    )
    config = resolve(config_file=file).config
    assert (config.serial_dtr, config.serial_rts) == (True, False)
    assert config.serial_ports == [
        SerialPortSpec("/dev/ttyA", 115200),
        SerialPortSpec("/dev/ttyB", 9600, False, True),
    ]
    board = resolve(board="pi-zero-w").config
    assert (board.serial_dtr, board.serial_rts) == (True, True)
    node_config = make_config(
        "a", "127.0.0.2", serial_ports=config.serial_ports, serial_rts=False, **QUICK_REOPEN
    )
    async with Node(node_config) as a:
        rows = a.stats()["serial_ports"]
        assert [(r["path"], r["baud"], r["dtr"], r["rts"]) for r in rows] == [
            ("/dev/ttyA", 115200, True, False),
            ("/dev/ttyB", 9600, False, True),
        ]


# -- what a device says about its memory -----------------------------------------------------


async def test_device_memory_report_is_logged_and_shown_not_delivered(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "edgenode")
    sim = SimulatedDevice("pico-1", **FAST)
    config = make_config("a", "127.0.0.2", serial_ports=[(sim.pty.path, 115200)], **QUICK_REOPEN)
    try:
        async with Node(config) as a:
            events = a.events()
            device = await sim.start()
            await wait_event(events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
            await device.wait_up()
            sim.pty.release_slave()
            with a.subscribe("#") as everything:
                # What the driver publishes after surviving MemoryErrors.
                await device.publish(MEMORY_TOPIC, b"3")
                await device.publish("after", b"x")
                with anyio.fail_after(10):
                    assert (await everything.receive()).topic == "after"
            row = row_of(a)
            assert row["device_out_of_memory"] == 3 and row["out_of_memory"] == 0
            said = (
                f"device {DEVICE} on {sim.pty.path} has survived 3 MemoryError(s): its heap is "
                'too small or too fragmented (docs/microcontrollers.md, "When the heap runs out")'
            )
            assert said in [r.getMessage() for r in caplog.records]
            text = format_status({"node": a.stats(), "peers": []})
            assert "out of memory 0 here, 3 on the device" in text
    finally:
        await sim.aclose()
