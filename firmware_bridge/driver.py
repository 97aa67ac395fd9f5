"""The microcontroller side of the UART link: a :class:`Device` on asyncio streams.

Runs unchanged on MicroPython (``asyncio``, 1.20 or later) and on CPython
asyncio. The protocol is :class:`firmware_bridge.link.Link`; this module only
moves bytes between it and a stream and turns its events into calls::

    import asyncio, machine
    from firmware_bridge.driver import Device

    async def report(device):
        await device.wait_up()
        await device.publish("esp32/temp", b"21")

    async def main():
        uart = machine.UART(2, 115200, tx=17, rx=16)
        device = Device(asyncio.StreamReader(uart), asyncio.StreamWriter(uart, {}), "esp32-1")
        await asyncio.gather(device.run(), report(device))

    asyncio.run(main())

``run`` reads the stream and feeds the link; a second task it starts runs
the link's timers when they are due. Both, and sends from other tasks,
write what the link queued under one lock, so one drain runs at a time. No
threads, no polling, no read abandoned to a timeout.

The stream contract (docs/microcontrollers.md): ``await reader.read(n)``
returns what has arrived, 1 to ``n`` bytes (``b""`` or an OSError ends
``run``); ``writer.write(data)`` queues, ``await writer.drain()`` waits until
the line took it. ``asyncio.StreamReader`` over ``machine.UART`` keeps it;
for a Linux tty or pty use :mod:`firmware_bridge.tty`.

A MemoryError does not end ``run``: what was being read is lost (in
reliable mode its sender resends it), the error is counted in
``stats["memory_errors"]`` (frames lost inside the link in
``stats["out_of_memory"]``), and once the session is up the count is
published on MEMORY_TOPIC so that the node hears of it. What the link has
taken is kept: an event that meets one (making its handler's task, say)
is handed over again, in order, before the link takes more. A send, or a
handler's answer, that meets one waits and tries again.

Requests from the network run their handler in a task of its own, as do
coroutine callbacks (handlers.py); at most 4 such tasks run at once. In
reliable mode the device takes no more messages than it has free task
slots, so the node's further messages wait (they are held back in the
link, and the node's ``send()`` waits for room): a slow application loses
nothing. In unreliable mode a request beyond that is refused with status 3
(busy) and a message for a coroutine callback is dropped, both counted in
``stats["refused_busy"]``. A plain callback runs in ``run()``'s task: while
it runs nothing is read or written, so one that blocks for longer than the
node's keepalive timeout loses the session. A handler's exception, or a
reply that is not bytes, is answered with status 2 and the error's text; a
topic with no handler with status 1. The codes are the node's
(docs/protocol.md, section 7).

Memory. Every buffer is bounded; the link's are allocated once, sized from
``max_frame`` (262 bytes to read a frame at the default 256, 1056 of
output); reads of at most 128 bytes, writes of at most 256; at most 4 of our
requests pending and 4 tasks running; in reliable mode 4 frames in flight
plus 4 queued. Per frame the link allocates only what an event carries and
the bytes handed to the stream. The code is most of the heap: ship ``.mpy``
files, or freeze the modules into the firmware. The figures, measured in CI
on a 32-bit MicroPython, are in docs/microcontrollers.md.
"""

import gc
import time

try:
    import asyncio
except ImportError:  # MicroPython before 1.20
    import uasyncio as asyncio  # type: ignore[no-redef]

from . import cobs
from .cobs import LinkError
from .handlers import (
    COUNTERS,
    MAX_TASKS,
    Handlers,
    RequestError,
    RequestFailed,  # noqa: F401 (re-exported: the errors of request())
    RequestLost,
    RequestTimeout,
    error_text,
)
from .link import (
    CRC_BYTES,
    MEMORY_TOPIC,
    Link,
    LinkDown,
    LinkUsageError,
    MessageTooLarge,  # noqa: F401 (re-exported: what publish() raises)
    SendQueueFull,
)

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef]
        return x


try:
    from typing import TYPE_CHECKING
except ImportError:
    TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

