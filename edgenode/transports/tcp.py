"""TLS 1.3 over TCP: the thin I/O layer under the node.

Everything protocol-shaped lives in ``edgenode.proto``; this module only
moves bytes: it connects or accepts a socket, exchanges the preamble, runs
the TLS handshake and returns an authenticated byte stream with the peer's
node ID. The node calls these inside its own tasks, under its own
timeouts; nothing here waits without a bound set by the caller.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

import anyio
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.tls import TLSAttribute, TLSStream

from ..errors import EdgeNodeError, HandshakeError, IdentityError, NotAuthorised
from ..identity import PinnedContexts, node_id_from_cert_der
from ..proto.preamble import HEAD_BYTES, encode_preamble, parse_preamble
from ..registry import normalise_ip


class Link:
    """An authenticated TLS stream and what the handshake proved."""

    __slots__ = ("local_ip", "peer_ip", "peer_node_id", "peer_port", "stream")

    def __init__(
        self, stream: ByteStream, peer_ip: str, peer_port: int, local_ip: str, peer_node_id: str
    ) -> None:
        self.stream = stream
        self.peer_ip = peer_ip
        self.peer_port = peer_port
        self.local_ip = local_ip
        self.peer_node_id = peer_node_id


def addresses(stream: ByteStream) -> tuple[str, int, str]:
    """Return (peer ip, peer port, local ip) of a socket stream, normalised."""
    peer = stream.extra(SocketAttribute.remote_address)
    local = stream.extra(SocketAttribute.local_address)
    return normalise_ip(peer[0]), int(peer[1]), normalise_ip(local[0])


async def _receive_exactly(stream: ByteStream, n: int, buf: bytearray) -> None:
    # receive(max_bytes) never returns more than asked, so nothing meant for
    # the TLS layer is consumed here.
    while len(buf) < n:
        buf += await stream.receive(n - len(buf))


def _cert_node_id(der: bytes, peer_ip: str) -> str:
    try:
        return node_id_from_cert_der(der)
    except IdentityError as exc:
        raise HandshakeError(f"{peer_ip}: bad peer certificate: {exc}") from None


async def _peer_id(tls: TLSStream, peer_ip: str) -> str:
    der = tls.extra(TLSAttribute.peer_certificate_binary)
    if not der:
        raise HandshakeError(f"{peer_ip}: peer sent no certificate")
    return _cert_node_id(der, peer_ip)


async def accept_link(
    stream: ByteStream,
    *,
    contexts: PinnedContexts,
    is_authorised: Callable[[str], bool],
) -> Link:
    """Run the listener's side of a handshake on an accepted socket.

    Reads the preamble, refuses an unauthorised node ID before any TLS
    work, and completes TLS 1.3 with a context that trusts exactly the
    certificate the preamble carried. Raises
    :class:`BadPreamble`, :class:`NotAuthorised` or :class:`HandshakeError`.
    The caller bounds it with a timeout.
    """
    peer_ip, peer_port, local_ip = addresses(stream)
    buf = bytearray()
    await _receive_exactly(stream, HEAD_BYTES, buf)
    parsed = parse_preamble(buf)
    while parsed is None:
        need = HEAD_BYTES + int.from_bytes(buf[5:7], "big")
        await _receive_exactly(stream, need, buf)
        parsed = parse_preamble(buf)
    cert_der, _ = parsed
    node_id = _cert_node_id(cert_der, peer_ip)
    if not is_authorised(node_id):
        raise NotAuthorised(f"{peer_ip}: node {node_id} is not authorised")
    context = contexts.for_certificate(cert_der, node_id)
    tls = await _wrap(stream, context, server_side=True, peer_ip=peer_ip)
    proved = await _peer_id(tls, peer_ip)
    if proved != node_id:
        # Possible only if the dialler owns the key of another pinned node.
        raise HandshakeError(
            f"{peer_ip}: preamble named node {node_id} but tls proved node {proved}"
        )
    return Link(tls, peer_ip, peer_port, local_ip, node_id)


async def dial_link(
    ip: str,
    port: int,
    *,
    context: ssl.SSLContext,
    cert_der: bytes,
    local_host: str | None,
    is_authorised: Callable[[str], bool],
) -> Link:
    """Connect to a peer, send the preamble and complete TLS 1.3.

    Raises :class:`NotAuthorised` if the listener's node ID is not
    authorised and :class:`HandshakeError` when the connection or TLS fails.
    The caller bounds it with a timeout.
    """
    try:
        stream = await anyio.connect_tcp(ip, port, local_host=local_host)
    except OSError as exc:
        # anyio reports "all connection attempts failed"; the cause says why.
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        detail = (os.strerror(cause.errno) if cause.errno else str(cause)).lower()
        raise HandshakeError(f"{ip}:{port}: cannot connect: {detail}") from None
    try:
        peer_ip, peer_port, local_ip = addresses(stream)
        await stream.send(encode_preamble(cert_der))
        tls = await _wrap(stream, context, server_side=False, peer_ip=peer_ip)
        node_id = await _peer_id(tls, peer_ip)
        if not is_authorised(node_id):
            raise NotAuthorised(f"{peer_ip}: node {node_id} is not authorised")
        return Link(tls, peer_ip, peer_port, local_ip, node_id)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise


async def _wrap(stream: ByteStream, context: ssl.SSLContext, *, server_side: bool, peer_ip: str):
    try:
        return await TLSStream.wrap(
            stream, server_side=server_side, ssl_context=context, standard_compatible=False
        )
    except EdgeNodeError:
        raise
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        raise HandshakeError(f"{peer_ip}: tls handshake failed: {reason.lower()}") from None
    except (anyio.BrokenResourceError, anyio.EndOfStream, OSError) as exc:
        raise HandshakeError(
            f"{peer_ip}: connection closed during tls handshake ({type(exc).__name__})"
        ) from None
