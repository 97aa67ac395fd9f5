"""The client side of the control socket: what ``edgenode status``,
``edgenode send`` and ``edgenode watch`` run to ask a running node.

Blocking and small, for the command line: one JSON request, one JSON
answer, or for a watch, the answer and then a line per message (the
protocol is in :mod:`edgenode.control`, the server's module).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import EdgeNodeError, hexdump

CONTROL_SOCKET_NAME = "control.sock"
#: Longest response a client accepts (a status of a few hundred peers is ~200 KiB).
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: Time a client waits for the node's answer.
CLIENT_TIMEOUT_S = 15.0


class ControlError(EdgeNodeError):
    """The control socket cannot be used, or the node answered with an error."""


class NoNodeRunning(ControlError):
    """No node is listening on the control socket."""


class NotPermitted(ControlError):
    """The connecting process's credentials do not allow it to use the control socket."""


class RequestFailed(ControlError):
    """The node answered a control request with an error (``"ok": false``)."""

    #: Error types that mean the request itself was wrong: a usage error.
    USAGE_TYPES = frozenset({"InvalidArgument", "BadRequest", "RequestTooLarge"})

    def __init__(self, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        #: The type of the node's error (``PeerUnavailable``, ...), for scripts.
        self.error_type = error_type

    @property
    def is_usage_error(self) -> bool:
        """Whether the request was wrong (a bad peer, topic or payload), not the node's state."""
        return self.error_type in self.USAGE_TYPES


def raise_for_failure(response: dict[str, Any]) -> dict[str, Any]:
    """Return ``response``; raise :class:`RequestFailed` if it says ``"ok": false``."""
    if not response.get("ok"):
        error_type = response.get("type")
        raise RequestFailed(
            str(response.get("error") or "the node refused the request"),
            error_type if isinstance(error_type, str) else None,
        )
    return response


def default_control_path(state_dir: str | os.PathLike[str]) -> Path:
    """The node's control socket in ``state_dir``."""
    return Path(state_dir) / CONTROL_SOCKET_NAME


def control_request(
    path: str | os.PathLike[str], request: dict[str, Any], *, timeout_s: float = CLIENT_TIMEOUT_S
) -> dict[str, Any]:
    """Send one request to the node on ``path`` and return its response object.

    Blocking; for the command line. A response with ``"ok": false`` is
    returned, not raised (:func:`raise_for_failure` raises it). Raises
    :class:`NoNodeRunning` when nothing listens on ``path``, and
    :class:`ControlError` when the socket cannot be used or the answer is
    missing, late or malformed.
    """
    with _Session.connect(Path(path), request, timeout_s) as session:
        response = session.receive()
    if response is None:
        raise ControlError(f"control socket {path}: the node closed without answering")
    return response


def watch_messages(
    path: str | os.PathLike[str], topics: list[str], *, timeout_s: float = CLIENT_TIMEOUT_S
) -> Iterator[dict[str, Any]]:
    """Watch ``topics`` on the node on ``path``: yield its answer, then each line it sends.

    The first item is the node's answer (``{"ok": true, "watching":
    [...]}``); then come ``{"event": "message", ...}`` and ``{"event":
    "dropped", ...}`` lines (:mod:`edgenode.control`), for as long as the
    caller iterates; closing the generator closes the connection. Waits
    ``timeout_s`` for the answer, then as long as it takes for messages.
    Raises :class:`RequestFailed` if the node refuses the watch, and
    :class:`ControlError` when the node closes the connection (it
    stopped), besides what :func:`control_request` raises.
    """
    with _Session.connect(Path(path), {"op": "watch", "topics": topics}, timeout_s) as session:
        answer = session.receive()
        if answer is None:
            raise ControlError(f"control socket {path}: the node closed without answering")
        yield raise_for_failure(answer)
        session.sock.settimeout(None)  # messages come when they come
        while True:
            line = session.receive()
            if line is None:
                raise ControlError("the node closed the connection (it stopped)")
            yield line


class _Session:
    """One control connection: JSON lines in, each at most :data:`MAX_RESPONSE_BYTES`."""

    def __init__(self, sock: socket.socket, path: Path, timeout_s: float) -> None:
        self.sock = sock
        self.path = path
        self.timeout_s = timeout_s
        self._buffer = bytearray()

    @classmethod
    @contextmanager
    def connect(cls, path: Path, request: dict[str, Any], timeout_s: float) -> Iterator[_Session]:
        """Connect to ``path`` and send ``request``; close the connection on exit."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            with _socket_errors(path, timeout_s):
                sock.connect(os.fspath(path))
                try:
                    sock.sendall(json.dumps(request).encode() + b"\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # refused as it connected (NotPermitted): the answer is waiting
            yield cls(sock, path, timeout_s)

    def receive(self) -> dict[str, Any] | None:
        """The next object the node sends; None if it closed the connection."""
        with _socket_errors(self.path, self.timeout_s):
            line = self._next_line()
        if line is None:
            return None
        try:
            response = json.loads(line)
        except ValueError:
            response = None
        if not isinstance(response, dict) or not (
            isinstance(response.get("ok"), bool) or isinstance(response.get("event"), str)
        ):
            raise ControlError(
                f"control socket {self.path}: expected a JSON response, got {hexdump(line, 24)}"
            )
        return response

    def _next_line(self) -> bytes | None:
        buffer = self._buffer
        searched = 0
        while True:
            end = buffer.find(b"\n", searched)
            if end >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                return line
            if len(buffer) > MAX_RESPONSE_BYTES:
                raise ControlError(
                    f"control socket {self.path}: response exceeds {MAX_RESPONSE_BYTES}-byte limit"
                )
            searched = len(buffer)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            buffer += chunk


@contextmanager
def _socket_errors(path: Path, timeout_s: float) -> Iterator[None]:
    """Turn the socket's OS errors into :class:`ControlError` and :class:`NoNodeRunning`."""
    try:
        yield
    except FileNotFoundError:
        raise NoNodeRunning(f"no node is running (control socket {path} not found)") from None
    except ConnectionRefusedError:
        if _is_socket(path):
            raise NoNodeRunning(
                f"no node is running (control socket {path} is left from a node that stopped)"
            ) from None
        raise ControlError(f"control socket {path} is not a socket") from None
    except socket.timeout:
        raise ControlError(
            f"the node on control socket {path} did not answer within {timeout_s} s"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ControlError(
                f"cannot use control socket {path}: permission denied "
                "(run as the user that runs the node)"
            ) from None
        raise ControlError(f"cannot use control socket {path}: {exc.strerror or exc}") from None


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False
