"""The discovery beacon, and which beacons a node looks at.

A node that has discovery on broadcasts a beacon on its subnet every few
seconds: "node ``node_id`` listens on TCP port ``listen_port``; this run of
it is ``epoch``". The sender's IP address is not in the beacon: it is the
datagram's source address, so a node listening on every interface need not
know its own address.

A beacon proves nothing. It only proposes a candidate, which the node dials
over mutual TLS like any configured peer, and only if the beacon's node ID
is authorised; a forged beacon costs at most one refused dial, later ones
backed off. So the format is small and strict rather than signed::

    offset  size  field
    0       4     magic "EDGB" (45 44 47 42)
    4       1     version (1)
    5       2     listen port, big-endian, 1..65535
    7       8     epoch, big-endian, 0..2**64-1
    15      1     node ID length n, 1..64
    16      n     node ID: ASCII a-z, 2-7 and "-"

A version-1 beacon is exactly ``16 + n`` bytes (50 for a standard node ID);
no datagram over :data:`MAX_BEACON_BYTES` is ever decoded. The node ID's
characters are limited to those of a node ID because the ID of an
unauthenticated datagram ends up in log lines. ``docs/discovery.md``
describes the same format with byte vectors.

:class:`BeaconLimiter` decides which decoded beacons are worth the node's
attention, per source address and overall. Nothing here does I/O, reads a
clock or draws a random number.
"""

from __future__ import annotations

from ..errors import InvalidArgument, MalformedMessage, VersionMismatch, hexdump

MAGIC = b"EDGB"
BEACON_VERSION = 1
HEAD_BYTES = 16
MAX_NODE_ID_BYTES = 64
#: No datagram longer than this is decoded, whatever its version says.
MAX_BEACON_BYTES = 128
_U64 = (1 << 64) - 1
# The node ID alphabet (edgenode.identity: lowercase base32 and dashes).
_NODE_ID_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz234567-")


class Beacon:
    """A decoded beacon: who is announcing itself, and where it listens."""

    __slots__ = ("epoch", "listen_port", "node_id")

    def __init__(self, node_id: str, listen_port: int, epoch: int) -> None:
        self.node_id = node_id
        self.listen_port = listen_port
        self.epoch = epoch

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Beacon):
            return NotImplemented
        return (self.node_id, self.listen_port, self.epoch) == (
            other.node_id,
            other.listen_port,
            other.epoch,
        )

    def __hash__(self) -> int:
        return hash((self.node_id, self.listen_port, self.epoch))

    def __repr__(self) -> str:
        return f"Beacon({self.node_id!r}, {self.listen_port}, {self.epoch})"


def encode_beacon(node_id: str, listen_port: int, epoch: int) -> bytes:
    """Return the beacon announcing ``node_id`` listening on ``listen_port``.

    Raises :class:`InvalidArgument` for a node ID that is empty, longer than
    64 bytes or outside the node ID alphabet, a port outside 1..65535 or an
    epoch outside 0..2**64-1.
    """
    raw = node_id.encode("ascii", "replace") if isinstance(node_id, str) else b""
    if not 0 < len(raw) <= MAX_NODE_ID_BYTES or not _NODE_ID_BYTES.issuperset(raw):
        raise InvalidArgument(
            f"beacon node id should be 1..{MAX_NODE_ID_BYTES} characters of a-z, 2-7 "
            f"and '-', got {node_id!r:.80}"
        )
    if type(listen_port) is not int or not 0 < listen_port <= 0xFFFF:
        raise InvalidArgument(f"beacon listen port should be 1..65535, got {listen_port!r}")
    if type(epoch) is not int or not 0 <= epoch <= _U64:
        raise InvalidArgument(f"beacon epoch should be 0..2**64-1, got {epoch!r}")
    return (
        MAGIC
        + bytes([BEACON_VERSION])
        + listen_port.to_bytes(2, "big")
        + epoch.to_bytes(8, "big")
        + bytes([len(raw)])
        + raw
    )


