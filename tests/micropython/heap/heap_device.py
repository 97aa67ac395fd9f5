"""Heap measurement, device side: a Device running a whole session in a small heap.

Runs in the device's MicroPython runtime, driven by .ci/micropython-heap.mjs,
which calls ``setup`` once and then ``step`` until it returns DONE or FAILED.
The line to the host is a Mailbox (no allocation to move bytes); asyncio's
scheduler is turned by ``step`` (the WebAssembly port would otherwise ask
JavaScript for a timer at every wake-up, which allocates proxies on the heap
that no board has).

``setup(form, mode, measure)``: form is "py" or "mpy" (the tree the driver
copied in says which files exist) or "frozen" (the code is compiled before
anything is measured and each module's body then runs from that code: what a
module frozen into the firmware keeps on the heap, since frozen code lives
in flash). With ``measure``, every step collects the garbage and records the
heap in use, and ``report`` prints the figures as one JSON line.
"""

# ruff: noqa: I001, E402  (local modules; binascii is imported after a measurement)

import gc
import sys

import asyncio
from asyncio import core

# Modules a board has in C (no heap) that this port wraps in frozen Python:
# binascii alone keeps 7 KB here. Loaded before anything is counted, so the
# figures are firmware_bridge's own, as on an ESP32 or RP2040.
gc.collect()
_before_port = gc.mem_alloc()
import binascii  # noqa: F401
import time  # noqa: F401

gc.collect()
#: Heap this port spends on what a board has in C; heap.py takes it off the
#: smallest heap, so that the figure is what a board needs.
PORT_BYTES = gc.mem_alloc() - _before_port

from mailbox import Mailbox
import scenario

#: Each way of the line: 512 bytes, as the boards' UART receive buffer.
LINE_BYTES = 512
PRESSURE_MS = 300  # how long the ballast holds the heap
RUNNING = 0
#: Ballast under pressure, in 16-byte blocks: 24 KB, enough to fill what a
#: heap 12 KB above the smallest leaves (heap.py runs it so).
BALLAST_BLOCKS = 1536
DONE = 1
FAILED = 2


def _no_timer(dt):
    pass


core._schedule_run_iter = _no_timer
core.new_event_loop()

# Every key there from the start: storing into it then allocates nothing,
# which matters when a failure is recorded under heap pressure.
_state = {
    "status": RUNNING,
    "where": None,
    "exc": None,
    "peak": 0,
    "figures": {},
    "base": 0,
    "pressure": False,
    "survived": 0,
    "app_memory_errors": 0,
    "released": False,
    "tasks": None,
    "ballast": None,
    "escaped": 0,
}
_box = None
_device = None
_measure = False
_stream = None


class Stream:
    """The device's reader and writer over the mailbox, as asyncio streams behave."""

    def __init__(self, box):
        self.box = box
        self.ready = asyncio.Event()
        self.drained = asyncio.Event()

    async def read(self, n):
        while not self.box.pending():
            self.ready.clear()
            await self.ready.wait()
        return self.box.take(n)

    async def readinto(self, buf):
        while not self.box.pending():
            self.ready.clear()
            await self.ready.wait()
        return self.box.take_into(buf)

    def write(self, data):
        self.box.put(data)

    async def drain(self):
        while self.box.unsent():
            self.drained.clear()
            await self.drained.wait()


def _used():
    gc.collect()
    return gc.mem_alloc()


def _load_frozen():
    """Compile every firmware_bridge module now; imports then run the kept code."""
    import heap_frozen

    before = _used()
    # Listed by the driver: listing a directory needs the C heap, which the
    # driver took away.
    with open("/stubs/modules.txt", "rb") as f:
        names = str(f.read(), "utf-8").split()
    for name in names:
        if name.endswith(".py"):
            module = name[:-3]
            full = "firmware_bridge" if module == "__init__" else "firmware_bridge." + module
            with open("firmware_bridge/" + name, "rb") as f:
                source = str(f.read(), "utf-8")
            heap_frozen.CODES[full] = compile(source, "firmware_bridge/" + name, "exec")
            source = None
            gc.collect()
    _state["figures"]["code_bytes"] = _used() - before
    # The stubs that run that code stand where the modules were.
    sys.path.insert(0, "/stubs")


