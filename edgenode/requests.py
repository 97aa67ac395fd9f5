"""Requests: the ones this node makes, and the ones it answers.

Made: ``Node.request()`` registers a :class:`Pending` on the connection it
sends on, queues the request frame, and waits for the answer with its own
timeout: no timer, no dispatcher hop. The connection's reader resolves it
directly when the response arrives; if the connection closes first, the
dispatcher fails it with an error that says so. A request to a device on
this node's own serial ports is resolved by the serial bridge the same way.

Answered: the reader hands a request to :meth:`Requests.serve`, which runs
the topic's handler in a task of the connection's own task group (so it
ends with the connection) under ``handler_timeout_s``, then queues the
answer. At most ``max_inflight_handlers`` run at once; beyond that, and
for a topic with no handler, the answer is an error at once. A handler
that overruns its deadline is cancelled and answered with
``ERR_HANDLER_TIMEOUT``: hung handlers cannot fill the node for good.

Every change here happens in a synchronous step; the only waits are the
caller's wait for its answer and a handler task's own work.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio import ClosedResourceError

from .api import Handler, Incoming
from .errors import EdgeNodeError, RemoteError, TooManyPending
from .proto.framing import encode_frame
from .proto.messages import (
    ERR_BUSY,
    ERR_HANDLER_FAILED,
    ERR_HANDLER_TIMEOUT,
    ERR_NO_HANDLER,
    ErrorResponse,
    Request,
    Response,
    encode_message,
    encode_response,
)

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("edgenode.node")

monotonic = time.monotonic

#: The most of a text the peer's limit allows (it counts UTF-8 bytes).
MAX_TEXT_BYTES = 256


class Pending:
    """A request waiting for its answer."""

    __slots__ = (
        "conn",
        "device",
        "done",
        "error",
        "ip",
        "open",
        "request_id",
        "result",
        "timeout_s",
        "topic",
    )

    def __init__(
        self, request_id: int, ip: str, topic: str, timeout_s: float, device: str | None = None
    ) -> None:
        self.request_id = request_id
        self.ip = ip
        self.device = device
        self.topic = topic
        self.timeout_s = timeout_s
        #: The connection it was sent on (None for a device on our own ports).
        self.conn: Connection | None = None
        self.done = anyio.Event()
        self.result: bytes | None = None
        self.error: EdgeNodeError | None = None
        #: Counted in Requests.pending until Requests.close.
        self.open = True

    def finish(self, result: bytes | None, error: EdgeNodeError | None) -> None:
        """Resolve the request once; later calls are ignored."""
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


def clip(text: str, limit_bytes: int = MAX_TEXT_BYTES) -> str:
    """Cut ``text`` to fit the peer's text limit (it counts UTF-8 bytes)."""
    return text.encode()[:limit_bytes].decode(errors="ignore")


def answer_frame(request_id: int, status: int, payload: bytes | str) -> bytes:
    """The framed answer to a request: a response (status 0) or an error."""
    if status == 0:
        body = payload if isinstance(payload, bytes) else payload.encode()
        return encode_frame(encode_response(request_id, body))
    text = payload if isinstance(payload, str) else payload.decode(errors="replace")
    return encode_frame(encode_message(ErrorResponse(request_id, status, clip(text))))


