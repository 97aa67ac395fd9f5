"""The serial bridge under faults: a noisy line, bad frames, a wrong key.

Everything runs over real pseudo-terminals. The node (127.0.0.2) opens a
pty slave with pyserial; the real ``firmware_bridge`` driver runs on a pty
master as device "pico-1". For the noisy line the fault kit's
:class:`~edgenode.testing.ptyrelay.PtyRelay` sits between two ptys and
corrupts, drops and inserts bytes at a set rate with a seeded generator.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from binascii import crc32
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from edgenode.node import Node, PeerDown, PeerUp
from edgenode.simdevice import PtyPair, SimulatedDevice
from edgenode.testing.ptyrelay import PtyRelay
from firmware_bridge import cbor, cobs
from firmware_bridge.driver import Device
from firmware_bridge.link import DATA, HELLO, PING, Link, LinkDown

from .conftest import wait_event, wait_until

pytestmark = pytest.mark.anyio

DEVICE = "127.0.0.2/pico-1"
TOPIC = "n"
END = "end"
#: In reliable mode the node sends a message to the device only while fewer
#: than this many it sent have not arrived. Its link holds 4 unacknowledged
#: plus 8 queued and drops beyond that (``Node.send`` does not wait for room),
#: and its acknowledgements may lag the device's inbox by up to the window of 4.
IN_FLIGHT = 8


def numbered(i: int) -> bytes:
    """Message ``i``: its number and a check on it, so any corruption shows."""
    head = b"%05d:" % i
    return head + hashlib.sha256(head).hexdigest()[:16].encode()


def number_of(payload: bytes) -> int | None:
    """The number of a payload made by :func:`numbered`, or None if it does not verify."""
    digits = payload[:5]
    if not digits.isdigit() or payload != numbered(int(digits)):
        return None
    return int(digits)


def is_device_up(event: Any) -> bool:
    return isinstance(event, PeerUp) and event.peer == DEVICE


def is_device_down(event: Any) -> bool:
    return isinstance(event, PeerDown) and event.peer == DEVICE


def port_link(node: Node) -> Link:
    assert node.bridge is not None and node.bridge.ports[0].link is not None
    return node.bridge.ports[0].link


def device_row(node: Node) -> Any:
    [row] = [p for p in node.peers() if p.ip == DEVICE]
    return row


def start_device_app(device: Device, inbox: list[tuple[str, bytes]]) -> None:
    """What every simulated device runs: an inbox for data and an echo handler."""
    device.on_message("#", lambda topic, payload: inbox.append((topic, payload)))

    async def echo(payload: bytes) -> bytes:
        return b"pico says " + payload

    device.handle("echo", echo)


# -- a noisy line -----------------------------------------------------------------------


class NoisyRig:
    def __init__(self, node: Node, sim: SimulatedDevice, relay: PtyRelay, events: Any) -> None:
        self.node, self.sim, self.relay, self.events = node, sim, relay, events
        self.at_device: list[tuple[str, bytes]] = []
        self.at_node: list[tuple[str, bytes]] = []
        self.downs = 0  # PeerDown events for the device once it was up

    @property
    def device(self) -> Device:
        assert self.sim.device is not None
        return self.sim.device


@asynccontextmanager
async def noisy_line(
    make_config: Any, *, reliable: bool, rate: float, seed: int
) -> AsyncIterator[NoisyRig]:
    """A node and a device joined through a noisy :class:`PtyRelay`, up and (still) quiet."""
    # Each byte is hit by each fault with probability ``rate`` while noisy.
    relay = PtyRelay(seed=seed, corrupt=rate, drop=rate, insert=rate, resync=cobs.DELIMITER)
    sim = SimulatedDevice(
        "pico-1",
        relay.far,
        reliable=reliable,
        keepalive_interval_ms=100,
        keepalive_timeout_ms=1000,
    )
    config = make_config(
        "a",
        "127.0.0.2",
        serial_ports=[(relay.near.path, 115200)],
        serial_keepalive_interval_s=0.1,
        serial_keepalive_timeout_s=1.0,
        serial_reliable=reliable,
        subscription_buffer=1024,
    )
    try:
        with relay:
            async with Node(config) as node:
                rig = NoisyRig(node, sim, relay, node.events())
                device = await sim.start()
                start_device_app(device, rig.at_device)
                await wait_event(rig.events, is_device_up)
                with anyio.fail_after(5):
                    await device.wait_up()  # the two ends come up one after the other
                relay.near.release_slave()
                with node.subscribe("#") as sub:

                    async def collect() -> None:
                        async for msg in sub:
                            assert msg.peer == DEVICE
                            rig.at_node.append((msg.topic, msg.payload))

                    async def count_downs() -> None:
                        async for event in rig.events:
                            rig.downs += is_device_down(event)

                    async with anyio.create_task_group() as watchers:
                        watchers.start_soon(collect)
                        watchers.start_soon(count_downs)
                        try:
                            yield rig
                        finally:
                            watchers.cancel_scope.cancel()
                    assert sub.dropped == 0
                await sim.stop()
    finally:
        await sim.aclose()
        relay.close()


async def exchange(rig: NoisyRig, count: int, *, confirm: bool) -> None:
    """Send ``count`` numbered messages each way at once, then an end marker on a quiet line.

    The device publishes to the node; the node sends to the device. With
    ``confirm`` (reliable mode), the node keeps at most IN_FLIGHT messages
    unconfirmed (a burst test below checks that Node.send waits for room by
    itself) and both directions wait until all have arrived.
    """

    async def device_publishes() -> None:
        for i in range(count):
            while True:
                try:
                    await rig.device.publish(TOPIC, numbered(i))
                    break
                except LinkDown:  # the noise took the session down: it comes back
                    with anyio.fail_after(5):
                        await rig.device.wait_up()

    async def node_sends() -> None:
        for i in range(count):
            if confirm:
                await wait_until(lambda n=i + 1 - IN_FLIGHT: len(rig.at_device) >= n, timeout=10)
            await rig.node.send(DEVICE, TOPIC, numbered(i), wait_s=5)

    async with anyio.create_task_group() as tg:
        tg.start_soon(device_publishes)
        tg.start_soon(node_sends)
    if confirm:
        await wait_until(
            lambda: len(rig.at_device) >= count and len(rig.at_node) >= count, timeout=10
        )
    # The relay garbles what it reads while noisy, and its threads may lag
    # behind the writers on a busy machine: quiet the line only once it has
    # read every byte either end had queued, or the last messages would
    # cross it clean.
    node_link = port_link(rig.node)
    await wait_until(
        lambda: rig.relay.to_far.bytes >= node_link.stats.bytes_out
        and rig.relay.to_near.bytes >= rig.device.stats["bytes_out"],
        timeout=10,
    )
    # Everything sent before the end markers, in each direction, has been
    # dealt with by the receiver once its marker arrives.
    rig.relay.noisy = False
    await rig.node.send(DEVICE, END, b".", wait_s=5)
    with anyio.fail_after(5):
        await rig.device.wait_up()
    await rig.device.publish(END, b".")
    await wait_until(lambda: (END, b".") in rig.at_node and (END, b".") in rig.at_device)
    assert rig.at_device[-1] == (END, b".") and rig.at_node[-1] == (END, b".")
    del rig.at_device[-1], rig.at_node[-1]


def report(name: str, rig: NoisyRig, count: int) -> None:
    """Print the run's figures (shown with ``pytest -s``)."""
    device_stats = rig.device.stats
    print(
        f"\n{name}: relay {rig.relay.counts}; sessions lost {rig.downs}\n"
        f"  device->node: sent {count}, delivered {len(rig.at_node)}, "
        f"node drops {port_link(rig.node).stats.drops}, "
        f"device retransmits {device_stats['retransmits']}\n"
        f"  node->device: sent {count}, delivered {len(rig.at_device)}, "
        f"device drops {device_stats['drops']}, "
        f"node retransmits {port_link(rig.node).stats.retransmits}"
    )


