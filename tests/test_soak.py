"""The soak (issue 6) and the process helpers it is built on.

The soak itself is marked ``soak`` and deselected by default; ``.ci/run``
runs it once (``pytest -m soak``): 20 node processes for a minute of chaos.
The other tests here run with the suite: :class:`NodeProcess` against real
``edgenode run`` processes, the soak node against a real peer, and the
soak's checkers on real ``/proc/net/tcp`` text and on hand-made logs.

Real processes, real sockets on loopback, real TLS. Every wait is for an
event or a condition, with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgenode.control_client import ControlError
from edgenode.identity import create_identity
from edgenode.testing.procfs import read_rss_bytes
from edgenode.testing.procs import READY_RE, NodeProcess, NodeProcessError, free_port
from edgenode.testing.signals import process_state
from edgenode.testing.soak_checks import (
    AgreementTracker,
    DuplicateTracker,
    Expected,
    check_exactly_once,
    check_sends,
    parse_proc_net_tcp,
    read_connections,
)
from edgenode.testing.toml_writer import toml_text

# Addresses of their own: the soak's fleet uses 127.0.60.x, other tests 127.0.0.x.
A_IP, B_IP = "127.0.61.2", "127.0.61.3"
KEEPALIVE_INTERVAL_S = 0.5
KEEPALIVE_TIMEOUT_S = 2.0
# Generous deadlines: CI machines are slow and shared. Never tuned to this one.
EVENT_TIMEOUT_S = 20.0
SHORT_FORM_TIMEOUT_S = 240.0


def _ip_re(ip: str) -> str:
    return re.escape(ip)


class Pair:
    """Two authorised ``edgenode run`` processes, each configured with the other."""

    def __init__(self, tmp_path: Path) -> None:
        self.a_id = create_identity(tmp_path / "a").node_id
        self.b_id = create_identity(tmp_path / "b").node_id
        a_port, b_port = free_port(A_IP), free_port(B_IP)
        ids = [self.a_id, self.b_id]
        common = dict(
            authorised=ids,
            keepalive_interval_s=KEEPALIVE_INTERVAL_S,
            keepalive_timeout_s=KEEPALIVE_TIMEOUT_S,
        )
        self.a = NodeProcess(
            tmp_path / "a", A_IP, port=a_port, peers=[(B_IP, b_port)], name="a", **common
        )
        self.b = NodeProcess(
            tmp_path / "b", B_IP, port=b_port, peers=[(A_IP, a_port)], name="b", **common
        )

    def start(self) -> None:
        self.a.start(wait=False)
        self.b.start(wait=False)
        self.a.wait_ready(EVENT_TIMEOUT_S)
        self.b.wait_ready(EVENT_TIMEOUT_S)
        self.a.wait_for(rf"peer up {_ip_re(B_IP)} \(node {self.b_id}", EVENT_TIMEOUT_S)
        self.b.wait_for(rf"peer up {_ip_re(A_IP)} \(node {self.a_id}", EVENT_TIMEOUT_S)

    def close(self) -> None:
        self.a.close()
        self.b.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    made = Pair(tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.mark.timeout(60)
def test_plugin_node_processes_fixture_makes_processes_to_stop_and_continue(
    tmp_path: Path, node_processes: Any
) -> None:
    create_identity(tmp_path / "solo")
    node = node_processes(tmp_path / "solo", A_IP, port=free_port(A_IP), name="solo")
    node.start()
    node.stop()
    assert node.stopped
    node.cont()
    assert node.running and not node.stopped
    # The fixture kills and reaps it after the test (NodeProcess.close).


# -- NodeProcess ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_node_process_is_ready_when_it_listens_and_reports_status_and_rss(pair: Pair) -> None:
    pair.start()
    a = pair.a
    assert a.ready and a.running and not a.stopped
    assert a.node_id == pair.a_id
    assert a.address == (A_IP, a.port) and a.port > 0
    status = a.status()
    assert status["node"]["node_id"] == pair.a_id
    assert status["node"]["pid"] == a.pid
    assert a.peer_states() == {B_IP: "up"}
    rss = a.rss_bytes()
    assert rss == read_rss_bytes(a.pid)  # type: ignore[arg-type]
    # A running node with anyio, cbor2 and ssl loaded: tens of MB, not bytes or GB.
    assert 10_000_000 < rss < 200_000_000
    config = a.config_path.read_text()
    assert f'listen = "{A_IP}:{a.port}"' in config
    assert "interval_s = 0.5" in config


@pytest.mark.timeout(60)
def test_node_process_stop_makes_the_peer_time_out_and_cont_brings_it_back(pair: Pair) -> None:
    pair.start()
    a, b = pair.a, pair.b
    mark = a.line_mark()
    stopped_at = time.monotonic()
    b.stop()
    assert b.stopped and process_state(b.pid) == "T"  # type: ignore[arg-type]
    a.wait_for(rf"peer down {_ip_re(B_IP)} .*keepalive timeout", EVENT_TIMEOUT_S, since=mark)
    # By the timeout, not at once: the stopped node's sockets stay open, only
    # silent. (Its last frame may predate the stop by up to a ping interval.)
    assert time.monotonic() - stopped_at >= KEEPALIVE_TIMEOUT_S - 2 * KEEPALIVE_INTERVAL_S
    # A stopped node does not answer its control socket.
    with pytest.raises(ControlError, match="did not answer within"):
        b.status(timeout_s=0.5)
    mark = a.line_mark()
    b.cont()
    assert not b.stopped and process_state(b.pid) != "T"  # type: ignore[arg-type]
    a.wait_for(rf"peer up {_ip_re(B_IP)} \(node {pair.b_id}", EVENT_TIMEOUT_S, since=mark)
    assert b.status()["node"]["node_id"] == pair.b_id


@pytest.mark.timeout(60)
def test_node_process_kill_and_restart_keep_identity_ip_and_port(pair: Pair) -> None:
    pair.start()
    a, b = pair.a, pair.b
    old_pid, old_port = b.pid, b.port
    mark = a.line_mark()
    assert b.kill() == -9
    assert not b.running and not b.ready
    assert process_state(old_pid) is None  # type: ignore[arg-type]
    a.wait_for(rf"peer down {_ip_re(B_IP)} ", EVENT_TIMEOUT_S, since=mark)
    with pytest.raises(NodeProcessError, match="not running"):
        b.rss_bytes()
    mark = a.line_mark()
    b.restart()
    assert b.pid != old_pid and b.port == old_port and b.node_id == pair.b_id
    assert b.starts == 2
    a.wait_for(rf"peer up {_ip_re(B_IP)} \(node {pair.b_id}", EVENT_TIMEOUT_S, since=mark)
    # Only the current process's lines count for it: the first start's are older.
    assert sum(bool(READY_RE.search(line)) for line in b.lines(current=True)) == 1
    assert sum(bool(READY_RE.search(line)) for line in b.lines()) == 2
    log = b.log_path.read_text()
    assert log.count(": start ") == 2 and "Traceback" not in log


@pytest.mark.timeout(60)
def test_node_process_graceful_restart_says_bye(pair: Pair) -> None:
    pair.start()
    mark = pair.a.line_mark()
    pair.b.restart(graceful=True)
    pair.a.wait_for(
        rf"peer down {_ip_re(B_IP)} .*peer said bye: node shutting down",
        EVENT_TIMEOUT_S,
        since=mark,
    )
    pair.a.wait_for(rf"peer up {_ip_re(B_IP)} ", EVENT_TIMEOUT_S, since=mark)


@pytest.mark.timeout(60)
def test_node_process_terminate_exits_0_and_close_cleans_up(pair: Pair) -> None:
    pair.start()
    a, b = pair.a, pair.b
    assert a.terminate() == 0
    a.wait_for(r"received SIGTERM: saying bye to peers", 1.0)
    b.stop()
    pid = b.pid
    b.close()  # kills a stopped process too
    b.close()  # idempotent
    assert process_state(pid) is None  # type: ignore[arg-type]
    assert not b.running
    with pytest.raises(NodeProcessError, match="closed"):
        b.start()


@pytest.mark.timeout(60)
def test_node_process_start_reports_a_node_that_exits(tmp_path: Path) -> None:
    create_identity(tmp_path / "n")
    with socket.socket() as taken:
        taken.bind((A_IP, 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = NodeProcess(tmp_path / "n", A_IP, port=port)
        with node, pytest.raises(NodeProcessError) as caught:
            node.start(timeout_s=EVENT_TIMEOUT_S)
    message = str(caught.value)
    # The exit status is the command line's business (tests/test_cli.py).
    assert re.search(r"exited with status [1-9]\d* before listening", message), message
    assert f"error: cannot listen on {A_IP}:{port}" in message


@pytest.mark.timeout(60)
def test_node_process_wait_for_fails_at_its_deadline(pair: Pair) -> None:
    pair.start()
    started = time.monotonic()
    with pytest.raises(NodeProcessError, match=r"no line matching 'never logged' within 0\.3 s"):
        pair.a.wait_for("never logged", 0.3)
    assert time.monotonic() - started < 5


_LAUNCHER = """
import os, sys
from edgenode.testing.procs import NodeProcess, free_port
node = NodeProcess(sys.argv[1], sys.argv[2], port=free_port(sys.argv[2]), die_with_parent=False)
node.start(timeout_s=float(sys.argv[3]))
node.stop()
print(node.pid, flush=True)
os._exit(0)  # no clean-up: the node outlives its launcher, stopped
"""


@pytest.mark.timeout(60)
def test_node_process_stays_stopped_when_its_launchers_group_is_orphaned(tmp_path: Path) -> None:
    # The launcher leads a process group of its own, as a job of a shell does.
    # When it exits, a stopped member of that group would get SIGHUP and
    # SIGCONT from the kernel (an orphaned process group): a node has a
    # session of its own, so a soak's stopped node stays stopped.
    create_identity(tmp_path / "n")
    launcher = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, str(tmp_path / "n"), A_IP, str(EVENT_TIMEOUT_S)],
        capture_output=True,
        text=True,
        timeout=EVENT_TIMEOUT_S + 10,
        stdin=subprocess.DEVNULL,
        preexec_fn=os.setpgrp,
    )
    assert launcher.returncode == 0, launcher.stderr
    pid = int(launcher.stdout)
    try:
        assert process_state(pid) == "T"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_toml_text_writes_strings_numbers_lists_and_booleans() -> None:
    text = toml_text({"node": {"listen": '127.0.0.2:1"', "grace": 1.5}, "peers": {"on": True}})
    assert text == '[node]\nlisten = "127.0.0.2:1\\""\ngrace = 1.5\n\n[peers]\non = true\n'
    with pytest.raises(ValueError, match="control characters"):
        toml_text({"node": {"x": "a\nb"}})


# -- the soak node ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_soak_nodes_record_each_acknowledged_request_and_sent_message_once(
    tmp_path: Path,
) -> None:
    ids = {name: create_identity(tmp_path / name).node_id for name in ("a", "b")}
    ports = {A_IP: free_port(A_IP), B_IP: free_port(B_IP)}
    procs = []
    for name, ip, other in (("a", A_IP, B_IP), ("b", B_IP, A_IP)):
        state = tmp_path / name
        procs.append(
            NodeProcess(
                state,
                ip,
                port=ports[ip],
                peers=[(other, ports[other])],
                authorised=list(ids.values()),
                app=("-m", "edgenode.testing.soak_node"),
                app_args=[
                    "--handled-log",
                    str(state / "handled.log"),
                    "--acked-log",
                    str(state / "acked.log"),
                    "--sent-log",
                    str(state / "sent.log"),
                    "--received-log",
                    str(state / "received.log"),
                    "--tag",
                    f"{name}s1",
                    "--rate",
                    "50",
                    "--send-rate",
                    "100",
                    "--send-burst",
                    "5",
                    "--report-every",
                    "0.2",
                ],
                name=name,
            )
        )
    try:
        for proc in procs:
            proc.start(wait=False)
        for proc in procs:
            proc.wait_ready(EVENT_TIMEOUT_S)
        # Each soak node logs its figures: wait until it has ten answers and
        # has received a hundred messages.
        for proc in procs:
            proc.wait_for(r"soak: sent \d+, .*\b[1-9]\d+ acknowledged", EVENT_TIMEOUT_S)
            proc.wait_for(r"soak messages: .*received [1-9]\d\d+,", EVENT_TIMEOUT_S)
        ended: dict[str, list[tuple[float, str]]] = {}
        for proc in procs:
            ended[proc.ip] = [(time.monotonic(), "end")]
            assert proc.terminate() == 0
    finally:
        for proc in procs:
            proc.close()
    logs = {ip: tmp_path / n for n, ip in (("a", A_IP), ("b", B_IP))}
    sent = {ip: (state / "sent.log").read_text().splitlines() for ip, state in logs.items()}
    received = {ip: (state / "received.log").read_text().splitlines() for ip, state in logs.items()}
    # A peer that says bye is noticed at once: a second covers what was in flight.
    sends = check_sends(sent, received, ended, window_s=1.0)
    assert sends.ok, sends.troubles()
    assert sends.delivered >= 200 and sends.sent - sum(sends.excused.values()) >= 200
    assert all(line.split()[2] == B_IP for line in sent[A_IP])
    assert all(line.split()[1] == A_IP for line in received[B_IP])
    handled = {
        ip: (tmp_path / n / "handled.log").read_text().splitlines()
        for n, ip in (("a", A_IP), ("b", B_IP))
    }
    acked = {
        ip: (tmp_path / n / "acked.log").read_text().splitlines()
        for n, ip in (("a", A_IP), ("b", B_IP))
    }
    result = check_exactly_once(handled, acked)
    assert result.ok, result
    assert result.acknowledged >= 10
    assert all(line.startswith("as1.") and line.endswith(f" {B_IP}") for line in acked[A_IP])
    assert all(line.endswith(f" {A_IP}") for line in handled[B_IP])


# -- the soak's checkers ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_read_connections_counts_a_loopback_connection_once() -> None:
    ips = ["127.0.61.10", "127.0.61.11"]
    with socket.socket() as listener:
        listener.bind((ips[0], 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.socket() as first, socket.socket() as second:
            for sock in (first, second):
                sock.bind((ips[1], 0))
                sock.connect((ips[0], port))
            accepted = [listener.accept()[0] for _ in range(2)]
            try:
                found = read_connections(ips, [(ips[0], port)])
                # Each connection is listed once per end; counted once.
                assert found == {
                    ((ips[0], port), (ips[1], sock.getsockname()[1])) for sock in (first, second)
                }
                assert read_connections(ips, [(ips[0], port + 1)]) == set()
                assert read_connections(["127.0.61.10", "127.0.61.12"]) == set()
            finally:
                for sock in accepted:
                    sock.close()


def test_parse_proc_net_tcp_keeps_established_connections_between_given_ips() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue\n"
        # 127.0.61.2:7300 <-> 127.0.61.3:40000, both ends, ESTABLISHED (01)
        "   0: 023D007F:1C84 033D007F:9C40 01 00000000:00000000\n"
        "   1: 033D007F:9C40 023D007F:1C84 01 00000000:00000000\n"
        # the same pair, TIME_WAIT (06): not live
        "   2: 023D007F:1C84 033D007F:9C41 06 00000000:00000000\n"
        # a listener (0A)
        "   3: 023D007F:1C84 00000000:0000 0A 00000000:00000000\n"
        # another IP
        "   4: 023D007F:1C84 043D007F:9C42 01 00000000:00000000\n"
    )
    if sys.byteorder != "little":
        pytest.skip("the sample text is as a little-endian kernel writes it")
    found = parse_proc_net_tcp(text, ["127.0.61.2", "127.0.61.3"])
    assert found == {(("127.0.61.2", 7300), ("127.0.61.3", 40000))}


def _conn(a_port: int, b_port: int) -> tuple[tuple[str, int], tuple[str, int]]:
    return (("127.0.61.2", a_port), ("127.0.61.3", b_port))


def test_duplicate_tracker_allows_a_transient_duplicate() -> None:
    tracker = DuplicateTracker(grace_s=4.0)
    tracker.sample(0.0, [_conn(7300, 40000)])
    tracker.sample(0.5, [_conn(7300, 40000), _conn(40001, 7301)])  # a simultaneous open
    tracker.sample(1.0, [_conn(7300, 40000)])  # resolved
    assert tracker.violations == []
    assert (tracker.samples, tracker.episodes, tracker.most_at_once) == (3, 1, 2)


def test_duplicate_tracker_rejects_two_connections_kept_beyond_the_grace() -> None:
    tracker = DuplicateTracker(grace_s=4.0)
    both = [_conn(7300, 40000), _conn(40001, 7301)]
    for t in (0.0, 2.0, 4.0, 4.5, 5.0):
        tracker.sample(t, both)
    assert tracker.violations == [
        "127.0.61.2 and 127.0.61.3: connections 127.0.61.2:7300-127.0.61.3:40000 and "
        "127.0.61.2:40001-127.0.61.3:7301 both established for 4.50 s (grace 4.00 s)"
    ]
    assert tracker.longest_s == 5.0


def _expect(name: str, up: bool, changed_at: float = 0.0) -> Expected:
    return Expected(name, f"127.0.61.{int(name[1:]) + 2}", f"id-{name}", up, changed_at)


def _row(name: str, state: str, node_id: str | None = None) -> dict[str, object]:
    return {
        "ip": f"127.0.61.{int(name[1:]) + 2}",
        "state": state,
        "node_id": node_id or f"id-{name}",
    }


def test_agreement_tracker_allows_disagreement_within_the_bound() -> None:
    tracker = AgreementTracker(bound_s=3.0)
    me, peer = _expect("n0", True), _expect("n1", True)
    assert tracker.observe(1.0, me, [peer], [_row("n1", "up")])
    stopped = _expect("n1", False, changed_at=2.0)  # stopped at t=2
    assert not tracker.observe(4.5, me, [stopped], [_row("n1", "up")])  # stale for 2.5 s
    assert tracker.observe(4.9, me, [stopped], [_row("n1", "down")])
    assert tracker.violations == [] and tracker.longest_s == 2.5


def test_agreement_tracker_reports_a_stale_peer_once_past_the_bound() -> None:
    tracker = AgreementTracker(bound_s=3.0)
    me, dead = _expect("n0", True), _expect("n1", False, changed_at=10.0)
    assert not tracker.observe(11.0, me, [dead], [_row("n1", "up")])
    assert not tracker.observe(13.5, me, [dead], [_row("n1", "up")])
    assert not tracker.observe(14.0, me, [dead], [_row("n1", "up")])
    assert tracker.violations == [
        "n0 listed n1 (127.0.61.3) as up for 3.50 s while it was not running (bound 3.00 s)"
    ]
    # A running peer missing from the table, and one listed under another ID.
    tracker = AgreementTracker(bound_s=3.0)
    assert not tracker.observe(
        5.0, me, [_expect("n1", True), _expect("n2", True)], [_row("n2", "up", "id-other")]
    )
    assert tracker.violations == [
        "n0 listed n1 (127.0.61.3) as absent for 5.00 s while it was running (bound 3.00 s)"
    ]
    assert tracker.wrong_ids == ["n0 lists 127.0.61.4 up as node id-other, expected id-n2"]


def test_check_exactly_once_accepts_acknowledged_requests_handled_once() -> None:
    handled = {"10.0.0.2": ["n1s1.1 10.0.0.3", "n1s1.2 10.0.0.3"], "10.0.0.3": []}
    acked = {"10.0.0.3": ["n1s1.1 10.0.0.2"]}
    result = check_exactly_once(handled, acked)
    assert result.ok
    assert (result.acknowledged, result.handled, result.handled_not_acknowledged) == (1, 2, 1)


def test_check_exactly_once_rejects_duplicates_losses_and_misroutes() -> None:
    handled = {
        "10.0.0.2": ["a.1 10.0.0.3", "a.2 10.0.0.3", "a.4 10.0.0.9"],
        "10.0.0.4": ["a.1 10.0.0.3", "a.3 10.0.0.3", "torn"],
    }
    acked = {
        "10.0.0.3": [
            "a.1 10.0.0.2",
            "a.3 10.0.0.2",
            "a.4 10.0.0.2",
            "a.5 10.0.0.2",
            "! a.6 10.0.0.2 6869",
        ]
    }
    result = check_exactly_once(handled, acked)
    assert not result.ok
    assert result.duplicates == [
        "a.1 handled 2 times: [('10.0.0.2', '10.0.0.3'), ('10.0.0.4', '10.0.0.3')]"
    ]
    assert result.missing == ["a.5 from 10.0.0.3 to 10.0.0.2"]
    assert result.misrouted == [
        "a.3 from 10.0.0.3 to 10.0.0.2 handled by 10.0.0.4 as from 10.0.0.3",
        "a.4 from 10.0.0.3 to 10.0.0.2 handled by 10.0.0.2 as from 10.0.0.9",
    ]
    assert result.wrong_answers == ["10.0.0.3: ! a.6 10.0.0.2 6869"]
    assert result.malformed == ["handled log of 10.0.0.4: 'torn'"]


def test_check_exactly_once_needs_at_least_one_acknowledged_request() -> None:
    assert not check_exactly_once({"10.0.0.2": []}, {"10.0.0.3": []}).ok


# The send check: S sends from 10.0.0.2, R receives at 10.0.0.3; times in seconds.
S, R, T = "10.0.0.2", "10.0.0.3", "10.0.0.4"
WINDOW_S = 3.0


def _sent(message_id: str, at: float, to: str = R) -> list[str]:
    """The sent-log lines of a send() that returned ``at``."""
    return [f"> {message_id} {to} {at - 0.001:.6f}", f"= {message_id} {to} {at:.6f}"]


def _got(message_id: str, at: float, sender: str = S) -> str:
    return f"{message_id} {sender} {at:.6f}"


def test_check_sends_accepts_each_message_delivered_once_in_order() -> None:
    sent = {S: [*_sent("as1.1", 10.0), *_sent("as1.2", 10.1), *_sent("as1.3", 10.2, to=T)]}
    sent[S] += ["> as1.4 10.0.0.3 10.3", "x as1.4 10.0.0.3 PeerUnavailable"]
    sent[S] += ["> as1.5 10.0.0.3 10.4"]  # the process ended inside the call
    received = {
        R: [_got("as1.1", 10.05), _got("as1.2", 10.9)],
        T: [_got("as1.3", 10.25)],
    }
    result = check_sends(sent, received, {}, WINDOW_S)
    assert result.ok, result.troubles()
    assert (result.called, result.sent, result.delivered) == (5, 3, 3)
    assert result.refused == {"PeerUnavailable": 1}
    assert (result.unfinished, result.delivered_unfinished) == (1, 0)
    assert result.slowest == "as1.2" and abs(result.slowest_s - 0.8) < 1e-6
    # A message delivered although its process ended before logging that send() returned.
    received[R].append(_got("as1.5", 10.5))
    result = check_sends(sent, received, {}, WINDOW_S)
    assert result.ok and (result.unfinished, result.delivered_unfinished) == (1, 1)


def test_check_sends_excuses_a_loss_within_the_window_of_either_nodes_fault() -> None:
    sent = {S: [*_sent("as1.1", 10.0), *_sent("as1.2", 20.0), *_sent("as1.3", 30.0)]}
    faults = {
        R: [(12.9, "kill")],  # 2.9 s after as1.1 was sent: it was in flight
        S: [(17.0, "stop"), (33.0, "end of the soak")],  # 3.0 s before as1.2, 3.0 s after as1.3
    }
    result = check_sends(sent, {R: []}, faults, WINDOW_S)
    assert result.lost == [] and result.sent == 3
    assert result.excused == {"receiver kill": 1, "sender stop": 1, "sender end of the soak": 1}
    # No message delivered: the check means nothing.
    assert not result.ok and result.troubles() == []


def test_check_sends_rejects_a_loss_no_fault_explains_with_its_id_and_nearest_faults() -> None:
    sent = {S: [*_sent("as1.1", 10.0), *_sent("as1.2", 20.0), *_sent("as1.3", 30.0)]}
    faults = {R: [(6.9, "kill"), (40.0, "stop")], T: [(20.0, "kill")]}  # T is neither end
    received = {R: [_got("as1.3", 30.1)]}
    # A start is shown beside a loss, but a new process's connections lose nothing.
    starts = {R: [0.0, 19.5]}
    result = check_sends(sent, received, faults, WINDOW_S, origin=5.0, starts=starts)
    assert not result.ok
    assert result.lost == [
        "as1.1 from 10.0.0.2 to 10.0.0.3, send() returned at 5.00 s; nearest events: "
        "sender 10.0.0.2: none; receiver 10.0.0.3: kill at 1.90 s (-3.10 s), "
        "start at 14.50 s (+9.50 s)",
        "as1.2 from 10.0.0.2 to 10.0.0.3, send() returned at 15.00 s; nearest events: "
        "sender 10.0.0.2: none; receiver 10.0.0.3: start at 14.50 s (-0.50 s), "
        "stop at 35.00 s (+20.00 s)",
    ]
    assert result.troubles()[0].startswith("lost, no fault explains it: as1.1 from 10.0.0.2")
    assert result.excused == {}


def test_check_sends_rejects_duplicates_disorder_phantoms_and_misroutes() -> None:
    sent = {
        S: [*(line for n in range(1, 6) for line in _sent(f"as1.{n}", 10.0 + n))],
        T: [*_sent("ts1.1", 10.0, to=S), "> ts1.2 10.0.0.2 11.0", "x ts1.2 10.0.0.2 NodeClosed"],
    }
    received = {
        R: [
            _got("as1.1", 11.1),
            _got("as1.1", 11.2),  # twice
            _got("as1.3", 13.1),
            _got("as1.2", 13.2),  # after 3
            _got("as1.4", 14.1, sender=T),  # from the wrong node
            _got("bs1.1", 14.2),  # never sent
        ],
        T: [_got("as1.5", 15.1)],  # sent to R
        S: [_got("ts1.1", 10.1, sender=T), _got("ts1.2", 11.1, sender=T), "! stalled", "torn"],
    }
    result = check_sends(sent, received, {}, WINDOW_S)
    assert not result.ok
    assert result.duplicates == ["as1.1 from 10.0.0.2 to 10.0.0.3: delivery 2, at 10.0.0.3"]
    assert result.out_of_order == ["as1.2 delivered at 10.0.0.3 after as1.3"]
    assert result.phantoms == ["bs1.1 from 10.0.0.2 at 10.0.0.3"]
    assert result.misrouted == [
        "as1.4 sent from 10.0.0.2 to 10.0.0.3, delivered at 10.0.0.3 as from 10.0.0.4",
        "as1.5 sent from 10.0.0.2 to 10.0.0.3, delivered at 10.0.0.4 as from 10.0.0.2",
    ]
    assert result.delivered_refused == ["ts1.2 from 10.0.0.4 to 10.0.0.2: send() raised NodeClosed"]
    assert result.receiver_troubles == ["10.0.0.2: stalled"]
    assert result.malformed == ["received log of 10.0.0.2: 'torn'"]
    assert result.lost == []
    assert result.delivered == 9


def test_check_sends_orders_per_sender_and_receiver_across_restarts() -> None:
    # Two processes of one node are two senders; each numbers from 1.
    sent = {S: [*_sent("as1.7", 10.0), *_sent("as2.1", 20.0), *_sent("as2.2", 21.0, to=T)]}
    received = {R: [_got("as1.7", 10.1), _got("as2.1", 20.1)], T: [_got("as2.2", 21.1)]}
    assert check_sends(sent, received, {}, WINDOW_S).ok


def test_check_sends_reports_malformed_sent_lines() -> None:
    sent = {
        S: [
            *_sent("as1.1", 10.0),
            "> as1.1 10.0.0.3 11.0",  # an ID used twice
            "= as1.9 10.0.0.3 11.0",  # no call
            "= as1.1 10.0.0.4 11.0",  # another receiver than the call's
            "> as1 10.0.0.3 11.0",  # no sequence number
            "> as1.2 10.0.0.3 soon",
        ]
    }
    result = check_sends(sent, {R: [_got("as1.1", 10.1)]}, {}, WINDOW_S)
    assert result.malformed == [
        "sent log of 10.0.0.2: '> as1.1 10.0.0.3 11.0'",
        "sent log of 10.0.0.2: '= as1.9 10.0.0.3 11.0'",
        "sent log of 10.0.0.2: '= as1.1 10.0.0.4 11.0'",
        "sent log of 10.0.0.2: '> as1 10.0.0.3 11.0'",
        "sent log of 10.0.0.2: '> as1.2 10.0.0.3 soon'",
    ]
    assert not result.ok and result.sent == 1


def test_check_sends_describes_its_figures() -> None:
    sent = {S: [*_sent("as1.1", 10.0), *_sent("as1.2", 11.0)]}
    sent[S] += ["> as1.3 10.0.0.3 12.0", "x as1.3 10.0.0.3 PeerUnavailable"]
    result = check_sends(sent, {R: [_got("as1.1", 10.5)]}, {R: [(12.0, "kill")]}, WINDOW_S)
    assert result.ok
    assert result.describe() == (
        "2 messages sent (send() returned), 1 deliveries; lost to a fault within 3.00 s of "
        "the send 1 (receiver kill 1); lost with no fault to explain it 0, delivered more "
        "than once 0, out of order 0, never sent 0, delivered although send() raised 0, "
        "misrouted 0, receiver troubles 0, malformed lines 0; send() raised 1 "
        "(PeerUnavailable 1), 0 calls cut by their process's end (0 of them delivered); "
        "slowest delivery 0.50 s (as1.1)"
    )


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--first-ip", "10.0.0.1"], "leave 127.0.0.0/8"),
        (["--first-ip", "127.255.255.250"], "leave 127.0.0.0/8"),
        (["--nodes", "1"], "--nodes: expected at least 2, got 1"),
        (["--send-burst", "0"], "--send-burst: expected at least 1, got 0"),
        (["--keepalive-interval", "2", "--keepalive-timeout", "1"], "must be more than"),
        (["--workdir", "{used}"], "is not empty"),
    ],
)
def test_soak_rejects_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "n00").mkdir()
    args = [arg.format(used=used) for arg in args]
    result = subprocess.run(
        [sys.executable, "-m", "edgenode.testing.soak", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- the soak, short form --------------------------------------------------------------------


@pytest.mark.soak
@pytest.mark.timeout(SHORT_FORM_TIMEOUT_S + 30)
def test_soak_short_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """20 nodes, one minute of chaos: every check holds (python -m edgenode.testing.soak)."""
    summary_path = tmp_path / "summary.json"
    output_path = tmp_path / "soak.out"
    command = [
        sys.executable,
        "-m",
        "edgenode.testing.soak",
        "--nodes",
        "20",
        "--duration",
        "60",
        "--seed",
        "1",
        "--workdir",
        str(tmp_path / "fleet"),
        "--json",
        str(summary_path),
    ]
    with open(output_path, "w") as output:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=SHORT_FORM_TIMEOUT_S,
        )
    out = output_path.read_text()
    with capsys.disabled():  # the figures belong in the CI log, pass or fail
        print("\n" + out[out.find("== soak summary") :].rstrip())
    assert result.returncode == 0, out
    assert re.search(r"^result: PASS \(6 of 6 checks held\)$", out, re.M), out
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] and all(check["ok"] for check in summary["checks"]), out
    assert summary["nodes"] == 20
    # The chaos did happen, and of every kind.
    kinds = {kind.split(" ")[0] for kind in summary["actions"]}
    assert sum(summary["actions"].values()) >= 8, out
    assert {"kill", "stop", "restart"} <= kinds, out
    measured = [s for s in summary["agreement_s"] if s is not None]
    assert measured and max(measured) <= summary["bound_s"], out
    # send(): thousands of messages checked, each delivered once and in order or
    # lost to a fault of its sender or receiver near its send.
    sends = summary["sends"]
    assert sends["sent"] >= 2000 and sends["delivered"] >= 2000, out
    assert sends["lost"] == sends["duplicates"] == sends["out_of_order"] == 0, out
    assert sends["window_s"] == summary["bound_s"], out
