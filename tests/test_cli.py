"""Tests of the ``edgenode`` command line: real subprocesses, real sockets, no mocks.

Every test runs ``python -m edgenode`` in its own ``tmp_path`` state
directory. Running nodes are watched through their stderr, read line by
line by a pump thread; tests wait for a log line or for the process to
exit, each with a deadline, never with a sleep.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

NODE_ID_RE = re.compile(r"^[a-z2-7]{4}(?:-[a-z2-7]{4}){6}$")
# Well-formed (28 base32 characters) but its checksum does not match.
BAD_CHECKSUM_ID = "aaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaa"
NOT_RUNNING = "no node is running on this state directory: it takes effect when the node starts"

# Seconds to wait for a command that should answer at once, and for a node
# to log a line. Generous: CI boards and loaded runners are slow.
COMMAND_TIMEOUT_S = 30.0
LINE_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 10.0


# -- helpers ---------------------------------------------------------------------


def _env(tmp_path: Path, state_dir: Path | None = None) -> dict[str, str]:
    """The environment of a test command: never the user's own state directory."""
    env = dict(os.environ)
    env["EDGENODE_STATE_DIR"] = str(state_dir or tmp_path / "default-state")
    env.pop("XDG_STATE_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def edgenode(
    tmp_path: Path, *args: str, state_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m edgenode ARGS`` to completion and return its result."""
    return subprocess.run(
        [sys.executable, "-m", "edgenode", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_env(tmp_path, state_dir),
        timeout=COMMAND_TIMEOUT_S,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], code: int, pattern: str) -> str:
    """Check the command failed with ``code`` and one ``error: ...`` line matching ``pattern``."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert result.returncode == code, result.stderr
    return errors[0]


def keygen(tmp_path: Path, state_dir: Path) -> str:
    result = edgenode(tmp_path, "keygen", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def free_port(*ips: str) -> int:
    """A TCP port that can be bound on every one of ``ips`` right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((ips[0], 0))
            port = probe.getsockname()[1]
            try:
                for ip in ips[1:]:
                    with socket.socket() as other:
                        other.bind((ip, port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no port is free on all of {ips}")


class NodeProcess:
    """An ``edgenode run`` subprocess whose stderr lines a thread collects."""

    def __init__(self, tmp_path: Path, args: Sequence[str], prefix: Sequence[str] = ()) -> None:
        """Start ``edgenode run ARGS``, under the command ``prefix`` if given."""
        self.args = list(args)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "edgenode", "run", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(tmp_path),
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._eof = False
        self._pump = threading.Thread(target=self._read_stderr, daemon=True)
        self._pump.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def log(self) -> str:
        return "\n".join(self.lines)

    def _take(self, timeout_s: float) -> bool:
        """Move one line from the pump into ``lines``; False at end of output."""
        line = self._queue.get(timeout=timeout_s)
        if line is None:
            self._eof = True
            return False
        self.lines.append(line)
        return True

    def wait_for(self, pattern: str, timeout_s: float = LINE_TIMEOUT_S) -> str:
        """Return the first stderr line matching ``pattern``, waiting up to ``timeout_s``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        checked = 0
        while True:
            for line in self.lines[checked:]:
                if regex.search(line):
                    return line
            checked = len(self.lines)
            remaining = deadline - time.monotonic()
            try:
                if self._eof or remaining <= 0 or not self._take(remaining):
                    raise queue.Empty
            except queue.Empty:
                state = "exited" if self._eof else f"no match within {timeout_s} s"
                raise AssertionError(
                    f"{pattern!r}: {state}; edgenode run {' '.join(self.args)} logged:\n"
                    f"{self.log()}"
                ) from None

    def stop(self, signum: int, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """Send ``signum``, wait for the exit and the rest of stderr; return the exit code."""
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"no exit within {timeout_s} s of {signal.Signals(signum).name}:\n{self.log()}"
            ) from None
        self._drain()
        return code

    def _drain(self) -> None:
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while not self._eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"stderr not closed after exit:\n{self.log()}")
            try:
                self._take(remaining)
            except queue.Empty:
                continue

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=EXIT_TIMEOUT_S)
        if self.proc.stderr is not None:
            self._pump.join(timeout=EXIT_TIMEOUT_S)
            self.proc.stderr.close()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start ``edgenode run ARGS`` processes; kill whatever is left at teardown."""
    started: list[NodeProcess] = []

    def start(*args: str) -> NodeProcess:
        node = NodeProcess(tmp_path, args)
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


# -- keygen ------------------------------------------------------------------------


def test_keygen_prints_node_id_and_writes_owner_only_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = edgenode(tmp_path, "keygen", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    assert NODE_ID_RE.match(result.stdout.strip()), result.stdout
    assert stat.S_IMODE((state / "node.key").stat().st_mode) == 0o600
    assert (state / "node.crt").is_file()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_keygen_uses_edgenode_state_dir_from_environment(tmp_path: Path) -> None:
    state = tmp_path / "from-env"
    result = edgenode(tmp_path, "keygen", state_dir=state)
    assert result.returncode == 0, result.stderr
    assert (state / "node.key").is_file()
    assert edgenode(tmp_path, "id", state_dir=state).stdout.strip() == result.stdout.strip()


def test_keygen_rejects_existing_identity_without_force(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node_id = keygen(tmp_path, state)
    result = edgenode(tmp_path, "keygen", "--state-dir", str(state))
    line = assert_one_error_line(
        result,
        1,
        rf"^error: state directory .*state already holds identity {node_id}; "
        r"edgenode keygen --force replaces it \(peers that authorised the old ID must then "
        r"authorise the new one\)$",
    )
    assert "overwrite" not in line  # the API's keyword is not the command line's
    assert result.stdout == ""
    # Nothing was replaced.
    assert edgenode(tmp_path, "id", "--state-dir", str(state)).stdout.strip() == node_id


def test_keygen_force_replaces_identity(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old_id = keygen(tmp_path, state)
    result = edgenode(tmp_path, "keygen", "--force", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    new_id = result.stdout.strip()
    assert NODE_ID_RE.match(new_id)
    assert new_id != old_id
    assert edgenode(tmp_path, "id", "--state-dir", str(state)).stdout.strip() == new_id
    assert stat.S_IMODE((state / "node.key").stat().st_mode) == 0o600


# -- id ------------------------------------------------------------------------------


def test_id_prints_the_keygen_node_id(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node_id = keygen(tmp_path, state)
    result = edgenode(tmp_path, "id", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    assert result.stdout == node_id + "\n"


def test_id_rejects_empty_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "empty"
    state.mkdir()
    result = edgenode(tmp_path, "id", "--state-dir", str(state))
    assert_one_error_line(result, 1, r"^error: no identity in .*empty: .*edgenode keygen")
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""


# -- authorise -------------------------------------------------------------------------


def test_authorise_adds_node_id_once(tmp_path: Path) -> None:
    other = keygen(tmp_path, tmp_path / "other")
    state = tmp_path / "state"
    first = edgenode(tmp_path, "authorise", "--state-dir", str(state), other)
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"authorised: {other}\n{NOT_RUNNING}\n"
    # Any case and without dashes: the same node.
    typed = other.replace("-", "").upper()
    second = edgenode(tmp_path, "authorise", "--state-dir", str(state), typed)
    assert second.returncode == 0, second.stderr
    assert second.stdout == f"already authorised: {other}\n{NOT_RUNNING}\n"
    assert (state / "authorised_nodes").read_text().split() == [other]


def test_authorise_rejects_short_node_id(tmp_path: Path) -> None:
    result = edgenode(tmp_path, "authorise", "--state-dir", str(tmp_path / "s"), "abcd-efgh")
    assert_one_error_line(
        result, 2, r"^error: node id 'abcd-efgh' should be 28 base32 characters .*got 8$"
    )
    assert not (tmp_path / "s" / "authorised_nodes").exists()


def test_authorise_rejects_bad_checksum(tmp_path: Path) -> None:
    result = edgenode(tmp_path, "authorise", "--state-dir", str(tmp_path / "s"), BAD_CHECKSUM_ID)
    assert_one_error_line(result, 2, r"^error: node id .* has a bad checksum")


def test_authorise_rejects_state_dir_that_is_a_file(tmp_path: Path) -> None:
    other = keygen(tmp_path, tmp_path / "other")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = edgenode(tmp_path, "authorise", "--state-dir", str(not_a_dir), other)
    assert_one_error_line(result, 2, r"^error: state directory .*file is not a directory$")


# -- run: usage and configuration errors ------------------------------------------------


def test_run_rejects_listen_port_out_of_range(tmp_path: Path) -> None:
    result = edgenode(tmp_path, "run", "--listen", "127.0.0.2:99999")
    assert_one_error_line(
        result, 2, r"^error: invalid address '127.0.0.2:99999': port should be 0\.\.65535"
    )
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_run_rejects_bad_keepalive_interval(tmp_path: Path, value: str) -> None:
    result = edgenode(tmp_path, "run", "--keepalive-interval", value)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: edgenode run")
    assert "argument --keepalive-interval: expected a" in result.stderr
    assert repr(value) in result.stderr


@pytest.mark.parametrize("timeout", ["2", "1.5"])
def test_run_rejects_keepalive_timeout_not_above_interval(tmp_path: Path, timeout: str) -> None:
    result = edgenode(tmp_path, "run", "--keepalive-interval", "2", "--keepalive-timeout", timeout)
    assert_one_error_line(
        result,
        2,
        rf"^error: keepalive_timeout_s: expected more than keepalive_interval_s \(2\.0\), "
        rf"got {float(timeout)}$",
    )
    assert result.stderr.count("\n") == 1


def test_run_rejects_bad_serial_baud_rate(tmp_path: Path) -> None:
    result = edgenode(tmp_path, "run", "--serial", "/dev/ttyUSB0:fast")
    assert_one_error_line(
        result,
        2,
        r"^error: serial port '/dev/ttyUSB0:fast': baud rate should be 50\.\.4000000, got 'fast'$",
    )


def test_run_rejects_short_serial_key(tmp_path: Path) -> None:
    key = tmp_path / "uart.key"
    key.write_bytes(b"too short")
    key.chmod(0o600)
    result = edgenode(tmp_path, "run", "--serial", "/dev/ttyUSB0", "--serial-psk-file", str(key))
    assert_one_error_line(result, 2, r"^error: serial_psk: expected 16\.\.64 bytes, got 9 bytes$")


def test_run_rejects_serial_key_readable_by_others(tmp_path: Path) -> None:
    key = tmp_path / "uart.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o644)
    result = edgenode(tmp_path, "run", "--serial", "/dev/ttyUSB0", "--serial-psk-file", str(key))
    line = assert_one_error_line(
        result, 2, r"^error: --serial-psk-file: .*uart\.key is readable by others \(mode 0644\)"
    )
    assert "k" * 32 not in result.stderr
    assert "chmod 600" in line


def test_run_rejects_key_file_readable_by_others(tmp_path: Path) -> None:
    state = tmp_path / "state"
    keygen(tmp_path, state)
    (state / "node.key").chmod(0o644)
    result = edgenode(tmp_path, "run", "--state-dir", str(state), "--listen", "127.0.0.5:0")
    line = assert_one_error_line(
        result, 1, r"^error: key file .*node\.key is readable by others \(mode 0644\)"
    )
    assert "chmod 600" in line
    assert "PRIVATE KEY" not in result.stderr


def test_run_rejects_listen_address_in_use(tmp_path: Path) -> None:
    state = tmp_path / "state"
    keygen(tmp_path, state)
    with socket.socket() as taken:
        taken.bind(("127.0.0.5", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = edgenode(
            tmp_path, "run", "--state-dir", str(state), "--listen", f"127.0.0.5:{port}"
        )
    # Exit 1, not 2: a busy port is worth a restart (systemd retries), a
    # configuration error is not.
    assert_one_error_line(
        result, 1, rf"^error: cannot listen on 127\.0\.0\.5:{port}: Address already in use$"
    )


def test_run_on_an_address_this_host_lacks_exits_1_to_be_retried(tmp_path: Path) -> None:
    state = tmp_path / "state"
    keygen(tmp_path, state)
    # TEST-NET-1: not on any interface here, as a static address is not at boot.
    result = edgenode(tmp_path, "run", "--state-dir", str(state), "--listen", "192.0.2.1:7300")
    assert_one_error_line(
        result, 1, r"^error: cannot listen on 192\.0\.2\.1:7300: Cannot assign requested address$"
    )


# -- run: two real nodes ----------------------------------------------------------------

StartNode = Callable[..., NodeProcess]
BYE_LINE = r"peer down {ip} \(node {node_id}\): peer said bye: node shutting down"


def _paired_state_dirs(tmp_path: Path) -> tuple[Path, Path, str, str]:
    a, b = tmp_path / "a", tmp_path / "b"
    a_id, b_id = keygen(tmp_path, a), keygen(tmp_path, b)
    for state, other in ((a, b_id), (b, a_id)):
        result = edgenode(tmp_path, "authorise", "--state-dir", str(state), other)
        assert result.returncode == 0, result.stderr
    return a, b, a_id, b_id


def _start_pair(
    tmp_path: Path, start_node: StartNode, *, b_dials: bool
) -> tuple[NodeProcess, NodeProcess, str, str]:
    """Start node a on 127.0.0.2 dialling b on 127.0.0.3; wait until both log peer up."""
    a, b, a_id, b_id = _paired_state_dirs(tmp_path)
    port = free_port("127.0.0.2", "127.0.0.3")
    timing = ["--keepalive-interval", "0.5"]
    node_b = start_node(
        "--state-dir",
        str(b),
        "--listen",
        f"127.0.0.3:{port}",
        *(["--peer", f"127.0.0.2:{port}"] if b_dials else []),
        *timing,
    )
    if not b_dials:
        node_b.wait_for(rf"node {b_id} listening on ")
    node_a = start_node(
        "--state-dir",
        str(a),
        "--listen",
        f"127.0.0.2:{port}",
        "--peer",
        f"127.0.0.3:{port}",
        *timing,
    )
    node_a.wait_for(rf"peer up 127\.0\.0\.3 \(node {b_id}, ")
    node_b.wait_for(rf"peer up 127\.0\.0\.2 \(node {a_id}, ")
    return node_a, node_b, a_id, b_id


def _sigterm(node: NodeProcess, node_id: str) -> None:
    """SIGTERM ``node``: it must exit 0 within a few seconds, cleanly."""
    started = time.monotonic()
    assert node.stop(signal.SIGTERM, timeout_s=5) == 0, node.log()
    assert time.monotonic() - started < 5
    node.wait_for(r"received SIGTERM: saying bye to peers")
    node.wait_for(rf"node {node_id} stopped")
    assert "Traceback" not in node.log(), node.log()


@pytest.mark.timeout(90)
def test_run_pair_connects_and_exits_0_on_sigterm_and_sigint(
    tmp_path: Path, start_node: StartNode
) -> None:
    # Both dial: which connection survives the simultaneous open is a race,
    # so the bye is checked per direction by the two tests below.
    node_a, node_b, a_id, _ = _start_pair(tmp_path, start_node, b_dials=True)
    _sigterm(node_a, a_id)
    node_b.wait_for(rf"peer down 127\.0\.0\.2 \(node {a_id}\): ")
    assert node_b.stop(signal.SIGINT, timeout_s=5) == 0, node_b.log()
    node_b.wait_for(r"received SIGINT: saying bye to peers")
    assert "Traceback" not in node_b.log(), node_b.log()


@pytest.mark.timeout(90)
def test_run_sigterm_says_bye_to_the_peer_it_dialled(tmp_path: Path, start_node: StartNode) -> None:
    node_a, node_b, a_id, _ = _start_pair(tmp_path, start_node, b_dials=False)
    _sigterm(node_a, a_id)
    node_b.wait_for(BYE_LINE.format(ip=r"127\.0\.0\.2", node_id=a_id))


@pytest.mark.timeout(90)
def test_run_sigterm_says_bye_to_the_peer_that_dialled_it(
    tmp_path: Path, start_node: StartNode
) -> None:
    node_a, node_b, _, b_id = _start_pair(tmp_path, start_node, b_dials=False)
    _sigterm(node_b, b_id)
    node_a.wait_for(BYE_LINE.format(ip=r"127\.0\.0\.3", node_id=b_id), timeout_s=5)


def test_run_sigint_exits_0(tmp_path: Path, start_node: StartNode) -> None:
    state = tmp_path / "state"
    node_id = keygen(tmp_path, state)
    node = start_node("--state-dir", str(state), "--listen", "127.0.0.5:0")
    node.wait_for(rf"node {node_id} listening on 127\.0\.0\.5:\d+")
    assert node.stop(signal.SIGINT) == 0, node.log()
    node.wait_for(r"received SIGINT")
    assert "Traceback" not in node.log()


def test_run_creates_identity_on_first_start(tmp_path: Path, start_node: StartNode) -> None:
    state = tmp_path / "fresh"
    node = start_node("--state-dir", str(state), "--listen", "127.0.0.5:0")
    line = node.wait_for(r"node \S+ listening on ")
    # The key was made in a child process: the running node never loads
    # cryptography (about 11 MB of RSS on a Pi).
    maps = Path(f"/proc/{node.proc.pid}/maps").read_text()
    assert "cryptography" not in maps
    assert node.stop(signal.SIGTERM) == 0, node.log()
    node_id = line.split("node ", 1)[1].split()[0]
    assert NODE_ID_RE.match(node_id)
    assert edgenode(tmp_path, "id", "--state-dir", str(state)).stdout.strip() == node_id
    assert stat.S_IMODE((state / "node.key").stat().st_mode) == 0o600


# -- demo -------------------------------------------------------------------------------


# A hang guard, not a timing figure: the demo bounds each of its own waits
# (edgenode.demo.CONNECT_BOUND_S and the rest) and says what it waits for. It
# took 3 s here and 7-22 s emulated on ARM (docs/arm.md).
@pytest.mark.timeout(660)
def test_demo_runs_all_steps(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgenode", "demo"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(tmp_path),
        timeout=600,
    )
    out = result.stdout
    assert result.returncode == 0, out
    assert "Traceback" not in out, out

    positions = []
    for step in range(1, 9):
        marker = f"[{step}/8] "
        assert marker in out, out
        positions.append(out.index(marker))
    assert positions == sorted(positions), out

    step5, step6, step7, step8 = (out.index(f"[{n}/8] ") for n in (5, 6, 7, 8))
    device_part = out[step5:step6]
    kill_part, restart_part, table_part = out[step6:step7], out[step7:step8], out[step8:]
    # A message travels from alpha through bravo to the microcontroller and back.
    assert re.search(
        r"console asked alpha to ask pico-sim, through bravo: 127\.0\.0\.3/pico-sim answered "
        r"'pico-sim heard hello from alpha' in [\d.]+ ms",
        device_part,
    ), out
    for node in ("alpha", "bravo", "charlie"):
        assert re.search(
            rf"{node} +\| INFO +message from 127\.0\.0\.3/pico-sim on demo/temp: '21\.5 C'",
            device_part,
        ), out
    assert re.search(r"killing charlie with SIGKILL", kill_part), out
    assert re.search(r"console saw charlie down after \d+ ms: ", kill_part), out
    for other in ("alpha", "bravo"):
        assert re.search(rf"{other} reports charlie down", kill_part), out
        assert re.search(rf"{other} reports charlie up again after \d+ ms", restart_part), out

    # The final peer tables: every node sees the two others and the console up.
    assert re.search(r"seen by\s+peer\s+node id\s+state", table_part), out
    rows = re.findall(
        r"^ +(alpha|bravo|charlie) +(alpha|bravo|charlie|console) +(127\.0\.0\.\d) +"
        r"([a-z2-7-]{34}) +(\w+) +(inbound|outbound)",
        table_part,
        re.M,
    )
    assert len(rows) == 9, out
    assert {(seen_by, peer) for seen_by, peer, *_ in rows} == {
        (seen_by, peer)
        for seen_by in ("alpha", "bravo", "charlie")
        for peer in ("alpha", "bravo", "charlie", "console")
        if peer != seen_by
    }, out
    assert {row[4] for row in rows} == {"up"}, out
    assert re.search(r"^demo finished in [\d.]+ s$", out, re.M), out


def test_output_to_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    # Regression: `edgenode status | head` printed a BrokenPipeError traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already gone
    try:
        result = subprocess.run(
            [sys.executable, "-m", "edgenode", "boards"],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(tmp_path, None),
            timeout=COMMAND_TIMEOUT_S,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 128 + signal.SIGPIPE


# -- run: peers by host name ------------------------------------------------------------


def test_print_config_and_run_accept_the_same_host_name_peer(
    tmp_path: Path, start_node: StartNode
) -> None:
    """Regression: a host name passed --print-config and failed run with exit 2
    and a 'coroutine ... was never awaited' warning."""
    state = tmp_path / "n"
    node_id = keygen(tmp_path, state)
    peer = "no-such-peer.invalid:7300"
    shown = edgenode(
        tmp_path, "run", "--state-dir", str(state), "--peer", peer, "--print-config"
    )
    assert shown.returncode == 0, shown.stderr
    assert "no-such-peer.invalid" in shown.stdout
    port = free_port("127.0.0.2")
    node = start_node(
        "--state-dir", str(state), "--listen", f"127.0.0.2:{port}", "--peer", peer
    )
    node.wait_for(rf"node {node_id} listening on ")
    node.wait_for(r"cannot resolve peer no-such-peer\.invalid:7300: .*; retrying")
    assert node.stop(signal.SIGTERM) == 0, node.log()
    assert "never awaited" not in node.log() and "Traceback" not in node.log()
    bad = edgenode(tmp_path, "run", "--state-dir", str(state), "--peer", "no_such:7300")
    assert_one_error_line(
        bad, 2, r"^error: .*peers: expected an ip address or a host name, got 'no_such'$"
    )
    again = edgenode(
        tmp_path, "run", "--state-dir", str(state), "--peer", "no_such:7300", "--print-config"
    )
    assert again.returncode == 2 and again.stderr == bad.stderr
