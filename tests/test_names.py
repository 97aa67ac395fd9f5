"""Peers by host name: resolved by the system resolver, off the loop, again
before each redial; a name that does not resolve is retried, never fatal."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from edgenode.config import NodeConfig, is_host_name
from edgenode.errors import ConfigError, InvalidArgument
from edgenode.node import Node, PeerUp

from .conftest import wait_event, wait_until

pytestmark = pytest.mark.anyio

EVENT_S = 20.0  # bounds that hold on a board ten times slower


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("pi-kitchen.local", True),
        ("hub", True),
        ("hub.lan.", True),
        ("a" * 63 + ".b", True),
        ("-hub.lan", False),
        ("hub-.lan", False),
        ("hub_lan", False),
        ("a" * 64, False),
        ("", False),
        ("10.0.0.1", False),  # an address, not a name
        ("hub..lan", False),
    ],
)
def test_host_name_syntax(text: str, ok: bool) -> None:
    assert is_host_name(text) is ok


def test_config_accepts_names_and_rejects_what_is_neither_a_name_nor_an_address() -> None:
    NodeConfig(peers=[("pi-kitchen.local", 7300), ("10.0.0.2", 7300)]).validate()
    with pytest.raises(ConfigError) as raised:
        NodeConfig(peers=[("pi kitchen", 7300)]).validate()
    assert str(raised.value) == (
        "peers: expected an ip address or a host name, got 'pi kitchen'"
    )
    # A node built in Python checks its peers as `edgenode run` does.
    with pytest.raises(ConfigError) as raised:
        Node(NodeConfig(listen_host="10.0.0.1", peers=[("10.0.0.1", 7300)]))
    assert str(raised.value) == (
        "peers: 10.0.0.1:7300 is this node's own address (node.listen is 10.0.0.1:7300); "
        "list the other nodes"
    )


def test_a_node_built_in_python_keeps_one_peer_per_ip(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config("a", "127.0.0.2", [("127.0.0.3", 7300), ("127.0.0.3", 7301)])
    assert Node(config).config.peers == [("127.0.0.3", 7301)]
    assert (
        "peers: 127.0.0.3:7300 and 127.0.0.3:7301 are one peer (peers are keyed by ip "
        "address): using 127.0.0.3:7301, the last"
    ) in caplog.text


async def test_a_peer_configured_by_name_connects_and_shows_its_name(make_config: Any) -> None:
    # "localhost" is the one name every machine resolves: to 127.0.0.1.
    async with Node(make_config("b", "127.0.0.1")) as b:
        config = make_config("a", "127.0.0.2", [("localhost", b.listen_port)])
        async with Node(config) as a:
            events = a.events()
            up = await wait_event(events, lambda e: isinstance(e, PeerUp), EVENT_S)
            assert up.peer == "127.0.0.1"
            [row] = a.peers()
            assert (row.ip, row.name, row.state) == ("127.0.0.1", "localhost", "up")
            [name] = a.stats()["peer_names"]
            assert (name["host"], name["ip"], name["error"]) == ("localhost", "127.0.0.1", None)
            # Resolved again before each redial: b goes away and comes back.
            port = b.listen_port
            await b.aclose()
            await wait_until(lambda: a.stats()["peer_names"][0]["resolutions"] >= 2, EVENT_S)
            async with Node(make_config("b", "127.0.0.1", listen_port=port)):
                await wait_event(events, lambda e: isinstance(e, PeerUp), EVENT_S)


async def test_a_name_that_does_not_resolve_is_logged_once_and_retried(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgenode.node")
    # .invalid never resolves (RFC 6761): the resolver answers at once.
    config = make_config("a", "127.0.0.2", [("no-such-peer.invalid", 7300)])
    async with Node(config) as a:
        await wait_until(lambda: a.stats()["peer_names"][0]["resolutions"] >= 3, EVENT_S)
        [name] = a.stats()["peer_names"]
        assert name["ip"] is None and name["error"]
        assert name["retry_in_s"] is not None
        warnings = [r.getMessage() for r in caplog.records if "cannot resolve" in r.getMessage()]
        assert warnings == [
            f"cannot resolve peer no-such-peer.invalid:7300: {name['error']}; retrying"
        ]
        assert a.peers() == []  # the registry stays keyed by address


async def test_add_peer_takes_a_name_and_refuses_what_is_neither(make_config: Any) -> None:
    async with Node(make_config("b", "127.0.0.1")) as b:
        async with Node(make_config("a", "127.0.0.2")) as a:
            with pytest.raises(InvalidArgument) as raised:
                await a.add_peer("not a host", 7300)
            assert str(raised.value) == (
                "host: expected an ip address or a host name, got 'not a host'"
            )
            events = a.events()
            await a.add_peer("localhost", b.listen_port)
            with anyio.fail_after(EVENT_S):
                up = await wait_event(events, lambda e: isinstance(e, PeerUp), EVENT_S)
            assert up.peer == "127.0.0.1"
