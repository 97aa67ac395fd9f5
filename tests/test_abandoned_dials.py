"""Dials their nodes gave up on while this node could not accept them.

A node stopped (SIGSTOP, a debugger, a swapping Pi) still has its kernel
completing TCP handshakes into the accept queue; the dialling nodes give
up after their handshake timeout and close. When the node runs again it
finds those connections closed by their peers: they are closed unanswered,
counted with the refusals in ``status`` under their own reason, and summed
up in the refusal log's summary line, instead of a failed handshake and a
warning each (docs/reliability.md, "What these found").
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edgenode.handshake import ABANDONED
from edgenode.identity import create_identity
from edgenode.node import Node, PeerUp
from edgenode.testing import wait_for as kit_wait_for
from edgenode.testing.procs import NodeProcess
from edgenode.transports.tcp import closed_before_accept

from .conftest import wait_event, wait_until

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not hasattr(socket, "TCP_INFO"), reason="needs TCP_INFO (Linux) to tell a closed dial"
    ),
]

B_IP = "127.0.91.2"
#: Bound for a node process's log line or status to show what happened: holds
#: on a board ten times slower than CI's machine.
LINE_S = 30.0


@contextmanager
def listener(ip: str) -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind((ip, 0))
    sock.listen(8)
    with sock:
        yield sock


def close_wait_count(port: int) -> int:
    """Connections to ``port`` that the peer has closed, waiting in an accept queue."""
    count = 0
    with open("/proc/net/tcp") as table:
        for row in table.read().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "08":  # CLOSE_WAIT
                count += 1
    return count


def test_a_connection_closed_in_the_accept_queue_is_told_from_a_live_one() -> None:
    with listener("127.0.91.1") as sock:
        given_up = socket.create_connection(sock.getsockname())
        given_up.sendall(b"preamble and a TLS client hello")
        given_up.close()
        live = socket.create_connection(sock.getsockname())
        with live:
            live.sendall(b"preamble")
            first, _ = sock.accept()
            second, _ = sock.accept()
            with first, second:
                assert closed_before_accept(first)
                assert not closed_before_accept(second)


def start_b(tmp_path: Path, node_processes: Callable[..., NodeProcess], **kw: Any) -> NodeProcess:
    create_identity(tmp_path / "b")
    return node_processes(tmp_path / "b", B_IP, **kw).start()


def by_reason(b: NodeProcess) -> dict[str, int]:
    return b.status()["node"]["refusals"]["by_reason"]


def test_dials_given_up_while_the_node_was_stopped_are_counted_and_summed_up_in_one_line(
    tmp_path: Path, node_processes: Callable[..., NodeProcess]
) -> None:
    b = start_b(tmp_path, node_processes)
    sources = [f"127.0.92.{i}" for i in range(10, 30)]
    b.stop()
    try:
        for ip in sources:
            dial = socket.socket()
            dial.bind((ip, 0))
            dial.connect(b.address)
            dial.sendall(b"a preamble and a TLS client hello nobody answered")
            dial.close()
        wait_for(lambda: close_wait_count(b.address[1]) == len(sources), "20 in CLOSE_WAIT")
        mark = b.line_mark()
    finally:
        b.cont()
    line = b.wait_for(r"refused .* given up", LINE_S, since=mark)
    assert "refused 20 more connections in " in line
    assert f"from 20 addresses: 20 {ABANDONED}; most from 127.0.92." in line
    assert by_reason(b) == {ABANDONED: 20}
    # That one line, and no handshake failed or warned about them one by one.
    new = b.line_mark() - mark
    noisy = [text for text in b.lines()[-new:] if "127.0.92." in text and text != line]
    assert noisy == [], noisy
    # Only the abandoned are let go: a live connection with garbage is refused as ever.
    with socket.create_connection(b.address) as garbage:
        garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
        wait_for(lambda: b.status()["node"]["refused_connections"] == 21, "the refusal")
    assert by_reason(b)[ABANDONED] == 20


def wait_for(condition: Callable[[], bool], what: str) -> None:
    kit_wait_for(condition, LINE_S, what)


async def test_a_node_continued_after_a_stop_takes_the_live_dial_and_counts_the_stale_ones(
    make_config: Any, identities: Any, tmp_path: Path, node_processes: Callable[..., NodeProcess]
) -> None:
    b = start_b(tmp_path, node_processes, authorised=[identities["a"].node_id])
    b_id = b.node_id
    config = make_config(
        "a",
        "127.0.91.3",
        [(B_IP, b.port)],
        authorised=identities.ids("a") | {b_id},
        handshake_timeout_s=0.5,
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
    )
    async with Node(config) as a:
        events = a.events()
        await wait_event(events, lambda e: isinstance(e, PeerUp), LINE_S)
        b.stop()
        try:
            # a notices b is gone, then gives up two dials in b's accept queue.
            failed = a.stats()["dials_failed"]
            await wait_until(lambda: a.stats()["dials_failed"] >= failed + 2, LINE_S)
            stale = a.stats()["dials_failed"] - failed
        finally:
            b.cont()
        await wait_event(events, lambda e: isinstance(e, PeerUp), LINE_S)
    assert by_reason(b).get(ABANDONED, 0) >= stale