def assert_line_errors_counted(node: Node) -> None:
    drops = port_link(node).stats.drops
    assert drops.get("bad crc", 0) > 0
    assert drops.get("bad cobs", 0) > 0
    assert device_row(node).drops == sum(drops.values())


async def test_noisy_line_never_delivers_a_corrupted_message(make_config: Any) -> None:
    count = 150
    async with noisy_line(make_config, reliable=False, rate=0.01, seed=1) as rig:
        rig.relay.noisy = True
        await exchange(rig, count, confirm=False)
        report("unreliable, 1% each", rig, count)

        for received in (rig.at_node, rig.at_device):
            assert {topic for topic, _ in received} <= {TOPIC}
            numbers = [number_of(payload) for _, payload in received]
            assert None not in numbers, "a corrupted message was delivered"
            # Nothing is sent twice outside reliable mode: in order, no repeats.
            assert numbers == sorted(set(numbers))
            assert 0 < len(numbers) < count  # some get through, the noise costs some
        assert_line_errors_counted(rig.node)
        assert sum(rig.device.stats["drops"].values()) > 0
        # Up now, having stayed up or come back by itself.
        assert device_row(rig.node).state == "up" and rig.device.is_up
        answer = await rig.node.request(DEVICE, "echo", b"still there", timeout=2, wait_s=2)
        assert answer == b"pico says still there"


