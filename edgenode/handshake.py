"""Accepting and dialling connections, up to the exchange of hellos.

The listener accepts from its sockets itself (rather than with
``listener.serve()``): a connection over a handshake limit is reset before
anyio wraps it or a task starts for it, so a flood costs the loop little,
and ``accept()`` failing for want of descriptors or memory is waited out
instead of ending the listener. Each admitted connection gets a task that
runs the handshake (preamble, TLS 1.3, hellos) under the handshake
timeout; a dial does the same from the other side. A handshake that
succeeds becomes a :class:`~edgenode.connection.Connection`, run by the
data path; one that fails is posted to the dispatcher's inbox.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio import BrokenResourceError, EndOfStream
from anyio.abc import ByteStream, TaskGroup

from .connection import Connection
from .datapath import READ_BYTES, close_stream, os_detail
from .errors import EdgeNodeError, HandshakeError
from .identity import Identity
from .inbox import Failed, Inbox
from .ips import normalise_ip
from .proto.connection import PeerProtocol
from .proto.messages import AnyMessage, Hello, Limits
from .refusals import RefusalLog
from .registry import INBOUND, OUTBOUND
from .tls import PinnedContexts
from .transports.tcp import (
    HandshakeAdmission,
    Link,
    accept_link,
    closed_before_accept,
    dial_link,
    refuse_socket,
)

log = logging.getLogger("edgenode.node")

monotonic = time.monotonic

#: accept() errors that mean "out of descriptors or memory": wait, then retry.
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: Connections taken per wake-up of an accept loop; other tasks run between.
_ACCEPT_BATCH = 8
#: Wait after running out of descriptors, as trio does.
_ACCEPT_BACKOFF_S = 0.1
#: Why a connection its dialler closed before it was accepted is let go.
ABANDONED = "dial given up by its node before it was accepted"


class Handshakes:
    """The node's listener and dialler; every handshake they run is bounded."""

    def __init__(
        self,
        *,
        config: Any,
        identity: Identity,
        is_authorised: Callable[[str], bool],
        limits: Limits,
        epoch: int,
        inbox: Inbox,
        run_connection: Callable[[Connection], Awaitable[None]],
        client_context: Any,
        refusals: RefusalLog,
        awaits_sign_of_life: Callable[[str, float], bool],
    ) -> None:
        self.config = config
        self.identity = identity
        self.is_authorised = is_authorised
        self.limits = limits
        self.epoch = epoch
        self.inbox = inbox
        self.run_connection = run_connection
        self.client_context = client_context
        #: Every refused connection, counted exactly; what may be logged of them.
        self.refusals = refusals
        #: Whether a connection from an address is a sign of life the node
        #: waits for (a peer in redial backoff): posted even when unlogged.
        self.awaits_sign_of_life = awaits_sign_of_life
        self.server_contexts = PinnedContexts(identity, max_entries=config.max_peers)
        self.wildcard = config.listen_host in ("0.0.0.0", "::", "")
        #: The port our hello names (the listener's, once it listens).
        self.listen_port = config.listen_port
        self.admission = HandshakeAdmission(
            max_per_ip=config.max_handshakes_per_ip,
            max_total=config.max_handshakes,
            rate_per_ip=config.max_handshake_rate_per_ip,
        )
        self._accept_failures = 0

    # -- the listener -----------------------------------------------------------------

    async def serve(
        self, listener: anyio.abc.Listener[Any], scope: anyio.CancelScope, tg: TaskGroup
    ) -> None:
        """Accept connections until ``scope`` is cancelled; each runs in ``tg``.

        Only the accept loops live in ``scope``: connections run in the
        node's task group, so stopping the listener at shutdown leaves them
        open long enough to say bye.
        """
        sockets = [
            one.extra(anyio.abc.SocketAttribute.raw_socket)
            for one in getattr(listener, "listeners", [listener])
        ]
        with scope:
            async with listener:
                async with anyio.create_task_group() as accepting:
                    for sock in sockets:
                        accepting.start_soon(self._accept_from, sock, tg)

    async def _accept_from(self, sock: socket.socket, tg: TaskGroup) -> None:
        admission, refusals = self.admission, self.refusals
        while True:
            # Wake for the refusal log's summary of what this loop refused.
            due = refusals.next_summary_at()
            with anyio.move_on_after(None if due is None else max(0.0, due - monotonic())):
                await anyio.wait_readable(sock)
            now = monotonic()
            log_refusal_summary(refusals, now)
            for _ in range(_ACCEPT_BATCH):
                try:
                    client, address = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno not in _OUT_OF_RESOURCES:
                        continue  # that one connection failed (reset while queued)
                    self._accept_failures += 1
                    failures = self._accept_failures
                    if failures in (1, 10, 100) or failures % 1000 == 0:
                        log.error(
                            "cannot accept connections: %s (failure #%d); retrying every %g s",
                            os_detail(exc),
                            failures,
                            _ACCEPT_BACKOFF_S,
                        )
                    await anyio.sleep(_ACCEPT_BACKOFF_S)
                    break
                ip = normalise_ip(address[0])
                if closed_before_accept(client):
                    # Its node gave up and closed it while it waited in the
                    # queue: nobody is there to answer, and no handshake is
                    # run. Counted like a refusal, but with no line of its
                    # own: after a long stop there is one for every dial
                    # the node's peers made meanwhile (docs/reliability.md).
                    client.close()
                    log.debug("%s: %s; closed", ip, ABANDONED)
                    refusals.record(ip, ABANDONED, now, quiet=True)
                    continue
                refusal = admission.admit(ip, now)
                if refusal is None:
                    tg.start_soon(self._accept, client, ip)
                    continue
                refuse_socket(client)
                # Counted exactly; a line (and an event) only while the log's
                # budget lasts, the rest summarised across all addresses. But
                # a peer we wait to redial is back: that event always goes.
                line = refusals.record(ip, refusal, now)
                if line is not None:
                    log.warning(line, extra={"peer": ip, "reason": refusal})
                if line is not None or self.awaits_sign_of_life(ip, now):
                    error = HandshakeError(f"{ip}: {refusal}")
                    await self.inbox.post(Failed(ip, error, False, recorded=True))

    async def _accept(self, sock: socket.socket, ip: str) -> None:
        # The accept loop counted this handshake in; count it out however it ends.
        admission = self.admission
        started_at = monotonic()
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                stream: ByteStream = await anyio.abc.SocketStream.from_socket(sock)
            except (OSError, ValueError):  # reset before we could wrap it
                sock.close()
                error = HandshakeError(f"{ip}: connection reset before it could be used")
                await self.inbox.post(Failed(ip, error, False))  # every refusal is counted
                return
            log.debug(
                "handshake with %s started (%d in progress from it, %d in all)",
                ip,
                admission.in_progress_from(ip),
                admission.in_progress,
            )
            conn = await self._handshake(ip, stream, None, started_at)
        finally:
            admission.finished(ip)
        if conn is not None:
            await self.run_connection(conn)

    # -- the dialler ---------------------------------------------------------------------

    async def dial(self, ip: str, port: int) -> None:
        """Dial ``ip:port``; run the connection, or post why it failed."""
        conn = await self._handshake(ip, None, port, monotonic())
        if conn is not None:
            await self.run_connection(conn)

    # -- both sides ----------------------------------------------------------------------

    async def _handshake(
        self, ip: str, stream: ByteStream | None, port: int | None, started_at: float
    ) -> Connection | None:
        """Run one side of the handshake under the handshake timeout.

        Returns the connection with both hellos exchanged, or None after
        posting the failure to the inbox.
        """
        timeout = self.config.handshake_timeout_s
        link: Link | None = None
        error: EdgeNodeError
        try:
            with anyio.fail_after(timeout):
                if stream is not None:
                    link = await accept_link(
                        stream,
                        contexts=self.server_contexts,
                        is_authorised=self.is_authorised,
                        name=ip,
                    )
                else:
                    assert port is not None
                    link = await dial_link(
                        ip,
                        port,
                        context=self.client_context,
                        cert_der=self.identity.cert_der,
                        local_host=None if self.wildcard else self.config.listen_host,
                        is_authorised=self.is_authorised,
                        # A connect not answered in half the handshake's time:
                        # nothing listens, the peer is away (not a flap).
                        connect_timeout_s=timeout / 2,
                    )
                return await self._exchange_hellos(
                    link, INBOUND if stream is not None else OUTBOUND, started_at
                )
        except TimeoutError:
            what = "handshake" if stream is not None else f"dial to {ip}:{port}"
            error = HandshakeError(f"{ip}: {what} not finished within {timeout} s")
        except EdgeNodeError as exc:
            error = exc
        except EndOfStream:
            # A port scanner, or a peer that gave up: it said nothing wrong.
            error = HandshakeError(f"{ip}: connection closed by the peer during the handshake")
        except (OSError, BrokenResourceError) as exc:
            error = HandshakeError(f"{ip}: connection failed during handshake: {os_detail(exc)}")
        except Exception as exc:  # a bug: contain it, the listener serves everyone
            log.exception("handshake with %s failed", ip)
            error = HandshakeError(f"{ip}: internal error during handshake: {exc!r:.100}")
        closing = link.stream if link is not None else stream
        if closing is not None:
            await close_stream(closing)
        await self.inbox.post(Failed(ip, error, stream is None))
        return None

    async def _exchange_hellos(self, link: Link, direction: str, started_at: float) -> Connection:
        proto = PeerProtocol(
            expected_node_id=link.peer_node_id, limits=self.limits, name=link.peer_ip
        )
        hello = Hello(self.identity.node_id, self.listen_port, self.epoch)
        await link.stream.send(PeerProtocol.send(hello))
        messages: list[AnyMessage] = []
        while proto.their_hello is None:
            try:
                data = await link.stream.receive(READ_BYTES)
            except EndOfStream:
                raise HandshakeError(f"{link.peer_ip}: connection closed before hello") from None
            messages = proto.receive_data(data)
        conn = Connection(link, direction, proto, self.config.outbox_frames, started_at)
        conn.early = messages[1:]
        return conn


def log_refusal_summary(refusals: RefusalLog, now: float) -> None:
    """Log the refusal log's summary if one is due."""
    line = refusals.summary(now)
    if line is not None:
        log.warning(line)
