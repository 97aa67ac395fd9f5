"""The node under systemd: a real datagram socket stands in for systemd's.

An ``edgenode run`` process with ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` set
says READY=1 once it listens, STATUS= as a peer comes up, WATCHDOG=1 every
half interval, STOPPING=1 on SIGTERM; a loop that stalls or is starved stops
the pings, and they resume when it recovers. The protocol's parts are
tested in tests/test_systemd.py.

Every wait is for a datagram, a process exit or a node event, with a bound
that holds on a slow board. The only waits for an absence are the
watchdog's own: "no ping for this long" is what systemd acts on.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from edgenode.config import NodeConfig
from edgenode.inbox import Event
from edgenode.node import Node, PeerUp

from .conftest import Identities, free_port, wait_event, wait_until

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
#: WATCHDOG_USEC in these tests: 1 s, so pings every 0.5 s (the shortest the
#: node accepts: edgenode.systemd.MIN_WATCHDOG_USEC).
WATCHDOG_USEC = 1_000_000
WATCHDOG_S = WATCHDOG_USEC / 1e6
#: A process starting (imports, identity, listening) on a slow, loaded board.
START_S = 60.0
#: Anything else the node does at once.
PROMPT_S = 20.0


class Datagram:
    """One notify message, the process that sent it, and when it arrived."""

    def __init__(self, payload: bytes, pid: int | None, at: float) -> None:
        self.payload, self.pid, self.at = payload, pid, at
        self.fields = dict(line.split("=", 1) for line in payload.decode().splitlines())

    def __repr__(self) -> str:
        return f"<{self.payload!r} from {self.pid} at {self.at:.3f}>"


class FakeSystemd:
    """A datagram socket where systemd's would be, reading the sender's
    credentials as systemd does (SO_PASSCRED) to enforce NotifyAccess=main."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.received: list[Datagram] = []

    def _read(self) -> Datagram | None:
        try:
            payload, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except BlockingIOError:
            return None
        pid = None
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", data[:12])[0]
        got = Datagram(payload, pid, time.monotonic())
        self.received.append(got)
        return got

    async def next(self, timeout_s: float = PROMPT_S) -> Datagram:
        """The next datagram, waiting up to ``timeout_s`` for it."""
        with anyio.fail_after(timeout_s):
            while True:
                got = self._read()
                if got is not None:
                    return got
                await anyio.wait_readable(self.sock)

    async def until(self, predicate: Callable[[Datagram], bool], timeout_s: float) -> Datagram:
        """The first datagram from now on that ``predicate`` accepts."""
        with anyio.fail_after(timeout_s):
            while True:
                got = await self.next(timeout_s)
                if predicate(got):
                    return got

    def pending(self) -> list[Datagram]:
        """What has been sent and not read yet, without waiting (a datagram
        is queued here when the sender's sendto returns)."""
        got = []
        while (one := self._read()) is not None:
            got.append(one)
        return got

    def close(self) -> None:
        self.sock.close()


def pings(datagrams: list[Datagram]) -> list[Datagram]:
    return [d for d in datagrams if d.fields.get("WATCHDOG") == "1"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="en-sd-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def abstract_name() -> str:
    return f"edgenode-test-{os.getpid()}-{time.monotonic_ns()}"


def copy_identity(identities: Identities, name: str, where: Path) -> Path:
    """A state dir of the node's own, holding the session's identity ``name``."""
    shutil.copytree(identities[name].state_dir, where)
    return where


class RunProcess:
    """``edgenode run ARGS`` with its environment; stderr goes to a file."""

    def __init__(self, tmp_path: Path, args: list[str], environ: dict[str, str]) -> None:
        env = dict(os.environ)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(key, None)
        env.update(environ, PYTHONUNBUFFERED="1", EDGENODE_STATE_DIR=str(tmp_path / "unused"))
        self.stderr_path = tmp_path / "stderr.log"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgenode", "run", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                cwd=ROOT,
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return await anyio.to_thread.run_sync(lambda: self.proc.wait(timeout=PROMPT_S))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=PROMPT_S)