def _import(mode):
    from firmware_bridge import driver  # noqa: F401

    import firmware_bridge.link  # noqa: F401

    opts = scenario.options(mode)
    # What the link imports for the mode, so that "import" covers it.
    optional = []
    if opts["psk"]:
        optional.append("auth")
    if opts["reliable"]:
        optional.append("reliable")
    for name in optional:
        try:
            __import__("firmware_bridge." + name)
        except ImportError:
            pass  # a layout without that module


def setup(form, mode, measure):
    """Import, create the device and start the session; return the mailbox's address."""
    global _box, _device, _measure, _stream
    _measure = measure
    figures = _state["figures"]
    _box = Mailbox(LINE_BYTES)
    _stream = Stream(_box)
    if form == "frozen":
        _load_frozen()
    base = _used()
    figures["harness_bytes"] = base
    figures["port_bytes"] = PORT_BYTES
    _import(mode)
    after_import = _used()
    figures["import_bytes"] = after_import - base
    from firmware_bridge.driver import Device

    opts = scenario.options(mode)
    _device = Device(
        _stream,
        _stream,
        "pico-1",
        psk=opts["psk"],
        reliable=opts["reliable"],
        epoch=scenario.DEVICE_EPOCH,
    )
    figures["device_bytes"] = _used() - after_import
    _state["base"] = base
    pressure = "pressure" in mode
    _state["pressure"] = pressure
    _state["tasks"] = (
        asyncio.create_task(_run(_device)),
        asyncio.create_task(_app(_device, pressure)),
    )
    return _box.address()


async def _run(device):
    try:
        await device.run()
    except BaseException as exc:
        _fail("run", exc)
        return
    if _state["status"] == RUNNING:
        _fail("run", None)


