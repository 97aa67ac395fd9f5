"""Delivery through the serial bridge: exactly once, in order, with backpressure.

The node (127.0.0.2) opens the slave side of a real pseudo-terminal with
pyserial; the real ``firmware_bridge.driver.Device`` runs on the master side
through ``firmware_bridge.tty``'s streams (the ones a Linux board's driver
uses), in this process's event loop. docs/architecture.md, "Bridged
devices", says what each test checks. Nothing here waits for time: every
wait is for an event or a count, with a bound that holds on a board ten
times slower.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tty
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from edgenode.errors import SubscriberStalled
from edgenode.node import Node, PeerDown, PeerUp
from firmware_bridge.driver import Device
from firmware_bridge.link import Link
from firmware_bridge.tty import TTYReader, TTYWriter

from .conftest import wait_event, wait_until

pytestmark = pytest.mark.anyio

DEVICE = "127.0.0.2/pico-1"
#: A hang guard for 100,000 messages on a board ten times slower than this
#: machine (about 10,000 messages/s each way here).
VOLUME_BOUND_S = 500.0
VOLUME = 100_000


class TtyDevice:
    """The real driver on a pseudo-terminal's master, through firmware_bridge.tty's streams."""

    def __init__(self, device_id: str = "pico-1", **device_kw: Any) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)  # or the line discipline would echo bytes back
        self.path = os.ttyname(slave)
        self._slave: int | None = slave  # held until the node has the port
        os.set_blocking(self.master, False)
        self.writer = TTYWriter(self.master)
        # Made in the running loop (Python 3.9 binds asyncio's Event and Lock to it).
        self.device = Device(TTYReader(self.master), self.writer, device_id, **device_kw)
        self.task = asyncio.get_running_loop().create_task(self.device.run())

    def release_slave(self) -> None:
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None

    async def aclose(self) -> None:
        self.device.close()
        try:
            await asyncio.wait_for(self.task, 10)
        except (asyncio.CancelledError, Exception):
            pass
        self.release_slave()
        self.writer.close()


class Rig:
    def __init__(self, node: Node, line: TtyDevice, events: Any) -> None:
        self.node, self.line, self.events = node, line, events

    @property
    def device(self) -> Device:
        return self.line.device

    @property
    def link(self) -> Link:
        assert self.node.bridge is not None and self.node.bridge.ports[0].link is not None
        return self.node.bridge.ports[0].link

    def port_row(self) -> dict[str, Any]:
        [row] = self.node.stats()["serial_ports"]
        return row  # type: ignore[no-any-return]

    def device_downs(self) -> int:
        """PeerDown events for the device so far (the stream is drained)."""
        downs = 0
        while True:
            try:
                event = self.events.receive_nowait()
            except anyio.WouldBlock:
                return downs
            if isinstance(event, PeerDown) and event.peer == DEVICE:
                downs += 1


@asynccontextmanager
async def bridged(
    make_config: Any, *, reliable: bool = True, device_kw: Any = None, **overrides: Any
) -> AsyncIterator[Rig]:
    """A node with the device up on its one port, at the serial link's defaults."""
    line = TtyDevice(reliable=reliable, **(device_kw or {}))
    config = make_config(
        "a", "127.0.0.2", serial_ports=[(line.path, 115200)], serial_reliable=reliable, **overrides
    )
    try:
        async with Node(config) as node:
            events = node.events()
            await wait_event(events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
            with anyio.fail_after(10):
                await line.device.wait_up()
            line.release_slave()
            yield Rig(node, line, events)
    finally:
        await line.aclose()


def numbered(i: int, size: int = 16) -> bytes:
    return i.to_bytes(4, "big") + bytes(size - 4)


def number(payload: bytes) -> int:
    return int.from_bytes(payload[:4], "big")


# -- at volume ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(VOLUME_BOUND_S + 60)
async def test_100k_messages_device_to_node_each_once_in_order(make_config: Any) -> None:
    """Reliable mode at default settings, a default subscribe(): 100,000
    messages from the device, each received exactly once and in order."""
    async with bridged(make_config) as rig:
        with rig.node.subscribe("seq") as sub, anyio.fail_after(VOLUME_BOUND_S):
            async with anyio.create_task_group() as tg:

                async def produce() -> None:
                    for i in range(VOLUME + 1):  # the last one marks the end
                        await rig.device.publish("seq", numbered(i))

                tg.start_soon(produce)
                for i in range(VOLUME + 1):
                    msg = await sub.receive()
                    assert msg.peer == DEVICE
                    got = number(msg.payload)
                    if got != i:
                        raise AssertionError(f"message {i}: got {got}")
        row = rig.port_row()
        assert sub.dropped == 0 and sub.delivered == VOLUME + 1
        assert rig.node.stats()["device_messages_lost"] == 0
        assert (row["undelivered"], row["session"]) == (0, "up")
        assert set(row["drops"]) <= {"duplicate"}, row  # a resent frame, arrived twice
        assert rig.device.stats["sessions"] == 1 and rig.device_downs() == 0


@pytest.mark.slow
@pytest.mark.timeout(VOLUME_BOUND_S + 60)
async def test_100k_messages_node_to_device_each_once_in_order(make_config: Any) -> None:
    """The other way: node.send() to the device 100,000 times; the device's
    callback gets each exactly once and in order; send() waited for room
    instead of failing."""
    async with bridged(make_config) as rig:
        got: list[int] = []
        done = anyio.Event()

        def on_seq(topic: str, payload: bytes) -> None:
            i = number(payload)
            if i != len(got):
                raise AssertionError(f"message {len(got)}: got {i}")
            got.append(i)
            if i == VOLUME:
                done.set()

        rig.device.on_message("seq", on_seq)
        with anyio.fail_after(VOLUME_BOUND_S):
            for i in range(VOLUME + 1):
                await rig.node.send(DEVICE, "seq", numbered(i))
            await done.wait()
        assert len(got) == VOLUME + 1
        stats = rig.device.stats
        assert stats["callback_errors"] == 0
        assert set(stats["drops"]) <= {"duplicate"}, stats  # a resent frame, arrived twice
        assert rig.node.stats()["device_messages_lost"] == 0
        assert rig.device.stats["sessions"] == 1 and rig.device_downs() == 0


# -- slow and stuck subscribers -------------------------------------------------------------


async def test_slow_subscriber_makes_the_device_wait_and_loses_nothing(make_config: Any) -> None:
    count = 2_000
    async with bridged(make_config) as rig:
        published = 0
        with rig.node.subscribe("seq") as sub:
            async with anyio.create_task_group() as tg:

                async def produce() -> None:
                    nonlocal published
                    for i in range(count):
                        await rig.device.publish("seq", numbered(i))
                        published += 1

                tg.start_soon(produce)
                # The subscriber takes nothing until the node holds the
                # device back: its buffer, the port's queue, then the link.
                await wait_until(lambda: rig.link.stats.held_back > 0, timeout=60)
                assert published < count  # the device's publish waits
                assert sub.queued == sub._box.capacity
                with anyio.fail_after(120):
                    for i in range(count):
                        assert number((await sub.receive()).payload) == i
        # Held back, not dropped: at most a resent frame that had arrived twice.
        stats = (rig.link.stats, rig.device.stats)
        assert set(rig.link.stats.drops) <= {"duplicate"}, stats
        assert rig.device.stats["retransmits"] > 0  # it sent again what was held
        assert rig.node.stats()["device_messages_lost"] == 0
        assert rig.port_row()["undelivered"] == 0
        assert rig.device_downs() == 0 and rig.device.stats["sessions"] == 1


async def test_stuck_subscriber_is_ended_after_its_bound_and_the_device_carries_on(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscription that takes nothing for subscriber_stall_timeout_s is
    ended with SubscriberStalled (docs/architecture.md, "Delivery"); the
    device was held back meanwhile, longer than its keepalive timeout, and
    kept its session; the other subscription got everything."""
    count = 600
    overrides = dict(subscriber_stall_timeout_s=1.5, serial_keepalive_interval_s=0.1)
    overrides["serial_keepalive_timeout_s"] = 0.4
    device_kw = dict(keepalive_interval_ms=100, keepalive_timeout_ms=400)
    caplog.set_level(logging.WARNING, "edgenode")
    async with bridged(make_config, device_kw=device_kw, **overrides) as rig:
        with rig.node.subscribe("seq", buffer=8) as stuck, rig.node.subscribe("seq") as healthy:
            async with anyio.create_task_group() as tg:

                async def produce() -> None:
                    for i in range(count):
                        await rig.device.publish("seq", numbered(i))

                tg.start_soon(produce)
                with anyio.fail_after(60):
                    for i in range(count):
                        assert number((await healthy.receive()).payload) == i
            assert rig.link.stats.held_back > 0
            # The stuck one hands out what it held, then says why it ended.
            held = [number(stuck.receive_nowait().payload) for _ in range(8)]
            assert held == list(range(8))
            with pytest.raises(SubscriberStalled) as raised:
                stuck.receive_nowait()
            assert str(raised.value) == (
                "subscription to 'seq' took nothing for 1.5 s and was ended; a message "
                f"from {DEVICE} was not delivered to it"
            )
        assert rig.node.stats()["subscriptions_stalled"] == 1
        assert rig.device_downs() == 0 and rig.device.stats["sessions"] == 1
        assert any("took nothing for 1.5 s" in r.getMessage() for r in caplog.records)


async def test_unreliable_mode_counts_what_it_cannot_deliver(make_config: Any) -> None:
    """Unreliable mode cannot hold a device back: what finds the port's
    queue full is dropped and counted (per port, node-wide, in status);
    everything else arrives once, in order."""
    from edgenode.control_ops import node_status
    from edgenode.status_text import format_status

    count = 400
    async with bridged(make_config, reliable=False, subscriber_stall_timeout_s=60.0) as rig:
        with rig.node.subscribe("seq", buffer=4) as sub:
            for i in range(count):  # unreliable: publish never waits for the node
                await rig.device.publish("seq", numbered(i))
            got: list[int] = []

            def accounted() -> bool:
                while True:
                    try:
                        got.append(number(sub.receive_nowait().payload))
                    except anyio.WouldBlock:
                        return len(got) + rig.port_row()["undelivered"] >= count

            await wait_until(accounted, timeout=60)
        row = rig.port_row()
        lost = row["undelivered"]
        assert lost > 0 and len(got) + lost == count
        assert got == sorted(set(got))  # in order, once each
        assert rig.node.stats()["device_messages_lost"] == lost
        assert row["dropped"] == 0 and row["held_back"] == 0  # the line lost nothing
        text = format_status(node_status(rig.node))
        assert f"{lost:,} device messages lost" in text
        assert f"{lost:,} undelivered" in text


async def test_slow_device_application_makes_the_node_wait_and_loses_nothing(
    make_config: Any,
) -> None:
    """Node to device, reliable mode: a device whose coroutine callbacks are
    all busy holds the node's messages back in the link; the node's send()
    waits for room (for longer than the keepalive timeout) and nothing is
    refused or lost once the application catches up."""
    count = 40
    overrides = dict(serial_keepalive_interval_s=0.1, serial_keepalive_timeout_s=0.4)
    device_kw = dict(keepalive_interval_ms=100, keepalive_timeout_ms=400)
    async with bridged(make_config, device_kw=device_kw, **overrides) as rig:
        release = anyio.Event()
        got: list[int] = []

        async def slow(topic: str, payload: bytes) -> None:
            got.append(number(payload))
            await release.wait()

        rig.device.on_message("seq", slow)
        sent = 0
        async with anyio.create_task_group() as tg:

            async def send_all() -> None:
                nonlocal sent
                for i in range(count):
                    await rig.node.send(DEVICE, "seq", numbered(i))
                    sent += 1

            tg.start_soon(send_all)
            # Four callbacks run; the rest is held back; send() waits.
            await wait_until(lambda: rig.device.link.stats.held_back > 0, timeout=60)
            await wait_until(lambda: rig.link.stats.retransmits >= 8, timeout=60)
            assert got == [0, 1, 2, 3] and sent < count
            release.set()
        with anyio.fail_after(60):
            await wait_until(lambda: len(got) == count)
        assert sorted(got) == list(range(count))  # callbacks run concurrently: each once
        assert rig.device.stats["refused_busy"] == 0
        assert rig.node.stats()["device_messages_lost"] == 0
        assert rig.device_downs() == 0 and rig.device.stats["sessions"] == 1
