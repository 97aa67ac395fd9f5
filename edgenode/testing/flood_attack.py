"""Floods against a node: the connections an attacker opens, and how the node answered.

:func:`run_flood` opens ``count`` connections of one kind (:data:`KINDS`),
``concurrency`` at once, from loopback source addresses only, bounded in
time, and counts how the node answered each (:class:`FloodResult`): reset
at once, closed how long after our last byte, or still open when we
stopped waiting. No kind but ``oversized-hello`` needs a key: connect and
close; stall before or inside the preamble; send a valid-looking preamble
(certificates are public) and stall inside TLS, from one address or many;
announce an oversized certificate; cycle forged certificates that carry an
authorised node's public key. ``oversized-hello`` completes TLS with an
authorised identity and sends a hello over the frame limit; ``mixed``
cycles through :data:`MIXED`::

    result = await run_flood("stall-mid-tls", "127.0.0.2", port, source_ips=["127.0.0.50"],
                             count=1000, concurrency=50, hold_s=3.0, cert_der=cert)

``tests/test_floods.py`` checks the node's limits with it; ``python -m
edgenode.testing.flood`` (:mod:`edgenode.testing.flood`) measures what each
kind costs the node's connected peer.
"""

from __future__ import annotations

import errno
import ipaddress
import ssl
import statistics
import time
from collections.abc import Sequence
from typing import Any

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

from ..errors import EdgeNodeError
from ..proto.preamble import HEAD_BYTES, MAGIC, PREAMBLE_VERSION, encode_preamble

#: Each kind of flood, in the order the tool runs them.
KINDS = (
    "connect-close",
    "stall-before-preamble",
    "stall-mid-preamble",
    "stall-mid-tls",
    "oversized-preamble",
    "forged-certificates",
    "oversized-hello",
    "many-ips-mid-tls",
)
#: What ``mixed`` cycles through, one kind per connection: none needs a key.
MIXED = (
    "connect-close",
    "stall-before-preamble",
    "stall-mid-preamble",
    "stall-mid-tls",
    "oversized-preamble",
)
#: Kinds that complete TLS and so need an authorised identity.
NEEDS_IDENTITY = frozenset({"oversized-hello"})
#: Kinds that send a preamble carrying a certificate.
NEEDS_CERT = frozenset({"stall-mid-tls", "forged-certificates", "many-ips-mid-tls", "mixed"})
MAX_COUNT = 100_000
MAX_CONCURRENCY = 1_000
_CONNECT_TIMEOUT_S = 5.0
_OVERSIZED_HELLO_BYTES = 1 << 24
_RESET = (errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE)


class FloodError(EdgeNodeError):
    """A flood could not be run as asked (a bad target, or it overran its time)."""


# -- what an attacker sends ------------------------------------------------------------


