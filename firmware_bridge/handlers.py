"""What a device does with the host's messages: callbacks, request handlers, answers.

The half of :class:`firmware_bridge.driver.Device` that serves the
application: data goes to the callbacks registered with ``on_message``,
requests to the handlers registered with ``handle``, answers to our own
requests to the callers waiting for them. Callbacks that are coroutine
functions and handlers each run in a task of their own, at most
``MAX_TASKS`` at once.

In reliable mode the device takes only as many messages from a batch of
bytes as it has free task slots (the link's flow control: the host keeps
the others and sends them again once a task has ended), so nothing the host
sent is refused for want of a task. In unreliable mode a request beyond
that is answered "busy" (status 3) and a message for a coroutine callback
is dropped; both are counted in ``stats["refused_busy"]``.

No I/O here: the driver (driver.py) owns the stream, the lock and the
tasks (``_spawn``, ``_task_ended``, ``_flush``, ``_send``).

Runs unchanged on CPython 3.9+ and MicroPython.
"""

from .cobs import LinkError
from .events import Received, SessionDown, SessionUp
from .frame import MessageTooLarge

try:
    from micropython import const
except ImportError:

    def const(x):  # type: ignore[no-redef]
        return x


try:
    from typing import TYPE_CHECKING
except ImportError:
    TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

MAX_TASKS = const(4)  # handlers and async callbacks running at once
_ERROR_CHARS = const(64)  # error texts are cut to fit the smallest frame

# Response status codes, as in the node's protocol (docs/protocol.md, section 7).
STATUS_OK = const(0)
STATUS_NO_HANDLER = const(1)
STATUS_HANDLER_FAILED = const(2)
STATUS_BUSY = const(3)
_NO_EVENTS = ()
OUT_OF_MEMORY = "out of memory"

# The driver's own counters in ``Device.stats``.
COUNTERS = (
    "requests_sent",  # requests of ours written to the link
    "request_timeouts",
    "requests_failed",  # answered with an error status
    "requests_lost",  # the session went down first
    "late_responses",  # answers to no pending request
    "requests_served",  # requests from the host answered by a handler
    "handler_errors",
    "no_handler",
    "refused_busy",  # requests and async callbacks beyond MAX_TASKS (unreliable mode)
    "callback_errors",
    "unhandled",  # data on a topic with no callback
    "memory_errors",  # MemoryErrors survived by run()'s loop
)


class RequestError(LinkError):
    """A request of ours got no answer: the base of the three below."""


class RequestTimeout(RequestError):
    """No response arrived within the request's timeout."""


class RequestFailed(RequestError):
    """The peer answered with an error status (``status``); the message has its text."""

    def __init__(self, msg: str, status: int) -> None:
        super().__init__(msg)
        self.status = status


class RequestLost(RequestError):
    """The session went down, or the device stopped, before the response arrived."""


def error_text(exc: BaseException) -> str:
    """An exception's text, cut to fit the smallest frame ("out of memory" if it cannot be made)."""
    try:
        text = str(exc) or type(exc).__name__
        return text[:_ERROR_CHARS]
    except MemoryError:
        return OUT_OF_MEMORY