READ_CHUNK_BYTES = const(128)
WRITE_CHUNK_BYTES = const(256)
MAX_PENDING_REQUESTS = const(4)
_OUTPUT_FRAMES = const(4)
_SEND_QUEUE = const(4)
_RECOVER_MS = const(20)  # pause after a MemoryError


if hasattr(asyncio, "wait_for_ms"):  # MicroPython

    def _wait_ms(awaitable: "Any", timeout_ms: int) -> "Any":
        return asyncio.wait_for_ms(awaitable, timeout_ms)

    def _sleep_ms(ms: int) -> "Any":
        return asyncio.sleep_ms(ms)

else:

    def _wait_ms(awaitable: "Any", timeout_ms: int) -> "Any":
        return asyncio.wait_for(awaitable, timeout_ms / 1000)

    def _sleep_ms(ms: int) -> "Any":
        return asyncio.sleep(ms / 1000)


def default_clock() -> "Callable[[], int]":
    """Return a function giving milliseconds as an int that never wraps or goes back."""
    if not hasattr(time, "ticks_ms"):
        return lambda: int(time.monotonic() * 1000)
    # ticks_ms wraps (after 2**30 ms on most ports): accumulate the differences.
    # Correct as long as it is called at least once per half wrap period.
    state = [time.ticks_ms(), 0]

    def clock() -> int:
        now = time.ticks_ms()
        state[1] += time.ticks_diff(now, state[0])
        state[0] = now
        return state[1]

    return clock


def new_epoch() -> int:
    """Return a random boot epoch in 1..2**32-1 (os.urandom, else the clock)."""
    try:
        import os

        value = int.from_bytes(os.urandom(4), "big")
    except (ImportError, AttributeError, NotImplementedError, OSError):
        ticks = getattr(time, "ticks_us", None) or getattr(time, "time_ns", None)
        value = ticks() * 2654435761 if ticks else int(time.time() * 1000)
    return (value & 0xFFFFFFFF) or 1