@pytest.fixture
def run_process(tmp_path: Path) -> Iterator[Callable[..., RunProcess]]:
    started: list[RunProcess] = []

    def start(args: list[str], environ: dict[str, str]) -> RunProcess:
        started.append(RunProcess(tmp_path, args, environ))
        return started[-1]

    yield start
    for process in started:
        process.kill()


# -- an edgenode run process --------------------------------------------------------


async def test_run_says_ready_once_it_listens_then_status_pings_and_stopping(
    tmp_path: Path,
    short_dir: Path,
    identities: Identities,
    make_config: Callable[..., NodeConfig],
    run_process: Callable[..., RunProcess],
) -> None:
    systemd = FakeSystemd(str(short_dir / "notify"))
    port = free_port("127.0.0.42")
    state = copy_identity(identities, "a", tmp_path / "a")
    async with Node(make_config("b", "127.0.0.43")) as b:
        events = b.events()
        node = run_process(
            [
                "--state-dir",
                str(state),
                "--listen",
                f"127.0.0.42:{port}",
                "--peer",
                f"127.0.0.43:{b.listen_port}",
                "--authorise",
                b.node_id,
                "--keepalive-interval",
                "0.5",
                "--keepalive-timeout",
                "2",
            ],
            {"NOTIFY_SOCKET": str(short_dir / "notify"), "WATCHDOG_USEC": str(WATCHDOG_USEC)},
        )
        ready = await systemd.next(START_S)
        # READY=1 comes first, from the main process (NotifyAccess=main), with
        # the first status: one peer configured, none up yet.
        assert ready.payload == b"READY=1\nSTATUS=0/1 peers up", node.stderr
        assert ready.pid == node.proc.pid
        # ... and only once the node listens: a connection is accepted at once.
        stream = await anyio.connect_tcp("127.0.0.42", port)
        await stream.aclose()

        await wait_event(events, lambda e: isinstance(e, PeerUp), timeout=PROMPT_S)
        await systemd.until(lambda d: d.fields.get("STATUS") == "1/1 peers up", PROMPT_S)
        statuses = [d.fields["STATUS"] for d in systemd.received if "STATUS" in d.fields]
        assert statuses == ["0/1 peers up", "1/1 peers up"]

        # The watchdog's rhythm: every half interval, steady state.
        before = len(pings(systemd.received))
        with anyio.fail_after(PROMPT_S):
            while len(pings(systemd.received)) < before + 7:
                await systemd.next()
        steady = pings(systemd.received)[before:]
        gaps = sorted(later.at - earlier.at for earlier, later in zip(steady, steady[1:]))
        # Never as late as the watchdog interval (systemd would kill the node),
        # never a burst, and half the interval in the middle.
        assert gaps[-1] < WATCHDOG_S, gaps
        assert gaps[0] > WATCHDOG_S / 4, gaps
        assert 0.45 * WATCHDOG_S <= gaps[len(gaps) // 2] <= 0.75 * WATCHDOG_S, gaps
        assert {d.pid for d in systemd.received} == {node.proc.pid}

        # The peer goes away: the status says so.
        await b.aclose()
        down = await systemd.until(lambda d: "STATUS" in d.fields, PROMPT_S)
        assert down.fields["STATUS"] == "0/1 peers up"

        # SIGTERM: STOPPING=1, then the node exits cleanly.
        stopped = len(systemd.received)
        code = await node.stop(signal.SIGTERM)
        assert code == 0, node.stderr
        later = systemd.received[stopped:] + systemd.pending()
        assert [d.payload for d in later if "STOPPING" in d.fields] == [
            b"STOPPING=1\nSTATUS=stopping"
        ], later
    log = node.stderr
    assert "feeding the systemd watchdog every 0.5 s while the loop lags under 2 s" in log
    assert "cannot notify systemd" not in log
    systemd.close()


async def test_run_notifies_an_abstract_socket_and_feeds_no_watchdog_meant_for_another_process(
    tmp_path: Path,
    abstract_name: str,
    identities: Identities,
    run_process: Callable[..., RunProcess],
) -> None:
    systemd = FakeSystemd(b"\0" + abstract_name.encode())
    state = copy_identity(identities, "a", tmp_path / "a")
    node = run_process(
        ["--state-dir", str(state), "--listen", "127.0.0.44:0"],
        {
            "NOTIFY_SOCKET": "@" + abstract_name,
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            # The variables were meant for another process (our parent, say).
            "WATCHDOG_PID": "1",
        },
    )
    ready = await systemd.next(START_S)
    assert ready.payload == b"READY=1\nSTATUS=0/0 peers up", node.stderr
    assert ready.pid == node.proc.pid
    assert await node.stop(signal.SIGTERM) == 0, node.stderr
    sent = [ready, *systemd.pending()]
    assert [d.payload for d in sent] == [
        b"READY=1\nSTATUS=0/0 peers up",
        b"STOPPING=1\nSTATUS=stopping",
    ]
    # It decided at start, before READY=1, to feed no watchdog.
    assert "systemd watchdog" not in node.stderr
    systemd.close()


@pytest.mark.parametrize(
    ("environ", "error"),
    [
        (
            {"NOTIFY_SOCKET": "run/notify"},
            "error: NOTIFY_SOCKET: expected an absolute path or @name, got 'run/notify'",
        ),
        (
            {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30s"},
            "error: WATCHDOG_USEC: expected a whole number of microseconds, got '30s'",
        ),
    ],
)
async def test_run_refuses_a_notify_environment_it_cannot_use_as_a_config_error(
    tmp_path: Path,
    identities: Identities,
    run_process: Callable[..., RunProcess],
    environ: dict[str, str],
    error: str,
) -> None:
    # Exit 2: the unit's RestartPreventExitStatus=2 stops, with this line in
    # the journal, instead of waiting for a READY=1 that would never come.
    state = copy_identity(identities, "a", tmp_path / "a")
    node = run_process(["--state-dir", str(state), "--listen", "127.0.0.45:0"], environ)
    code = await anyio.to_thread.run_sync(lambda: node.proc.wait(timeout=START_S))
    errors = [line for line in node.stderr.splitlines() if line.startswith("error: ")]
    assert (code, errors) == (2, [error]), node.stderr
    assert "Traceback" not in node.stderr


async def test_run_without_notify_socket_loads_nothing_of_systemd(
    tmp_path: Path, identities: Identities
) -> None:
    state = copy_identity(identities, "a", tmp_path / "a")
    code = (
        "import faulthandler, sys, anyio\n"
        "from edgenode.config import NodeConfig\n"
        "from edgenode.node import Node\n"
        "async def main():\n"
        f"    config = NodeConfig(state_dir={str(state)!r}, listen_host='127.0.0.46',\n"
        "                        listen_port=0, authorised=frozenset())\n"
        "    async with Node(config) as node:\n"
        "        return node.systemd is None\n"
        "print(anyio.run(main), 'edgenode.systemd' in sys.modules, faulthandler.is_enabled())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.pop("PYTHONFAULTHANDLER", None)

    def run() -> str:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=START_S,
            check=True,
        )
        return out.stdout.strip()

    assert await anyio.to_thread.run_sync(run) == "True False False"


async def test_a_wedged_node_killed_as_systemd_does_leaves_its_stack_in_the_journal(
    tmp_path: Path, abstract_name: str, identities: Identities
) -> None:
    # systemd's WatchdogSignal= is SIGABRT: with the watchdog on, the node
    # turned faulthandler on, which prints the stack the loop is stuck in.
    systemd = FakeSystemd(b"\0" + abstract_name.encode())
    state = copy_identity(identities, "a", tmp_path / "a")
    script = tmp_path / "wedge.py"
    script.write_text(
        "import sys, time, anyio\n"
        "from edgenode.config import NodeConfig\n"
        "from edgenode.node import Node\n"
        "def wedged_in_application_code():\n"
        "    while True:\n"
        "        time.sleep(1)\n"
        "async def main():\n"
        f"    config = NodeConfig(state_dir={str(state)!r}, listen_host='127.0.0.47',\n"
        "                        listen_port=0, authorised=frozenset())\n"
        "    async with Node(config) as node:\n"
        "        while node.systemd.watchdog.fed < 2:\n"
        "            await anyio.sleep(0.05)\n"
        "        wedged_in_application_code()\n"
        "anyio.run(main)\n"
    )
    env = dict(os.environ, NOTIFY_SOCKET="@" + abstract_name, WATCHDOG_USEC=str(WATCHDOG_USEC))
    env.pop("WATCHDOG_PID", None)
    env.pop("PYTHONFAULTHANDLER", None)
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            cwd=ROOT,
            # No core file: the abort is the point, not its dump.
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
        )
    try:
        assert (await systemd.next(START_S)).fields.get("READY") == "1"
        await systemd.until(lambda d: d.fields.get("WATCHDOG") == "1", PROMPT_S)
        # Pings until the wedge, then none for two watchdog intervals: systemd
        # would have killed it after one.
        with anyio.fail_after(START_S):
            while True:
                with anyio.move_on_after(2 * WATCHDOG_S):
                    await systemd.next()
                    continue
                break
        assert proc.poll() is None
        proc.send_signal(signal.SIGABRT)
        code = await anyio.to_thread.run_sync(lambda: proc.wait(timeout=PROMPT_S))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        systemd.close()
    journal = stderr_path.read_text()
    assert code == -signal.SIGABRT, journal
    assert "Fatal Python error: Aborted" in journal
    assert re.search(r'File ".*wedge\.py", line \d+ in wedged_in_application_code', journal), (
        journal
    )


# -- a node in this process: a loop that stalls ----------------------------------------


@pytest.fixture
async def notified(
    monkeypatch: pytest.MonkeyPatch, abstract_name: str
) -> AsyncIterator[FakeSystemd]:
    """A fake systemd, and NOTIFY_SOCKET/WATCHDOG_USEC set for nodes made now."""
    systemd = FakeSystemd(b"\0" + abstract_name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + abstract_name)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield systemd
    systemd.close()


async def test_a_handler_that_blocks_the_loop_stops_the_pings_until_it_returns(
    notified: FakeSystemd,
    monkeypatch: pytest.MonkeyPatch,
    make_config: Callable[..., NodeConfig],
) -> None:
    # A stall of three watchdog intervals (six pings missed) that stays under
    # the keepalive timeout: the peers keep each other, and the loop's lag
    # after it is within the bound.
    stall_s = 3 * WATCHDOG_S
    timings = dict(keepalive_interval_s=1.0, keepalive_timeout_s=3 * stall_s)
    a = Node(make_config("a", "127.0.0.48", **timings))
    monkeypatch.delenv("NOTIFY_SOCKET")  # b speaks to no systemd
    seen: dict[str, list[Datagram]] = {}

    async def blocking_handler(request: Any) -> bytes:
        seen["before"] = notified.pending()
        time.sleep(stall_s)  # the application's bug: a blocking call in a handler
        seen["during"] = notified.pending()
        return b"done"

    async with a:
        a.handle("stall", blocking_handler)
        assert (await notified.next()).fields["READY"] == "1"
        async with Node(
            make_config("b", "127.0.0.49", [("127.0.0.48", a.listen_port)], **timings)
        ) as b:
            await notified.until(lambda d: d.fields.get("STATUS") == "1/1 peers up", PROMPT_S)
            await notified.until(lambda d: d.fields.get("WATCHDOG") == "1", PROMPT_S)
            assert (
                await b.request("127.0.0.48", "stall", b"", timeout=PROMPT_S + stall_s) == b"done"
            )
            # Nothing was sent while the loop was blocked...
            assert seen["during"] == []
            # ... and the pings resume once it runs again.
            resumed = await notified.until(lambda d: d.fields.get("WATCHDOG") == "1", PROMPT_S)
            assert resumed.payload == b"WATCHDOG=1"
            assert a.stats()["systemd_watchdog_withheld"] == 0


async def test_a_stall_longer_than_the_keepalive_timeout_withholds_the_next_ping(
    notified: FakeSystemd,
    make_config: Callable[..., NodeConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    stall_s = 3 * WATCHDOG_S
    config = make_config("a", "127.0.0.50", keepalive_interval_s=0.5, keepalive_timeout_s=2.0)
    assert config.keepalive_timeout_s < stall_s - WATCHDOG_S / 2
    with caplog.at_level(logging.INFO, logger="edgenode.systemd"):
        async with Node(config) as a:
            assert (await notified.next()).fields["READY"] == "1"
            await notified.until(lambda d: d.fields.get("WATCHDOG") == "1", PROMPT_S)
            time.sleep(stall_s)  # the whole loop: this task blocks it
            after = await notified.next()
            # The first tick after it ran more than the bound late: no ping,
            # and systemctl status says why.
            assert "WATCHDOG" not in after.fields, after
            status = after.fields["STATUS"]
            lag = re.fullmatch(r"0/0 peers up; loop lag (\S+) s over 2 s: watchdog not fed", status)
            assert lag is not None, status
            assert float(lag.group(1)) >= stall_s - WATCHDOG_S / 2
            # The next one, on time, feeds it again and clears the status.
            again = await notified.next()
            assert again.payload == b"WATCHDOG=1\nSTATUS=0/0 peers up"
            assert a.stats()["systemd_watchdog_withheld"] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "edgenode.systemd"]
    assert re.search(
        r"loop lag \S+ s over the 2 s bound \(the keepalive timeout\): not feeding the "
        r"systemd watchdog; systemd restarts the node if this lasts",
        "\n".join(lines),
    ), lines
    assert any(line.startswith("loop lag back to ") for line in lines), lines


class Stale(Event):
    """An inbox event the dispatcher sees as posted 10 s ago: what a starved
    loop's events look like by the time it handles them."""

    __slots__ = ()

    def __init__(self) -> None:
        self.t = time.monotonic() - 10.0


async def test_a_loop_whose_events_lag_over_the_bound_is_not_fed_until_they_stop(
    notified: FakeSystemd, make_config: Callable[..., NodeConfig]
) -> None:
    # The loop still turns and the watchdog's timer runs on time; but every
    # event it handles lags 10 s, over the 2 s bound (the keepalive timeout).
    config = make_config("a", "127.0.0.51", keepalive_interval_s=0.5, keepalive_timeout_s=2.0)
    async with Node(config) as a:
        starving = True
        a.dispatcher.register(Stale, lambda event, now: None)

        def post_stale(now: float) -> None:
            if starving:
                assert a.inbox.box.put_nowait(Stale())
                a.dispatcher.schedule(now + WATCHDOG_S / 10, post_stale)

        assert (await notified.next()).fields["READY"] == "1"
        a.dispatcher.schedule(time.monotonic(), post_stale)
        withheld = await notified.until(
            lambda d: "watchdog not fed" in d.fields.get("STATUS", ""), PROMPT_S
        )
        lag = re.fullmatch(
            r"0/0 peers up; loop lag (\S+) s over 2 s: watchdog not fed", withheld.fields["STATUS"]
        )
        assert lag is not None, withheld
        assert float(lag.group(1)) > config.keepalive_timeout_s
        # Three more ticks pass without a ping.
        await wait_until(lambda: a.stats()["systemd_watchdog_withheld"] >= 4, PROMPT_S)
        assert pings(notified.pending()) == []
        starving = False
        again = await notified.until(lambda d: d.fields.get("WATCHDOG") == "1", PROMPT_S)
        assert again.payload == b"WATCHDOG=1\nSTATUS=0/0 peers up"
