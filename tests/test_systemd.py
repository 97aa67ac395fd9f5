"""Tests of edgenode.systemd: the notify protocol's pure part, and its socket
against a real datagram socket standing in for systemd.

The node under systemd (an ``edgenode run`` process, a loop that stalls) is
tested in tests/test_systemd_node.py.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgenode.errors import ConfigError
from edgenode.systemd import (
    MAX_ADDRESS_BYTES,
    MIN_WATCHDOG_USEC,
    SystemdNotifier,
    WatchdogRhythm,
    message,
    parse_notify_socket,
    parse_watchdog,
    status_text,
)

# -- $NOTIFY_SOCKET --------------------------------------------------------------------


def test_notify_socket_path_is_used_as_it_is() -> None:
    assert parse_notify_socket("/run/systemd/notify") == "/run/systemd/notify"


def test_notify_socket_at_name_is_in_the_abstract_namespace() -> None:
    assert parse_notify_socket("@/org/freedesktop/systemd1/notify") == (
        b"\0/org/freedesktop/systemd1/notify"
    )


@pytest.mark.parametrize("value", ["run/systemd/notify", "vsock:2:1234", " /run/notify"])
def test_notify_socket_rejects_what_is_neither_a_path_nor_abstract(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_notify_socket(value)
    assert str(caught.value) == (
        f"NOTIFY_SOCKET: expected an absolute path or @name, got {value!r}"
    )


@pytest.mark.parametrize("prefix", ["/", "@"])
def test_notify_socket_rejects_an_address_longer_than_sun_path(prefix: str) -> None:
    longest = prefix + "n" * (MAX_ADDRESS_BYTES - 1)
    assert parse_notify_socket(longest)  # 108 bytes fit
    with pytest.raises(ConfigError) as caught:
        parse_notify_socket(longest + "n")
    assert str(caught.value).startswith(
        f"NOTIFY_SOCKET: expected at most {MAX_ADDRESS_BYTES} bytes, got {MAX_ADDRESS_BYTES + 1}: "
    )


# -- $WATCHDOG_USEC and $WATCHDOG_PID ----------------------------------------------------


def test_watchdog_is_off_without_watchdog_usec() -> None:
    assert parse_watchdog({}, pid=10) is None
    assert parse_watchdog({"WATCHDOG_USEC": ""}, pid=10) is None


def test_watchdog_interval_is_watchdog_usec_in_seconds() -> None:
    assert parse_watchdog({"WATCHDOG_USEC": "30000000"}, pid=10) == 30.0


def test_watchdog_is_for_the_process_watchdog_pid_names() -> None:
    environ = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"}
    assert parse_watchdog(environ, pid=10) == 30.0
    # A child inherits the variables, not the duty.
    assert parse_watchdog(environ, pid=11) is None


@pytest.mark.parametrize("value", ["soon", "-30000000", "1.5e6", "30s"])
def test_watchdog_usec_rejects_what_is_not_a_whole_number(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_watchdog({"WATCHDOG_USEC": value}, pid=10)
    assert str(caught.value) == (
        f"WATCHDOG_USEC: expected a whole number of microseconds, got {value!r}"
    )


def test_watchdog_usec_rejects_a_watchdog_shorter_than_a_second() -> None:
    assert parse_watchdog({"WATCHDOG_USEC": str(MIN_WATCHDOG_USEC)}, pid=10) == 1.0
    with pytest.raises(ConfigError) as caught:
        parse_watchdog({"WATCHDOG_USEC": str(MIN_WATCHDOG_USEC - 1)}, pid=10)
    assert str(caught.value) == (
        f"WATCHDOG_USEC: expected at least {MIN_WATCHDOG_USEC} (WatchdogSec=1s), "
        f"got {MIN_WATCHDOG_USEC - 1}"
    )


def test_watchdog_pid_rejects_what_is_not_a_process_id() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_watchdog({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "main"}, pid=10)
    assert str(caught.value) == "WATCHDOG_PID: expected a process id, got 'main'"


# -- messages ------------------------------------------------------------------------


def test_status_says_peers_up_of_those_known() -> None:
    assert status_text(2, 3, None, 15.0) == "2/3 peers up"


def test_status_says_why_the_watchdog_is_not_fed() -> None:
    assert status_text(0, 1, 17.25, 15.0) == (
        "0/1 peers up; loop lag 17.2 s over 15 s: watchdog not fed"
    )


def test_message_is_newline_separated_assignments() -> None:
    assert message("READY=1", "STATUS=0/1 peers up") == b"READY=1\nSTATUS=0/1 peers up"


# -- the watchdog's rhythm ------------------------------------------------------------


def test_watchdog_is_fed_on_an_idle_loop_and_next_due_one_period_on() -> None:
    rhythm = WatchdogRhythm(period_s=15.0, max_lag_s=15.0)
    tick = rhythm.tick(now=100.0, due=100.0, events_handled=0, lag_sum_s=0.0)
    assert (tick.feed, tick.lag_s, tick.next_due) == (True, 0.0, 115.0)
    assert (rhythm.fed, rhythm.withheld) == (1, 0)


def test_watchdog_is_withheld_when_its_own_timer_runs_later_than_the_bound() -> None:
    rhythm = WatchdogRhythm(period_s=15.0, max_lag_s=15.0)
    tick = rhythm.tick(now=116.0, due=100.0, events_handled=0, lag_sum_s=0.0)
    assert (tick.feed, tick.lag_s) == (False, 16.0)
    # From when it ran: a late tick is not followed by a burst of pings.
    assert tick.next_due == 131.0
    assert (rhythm.fed, rhythm.withheld) == (0, 1)


def test_watchdog_is_withheld_while_the_window_mean_event_lag_is_over_the_bound() -> None:
    rhythm = WatchdogRhythm(period_s=15.0, max_lag_s=15.0)
    assert rhythm.tick(0.0, 0.0, events_handled=0, lag_sum_s=0.0).feed
    # Ten events handled 20 s late each, on a timer that runs on time.
    tick = rhythm.tick(15.0, 15.0, events_handled=10, lag_sum_s=200.0)
    assert (tick.feed, tick.lag_s) == (False, 20.0)
    # The next window is measured on its own: no events, no lag.
    tick = rhythm.tick(30.0, 30.0, events_handled=10, lag_sum_s=200.0)
    assert (tick.feed, tick.lag_s) == (True, 0.0)


def test_watchdog_is_fed_when_one_late_event_is_among_many_prompt_ones() -> None:
    # A pause is not a starved loop: one event 20 s late among 99 handled at once.
    rhythm = WatchdogRhythm(period_s=15.0, max_lag_s=15.0)
    tick = rhythm.tick(15.0, 15.0, events_handled=100, lag_sum_s=20.0 + 99 * 0.001)
    assert tick.feed
    assert tick.lag_s == pytest.approx(0.20099, abs=1e-9)


def test_watchdog_is_fed_at_exactly_the_bound() -> None:
    rhythm = WatchdogRhythm(period_s=1.0, max_lag_s=2.0)
    assert rhythm.tick(12.0, 10.0, 0, 0.0).feed


@given(
    lateness=st.floats(0, 100),
    lags=st.lists(st.floats(0, 100), max_size=20),
    bound=st.floats(0.1, 60),
)
def test_watchdog_is_fed_exactly_when_lateness_and_mean_lag_are_within_the_bound(
    lateness: float, lags: list[float], bound: float
) -> None:
    rhythm = WatchdogRhythm(period_s=0.5, max_lag_s=bound)
    rhythm.tick(0.0, 0.0, 7, 3.0)  # what came before this window does not count
    tick = rhythm.tick(1.0 + lateness, 1.0, 7 + len(lags), 3.0 + sum(lags))
    mean = sum(lags) / len(lags) if lags else 0.0
    assert tick.lag_s == pytest.approx(max(lateness, mean), rel=1e-9, abs=1e-9)
    assert tick.feed == (tick.lag_s <= bound)
    assert tick.next_due == 1.0 + lateness + 0.5


# -- the socket, against a real datagram socket -------------------------------------------


class FakeSystemd:
    """A datagram socket where systemd's would be: reads what the node sends."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(10.0)

    def receive(self) -> bytes:
        return self.sock.recv(4096)

    def pending(self) -> list[bytes]:
        """Everything sent so far (a datagram is queued when sendto returns)."""
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                got.append(self.sock.recv(4096))
        except BlockingIOError:
            return got
        finally:
            self.sock.settimeout(10.0)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="en-sd-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def notifier_for(value: str, **environ: str) -> SystemdNotifier:
    notifier = SystemdNotifier.from_environ(
        {"NOTIFY_SOCKET": value, **environ}, pid=os.getpid(), max_lag_s=15.0
    )
    assert notifier is not None
    return notifier


