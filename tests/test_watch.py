"""``edgenode watch``: the control socket's watch op and the command that prints it.

A real node (127.0.0.2) runs in the test's event loop with its control
server, a real peer (127.0.0.3) sends to it over TLS, and ``edgenode
watch`` runs as a real subprocess (``anyio.open_process``) or the test
speaks the protocol itself on a raw unix socket. A slow terminal is a pipe
the test does not read, or a socket it stops reading: the node must not
wait for either.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import Process

from edgenode import control_watch
from edgenode.control_ops import handle_request
from edgenode.control_watch import (
    MAX_WATCH_PAYLOAD_BYTES,
    MAX_WATCHERS,
    message_event,
    watch_topics,
)
from edgenode.errors import InvalidArgument
from edgenode.node import Incoming, Node
from edgenode.watch_text import format_message, json_message, payload_text

from .conftest import wait_until
from .test_control import Client, edgenode, error_line, node_with_peer, serving

pytestmark = pytest.mark.anyio

LINE_TIMEOUT_S = 20.0
#: Enough 200-byte messages to fill a unix socket's buffers many times over.
FLOOD = 20_000


class WatchProcess:
    """``edgenode watch ...`` as a subprocess, its output read line by line on demand."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self._out = b""
        self._err = b""
        self.stderr_lines: list[str] = []

    async def stdout_line(self) -> str:
        assert self.process.stdout is not None
        with anyio.fail_after(LINE_TIMEOUT_S):
            while b"\n" not in self._out:
                self._out += await self.process.stdout.receive()
        line, self._out = self._out.split(b"\n", 1)
        return line.decode()

    async def stderr_until(self, pattern: str) -> str:
        """The first stderr line matching ``pattern``, reading more as needed."""
        assert self.process.stderr is not None
        regex = re.compile(pattern)
        checked = 0
        with anyio.fail_after(LINE_TIMEOUT_S):
            while True:
                for line in self.stderr_lines[checked:]:
                    if regex.search(line):
                        return line
                checked = len(self.stderr_lines)
                try:
                    self._err += await self.process.stderr.receive()
                except anyio.EndOfStream:
                    raise AssertionError(f"{pattern!r}: not in {self.stderr_lines}") from None
                *lines, self._err = self._err.split(b"\n")
                self.stderr_lines += [line.decode() for line in lines]

    async def interrupt(self) -> int:
        """Ctrl-C: SIGINT, then the exit status."""
        self.process.send_signal(signal.SIGINT)
        return await self.wait()

    async def wait(self) -> int:
        with anyio.fail_after(LINE_TIMEOUT_S):
            return await self.process.wait()


@pytest.fixture
async def start_watch(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[WatchProcess]]]:
    """Start ``edgenode watch ARGS`` processes; kill what is left at teardown."""
    started: list[Process] = []
    env = {**os.environ, "EDGENODE_STATE_DIR": str(tmp_path / "default-state")}

    async def start(*args: str) -> WatchProcess:
        process = await anyio.open_process(
            [sys.executable, "-m", "edgenode", "watch", *args], env=env
        )
        started.append(process)
        return WatchProcess(process)

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
        await process.aclose()


StartWatch = Callable[..., Awaitable[WatchProcess]]


@asynccontextmanager
async def watched_node(
    make_config: Any, path: Path, start_watch: StartWatch, *args: str
) -> AsyncIterator[tuple[Node, Node, WatchProcess]]:
    """Node a with a peer b, and ``edgenode watch ARGS`` on a, once it watches."""
    async with node_with_peer(make_config, path) as (a, b):
        w = await start_watch("--socket", str(path), *args)
        await w.stderr_until(r"^watching .* \(Ctrl-C to stop\)$")
        yield a, b, w


async def watching(client: Client, *topics: str) -> dict[str, Any]:
    """Ask for a watch on a raw connection; return the answer."""
    request = json.dumps({"op": "watch", "topics": list(topics)}).encode() + b"\n"
    return await client.ask(request)


# -- edgenode watch ------------------------------------------------------------------------


