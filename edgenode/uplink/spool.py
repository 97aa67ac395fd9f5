"""The disk spool: queued QoS 1 messages kept in the state directory across restarts.

The spool is a write-ahead log of the queue (:mod:`.queue`), in segment
files ``uplink-spool/NNNNNNNN.seg`` of about an eighth of the spool's size
each, written in :mod:`.records`' format. Accepting a QoS 1 message
appends its record to the newest segment; its acknowledgement (or its drop
by the queue's policy) appends a *done* record. A segment is deleted once
every message in it is done and every segment before it is gone, so a done
record is never deleted before the message it completes. After a restart,
:meth:`Spool.open` reads the segments back and returns the messages not
done, in order: they are sent again, so a message the broker acknowledged
just before the node stopped can arrive twice (MQTT's QoS 1 is at least
once).

Bounded: the segments together hold at most ``max_bytes``. When a new
record does not fit, ``drop-oldest`` deletes the oldest segment, and with
it the messages still in it (the caller drops them from the queue too,
counted); ``refuse-new`` refuses the new message.

Writes go to the page cache (an ``os.write`` of one record, microseconds);
:meth:`Spool.sync` flushes them to the disk and is called from a worker
thread about once a second, so a power cut loses at most about a second
of accepted messages, and the event loop never waits for the disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import DROP_OLDEST
from .errors import SpoolError
from .queue import Outgoing
from .records import decode_records, encode_done, encode_message, message_record_bytes

SPOOL_DIR_NAME = "uplink-spool"
_SUFFIX = ".seg"
_SEGMENTS = 8


class _Segment:
    __slots__ = ("fd", "index", "live", "path", "size")

    def __init__(self, index: int, path: Path, size: int) -> None:
        self.index = index
        self.path = path
        self.size = size
        self.live: set[int] = set()
        self.fd: int | None = None


class Spool:
    """Queued QoS 1 messages on disk, in at most ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int, policy: str) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.policy = policy
        self.segment_bytes = max_bytes // _SEGMENTS
        self._segments: list[_Segment] = []
        self._where: dict[int, _Segment] = {}
        self._dirty: list[int] = []
        self._closed_fds: list[int] = []
        #: The next message's sequence number (continues across restarts).
        self.next_seq = 1
        self.bytes = 0
        self.truncated_bytes = 0

    # -- opening (blocking: call from a worker thread) ------------------------------

    def open(self) -> list[Outgoing]:
        """Read the spool back; return its messages not done, oldest first.

        Creates the directory (owner-only) if needed, cuts a torn or corrupt
        tail off the segment it ends, and opens a new segment to append to.
        Raises :class:`SpoolError`.
        """
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            names = sorted(p.name for p in self.directory.iterdir() if p.name.endswith(_SUFFIX))
        except OSError as exc:
            raise SpoolError(
                f"cannot use spool directory {self.directory}: {exc.strerror}"
            ) from None
        messages: dict[int, Outgoing] = {}
        last_seq = 0
        for name in names:
            stem = name[: -len(_SUFFIX)]
            if not stem.isdigit():
                continue
            path = self.directory / name
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise SpoolError(f"cannot read spool segment {path}: {exc.strerror}") from None
            found, done, valid = decode_records(data)
            if valid < len(data):
                self.truncated_bytes += len(data) - valid
                try:
                    os.truncate(path, valid)
                except OSError as exc:
                    raise SpoolError(
                        f"cannot repair spool segment {path}: {exc.strerror}"
                    ) from None
            segment = _Segment(int(stem), path, valid)
            self._segments.append(segment)
            self.bytes += valid
            for item in found:
                messages[item.seq] = item
                segment.live.add(item.seq)
                self._where[item.seq] = segment
                last_seq = max(last_seq, item.seq)
            for seq in done:
                last_seq = max(last_seq, seq)
                if messages.pop(seq, None) is not None:
                    self._where.pop(seq).live.discard(seq)
        self.next_seq = last_seq + 1
        self._collect()
        self._rotate()
        return [messages[seq] for seq in sorted(messages)]

    # -- in the event loop: small writes to the page cache ------------------------

    def make_room(self, item: Outgoing) -> set[int] | None:
        """Room for ``item``'s record: the sequence numbers dropped with the
        oldest segments (``drop-oldest``), or None when it does not fit
        (``refuse-new``, or a message larger than half the spool)."""
        need = message_record_bytes(item)
        if need > self.max_bytes // 2:
            return None
        dropped: set[int] = set()
        while self.bytes + need > self.max_bytes:
            if self.policy != DROP_OLDEST or len(self._segments) < 2:
                return None
            oldest = self._segments.pop(0)
            dropped |= oldest.live
            for seq in oldest.live:
                self._where.pop(seq, None)
            self._remove(oldest)
        return dropped

    def append(self, item: Outgoing) -> None:
        """Write ``item``'s record (after :meth:`make_room`). Raises :class:`SpoolError`."""
        current = self._segments[-1]
        if current.size >= self.segment_bytes:
            current = self._rotate()
        self._write(current, encode_message(item))
        current.live.add(item.seq)
        self._where[item.seq] = current

    def done(self, seq: int) -> None:
        """Message ``seq`` was acknowledged or dropped. Raises :class:`SpoolError`."""
        segment = self._where.pop(seq, None)
        if segment is None:
            return  # not spooled (QoS 0), or its segment was dropped
        segment.live.discard(seq)
        current = self._segments[-1]
        if current.size >= self.segment_bytes:
            current = self._rotate()
        self._write(current, encode_done(seq))
        self._collect()

    def _write(self, segment: _Segment, record: bytes) -> None:
        assert segment.fd is not None
        try:
            written = os.write(segment.fd, record)
        except OSError as exc:
            raise SpoolError(f"cannot write spool segment {segment.path}: {exc.strerror}") from None
        if written != len(record):
            raise SpoolError(f"cannot write spool segment {segment.path}: short write")
        segment.size += written
        self.bytes += written
        if segment.fd not in self._dirty:
            self._dirty.append(segment.fd)

    def _rotate(self) -> _Segment:
        index = self._segments[-1].index + 1 if self._segments else 1
        path = self.directory / f"{index:08d}{_SUFFIX}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot create spool segment {path}: {exc.strerror}") from None
        if self._segments and self._segments[-1].fd is not None:
            self._closed_fds.append(self._segments[-1].fd)
            self._segments[-1].fd = None
        segment = _Segment(index, path, 0)
        segment.fd = fd
        self._segments.append(segment)
        self._collect()
        return segment

    def _collect(self) -> None:
        """Delete the oldest segments while they hold nothing live (never the newest)."""
        while len(self._segments) > 1 and not self._segments[0].live:
            self._remove(self._segments.pop(0))

    def _remove(self, segment: _Segment) -> None:
        if segment.fd is not None:
            self._closed_fds.append(segment.fd)
            segment.fd = None
        self.bytes -= segment.size
        try:
            os.unlink(segment.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SpoolError(
                f"cannot delete spool segment {segment.path}: {exc.strerror}"
            ) from None

    # -- from a worker thread --------------------------------------------------------

    def take_sync_work(self) -> tuple[list[int], list[int]]:
        """The descriptors to flush and those to flush and close (call in the loop)."""
        dirty, closed = self._dirty, self._closed_fds
        self._dirty, self._closed_fds = [], []
        return [fd for fd in dirty if fd not in closed], closed

    @staticmethod
    def sync(dirty: list[int], closed: list[int]) -> None:
        """Flush ``dirty`` and ``closed`` to the disk and close ``closed`` (blocking)."""
        for fd in dirty:
            try:
                os.fsync(fd)
            except OSError:
                pass  # closed meanwhile by close(); its data is in the page cache
        for fd in closed:
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.close(fd)

    def close(self) -> None:
        """Flush and close every segment (blocking). Idempotent."""
        dirty, closed = self.take_sync_work()
        for segment in self._segments:
            if segment.fd is not None:
                closed.append(segment.fd)
                segment.fd = None
        self.sync([fd for fd in dirty if fd not in closed], closed)

    @property
    def segments(self) -> int:
        return len(self._segments)
