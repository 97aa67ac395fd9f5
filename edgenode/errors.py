"""The one error hierarchy of edgenode.

Every error the package raises on purpose is an :class:`EdgeNodeError`.
Messages are lowercase, say what was expected, what arrived and the limit,
show bytes as truncated hex, and never contain key material.
"""

from __future__ import annotations


def hexdump(data: bytes, limit: int = 16) -> str:
    """Show ``data`` as hex, truncated to ``limit`` bytes for messages."""
    shown = bytes(data[:limit]).hex(" ")
    if len(data) > limit:
        shown += f" ... ({len(data)} bytes)"
    return shown


class EdgeNodeError(Exception):
    """Base of every error edgenode raises on purpose."""


class ConfigError(EdgeNodeError):
    """A setting, argument or file given by the user is not valid."""


class InvalidNodeId(ConfigError):
    """A node ID is not well-formed or its checksum does not match."""


class InvalidAddress(EdgeNodeError, ValueError):
    """Text that should be an IP address, or a number that should be a port, is not.

    Neutral about blame: where the value came from the user, the caller
    raises a :class:`ConfigError` or :class:`InvalidArgument` instead; where
    it came from a peer, the peer's data is refused or ignored.
    """


class ListenError(EdgeNodeError):
    """The listen address is busy or not (yet) on this host: worth retrying,
    unlike a :class:`ConfigError` (exit status 1, not 2)."""


class IdentityError(EdgeNodeError):
    """The node's key or certificate is missing, unreadable or malformed."""


class InsecureKeyFile(IdentityError):
    """The private key file or state directory can be read by others."""


class ProtocolError(EdgeNodeError):
    """Bytes from a peer broke the wire protocol; the connection is dropped."""


class BadPreamble(ProtocolError):
    """The connection did not open with a valid edgenode preamble."""


class FrameTooLarge(ProtocolError):
    """A frame's length prefix exceeds the frame-size limit."""


class TruncatedFrame(ProtocolError):
    """The stream ended in the middle of a frame."""


class MalformedMessage(ProtocolError):
    """A frame is not valid CBOR, or not a well-formed message."""


class UnknownMessageType(ProtocolError):
    """A message carries a type code this node does not know."""


class VersionMismatch(ProtocolError):
    """The peer speaks a protocol version this node does not."""


class UnexpectedMessage(ProtocolError):
    """A message arrived that is not allowed in the connection's state."""


class InvalidArgument(EdgeNodeError, ValueError):
    """An API call was given a value it cannot use (bad topic, oversize payload)."""


class HandshakeError(EdgeNodeError):
    """A connection failed before both sides had exchanged hellos."""


class NotAuthorised(HandshakeError):
    """The peer's node ID is not in the authorised list."""


class PeerRefused(HandshakeError):
    """The peer refused our connection before TLS (it does not trust this node)."""


class AdmissionRefused(HandshakeError):
    """The registry refused a connection (duplicate, table full, ID clash)."""


class PeerUnavailable(EdgeNodeError):
    """The peer is not connected, or went down before the operation ended."""


class RequestTimeout(EdgeNodeError, TimeoutError):
    """No response to a request arrived within its timeout."""


class RemoteError(EdgeNodeError):
    """The peer answered a request with an error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"remote error {code}: {message}")
        self.code = code
        self.remote_message = message


class NodeClosed(EdgeNodeError):
    """The node is closed or closing; no new operations are accepted."""


class SlowPeer(EdgeNodeError):
    """A peer's outbox overflowed; best-effort traffic was dropped or the link closed."""


class TooManyPending(EdgeNodeError):
    """A limit on requests or handlers in flight was reached."""


class SubscriberStalled(EdgeNodeError):
    """A subscription took nothing for longer than its stall timeout and was ended."""