class Device(Handlers):
    """A microcontroller on a UART link to a host node.

    ``reader``/``writer`` are asyncio streams over the UART (``read(n)``,
    ``write(data)``, ``drain()``); they stay the caller's to close.
    ``device_id`` names the device to the host; ``psk``, ``reliable``,
    ``max_frame`` and the keepalive timings are the link's (both ends must
    agree on a key). ``epoch`` defaults to a random one, so a reboot is a
    new session; ``clock`` returns milliseconds as a growing int (the
    default is built on ``ticks_ms``, which wraps, or ``time.monotonic``).
    Create the Device inside the running event loop (Python 3.9 binds
    asyncio's Event and Lock to the loop at creation).

    Raises :class:`LinkUsageError` for a bad argument.
    """

    __slots__ = (
        "_callbacks",
        "_changed",
        "_clock",
        "_closed",
        "_counts",
        "_ended",
        "_handlers",
        "_held",
        "_held_next",
        "_held_part",
        "_last_error",
        "_lock",
        "_next_req_id",
        "_pending",
        "_reader",
        "_room",
        "_running",
        "_sessions",
        "_stream_failed",
        "_task",
        "_tasks",
        "_unreported",
        "_writer",
        "link",
    )

    def __init__(
        self,
        reader: "Any",
        writer: "Any",
        device_id: str,
        *,
        psk: "bytes | None" = None,
        reliable: bool = False,
        max_frame: int = 256,
        keepalive_interval_ms: int = 1000,
        keepalive_timeout_ms: int = 3000,
        epoch: "int | None" = None,
        clock: "Callable[[], int] | None" = None,
    ) -> None:
        output_bytes = None  # the link rejects a bad max_frame itself
        if type(max_frame) is int:
            output_bytes = _OUTPUT_FRAMES * (cobs.max_encoded_len(max_frame + CRC_BYTES) + 2)
        self.link = Link(
            "device",
            device_id,
            new_epoch() if epoch is None else epoch,
            max_frame=max_frame,
            keepalive_interval_ms=keepalive_interval_ms,
            keepalive_timeout_ms=keepalive_timeout_ms,
            reliable=reliable,
            psk=psk,
            send_queue=_SEND_QUEUE,
            max_output_bytes=output_bytes,
        )
        self._reader = reader
        self._writer = writer
        self._clock = clock or default_clock()
        self._lock = asyncio.Lock()  # one drain at a time
        self._changed = asyncio.Event()  # set while up, or once run() has ended
        self._room = asyncio.Event()  # set when the link may have room for a send
        self._callbacks = {}  # topic -> callback(topic, payload)
        self._handlers = {}  # topic -> handler(payload) -> bytes
        self._pending = {}  # req_id -> [event, result or exception, topic]
        self._next_req_id = 0
        self._sessions = 0
        self._task = None
        self._tasks = set()  # handler and callback tasks: asyncio keeps only weak references
        self._held = ()  # events the link has taken and a MemoryError kept (handlers.py)
        self._held_next = 0
        self._held_part = 0  # of a held message's callbacks, how many took it
        self._running = False
        self._ended = False
        self._closed = False
        self._last_error = None
        self._unreported = False  # a survived MemoryError the host has not heard of
        self._stream_failed = False
        self._counts = {}
        for name in COUNTERS:
            self._counts[name] = 0

    def __repr__(self) -> str:
        state = "up" if self.is_up else ("ended" if self._ended else "down")
        return f"Device({self.link.my_id!r}, epoch={self.link.epoch}, {state})"

    # --- state -------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        """True while ``run()`` runs and the session with the host is up."""
        return self._running and self.link.is_up

    async def wait_up(self) -> None:
        """Wait until the session is up. Raises :class:`LinkDown` once run() has ended."""
        while not self.is_up:
            if self._ended or self._closed:
                raise LinkDown("the device has stopped: run() ended or close() was called")
            await self._changed.wait()

    @property
    def stats(self) -> dict:
        """The link's counters plus the driver's, as a new dict."""
        s = self.link.stats
        out = {
            "frames_in": s.frames_in,
            "frames_out": s.frames_out,
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "retransmits": s.retransmits,
            "held_back": s.held_back,
            "tx_skipped": s.tx_skipped,
            "out_of_memory": s.out_of_memory,
            "drops": dict(s.drops),
            "dropped": s.dropped,
            "sessions": self._sessions,
            "last_error": self._last_error,
        }
        out.update(self._counts)
        return out

    # --- the loop ----------------------------------------------------------

    async def run(self) -> None:
        """Run the link until the stream ends (EOF or an OSError) or ``close()``.

        Bad bytes never end it: the link drops and counts them. Nor does a
        MemoryError: what was being read is lost (a reliable sender resends
        it), the error is counted in ``stats["memory_errors"]`` and reported
        to the host on MEMORY_TOPIC, and the link carries on. Call it once
        per Device. Raises :class:`LinkUsageError` if called again.
        """
        if self._task is not None or self._ended:
            raise LinkUsageError("run() may be called once per Device: make a new one")
        link = self.link
        self._task = asyncio.current_task()
        self._running = True
        timers = None
        try:
            link.start(self._clock())
            # Timers in a task of their own, reads here: no read is ever
            # abandoned to a timeout (which on MicroPython costs a task per
            # read, and can lose the bytes an abandoned read takes).
            timers = asyncio.create_task(self._run_timers())
            while not self._closed:
                try:
                    if not await self._read_once():
                        break
                except MemoryError:
                    # Inline, as below: calling a coroutine function allocates.
                    self._out_of_memory()
                    try:
                        await _sleep_ms(_RECOVER_MS)
                    except MemoryError:
                        pass
        except asyncio.CancelledError:
            if not self._closed and not self._stream_failed:
                raise
            uncancel = getattr(self._task, "uncancel", None)  # CPython 3.11+
            if uncancel is not None:
                uncancel()
        finally:
            if timers is not None:
                timers.cancel()
            self._running = False
            self._ended = True
            self._task = None
            self._fail_pending("the device stopped")
            self._changed.set()
            self._room.set()

    async def _read_once(self) -> bool:
        """Write what waits, read once and feed the link; False once the stream has ended."""
        self._hand_over()  # what a MemoryError kept back (handlers.py)
        if not await self._flush():
            return False
        try:
            data = await self._reader.read(READ_CHUNK_BYTES)
        except OSError as exc:  # a pty whose other end closed reads EIO
            self._last_error = "stream: " + error_text(exc)
            return False
        if not data:
            return False  # end of stream
        # Before the link takes more: what a MemoryError kept back, in order
        # (raising again loses only ``data``, which the link has not taken).
        self._hand_over()
        # Reliable mode: take no more messages than there are free task
        # slots; the host keeps the others until a task ends (handlers.py).
        room = MAX_TASKS - len(self._tasks)
        self._handle(self.link.receive_bytes(data, self._clock(), room))
        self._room.set()
        if self._unreported:
            self._report_memory()
        return True

    async def _run_timers(self) -> None:
        """Run the link's timers when due and write what they queue; reads are run()'s."""
        link = self.link
        while True:
            try:
                now = self._clock()
                wait_ms = link.next_deadline_ms() - now
                if wait_ms <= 0:
                    self._hand_over()
                    self._handle(link.tick(now))
                    self._room.set()
                    if not await self._flush():
                        self._stop_on_stream_failure()
                        return
                    continue
                if link.reliable and wait_ms > link.rto_ms:
                    # A send from another task may start a retransmission timer.
                    wait_ms = link.rto_ms
                await _sleep_ms(wait_ms)
            except MemoryError:
                self._out_of_memory()
                try:
                    await _sleep_ms(_RECOVER_MS)  # let other tasks finish and free theirs
                except MemoryError:
                    pass

    def _stop_on_stream_failure(self) -> None:
        task = self._task
        if task is not None and not self._closed:
            self._stream_failed = True
            task.cancel()

    def _out_of_memory(self) -> None:
        """Carry on after a MemoryError in the loop: count it and free what can be.

        It may not allocate: the heap is full. (On MicroPython sleep_ms,
        which the callers await next, allocates nothing.)

        What was being read is lost (a reliable sender resends it); the
        session stays up, and the host hears of it on MEMORY_TOPIC.
        """
        self._counts["memory_errors"] += 1
        self._unreported = True
        self._last_error = "out of memory"
        self.link.forget_partial()
        gc.collect()

    def _report_memory(self) -> None:
        """Tell the host, once, how many MemoryErrors this device has survived (best effort)."""
        if not self.link.is_up:
            return
        count = self._counts["memory_errors"] + self.link.stats.out_of_memory
        try:
            self.link.send_data(MEMORY_TOPIC, str(count).encode(), self._clock())
        except (LinkError, MemoryError):
            return  # no room now: the next step tries again
        self._unreported = False

    def close(self) -> None:
        """Stop ``run()`` and fail pending requests; the streams stay open. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fail_pending("the device was closed")
        task = self._task
        try:
            current = asyncio.current_task()
        except RuntimeError:  # no running loop
            current = None
        if task is not None and task is not current:
            task.cancel()
        # From run()'s own task (a callback), the loop sees _closed at once.

    async def _flush(self) -> bool:
        """Write what the link queued; return False if the stream failed."""
        if self.link.pending_output:
            # acquire/release, not "async with": its __aexit__ is a coroutine,
            # which cannot be made when the heap is full, and the lock would
            # stay held for ever.
            await self._lock.acquire()
            try:
                return await self._write_out()
            finally:
                self._lock.release()
        return True

    async def _write_out(self) -> bool:
        link = self.link
        try:
            while link.pending_output:
                self._writer.write(link.bytes_to_send(WRITE_CHUNK_BYTES))
                await self._writer.drain()
        except OSError as exc:
            self._last_error = "stream: " + error_text(exc)
            return False
        return True

    async def _send(self, method: "Any", *args: "Any") -> None:
        while True:
            if self._closed or not self._running:
                raise LinkDown("cannot send: the device is not running")
            out_of_memory = False
            await self._lock.acquire()  # not "async with": see _flush
            try:
                try:
                    method(*args, self._clock())
                except SendQueueFull:
                    if not self.link.reliable:
                        raise
                except MemoryError:
                    # Nothing was queued (a reliable frame that was is kept
                    # by the link, which then returns normally): try again.
                    out_of_memory = True
                else:
                    try:
                        if not await self._write_out():
                            raise LinkDown(
                                "cannot send: the stream failed: " + str(self._last_error)
                            )
                    except MemoryError:
                        self._out_of_memory()  # queued: the next flush writes it
                    return
            finally:
                self._lock.release()
            if out_of_memory:
                self._out_of_memory()
                try:
                    await _sleep_ms(_RECOVER_MS)
                except MemoryError:
                    pass
                continue
            # Reliable mode, window and queue full: wait for acks (or the end).
            self._room.clear()
            await self._room.wait()

    # --- messages from the host ----------------------------------------------

    def _pause(self) -> "Any":
        """What to await after a MemoryError (a plain function: a coroutine
        function's call would allocate)."""
        return _sleep_ms(_RECOVER_MS)

    def _spawn(self, coro: "Any") -> None:
        # The coroutine removes its task from the set when it ends.
        task = asyncio.create_task(coro)
        try:
            self._tasks.add(task)
        except MemoryError:
            task.cancel()  # before it ran: its event is handed over again
            raise

    def _task_ended(self) -> bool:
        """A handler or callback task ends: free its slot and tell the link
        there is room (reliable mode). True if that queued bytes to write."""
        self._tasks.discard(asyncio.current_task())
        self.link.resume(self._clock())
        return bool(self.link.pending_output) and self._running

    # --- messages to the host ------------------------------------------------

    async def publish(self, topic: str, payload: bytes) -> None:
        """Send data on ``topic`` to the host, which publishes it to its subscribers.

        In reliable mode it waits while the link's window and queue are full.
        Raises :class:`LinkDown` (session not up, or the device stopped),
        :class:`MessageTooLarge`, :class:`SendQueueFull` (output full) or
        :class:`LinkUsageError` (a bad argument).
        """
        await self._send(self.link.send_data, topic, payload)

    async def send_to(self, dest: str, topic: str, payload: bytes) -> None:
        """Ask the host to route data to ``dest``: a node's IP or "IP/device". Errors as publish."""
        await self._send(self.link.send_to, dest, topic, payload)

    async def request(self, topic: str, payload: bytes, timeout_ms: int = 2000) -> bytes:
        """Send a request that the host node's handler answers; return the answer.

        Raises :class:`RequestTimeout`, :class:`RequestFailed` (error status),
        :class:`RequestLost` (session down before the answer), :class:`SendQueueFull`
        (already 4 requests pending), or as :meth:`publish`.
        """
        pending = self._pending
        if len(pending) >= MAX_PENDING_REQUESTS:
            raise SendQueueFull(
                f"cannot send request: {len(pending)} requests await answers "
                f"(limit {MAX_PENDING_REQUESTS})"
            )
        req_id = self._next_req_id
        while req_id in pending:
            req_id = (req_id + 1) & 0xFFFF
        self._next_req_id = (req_id + 1) & 0xFFFF
        slot = [asyncio.Event(), None, topic]
        pending[req_id] = slot
        try:
            await self._send(self.link.send_request, req_id, topic, payload)
            self._counts["requests_sent"] += 1
            try:
                await _wait_ms(slot[0].wait(), timeout_ms)
            except asyncio.TimeoutError:
                self._counts["request_timeouts"] += 1
                raise RequestTimeout(
                    f"request on {topic!r} got no response within {timeout_ms} ms"
                ) from None
        finally:
            del pending[req_id]
        result = slot[1]
        if isinstance(result, RequestError):
            lost = isinstance(result, RequestLost)
            self._counts["requests_lost" if lost else "requests_failed"] += 1
            raise result
        return result
