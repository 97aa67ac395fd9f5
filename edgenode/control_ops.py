"""The control socket's requests and answers (the server is :mod:`edgenode.control`).

Protocol: one JSON object per line each way. Requests:

* ``{"op": "status"}`` -> ``{"ok": true, "node": {...}, "peers": [...]}``:
  the node's figures (uptime, loop lag, RSS, peers by state and the rest of
  :meth:`Node.stats`) and one object per :class:`PeerSnapshot` row.
* ``{"op": "send", "peer": P, "topic": T, "text": S}`` -> ``{"ok": true}``:
  ``await node.send(P, T, S.encode())``.
* ``{"op": "reload-trust"}`` -> ``{"ok": true, "added": [...], "removed": [...]}``:
  ``await node.reload_trust()`` (``edgenode authorise`` and ``revoke``). With
  ``"node_id": N`` the answer also says whether the node trusts N now
  (``"trusted": true``), for instance through its configuration.
* ``{"op": "watch", "topics": [T, ...]}`` -> ``{"ok": true, "watching":
  [T, ...]}``, then the connection carries messages until the client closes
  it (:mod:`edgenode.control_watch`): one line per message that arrives on
  those topics (``#`` wildcards as ``subscribe`` takes them), ``{"event":
  "message", "time": UNIX_S, "peer": P, "node_id": N, "topic": T, "size":
  BYTES, "hex": PAYLOAD}`` (``"truncated": true`` when the payload was cut
  at 64 KiB), and, before the next messages whenever the client fell
  behind and messages were dropped, ``{"event": "dropped", "dropped":
  TOTAL}``. "watching" leaves out a topic another one covers. At most 8
  topics a watch, 4 watches at once, 1,000 messages a second a watch.

A request may carry an ``"id"``; the response echoes it. A failure answers
``{"ok": false, "error": "<message>", "type": "<error type>"}`` (the type,
such as ``PeerUnavailable`` or ``InvalidArgument``, is for scripts; the
message is for people) and the connection stays usable, except after an
oversize request (the rest of its line cannot be told from the next
request) or a timeout, after which it is closed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from .control_client import ControlError
from .control_watch import MAX_WATCHERS, Watch
from .errors import EdgeNodeError, InvalidArgument, TooManyPending, hexdump
from .version import __version__

if TYPE_CHECKING:
    from .api import PeerSnapshot
    from .config import NodeConfig

log = logging.getLogger("edgenode.control")

#: Time a send may wait for room on the peer's connection.
SEND_TIMEOUT_S = 10.0
_OPS = ("status", "send", "watch", "reload-trust")


class Node(Protocol):
    """What the control socket needs of a node (``edgenode.node.Node`` is one)."""

    config: NodeConfig
    listen_port: int
    uplink: Any

    async def send(self, peer: str, topic: str, payload: bytes) -> None:
        """Send a message to a peer."""

    def peers(self) -> list[PeerSnapshot]:
        """The peer table."""

    def stats(self) -> dict[str, Any]:
        """The node's figures."""

    async def reload_trust(self) -> Any:
        """Re-read the authorised-nodes file; return a TrustChange."""

    @property
    def authorised(self) -> frozenset[str]:
        """The node IDs trusted now."""

    def subscribe(self, topic: str, *, on_full: str = ..., buffer: int | None = ...) -> Any:
        """Open a subscription (``edgenode watch``)."""


class Watchers(Protocol):
    """The server's count of connections given over to a watch."""

    watchers: int


class BadRequest(ControlError):
    """A control request is not one JSON object per line with a known op."""


class RequestTooLarge(BadRequest):
    """A control request line exceeds :data:`MAX_REQUEST_BYTES`."""


async def _reload_trust(node: Node, request: dict[str, Any]) -> dict[str, Any]:
    node_id = request.get("node_id")
    if node_id is not None:
        from .identity import parse_node_id

        if not isinstance(node_id, str):
            raise BadRequest(f"reload-trust: 'node_id' should be text, got {node_id!r:.40}")
        try:
            node_id = parse_node_id(node_id)
        except EdgeNodeError as exc:
            raise InvalidArgument(f"reload-trust: {exc}") from None
    change = await node.reload_trust()
    response = {"ok": True, "added": sorted(change.added), "removed": sorted(change.removed)}
    if node_id is not None:
        response["trusted"] = node_id in node.authorised
    return response


def failure(error: BaseException, request_id: Any) -> dict[str, Any]:
    """A failure answer: the message for people, the error's type for scripts."""
    response: dict[str, Any] = {
        "ok": False,
        "error": str(error) or "internal error",
        "type": type(error).__name__,
    }
    if request_id is not None:
        response["id"] = request_id
    return response


