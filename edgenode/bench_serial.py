"""``edgenode bench``'s serial section: the UART link's framing and the bridge's message rates.

Framing efficiency: payload bytes / bytes on the wire, computed from real
encoded frames.

Message rates, as a user gets them: a real :class:`Node` at default
settings (its subscriber a default ``subscribe()``, its sender a loop of
``await node.send()``) bridges the real ``firmware_bridge`` driver on the
other side of a real pseudo-terminal (edgenode.simdevice), both in this
process. Each run sends N messages each way and checks that every one
arrived exactly once and in order (a sequence number in each payload), or,
in unreliable mode, counts what was lost:

- reliable mode (``serial_reliable``, the device ``reliable=True``), each
  way: the figure;
- unreliable mode, each way, with what it lost;
- the same-run reference: the same frames' bytes through the same kind of
  pseudo-terminal, written by the device's asyncio writer and read by the
  node's serial transport, with no link, node or driver: what the pty and
  one Python event loop can carry.

Each figure is the median of the runs with its range. A pseudo-terminal
moves bytes as fast as the CPU allows, so these are the software's rates,
not a UART's: at 115200 baud a line carries at most 11 520 bytes/s, which
the table converts for scale.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import anyio

from firmware_bridge.link import Link

PAYLOAD_SIZES = (16, 64, 200)
EFFICIENCY_TARGET = 0.95  # at 200-byte payloads (issue: serial bridge)
TOPIC = "seq"
_RUN_BOUND_S = 300.0  # a hang guard for one run, on a slow board


def _link_pair() -> tuple[Link, Link, int]:
    """A device and a host link joined in memory, session up."""
    device = Link("device", "bench", 1)
    host = Link("host", "host", 2)
    now = 0
    device.start(now)
    host.start(now)
    for _ in range(4):
        host.receive_bytes(device.bytes_to_send(), now)
        device.receive_bytes(host.bytes_to_send(), now)
    assert device.is_up and host.is_up
    return device, host, now


def framing_efficiency(topic: str = "t") -> dict[int, dict[str, float]]:
    """Payload bytes / wire bytes of one data frame, per payload size."""
    device, _, now = _link_pair()
    figures = {}
    for size in PAYLOAD_SIZES:
        payload = bytes((i * 7 + 1) % 256 for i in range(size))  # no run of zeros
        device.send_data(topic, payload, now)
        wire = len(device.bytes_to_send())
        figures[size] = {"payload_bytes": size, "wire_bytes": wire, "efficiency": size / wire}
    return figures


def _payload(i: int, size: int) -> bytes:
    return i.to_bytes(4, "big") + bytes(max(0, size - 4))


def _wire_bytes(payload_bytes: int) -> bytes:
    """One data frame on the wire, as the device sends it in unreliable mode."""
    device, _, now = _link_pair()
    device.send_data(TOPIC, _payload(1, payload_bytes), now)
    return device.bytes_to_send()


async def _bridge_once(
    messages: int, payload_bytes: int, state_dir: str, reliable: bool
) -> dict[str, float]:
    """One run through a node's bridge: rates each way, and what was lost."""
    from .config import NodeConfig
    from .identity import load_or_create_identity
    from .node import Node
    from .simdevice import SimulatedDevice

    identity = load_or_create_identity(state_dir)
    sim = SimulatedDevice("bench", reliable=reliable)
    config = NodeConfig(
        state_dir=state_dir,
        listen_host="127.0.0.2",
        listen_port=0,
        authorised=frozenset(),
        serial_ports=[(sim.pty.path, 115200)],
        serial_reliable=reliable,
    )
    figures: dict[str, float] = {}
    try:
        async with Node(config, identity=identity) as node:
            events = node.events()
            device = await sim.start()
            with anyio.fail_after(30):
                while not getattr(await events.receive(), "peer", "").endswith("/bench"):
                    pass
                await device.wait_up()
            sim.pty.release_slave()
            with anyio.fail_after(_RUN_BOUND_S):
                figures.update(await _device_to_node(node, device, messages, payload_bytes))
                figures.update(await _node_to_device(node, device, messages, payload_bytes))
            figures["retransmits"] = device.stats["retransmits"]
            figures["held_back"] = device.stats["held_back"]
            port = node.stats()["serial_ports"][0]
            figures["retransmits"] += port["retransmits"]
            figures["held_back"] += port["held_back"]
    finally:
        await sim.aclose()
    return figures


async def _device_to_node(
    node: Any, device: Any, messages: int, payload_bytes: int
) -> dict[str, float]:
    """The device publishes as fast as ``publish()`` returns; a default
    subscriber takes them, until each has arrived or (unreliable mode) was
    counted as lost by the node."""
    port = node.bridge.ports[0]
    lost_before = port.undelivered
    received = last = 0
    with node.subscribe(TOPIC) as sub:
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:

            async def produce() -> None:
                for i in range(messages):
                    await device.publish(TOPIC, _payload(i, payload_bytes))

            tg.start_soon(produce)
            while received + port.undelivered - lost_before < messages:
                try:
                    msg = sub.receive_nowait()
                except anyio.WouldBlock:
                    msg = None
                    # Unreliable mode: the rest may have been lost meanwhile.
                    with anyio.move_on_after(0.05):
                        msg = await sub.receive()
                    if msg is None:
                        continue
                last = _check(msg.payload, last, "device to node")
                received += 1
        elapsed = time.perf_counter() - started
    lost = port.undelivered - lost_before
    return {"device_to_node": received / elapsed, "device_to_node_lost": lost}


def _check(payload: bytes, expected_at_least: int, way: str) -> int:
    """The next count after a message: each arrives at most once, in order."""
    seq = int.from_bytes(payload[:4], "big")
    if seq < expected_at_least:
        raise AssertionError(f"{way}: message {seq} again or out of order")
    return seq + 1


