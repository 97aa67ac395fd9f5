"""Tests of firmware_bridge.driver on MicroPython's asyncio, and under pytest.

A Device runs over an in-memory line against a host-role Link that a second
task drives. On CPython each test is one ``asyncio.run``. The WebAssembly
MicroPython port has no ``asyncio.run`` (its loop is JavaScript's), so there
the test creates the task and turns the port's scheduler by hand
(``asyncio.core._run_iter``, which runs every task that is due) until the
task is done: the driver's real ``wait_for_ms``, ``TimeoutError``, ``Event``,
``Lock`` and ``ticks_ms`` clock are what run. Plain ``test_*`` functions, as
``run.py`` wants.
"""

import asyncio
import sys
import time

from firmware_bridge.driver import Device, RequestLost
from firmware_bridge.link import Link, Received, SessionUp

ON_MICROPYTHON = sys.implementation.name == "micropython"
TIMING = {"keepalive_interval_ms": 100, "keepalive_timeout_ms": 500}
BOUND_MS = 5000

if hasattr(time, "ticks_ms"):

    def _ms() -> int:
        return time.ticks_ms()

    def _elapsed(start: int) -> int:
        return time.ticks_diff(time.ticks_ms(), start)

else:

    def _ms() -> int:
        return int(time.monotonic() * 1000)

    def _elapsed(start: int) -> int:
        return _ms() - start


async def _sleep_ms(ms: int) -> None:
    if hasattr(asyncio, "sleep_ms"):
        await asyncio.sleep_ms(ms)
    else:
        await asyncio.sleep(ms / 1000)


def _run(scenario) -> None:
    """Run the coroutine function ``scenario`` to completion, bounded."""
    outcome = []

    async def main() -> None:
        try:
            await scenario()
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    if hasattr(asyncio, "run"):
        asyncio.run(main())
    else:
        from asyncio import core  # the WebAssembly port's scheduler

        task = asyncio.create_task(main())
        start = _ms()
        while not task.done():
            if _elapsed(start) > BOUND_MS:
                raise AssertionError(f"scenario did not finish within {BOUND_MS} ms")
            core._run_iter()
    if outcome[0] is not None:
        raise outcome[0]


