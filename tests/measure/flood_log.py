"""Log lines a minute a node writes under the mixed flood from 20 addresses (issue 15, item 1).

Node A (127.0.0.2, default settings) with its peer B (127.0.0.3) connected,
in this process; ``PARALLEL`` loops of the mixed flood
(:func:`edgenode.testing.flood_attack.run_flood`: connect-and-close, stalls
before, inside the preamble and inside TLS, oversized preambles) from
127.0.0.100-119 for ``SECONDS``; then the handshake timeout for the last
stalls. Prints, as JSON, A's log lines in that time, a minute's worth,
and the refusals A counted::

    python -m tests.measure.flood_log [SECONDS [PARALLEL]]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import anyio

import edgenode
from edgenode.config import NodeConfig
from edgenode.identity import create_identity
from edgenode.logs import setup_logging
from edgenode.node import Node, PeerUp
from edgenode.testing.flood_attack import run_flood

SOURCES = [f"127.0.0.{100 + i}" for i in range(20)]


async def measure(seconds: float, parallel: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="flood-log-"))
    a, b = create_identity(work / "a"), create_identity(work / "b")
    log_path = work / "a.log"
    with open(log_path, "w") as log_file:
        handler = setup_logging("info", stream=log_file)
        handler.addFilter(lambda record: record.name.startswith("edgenode.node"))
        common: dict[str, object] = dict(
            authorised=frozenset({a.node_id, b.node_id}), remember_peers=False, listen_port=0
        )
        config_a = NodeConfig(state_dir=a.state_dir, listen_host="127.0.0.2", **common)
        async with Node(config_a) as node:
            events = node.events()
            peers = [("127.0.0.2", node.listen_port)]
            config_b = NodeConfig(
                state_dir=b.state_dir, listen_host="127.0.0.3", peers=peers, **common
            )
            async with Node(config_b):
                while not isinstance(await events.receive(), PeerUp):
                    pass
                log_file.flush()
                before = log_path.read_text().count("\n")
                started = time.monotonic()

                async def flood() -> None:
                    while True:
                        await run_flood(
                            "mixed",
                            "127.0.0.2",
                            node.listen_port,
                            source_ips=SOURCES,
                            count=200,
                            concurrency=100,
                            hold_s=node.config.handshake_timeout_s + 1,
                            cert_der=b.cert_der,
                        )

                with anyio.move_on_after(seconds):
                    async with anyio.create_task_group() as tg:
                        for _ in range(parallel):
                            tg.start_soon(flood)
                # The last stalls time out; the last summary is written.
                await anyio.sleep(node.config.handshake_timeout_s + 1)
                elapsed = time.monotonic() - started
                log_file.flush()
                lines = log_path.read_text().splitlines()[before:]
                refusals = getattr(node, "refusals", None)
                return {
                    "code": edgenode.__file__,
                    "seconds": round(elapsed, 1),
                    "lines": len(lines),
                    "lines_a_minute": round(len(lines) * 60 / elapsed),
                    "refusals_counted": None if refusals is None else refusals.total,
                    "refused_connections_stat": node.stats()["refused_connections"],
                    "last_lines": lines[-2:],
                }


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    parallel = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    print(json.dumps(anyio.run(measure, seconds, parallel)))


if __name__ == "__main__":
    main()
