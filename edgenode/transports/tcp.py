"""TLS 1.3 over TCP: the thin I/O layer under the node.

Everything protocol-shaped lives in ``edgenode.proto``; this module only
moves bytes: it connects or accepts a socket, exchanges the preamble, runs
the TLS handshake and returns an authenticated byte stream with the peer's
node ID. The node calls these inside its own tasks, under its own
timeouts; nothing here waits without a bound set by the caller.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.tls import TLSAttribute, TLSStream

from ..errors import EdgeNodeError, HandshakeError, IdentityError, NotAuthorised, PeerRefused
from ..identity import node_id_from_cert_der
from ..ips import normalise_ip
from ..proto.preamble import (
    ACCEPTED,
    HEAD_BYTES,
    NOT_AUTHORISED,
    encode_preamble,
    encode_refusal,
    parse_preamble,
    parse_verdict,
)
from ..refusals import address_group
from ..tls import PinnedContexts, ssl_reason


class Unreachable(HandshakeError):
    """A dial found no listener: the connect was refused, unreachable or unanswered.

    It cost the peer nothing, unlike a failure after the connect: the
    redial rules retry it soon (:mod:`edgenode.redial`, rule 3).
    """


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


def addresses(stream: ByteStream, name: str = "peer") -> tuple[str, int, str]:
    """Return (peer ip, peer port, local ip) of a socket stream, normalised.

    Raises :class:`HandshakeError` naming ``name`` if the connection was
    reset before its addresses could be read.
    """
    # One lookup of the attribute table: building it is most of the cost.
    attributes = stream.extra_attributes
    try:
        peer = attributes[SocketAttribute.remote_address]()
        local = attributes[SocketAttribute.local_address]()
    except (KeyError, OSError):
        # getpeername() fails once the peer has reset the connection.
        raise HandshakeError(f"{name}: connection reset before it could be used") from None
    return normalise_ip(peer[0]), int(peer[1]), normalise_ip(local[0])


class HandshakeAdmission:
    """Which accepted connections may start a handshake. Pure: time comes in.

    A handshake costs the listener a socket, a task and, once a preamble
    names an authorised node (certificates are public), a TLS session, all
    before anything is proved about the peer. So each accepted connection
    meets three limits, checked before anything is spent on it:

    - at most ``max_per_ip`` handshakes in progress from one address;
    - at most ``max_total`` in progress in all, for many addresses each
      under its cap (one left half done in TLS holds a descriptor and
      ~60 KB);
    - on average at most ``rate_per_ip`` new handshakes a second from one
      address, in bursts of up to ``2 * max_per_ip``. A connection that
      closes at once frees its slot at once, so the caps alone would let
      one address keep the node running handshakes as fast as it can
      connect.

    "One address" is an IPv4 address, or an IPv6 address's /64
    (:func:`~edgenode.refusals.address_group`): a host on an IPv6 network
    can use any address of its /64, so per-address limits on single
    addresses would not limit it at all.

    A connection over a limit is reset at once. What is logged about the
    refusals is the node's :class:`~edgenode.refusals.RefusalLog`'s
    business: a flood must not make the node log a line, or queue an
    event, per connection.
    """

    __slots__ = (
        "_by_group",
        "_tokens",
        "burst",
        "in_progress",
        "max_per_ip",
        "max_total",
        "max_tracked_ips",
        "rate_per_ip",
    )

    def __init__(
        self,
        *,
        max_per_ip: int,
        max_total: int,
        rate_per_ip: float,
        max_tracked_ips: int = 1024,
    ) -> None:
        self.max_per_ip = max_per_ip
        self.max_total = max_total
        self.rate_per_ip = rate_per_ip
        self.burst = 2 * max_per_ip
        self.max_tracked_ips = max_tracked_ips
        #: Handshakes in progress, in all and per address group.
        self.in_progress = 0
        self._by_group: dict[str, int] = {}
        # group -> [tokens, when counted]; least recently used first.
        self._tokens: OrderedDict[str, list[float]] = OrderedDict()

    def in_progress_from(self, ip: str) -> int:
        """Handshakes in progress from ``ip`` (from its /64, for IPv6)."""
        return self._by_group.get(address_group(ip), 0)

    def admit(self, ip: str, now: float) -> str | None:
        """Count a handshake from ``ip`` in and return None, or return why not."""
        group = address_group(ip)
        source = "" if group == ip else f" from {group}"
        count = self._by_group.get(group, 0)
        if count >= self.max_per_ip:
            return f"{count} handshakes already in progress{source} (limit {self.max_per_ip})"
        if self.in_progress >= self.max_total:
            return (
                f"{self.in_progress} handshakes in progress from all addresses "
                f"(limit {self.max_total})"
            )
        bucket = self._tokens.pop(group, None)
        if bucket is None:
            bucket = [float(self.burst), now]
        else:
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate_per_ip)
            bucket[1] = now
        self._tokens[group] = bucket
        if len(self._tokens) > self.max_tracked_ips:
            self._tokens.popitem(last=False)
        if bucket[0] < 1.0:
            return (
                f"handshakes{source} arriving faster than {self.rate_per_ip:g} a second "
                f"(bursts of up to {self.burst})"
            )
        bucket[0] -= 1.0
        self._by_group[group] = count + 1
        self.in_progress += 1
        return None

    def finished(self, ip: str) -> None:
        """Count out a handshake :meth:`admit` counted in (it ended either way)."""
        group = address_group(ip)
        left = self._by_group[group] - 1
        if left:
            self._by_group[group] = left
        else:
            del self._by_group[group]
        self.in_progress -= 1


_LINGER_RESET = struct.pack("ii", 1, 0)


#: Linux's TCP_CLOSE_WAIT (include/net/tcp_states.h): the peer has closed its side.
_TCP_CLOSE_WAIT = 8


def closed_before_accept(sock: socket.socket) -> bool:
    """Whether the peer closed ``sock`` before it was accepted.

    A dial that waited in the accept queue while this node could not
    accept (stopped, or its loop held up) and that its node gave up on: the
    kernel completed the TCP handshake and queued the dialler's preamble,
    then its FIN. Nobody waits for an answer. Read from TCP_INFO's state,
    one system call; False where TCP_INFO is not offered (not Linux).
    """
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, option, 1)[0] == _TCP_CLOSE_WAIT
    except OSError:
        return False


def refuse_socket(sock: socket.socket) -> None:
    """Close an accepted socket with a reset: no FIN handshake, no TIME_WAIT kept."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


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
    name: str = "peer",
) -> Link:
    """Run the listener's side of a handshake on an accepted socket.

    Reads the preamble, refuses an unauthorised node ID before any TLS
    work, and completes TLS 1.3 with a context that trusts exactly the
    certificate the preamble carried. Raises
    :class:`BadPreamble`, :class:`NotAuthorised` or :class:`HandshakeError`
    (``name``, the peer's address, heads a message when no other is known).
    The caller bounds it with a timeout.
    """
    peer_ip, peer_port, local_ip = addresses(stream, name)
    buf = bytearray()
    parsed = None
    while parsed is None:
        # Parse after every read, so that a wrong byte is refused when it
        # arrives, not after the peer has sent (or stalled before) the rest.
        # receive(max_bytes) never returns more than asked, so nothing meant
        # for the TLS layer is consumed here.
        need = HEAD_BYTES
        if len(buf) >= HEAD_BYTES:
            need += int.from_bytes(buf[5:7], "big")
        buf += await stream.receive(need - len(buf))
        parsed = parse_preamble(buf)
    cert_der, _ = parsed
    node_id = _cert_node_id(cert_der, peer_ip)
    if not is_authorised(node_id):
        # Say so, so that the dialler's error names the cause; then close.
        try:
            await stream.send(encode_refusal(NOT_AUTHORISED))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        raise NotAuthorised(f"{peer_ip}: node {node_id} is not authorised")
    await stream.send(ACCEPTED)
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
    connect_timeout_s: float | None = None,
) -> Link:
    """Connect to a peer, send the preamble and complete TLS 1.3.

    Raises :class:`Unreachable` when the connect fails or is not answered
    within ``connect_timeout_s`` (nothing listens: the peer is away),
    :class:`NotAuthorised` if the listener's node ID is not authorised and
    :class:`HandshakeError` when the connection or TLS fails after the
    connect. The caller bounds the whole dial with a timeout; make
    ``connect_timeout_s`` shorter than that, or a connect that is never
    answered is reported as the whole dial's timeout instead.
    """
    try:
        with anyio.fail_after(connect_timeout_s):
            stream = await anyio.connect_tcp(ip, port, local_host=local_host)
    except TimeoutError:
        raise Unreachable(
            f"{ip}:{port}: cannot connect: no answer within {connect_timeout_s} s"
        ) from None
    except OSError as exc:
        # anyio reports "all connection attempts failed"; the cause says why.
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        detail = (os.strerror(cause.errno) if cause.errno else str(cause)).lower()
        raise Unreachable(f"{ip}:{port}: cannot connect: {detail}") from None
    try:
        peer_ip, peer_port, local_ip = addresses(stream, f"{ip}:{port}")
        await stream.send(encode_preamble(cert_der))
        # The ClientHello goes out at once; the listener's verdict on the
        # preamble comes back ahead of its TLS records.
        after_verdict = _AfterVerdict(stream, peer_ip, node_id_from_cert_der(cert_der))
        tls = await _wrap(after_verdict, context, server_side=False, peer_ip=peer_ip)
        node_id = await _peer_id(tls, peer_ip)
        if not is_authorised(node_id):
            raise NotAuthorised(f"{peer_ip}: node {node_id} is not authorised")
        return Link(tls, peer_ip, peer_port, local_ip, node_id)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise


