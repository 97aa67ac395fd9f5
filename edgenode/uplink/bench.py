"""``edgenode bench --only uplink``: messages through the uplink and a local Mosquitto.

Never imported by a running node. A Mosquitto on a loopback port (plain
MQTT, no TLS), one subscriber (a paho-mqtt client in its own thread,
subscribed at QoS 1) that times each arrival, and two publishers of the
same messages, measured in the same run:

* **the uplink**: a node at default settings with an ``out`` map at QoS 1;
  the application calls ``publish_local()`` (as a peer's message would
  arrive) and the uplink takes it from there;
* **the reference**: paho-mqtt publishing the same messages straight to
  the broker at QoS 1, with the same window of messages in flight, from
  its own network thread (``loop_start``), as an application without
  edgenode would.

Figures: the delivered rate of a burst (messages a second from the first
publish to the last arrival) and the added latency of single messages
(publish to arrival, one at a time, p50 and p99). Each is the median of
the runs, with their spread.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from .brokers import BrokerError, Mosquitto, find_program

PAYLOAD_BYTES = 64
TOPIC = "bench/uplink"
_WAIT_S = 60.0


class _Subscriber:
    """A paho client in its own thread that records when each message arrives."""

    def __init__(self, url_port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.arrivals: list[float] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-subscriber")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(TOPIC, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", url_port, keepalive=30)
        self.client.loop_start()
        if not self._ready.wait(_WAIT_S):
            raise BrokerError("bench subscriber: no SUBACK from the broker")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._cond:
            self.arrivals.append(time.perf_counter())
            self._cond.notify_all()

    def reset(self) -> None:
        with self._cond:
            self.arrivals.clear()

    def wait_for(self, count: int) -> float:
        """Block until ``count`` messages arrived; return the last arrival time."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.arrivals) >= count, _WAIT_S):
                raise BrokerError(f"bench: {len(self.arrivals)} of {count} messages arrived")
            return self.arrivals[count - 1]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _reference(
    port: int, subscriber: _Subscriber, messages: int, singles: int
) -> tuple[float, list[float]]:
    """paho publishing straight to the broker: (burst rate, single-message latencies)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from .client import MAX_INFLIGHT

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-reference")
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    payload = b"x" * PAYLOAD_BYTES
    try:
        subscriber.reset()
        started = time.perf_counter()
        for _ in range(messages):
            client.publish(TOPIC, payload, qos=1)
        rate = messages / (subscriber.wait_for(messages) - started)
        latencies = []
        for _ in range(singles):
            subscriber.reset()
            sent = time.perf_counter()
            client.publish(TOPIC, payload, qos=1)
            latencies.append(subscriber.wait_for(1) - sent)
    finally:
        client.disconnect()
        client.loop_stop()
    return rate, latencies


async def _through_uplink(
    port: int, subscriber: _Subscriber, messages: int, singles: int, state_dir: str
) -> tuple[float, list[float]]:
    """The same messages through a node's uplink at default settings."""
    from ..config import NodeConfig
    from ..identity import load_or_create_identity
    from ..node import Node
    from .config import OutMap, UplinkConfig

    identity = load_or_create_identity(state_dir)
    uplink = UplinkConfig(broker=f"mqtt://127.0.0.1:{port}", outbound=(OutMap("bench", to=TOPIC),))
    config = NodeConfig(
        state_dir=Path(state_dir),
        listen_host="127.0.0.2",
        listen_port=0,
        authorised=frozenset(),
        uplink=uplink,
    )
    payload = b"x" * PAYLOAD_BYTES
    async with Node(config, identity=identity) as node:
        with anyio.fail_after(_WAIT_S):
            while node.uplink.state != "connected":
                await anyio.sleep(0.01)
        subscriber.reset()
        started = time.perf_counter()
        for _ in range(messages):
            await node.publish_local("bench", payload, source="bench")
            # Let the uplink's subscription task run, as between a peer's reads:
            # today's publish_local() does not wait for room (issue 10 adds that).
            await anyio.lowlevel.checkpoint()
        last = await anyio.to_thread.run_sync(subscriber.wait_for, messages)
        rate = messages / (last - started)
        latencies = []
        for _ in range(singles):
            subscriber.reset()
            sent = time.perf_counter()
            await node.publish_local("bench", payload, source="bench")
            latencies.append(await anyio.to_thread.run_sync(subscriber.wait_for, 1) - sent)
    return rate, latencies


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def uplink_figures(runs: int, quick: bool) -> dict[str, Any]:
    """Run the uplink benchmark; a dict with ``skipped`` when it cannot run here."""
    if find_program("mosquitto") is None:
        return {"skipped": "mosquitto is not installed (Debian package mosquitto)"}
    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        return {"skipped": "paho-mqtt is not installed (pip install 'edgenode[mqtt]')"}
    messages, singles = (500, 50) if quick else (5000, 200)
    result: dict[str, Any] = {"messages": messages, "singles": singles, "runs": runs}
    result["payload_bytes"] = PAYLOAD_BYTES
    rates: dict[str, list[float]] = {"uplink": [], "reference": []}
    p50s: dict[str, list[float]] = {"uplink": [], "reference": []}
    p99s: dict[str, list[float]] = {"uplink": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        with Mosquitto(Path(tmp) / "mosquitto") as broker:
            subscriber = _Subscriber(broker.port)
            try:
                for run in range(runs):
                    # Alternate which goes first, so neither always meets a warm broker.
                    order = ("uplink", "reference") if run % 2 == 0 else ("reference", "uplink")
                    for side in order:
                        if side == "uplink":
                            state = str(Path(tmp) / "node")
                            rate, lat = anyio.run(
                                _through_uplink, broker.port, subscriber, messages, singles, state
                            )
                        else:
                            rate, lat = _reference(broker.port, subscriber, messages, singles)
                        rates[side].append(rate)
                        p50s[side].append(_percentile(lat, 0.5) * 1000)
                        p99s[side].append(_percentile(lat, 0.99) * 1000)
            finally:
                subscriber.close()
    for side in ("uplink", "reference"):
        result[side] = {
            "msgs_per_s": _spread(rates[side]),
            "latency_p50_ms": _spread(p50s[side]),
            "latency_p99_ms": _spread(p99s[side]),
        }
    result["rate_ratio"] = result["uplink"]["msgs_per_s"]["median"] / max(
        1e-9, result["reference"]["msgs_per_s"]["median"]
    )
    result["added_latency_p50_ms"] = (
        result["uplink"]["latency_p50_ms"]["median"]
        - result["reference"]["latency_p50_ms"]["median"]
    )
    return result


def print_uplink_table(figures: dict[str, Any]) -> None:
    """The uplink's lines in ``edgenode bench``."""
    if "skipped" in figures:
        print(f"uplink: not measured: {figures['skipped']}")
        return
    print(
        f"uplink through a local Mosquitto (plain MQTT, QoS 1, {figures['payload_bytes']}-byte "
        f"payloads; {figures['messages']} per burst, {figures['singles']} single messages, "
        f"{figures['runs']} runs)"
    )
    print(f"  {'':<28} {'burst msg/s':>24} {'latency p50 ms':>22} {'latency p99 ms':>22}")
    for side, label in (
        ("uplink", "node -> uplink -> broker"),
        ("reference", "paho -> broker (reference)"),
    ):
        fig = figures[side]
        rate, p50, p99 = fig["msgs_per_s"], fig["latency_p50_ms"], fig["latency_p99_ms"]
        print(
            f"  {label:<28} {rate['median']:>8,.0f} ({rate['min']:,.0f}-{rate['max']:,.0f})"
            f" {p50['median']:>8.2f} ({p50['min']:.2f}-{p50['max']:.2f})"
            f" {p99['median']:>8.2f} ({p99['min']:.2f}-{p99['max']:.2f})"
        )
    print(
        f"  uplink / reference rate: {figures['rate_ratio']:.2f}x; "
        f"added latency p50: {figures['added_latency_p50_ms']:+.2f} ms"
    )
