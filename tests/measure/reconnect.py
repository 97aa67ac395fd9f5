"""How soon a node reaches a peer again after the peer's short outages (issue 15, item 3).

A (127.0.0.2) has B (127.0.0.3) configured; B does not dial A, so only A's
redials count. Default timings (keepalive 5 s / 15 s, backoff 0.5 s to
30 s). Each cycle: B is up and the link lives 1.5-3 s; B stops (saying
bye) and stays away 0.5-4 s; B starts again on the same port. Measured:
from B listening again to A's PeerUp. Prints, as JSON, the median, p90
and maximum::

    python -m tests.measure.reconnect [CYCLES [SEED]]
"""

from __future__ import annotations

import json
import math
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

import edgenode
from edgenode.config import NodeConfig
from edgenode.identity import create_identity
from edgenode.node import Node, PeerDown, PeerUp


async def measure(cycles: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="reconnect-"))
    a, b = create_identity(work / "a"), create_identity(work / "b")
    with socket.socket() as probe:
        probe.bind(("127.0.0.3", 0))
        port_b = probe.getsockname()[1]
    common: dict[str, object] = dict(
        authorised=frozenset({a.node_id, b.node_id}), remember_peers=False
    )
    config_b = NodeConfig(
        state_dir=b.state_dir, listen_host="127.0.0.3", listen_port=port_b, **common
    )
    config_a = NodeConfig(
        state_dir=a.state_dir,
        listen_host="127.0.0.2",
        listen_port=0,
        peers=[("127.0.0.3", port_b)],
        **common,
    )
    times = []
    async with Node(config_a) as node:
        events = node.events()
        for _ in range(cycles):
            async with Node(config_b):
                back = time.monotonic()
                while not isinstance(await events.receive(), PeerUp):
                    pass
                times.append(time.monotonic() - back)
                await anyio.sleep(rng.uniform(1.5, 3.0))  # the link lives
            while not isinstance(await events.receive(), PeerDown):
                pass
            await anyio.sleep(rng.uniform(0.5, 4.0))  # B is away
    times.sort()
    return {
        "code": edgenode.__file__,
        "cycles": cycles,
        "median_s": round(statistics.median(times), 2),
        "p90_s": round(times[math.ceil(len(times) * 0.9) - 1], 2),
        "max_s": round(times[-1], 2),
        "all": [round(t, 2) for t in times],
    }


def main() -> None:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    print(json.dumps(anyio.run(measure, cycles, seed)))


if __name__ == "__main__":
    main()