class Requests:
    """The node's requests in both directions; see the module docstring."""

    def __init__(
        self,
        *,
        max_pending: int,
        max_inflight: int,
        handler_timeout_s: float,
        traffic: Callable[[Connection], None],
    ) -> None:
        self.max_pending = max_pending
        self.max_inflight = max_inflight
        self.handler_timeout_s = handler_timeout_s
        #: Called when an answer is queued: it counts as traffic for keepalive.
        self._traffic = traffic
        self.handlers: dict[str, Handler] = {}
        self._ids = itertools.count(1)
        #: Requests made that wait for an answer, on every connection and device.
        self.pending = 0
        #: Handlers running now.
        self.inflight = 0
        self.handler_timeouts = 0
        self.handler_failures = 0
        #: Answers given up on because the asker's outbox stayed full.
        self.answers_dropped = 0

    # -- requests this node makes ----------------------------------------------------

    def open(self, ip: str, topic: str, timeout_s: float, device: str | None = None) -> Pending:
        """A new pending request. Raises :class:`TooManyPending` at the limit."""
        if self.pending >= self.max_pending:
            raise TooManyPending(
                f"{self.pending} requests already pending (limit {self.max_pending})"
            )
        self.pending += 1
        return Pending(next(self._ids), ip, topic, timeout_s, device)

    @staticmethod
    def attach(pending: Pending, conn: Connection) -> None:
        """Record ``pending`` as sent on ``conn``: its reader will resolve it."""
        pending.conn = conn
        conn.pending[pending.request_id] = pending

    def close(self, pending: Pending) -> None:
        """Forget ``pending`` (answered, timed out or failed); idempotent."""
        conn = pending.conn
        if conn is not None and conn.pending.get(pending.request_id) is pending:
            del conn.pending[pending.request_id]
        if pending.open:
            pending.open = False
            self.pending -= 1

    def answered(self, conn: Connection, msg: Response | ErrorResponse) -> None:
        """The reader got an answer on ``conn``: resolve its request."""
        pending = conn.pending.pop(msg.request_id, None)
        if pending is None:
            log.debug("%s: answer to unknown or expired request %s", conn.ip, msg.request_id)
            return
        if type(msg) is Response:
            pending.finish(msg.payload, None)
        else:
            pending.finish(None, RemoteError(msg.error_code, msg.message))  # type: ignore[union-attr]

    def fail_connection(self, conn: Connection, error: EdgeNodeError) -> None:
        """Fail every request still waiting on ``conn`` (it closed)."""
        if conn.pending:
            for pending in conn.pending.values():
                pending.finish(None, error)
            conn.pending.clear()

    # -- requests this node answers ----------------------------------------------------

    def refusal(self, topic: str) -> tuple[int, str] | None:
        """Why a request on ``topic`` cannot be served now, as (error code,
        message), or None if a handler can start."""
        if topic not in self.handlers:
            return ERR_NO_HANDLER, clip(f"no handler for topic {topic!r}")
        if self.inflight >= self.max_inflight:
            return ERR_BUSY, f"busy: {self.max_inflight} requests already in progress"
        return None

    def serve(self, conn: Connection, msg: Request) -> bytes | None:
        """A request arrived on ``conn``: start its handler in the connection's
        task group, or return the framed error answer to queue at once."""
        refused = self.refusal(msg.topic)
        if refused is not None:
            return answer_frame(msg.request_id, *refused)
        assert conn.tg is not None
        incoming = Incoming(conn.ip, conn.node_id, msg.topic, msg.payload)
        self.inflight += 1
        conn.tg.start_soon(self._serve, conn, msg.request_id, incoming)
        return None

    async def _serve(self, conn: Connection, request_id: int, incoming: Incoming) -> None:
        try:
            status, payload = await self._run_with_deadline(incoming)
            frame = answer_frame(request_id, status, payload)
            if conn.closing:
                return
            if not conn.outbox.put_nowait(frame):
                # The peer is not reading: wait for room as long as a handler
                # may run, then give up on this answer (its caller times out).
                with anyio.move_on_after(self.handler_timeout_s):
                    await conn.outbox.put(frame)
                    self._traffic(conn)
                    return
                self.answers_dropped += 1
                log.warning(
                    "answer to request %d from %s dropped: its outbox stayed full for %g s",
                    request_id,
                    conn.ip,
                    self.handler_timeout_s,
                )
                return
            self._traffic(conn)
        except ClosedResourceError:
            pass  # the connection closed while the answer waited for room
        finally:
            self.inflight -= 1

    async def _run_with_deadline(self, incoming: Incoming) -> tuple[int, bytes | str]:
        with anyio.move_on_after(self.handler_timeout_s):
            return await self.run_handler(incoming)
        self.handler_timeouts += 1
        log.warning(
            "request handler for %r from %s took longer than %g s: cancelled",
            incoming.topic,
            incoming.peer,
            self.handler_timeout_s,
        )
        return (
            ERR_HANDLER_TIMEOUT,
            f"handler for {incoming.topic!r} took longer than {self.handler_timeout_s:g} s",
        )

    def start_for_device(
        self,
        task_group: Any,
        incoming: Incoming,
        reply: Callable[[int, bytes | str], Awaitable[None]],
    ) -> tuple[int, str] | None:
        """Serve a request from a device on our serial ports in ``task_group``;
        ``reply(status, payload)`` delivers the answer. Returns the error at
        once if no handler can start."""
        refused = self.refusal(incoming.topic)
        if refused is not None:
            return refused
        self.inflight += 1
        task_group.start_soon(self._serve_device, incoming, reply)
        return None

    async def _serve_device(
        self, incoming: Incoming, reply: Callable[[int, bytes | str], Awaitable[None]]
    ) -> None:
        try:
            status, payload = await self._run_with_deadline(incoming)
            await reply(status, payload)
        finally:
            self.inflight -= 1

    async def run_handler(self, incoming: Incoming) -> tuple[int, bytes | str]:
        """Run the topic's handler; return (0, result) or (error code, message)."""
        handler = self.handlers.get(incoming.topic)
        if handler is None:
            return ERR_NO_HANDLER, clip(f"no handler for topic {incoming.topic!r}")
        try:
            result = await handler(incoming)
            if not isinstance(result, (bytes, bytearray, memoryview)):
                raise TypeError(f"handler returned {type(result).__name__}, expected bytes")
            return 0, bytes(result)
        except Exception as exc:
            self.handler_failures += 1
            log.exception("request handler for %r failed", incoming.topic)
            return ERR_HANDLER_FAILED, clip(
                f"handler for {incoming.topic!r} failed: {type(exc).__name__}"
            )