async def test_watch_prints_messages_on_its_topics_until_ctrl_c(
    make_config: Any, sock_dir: Path, start_watch: StartWatch
) -> None:
    path = sock_dir / "control.sock"
    async with watched_node(make_config, path, start_watch, "sensors/#", "alerts") as (_, b, w):
        assert w.stderr_lines == ["watching sensors/#, alerts (Ctrl-C to stop)"]
        await b.send("127.0.0.2", "sensors/temp", b"21.5")
        await b.send("127.0.0.2", "other", b"not watched")
        await b.send("127.0.0.2", "alerts", b"\x00\x01\xff")
        await b.send("127.0.0.2", "sensors/multi", "a\tb\nc é".encode())
        lines = [await w.stdout_line() for _ in range(3)]
        assert await w.interrupt() == 0
        summary = await w.stderr_until(r"^watched ")
    stamp = r"\d\d:\d\d:\d\d\.\d{3}"
    expected = [
        rf"^{stamp}  127\.0\.0\.3  sensors/temp  21\.5$",
        rf"^{stamp}  127\.0\.0\.3  alerts  \[3 bytes\] 00 01 ff$",
        rf"^{stamp}  127\.0\.0\.3  sensors/multi  a\\tb\\nc é$",
    ]
    # Each topic's messages in order; two topics' lines may interleave either way.
    sensors = [line for line in lines if " sensors/" in line]
    assert re.match(expected[0], sensors[0]) and re.match(expected[2], sensors[1]), lines
    assert [line for line in lines if re.match(expected[1], line)], lines
    assert summary == "watched sensors/#, alerts: 3 messages"


async def test_watch_json_gives_each_message_as_an_object(
    make_config: Any, sock_dir: Path, start_watch: StartWatch
) -> None:
    path = sock_dir / "control.sock"
    async with watched_node(make_config, path, start_watch, "--json", "#") as (_, b, w):
        before = datetime.now().astimezone()
        await b.send("127.0.0.2", "t/text", "héllo".encode())
        first = json.loads(await w.stdout_line())
        await b.send("127.0.0.2", "t/bin", b"\xff\xfe")
        second = json.loads(await w.stdout_line())
        assert await w.interrupt() == 0
    stamp = datetime.fromisoformat(first.pop("time"))
    assert stamp.utcoffset() is not None and stamp >= before.replace(microsecond=0)
    assert first == {
        "peer": "127.0.0.3",
        "node_id": b.node_id,
        "topic": "t/text",
        "size": 6,
        "payload": "héllo",
        "encoding": "utf-8",
    }
    second.pop("time")
    assert second["payload"] == "fffe" and second["encoding"] == "hex"


async def test_watch_of_a_slow_terminal_drops_counts_and_says_so(
    make_config: Any, sock_dir: Path, start_watch: StartWatch
) -> None:
    """Nobody reads the command's stdout while a flood arrives: the node drops the
    oldest for it, the command says how many, and the node's other subscriber
    gets every message without its reader ever waiting."""
    path = sock_dir / "control.sock"
    async with watched_node(make_config, path, start_watch, "flood") as (a, b, w):
        with a.subscribe("flood", buffer=FLOOD) as everything:
            payloads = [b"%08d" % i + b"." * 192 for i in range(FLOOD)]
            with anyio.fail_after(60):
                assert await b.send_many("127.0.0.2", "flood", payloads) == FLOOD
                got = [(await everything.receive()).payload for _ in range(FLOOD)]
        assert got == payloads
        assert a.subscriptions.waited_s == 0.0  # no reader waited for the watch
        # Every message has been offered to the watch: what it dropped is final.
        dropped = a.stats()["subscription_drops"]
        assert dropped > 0
        # The terminal catches up: it prints the rest, in order, the newest last.
        printed = [await w.stdout_line() for _ in range(FLOOD - dropped)]
        numbers = [int(line.split("  ")[-1][:8]) for line in printed]
        assert numbers == sorted(numbers) and numbers[-1] == FLOOD - 1
        assert printed[-1].endswith("  127.0.0.3  flood  " + payloads[-1].decode())
        assert await w.interrupt() == 0
    summary = await w.stderr_until(r"^watched flood: ")
    assert (
        summary
        == f"watched flood: {FLOOD - dropped:,} messages; {dropped:,} dropped (output too slow)"
    )
    notes = [line for line in w.stderr_lines if " messages dropped so far: " in line]
    assert notes and notes[0].endswith(
        " messages dropped so far: the node had them faster than this output took them"
    )


