"""The control socket, and ``edgenode status`` / ``edgenode send`` as real subprocesses.

A real node runs in the test's event loop with its control server started
by the test (``tg.start(serve_control, node, path)``). The commands run
with ``anyio.run_process``, so the node keeps answering while a command
waits for it. Sockets live in a short private directory: unix socket paths
are limited to 107 bytes.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import anyio
import pytest

from edgenode import control
from edgenode.control import MAX_REQUEST_BYTES, serve_control
from edgenode.control_client import NoNodeRunning, control_request
from edgenode.errors import ConfigError
from edgenode.node import Incoming, Node, PeerUp
from edgenode.status_text import format_status

from .conftest import wait_event, wait_until

pytestmark = pytest.mark.anyio

COMMAND_TIMEOUT_S = 30.0
ANSWER_TIMEOUT_S = 5.0

OPS = "status, send, watch, reload-trust"


async def edgenode(tmp_path: Path, *args: str) -> CompletedProcess[bytes]:
    """Run ``python -m edgenode ARGS`` without blocking the event loop."""
    env = dict(os.environ)
    env["EDGENODE_STATE_DIR"] = str(tmp_path / "default-state")
    env.pop("XDG_STATE_HOME", None)
    with anyio.fail_after(COMMAND_TIMEOUT_S):
        return await anyio.run_process(
            [sys.executable, "-m", "edgenode", *args], check=False, env=env
        )


def error_line(result: CompletedProcess[bytes]) -> str:
    """The one ``error: ...`` line of a failed command; no traceback."""
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@asynccontextmanager
async def serving(node: Node, path: Path) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        assert await tg.start(serve_control, node, path) == path
        yield
        tg.cancel_scope.cancel()


async def start_fails(node: Node, path: Path) -> ConfigError:
    """Start a control server that should refuse ``path``; return its error."""
    async with anyio.create_task_group() as tg:
        try:
            await tg.start(serve_control, node, path)
        except ConfigError as exc:
            return exc
        tg.cancel_scope.cancel()
    raise AssertionError(f"control server started on {path}")


@asynccontextmanager
async def node_with_peer(make_config: Any, path: Path) -> AsyncIterator[tuple[Node, Node]]:
    """Node a (127.0.0.2) serving control on ``path``, with b (127.0.0.3) connected
    and a round trip measured."""
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        events = a.events()
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            await wait_event(events, lambda e: isinstance(e, PeerUp))
            await wait_until(lambda: a.peers()[0].rtt_s is not None)
            yield a, b


class Client:
    """A raw control connection: write bytes, read JSON lines."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: Path) -> AsyncIterator[Client]:
        stream = await anyio.connect_unix(path)
        async with stream:
            yield cls(stream)

    async def ask(self, data: bytes) -> dict[str, Any]:
        await self.stream.send(data)
        return await self.answer()

    async def answer(self) -> dict[str, Any]:
        with anyio.fail_after(ANSWER_TIMEOUT_S):
            while b"\n" not in self.buffer:
                self.buffer += await self.stream.receive()
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    async def at_end(self) -> bool:
        """Whether the server closed the connection (and sent nothing more)."""
        with anyio.fail_after(ANSWER_TIMEOUT_S):
            try:
                await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True
        return False


