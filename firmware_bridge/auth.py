"""Frames authenticated with a pre-shared key: counters and HMAC-SHA256 tags.

docs/serial-protocol.md, section 6. The link imports this module only when
it is given a key, so a board that runs without one never loads it.

Each frame carries a counter that strictly increases per sender epoch and a
16-byte tag over (sender epoch, receiver epoch, body). A receiver remembers
the last counter it accepted from the peer's current epoch and from the
``_SEEN_EPOCHS`` before it, so a recorded frame is refused as a replay.

Runs unchanged on CPython 3.9+ and MicroPython.
"""

import struct

from .cobs import FrameError
from .frame import (
    AUTH_BYTES,
    COUNTER_BYTES,
    MAX_PSK_BYTES,
    MIN_PSK_BYTES,
    TAG_BYTES,
    U32_MAX,
    LinkUsageError,
    hex_preview,
)
from .hmac_sha256 import HmacSha256, equal

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef]
        return x


_SEEN_EPOCHS = const(4)  # peer epochs whose last counter is remembered


class Auth:
    """One side's key, its own counter, and the counters it accepted from the peer."""

    __slots__ = ("_mac", "_rx_counter", "_rx_epoch", "_seen", "tx_counter")

    def __init__(self, psk: "bytes | bytearray") -> None:
        if not isinstance(psk, (bytes, bytearray)):
            raise LinkUsageError(f"psk should be bytes, got {type(psk).__name__}")
        if not MIN_PSK_BYTES <= len(psk) <= MAX_PSK_BYTES:
            # The length only: a message never shows key material.
            raise LinkUsageError(
                f"psk of {len(psk)} bytes is outside {MIN_PSK_BYTES}..{MAX_PSK_BYTES}"
            )
        self._mac = HmacSha256(psk)
        self.tx_counter = 0  # the last counter we sent under our epoch
        self._rx_epoch = 0  # the peer epoch whose counter is _rx_counter
        self._rx_counter = 0
        self._seen = []  # [epoch, last counter] of earlier peer epochs, newest last

    def __repr__(self) -> str:
        return "Auth(<key>)"  # never key material

    def next_counter(self) -> bytes:
        """Count one more frame sent and return its counter field."""
        if self.tx_counter >= U32_MAX:
            raise LinkUsageError(
                "auth counter exhausted after 2**32-1 frames: restart the link with a new epoch"
            )
        self.tx_counter += 1
        return struct.pack(">I", self.tx_counter)

    def tag(self, sender: int, receiver: int, body: "bytes | bytearray") -> bytes:
        """The tag that ends ``body`` sent from epoch ``sender`` to ``receiver``."""
        return self._mac.digest(struct.pack(">II", sender, receiver), body)[:TAG_BYTES]

    def open(self, body: bytes, pos: int, name: str) -> "tuple[int, bytes]":
        """Split an authenticated body at ``pos`` into (counter, fields). Raises FrameError
        ("auth failure")."""
        if len(body) < pos + AUTH_BYTES:
            raise FrameError(
                f"auth failure: {name} frame of {len(body)} bytes is too short "
                "for its counter and tag",
                "auth failure",
            )
        counter = int.from_bytes(body[pos : pos + COUNTER_BYTES], "big")
        return counter, body[pos + COUNTER_BYTES : -TAG_BYTES]

    def check(self, body: bytes, sender: int, receiver: int, counter: int, name: str) -> None:
        """Accept ``body`` from epoch ``sender``, or raise FrameError
        ("auth failure" or "replay")."""
        tag = body[-TAG_BYTES:]
        if not equal(self.tag(sender, receiver, body[:-TAG_BYTES]), tag):
            raise FrameError(
                f"auth failure: {name} frame's tag does not match (wrong key, or epochs "
                f"{sender}/{receiver} unknown to the sender): tag {hex_preview(tag)}",
                "auth failure",
            )
        last = self.last_counter(sender)
        if counter <= last:
            raise FrameError(
                f"replay: {name} frame's counter {counter} is not above {last}, "
                f"the last accepted from epoch {sender}",
                "replay",
            )
        if sender != self._rx_epoch:
            if self._rx_epoch:
                self._seen.append([self._rx_epoch, self._rx_counter])
                if len(self._seen) > _SEEN_EPOCHS:
                    self._seen.pop(0)
            self._rx_epoch = sender
        self._rx_counter = counter

    def last_counter(self, sender: int) -> int:
        """The last counter accepted from epoch ``sender`` (0 if none)."""
        if sender == self._rx_epoch:
            return self._rx_counter
        for epoch, counter in self._seen:
            if epoch == sender:
                return counter
        return 0
