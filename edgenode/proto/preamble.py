"""The preamble a dialler sends before TLS.

Python's ``ssl`` module cannot accept a certificate through a callback, so a
listener can only verify a client certificate that is already in its trust
store. The dialler therefore opens every connection with its certificate in
the clear::

    magic "EDGN" | version (1 byte) | certificate length (2 bytes, big-endian) | DER

The listener computes the node ID from the certificate, refuses it before
any TLS work if that ID is not authorised, and otherwise pins the
certificate in its trust store. The TLS 1.3 handshake that follows proves
the dialler owns the certificate's key.
"""

from __future__ import annotations

from ..errors import BadPreamble, hexdump

MAGIC = b"EDGN"
PREAMBLE_VERSION = 1
HEAD_BYTES = 7
#: The largest certificate a node accepts, in a preamble or anywhere else (an
#: Ed25519 self-signed certificate is about 300 bytes). Defined once, here.
MAX_CERT_BYTES = 2048
_TLS_HANDSHAKE_RECORD = 0x16


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