def test_no_notifier_without_notify_socket() -> None:
    assert SystemdNotifier.from_environ({}, pid=1, max_lag_s=15.0) is None
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": ""}, pid=1, max_lag_s=15.0) is None


def test_ready_status_and_stopping_reach_a_path_socket(short_dir: Path) -> None:
    systemd = FakeSystemd(str(short_dir / "notify"))
    notifier = notifier_for(str(short_dir / "notify"))
    notifier.ready(3)
    assert systemd.receive() == b"READY=1\nSTATUS=0/3 peers up"
    notifier.peer_count(1, 3)
    assert systemd.receive() == b"STATUS=1/3 peers up"
    notifier.stopping()
    assert systemd.receive() == b"STOPPING=1\nSTATUS=stopping"
    assert (notifier.sent, notifier.send_failures) == (3, 0)
    notifier.close()


def test_messages_reach_an_abstract_namespace_socket() -> None:
    name = f"edgenode-test-{os.getpid()}-abstract"
    systemd = FakeSystemd(b"\0" + name.encode())
    notifier = notifier_for("@" + name)
    assert notifier.where == "@" + name
    notifier.ready(0)
    assert systemd.receive() == b"READY=1\nSTATUS=0/0 peers up"
    notifier.close()


def test_an_unchanged_peer_count_sends_nothing(short_dir: Path) -> None:
    systemd = FakeSystemd(str(short_dir / "notify"))
    notifier = notifier_for(str(short_dir / "notify"))
    notifier.ready(2)
    notifier.peer_count(0, 2)
    notifier.peer_count(1, 2)
    notifier.peer_count(1, 2)
    assert systemd.pending() == [b"READY=1\nSTATUS=0/2 peers up", b"STATUS=1/2 peers up"]


