"""The disk spool on real files: restart, torn tails, segments, the disk cap and its policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgenode.uplink.config import MIN_SPOOL_BYTES
from edgenode.uplink.errors import SpoolError
from edgenode.uplink.queue import Outgoing
from edgenode.uplink.spool import Spool


def item(seq: int, size: int = 10) -> Outgoing:
    return Outgoing(seq, "site/t", bytes([seq % 256]) * size, 1)


def spool(path: Path, max_bytes: int = MIN_SPOOL_BYTES, policy: str = "drop-oldest") -> Spool:
    s = Spool(path, max_bytes, policy)
    return s


def add(s: Spool, seq: int, size: int = 10) -> set[int] | None:
    it = item(seq, size)
    room = s.make_room(it)
    if room is not None:
        s.append(it)
    return room


def test_messages_not_done_come_back_after_a_restart_in_order(tmp_path: Path) -> None:
    s = spool(tmp_path / "sp")
    assert s.open() == []
    for seq in range(1, 6):
        assert add(s, seq) == set()
    s.done(2)
    s.done(4)
    s.close()
    again = spool(tmp_path / "sp")
    back = again.open()
    assert [(i.seq, i.payload) for i in back] == [
        (1, b"\x01" * 10),
        (3, b"\x03" * 10),
        (5, b"\x05" * 10),
    ]
    assert again.next_seq == 6
    assert oct(os.stat(tmp_path / "sp").st_mode & 0o777) == "0o700"


def test_sequence_numbers_continue_after_everything_was_done(tmp_path: Path) -> None:
    s = spool(tmp_path / "sp")
    s.open()
    add(s, 1)
    s.done(1)
    s.close()
    again = spool(tmp_path / "sp")
    assert again.open() == [] and again.next_seq == 2


def test_a_torn_tail_is_cut_off_and_the_rest_kept(tmp_path: Path) -> None:
    s = spool(tmp_path / "sp")
    s.open()
    add(s, 1)
    add(s, 2)
    s.close()
    (segment,) = sorted((tmp_path / "sp").glob("*.seg"))[-1:]
    with open(segment, "ab") as f:
        f.write(b"M\x00\x00\x00\x40garbage")  # a record the node died writing
    again = spool(tmp_path / "sp")
    assert [i.seq for i in again.open()] == [1, 2]
    assert again.truncated_bytes == 12
    add(again, 3)
    again.close()
    assert [i.seq for i in spool(tmp_path / "sp").open()] == [1, 2, 3]


def test_done_segments_are_deleted_oldest_first(tmp_path: Path) -> None:
    s = spool(tmp_path / "sp")
    s.open()
    seg = s.segment_bytes
    per = seg // 1000 + 1  # messages of ~1 KB to fill a segment
    for seq in range(1, 3 * per + 1):
        add(s, seq, 1000)
    assert s.segments >= 3
    # Finishing a later segment first deletes nothing: its done records
    # must outlive the older messages they complete.
    for seq in range(per + 1, 2 * per + 1):
        s.done(seq)
    before = s.segments
    for seq in range(1, per + 1):
        s.done(seq)
    assert s.segments < before
    s.close()
    left = [i.seq for i in spool(tmp_path / "sp").open()]
    assert left == list(range(2 * per + 1, 3 * per + 1))


def test_the_disk_cap_drops_the_oldest_segment_under_drop_oldest(tmp_path: Path) -> None:
    s = spool(tmp_path / "sp", policy="drop-oldest")
    s.open()
    seq = 0
    dropped: set[int] = set()
    while not dropped:
        seq += 1
        room = add(s, seq, 4000)
        assert room is not None
        dropped = room
    assert min(dropped) == 1 and s.bytes <= s.max_bytes
    s.close()
    back = [i.seq for i in spool(tmp_path / "sp").open()]
    assert back == [n for n in range(1, seq + 1) if n not in dropped]
    total = sum(p.stat().st_size for p in (tmp_path / "sp").glob("*.seg"))
    assert total <= MIN_SPOOL_BYTES


def test_the_disk_cap_refuses_new_under_refuse_new(tmp_path: Path) -> None:
    s = spool(tmp_path / "sp", policy="refuse-new")
    s.open()
    seq = 0
    while add(s, seq + 1, 4000) is not None:
        seq += 1
    assert s.bytes <= s.max_bytes
    s.close()
    assert [i.seq for i in spool(tmp_path / "sp").open()] == list(range(1, seq + 1))


def test_a_message_over_half_the_spool_is_refused(tmp_path: Path) -> None:
    s = spool(tmp_path / "sp")
    s.open()
    assert add(s, 1, MIN_SPOOL_BYTES // 2) is None
    s.close()


def test_an_unusable_directory_is_a_spool_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError) as info:
        spool(tmp_path / "file" / "sp").open()
    assert (
        str(info.value) == f"cannot use spool directory {tmp_path / 'file' / 'sp'}: Not a directory"
    )


def test_sync_flushes_and_closes(tmp_path: Path) -> None:
    s = spool(tmp_path / "sp")
    s.open()
    add(s, 1)
    dirty, closed = s.take_sync_work()
    assert len(dirty) == 1 and closed == []
    Spool.sync(dirty, closed)
    assert s.take_sync_work() == ([], [])
    s.close()
    s.close()
