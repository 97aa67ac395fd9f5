"""Measure reliable mode's message rate through a node's serial bridge over a real pty.

    .venv/bin/python -m tests.firmware_bridge.pty_rate [--messages N] [--runs R] [--payload B]

A real ``Node`` (default settings, plus ``serial_reliable``) bridges a
simulated device (``firmware_bridge.driver.Device`` on the master side of a
pseudo-terminal, in this process's event loop, as edgenode.simdevice runs
it). Device to host: the device publishes N messages as fast as
``publish()`` returns, a default ``subscribe()`` consumer counts them.
Host to device: ``node.send()`` to the device N times, the device's
callback counts them. Each run checks exactly once and in order (a sequence
number in each payload). Prints the median rate and the spread per
direction. A measurement, not a test (timing figures live in benchmarks).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import anyio

MESSAGES = 2000


async def _once(
    messages: int, payload_bytes: int, state_dir: str, reliable: bool
) -> tuple[float, float]:
    from edgenode.config import NodeConfig
    from edgenode.identity import load_or_create_identity
    from edgenode.node import Node
    from edgenode.simdevice import SimulatedDevice

    identity = load_or_create_identity(state_dir)
    sim = SimulatedDevice("rate", reliable=reliable)
    config = NodeConfig(
        state_dir=state_dir,
        listen_host="127.0.0.2",
        listen_port=0,
        authorised=frozenset(),
        serial_ports=[(sim.pty.path, 115200)],
        serial_reliable=reliable,
        subscription_buffer=messages + 16,
    )
    pad = bytes(max(0, payload_bytes - 4))
    async with Node(config, identity=identity) as node:
        events = node.events()
        device = await sim.start()
        with anyio.fail_after(10):
            while True:
                event = await events.receive()
                if getattr(event, "peer", "").endswith("/rate"):
                    break
        sim.pty.release_slave()
        await device.wait_up()
        address = node.device_address("rate")

        # Device to host.
        with node.subscribe("up") as sub:
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:

                async def produce() -> None:
                    for i in range(messages):
                        await device.publish("up", i.to_bytes(4, "big") + pad)

                tg.start_soon(produce)
                with anyio.fail_after(120):
                    for i in range(messages):
                        msg = await sub.receive()
                        seq = int.from_bytes(msg.payload[:4], "big")
                        if seq != i:
                            raise AssertionError(f"device to host: got {seq}, expected {i}")
            up_rate = messages / (time.perf_counter() - started)

        # Host to device.
        got: list[int] = []
        done = anyio.Event()

        def on_down(topic: str, payload: bytes) -> None:
            got.append(int.from_bytes(payload[:4], "big"))
            if len(got) == messages:
                done.set()

        device.on_message("down", on_down)
        started = time.perf_counter()
        for i in range(messages):
            await node.send(address, "down", i.to_bytes(4, "big") + pad)
        with anyio.fail_after(120):
            await done.wait()
        down_rate = messages / (time.perf_counter() - started)
        if got != list(range(messages)):
            raise AssertionError("host to device: not every message exactly once and in order")
        stats = device.stats
        print(f"  device: retransmits {stats['retransmits']}, dropped {stats['dropped']}")
        await sim.aclose()
    return up_rate, down_rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--payload", type=int, default=64, help="payload bytes (>= 4)")
    parser.add_argument("--plain", action="store_true", help="unreliable mode, for reference")
    args = parser.parse_args(argv)
    ups, downs = [], []
    with tempfile.TemporaryDirectory() as state_dir:
        for _ in range(args.runs):
            up, down = anyio.run(
                _once, args.messages, args.payload, state_dir, not args.plain, backend="asyncio"
            )
            ups.append(up)
            downs.append(down)
    for name, rates in (("device -> host", ups), ("host -> device", downs)):
        print(
            f"{name}: median {statistics.median(rates):.0f} msg/s "
            f"(min {min(rates):.0f}, max {max(rates):.0f}; {args.runs} runs of "
            f"{args.messages} messages of {args.payload} bytes, "
            f"{'plain' if args.plain else 'reliable'} mode, default settings)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
