"""The client side of the control socket: what ``edgenode status`` and
``edgenode send`` run to ask a running node.

Blocking and small, for the command line: one JSON request, one JSON
answer (the protocol is in :mod:`edgenode.control`, the server's module).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
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


def default_control_path(state_dir: str | os.PathLike[str]) -> Path:
    """The node's control socket in ``state_dir``."""
    return Path(state_dir) / CONTROL_SOCKET_NAME


def control_request(
    path: str | os.PathLike[str], request: dict[str, Any], *, timeout_s: float = CLIENT_TIMEOUT_S
) -> dict[str, Any]:
    """Send one request to the node on ``path`` and return its response object.

    Blocking; for the command line. A response with ``"ok": false`` is
    returned, not raised. Raises :class:`NoNodeRunning` when nothing
    listens on ``path``, and :class:`ControlError` when the socket cannot be
    used or the answer is missing, late or malformed.
    """
    path = Path(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(os.fspath(path))
            try:
                sock.sendall(json.dumps(request).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused as it connected (NotPermitted): the answer is waiting
            data = _receive_line(sock, path)
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
    try:
        response = json.loads(data)
    except ValueError:
        response = None
    if not isinstance(response, dict) or not isinstance(response.get("ok"), bool):
        raise ControlError(
            f"control socket {path}: expected a JSON response, got {hexdump(data, 24)}"
        )
    return response


def _receive_line(sock: socket.socket, path: Path) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ControlError(f"control socket {path}: the node closed without answering")
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise ControlError(
                f"control socket {path}: response exceeds {MAX_RESPONSE_BYTES}-byte limit"
            )


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False