def test_the_status_stays_stopping_while_the_node_shuts_down(short_dir: Path) -> None:
    systemd = FakeSystemd(str(short_dir / "notify"))
    notifier = notifier_for(str(short_dir / "notify"))
    notifier.ready(2)
    notifier.peer_count(2, 2)
    notifier.stopping()
    notifier.peer_count(0, 2)  # its peers go down as it says bye
    notifier.stopping()  # once is enough
    assert systemd.pending() == [
        b"READY=1\nSTATUS=0/2 peers up",
        b"STATUS=2/2 peers up",
        b"STOPPING=1\nSTATUS=stopping",
    ]


def test_nothing_is_sent_after_close(short_dir: Path) -> None:
    systemd = FakeSystemd(str(short_dir / "notify"))
    notifier = notifier_for(str(short_dir / "notify"))
    notifier.ready(0)
    notifier.close()
    notifier.close()  # idempotent
    notifier.peer_count(1, 1)
    notifier.stopping()
    assert systemd.pending() == [b"READY=1\nSTATUS=0/0 peers up"]


def test_a_missing_socket_is_counted_and_logged_once_never_raised(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = notifier_for(str(short_dir / "gone"))
    with caplog.at_level(logging.WARNING, logger="edgenode.systemd"):
        notifier.ready(1)
        notifier.peer_count(1, 1)
        notifier.stopping()
    assert (notifier.sent, notifier.send_failures) == (0, 3)
    lines = [r.getMessage() for r in caplog.records if r.name == "edgenode.systemd"]
    assert lines == [
        f"cannot notify systemd at {short_dir / 'gone'}: No such file or directory "
        "(further failures are counted, not logged: systemd_notify_failures in "
        "edgenode status --json)"
    ]
    assert notifier.figures()["systemd_notify_failures"] == 3


def test_a_full_socket_is_counted_never_waited_for(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    systemd = FakeSystemd(str(short_dir / "notify"))
    notifier = notifier_for(str(short_dir / "notify"))
    with caplog.at_level(logging.WARNING, logger="edgenode.systemd"):
        # systemd not reading: the queue fills (net.unix.max_dgram_qlen
        # datagrams, or the receive buffer) and a send would block.
        for up in range(100_000):
            notifier.peer_count(up, 100_000)
            if notifier.send_failures == 3:
                break
    assert notifier.send_failures == 3
    queued = notifier.sent
    assert queued > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "edgenode.systemd"]
    assert len(lines) == 1
    assert lines[0].startswith(f"cannot notify systemd at {short_dir / 'notify'}: ")
    assert "temporarily unavailable" in lines[0]
    # Once systemd reads again, sends go through again.
    assert len(systemd.pending()) == queued
    notifier.stopping()
    assert systemd.receive() == b"STOPPING=1\nSTATUS=stopping"
    assert notifier.sent == queued + 1