async def _node_to_device(
    node: Any, device: Any, messages: int, payload_bytes: int
) -> dict[str, float]:
    """``node.send()`` to the device in a loop; the device's callback counts."""
    address = node.device_address("bench")
    got = [0]
    done = anyio.Event()

    def on_seq(topic: str, payload: bytes) -> None:
        got[0] = _check(payload, got[0], "node to device")
        if got[0] == messages:
            done.set()

    device.on_message(TOPIC, on_seq)
    started = time.perf_counter()
    for i in range(messages):
        await node.send(address, TOPIC, _payload(i, payload_bytes))
    await done.wait()
    return {"node_to_device": messages / (time.perf_counter() - started)}


async def _reference_once(messages: int, payload_bytes: int) -> dict[str, float]:
    """The same frames' bytes through a pty each way, with no link, node or driver."""
    from .simdevice import PtyPair, open_streams
    from .transports.serial import SerialPort

    frame = _wire_bytes(payload_bytes)
    total = len(frame) * messages
    pty = PtyPair()
    port = SerialPort.open(pty.path, 115200)
    pty.release_slave()
    reader, writer, read_transport = await open_streams(pty.master)
    figures = {}
    try:
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:

            async def write_frames() -> None:
                for _ in range(messages):  # one write per frame, as the driver does
                    writer.write(frame)
                    await writer.drain()

            tg.start_soon(write_frames)
            got = 0
            while got < total:
                got += len(await port.receive())
        figures["device_to_node"] = messages / (time.perf_counter() - started)
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:

            async def send_frames() -> None:
                for _ in range(messages):
                    await port.send(frame)

            tg.start_soon(send_frames)
            got = 0
            while got < total:
                got += len(await reader.read(65536))
        figures["node_to_device"] = messages / (time.perf_counter() - started)
    finally:
        port.close()
        read_transport.close()
        writer.transport.close()
        await anyio.sleep(0)
        pty.close()
    return figures


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def serial_figures(runs: int, messages: int, payload_bytes: int = 64) -> dict[str, Any]:
    """Framing efficiency, and message rates each way: reliable and unreliable
    mode through a node's bridge, and the same-run pty reference."""
    efficiency = framing_efficiency()
    modes: dict[str, list[dict[str, float]]] = {"reliable": [], "unreliable": [], "reference": []}
    with tempfile.TemporaryDirectory() as state_dir:
        for _ in range(runs):  # interleaved, so that a busy moment hits all three alike
            modes["reliable"].append(
                anyio.run(_bridge_once, messages, payload_bytes, state_dir, True)
            )
            modes["unreliable"].append(
                anyio.run(_bridge_once, messages, payload_bytes, state_dir, False)
            )
            modes["reference"].append(anyio.run(_reference_once, messages, payload_bytes))
    rates: dict[str, Any] = {}
    for mode, results in modes.items():
        rates[mode] = {
            way: _spread([r[way] for r in results]) for way in ("device_to_node", "node_to_device")
        }
        if mode != "reference":
            rates[mode]["device_to_node_lost"] = sum(r["device_to_node_lost"] for r in results)
            rates[mode]["retransmits"] = sum(r["retransmits"] for r in results)
            rates[mode]["held_back"] = sum(r["held_back"] for r in results)
    wire = len(_wire_bytes(payload_bytes))
    return {
        "framing_efficiency": efficiency,
        "rates": rates,
        "runs": runs,
        "messages": messages,
        "payload_bytes": payload_bytes,
        "wire_bytes": wire,
        "uart_115200_msgs_per_s": 11520 / wire,
    }


def print_serial_tables(serial: dict[str, Any]) -> None:
    """``edgenode bench``'s serial tables."""
    print("serial link framing (unreliable, unauthenticated, 1-byte topic)")
    print(f"  {'payload':>8} {'on the wire':>12} {'efficiency':>11}")
    for size, fig in serial["framing_efficiency"].items():
        mark = ""
        if int(size) == 200:
            ok = fig["efficiency"] >= EFFICIENCY_TARGET
            mark = f"   target >= {EFFICIENCY_TARGET:.0%}: {'met' if ok else 'MISSED'}"
        print(f"  {size:>6} B {fig['wire_bytes']:>10} B {fig['efficiency']:>10.1%}{mark}")
    print()
    print(
        f"serial bridge over a pseudo-terminal, default settings, {serial['payload_bytes']}-byte "
        f"payloads, {serial['messages']:,} messages each way x {serial['runs']} runs "
        "(msg/s: median, range)"
    )
    rates = serial["rates"]
    reference = rates["reference"]
    print(f"  {'':<22} {'device -> node':>30} {'node -> device':>30}")
    for mode in ("reliable", "unreliable", "reference"):
        cells = []
        for way in ("device_to_node", "node_to_device"):
            fig = rates[mode][way]
            cell = f"{fig['median']:,.0f} ({fig['min']:,.0f}-{fig['max']:,.0f})"
            if mode != "reference":
                cell += f" {fig['median'] / reference[way]['median']:.2f}x"
            cells.append(cell)
        name = {"reference": "reference (pty only)"}.get(mode, mode)
        print(f"  {name:<22} {cells[0]:>30} {cells[1]:>30}")
    for mode in ("reliable", "unreliable"):
        fig = rates[mode]
        print(
            f"  {mode}: lost device -> node {fig['device_to_node_lost']:,}, "
            f"retransmitted {fig['retransmits']:,}, held back {fig['held_back']:,} (all runs)"
        )
    print(
        f"  for scale: a 115200-baud UART carries at most "
        f"{serial['uart_115200_msgs_per_s']:,.0f} such {serial['wire_bytes']}-byte frames/s"
    )
