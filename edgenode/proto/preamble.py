"""The preamble a dialler sends before TLS.

Python's ``ssl`` module cannot accept a certificate through a callback, so a
listener can only verify a client certificate that is already in its trust
store. The dialler therefore opens every connection with its certificate in
the clear::

    magic "EDGN" | version (1 byte) | certificate length (2 bytes, big-endian) | DER

The listener computes the node ID from the certificate and answers with
its verdict, before any TLS work::

    accepted: 0x01                                   (TLS 1.3 follows)
    refused:  0x00 | reason length (1 byte) | reason (ASCII), then close

so a dialler the listener does not trust learns that it was refused, and
why, instead of seeing the connection close. On acceptance the listener
pins the certificate in its trust store; the TLS 1.3 handshake that
follows proves the dialler owns the certificate's key. The dialler sends
its ClientHello without waiting for the verdict: accepting costs no round
trip.

Version 2 of the preamble added the verdict.
"""

from __future__ import annotations

from ..errors import BadPreamble, PeerRefused, hexdump

MAGIC = b"EDGN"
PREAMBLE_VERSION = 2
HEAD_BYTES = 7
#: The largest certificate a node accepts, in a preamble or anywhere else (an
#: Ed25519 self-signed certificate is about 300 bytes). Defined once, here.
MAX_CERT_BYTES = 2048
_TLS_HANDSHAKE_RECORD = 0x16
#: The listener's verdict on a preamble.
ACCEPTED = b"\x01"
_REFUSED = 0x00
_MAX_REASON_BYTES = 255
#: Why a listener refuses a dialler it does not trust.
NOT_AUTHORISED = "not authorised"


def encode_preamble(cert_der: bytes) -> bytes:
    """Return the preamble carrying ``cert_der``."""
    if not 0 < len(cert_der) <= MAX_CERT_BYTES:
        raise ValueError(f"certificate of {len(cert_der)} bytes; limit is {MAX_CERT_BYTES}")
    return MAGIC + bytes([PREAMBLE_VERSION]) + len(cert_der).to_bytes(2, "big") + cert_der


def parse_preamble(buf: bytes) -> tuple[bytes, int] | None:
    """Parse a preamble at the start of ``buf``.

    Returns ``(cert_der, bytes_consumed)``, or None if more bytes are
    needed. Raises :class:`BadPreamble` as soon as the bytes cannot be a
    preamble, so garbage is refused without waiting for more of it.
    """
    got = bytes(buf[: len(MAGIC)])
    if got != MAGIC[: len(got)]:
        hint = ""
        if got[:1] == bytes([_TLS_HANDSHAKE_RECORD]):
            hint = " (a plain TLS client? edgenode dialers send a preamble first)"
        raise BadPreamble(
            f"expected preamble magic {MAGIC.hex(' ')} ('EDGN'), got {hexdump(buf)}{hint}"
        )
    if len(buf) < HEAD_BYTES:
        return None
    version = buf[4]
    if version != PREAMBLE_VERSION:
        raise BadPreamble(f"preamble version {version} not supported; expected {PREAMBLE_VERSION}")
    length = int.from_bytes(buf[5:7], "big")
    if not 0 < length <= MAX_CERT_BYTES:
        raise BadPreamble(f"preamble certificate length {length} outside 1..{MAX_CERT_BYTES}")
    if len(buf) < HEAD_BYTES + length:
        return None
    return bytes(buf[HEAD_BYTES : HEAD_BYTES + length]), HEAD_BYTES + length


def encode_refusal(reason: str) -> bytes:
    """The listener's refusal of a preamble, with ``reason`` (ASCII, cut to fit)."""
    raw = reason.encode("ascii", errors="replace")[:_MAX_REASON_BYTES]
    return bytes((_REFUSED, len(raw))) + raw


def parse_verdict(buf: bytes, name: str = "peer") -> int | None:
    """Read the listener's verdict at the start of ``buf``.

    Returns how many bytes it took (1) when the preamble was accepted, or
    None if more bytes are needed. Raises :class:`PeerRefused` with the
    listener's reason when it refused, and :class:`BadPreamble` for anything
    else (``name`` heads the messages).
    """
    if not buf:
        return None
    if buf[:1] == ACCEPTED:
        return 1
    if buf[0] != _REFUSED:
        raise BadPreamble(
            f"{name}: expected the listener's verdict (01 or 00), got {hexdump(buf)}"
        )
    if len(buf) < 2 or len(buf) < 2 + buf[1]:
        return None
    reason = bytes(buf[2 : 2 + buf[1]]).decode("ascii", errors="replace")
    raise PeerRefused(f"{name}: the peer refused this node: {reason}")
