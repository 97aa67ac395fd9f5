"""A seeded mutation engine: turns valid encodings into near-valid ones.

Blind random bytes rarely get past a decoder's first check; corrupting a
valid encoding reaches every later one. ``mutate`` applies a few of these
to a seed: bit flips, "interesting" bytes (CBOR heads, limits, 0x00),
small arithmetic on a byte, big-endian integers overwritten with boundary
values (length fields), inserted, deleted, duplicated or swapped ranges,
truncation, and splices with other seeds. ``random_cuts`` picks where a
stream is cut into reads.

Everything is drawn from the ``rnd`` argument (a ``random.Random``, or
hypothesis's ``st.randoms()``), so the same seed gives the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INTERESTING_BYTES = (
    0x00, 0x01, 0x02, 0x04, 0x07, 0x08, 0x0F, 0x10, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1C,
    0x1F, 0x20, 0x21, 0x37, 0x38, 0x3F, 0x40, 0x41, 0x58, 0x5F, 0x60, 0x61, 0x78, 0x7F,
    0x80, 0x81, 0x82, 0x98, 0x9F, 0xA0, 0xA1, 0xB8, 0xBF, 0xC0, 0xC1, 0xF4, 0xF5, 0xF6,
    0xF7, 0xF8, 0xF9, 0xFA, 0xFB, 0xFE, 0xFF,
)  # fmt: skip

INTERESTING_INTS = (
    0, 1, 2, 3, 0x7F, 0x80, 0xFE, 0xFF, 0x100, 0x101, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF,
    0x10000, 0x10001, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF,
)  # fmt: skip


def _pos(rnd: Any, buf: bytearray, extra: int = 0) -> int:
    return rnd.randrange(len(buf) + extra) if buf or extra else 0


def _int_value(rnd: Any, size: int, length: int) -> int:
    """A boundary value, or the input length nudged (a length field that lies)."""
    if rnd.random() < 0.3:
        value = length + rnd.randint(-4, 4)
    else:
        value = rnd.choice(INTERESTING_INTS) + rnd.choice((0, 0, 0, -1, 1))
    return value % (1 << (8 * size))


def mutate_once(buf: bytearray, rnd: Any, pool: Sequence[bytes]) -> None:
    """Apply one random mutation to ``buf`` in place."""
    op = rnd.randrange(14)
    n = len(buf)
    if op == 0 and n:  # flip one bit
        i = _pos(rnd, buf)
        buf[i] ^= 1 << rnd.randrange(8)
    elif op == 1 and n:  # an interesting byte
        buf[_pos(rnd, buf)] = rnd.choice(INTERESTING_BYTES)
    elif op == 2 and n:  # small arithmetic
        i = _pos(rnd, buf)
        buf[i] = (buf[i] + rnd.randint(-16, 16)) & 0xFF
    elif op == 3 and n:  # a random byte
        buf[_pos(rnd, buf)] = rnd.randrange(256)
    elif op == 4 and n:  # a big-endian integer (a length field?) set to a boundary
        size = rnd.choice((1, 2, 2, 4, 4, 8))
        i = _pos(rnd, buf)
        raw = _int_value(rnd, size, n).to_bytes(size, "big")
        buf[i : i + size] = raw[: max(0, min(size, n - i))]
    elif op == 5:  # insert random bytes
        i = _pos(rnd, buf, 1)
        buf[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
    elif op == 6:  # insert an interesting byte
        buf.insert(_pos(rnd, buf, 1), rnd.choice(INTERESTING_BYTES))
    elif op == 7 and n:  # delete a range
        i = _pos(rnd, buf)
        buf[i : i + rnd.randint(1, 16)] = b""
    elif op == 8 and n:  # duplicate a range
        i = _pos(rnd, buf)
        j = min(n, i + rnd.randint(1, 64))
        k = _pos(rnd, buf, 1)
        buf[k:k] = buf[i:j] * rnd.choice((1, 1, 2, 3))
    elif op == 9 and n > 1:  # swap two ranges
        size = rnd.randint(1, max(1, n // 2))
        i = rnd.randrange(n - size + 1)
        j = rnd.randrange(n - size + 1)
        a, b = bytes(buf[i : i + size]), bytes(buf[j : j + size])
        buf[i : i + size] = b
        buf[j : j + size] = a
    elif op == 10 and n:  # truncate
        del buf[_pos(rnd, buf) :]
    elif op == 11 and pool:  # splice: our head, another seed's tail
        other = rnd.choice(pool)
        i = _pos(rnd, buf, 1)
        j = rnd.randrange(len(other) + 1)
        buf[i:] = other[j:]
    elif op == 12 and pool:  # another whole seed before or after
        other = rnd.choice(pool)
        if rnd.random() < 0.5:
            buf[:0] = other
        else:
            buf += other
    else:  # append random bytes
        buf += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))


def mutate(data: bytes, rnd: Any, pool: Sequence[bytes] = (), max_len: int = 4096) -> bytes:
    """Return ``data`` with 1 to 8 random mutations, cut to ``max_len`` bytes."""
    buf = bytearray(data)
    for _ in range(rnd.choice((1, 1, 1, 1, 2, 2, 3, 4, 8))):
        mutate_once(buf, rnd, pool)
        if len(buf) > max_len:
            del buf[max_len:]
    return bytes(buf)


def random_cuts(rnd: Any, size: int) -> list[int]:
    """Where to cut a ``size``-byte stream into reads: none, a few, or every byte."""
    roll = rnd.random()
    if roll < 0.4 or size < 2:
        return []
    if roll < 0.5 and size <= 128:
        return list(range(1, size))
    return sorted(rnd.randrange(1, size) for _ in range(rnd.randint(1, 8)))