class Pipe:
    """One direction of an in-memory line: ``write`` appends, ``read`` waits for bytes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ready = asyncio.Event()
        self.eof = False

    def write(self, data: bytes) -> None:
        self.buf += data
        self.ready.set()

    async def drain(self) -> None:
        pass

    async def read(self, n: int) -> bytes:
        while not self.buf and not self.eof:
            self.ready.clear()
            await self.ready.wait()
        data = bytes(self.buf[:n])
        self.buf[:n] = b""
        return data

    def take(self) -> bytes:
        data = bytes(self.buf)
        self.buf[:] = b""
        return data


class Host:
    """A host-role Link, driven by a task that polls the line every millisecond."""

    def __init__(self, to_device: Pipe, to_host: Pipe) -> None:
        self.to_device = to_device
        self.to_host = to_host
        self.events = []
        self.silent = False
        self.running = True
        self.clock_start = _ms()
        self.link = self.new_link(0x11111111)

    def now(self) -> int:
        return _elapsed(self.clock_start)

    def new_link(self, epoch: int) -> Link:
        link = Link("host", "node-a", epoch, **TIMING)
        link.start(self.now())
        return link

    async def serve(self) -> None:
        while self.running:
            data = self.to_host.take()
            if not self.silent:
                now = self.now()
                if data:
                    self.handle(self.link.receive_bytes(data, now))
                if self.link.next_deadline_ms() <= now:
                    self.handle(self.link.tick(now))
                out = self.link.bytes_to_send()
                if out:
                    self.to_device.write(out)
            await _sleep_ms(1)

    def handle(self, events: list) -> None:
        for event in events:
            self.events.append(event)
            if isinstance(event, Received) and event.kind == "request":
                self.link.send_response(event.req_id, 0, b"re:" + event.payload, self.now())

    def received(self, kind: str) -> list:
        return [e for e in self.events if isinstance(e, Received) and e.kind == kind]


async def _until(predicate, what: str) -> None:
    start = _ms()
    while not predicate():
        if _elapsed(start) > 3000:
            raise AssertionError("timed out waiting for " + what)
        await _sleep_ms(2)


async def _rig():
    to_device = Pipe()
    to_host = Pipe()
    host = Host(to_device, to_host)
    host_task = asyncio.create_task(host.serve())
    device = Device(to_device, to_host, "pico-1", **TIMING)
    run_task = asyncio.create_task(device.run())
    await device.wait_up()
    await _until(lambda: host.link.is_up, "the host's session")
    return host, host_task, device, run_task


async def _stop(host: Host, host_task, device: Device, run_task) -> None:
    device.close()
    await run_task
    host.running = False
    await host_task


def test_handshake_publish_and_requests() -> None:
    async def scenario() -> None:
        host, host_task, device, run_task = await _rig()
        assert device.link.peer_id == "node-a"
        assert len([e for e in host.events if isinstance(e, SessionUp)]) == 1

        await device.publish("esp32/temp", b"\x15")
        await _until(lambda: host.received("data"), "data at the host")
        assert host.received("data")[0].payload == b"\x15"
        assert await device.request("echo", b"abc") == b"re:abc"

        async def led(payload: bytes) -> bytes:
            return b"led " + payload

        device.handle("esp32/led", led)
        host.link.send_request(9, "esp32/led", b"on", host.now())
        await _until(lambda: host.received("response"), "the device's response")
        assert host.received("response")[0].payload == b"led on"

        seen = []
        later = []

        async def slow_callback(topic: str, payload: bytes) -> None:
            await _sleep_ms(1)
            later.append(payload)

        device.on_message("#", lambda topic, payload: seen.append(topic))
        device.on_message("news", slow_callback)
        host.link.send_data("news", b"!", host.now())
        await _until(lambda: later, "data at the device's async callback")
        assert seen == ["news"] and later == [b"!"]
        assert not device._tasks  # every handler and callback task has ended

        # Bad bytes: a frame with a bad CRC and one of bad COBS.
        host.to_device.write(b"\x06\x04\x01t\x01\x02\x03\x00\x09\x04\x00")
        await _until(lambda: device.stats["dropped"] == 2, "two drops")
        assert device.is_up
        await _stop(host, host_task, device, run_task)
        assert not device.is_up

    _run(scenario)


def test_host_restart_and_silence_resync() -> None:
    async def scenario() -> None:
        host, host_task, device, run_task = await _rig()
        host.link = host.new_link(0x33333333)
        await _until(lambda: device.stats["sessions"] == 2, "a second session")
        assert device.link.peer_hello.epoch == 0x33333333

        outcome = []

        async def ask() -> None:
            # Caught here: MicroPython reports a task's exception that
            # nothing awaited in time as "Task exception wasn't retrieved".
            try:
                outcome.append(await device.request("slow", b"", 5000))
            except RequestLost as exc:
                outcome.append(exc)

        pending = asyncio.create_task(ask())
        host.silent = True
        await _until(lambda: not device.is_up, "the keepalive timeout")
        await pending
        assert isinstance(outcome[0], RequestLost), outcome
        assert str(outcome[0]) == (
            "request on 'slow' lost: the session went down (keepalive timeout)"
        )
        host.silent = False
        await device.wait_up()
        assert device.stats["sessions"] == 3
        await _stop(host, host_task, device, run_task)

    _run(scenario)


def test_end_of_stream_ends_run() -> None:
    async def scenario() -> None:
        host, host_task, device, run_task = await _rig()
        host.to_device.eof = True
        host.to_device.ready.set()
        await run_task
        assert not device.is_up
        host.running = False
        await host_task

    _run(scenario)