async def test_watch_that_stops_reading_never_slows_the_node(
    make_config: Any, sock_dir: Path
) -> None:
    """A raw watch connection stops reading; every message is either sent to it
    later or counted as dropped, exactly once, and the node never waited."""
    path = sock_dir / "control.sock"
    async with node_with_peer(make_config, path) as (a, b):
        async with Client.connect(path) as client:
            assert await watching(client, "flood") == {"ok": True, "watching": ["flood"]}
            with a.subscribe("flood", buffer=FLOOD) as everything:
                payloads = [b"%08d" % i + b"." * 192 for i in range(FLOOD)]
                with anyio.fail_after(60):
                    await b.send_many("127.0.0.2", "flood", payloads)
                    for _ in range(FLOOD):
                        await everything.receive()
            assert a.subscriptions.waited_s == 0.0
            status = await anyio.to_thread.run_sync(_status, path)
            assert status["node"]["subscription_drops"] > 0
            seen: list[int] = []
            dropped = 0
            with anyio.fail_after(60):
                while len(seen) + dropped < FLOOD:
                    event = await client.answer()
                    if event["event"] == "dropped":
                        assert event["dropped"] > dropped
                        dropped = event["dropped"]
                        continue
                    assert event["event"] == "message"
                    assert (event["peer"], event["node_id"], event["topic"], event["size"]) == (
                        "127.0.0.3",
                        b.node_id,
                        "flood",
                        200,
                    )
                    seen.append(int(bytes.fromhex(event["hex"])[:8]))
    # The oldest were dropped: what arrived is in order, ending with the last.
    assert dropped > 0 and seen == sorted(seen) and seen[-1] == FLOOD - 1


