"""TLS 1.3 contexts for a node's identity, and the node ID of a TLS peer.

Every link between nodes is mutual TLS 1.3 with the standard library's
``ssl``; the key and certificate are the node's identity
(:mod:`edgenode.identity`), read from its files by the contexts themselves.

How mutual TLS 1.3 works without a verify callback (``ssl`` has none): the
dialler sends its certificate in a plaintext preamble; the listener checks
that the certificate's node ID is authorised and answers with a server
context whose trust store holds only that certificate
(:class:`PinnedContexts`); the TLS handshake then proves that the dialler
owns the key. The dialler does not verify the
listener's chain (``CERT_NONE``) but reads the listener's node ID with
:func:`peer_node_id` right after the handshake, where TLS 1.3's
CertificateVerify has already proved the listener owns that key.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING

from .errors import HandshakeError, IdentityError, InvalidArgument
from .identity import node_id_from_cert_der

if TYPE_CHECKING:
    import ssl

    from .identity import Identity

__all__ = [
    "PinnedContexts",
    "client_context",
    "peer_node_id",
    "server_context",
    "ssl_reason",
]


def ssl_reason(exc: ssl.SSLError) -> str:
    """Describe an ``ssl`` error for a message: OpenSSL's reason as words
    (``CERTIFICATE_VERIFY_FAILED`` -> ``certificate verify failed``), or its
    text without the C source line."""
    if exc.reason:
        return exc.reason.lower().replace("_", " ")
    text = str(exc)
    cut = text.rfind(" (_ssl.c:")
    return text[:cut] if cut >= 0 else text


def _tls13_context(protocol: int, identity: Identity) -> ssl.SSLContext:
    import ssl

    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    except ssl.SSLError as exc:
        raise IdentityError(
            f"cannot use key file {identity.key_path} with certificate "
            f"{identity.cert_path}: {ssl_reason(exc)}"
        ) from None
    except OSError as exc:
        raise IdentityError(
            f"cannot read {identity.key_path} or {identity.cert_path}: {exc.strerror}"
        ) from None
    return ctx


def server_context(identity: Identity) -> ssl.SSLContext:
    """Return a TLS 1.3 server context that requires a client certificate.

    Its trust store starts empty, so it accepts no dialler until a
    certificate is loaded into it (see :class:`PinnedContexts`). Raises
    :class:`IdentityError` if the key and certificate cannot be loaded or
    do not match.
    """
    import ssl

    ctx = _tls13_context(ssl.PROTOCOL_TLS_SERVER, identity)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Diallers never resume sessions: every connection proves its key, and
    # the server spends no bytes or memory on tickets.
    ctx.num_tickets = 0
    return ctx


def client_context(identity: Identity) -> ssl.SSLContext:
    """Return a TLS 1.3 client context that presents this node's certificate.

    It does not verify the listener's certificate chain: the caller checks
    the listener's node ID with :func:`peer_node_id` after the handshake.
    Raises :class:`IdentityError` as :func:`server_context` does.
    """
    import ssl

    ctx = _tls13_context(ssl.PROTOCOL_TLS_CLIENT, identity)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class PinnedContexts:
    """Server TLS contexts, one per distinct dialler certificate (bounded LRU).

    Each context trusts exactly one certificate. ``ssl`` cannot remove a
    certificate from a context, and the listener pins what a plaintext
    preamble carries before TLS has proved anything, so a shared context
    would let a forged certificate carrying an authorised node's public
    key, pinned first, lock that node out. Here a forged certificate is
    only ever trusted in its own context: the real certificate gets a
    context of its own, and TLS still admits only the holder of the key.

    Contexts are keyed by the SHA-256 of the certificate; beyond
    ``max_entries`` the least recently used is dropped. Dropping one only
    forgets our reference: connections using it keep it alive.
    """

    __slots__ = ("_contexts", "_identity", "_max_entries")

    def __init__(self, identity: Identity, max_entries: int = 64) -> None:
        """Raise :class:`InvalidArgument` if ``max_entries`` is below 1."""
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise InvalidArgument(f"max_entries: expected an integer >= 1, got {max_entries!r}")
        self._identity = identity
        self._max_entries = max_entries
        self._contexts: OrderedDict[bytes, ssl.SSLContext] = OrderedDict()

    def __len__(self) -> int:
        return len(self._contexts)

    def for_certificate(self, cert_der: bytes, node_id: str) -> ssl.SSLContext:
        """Return a server context that trusts ``cert_der`` and nothing else.

        ``node_id`` must be the certificate's node ID (the caller has
        checked it is authorised). Raises :class:`IdentityError` if it is
        not, if the certificate is not an edgenode one or cannot be loaded,
        or if this node's own key and certificate cannot be loaded.
        """
        import ssl

        actual = node_id_from_cert_der(cert_der)
        if actual != node_id:
            raise IdentityError(f"certificate is of node {actual}, not of node {node_id}")
        der = bytes(cert_der)
        digest = hashlib.sha256(der).digest()
        ctx = self._contexts.get(digest)
        if ctx is not None:
            self._contexts.move_to_end(digest)
            return ctx
        ctx = server_context(self._identity)
        try:
            ctx.load_verify_locations(cadata=der)
        except ssl.SSLError as exc:
            raise IdentityError(
                f"cannot pin the certificate of node {node_id}: {ssl_reason(exc)}"
            ) from None
        self._contexts[digest] = ctx
        if len(self._contexts) > self._max_entries:
            self._contexts.popitem(last=False)
        return ctx


def peer_node_id(tls: ssl.SSLObject | ssl.SSLSocket) -> str:
    """Return the node ID of the peer of a TLS connection after its handshake.

    Raises :class:`HandshakeError` if the peer sent no certificate, the
    handshake is not done, or the certificate is not an edgenode one.
    """
    try:
        der = tls.getpeercert(binary_form=True)
    except ValueError:  # raised before the handshake is done
        raise HandshakeError("tls handshake not complete: no peer certificate yet") from None
    if not der:
        raise HandshakeError("peer sent no certificate")
    try:
        return node_id_from_cert_der(der)
    except IdentityError as exc:
        raise HandshakeError(f"peer {exc}") from None
