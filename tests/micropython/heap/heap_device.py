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

import gc
import sys

import asyncio
from asyncio import core

# Modules a board has in C (no heap) that this port wraps in frozen Python:
# binascii alone keeps 7 KB here. Loaded before anything is counted, so the
# figures are firmware_bridge's own, as on an ESP32 or RP2040.
import binascii  # noqa: F401
import time  # noqa: F401

from mailbox import Mailbox
import scenario

RUNNING = 0
DONE = 1
FAILED = 2


def _no_timer(dt):
    pass


core._schedule_run_iter = _no_timer
core.new_event_loop()

_state = {"status": RUNNING, "error": None, "peak": 0, "figures": {}}
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
    _box = Mailbox(2048)
    _stream = Stream(_box)
    if form == "frozen":
        _load_frozen()
    base = _used()
    figures["harness_bytes"] = base
    _import(mode)
    after_import = _used()
    figures["import_bytes"] = after_import - base
    from firmware_bridge.driver import Device

    opts = scenario.options(mode)
    _device = Device(
        _stream, _stream, "pico-1", psk=opts["psk"], reliable=opts["reliable"],
        epoch=scenario.DEVICE_EPOCH,
    )
    figures["device_bytes"] = _used() - after_import
    _state["base"] = base
    asyncio.create_task(_run(_device))
    asyncio.create_task(_app(_device))
    return _box.address()


async def _run(device):
    try:
        await device.run()
    except BaseException as exc:  # noqa: BLE001
        _fail("run", exc)
        return
    if _state["status"] == RUNNING:
        _fail("run", None)


async def _app(device):
    try:
        got = []
        served = []

        def on_data(topic, payload):
            got.append(len(payload))

        async def echo(payload):
            served.append(len(payload))
            return payload

        device.on_message(scenario.TOPIC_DATA, on_data)
        device.handle(scenario.TOPIC_ECHO, echo)
        await device.wait_up()
        payload = scenario.payload()
        for _ in range(scenario.PUBLISHES):
            await device.publish(scenario.TOPIC_DATA, payload)
        for _ in range(scenario.REQUESTS):
            answer = await device.request(scenario.TOPIC_ECHO, payload, 5000)
            if answer != payload:
                raise AssertionError("wrong answer")
        while len(got) < scenario.PUBLISHES or len(served) < scenario.REQUESTS:
            await asyncio.sleep_ms(1)
        stats = device.stats
        errors = stats.get("memory_errors", 0)
        if errors:
            raise AssertionError("%d MemoryErrors survived" % errors)
        _state["status"] = DONE
    except BaseException as exc:  # noqa: BLE001
        _fail("app", exc)


def _fail(where, exc):
    if _state["status"] == RUNNING:
        _state["status"] = FAILED
        _state["error"] = (where, exc)


def step():
    """Run what is due; return RUNNING, DONE or FAILED."""
    if _box.pending():
        _stream.ready.set()
    if not _box.unsent():
        _stream.drained.set()
    core._run_iter()
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
    error = _state["error"]
    if error is not None:
        where, exc = error
        figures["error"] = where + ": " + (repr(exc) if exc is not None else "ended")
    if _device is not None:
        stats = _device.stats
        figures["frames_out"] = stats["frames_out"]
        figures["retransmits"] = stats["retransmits"]
        figures["dropped"] = stats["dropped"]
    print("HEAP " + json.dumps(figures))