async def test_watch_keeps_to_its_rate_and_counts_the_rest(
    make_config: Any, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that reads everything at once still gets at most the watch's
    rate: a burst beyond it is dropped, oldest first, and counted."""
    monkeypatch.setattr(control_watch, "MAX_WATCH_LINES_PER_S", 200)
    path = sock_dir / "control.sock"
    burst = 1000
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        async with Client.connect(path) as client:
            assert (await watching(client, "t"))["ok"] is True
            started = time.monotonic()
            for i in range(burst):
                await a.publish_local("t", b"%04d" % i)
                # Let the watch run between messages: unpaced, it would send
                # each at once, and drop none.
                await anyio.lowlevel.checkpoint()
            seen: list[int] = []
            dropped = 0
            with anyio.fail_after(LINE_TIMEOUT_S):
                while len(seen) + dropped < burst:
                    event = await client.answer()
                    if event["event"] == "dropped":
                        dropped = event["dropped"]
                    else:
                        seen.append(int(bytes.fromhex(event["hex"])))
            elapsed = time.monotonic() - started
    # The pacing rule: a first batch of at most the buffer, then no more than
    # the rate allows in the time it all took (however slow this machine is).
    assert dropped > 0 and len(seen) <= control_watch.WATCH_BUFFER + 200 * elapsed + 1
    assert seen == sorted(seen) and seen[-1] == burst - 1


def _status(path: Path) -> dict[str, Any]:
    from edgenode.control_client import control_request

    return control_request(path, {"op": "status"})


async def test_watch_ends_when_the_node_stops(
    make_config: Any, sock_dir: Path, start_watch: StartWatch
) -> None:
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2", control_socket=path)) as a:
        w = await start_watch("--socket", str(path), "x")
        await w.stderr_until(r"^watching x ")
        await a.publish_local("x", b"one")
        assert (await w.stdout_line()).endswith("  local  x  one")
    # The node has stopped, its control server with it.
    assert await w.wait() == 1
    await w.stderr_until(r"^watched x: 1 messages$")
    assert await w.stderr_until(r"^error: ") == (
        "error: the node closed the connection (it stopped)"
    )
    assert not [line for line in w.stderr_lines if "Traceback" in line]


async def test_watches_beyond_the_limit_are_refused_until_one_ends(
    make_config: Any, sock_dir: Path, tmp_path: Path
) -> None:
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        async with AsyncExitStack() as stack:
            for _ in range(MAX_WATCHERS):
                client = await stack.enter_async_context(Client.connect(path))
                assert (await watching(client, "t"))["ok"] is True
            result = await edgenode(tmp_path, "watch", "--socket", str(path), "t")
            assert result.returncode == 1  # the node's state, not a usage error
            assert error_line(result) == (
                f"error: {MAX_WATCHERS} watches already running (limit {MAX_WATCHERS}); "
                "stop one first"
            )
            # Status still finds a place among the clients.
            async with Client.connect(path) as asking:
                assert (await asking.ask(b'{"op": "status"}\n'))["ok"] is True
            assert a.stats()["subscriptions"] == MAX_WATCHERS
        # The watches ended with their connections: their subscriptions are closed.
        await wait_until(lambda: a.stats()["subscriptions"] == 0)
        async with Client.connect(path) as again:
            assert (await watching(again, "t"))["ok"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["t"] * 9, "error: watch: 9 topics exceed the limit of 8"),
        (["x" * 129], None),  # refused by the command itself, as usage
        ([""], None),
    ],
)
async def test_watch_usage_errors_exit_2(
    make_config: Any, sock_dir: Path, tmp_path: Path, args: list[str], message: str | None
) -> None:
    path = sock_dir / "control.sock"
    async with Node(make_config("a", "127.0.0.2")) as a, serving(a, path):
        result = await edgenode(tmp_path, "watch", "--socket", str(path), *args)
    assert result.returncode == 2, result.stderr
    if message is None:
        stderr = result.stderr.decode()
        assert stderr.startswith("usage: edgenode watch"), stderr
        assert "argument TOPIC: " in stderr
    else:
        assert error_line(result) == message


async def test_watch_needs_a_connection_of_its_own(make_config: Any) -> None:
    async with Node(make_config("a", "127.0.0.2")) as a:
        response = await handle_request(a, b'{"op": "watch", "topics": ["t"]}')
    assert response == {
        "ok": False,
        "error": "watch: needs a control connection of its own",
        "type": "BadRequest",
    }


# -- edgenode send: usage errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["[[[", "t", "x"], "argument PEER: peer '[[[' is neither an ip address nor a node id"),
        (["127.0.0.3", "", "x"], "argument TOPIC: expected a non-empty topic"),
        (["127.0.0.3", "t" * 129, "x"], "argument TOPIC: topic of 129 bytes exceeds 128-byte"),
    ],
)
async def test_send_argument_errors_are_usage_errors(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    # No node needed: the command checks its arguments first.
    result = await edgenode(tmp_path, "send", *args)
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert stderr.startswith("usage: edgenode send"), stderr
    assert expected in stderr, stderr


async def test_send_of_text_the_node_refuses_is_a_usage_error(
    make_config: Any, sock_dir: Path, tmp_path: Path
) -> None:
    path = sock_dir / "control.sock"
    async with node_with_peer(make_config, path):
        result = await edgenode(
            tmp_path, "send", "--socket", str(path), "127.0.0.3", "t", "x" * 65400
        )
    assert result.returncode == 2
    assert error_line(result) == "error: payload of 65400 bytes exceeds 65376-byte limit"


# -- the pure parts ------------------------------------------------------------------------


def test_watch_topics_leaves_out_what_another_covers() -> None:
    assert watch_topics(["a/b", "a/#", "a/c/#", "b", "b", "#x", "c"]) == ["a/#", "b", "#x", "c"]
    assert watch_topics(["#", "a/#", "z"]) == ["#"]
    assert watch_topics(["a#", "a/b"]) == ["a#"]  # a prefix wildcard, as subscribe takes it


@pytest.mark.parametrize(
    ("topics", "message"),
    [
        (None, "watch: expected a list of 1..8 topics, got None"),
        ([], "watch: expected a list of 1..8 topics, got []"),
        (["a"] * 9, "watch: 9 topics exceed the limit of 8"),
        (["a", 3], "watch: expected each topic as non-empty text, got 3"),
    ],
)
def test_watch_topics_rejects_bad_lists(topics: Any, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        watch_topics(topics)
    assert str(info.value) == message


def test_message_event_cuts_payloads_past_the_limit() -> None:
    big = Incoming("10.0.0.5", "n", "t", b"\x01" * (MAX_WATCH_PAYLOAD_BYTES + 10))
    event = message_event(big, 1.5)
    assert event["size"] == MAX_WATCH_PAYLOAD_BYTES + 10
    assert len(event["hex"]) == 2 * MAX_WATCH_PAYLOAD_BYTES and event["truncated"] is True
    small = message_event(Incoming("10.0.0.5", "n", "t", b"hi"), 1.5)
    assert small == {
        "event": "message",
        "time": 1.5,
        "peer": "10.0.0.5",
        "node_id": "n",
        "topic": "t",
        "size": 2,
        "hex": "6869",
    }


def test_payloads_print_as_text_only_when_printable() -> None:
    assert payload_text(b"21.5 C") == "21.5 C"
    assert payload_text(b'{"a":\n\t1}') == '{"a":\\n\\t1}'
    assert payload_text(b"\x00ok") is None
    assert payload_text(b"\xff") is None
    assert payload_text("\u202e".encode()) is None  # a format character is not printable
    event = message_event(Incoming("1.2.3.4/dev", "n", "s", bytes(range(40))), 0.0)
    line = format_message(event)
    assert line.endswith("  1.2.3.4/dev  s  [40 bytes] " + bytes(range(32)).hex(" ") + " ...")
    long_text = message_event(Incoming("p", "n", "s", b"a" * (MAX_WATCH_PAYLOAD_BYTES + 1)), 0.0)
    assert format_message(long_text).endswith(f"a ... ({MAX_WATCH_PAYLOAD_BYTES + 1} bytes in all)")
    obj = json.loads(json_message(long_text))
    assert obj["truncated"] is True and obj["size"] == MAX_WATCH_PAYLOAD_BYTES + 1