async def test_noisy_line_in_reliable_mode_delivers_everything_once_in_order(
    make_config: Any,
) -> None:
    count = 30
    async with noisy_line(make_config, reliable=True, rate=0.002, seed=2) as rig:
        assert port_link(rig.node).reliable and rig.device.link.reliable
        rig.relay.noisy = True
        await exchange(rig, count, confirm=True)
        report("reliable, 0.2% each", rig, count)

        expected = [(TOPIC, numbered(i)) for i in range(count)]
        assert rig.at_node == expected
        assert rig.at_device == expected
        assert rig.downs == 0
        assert_line_errors_counted(rig.node)
        assert rig.node.stats()["device_messages_lost"] == 0
        assert rig.node.bridge is not None and rig.node.bridge.ports[0].undelivered == 0


# -- bad input from the line, at the node --------------------------------------------------


class Line:
    """A node with a device up on one pseudo-terminal; the test may write to the line too."""

    def __init__(self, node: Node, sim: SimulatedDevice, events: Any) -> None:
        self.node, self.sim, self.events = node, sim, events
        self.inbox: list[tuple[str, bytes]] = []

    @property
    def device(self) -> Device:
        assert self.sim.device is not None
        return self.sim.device


@asynccontextmanager
async def plain_line(make_config: Any, **overrides: Any) -> AsyncIterator[Line]:
    """A node on a pty; a device (keyword arguments ``device_*``) on its master.

    Waits for the device to come up unless it is given a different key.
    """
    device_kw = {k[7:]: overrides.pop(k) for k in list(overrides) if k.startswith("device_")}
    pty = PtyPair()
    sim = SimulatedDevice(
        "pico-1", pty, keepalive_interval_ms=100, keepalive_timeout_ms=400, **device_kw
    )
    config = make_config(
        "a",
        "127.0.0.2",
        serial_ports=[(pty.path, 115200)],
        serial_keepalive_interval_s=0.1,
        serial_keepalive_timeout_s=0.4,
        **overrides,
    )
    try:
        async with Node(config) as node:
            line = Line(node, sim, node.events())
            start_device_app(await sim.start(), line.inbox)
            if device_kw.get("psk") == config.serial_psk:
                await wait_event(line.events, is_device_up)
                with anyio.fail_after(5):
                    await line.device.wait_up()
            else:
                bridge = node.bridge
                assert bridge is not None
                await wait_until(lambda: bridge.ports[0].link is not None)
            pty.release_slave()
            yield line
            await sim.stop()
    finally:
        await sim.aclose()


def wire(body: bytes, crc: int | None = None) -> bytes:
    """``body`` as a frame on the line: COBS(body + CRC-32 LE) between 0x00 delimiters."""
    if crc is None:
        crc = crc32(body)
    return cobs.DELIMITER + cobs.encode(body + struct.pack("<I", crc)) + cobs.DELIMITER


def hello_fields(*, version: int = 1, epoch: int = 7) -> list[Any]:
    return [version, "pico-x", epoch, 256, 100, 400, 0, 0]


_PING = bytes((PING,)) + b"\x12\x34"
_OVERSIZE = bytes((DATA, 1)) + b"t" + b"x" * 300  # the node's serial_max_frame is 256

BAD_FRAMES = [
    pytest.param(
        wire(_PING, crc=crc32(_PING) ^ 1),
        "bad crc",
        r"bad crc: frame says 0x[0-9a-f]{8}, body gives 0x[0-9a-f]{8}: 02 12 34",
        id="bad crc",
    ),
    pytest.param(
        b"\x00\x05\x01\x02\x00",
        "bad cobs",
        r"bad cobs: block at offset 0 claims 4 bytes, only 2 remain: 05 01 02",
        id="bad cobs",
    ),
    pytest.param(
        wire(_OVERSIZE),
        "oversize",
        r"oversize frame: 309 bytes exceed the 262-byte limit: ff 04 01 74( 78){12}",
        id="oversize",
    ),
    pytest.param(
        wire(b"\x09"), "unknown type", r"unknown frame type 9 in header 0x09", id="unknown type"
    ),
    pytest.param(
        wire(bytes((HELLO,)) + cbor.encode([1, "pico-x"])),
        "bad hello",
        r"bad hello: expected an array of at least 8 fields, got an array of 2: 82 01 66 .*",
        id="short hello",
    ),
    pytest.param(
        wire(bytes((HELLO,)) + cbor.encode(hello_fields(version=2))),
        "bad hello",
        r"bad hello: unsupported protocol version 2 \(this link speaks 1\)",
        id="hello of another version",
    ),
    pytest.param(
        wire(bytes((HELLO,)) + cbor.encode(hello_fields(epoch=0))),
        "bad hello",
        r"bad hello: epoch 0 is outside 1\.\.4294967295",
        id="hello with epoch 0",
    ),
    pytest.param(
        wire(bytes((HELLO,)) + b"\xff"),
        "bad hello",
        r"bad hello: cbor: unsupported break code outside an indefinite-length item "
        r"\(indefinite lengths are not allowed\): initial byte 0xff at offset 0",
        id="hello not cbor",
    ),
]