def client_hello() -> bytes:
    """A real TLS 1.3 ClientHello, to leave a listener's handshake half done."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def forged_certificate(cert_der: bytes, number: int) -> bytes:
    """``cert_der`` with another serial number: the same public key, so the same
    node ID, but a certificate nobody signed (its signature no longer matches).

    Each ``number`` gives a distinct certificate. Raises :class:`FloodError`
    if ``cert_der`` does not start like an X.509 v3 certificate.
    """
    der = bytearray(cert_der)
    pos = _skip_header(der, 0)  # Certificate SEQUENCE
    pos = _skip_header(der, pos)  # tbsCertificate SEQUENCE
    if der[pos] != 0xA0:
        raise FloodError("expected an x.509 v3 certificate (a [0] version field)")
    pos += 2 + der[pos + 1]  # the version field
    if der[pos] != 0x02:
        raise FloodError(f"expected the serial number integer at offset {pos}")
    length = der[pos + 1]
    if length < 5 or length > 0x7F:
        raise FloodError(f"expected a serial number of 5..127 bytes, got {length}")
    end = pos + 2 + length
    der[end - 4 : end] = (number & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(der)


def _skip_header(der: bytearray, pos: int) -> int:
    if der[pos] != 0x30:
        raise FloodError(f"expected a der sequence at offset {pos}")
    first = der[pos + 1]
    return pos + 2 + (first - 0x80 if first & 0x80 else 0)


def oversized_preamble() -> bytes:
    """A preamble head announcing a 65535-byte certificate (the limit is 2048)."""
    return MAGIC + bytes([PREAMBLE_VERSION]) + (0xFFFF).to_bytes(2, "big")


# -- a flood -------------------------------------------------------------------------------


class FloodResult:
    """What one flood did and how the node answered each connection."""

    __slots__ = (
        "attempts",
        "close_delays_s",
        "connect_errors",
        "connected",
        "duration_s",
        "errors",
        "kind",
        "refused_at_connect",
        "still_open",
    )

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.attempts = 0
        self.connected = 0
        #: Connections the node reset before we could use them (over a limit).
        self.refused_at_connect = 0
        #: Connections that failed otherwise (a connect timeout: a full backlog).
        self.connect_errors = 0
        #: For each connection the node closed: seconds from our last byte to its close.
        self.close_delays_s: list[float] = []
        #: Connections the node had not closed when we stopped waiting (hold_s).
        self.still_open = 0
        self.duration_s = 0.0
        #: The first few unexpected failures, as text.
        self.errors: list[str] = []

    def closed_within(self, seconds: float) -> int:
        """How many connections the node closed within ``seconds`` of our last byte."""
        return sum(1 for d in self.close_delays_s if d <= seconds)

    def as_dict(self) -> dict[str, Any]:
        delays = sorted(self.close_delays_s)
        return {
            "kind": self.kind,
            "attempts": self.attempts,
            "connected": self.connected,
            "refused_at_connect": self.refused_at_connect,
            "connect_errors": self.connect_errors,
            "closed_by_node": len(delays),
            "still_open": self.still_open,
            "close_delay_median_s": round(statistics.median(delays), 4) if delays else None,
            "close_delay_max_s": round(delays[-1], 4) if delays else None,
            "duration_s": round(self.duration_s, 3),
            "errors": self.errors[:5],
        }


def _check_target(host: str, source_ips: Sequence[str]) -> None:
    for what, address in [("target", host), *(("source", ip) for ip in source_ips)]:
        try:
            loopback = ipaddress.ip_address(address).is_loopback
        except ValueError:
            raise FloodError(f"{what} {address!r}: expected an ip address") from None
        if not loopback:
            raise FloodError(f"{what} {address}: floods target loopback addresses only")


async def run_flood(
    kind: str,
    host: str,
    port: int,
    *,
    source_ips: Sequence[str],
    count: int,
    concurrency: int = 50,
    hold_s: float = 10.0,
    cert_der: bytes | None = None,
    identity: Any = None,
    limit_s: float = 120.0,
) -> FloodResult:
    """Open ``count`` connections of ``kind`` to ``host:port``, ``concurrency`` at once.

    ``kind`` is one of :data:`KINDS`, or ``mixed``: each connection in turn
    one of :data:`MIXED`.

    Connections come from ``source_ips`` in turn. After its last byte each
    connection waits up to ``hold_s`` for the node to close it (make it
    longer than the node's handshake timeout). ``cert_der`` is an
    authorised node's certificate for the preamble kinds; ``identity`` an
    authorised :class:`~edgenode.identity.Identity` for ``oversized-hello``.
    Raises :class:`FloodError` for a target or source off loopback, a
    missing argument, or a flood that takes over ``limit_s``.
    """
    if kind not in KINDS and kind != "mixed":
        raise FloodError(f"flood kind {kind!r}: expected mixed or one of {', '.join(KINDS)}")
    if not source_ips:
        raise FloodError("source_ips: expected at least one address")
    _check_target(host, source_ips)
    if not 1 <= count <= MAX_COUNT:
        raise FloodError(f"count: expected 1..{MAX_COUNT}, got {count}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise FloodError(f"concurrency: expected 1..{MAX_CONCURRENCY}, got {concurrency}")
    if kind in NEEDS_CERT and cert_der is None:
        raise FloodError(f"{kind}: needs cert_der, an authorised node's certificate")
    if kind in NEEDS_IDENTITY and identity is None:
        raise FloodError(f"{kind}: needs identity, an authorised identity")
    result = FloodResult(kind)
    hello = client_hello() if kind in NEEDS_CERT else b""
    client_ctx = None
    if kind in NEEDS_IDENTITY:
        from ..tls import client_context

        client_ctx = client_context(identity)
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(index: int) -> None:
        async with limiter:
            await _one(
                MIXED[index % len(MIXED)] if kind == "mixed" else kind,
                host,
                port,
                source_ips[index % len(source_ips)],
                index,
                result,
                hold_s=hold_s,
                cert_der=cert_der,
                hello=hello,
                identity=identity,
                client_ctx=client_ctx,
            )

    started = time.monotonic()
    try:
        with anyio.fail_after(limit_s):
            async with anyio.create_task_group() as tg:
                for index in range(count):
                    tg.start_soon(one, index)
    except TimeoutError:
        raise FloodError(
            f"{kind}: {count} connections took over {limit_s} s ({result.attempts} started)"
        ) from None
    result.duration_s = time.monotonic() - started
    return result


async def _one(
    kind: str,
    host: str,
    port: int,
    source_ip: str,
    index: int,
    result: FloodResult,
    *,
    hold_s: float,
    cert_der: bytes | None,
    hello: bytes,
    identity: Any,
    client_ctx: Any,
) -> None:
    result.attempts += 1
    stream: Any = None
    try:
        with anyio.fail_after(_CONNECT_TIMEOUT_S):
            if kind == "oversized-hello":
                from ..transports.tcp import dial_link

                link = await dial_link(
                    host,
                    port,
                    context=client_ctx,
                    cert_der=identity.cert_der,
                    local_host=source_ip,
                    is_authorised=lambda _node_id: True,
                )
                stream = link.stream
            else:
                stream = await anyio.connect_tcp(host, port, local_host=source_ip)
    except (OSError, TimeoutError, EdgeNodeError, BrokenResourceError, EndOfStream) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        if getattr(cause, "errno", None) in _RESET or isinstance(exc, EdgeNodeError):
            # The node reset it at once (over a limit): the connect, or the
            # TLS handshake of an oversized-hello, failed.
            result.refused_at_connect += 1
        else:
            result.connect_errors += 1
            if len(result.errors) < 5:
                result.errors.append(f"connect: {type(exc).__name__}: {exc}")
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        return
    result.connected += 1
    try:
        if kind == "connect-close":
            return
        if kind == "stall-mid-preamble":
            await stream.send(MAGIC[:3])
        elif kind in ("stall-mid-tls", "many-ips-mid-tls"):
            assert cert_der is not None
            await stream.send(encode_preamble(cert_der) + hello)
        elif kind == "forged-certificates":
            assert cert_der is not None
            await stream.send(encode_preamble(forged_certificate(cert_der, index)) + hello)
        elif kind == "oversized-preamble":
            await stream.send(oversized_preamble() + bytes(HEAD_BYTES))
        elif kind == "oversized-hello":
            await stream.send(_OVERSIZED_HELLO_BYTES.to_bytes(4, "big") + b"\xa0" * 64)
        # stall-before-preamble: send nothing.
        delay = await _wait_for_close(stream, hold_s)
        if delay is None:
            result.still_open += 1
        else:
            result.close_delays_s.append(delay)
    except (OSError, BrokenResourceError, EndOfStream) as exc:
        # The node closed before we finished sending: as good as refused at once.
        result.close_delays_s.append(0.0)
        if len(result.errors) < 5 and not isinstance(exc, (EndOfStream, BrokenResourceError)):
            result.errors.append(f"send: {type(exc).__name__}: {exc}")
    finally:
        await anyio.aclose_forcefully(stream)


async def _wait_for_close(stream: Any, hold_s: float) -> float | None:
    """Read until the node closes the stream; return how long that took, or None."""
    started = time.monotonic()
    with anyio.move_on_after(hold_s):
        try:
            while True:
                await stream.receive()
        except (EndOfStream, BrokenResourceError, ClosedResourceError, OSError, ssl.SSLError):
            return time.monotonic() - started
    return None
