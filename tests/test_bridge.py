"""Microcontrollers over real pseudo-terminals, bridged into the network.

Node A (127.0.0.2) opens the slave side of a pseudo-terminal with pyserial;
the real ``firmware_bridge`` driver runs on the master side as device
"pico-1". Node B (127.0.0.3) reaches the device through A.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from edgenode.errors import PeerUnavailable, RemoteError
from edgenode.node import Incoming, Node, PeerDown, PeerUp
from edgenode.simdevice import PtyPair, SimulatedDevice

from .conftest import wait_event, wait_until

pytestmark = pytest.mark.anyio

DEVICE = "127.0.0.2/pico-1"
FAST = dict(keepalive_interval_ms=100, keepalive_timeout_ms=400)


class Rig:
    def __init__(self, a: Node, b: Node, sim: SimulatedDevice, a_events: Any, link: Path) -> None:
        self.a, self.b, self.sim, self.a_events, self.link = a, b, sim, a_events, link
        self.device_inbox: list[tuple[str, bytes]] = []


@pytest.fixture
async def rig(make_config: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    pty = PtyPair()
    # Nodes open a stable name (as with /dev/serial/by-id); replugging repoints it.
    link = tmp_path / "ttyPICO"
    os.symlink(pty.path, link)
    sim = SimulatedDevice("pico-1", pty, **FAST)
    a_config = make_config(
        "a",
        "127.0.0.2",
        serial_ports=[(str(link), 115200)],
        serial_keepalive_interval_s=0.1,
        serial_keepalive_timeout_s=0.4,
        backoff_cap_s=0.2,
    )
    async with Node(a_config) as a:
        a_events = a.events()
        async with Node(make_config("b", "127.0.0.3", [("127.0.0.2", a.listen_port)])) as b:
            rig = Rig(a, b, sim, a_events, link)
            device = await sim.start()
            device.on_message("#", lambda topic, payload: rig.device_inbox.append((topic, payload)))

            async def echo(payload: bytes) -> bytes:
                return b"pico says " + payload

            device.handle("echo", echo)
            await wait_event(a_events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
            await device.wait_up()
            pty.release_slave()
            # B learns that A bridges the device.
            await wait_until(lambda: any(p.devices == ("pico-1",) for p in b.peers()))
            yield rig
            await sim.aclose()


async def test_device_appears_under_its_node(rig: Rig) -> None:
    rows = {p.ip: p for p in rig.a.peers()}
    assert rows[DEVICE].state == "up" and rows[DEVICE].direction == "serial"
    [row_b] = [p for p in rig.b.peers() if p.ip == "127.0.0.2"]
    assert row_b.devices == ("pico-1",)


async def test_node_on_another_ip_messages_and_asks_the_device(rig: Rig) -> None:
    await rig.b.send(DEVICE, "led", b"on")
    await wait_until(lambda: ("led", b"on") in rig.device_inbox)
    assert await rig.b.request(DEVICE, "echo", b"hi", timeout=2) == b"pico says hi"
    with pytest.raises(
        RemoteError, match=r"remote error 5: device error 1: no handler for 'nothing'"
    ):
        await rig.b.request(DEVICE, "nothing", b"", timeout=2)
    # The bridging node itself, by its own address.
    assert await rig.a.request(DEVICE, "echo", b"local", timeout=2) == b"pico says local"


async def test_device_publishes_to_both_nodes_and_sends_to_a_peer(rig: Rig) -> None:
    assert rig.sim.device is not None
    with (
        rig.a.subscribe("temp") as at_a,
        rig.b.subscribe("temp") as at_b,
        rig.b.subscribe("direct") as direct,
    ):
        await rig.sim.device.publish("temp", b"21.5")
        with anyio.fail_after(2):
            assert await at_a.receive() == Incoming(DEVICE, rig.a.node_id, "temp", b"21.5")
            got = await at_b.receive()
        assert (got.peer, got.topic, got.payload) == (DEVICE, "temp", b"21.5")
        await rig.sim.device.send_to("127.0.0.3", "direct", b"to b only")
        with anyio.fail_after(2):
            got = await direct.receive()
        assert (got.peer, got.payload) == (DEVICE, b"to b only")


async def test_device_asks_its_node(rig: Rig) -> None:
    async def clock(request: Incoming) -> bytes:
        assert request.peer == DEVICE
        return b"12:00"

    rig.a.handle("time", clock)
    assert rig.sim.device is not None
    assert await rig.sim.device.request("time", b"", timeout_ms=2000) == b"12:00"


async def test_silent_device_is_declared_down_in_time(rig: Rig) -> None:
    await rig.sim.stop()  # it stops answering; the line stays plugged in
    started = anyio.current_time()
    down = await wait_event(rig.a_events, lambda e: isinstance(e, PeerDown) and e.peer == DEVICE)
    assert anyio.current_time() - started < 0.4 * 3
    assert down.reason == "device link down: keepalive timeout"
    with pytest.raises(PeerUnavailable, match="device pico-1 is not connected to this node"):
        await rig.a.send(DEVICE, "led", b"off")
    # B hears of it from A's device list.
    await wait_until(lambda: [p.devices for p in rig.b.peers()] == [()])
    with pytest.raises(PeerUnavailable, match=r"device pico-1 is not connected to 127\.0\.0\.2"):
        await rig.b.send(DEVICE, "led", b"off")
    # It comes back by itself when the device answers again.
    await rig.sim.start()
    await wait_event(rig.a_events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
    await rig.b.send(DEVICE, "led", b"on", wait_s=2)


async def test_device_restart_is_a_new_session(rig: Rig) -> None:
    device = await rig.sim.start()  # a reboot: a new epoch on the same line
    device.on_message("#", lambda topic, payload: rig.device_inbox.append((topic, payload)))
    await wait_event(rig.a_events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
    await rig.b.send(DEVICE, "led", b"again", wait_s=2)
    await wait_until(lambda: ("led", b"again") in rig.device_inbox)


async def test_unplug_and_replug(rig: Rig) -> None:
    await rig.sim.stop()
    rig.sim.pty.close()  # the cable is pulled (and the board loses power)
    down = await wait_event(rig.a_events, lambda e: isinstance(e, PeerDown) and e.peer == DEVICE)
    assert down.reason == f"serial port lost: {rig.link}: end of file (unplugged?)"
    new = PtyPair()
    os.unlink(rig.link)
    os.symlink(new.path, rig.link)
    rig.sim.pty = new
    device = await rig.sim.start()

    async def echo(payload: bytes) -> bytes:
        return b"pico says " + payload

    device.handle("echo", echo)
    await wait_event(rig.a_events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
    new.release_slave()
    assert await rig.b.request(DEVICE, "echo", b"back", timeout=2, wait_s=2) == b"pico says back"


async def test_device_row_reports_liveness_each_way(rig: Rig) -> None:
    await wait_until(lambda: any(p.ip == DEVICE and p.rtt_s is not None for p in rig.a.peers()))
    [row] = [p for p in rig.a.peers() if p.ip == DEVICE]
    assert row.our_pings_answered and row.their_frames_arriving
    assert row.last_heard_s is not None and row.last_heard_s < 0.4
    assert row.bytes_in > 0 and row.bytes_out > 0


async def test_node_restart_resyncs_the_device(make_config: Any, tmp_path: Path) -> None:
    pty = PtyPair()
    sim = SimulatedDevice("pico-1", pty, **FAST)
    timing = dict(serial_keepalive_interval_s=0.1, serial_keepalive_timeout_s=0.4)
    config = make_config("a", "127.0.0.2", serial_ports=[(pty.path, 115200)], **timing)
    try:
        async with Node(config) as first:
            events = first.events()
            device = await sim.start()
            await wait_event(events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
        # The node restarts (a new link epoch); the device keeps running.
        async with Node(config) as second:
            events = second.events()
            await wait_event(events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
            await device.wait_up()
            with second.subscribe("temp") as temps:
                await device.publish("temp", b"after restart")
                with anyio.fail_after(2):
                    assert (await temps.receive()).payload == b"after restart"
    finally:
        await sim.aclose()


async def test_two_ports_bridge_two_devices(make_config: Any) -> None:
    sims = [SimulatedDevice(name, **FAST) for name in ("pico-1", "esp32-1")]
    ports = [(sim.pty.path, 115200) for sim in sims]
    config = make_config("a", "127.0.0.2", serial_ports=ports, serial_keepalive_interval_s=0.1)
    try:
        async with Node(config) as a:
            events = a.events()
            for sim in sims:
                await sim.start()
            seen: set[str] = set()
            while len(seen) < 2:
                event = await wait_event(events, lambda e: isinstance(e, PeerUp))
                seen.add(event.peer)
            assert seen == {"127.0.0.2/pico-1", "127.0.0.2/esp32-1"}
            assert [p.ip for p in a.peers()] == ["127.0.0.2/esp32-1", "127.0.0.2/pico-1"]
    finally:
        for sim in sims:
            await sim.aclose()


async def test_burst_to_a_reliable_device_waits_for_room_and_loses_nothing(
    make_config: Any,
) -> None:
    sim = SimulatedDevice("pico-1", reliable=True, **FAST)
    config = make_config(
        "a",
        "127.0.0.2",
        serial_ports=[(sim.pty.path, 115200)],
        serial_reliable=True,
        serial_keepalive_interval_s=0.1,
        serial_keepalive_timeout_s=0.4,
    )
    received: list[bytes] = []
    try:
        async with Node(config) as a:
            events = a.events()
            device = await sim.start()
            device.on_message("burst", lambda topic, payload: received.append(payload))
            await wait_event(events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
            # Far more than the link's window (4) and queue (8) take at once.
            for i in range(40):
                await a.send(DEVICE, "burst", b"%02d" % i)
            await wait_until(lambda: len(received) == 40)
            assert received == [b"%02d" % i for i in range(40)]
            assert a.stats()["device_messages_lost"] == 0
    finally:
        await sim.aclose()