class _AfterVerdict(ByteStream):
    """The dialler's raw stream, read past the listener's verdict on its preamble.

    The first ``receive`` reads the verdict (edgenode.proto.preamble) and
    raises :class:`PeerRefused` if the listener refused this node; after
    that every call passes straight through.
    """

    def __init__(self, stream: ByteStream, peer_ip: str, our_node_id: str) -> None:
        self._stream = stream
        self._peer_ip = peer_ip
        self._our_node_id = our_node_id
        self._verdict_read = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._verdict_read:
            return await self._stream.receive(max_bytes)
        buf = b""
        while True:
            try:
                buf += await self._stream.receive(max_bytes)
            except anyio.EndOfStream:
                raise HandshakeError(
                    f"{self._peer_ip}: connection closed by the peer before it answered "
                    "the preamble"
                ) from None
            try:
                taken = parse_verdict(buf, self._peer_ip)
            except PeerRefused as exc:
                raise PeerRefused(
                    f"{exc}; it does not trust this node {self._our_node_id} "
                    f"(there: edgenode authorise {self._our_node_id})"
                ) from None
            if taken is not None:
                break
        self._verdict_read = True
        rest = buf[taken:]
        return rest if rest else await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._stream.extra_attributes


async def _wrap(stream: ByteStream, context: ssl.SSLContext, *, server_side: bool, peer_ip: str):
    try:
        return await TLSStream.wrap(
            stream, server_side=server_side, ssl_context=context, standard_compatible=False
        )
    except EdgeNodeError:
        raise
    except ssl.SSLError as exc:
        raise HandshakeError(f"{peer_ip}: tls handshake failed: {ssl_reason(exc)}") from None
    except (anyio.BrokenResourceError, anyio.EndOfStream):
        raise HandshakeError(f"{peer_ip}: connection closed during tls handshake") from None
    except OSError as exc:
        raise HandshakeError(
            f"{peer_ip}: connection failed during tls handshake: {exc.strerror or exc}"
        ) from None