async def handle_request(node: Node, line: bytes) -> dict[str, Any]:
    """Answer one request line; failures become ``{"ok": false, "error": ...}``.

    A watch needs a connection of its own (the server's), so here it is
    answered with an error.
    """
    response, watch = await answer(node, line, None)
    assert watch is None
    return response


async def answer(
    node: Node, line: bytes, clients: Watchers | None
) -> tuple[dict[str, Any], Watch | None]:
    """Answer one request line; for a watch, also return it, opened, its
    place among the watchers taken (the caller runs it and gives it back)."""
    request_id = None
    watch = None
    try:
        request = _parse(line)
        request_id = request.get("id")
        op = request.get("op")
        if op == "status":
            response = node_status(node)
        elif op == "send":
            await _send(node, request)
            response = {"ok": True}
        elif op == "watch":
            watch = _open_watch(node, request, clients)
            response = {"ok": True, "watching": watch.topics}
        elif op == "reload-trust":
            response = await _reload_trust(node, request)
        else:
            raise BadRequest(f"unknown op {op!r:.40}: expected one of {', '.join(_OPS)}")
    except EdgeNodeError as exc:
        return failure(exc, request_id), None
    except TimeoutError:
        response = {
            "ok": False,
            "error": f"the node did not take the message within {SEND_TIMEOUT_S} s",
            "type": "TimeoutError",
        }
    except Exception as exc:  # a bug: answer it rather than drop the client
        log.exception("control request failed: %s", hexdump(line, 64))
        return failure(exc, request_id), None
    if request_id is not None:
        response["id"] = request_id
    return response, watch


def _open_watch(node: Node, request: dict[str, Any], clients: Watchers | None) -> Watch:
    """Open the watch a request asks for, and take a watcher's place for it.

    Raises :class:`BadRequest` without a connection to give over to it,
    :class:`TooManyPending` past :data:`MAX_WATCHERS`, and what
    :meth:`Watch.open` raises.
    """
    if clients is None:
        raise BadRequest("watch: needs a control connection of its own")
    if clients.watchers >= MAX_WATCHERS:
        raise TooManyPending(
            f"{clients.watchers} watches already running (limit {MAX_WATCHERS}); stop one first"
        )
    watch = Watch.open(node, request.get("topics"))
    clients.watchers += 1
    return watch


_MAX_DEPTH = 8
_OPEN, _CLOSE, _QUOTE, _ESCAPE = frozenset(b"[{"), frozenset(b"]}"), ord('"'), ord("\\")


def _nesting(line: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped).

    Checked before parsing: the json module's limit is the interpreter's
    recursion limit, which varies, so its verdict on deep input would too.
    """
    depth = deepest = 0
    in_string = escaped = False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _ESCAPE:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
        elif byte in _CLOSE:
            depth -= 1
    return deepest


def _parse(line: bytes) -> dict[str, Any]:
    depth = _nesting(line)
    if depth > _MAX_DEPTH:
        raise BadRequest(f"request nested {depth} levels deep; the limit is {_MAX_DEPTH}")
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):  # ValueError includes UnicodeDecodeError
        raise BadRequest(f"expected one JSON object per line, got {hexdump(line, 24)}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"expected a JSON object, got {type(request).__name__}")
    return request


async def _send(node: Node, request: dict[str, Any]) -> None:
    fields = {}
    for name in ("peer", "topic", "text"):
        value = request.get(name)
        if not isinstance(value, str):
            raise BadRequest(f"send: {name!r} should be text, got {value!r:.40}")
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate, from a \ud800 escape
            raise BadRequest(f"send: {name!r} is not valid unicode: {value!r:.40}") from None
        fields[name] = value
    with anyio.fail_after(SEND_TIMEOUT_S):
        await node.send(fields["peer"], fields["topic"], fields["text"].encode())


def node_status(node: Node) -> dict[str, Any]:
    """The status response: node figures and one object per peer row."""
    rows = node.peers()
    figures = dict(node.stats())
    figures.update(
        version=__version__,
        pid=os.getpid(),
        listen_host=node.config.listen_host,
        listen_port=node.listen_port,
        rss_bytes=rss_bytes(),
        peers_by_state=dict(Counter(row.state for row in rows)),
        # Exact counts of refused connections and failed inbound handshakes.
        refusals=node.refusals.counters(time.monotonic()),
    )
    status = {
        "ok": True,
        "node": figures,
        "peers": [dataclasses.asdict(row) for row in rows],
    }
    if node.uplink is not None:
        status["uplink"] = node.uplink.status()
    return status


def rss_bytes() -> int | None:
    """This process's resident memory: VmRSS, else the peak from getrusage."""
    try:
        with open("/proc/self/status", "rb") as status_file:
            for line in status_file:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS
    except (ImportError, OSError):
        return None
