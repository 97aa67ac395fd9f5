"""Trust changed while a node runs (edgenode.trust, docs/security.md).

The authorised-nodes file, read and edited (``authorise``/``revoke``), and
a node that re-reads it: a revoked node's live connection is closed with
the reason, a newly authorised one is let in at once, and a bad file
changes nothing. Real nodes on loopback, real TLS.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgenode.api import PeerDown, PeerUp, Refused
from edgenode.config import NodeConfig
from edgenode.errors import ConfigError, InvalidNodeId, NodeClosed, NotAuthorised
from edgenode.identity import AUTHORISED_FILENAME, create_identity, node_id_from_public_key
from edgenode.node import Node
from edgenode.trust import (
    Trust,
    add_authorised,
    authorised_path,
    load_authorised,
    remove_authorised,
)

from .conftest import TRUSTED, echo, wait_event, wait_until

VECTOR_ID = "mmg4-2klg-yqzw-neis-krel-xms3-qjpg"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- the authorised-nodes file ------------------------------------------------------


@pytest.fixture()
def ids() -> list[str]:
    return [node_id_from_public_key(bytes([i]) * 32) for i in range(3)]


def test_authorised_path_is_in_state_dir(tmp_path: Path) -> None:
    assert authorised_path(tmp_path) == tmp_path / AUTHORISED_FILENAME


def test_load_authorised_missing_file_is_empty(tmp_path: Path) -> None:
    assert load_authorised(tmp_path / "nope") == frozenset()


def test_load_authorised_reads_comments_blanks_and_variants(tmp_path: Path, ids: list[str]) -> None:
    path = tmp_path / AUTHORISED_FILENAME
    path.write_text(
        "# kitchen and garage\n"
        "\n"
        f"{ids[0]}\n"
        f"   {ids[1].upper().replace('-', '')}   # garage pi\n"
        f"{ids[0]}\n"
        "   \n"
        f"{ids[2]}"  # no final newline
    )
    assert load_authorised(path) == frozenset(ids)


def test_load_authorised_rejects_bad_line_with_file_and_line(
    tmp_path: Path, ids: list[str]
) -> None:
    path = tmp_path / AUTHORISED_FILENAME
    path.write_text(f"# list\n{ids[0]}\nxyz\n")
    with pytest.raises(ConfigError) as info:
        load_authorised(path)
    assert type(info.value) is ConfigError
    assert str(info.value) == (
        f"{path}:3: node id 'xyz' should be 28 base32 characters (dashes optional), got 3"
    )


def test_load_authorised_rejects_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / AUTHORISED_FILENAME
    path.write_bytes(b"# ok\n\xff\n")
    with pytest.raises(ConfigError) as info:
        load_authorised(path)
    assert str(info.value) == f"{path}:2: not utf-8 text"


def test_add_authorised_appends_once(tmp_path: Path, ids: list[str]) -> None:
    path = tmp_path / AUTHORISED_FILENAME
    assert add_authorised(path, ids[0]) is True
    assert add_authorised(path, ids[0].upper()) is False
    assert add_authorised(path, ids[1].replace("-", "")) is True
    assert path.read_text() == f"{ids[0]}\n{ids[1]}\n"
    assert load_authorised(path) == frozenset(ids[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == [AUTHORISED_FILENAME]


def test_add_authorised_keeps_comments_and_mode(tmp_path: Path, ids: list[str]) -> None:
    path = tmp_path / AUTHORISED_FILENAME
    path.write_text(f"# fleet\n{ids[0]}  # first")
    os.chmod(path, 0o600)
    assert add_authorised(path, ids[1]) is True
    assert path.read_text() == f"# fleet\n{ids[0]}  # first\n{ids[1]}\n"
    assert _mode(path) == 0o600


def test_add_authorised_rejects_bad_node_id(tmp_path: Path) -> None:
    path = tmp_path / AUTHORISED_FILENAME
    with pytest.raises(InvalidNodeId, match="bad checksum"):
        add_authorised(path, "nmg4" + VECTOR_ID[4:])
    assert not path.exists()


def test_add_authorised_rejects_file_with_bad_line(tmp_path: Path, ids: list[str]) -> None:
    path = tmp_path / AUTHORISED_FILENAME
    path.write_text("garbage\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:1: node id 'garbage'"):
        add_authorised(path, ids[0])
    assert path.read_text() == "garbage\n"


def test_remove_authorised_drops_every_line_listing_it(tmp_path: Path, ids: list[str]) -> None:
    path = tmp_path / AUTHORISED_FILENAME
    path.write_text(
        f"# fleet\n{ids[0]}  # kitchen\n{ids[1]}\n{ids[0].upper().replace('-', '')}\n{ids[2]}"
    )
    os.chmod(path, 0o600)
    assert remove_authorised(path, ids[0]) is True
    assert path.read_text() == f"# fleet\n{ids[1]}\n{ids[2]}"
    assert _mode(path) == 0o600
    assert remove_authorised(path, ids[0]) is False
    assert load_authorised(path) == frozenset(ids[1:])
    assert sorted(p.name for p in tmp_path.iterdir()) == [AUTHORISED_FILENAME]


def test_remove_authorised_from_a_missing_file_is_false(tmp_path: Path, ids: list[str]) -> None:
    path = tmp_path / AUTHORISED_FILENAME
    assert remove_authorised(path, ids[0]) is False
    assert not path.exists()


def test_remove_authorised_rejects_bad_node_id_and_bad_file(tmp_path: Path, ids: list[str]) -> None:
    path = tmp_path / AUTHORISED_FILENAME
    path.write_text(f"{ids[0]}\n")
    with pytest.raises(InvalidNodeId, match="bad checksum"):
        remove_authorised(path, "nmg4" + VECTOR_ID[4:])
    path.write_text(f"{ids[0]}\ngarbage\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:2: node id 'garbage'"):
        remove_authorised(path, ids[0])
    assert path.read_text() == f"{ids[0]}\ngarbage\n"


def test_trust_is_the_configured_ids_and_the_file(tmp_path: Path, ids: list[str]) -> None:
    path = tmp_path / AUTHORISED_FILENAME
    add_authorised(path, ids[1])
    trust = Trust(frozenset([ids[0].upper()]), path)
    assert trust.ids == frozenset(ids[:2])
    assert trust.allows(ids[0]) and not trust.allows(ids[2])
    remove_authorised(path, ids[1])
    add_authorised(path, ids[2])
    change = trust.replace(trust.read())
    assert (change.added, change.removed) == (frozenset([ids[2]]), frozenset([ids[1]]))
    # The configured IDs stay whatever the file says.
    remove_authorised(path, ids[2])
    add_authorised(path, ids[0])
    remove_authorised(path, ids[0])
    assert trust.replace(trust.read()).removed == frozenset([ids[2]])
    assert trust.ids == frozenset([ids[0]])
    assert not trust.replace(trust.read())


# -- a running node ----------------------------------------------------------------------


@pytest.fixture
def own(tmp_path: Path, make_config: Callable[..., NodeConfig], identities: Any) -> Any:
    """Node A with a state directory (and so an authorised-nodes file) of its own.

    ``own.config(peers=...)`` makes A's config; ``own.peer(name, ip)`` makes
    a config for one of the shared test identities that also trusts A.
    """

    class Own:
        identity = create_identity(tmp_path / "a")
        file = authorised_path(tmp_path / "a")

        def config(self, **overrides: Any) -> NodeConfig:
            return make_config(
                "a", "127.0.0.2", state_dir=self.identity.state_dir, authorised=None, **overrides
            )

        def peer(self, name: str, ip: str, **overrides: Any) -> NodeConfig:
            trusted = identities.ids(*TRUSTED) | {self.identity.node_id}
            return make_config(name, ip, authorised=trusted, **overrides)

    return Own()


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_revoking_a_peer_closes_its_connection_with_the_reason(
    own: Any, identities: Any
) -> None:
    b_id, c_id = identities["b"].node_id, identities["c"].node_id
    for node_id in (b_id, c_id):
        add_authorised(own.file, node_id)
    async with Node(own.peer("b", "127.0.0.3")) as b, Node(own.peer("c", "127.0.0.4")) as c:
        c.handle("echo", echo)
        peers = [("127.0.0.3", b.listen_port), ("127.0.0.4", c.listen_port)]
        async with Node(own.config(peers=peers)) as a:
            a_events, b_events = a.events(), b.events()
            await wait_until(lambda: sum(p.state == "up" for p in a.peers()) == 2)
            assert remove_authorised(own.file, b_id)
            change = await a.reload_trust()
            assert (change.added, change.removed) == (frozenset(), frozenset([b_id]))
            assert a.authorised == frozenset([c_id])
            reason = f"node {b_id} is no longer authorised"
            down = await wait_event(a_events, lambda e: isinstance(e, PeerDown))
            assert (down.peer, down.reason) == ("127.0.0.3", reason)
            down = await wait_event(b_events, lambda e: isinstance(e, PeerDown))
            assert (down.peer, down.reason) == ("127.0.0.2", f"peer said bye: {reason}")
            # A redials B, its configured peer, and will not have it: B's node
            # ID is no longer one A trusts.
            await wait_until(
                lambda: any(
                    p.ip == "127.0.0.3"
                    and f"node {b_id} is not authorised" in (p.down_reason or "")
                    for p in a.peers()
                )
            )
            # C, still trusted, carries on.
            assert await a.request("127.0.0.4", "echo", b"still here", timeout=30) == b"still here"
            assert {p.ip: p.state for p in a.peers()} == {"127.0.0.3": "down", "127.0.0.4": "up"}


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_authorising_a_node_lets_it_in_at_once(own: Any, identities: Any) -> None:
    c_id = identities["c"].node_id
    async with Node(own.config()) as a:
        a_events = a.events()
        c_config = own.peer("c", "127.0.0.4", peers=[("127.0.0.2", a.listen_port)])
        async with Node(c_config) as c:
            c_events = c.events()
            refused = await wait_event(a_events, lambda e: isinstance(e, Refused))
            assert isinstance(refused.error, NotAuthorised)
            assert str(refused.error) == f"127.0.0.4: node {c_id} is not authorised"
            assert add_authorised(own.file, c_id)
            change = await a.reload_trust()
            assert change.added == frozenset([c_id]) and not change.removed
            up = await wait_event(a_events, lambda e: isinstance(e, PeerUp))
            assert (up.peer, up.node_id) == ("127.0.0.4", c_id)
            await wait_event(c_events, lambda e: isinstance(e, PeerUp))


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_a_bad_file_on_reload_changes_nothing(own: Any, identities: Any) -> None:
    b_id = identities["b"].node_id
    add_authorised(own.file, b_id)
    async with Node(own.peer("b", "127.0.0.3")) as b:
        b.handle("echo", echo)
        async with Node(own.config(peers=[("127.0.0.3", b.listen_port)])) as a:
            await wait_until(lambda: any(p.state == "up" for p in a.peers()))
            own.file.write_text(f"{b_id}\nnot-a-node-id\n")
            with pytest.raises(ConfigError) as info:
                await a.reload_trust()
            assert type(info.value) is ConfigError
            assert str(info.value).startswith(f"{own.file}:2: node id 'not-a-node-id' ")
            os.chmod(own.file, 0o666)
            with pytest.raises(ConfigError, match=r"^authorised nodes file .* writable by others"):
                await a.reload_trust()
            assert a.authorised == frozenset([b_id])
            assert await a.request("127.0.0.3", "echo", b"ok", timeout=30) == b"ok"
            assert [p.state for p in a.peers()] == ["up"]
    with pytest.raises(NodeClosed):
        await a.reload_trust()
