# examples/two_nodes.py: run it as it is, python examples/two_nodes.py
"""Two nodes: keys, trust, a message, a request, a subscription that ends.

Both run here, on two loopback addresses. On two boards, each runs one of
them, on its own address, with the other's as its peer.
"""

import logging
import tempfile
from pathlib import Path

import anyio

from edgenode import Node, NodeConfig
from edgenode.identity import create_identity
from edgenode.trust import add_authorised

SENSOR_IP, HUB_IP = "127.0.0.2", "127.0.0.3"  # on two boards: their own addresses


async def temperature(request):  # the sensor answers requests on a topic
    return b"21.5"


async def main(state: Path) -> None:
    # 1. Each node has a key, made once (edgenode keygen --state-dir DIR) ...
    sensor_id = create_identity(state / "sensor").node_id
    hub_id = create_identity(state / "hub").node_id
    # ... and trusts the other (edgenode authorise OTHER_ID --state-dir DIR).
    add_authorised(state / "sensor" / "authorised_nodes", hub_id)
    add_authorised(state / "hub" / "authorised_nodes", sensor_id)

    # 2. Port 0 picks a free port; on two boards, leave the default, 7300.
    sensor_config = NodeConfig(state_dir=state / "sensor", listen_host=SENSOR_IP, listen_port=0)
    async with Node(sensor_config) as sensor:
        sensor.handle("sensors/temperature", temperature)
        hub_config = NodeConfig(
            state_dir=state / "hub",
            listen_host=HUB_IP,
            listen_port=0,
            peers=[(SENSOR_IP, sensor.listen_port)],  # the hub dials the sensor
        )
        async with Node(hub_config) as hub:
            with sensor.subscribe("alerts/#") as alerts:  # or "#" for every topic
                # 3. The first send waits (up to 10 s) for the sensor to be up.
                await hub.send(SENSOR_IP, "alerts/door", b"open", wait_s=10)
                await hub.send(SENSOR_IP, "alerts/door", b"closed")
                await hub.send(SENSOR_IP, "alerts/end", b"")

                # 4. A request, answered by the sensor's handler.
                reply = await hub.request(SENSOR_IP, "sensors/temperature", b"", timeout=5)
                print("the sensor's temperature:", reply.decode())

                # 5. A subscription is endless: this one ends at alerts/end.
                async for message in alerts:
                    if message.topic == "alerts/end":
                        break
                    text = message.payload.decode()
                    print(f"the sensor got {message.topic} {text!r} from {message.peer}")

            for row in hub.peers():  # the hub's peer table, now
                print(f"the hub sees {row.ip}: {row.state}, node {row.node_id}")


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # the nodes' warnings
    with tempfile.TemporaryDirectory() as state:
        anyio.run(main, Path(state))
