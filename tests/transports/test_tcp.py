"""A dial tells "no listener" (Unreachable) from a failure after the connect (issue 15, item 3).

The redial rules retry a dial that found no listener soon, at no cost to
the peer, and back off one that reached it; so dial_link must say which.
Real sockets on loopback.
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest

from edgenode.errors import HandshakeError
from edgenode.tls import client_context
from edgenode.transports.tcp import Unreachable, dial_link

from ..conftest import free_port

pytestmark = pytest.mark.anyio


async def dial(identities: Any, port: int, **kwargs: Any) -> Any:
    identity = identities["a"]
    return await dial_link(
        "127.0.0.2",
        port,
        context=client_context(identity),
        cert_der=identity.cert_der,
        local_host="127.0.0.1",
        is_authorised=lambda _node_id: True,
        **kwargs,
    )


async def test_dial_to_a_port_nobody_listens_on_is_unreachable(identities: Any) -> None:
    port = free_port("127.0.0.2")
    with pytest.raises(Unreachable) as info:
        await dial(identities, port)
    assert isinstance(info.value, HandshakeError)
    assert str(info.value) == f"127.0.0.2:{port}: cannot connect: connection refused"


async def test_dial_whose_connect_is_not_answered_is_unreachable(identities: Any) -> None:
    # A listener whose accept queue is full drops new SYNs: the connect hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.2", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued = []
        try:
            for _ in range(8):
                client = socket.socket()
                client.setblocking(False)
                client.connect_ex(("127.0.0.2", port))
                queued.append(client)
            with anyio.fail_after(10):
                with pytest.raises(Unreachable) as info:
                    await dial(identities, port, connect_timeout_s=0.3)
        finally:
            for client in queued:
                client.close()
    assert str(info.value) == f"127.0.0.2:{port}: cannot connect: no answer within 0.3 s"


async def test_dial_closed_after_the_connect_is_not_unreachable(identities: Any) -> None:
    # The listener answered, then closed: that cost it a handshake.
    with socket.socket() as listener:
        listener.bind(("127.0.0.2", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]

        async def close_first() -> None:
            await anyio.wait_readable(listener)
            accepted, _ = listener.accept()
            accepted.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(close_first)
            with pytest.raises(HandshakeError) as info:
                await dial(identities, port, connect_timeout_s=5.0)
    assert type(info.value) is HandshakeError
    assert str(info.value) == "127.0.0.2: connection closed during tls handshake"