class Handlers:
    """The application's callbacks and handlers; the base of the driver's Device."""

    __slots__ = ()

    def _handle(self, events: list) -> None:
        """Turn the link's events into calls, in order.

        The link has taken these (in reliable mode it acks them, and the
        host never sends them again), so a MemoryError must not lose one:
        it leaves the event it met and those after it held, and the caller
        calls ``_hand_over`` again, before it takes anything more from the
        link, until they are all handed over. Call ``_hand_over`` first: it
        raises while events are still held.
        """
        self._held = events
        self._held_next = 0
        self._hand_over()

    def _hand_over(self) -> None:
        """Hand over the held events; a MemoryError leaves the rest held."""
        events = self._held
        i = self._held_next
        while i < len(events):
            self._dispatch(events[i])
            i += 1
            self._held_next = i
            self._held_part = 0
        self._held = _NO_EVENTS

    def _dispatch(self, event: "Any") -> None:
        # Safe to repeat after a MemoryError: what can meet one (making a
        # task, an error's text) comes before the event reaches the
        # application (a message's callbacks that took it are skipped:
        # ``_deliver``), and what comes after allocates nothing.
        if isinstance(event, Received):
            kind = event.kind
            if kind == "data":
                self._deliver(event.topic, event.payload)
            elif kind == "request":
                self._on_request(event)
            elif kind == "response":
                self._on_response(event)
        elif isinstance(event, SessionUp):
            self._sessions += 1
            self._changed.set()
        elif isinstance(event, SessionDown):
            self._changed.clear()
            self._fail_pending("the session went down (" + event.reason + ")")
        # Dropped: the link counted it in stats["drops"].

    def on_message(self, topic: str, callback: "Callable[[str, bytes], Any]") -> None:
        """Call ``callback(topic, payload)`` for data on ``topic`` ("#": every topic).

        It runs in run()'s task: keep it short, or make it a coroutine
        function (its coroutine is started as a task). Its errors are counted.
        """
        self._callbacks[topic] = callback

    def handle(self, topic: str, handler: "Callable[[bytes], Any]") -> None:
        """Answer requests on ``topic`` with ``await handler(payload)``, which returns bytes."""
        self._handlers[topic] = handler

    def _deliver(self, topic: str, payload: bytes) -> None:
        # A MemoryError holds the event, and it is handed over again: the
        # callbacks that took it already (``_held_part`` of them) are skipped.
        keys = (topic, "#") if topic != "#" else ("#",)
        delivered = self._held_part > 0
        for part in range(self._held_part, len(keys)):
            callback = self._callbacks.get(keys[part])
            if callback is not None:
                delivered = True
                try:
                    result = callback(topic, payload)
                except Exception as exc:  # a MemoryError too: the callback ran
                    self._error("callback_errors", "callback for ", topic, exc)
                    result = None
                if hasattr(result, "send"):  # a coroutine function's coroutine
                    if len(self._tasks) < MAX_TASKS:
                        try:
                            self._spawn(self._await_callback(topic, result))
                        except MemoryError:
                            # It never ran: the callback makes a new one.
                            result.close()
                            raise
                    else:
                        result.close()
                        self._counts["refused_busy"] += 1
            self._held_part = part + 1
        if not delivered:
            self._counts["unhandled"] += 1

    def _on_request(self, event: Received) -> None:
        handler = self._handlers.get(event.topic)
        if handler is None:
            self._respond_now(event.req_id, STATUS_NO_HANDLER, f"no handler for {event.topic!r}")
            self._counts["no_handler"] += 1
        elif len(self._tasks) >= MAX_TASKS:
            self._respond_now(event.req_id, STATUS_BUSY, f"busy: {MAX_TASKS} tasks running")
            self._counts["refused_busy"] += 1
        else:
            self._spawn(
                self._serve(event.req_id, event.topic, handler, event.payload, self._sessions)
            )

    async def _await_callback(self, topic: str, coro: "Any") -> None:
        try:
            await coro
        except Exception as exc:
            self._error("callback_errors", "callback for ", topic, exc)
        finally:
            if self._task_ended():
                await self._flush()  # the ack that says we have room again

    def _respond_now(self, req_id: int, status: int, text: str) -> None:
        try:
            self.link.send_response(req_id, status, text[:_ERROR_CHARS], self._clock())
        except LinkError as exc:  # output full: the host times the request out
            self._last_error = "response: " + error_text(exc)

    async def _serve(
        self, req_id: int, topic: str, handler: "Any", payload: bytes, session: int
    ) -> None:
        try:
            try:
                result = handler(payload)
                if hasattr(result, "send"):
                    result = await result
                if not isinstance(result, (bytes, bytearray, memoryview)):
                    raise TypeError(f"handler returned {type(result).__name__}, not bytes")
                status = STATUS_OK
            except Exception as exc:
                self._error("handler_errors", "handler for ", topic, exc)
                status, result = STATUS_HANDLER_FAILED, error_text(exc)
            if session != self._sessions or not self.is_up:
                return  # asked in a session that has ended: nobody waits for this
            while True:
                try:
                    await self._send(self.link.send_response, req_id, status, result)
                    break
                except MessageTooLarge as exc:
                    status, result = STATUS_HANDLER_FAILED, error_text(exc)
                except MemoryError:  # making _send's coroutine: the answer is not out yet
                    self._out_of_memory()
                    try:
                        await self._pause()
                    except MemoryError:
                        pass
            self._counts["requests_served"] += 1
        except LinkError as exc:
            self._last_error = "response: " + error_text(exc)
        finally:
            if self._task_ended():
                await self._flush()  # the ack that says we have room again

    def _on_response(self, event: Received) -> None:
        slot = self._pending.get(event.req_id)
        if slot is None or slot[1] is not None:
            self._counts["late_responses"] += 1  # timed out already, or from an old session
            return
        if event.status == STATUS_OK:
            slot[1] = event.payload
        else:
            slot[1] = RequestFailed(
                f"request on {slot[2]!r} failed with status {event.status}: {event.error}",
                event.status,
            )
        slot[0].set()

    def _fail_pending(self, why: str) -> None:
        for slot in self._pending.values():
            if slot[1] is None:
                slot[1] = RequestLost(f"request on {slot[2]!r} lost: {why}")
                slot[0].set()

    def _error(self, counter: str, what: str, topic: str, exc: BaseException) -> None:
        self._counts[counter] += 1
        try:
            self._last_error = what + topic + ": " + type(exc).__name__ + ": " + error_text(exc)
        except MemoryError:  # counted; the text can wait for a heap with room
            self._last_error = OUT_OF_MEMORY