async def _ballast(hold):
    """Fill the heap with one-block objects, then free every other one, for a while.

    The free heap is then many 16-byte holes: small allocations still work,
    but nothing of a frame's size fits, as in a fragmented heap on a board.
    Lets go after ``PRESSURE_MS`` whatever happens (on this port an await can
    itself fail when the heap is full).
    """
    n = 0
    try:
        try:
            while n < len(hold):
                hold[n] = (n, n)  # a 2-tuple built at run time: one 16-byte block
                n += 1
        except MemoryError:
            pass
        for i in range(0, n, 2):
            hold[i] = None
        for _ in range(PRESSURE_MS // 10):
            try:
                await asyncio.sleep_ms(10)
            except (MemoryError, StopIteration):
                pass
    finally:
        for i in range(n):
            hold[i] = None
        _state["released"] = True


async def _app(device, pressure):
    try:
        got = [0, 0]  # data received, requests served: no allocation to count

        def on_data(topic, payload):
            got[0] += 1

        async def echo(payload):
            got[1] += 1
            return payload

        device.on_message(scenario.TOPIC_DATA, on_data)
        device.handle(scenario.TOPIC_ECHO, echo)
        await device.wait_up()
        payload = scenario.payload()  # made before any ballast
        if pressure:
            # The host's messages and requests arrive while the ballast holds
            # the heap: the device meets the MemoryErrors. This task only
            # waits meanwhile (on this port an await itself can fail then).
            hold = [None] * BALLAST_BLOCKS
            _state["ballast"] = asyncio.create_task(_ballast(hold))
            while not _state["released"]:
                try:
                    await asyncio.sleep_ms(5)
                except (MemoryError, StopIteration):
                    pass
            hold = None
        # Under pressure even calling a coroutine function can fail (nothing
        # sent then: the driver retries a send that met a MemoryError itself).
        sent = 0
        while sent < scenario.PUBLISHES:
            try:
                await device.publish(scenario.TOPIC_DATA, payload)
                sent += 1
            except MemoryError:
                _state["app_memory_errors"] += 1
                await asyncio.sleep_ms(5)
        sent = 0
        while sent < scenario.REQUESTS:
            try:
                answer = await device.request(scenario.TOPIC_ECHO, payload, 5000)
                sent += 1
            except MemoryError:
                _state["app_memory_errors"] += 1
                await asyncio.sleep_ms(5)
                continue
            if answer != payload:
                raise AssertionError("wrong answer")
        # Requests answered: by echo, or (under pressure) with "out of memory"
        # when the handler could not be started (the host counts those).
        served = device._counts
        while got[0] < scenario.PUBLISHES or served["requests_served"] < scenario.REQUESTS:
            await asyncio.sleep_ms(1)
        while True:
            try:
                stats = device.stats
                break
            except MemoryError:
                await asyncio.sleep_ms(5)
        survived = stats.get("memory_errors", 0) + stats.get("out_of_memory", 0)
        _state["survived"] = survived
        if pressure:
            if not survived:
                raise AssertionError("the ballast never caused a MemoryError in the device")
            await device.wait_up()  # its report goes out once up
            while device._unreported:
                await asyncio.sleep_ms(5)
        elif survived:
            raise AssertionError(f"{survived} MemoryErrors survived")
        _state["status"] = DONE
    except BaseException as exc:
        _fail("app", exc)


def _fail(where, exc):
    if exc is not None and _state["pressure"]:
        sys.print_exception(exc)
    if _state["status"] == RUNNING:
        _state["status"] = FAILED
        _state["where"] = where
        _state["exc"] = exc


def step():
    """Run what is due; return RUNNING, DONE or FAILED.

    A turn of the scheduler, as ``loop.run_forever()`` is on a board, with
    the same supervision the board examples give it (boards/esp32/main.py):
    an exception that escapes the scheduler itself (asyncio's own code
    meeting a full heap: its exception handler prints, for one) is counted
    and the loop turns on with every task. Escaping into JavaScript instead
    would end in the port's fatal-error loop (heap.py).
    """
    try:
        if _box.pending():
            _stream.ready.set()
        if not _box.unsent():
            _stream.drained.set()
        core._run_iter()
    except Exception:
        _state["escaped"] += 1
    if _measure:
        used = _used()
        if used > _state["peak"]:
            _state["peak"] = used
    return _state["status"]


def report():
    """Print the figures as one JSON line (and the failure, if any)."""
    import json

    figures = _state["figures"]
    figures["status"] = ("running", "done", "failed")[_state["status"]]
    if _measure:
        figures["session_peak_bytes"] = _state["peak"] - _state["base"]
    where = _state["where"]
    if where is not None:
        exc = _state["exc"]
        figures["error"] = where + ": " + (repr(exc) if exc is not None else "ended")
    if _state["pressure"]:
        figures["survived"] = _state["survived"]
        figures["app_memory_errors"] = _state["app_memory_errors"]
        figures["scheduler_errors"] = _state["escaped"]
    if _device is not None:
        stats = _device.stats
        figures["frames_out"] = stats["frames_out"]
        figures["retransmits"] = stats["retransmits"]
        figures["dropped"] = stats["dropped"]
        if _state["status"] != DONE:
            link = _device.link
            rel = None if link._rel is None else (len(link._rel.unacked), len(link._rel.queue))
            figures["debug"] = (
                f"up={link.is_up} sessions={stats['sessions']} tasks={len(_device._tasks)} "
                f"pending={len(_device._pending)} out={link.pending_output} rel={rel} "
                f"last={stats['last_error']}"
            )
    print("HEAP " + json.dumps(figures))
