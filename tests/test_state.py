"""Tests of edgenode.state: the known-peers file (real files) and its list (pure)."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from edgenode import identity
from edgenode.identity import node_id_from_public_key
from edgenode.state import (
    KNOWN_PEERS_FILENAME,
    MAX_KNOWN_PEERS,
    REFRESH_DELAY_S,
    SAVE_DELAY_S,
    KnownPeer,
    KnownPeers,
    known_peers_path,
    load_known_peers,
    merge,
    save_known_peers,
)

ID = [node_id_from_public_key(bytes([i]) * 32) for i in range(8)]


def peer(n: int, last_seen: float = 1_700_000_000.0, port: int = 7300) -> KnownPeer:
    return KnownPeer(f"10.0.0.{n}", port, ID[n], last_seen)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return known_peers_path(tmp_path)


def write_doc(path: Path, doc: Any, mode: int = 0o600) -> bytes:
    data = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
    path.write_bytes(data)
    os.chmod(path, mode)
    return data


def entry(n: int, **changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"ip": f"10.0.0.{n}", "port": 7300, "node_id": ID[n], "last_seen": 1}
    raw.update(changes)
    return raw


# -- merge (pure) ---------------------------------------------------------------


def test_merge_puts_the_peer_first_and_keeps_the_rest_in_order() -> None:
    known = [peer(1), peer(2), peer(3)]
    merged = merge(known, "10.0.0.4", 7301, ID[4], 5.0)
    assert merged == [KnownPeer("10.0.0.4", 7301, ID[4], 5.0), peer(1), peer(2), peer(3)]
    assert known == [peer(1), peer(2), peer(3)]  # not changed in place


def test_merge_keeps_the_newest_entry_per_ip() -> None:
    merged = merge([peer(1), peer(2), peer(3)], "10.0.0.2", 7400, ID[2], 9.0)
    assert merged == [KnownPeer("10.0.0.2", 7400, ID[2], 9.0), peer(1), peer(3)]


def test_merge_replaces_the_old_address_of_a_node_that_moved() -> None:
    merged = merge([peer(1), peer(2)], "10.0.0.9", 7300, ID[1], 9.0)
    assert merged == [KnownPeer("10.0.0.9", 7300, ID[1], 9.0), peer(2)]


def test_merge_drops_the_least_recently_seen_beyond_the_cap() -> None:
    merged = merge([peer(1), peer(2), peer(3)], "10.0.0.4", 7300, ID[4], 9.0, cap=3)
    assert [p.ip for p in merged] == ["10.0.0.4", "10.0.0.1", "10.0.0.2"]


def test_merge_never_grows_past_the_default_cap() -> None:
    known: list[KnownPeer] = []
    for i in range(MAX_KNOWN_PEERS + 10):
        known = merge(known, f"10.1.{i // 256}.{i % 256}", 7300, f"node-{i}", float(i))
    assert len(known) == MAX_KNOWN_PEERS
    assert known[0].last_seen == MAX_KNOWN_PEERS + 9
    assert known[-1].last_seen == 10.0


def test_merge_orders_by_call_not_by_clock() -> None:
    # A board without an RTC may see time go backwards; the last call still wins.
    merged = merge([peer(1, last_seen=2e9)], "10.0.0.2", 7300, ID[2], 0.0, cap=1)
    assert merged == [KnownPeer("10.0.0.2", 7300, ID[2], 0.0)]


# -- KnownPeers: when to save (pure) -----------------------------------------------


def test_known_peers_saves_a_burst_of_new_peers_once(path: Path) -> None:
    known = KnownPeers(path)
    known.seen("10.0.0.1", 7300, ID[1], wall_now=1.0, now=100.0)
    known.seen("10.0.0.2", 7300, ID[2], wall_now=2.0, now=105.0)
    assert known.take_due(100.0 + SAVE_DELAY_S - 0.001) is None
    assert known.take_due(100.0 + SAVE_DELAY_S) == [
        KnownPeer("10.0.0.2", 7300, ID[2], 2.0),
        KnownPeer("10.0.0.1", 7300, ID[1], 1.0),
    ]
    assert known.take_due(1e9) is None  # nothing left unsaved
    assert known.take() is None


def test_known_peers_saves_a_flapping_peer_lazily(path: Path) -> None:
    known = KnownPeers(path, [peer(1), peer(2)])
    known.seen("10.0.0.2", 7300, ID[2], wall_now=5.0, now=0.0)
    known.seen("10.0.0.1", 7300, ID[1], wall_now=6.0, now=1.0)
    assert known.take_due(SAVE_DELAY_S + 1.0) is None
    assert known.take_due(REFRESH_DELAY_S - 0.001) is None
    saved = known.take_due(REFRESH_DELAY_S)
    assert saved == [
        KnownPeer("10.0.0.1", 7300, ID[1], 6.0),
        KnownPeer("10.0.0.2", 7300, ID[2], 5.0),
    ]


def test_known_peers_saves_a_new_peer_sooner_than_a_pending_refresh(path: Path) -> None:
    known = KnownPeers(path, [peer(1)])
    known.seen("10.0.0.1", 7300, ID[1], wall_now=5.0, now=0.0)
    known.seen("10.0.0.3", 7300, ID[3], wall_now=6.0, now=50.0)
    saved = known.take_due(50.0 + SAVE_DELAY_S)
    assert saved is not None and [p.ip for p in saved] == ["10.0.0.3", "10.0.0.1"]
    # Once saved, seeing the same peers again is only a refresh.
    known.seen("10.0.0.3", 7300, ID[3], wall_now=7.0, now=100.0)
    assert known.take_due(100.0 + SAVE_DELAY_S) is None
    assert known.take_due(100.0 + REFRESH_DELAY_S) is not None


def test_known_peers_treats_a_new_port_as_a_change(path: Path) -> None:
    known = KnownPeers(path, [peer(1)])
    known.seen("10.0.0.1", 7301, ID[1], wall_now=5.0, now=0.0)
    assert known.take_due(SAVE_DELAY_S) == [KnownPeer("10.0.0.1", 7301, ID[1], 5.0)]


def test_known_peers_take_gives_the_unsaved_list_at_shutdown(path: Path) -> None:
    known = KnownPeers(path, [peer(1)])
    assert known.take() is None
    known.seen("10.0.0.1", 7300, ID[1], wall_now=5.0, now=0.0)
    assert known.take() == [KnownPeer("10.0.0.1", 7300, ID[1], 5.0)]
    assert known.take() is None


def test_known_peers_load_reads_the_file(path: Path) -> None:
    save_known_peers(path, [peer(1), peer(2)])
    known = KnownPeers.load(path, cap=1)
    assert known.peers == [peer(1)]
    assert known.path == path


# -- the file --------------------------------------------------------------------------


def test_save_then_load_round_trips(path: Path) -> None:
    peers = [peer(1), peer(2, port=7301), KnownPeer("fd00::5", 9000, ID[5], 1.0)]
    save_known_peers(path, peers)
    assert load_known_peers(path) == peers


def test_save_writes_a_versioned_json_document(path: Path) -> None:
    save_known_peers(path, [peer(1, last_seen=1700000000.4)])
    assert json.loads(path.read_text()) == {
        "version": 1,
        "peers": [{"ip": "10.0.0.1", "port": 7300, "node_id": ID[1], "last_seen": 1700000000}],
    }


def test_save_makes_the_file_owner_only_whatever_the_umask(path: Path) -> None:
    old = os.umask(0)
    try:
        save_known_peers(path, [peer(1)])
        save_known_peers(path, [peer(2)])  # replacing keeps it owner-only too
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(path.parent)) == [KNOWN_PEERS_FILENAME]


def test_save_of_an_empty_list_loads_empty(path: Path) -> None:
    save_known_peers(path, [])
    assert load_known_peers(path) == []


def test_load_of_a_missing_file_is_empty_and_quiet(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="edgenode.state"):
        assert load_known_peers(path) == []
    assert caplog.records == []


def test_load_normalises_addresses_and_node_ids(path: Path) -> None:
    raw = entry(1, ip="::ffff:10.0.0.1", node_id=ID[1].upper().replace("-", ""))
    write_doc(path, {"version": 1, "peers": [raw]})
    assert load_known_peers(path) == [KnownPeer("10.0.0.1", 7300, ID[1], 1.0)]


def test_load_keeps_the_first_entry_per_ip_and_node_id_and_the_cap(path: Path) -> None:
    peers = [entry(1), entry(1, port=9), entry(2, ip="10.0.0.1"), entry(3, node_id=ID[1])]
    peers += [entry(4), entry(5), entry(6)]
    write_doc(path, {"version": 1, "peers": peers})
    assert [p.ip for p in load_known_peers(path, cap=3)] == ["10.0.0.1", "10.0.0.4", "10.0.0.5"]
    assert path.exists()  # over the cap is not corrupt


def test_load_ignores_unknown_keys_in_entries(path: Path) -> None:
    write_doc(path, {"version": 1, "peers": [entry(1, note="rack 3")], "written_by": "x"})
    assert load_known_peers(path) == [KnownPeer("10.0.0.1", 7300, ID[1], 1.0)]


CORRUPT = {
    "truncated": (b'{"version": 1, "peers": [{"ip": "10.0', "not json"),
    "empty": (b"", "not json"),
    "not utf-8": (b'{"version": 1, "peers": ["\xff"]}', "not utf-8 text"),
    "a list": ([], "expected a json object, got list"),
    "no version": ({"peers": []}, "expected format version 1, got None"),
    "newer version": ({"version": 2, "peers": []}, "expected format version 1, got 2"),
    "peers not a list": ({"version": 1, "peers": {}}, "expected a list of peers, got dict"),
    "entry not an object": ({"version": 1, "peers": [7]}, "entry 0: expected an object, got int"),
    "bad ip": (
        {"version": 1, "peers": [entry(1), entry(2, ip="10.0.0.300")]},
        "entry 1: invalid ip address '10.0.0.300'",
    ),
    "ip not text": ({"version": 1, "peers": [entry(1, ip=None)]}, "entry 0: expected ip as text"),
    "bad checksum": (
        {
            "version": 1,
            "peers": [entry(1, node_id=ID[1][:-1] + ("a" if ID[1][-1] != "a" else "b"))],
        },
        "entry 0: node id",
    ),
    "port 0": ({"version": 1, "peers": [entry(1, port=0)]}, "entry 0: expected port 1..65535"),
    "port true": ({"version": 1, "peers": [entry(1, port=True)]}, "expected port 1..65535"),
    "port text": ({"version": 1, "peers": [entry(1, port="7300")]}, "expected port 1..65535"),
    "nan last_seen": (
        b'{"version": 1, "peers": [{"ip": "10.0.0.1", "port": 1, "node_id": "%s", '
        b'"last_seen": NaN}]}' % ID[1].encode(),
        "entry 0: expected last_seen in seconds, got nan",
    ),
    "missing last_seen": (
        {"version": 1, "peers": [{"ip": "10.0.0.1", "port": 7300, "node_id": ID[1]}]},
        "entry 0: expected last_seen in seconds, got None",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPT), ids=list(CORRUPT))
def test_load_rejects_a_corrupt_file_by_moving_it_aside(
    path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    doc, reason = CORRUPT[case]
    data = write_doc(path, doc)
    with caplog.at_level(logging.WARNING, logger="edgenode.state"):
        assert load_known_peers(path) == []
    bad = path.with_name(KNOWN_PEERS_FILENAME + ".bad")
    assert not path.exists()
    assert bad.read_bytes() == data  # kept, byte for byte
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith(f"known peers file {path} is not valid (")
    assert reason in message
    assert message.endswith(f"starting without known peers; moved it to {bad}")


def test_load_rejects_an_oversized_file(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_doc(path, b" " * (64 * 1024 + 1))
    with caplog.at_level(logging.WARNING, logger="edgenode.state"):
        assert load_known_peers(path, cap=1) == []
    assert "larger than the 65536-byte limit" in caplog.records[0].getMessage()
    assert path.with_name(KNOWN_PEERS_FILENAME + ".bad").exists()


def test_a_save_after_a_corrupt_load_keeps_the_bad_file(path: Path) -> None:
    write_doc(path, b"garbage")
    known = KnownPeers.load(path)
    known.seen("10.0.0.1", 7300, ID[1], wall_now=1.0, now=0.0)
    save_known_peers(path, known.take_due(SAVE_DELAY_S) or [])
    assert load_known_peers(path) == [KnownPeer("10.0.0.1", 7300, ID[1], 1.0)]
    assert path.with_name(KNOWN_PEERS_FILENAME + ".bad").read_bytes() == b"garbage"


def test_load_ignores_a_file_writable_by_others(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_doc(path, {"version": 1, "peers": [entry(1)]}, mode=0o666)
    with caplog.at_level(logging.WARNING, logger="edgenode.state"):
        assert load_known_peers(path) == []
    assert caplog.records[0].getMessage() == (
        f"known peers file {path} is writable by others (mode 0666); ignoring it "
        "(the next save replaces it, mode 0600)"
    )
    assert path.exists()  # not corrupt: not moved aside


def test_load_accepts_a_file_readable_by_others(path: Path) -> None:
    write_doc(path, {"version": 1, "peers": [entry(1)]}, mode=0o644)
    assert len(load_known_peers(path)) == 1


def test_load_ignores_a_directory_in_the_files_place(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path.mkdir()
    with caplog.at_level(logging.WARNING, logger="edgenode.state"):
        assert load_known_peers(path) == []
    assert "is not a regular file" in caplog.records[0].getMessage()
    assert path.is_dir()


class _FailingWrites:
    """The ``os`` module, except that ``write`` writes a few bytes and then fails."""

    def __init__(self) -> None:
        self.calls = 0

    def write(self, fd: int, data: Any) -> int:
        self.calls += 1
        if self.calls == 1:
            return os.write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_a_failed_save_leaves_the_old_file_intact(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_known_peers(path, [peer(1), peer(2)])
    before = path.read_bytes()
    failing = _FailingWrites()
    monkeypatch.setattr(identity, "os", failing)  # the atomic writer's os
    with pytest.raises(OSError) as caught:
        save_known_peers(path, [peer(3)])
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert failing.calls == 2  # it did write part of the temp file
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [KNOWN_PEERS_FILENAME]  # no temp file left
    assert load_known_peers(path) == [peer(1), peer(2)]


def test_load_removes_temp_files_left_by_a_power_cut(path: Path) -> None:
    save_known_peers(path, [peer(1)])
    stale = path.parent / f".{KNOWN_PEERS_FILENAME}.0123456789ab.tmp"
    stale.write_bytes(b'{"version": 1, "pe')
    other = path.parent / ".node.key.0123456789ab.tmp"  # not ours to remove
    other.write_bytes(b"")
    assert load_known_peers(path) == [peer(1)]
    assert not stale.exists()
    assert other.exists()


def test_load_does_not_hang_on_a_fifo_in_the_files_place(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(path, 0o600)
    with caplog.at_level(logging.WARNING, logger="edgenode.state"):
        assert load_known_peers(path) == []
    assert "is not a regular file" in caplog.records[0].getMessage()
