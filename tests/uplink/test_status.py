"""The uplink in the control socket's status: JSON, and its lines in ``edgenode status``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest

from edgenode.config import NodeConfig
from edgenode.control_ops import node_status
from edgenode.node import Node
from edgenode.status_text import format_status
from edgenode.testing.procs import free_port

from ..conftest import wait_until
from .conftest import fast_uplink

pytestmark = pytest.mark.anyio


async def test_status_shows_the_uplink_state_error_and_queue(
    make_config: Callable[..., NodeConfig],
) -> None:
    url = f"mqtt://127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens: connection refused
    uplink = fast_uplink(
        url, queue_messages=50, queue_bytes=100_000, reconnect_base_s=5.0, reconnect_cap_s=5.0
    )
    async with Node(make_config("a", "127.0.0.2", uplink=uplink)) as node:
        await wait_until(lambda: node.uplink.status()["state"] == "error")
        status = node_status(node)
        assert json.loads(json.dumps(status))["uplink"]["last_error_type"] == "BrokerUnavailable"
        text = format_status(status)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  uplink"))
    block = lines[start : start + 4]
    assert re.fullmatch(
        rf"  uplink     error, retry in \d\.\d s  {url} as edgenode-{node.node_id}", block[0]
    ), block[0]
    assert re.fullmatch(
        rf"             last error \d\.\d s ago: broker {url}: cannot connect: Connection refused",
        block[1],
    ), block[1]
    assert block[2] == (
        "             queue 0/50 msgs, 0 B/97.7 KiB (drop-oldest: 0 dropped, 0 refused; "
        "0 qos 0 dropped offline)"
    )
    assert block[3] == (
        "             out 0 published, 0 rejected, 0 unmappable; "
        "in 0 received, 0 delivered, 0 undeliverable, 0 unrouted"
    )


def test_status_without_an_uplink_has_no_uplink_lines() -> None:
    text = format_status({"ok": True, "node": {"peers_by_state": {}}, "peers": []})
    assert "uplink" not in text