def dead_socket(path: Path) -> None:
    """Leave a socket file at ``path`` with nobody listening, as a killed node does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


# -- edgenode status / send against a running node --------------------------------------


async def test_status_json_shows_peer_and_node_figures(
    make_config: Any, sock_dir: Path, tmp_path: Path
) -> None:
    path = sock_dir / "control.sock"
    async with node_with_peer(make_config, path) as (a, b):
        result = await edgenode(tmp_path, "status", "--socket", str(path), "--json")
    assert result.returncode == 0, result.stderr.decode()
    status = json.loads(result.stdout)
    assert status["ok"] is True
    [peer] = status["peers"]
    assert (peer["ip"], peer["node_id"], peer["state"], peer["direction"]) == (
        "127.0.0.3",
        b.node_id,
        "up",
        "inbound",
    )
    assert peer["their_frames_arriving"] is True
    assert peer["our_pings_answered"] is True
    assert peer["rtt_s"] > 0
    assert peer["last_heard_s"] >= 0
    assert peer["bytes_in"] > 0 and peer["bytes_out"] > 0
    assert peer["drops"] == 0
    assert peer["devices"] == []
    node = status["node"]
    assert node["node_id"] == a.node_id
    assert node["pid"] == os.getpid()
    assert node["listen_port"] == a.listen_port
    assert node["uptime_s"] > 0
    for key in ("loop_lag_last_ms", "loop_lag_avg_ms", "loop_lag_max_ms"):
        assert node[key] >= 0
    assert node["rss_bytes"] > 1024 * 1024
    assert node["peers_by_state"] == {"up": 1}
    assert (node["peers_up"], node["peers_down"]) == (1, 0)


async def test_status_table_shows_peer_and_node_figures(
    make_config: Any, sock_dir: Path, tmp_path: Path
) -> None:
    path = sock_dir / "control.sock"
    async with node_with_peer(make_config, path) as (a, b):
        result = await edgenode(tmp_path, "status", "--socket", str(path))
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    assert f"node {a.node_id}" in text
    for figure in ("uptime", "loop lag", "rss", "peers      1 up"):
        assert figure in text, text
    lines = text.splitlines()
    [header] = [line for line in lines if line.startswith("PEER")]
    for column in ("NODE ID", "DEVICES", "DIRECTION", "STATE", "LIVE IN/OUT", "RTT MS", "HEARD"):
        assert column in header
    assert "BYTES IN" in header and "BYTES OUT" in header and "DROPS" in header
    # The table runs from its header to the first blank line; notes below it
    # also start with the peer's IP (a ping caught in the peer's queue on a
    # slow board prints "127.0.0.3: 1 frame queued").
    table = lines[lines.index(header) :]
    table = table[: table.index("")] if "" in table else table
    [row] = [line for line in table if line.startswith("127.0.0.3")]
    cells = row.split()
    short_id = f"{b.node_id[:4]}..{b.node_id[-4:]}"
    assert cells[:6] == ["127.0.0.3", short_id, "-", "inbound", "up", "ok/ok"]
    assert float(cells[6]) > 0  # rtt in ms
    assert cells[-1] == "0"  # drops


async def test_send_delivers_through_the_running_node(
    make_config: Any, sock_dir: Path, tmp_path: Path
) -> None:
    path = sock_dir / "control.sock"
    async with node_with_peer(make_config, path) as (a, b):
        with b.subscribe("ctl/test") as sub:
            result = await edgenode(
                tmp_path, "send", "--socket", str(path), "127.0.0.3", "ctl/test", "héllo"
            )
            assert result.returncode == 0, result.stderr.decode()
            assert result.stdout.decode() == "sent\n"
            with anyio.fail_after(ANSWER_TIMEOUT_S):
                msg = await sub.receive()
        assert msg == Incoming("127.0.0.2", a.node_id, "ctl/test", "héllo".encode())


async def test_send_to_unknown_peer_prints_the_error(
    make_config: Any, sock_dir: Path, tmp_path: Path
) -> None:
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        result = await edgenode(tmp_path, "send", "--socket", str(path), "127.0.0.9", "t", "x")
    assert result.returncode == 1
    # The message, never the error's class name.
    assert error_line(result) == "error: peer 127.0.0.9 is not connected (never seen)"
    assert result.stdout == b""


# -- no node running ----------------------------------------------------------------------


async def test_status_without_node_exits_1(sock_dir: Path, tmp_path: Path) -> None:
    path = sock_dir / "control.sock"
    result = await edgenode(tmp_path, "status", "--socket", str(path))
    assert result.returncode == 1
    assert error_line(result) == f"error: no node is running (control socket {path} not found)"
    assert result.stdout == b""


async def test_status_and_send_default_to_the_state_dir_socket(
    sock_dir: Path, tmp_path: Path
) -> None:
    expected = sock_dir / "control.sock"
    for args in (("status",), ("send", "127.0.0.3", "t", "x")):
        result = await edgenode(tmp_path, *args, "--state-dir", str(sock_dir))
        assert result.returncode == 1
        assert error_line(result) == (
            f"error: no node is running (control socket {expected} not found)"
        )


async def test_status_with_socket_of_dead_node_exits_1(sock_dir: Path, tmp_path: Path) -> None:
    path = sock_dir / "control.sock"
    dead_socket(path)
    result = await edgenode(tmp_path, "status", "--socket", str(path))
    assert result.returncode == 1
    assert error_line(result) == (
        f"error: no node is running (control socket {path} is left from a node that stopped)"
    )


def test_client_raises_no_node_running(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    with pytest.raises(
        NoNodeRunning, match=r"^no node is running \(control socket .* not found\)$"
    ):
        control_request(path, {"op": "status"})


# -- the socket file ----------------------------------------------------------------------


async def test_socket_is_owner_only_and_removed_on_exit(make_config: Any, sock_dir: Path) -> None:
    path = sock_dir / "sub" / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a:
        async with serving(a, path):
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            # A missing parent directory is created owner-only.
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert not path.exists()


async def test_stale_socket_is_replaced(make_config: Any, sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    dead_socket(path)
    os.chmod(path, 0o644)
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        response = await anyio.to_thread.run_sync(control_request, path, {"op": "status"})
        assert response["ok"] is True
        assert response["node"]["node_id"] == a.node_id


async def test_socket_of_running_node_is_refused(make_config: Any, sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        error = await start_fails(a, path)
        assert str(error) == f"control socket {path}: another node is running and listening on it"
        # The first server still answers.
        async with Client.connect(path) as client:
            assert (await client.ask(b'{"op": "status"}\n'))["ok"] is True


@pytest.mark.parametrize("kind", ["a regular file", "a directory", "a symbolic link"])
async def test_non_socket_path_is_refused(make_config: Any, sock_dir: Path, kind: str) -> None:
    path = sock_dir / "control.sock"
    if kind == "a regular file":
        path.write_text("keep me")
    elif kind == "a directory":
        path.mkdir()
    else:
        dead_socket(sock_dir / "elsewhere.sock")
        path.symlink_to(sock_dir / "elsewhere.sock")
    async with Node(make_config("a", "127.0.0.2")) as a:
        error = await start_fails(a, path)
    assert str(error) == (
        f"control socket {path}: path exists and is not a socket ({kind}); "
        "remove it or choose another path"
    )
    assert os.path.lexists(path)
    if kind == "a regular file":
        assert path.read_text() == "keep me"


async def test_overlong_socket_path_is_refused(make_config: Any, sock_dir: Path) -> None:
    path = sock_dir / ("x" * 120)
    async with Node(make_config("a", "127.0.0.2")) as a:
        error = await start_fails(a, path)
    assert str(error) == (
        f"control socket {path}: path of {len(str(path))} bytes exceeds "
        "107-byte limit of unix sockets"
    )


# -- the protocol ---------------------------------------------------------------------------


async def test_bad_requests_get_errors_and_connection_stays_usable(
    make_config: Any, sock_dir: Path
) -> None:
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        async with Client.connect(path) as client:
            cases = [
                (
                    b"not json\n",
                    "BadRequest: expected one JSON object per line, got 6e 6f 74 20 6a 73 6f 6e",
                ),
                (b"\xff\xfe\n", "BadRequest: expected one JSON object per line, got ff fe"),
                (b"[1, 2]\n", "BadRequest: expected a JSON object, got list"),
                (
                    b'{"op": "reboot"}\n',
                    f"BadRequest: unknown op 'reboot': expected one of {OPS}",
                ),
                (b"{}\n", f"BadRequest: unknown op None: expected one of {OPS}"),
                (
                    b'{"op": "watch", "topics": []}\n',
                    "InvalidArgument: watch: expected a list of 1..8 topics, got []",
                ),
                (
                    b'{"op": "watch", "topics": "a/#"}\n',
                    "InvalidArgument: watch: expected a list of 1..8 topics, got 'a/#'",
                ),
                (
                    b'{"op": "watch", "topics": ["a", ""]}\n',
                    "InvalidArgument: watch: expected each topic as non-empty text, got ''",
                ),
                (
                    b'{"op": "watch", "topics": ["t"' + b', "t"' * 8 + b"]}\n",
                    "InvalidArgument: watch: 9 topics exceed the limit of 8",
                ),
                (
                    b'{"op": "watch", "topics": ["' + b"x" * 129 + b'"]}\n',
                    "InvalidArgument: topic of 129 bytes exceeds 128-byte limit",
                ),
                (
                    b'{"op": "reload-trust", "node_id": 5}\n',
                    "BadRequest: reload-trust: 'node_id' should be text, got 5",
                ),
                (
                    b'{"op": "reload-trust", "node_id": "abcd"}\n',
                    "InvalidArgument: reload-trust: node id 'abcd' should be 28 base32 "
                    "characters (dashes optional), got 4",
                ),
                (
                    b'{"op": "send", "peer": 1, "topic": "t", "text": "x"}\n',
                    "BadRequest: send: 'peer' should be text, got 1",
                ),
                (
                    b'{"op": "send", "peer": "127.0.0.9", "topic": "t"}\n',
                    "BadRequest: send: 'text' should be text, got None",
                ),
                (
                    b"[" * 5000 + b"]" * 5000 + b"\n",
                    "BadRequest: request nested 5000 levels deep; the limit is 8",
                ),
                (
                    b'{"op": "send", "peer": "[[[[[[[[[[", "topic": "t", "text": "{{{{{{{{{{"}\n',
                    "InvalidArgument: peer '[[[[[[[[[[' is neither an ip address nor a node id",
                ),
                (
                    b"not json\n",
                    "BadRequest: expected one JSON object per line, got "
                    "6e 6f 74 20 6a 73 6f 6e",
                ),
                (
                    b'{"op": "send", "peer": "127.0.0.9", "topic": "t", "text": "\\ud800"}\n',
                    "BadRequest: send: 'text' is not valid unicode: '\\ud800'",
                ),
                (
                    b'{"op": "send", "peer": "127.0.0.9", "topic": "", "text": "x"}\n',
                    "InvalidArgument: topic: expected non-empty text, got ''",
                ),
                (
                    b'{"op": "send", "peer": "127.0.0.9", "topic": "t", "text": "x"}\n',
                    "PeerUnavailable: peer 127.0.0.9 is not connected (never seen)",
                ),
            ]
            for request, error in cases:
                kind, message = error.split(": ", 1)
                expected = {"ok": False, "error": message, "type": kind}
                assert await client.ask(request) == expected, request
            # Blank lines are skipped; the id is echoed.
            response = await client.ask(b'\n\r\n{"op": "status", "id": 7}\n')
            assert (response["ok"], response["id"]) == (True, 7)
            assert response["node"]["node_id"] == a.node_id
            failed = await client.ask(b'{"op": "nope", "id": "x1"}\n')
            assert failed == {
                "ok": False,
                "error": f"unknown op 'nope': expected one of {OPS}",
                "type": "BadRequest",
                "id": "x1",
            }


async def test_pipelined_requests_are_all_answered_in_order(
    make_config: Any, sock_dir: Path
) -> None:
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        async with Client.connect(path) as client:
            await client.stream.send(
                b"".join(b'{"op": "status", "id": %d}\n' % i for i in range(50))
            )
            for i in range(50):
                assert (await client.answer())["id"] == i


async def test_server_stops_cleanly_with_clients_connected(
    make_config: Any, sock_dir: Path
) -> None:
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a:
        async with serving(a, path):
            idle = await anyio.connect_unix(path)
            leaving = await anyio.connect_unix(path)
            asking = await anyio.connect_unix(path)
            await anyio.wait_all_tasks_blocked()
            # Cancel the server in the same loop turn as a client leaves and
            # another asks: neither must make asyncio log a callback error.
            await leaving.aclose()
            await asking.send(b'{"op": "status"}\n')
        assert not path.exists()
        await idle.aclose()
        await asking.aclose()


async def test_last_request_without_newline_is_answered(make_config: Any, sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        async with Client.connect(path) as client:
            await client.stream.send(b'{"op": "status"}')
            await client.stream.send_eof()
            assert (await client.answer())["node"]["node_id"] == a.node_id
            assert await client.at_end()


async def test_oversize_request_is_refused(make_config: Any, sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        async with Client.connect(path) as client:
            # A request of exactly the limit is fine.
            request = b'{"op": "status"}'
            request += b" " * (MAX_REQUEST_BYTES - len(request))
            assert (await client.ask(request + b"\n"))["ok"] is True
            assert await client.ask(request + b" \n") == {
                "ok": False,
                "error": (
                    f"request of more than {MAX_REQUEST_BYTES} bytes exceeds "
                    f"{MAX_REQUEST_BYTES}-byte limit; closing the connection"
                ),
                "type": "RequestTooLarge",
            }
            assert await client.at_end()
        # A line that never ends is refused too.
        async with Client.connect(path) as client:
            response = await client.ask(b"x" * (2 * MAX_REQUEST_BYTES))
            assert response["type"] == "RequestTooLarge"
            assert response["error"].startswith("request of more than ")
            assert await client.at_end()


async def test_client_that_sends_no_request_is_closed(
    make_config: Any, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT_S", 0.05)
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        async with Client.connect(path) as client:
            await client.stream.send(b'{"op": ')  # and nothing more
            assert await client.answer() == {
                "ok": False,
                "error": "no complete request within 0.05 s",
                "type": "BadRequest",
            }
            assert await client.at_end()


async def test_clients_beyond_the_limit_are_refused(
    make_config: Any, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 1)
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        async with Client.connect(path) as first:
            assert (await first.ask(b'{"op": "status"}\n'))["ok"] is True
            async with Client.connect(path) as second:
                assert await second.answer() == {
                    "ok": False,
                    "error": "1 control clients already connected (limit 1)",
                    "type": "TooManyPending",
                }
                assert await second.at_end()
            assert (await first.ask(b'{"op": "status"}\n'))["ok"] is True
        # The first client's slot is free again once it has gone.
        await anyio.wait_all_tasks_blocked()
        async with Client.connect(path) as third:
            assert (await third.ask(b'{"op": "status"}\n'))["ok"] is True


# -- the table --------------------------------------------------------------------------


def test_format_status_lists_devices_and_down_peers() -> None:
    response = {
        "ok": True,
        "node": {
            "node_id": "aaaa-bbbb-cccc-dddd-eeee-ffff-gggg",
            "pid": 42,
            "version": "0.1.0",
            "listen_host": "0.0.0.0",
            "listen_port": 7300,
            "uptime_s": 3725.0,
            "loop_lag_last_ms": 0.05,
            "loop_lag_avg_ms": 0.1,
            "loop_lag_max_ms": 2.5,
            "rss_bytes": 31 * 1024 * 1024,
            "peers_by_state": {"up": 1, "down": 1},
        },
        "peers": [
            {
                "ip": "10.0.0.5",
                "node_id": "hhhh-iiii-jjjj-kkkk-llll-mmmm-nnnn",
                "state": "up",
                "direction": "outbound",
                "rtt_s": 0.0042,
                "our_pings_answered": False,
                "their_frames_arriving": True,
                "last_heard_s": 0.3,
                "bytes_in": 2048,
                "bytes_out": 100,
                "drops": 3,
                "devices": ["esp32-a", "rp2040-b"],
                "down_reason": None,
            },
            {
                "ip": "10.0.0.6",
                "node_id": None,
                "state": "down",
                "direction": None,
                "rtt_s": None,
                "our_pings_answered": False,
                "their_frames_arriving": False,
                "last_heard_s": None,
                "bytes_in": 0,
                "bytes_out": 0,
                "drops": 0,
                "devices": [],
                "down_reason": "dial 10.0.0.6:7300 failed: connection refused",
            },
        ],
    }
    text = format_status(response)
    assert "  uptime     1h02m" in text
    assert "  loop lag   last 0.05 ms, avg 0.10 ms, max 2.50 ms" in text
    assert "  rss        31.0 MiB" in text
    assert "  peers      1 down, 1 up" in text
    lines = text.splitlines()
    up = next(line for line in lines if line.startswith("10.0.0.5"))
    assert up.split() == [
        "10.0.0.5",
        "hhhh..nnnn",
        "esp32-a,rp2040-b",
        "outbound",
        "up",
        "ok/no",
        "4.2",
        "0.3",
        "s",
        "ago",
        "2.0",
        "KiB",
        "100",
        "B",
        "3",
    ]
    down = next(line for line in lines if line.startswith("10.0.0.6 "))
    assert down.split()[:6] == ["10.0.0.6", "-", "-", "-", "down", "-"]
    assert "10.0.0.6: dial 10.0.0.6:7300 failed: connection refused" in lines


def test_format_status_shows_refusals_and_when_a_down_peer_is_redialled() -> None:
    response = {
        "ok": True,
        "node": {
            "peers_by_state": {"down": 1},
            "refusals": {
                "total": 11200,
                "by_reason": {
                    "N handshakes already in progress (limit N)": 6770,
                    "handshakes arriving faster than N a second (bursts of up to N)": 4190,
                    "connection closed by the peer during the handshake": 200,
                    "handshake not finished within N s": 30,
                    "expected preamble magic N ('EDGN')": 10,
                },
                "top_addresses": [["127.0.0.112", 570], ["2001:db8::/64", 565]],
                "last": {
                    "ip": "127.0.0.101",
                    "reason": "handshake not finished within 5.0 s",
                    "age_s": 3.25,
                },
            },
        },
        "peers": [
            {
                "ip": "10.0.0.6",
                "state": "down",
                "down_reason": "connection refused",
                "redial_in_s": 1.234,
            }
        ],
    }
    lines = format_status(response).splitlines()
    at = lines.index(
        "  refused    11,200 connections, most from 127.0.0.112 (570), 2001:db8::/64 (565)"
    )
    assert lines[at + 1 : at + 6] == [
        "             6,770 N handshakes already in progress (limit N)",
        "             4,190 handshakes arriving faster than N a second (bursts of up to N)",
        "             200 connection closed by the peer during the handshake",
        "             40 for other reasons",
        "  last       3.2 s ago, 127.0.0.101: handshake not finished within 5.0 s",
    ]
    assert "10.0.0.6: connection refused; redial in 1.2 s" in lines
    quiet = format_status({"ok": True, "node": {"refusals": {"total": 0}}, "peers": []})
    assert "  refused    none" in quiet.splitlines()


async def test_status_counts_refused_connections_exactly(
    make_config: Any, sock_dir: Path, tmp_path: Path
) -> None:
    path = sock_dir / "control.sock"
    async with node_with_peer(make_config, path) as (a, _):
        for _ in range(3):
            stream = await anyio.connect_tcp("127.0.0.2", a.listen_port, local_host="127.0.0.60")
            await stream.send(b"X")
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                with anyio.fail_after(ANSWER_TIMEOUT_S):
                    await stream.receive()
            await stream.aclose()
        await wait_until(lambda: a.refusals.total == 3)
        result = await edgenode(tmp_path, "status", "--socket", str(path), "--json")
    assert result.returncode == 0, result.stderr.decode()
    refusals = json.loads(result.stdout)["node"]["refusals"]
    assert refusals["total"] == 3
    assert refusals["by_reason"] == {"expected preamble magic N ('EDGN')": 3}
    assert refusals["top_addresses"] == [["127.0.0.60", 3]]
    assert refusals["last"]["reason"] == "expected preamble magic 45 44 47 4e ('EDGN'), got 58"


def test_format_status_without_peers() -> None:
    text = format_status({"ok": True, "node": {"peers_by_state": {}}, "peers": []})
    assert text.endswith("no peers")
    assert "  peers      none" in text


def test_format_status_says_what_was_not_delivered_and_what_waits() -> None:
    node = {
        "node_id": "aaaa-bbbb-cccc-dddd-eeee-ffff-gggg",
        "send_waits": 1234,
        "send_waited_s": 5.25,
        "pending_requests": 2,
        "handlers_running": 1,
        "unrouted_messages": 3,
        "subscriptions_stalled": 1,
        "subscription_drops": 0,
        "broadcast_dropped": 7,
    }
    peer = {
        "ip": "10.0.0.5",
        "state": "up",
        "queued": 128,
        "paused_s": 2.5,
        "devices": [],
    }
    lines = format_status({"ok": True, "node": node, "peers": [peer]}).splitlines()
    assert (
        "  sends      waited for room 1,234 times (5.2 s in all); requests pending 2, "
        "handlers running 1"
    ) in lines
    assert (
        "  not delivered  3 unrouted (no subscriber); 1 subscription ended for stalling; "
        "7 broadcasts skipped (peer full)"
    ) in lines
    assert "10.0.0.5: 128 frames queued; reading paused 2.5 s by a full subscriber" in lines
    one = dict(peer, queued=1, paused_s=None)
    assert "10.0.0.5: 1 frame queued" in format_status({"node": node, "peers": [one]}).splitlines()
    quiet = format_status({"ok": True, "node": {"node_id": "x"}, "peers": []})
    assert "  not delivered  nothing" in quiet.splitlines()


def test_format_status_shows_peer_names_and_names_that_do_not_resolve() -> None:
    names = [
        {"host": "hub.lan", "port": 7300, "ip": "10.0.0.7", "error": None, "retry_in_s": None},
        {
            "host": "pi-kitchen.local",
            "port": 7300,
            "ip": None,
            "error": "Name or service not known",
            "retry_in_s": 2.5,
        },
        {"host": "new.lan", "port": 7400, "ip": None, "error": None, "retry_in_s": None},
    ]
    peer = {"ip": "10.0.0.7", "name": "hub.lan", "state": "down", "devices": []}
    lines = format_status({"node": {"peer_names": names}, "peers": [peer]}).splitlines()
    unresolved = "pi-kitchen.local:7300: Name or service not known; tried again in 2.5 s"
    assert f"  unresolved {unresolved}" in lines
    assert "             new.lan:7400: not resolved yet" in lines
    assert not any("hub.lan:7300" in line for line in lines)  # it resolved: it has its row
    [row] = [line for line in lines if line.startswith("10.0.0.7")]
    assert row.startswith("10.0.0.7 (hub.lan)  ")
