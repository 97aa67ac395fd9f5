"""Heap measurement, device side: a Device running a whole session in a small heap.

Runs in the device's MicroPython runtime, driven by .ci/micropython-heap.mjs,
which calls ``setup`` once, ``phase`` until it returns False, and then
``step`` until it returns DONE or FAILED.
The line to the host is a Mailbox (no allocation to move bytes); asyncio's
scheduler is turned by ``step`` (the WebAssembly port would otherwise ask
JavaScript for a timer at every wake-up, which allocates proxies on the heap
that no board has).

``setup(form, mode, measure)``: form is "py" or "mpy" (the tree the driver
copied in says which files exist) or "frozen" (the code is compiled before
anything is measured and each module's body then runs from that code: what a
module frozen into the firmware keeps on the heap, since frozen code lives
in flash). With ``measure``, every step records the heap in use, and
``report`` prints the figures as one JSON line.

Collections: this port (MICROPY_GC_SPLIT_HEAP_AUTO, ports/webassembly/main.c)
never collects inside a call from JavaScript. ``gc.collect()`` and an
allocation that fails only ask for a collection, which runs when the
outermost call returns (a failed allocation then grows the heap, which the
driver forbids: a MemoryError). A board collects whenever an allocation
needs it. So every call here ends by asking for a collection: ``phase``
runs the setup one step per call (the port's modules, each firmware_bridge
module's import, the Device) and reads each figure at the start of the next
call, after that collection; ``step`` does the same for each turn of the
scheduler. Otherwise garbage would pile up until 16 KB had been allocated
(the port's threshold), and every figure would include it.
"""

# ruff: noqa: I001, E402  (local modules, after the port's own)

import gc
import sys

import asyncio
from asyncio import core

# Modules a board has in C (no heap) that this port has in Python (binascii
# is compiled from source at import: 2 KB kept) are loaded by ``phase``
# before anything is counted, so that the figures are firmware_bridge's own,
# as on an ESP32 or RP2040; heap.py takes PORT_BYTES off the smallest heap.
PORT_BYTES = 0

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
    "phases": None,
    "port_before": 0,
    "code_before": 0,
    "after_import": 0,
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
    """Heap in use: at the start of a call, after the collection the last one asked for."""
    return gc.mem_alloc()


def _frozen_phases():
    """Compile every firmware_bridge module now (one call each); imports then run the kept code."""
    # Listed by the driver: listing a directory needs the C heap, which the
    # driver took away.
    with open("/stubs/modules.txt", "rb") as f:
        names = str(f.read(), "utf-8").split()
    phases = [_code_before]
    for name in names:
        if name.endswith(".py"):
            phases.append(lambda name=name: _compile(name))
    phases.append(_code_after)
    return phases


def _code_before():
    _state["code_before"] = _used()


def _compile(name):
    import heap_frozen

    module = name[:-3]
    full = "firmware_bridge" if module == "__init__" else "firmware_bridge." + module
    with open("firmware_bridge/" + name, "rb") as f:
        source = str(f.read(), "utf-8")
    heap_frozen.CODES[full] = compile(source, "firmware_bridge/" + name, "exec")


def _code_after():
    _state["figures"]["code_bytes"] = _used() - _state["code_before"]
    # The stubs that run that code stand where the modules were.
    sys.path.insert(0, "/stubs")


def _port_before():
    _state["port_before"] = _used()
    import binascii  # noqa: F401
    import time  # noqa: F401


def _port_after():
    global PORT_BYTES
    PORT_BYTES = _used() - _state["port_before"]


def _base():
    base = _used()
    _state["base"] = base
    _state["figures"]["harness_bytes"] = base
    _state["figures"]["port_bytes"] = PORT_BYTES


def _modules(mode):
    """The modules a Device imports, the driver first; then what the link imports for the mode."""
    names = ["firmware_bridge.driver", "firmware_bridge.link"]
    opts = scenario.options(mode)
    if opts["psk"]:
        names.append("firmware_bridge.auth")
    if opts["reliable"]:
        names.append("firmware_bridge.reliable")
    return names


def _import(name):
    try:
        __import__(name)
    except ImportError:
        if name in ("firmware_bridge.driver", "firmware_bridge.link"):
            raise
        # a layout without that optional module


def _make_device(mode):
    figures = _state["figures"]
    _state["after_import"] = _used()
    figures["import_bytes"] = _state["after_import"] - _state["base"]
    from firmware_bridge.driver import Device

    global _device
    opts = scenario.options(mode)
    _device = Device(
        _stream,
        _stream,
        "pico-1",
        psk=opts["psk"],
        reliable=opts["reliable"],
        epoch=scenario.DEVICE_EPOCH,
    )


def _start(mode):
    _state["figures"]["device_bytes"] = _used() - _state["after_import"]
    pressure = "pressure" in mode
    _state["pressure"] = pressure
    _state["tasks"] = (
        asyncio.create_task(_run(_device)),
        asyncio.create_task(_app(_device, pressure)),
    )


def setup(form, mode, measure):
    """Make the line and plan the setup (``phase`` runs it); return the mailbox's address."""
    global _box, _measure, _stream
    _measure = measure
    _box = Mailbox(LINE_BYTES)
    _stream = Stream(_box)
    phases = [_port_before, _port_after]
    if form == "frozen":
        phases += _frozen_phases()
    phases.append(_base)
    for name in _modules(mode):
        phases.append(lambda name=name: _import(name))
    phases.append(lambda: _make_device(mode))
    phases.append(lambda: _start(mode))
    _state["phases"] = phases
    gc.collect()
    return _box.address()


def phase():
    """Run the next step of the setup, in a call of its own; False once none is left."""
    phases = _state["phases"]
    if not phases:
        return False
    phases.pop(0)()
    gc.collect()  # runs when this call returns (see the module's docstring)
    return True


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
    if _measure:
        used = _used()  # what the last turn left, collected
        if used > _state["peak"]:
            _state["peak"] = used
    try:
        if _box.pending():
            _stream.ready.set()
        if not _box.unsent():
            _stream.drained.set()
        core._run_iter()
    except Exception:
        _state["escaped"] += 1
    gc.collect()  # when this call returns, as a board collects when it needs to
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
