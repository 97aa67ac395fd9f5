"""HMAC-SHA256 (RFC 2104) on ``hashlib.sha256`` alone.

MicroPython has ``hashlib.sha256`` but no ``hmac`` module, and its hash
objects have no ``copy()``, so each tag hashes the padded key afresh: two
SHA-256 runs over one 64-byte block more than the message.
Runs unchanged on CPython 3.9+ and MicroPython.
"""

import hashlib

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef]
        return x


_BLOCK_BYTES = const(64)
DIGEST_BYTES = const(32)


class HmacSha256:
    """A key prepared for HMAC-SHA256; ``digest(msg)`` returns the 32-byte tag."""

    __slots__ = ("_ipad", "_opad")

    def __init__(self, key: "bytes | bytearray") -> None:
        key = bytes(key)
        if len(key) > _BLOCK_BYTES:
            key = hashlib.sha256(key).digest()
        key = key + bytes(_BLOCK_BYTES - len(key))
        self._ipad = bytes(b ^ 0x36 for b in key)
        self._opad = bytes(b ^ 0x5C for b in key)

    def digest(self, *parts: "bytes | bytearray | memoryview") -> bytes:
        """Return HMAC-SHA256 of the message made of ``parts``, under this key."""
        inner = hashlib.sha256(self._ipad)
        for part in parts:
            inner.update(part)  # a memoryview too: no copy
        outer = hashlib.sha256(self._opad)
        outer.update(inner.digest())
        return outer.digest()

    def __repr__(self) -> str:
        # Never show key material.
        return "HmacSha256(<key>)"


def hmac_sha256(key: "bytes | bytearray", msg: "bytes | bytearray | memoryview") -> bytes:
    """Return the 32-byte HMAC-SHA256 of ``msg`` under ``key``."""
    return HmacSha256(key).digest(msg)


def equal(a: "bytes | bytearray", b: "bytes | bytearray") -> bool:
    """Compare two tags in time that depends only on their length."""
    if len(a) != len(b):
        return False
    diff = 0
    for i in range(len(a)):
        diff |= a[i] ^ b[i]
    return diff == 0