def decode_beacon(data: bytes) -> Beacon:
    """Decode one datagram into a :class:`Beacon`.

    Raises :class:`VersionMismatch` for a beacon of another version and
    :class:`MalformedMessage` for anything else that is not a valid
    version-1 beacon: too long, wrong magic, truncated, a zero port, a bad
    node ID length or character, or bytes left over.
    """
    size = len(data)
    if size > MAX_BEACON_BYTES:
        raise MalformedMessage(
            f"beacon of {size} bytes exceeds {MAX_BEACON_BYTES}-byte limit: {hexdump(data)}"
        )
    got = bytes(data[:4])
    if got != MAGIC:
        raise MalformedMessage(
            f"expected beacon magic {MAGIC.hex(' ')} ('EDGB'), "
            f"got {hexdump(data) if data else 'an empty datagram'}"
        )
    if size < 5:
        raise MalformedMessage(f"beacon of {size} bytes ends before its version: {hexdump(data)}")
    # The version comes before any other check, so that a beacon of a later
    # version is reported as such whatever its layout.
    version = data[4]
    if version != BEACON_VERSION:
        raise VersionMismatch(f"beacon version {version} not supported; expected {BEACON_VERSION}")
    if size < HEAD_BYTES:
        raise MalformedMessage(
            f"beacon of {size} bytes is shorter than its {HEAD_BYTES}-byte header: {hexdump(data)}"
        )
    listen_port = int.from_bytes(data[5:7], "big")
    if listen_port == 0:
        raise MalformedMessage("beacon listen port should be 1..65535, got 0")
    epoch = int.from_bytes(data[7:15], "big")
    id_len = data[15]
    if not 0 < id_len <= MAX_NODE_ID_BYTES:
        raise MalformedMessage(
            f"beacon node id length should be 1..{MAX_NODE_ID_BYTES}, got {id_len}"
        )
    if size != HEAD_BYTES + id_len:
        raise MalformedMessage(
            f"beacon with a {id_len}-byte node id should be {HEAD_BYTES + id_len} bytes, got {size}"
        )
    raw = bytes(data[HEAD_BYTES:])
    if not _NODE_ID_BYTES.issuperset(raw):
        bad = next(b for b in raw if b not in _NODE_ID_BYTES)
        raise MalformedMessage(
            f"beacon node id has byte {bad:#04x}; expected a-z, 2-7 and '-': {hexdump(raw)}"
        )
    return Beacon(raw.decode("ascii"), listen_port, epoch)


class BeaconLimiter:
    """Which beacons the node looks at: each source rarely, all of them boundedly.

    A source address is let through at most once per ``min_gap_s`` (a
    legitimate node beacons once per interval, so half an interval loses
    nothing). All sources together are let through at most ``rate_per_s``
    times a second, in bursts of up to ``burst``: a flood of beacons with
    forged source addresses fills neither the node's inbox nor its dials.
    At most ``max_sources`` addresses are remembered. ``now`` is any
    monotonic time in seconds.
    """

    __slots__ = (
        "_last",
        "_next_sweep",
        "_stamp",
        "_tokens",
        "burst",
        "max_sources",
        "min_gap_s",
        "rate_per_s",
    )

    def __init__(
        self, min_gap_s: float, rate_per_s: float, burst: int, max_sources: int = 1024
    ) -> None:
        if not (min_gap_s >= 0 and rate_per_s > 0 and burst >= 1 and max_sources >= 1):
            raise InvalidArgument(
                f"beacon limiter: expected min_gap_s >= 0, rate_per_s > 0, burst >= 1 and "
                f"max_sources >= 1, got {min_gap_s!r}, {rate_per_s!r}, {burst!r}, "
                f"{max_sources!r}"
            )
        self.min_gap_s = min_gap_s
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_sources = max_sources
        self._last: dict[str, float] = {}
        self._tokens = float(burst)
        self._stamp: float | None = None
        self._next_sweep = 0.0

    def allow(self, source: str, now: float) -> bool:
        """Return whether a beacon from ``source`` heard at ``now`` should be looked at."""
        last = self._last.get(source)
        if last is not None and now - last < self.min_gap_s:
            return False
        if last is None and len(self._last) >= self.max_sources and not self._sweep(now):
            return False
        if self._stamp is not None:
            elapsed = max(0.0, now - self._stamp)
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate_per_s)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        self._last[source] = now
        return True

    def _sweep(self, now: float) -> bool:
        """Forget sources quiet for ``min_gap_s``; return whether there is room now.

        Sweeps at most once per ``min_gap_s``, so that a flood from many
        addresses cannot make each datagram cost a walk of the table.
        """
        if now >= self._next_sweep:
            self._next_sweep = now + self.min_gap_s
            self._last = {s: t for s, t in self._last.items() if now - t < self.min_gap_s}
        return len(self._last) < self.max_sources
