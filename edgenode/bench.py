"""``edgenode bench``: figures measured on this machine, not assumed.

This part measures the serial bridge: the framing efficiency of the UART
link (payload bytes / bytes on the wire, computed from real frames) and the
message rate from a device (the real firmware_bridge driver) to a node
over a real pseudo-terminal. Each rate is the median of repeated runs with
its spread. A pseudo-terminal moves bytes as fast as the CPU allows, so the
rate is an upper bound of the software, not of a UART: at 115200 baud a
line carries at most 11 520 bytes/s, which the table also converts.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import anyio

from firmware_bridge.link import Link

PAYLOAD_SIZES = (16, 64, 200)
EFFICIENCY_TARGET = 0.95  # at 200-byte payloads (issue: serial bridge)


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


async def _pty_rate_once(messages: int, payload_bytes: int, state_dir: str) -> float:
    from .config import NodeConfig
    from .identity import load_or_create_identity
    from .node import Node
    from .simdevice import SimulatedDevice

    identity = load_or_create_identity(state_dir)
    sim = SimulatedDevice("bench", keepalive_interval_ms=1000, keepalive_timeout_ms=5000)
    config = NodeConfig(
        state_dir=state_dir,
        listen_host="127.0.0.2",
        listen_port=0,
        authorised=frozenset(),
        serial_ports=[(sim.pty.path, 115200)],
        subscription_buffer=messages + 16,
        serial_keepalive_interval_s=1.0,
        serial_keepalive_timeout_s=5.0,
    )
    async with Node(config, identity=identity) as node:
        events = node.events()
        device = await sim.start()
        with anyio.fail_after(10):
            while True:
                event = await events.receive()
                if getattr(event, "peer", "").endswith("/bench"):
                    break
        sim.pty.release_slave()
        await device.wait_up()
        payload = b"x" * payload_bytes
        with node.subscribe("bench") as sub:
            started = time.perf_counter()
            received = 0
            async with anyio.create_task_group() as tg:

                async def produce() -> None:
                    for _ in range(messages):
                        await device.publish("bench", payload)

                tg.start_soon(produce)
                with anyio.fail_after(60):
                    while received < messages:
                        await sub.receive()
                        received += 1
            elapsed = time.perf_counter() - started
        await sim.aclose()
    return messages / elapsed


def pty_rate(runs: int, messages: int, payload_bytes: int) -> dict[str, Any]:
    """Messages/s from a device to a node over a pseudo-terminal: median and spread."""
    with tempfile.TemporaryDirectory() as state_dir:
        rates = [anyio.run(_pty_rate_once, messages, payload_bytes, state_dir) for _ in range(runs)]
    return {
        "payload_bytes": payload_bytes,
        "messages": messages,
        "runs": runs,
        "median_msgs_per_s": statistics.median(rates),
        "min_msgs_per_s": min(rates),
        "max_msgs_per_s": max(rates),
    }


def run_bench(runs: int = 5, messages: int = 2000, as_json: bool = False) -> int:
    """Run the serial benchmarks; print a table (or JSON). Returns the exit status."""
    logging.getLogger("edgenode").setLevel(logging.ERROR)  # the bench node needs no peers
    efficiency = framing_efficiency()
    rate = pty_rate(runs, messages, 64)
    wire_64 = efficiency[64]["wire_bytes"]
    result = {
        "machine": {
            "python": sys.version.split()[0],
            "platform": sys.platform,
            "cpus": os.cpu_count(),
        },
        "serial_framing_efficiency": efficiency,
        "serial_pty_rate": rate,
        "uart_115200_msgs_per_s_64b": 11520 / wire_64,
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    print("serial link framing (unreliable, unauthenticated, 1-byte topic)")
    print(f"  {'payload':>8} {'on the wire':>12} {'efficiency':>11}")
    for size, fig in efficiency.items():
        mark = ""
        if size == 200:
            ok = fig["efficiency"] >= EFFICIENCY_TARGET
            mark = f"   target >= {EFFICIENCY_TARGET:.0%}: {'met' if ok else 'MISSED'}"
        print(f"  {size:>6} B {fig['wire_bytes']:>10} B {fig['efficiency']:>10.1%}{mark}")
    print()
    print(
        f"device -> node over a pseudo-terminal, {rate['payload_bytes']}-byte payloads, "
        f"{rate['messages']} messages x {rate['runs']} runs"
    )
    print(
        f"  median {rate['median_msgs_per_s']:,.0f} msg/s "
        f"(min {rate['min_msgs_per_s']:,.0f}, max {rate['max_msgs_per_s']:,.0f})"
    )
    print(
        f"  for scale: a 115200-baud UART carries at most "
        f"{result['uart_115200_msgs_per_s_64b']:,.0f} such frames/s"
    )
    return 0
