"""Failure 4: the registry tells the truth about a peer process that dies.

The peer is a real ``edgenode run`` process; it is SIGKILLed, so nothing
says goodbye: only the transport's end tells the node.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

import anyio
import pytest

from edgenode.errors import PeerUnavailable
from edgenode.node import Node, PeerDown, PeerUp

from .conftest import free_port, wait_event

pytestmark = pytest.mark.anyio


async def _start_peer(identities: Any, port: int, a: Node) -> anyio.abc.Process:
    command = [
        sys.executable,
        "-m",
        "edgenode",
        "run",
        "--state-dir",
        str(identities["b"].state_dir),
        "--listen",
        f"127.0.0.3:{port}",
        "--peer",
        f"127.0.0.2:{a.listen_port}",
        "--authorise",
        a.node_id,
        "--keepalive-interval",
        "0.5",
        "--log-level",
        "warning",
    ]
    return await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.timeout(60)
async def test_killed_peer_is_down_at_once_and_send_waits_for_its_return(
    make_config: Any, identities: Any
) -> None:
    port = free_port("127.0.0.3")
    async with Node(make_config("a", "127.0.0.2", backoff_cap_s=0.2)) as a:
        events = a.events()
        peer = await _start_peer(identities, port, a)
        try:
            await wait_event(events, lambda e: isinstance(e, PeerUp), timeout=20)
            assert await a.request("127.0.0.3", "edgenode/peers", b"", timeout=5)

            peer.send_signal(signal.SIGKILL)
            await peer.wait()
            down = await wait_event(events, lambda e: isinstance(e, PeerDown), timeout=1.0)
            assert down.peer == "127.0.0.3"
            assert [(p.ip, p.state) for p in a.peers()] == [("127.0.0.3", "down")]
            with anyio.fail_after(0.1):  # fails fast: no waiting on a dead transport
                with pytest.raises(
                    PeerUnavailable, match=r"peer 127.0.0.3 is not connected \(connection"
                ):
                    await a.send("127.0.0.3", "t", b"lost")

            async def restart_later() -> None:
                nonlocal peer
                peer = await _start_peer(identities, port, a)

            async with anyio.create_task_group() as tg:
                tg.start_soon(restart_later)
                # Waits (bounded) for the reconnection, then succeeds.
                reply = await a.request("127.0.0.3", "edgenode/peers", b"", timeout=5, wait_s=20)
                assert reply
                await a.send("127.0.0.3", "t", b"after the restart", wait_s=1)
        finally:
            if peer.returncode is None:
                peer.terminate()
                with anyio.fail_after(10):
                    assert await peer.wait() == 0