@pytest.mark.parametrize(("frame", "reason", "message"), BAD_FRAMES)
async def test_node_rejects_bad_frame_from_the_line(
    make_config: Any, caplog: pytest.LogCaptureFixture, frame: bytes, reason: str, message: str
) -> None:
    caplog.set_level(logging.INFO, logger="edgenode.bridge")
    async with plain_line(make_config) as line:
        link = port_link(line.node)
        assert line.node.bridge is not None
        up_since = line.node.bridge.ports[0].up_since
        before = dict(link.stats.drops)
        # The device keeps talking on the same line; its frames are whole
        # writes, so ours lands between two of them.
        os.write(line.sim.pty.master, frame)
        await wait_until(lambda: link.stats.drops.get(reason, 0) > before.get(reason, 0))
        assert link.stats.drops == {**before, reason: before.get(reason, 0) + 1}

        path = line.node.config.serial_ports[0][0]
        logged = [
            r.getMessage()
            for r in caplog.records
            if r.name == "edgenode.bridge"
            and r.levelno == logging.INFO
            and "dropped" in r.getMessage()
        ]
        assert len(logged) == 1
        assert re.fullmatch(
            re.escape(f"{path}: dropped a frame ({reason} #1): ") + message, logged[0]
        )

        # The session is untouched and still carries requests.
        assert link.is_up and line.device.is_up and line.device.stats["sessions"] == 1
        answer = await line.node.request(DEVICE, "echo", b"after", timeout=2)
        assert answer == b"pico says after"
        assert device_row(line.node).state == "up"
        assert line.node.bridge.ports[0].up_since == up_since  # never went down in between


# -- a wrong key ----------------------------------------------------------------------------

KEY = b"k" * 32


@pytest.mark.parametrize(
    ("device_psk", "message"),
    [
        pytest.param(
            b"j" * 32,
            r"auth failure: hello frame's tag does not match \(wrong key, or epochs "
            r"\d+/\d+ unknown to the sender\): tag [0-9a-f ]+",
            id="another key",
        ),
        pytest.param(
            None,
            r"auth failure: hello frame is not authenticated but a psk is configured",
            id="no key",
        ),
    ],
)
async def test_node_rejects_device_with_wrong_key(
    make_config: Any, caplog: pytest.LogCaptureFixture, device_psk: bytes | None, message: str
) -> None:
    caplog.set_level(logging.INFO, logger="edgenode.bridge")
    async with plain_line(make_config, serial_psk=KEY, device_psk=device_psk) as line:
        link = port_link(line.node)
        # The device says hello every 100 ms: each one is refused.
        await wait_until(lambda: link.stats.drops.get("auth failure", 0) >= 3)
        # A bounded negative check: over three more keepalive intervals, no session.
        with pytest.raises(TimeoutError):
            await wait_event(line.events, is_device_up, timeout=0.3)
        assert not link.is_up and not line.device.is_up
        assert line.node.bridge is not None and line.node.bridge.devices == {}
        assert set(link.stats.drops) == {"auth failure"}
        assert set(line.device.stats["drops"]) == {"auth failure"}
        drops = [r.getMessage() for r in caplog.records if ": dropped a frame (" in r.getMessage()]
        # Logged at the 1st, 10th, 100th ... drop, not once per frame.
        assert drops and all(
            re.fullmatch(r".*: dropped a frame \(auth failure #(1|10|100)\): " + message, text)
            for text in drops
        )
        assert len(drops) < link.stats.drops["auth failure"] or len(drops) == 1
        assert "6b 6b 6b 6b" not in caplog.text and "kkkk" not in caplog.text  # no key material

        # The right key: the same line comes up.
        line.sim.device_kw["psk"] = KEY
        start_device_app(await line.sim.start(), line.inbox)
        await wait_event(line.events, is_device_up)
        answer = await line.node.request(DEVICE, "echo", b"keyed", timeout=2, wait_s=2)
        assert answer == b"pico says keyed"
