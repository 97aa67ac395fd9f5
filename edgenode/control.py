"""The control socket: ``edgenode status`` and ``edgenode send`` talk to a running node.

The node listens on a Unix domain socket, by default ``control.sock`` in its
state directory. The socket is created owner-only (mode 0600): on Linux,
connecting to it needs write permission on the file, so only the node's own
user can ask it anything. A socket left behind by a node that died is
replaced; a live one, or anything that is not a socket, is refused.

The file mode is not the only guard: a mode widened by mistake (or a
directory others can reach) must not open the node to every local user.
Each connecting process's credentials are checked with ``SO_PEERCRED``
(and its groups with ``SO_PEERGROUPS``, Linux 4.13+) as it is accepted:
root, the node's own user and, with ``control_group`` set, that group's
members may use the socket (the socket is then given to the group, mode
0660). Anyone else is answered with one ``NotPermitted`` error line and
closed, and the refusal is logged (rationed as network refusals are, by a
:class:`~edgenode.refusals.RefusalLog`). Where the platform cannot tell
a peer's credentials (not Linux), the file mode alone guards the socket.

The requests and their answers are :mod:`edgenode.control_ops`'s.

Each client is served by a small task of its own, never by the node's
dispatcher: a status reads snapshots the dispatcher keeps, a send waits,
like any API caller, for room on the peer's connection, and a watch reads
subscriptions that drop rather than make the node wait. Everything a client
controls is bounded: request size, time to send a request, time to take
the answer, the number of clients and of watches at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from anyio import EndOfStream
from anyio.abc import TaskStatus

from .control_access import ControlAccess, peer_credentials
from .control_client import (
    NotPermitted,
)
from .control_ops import BadRequest, Node, RequestTooLarge, answer, failure
from .errors import ConfigError, TooManyPending
from .refusals import RefusalLog

if TYPE_CHECKING:
    pass


log = logging.getLogger("edgenode.control")

#: Longest request line a client may send, newline excluded.
MAX_REQUEST_BYTES = 64 * 1024
#: Time a client has to send each whole request line; an idle client is closed.
REQUEST_TIMEOUT_S = 30.0
#: Time a client has to take its answer.
WRITE_TIMEOUT_S = 10.0
#: Clients served at once; more are answered with an error and closed.
MAX_CLIENTS = 16

# sun_path is 108 bytes on Linux, with a terminating NUL.
_MAX_SOCKET_PATH_BYTES = 107
_READ_BYTES = 65536
_ACCEPT_RETRY_S = 0.5


# -- server -----------------------------------------------------------------------
#
# The server drives non-blocking sockets with anyio.wait_readable() and
# wait_writable() rather than anyio's unix socket streams: on asyncio those
# (anyio 4.12 to 4.16 at least) let a read callback fire on a receive or
# accept cancelled in the same loop turn, and asyncio then logs
# "Exception in callback Future.set_result" when the node stops or a client
# times out. wait_readable() guards against exactly that.


async def serve_control(
    node: Node,
    path: str | os.PathLike[str],
    *,
    task_status: TaskStatus[Path] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer control requests for ``node`` on the Unix socket ``path`` until cancelled.

    Run it in the node's task group with ``await tg.start(serve_control,
    node, path)``: ``start`` returns once the socket accepts connections.
    Creates the parent directory (mode 0700) if missing, replaces a socket
    left by a dead node, and removes the socket on exit.

    Raises :class:`ConfigError` before starting if the path is too long,
    exists and is not a socket, belongs to a running node, or cannot be
    created.
    """
    path = Path(path)
    access = ControlAccess.for_config(node.config.control_group)
    listener, created = _create_listener(path, access.gid)
    clients = _Clients()
    refusals = RefusalLog(noun="control connection", source="user")
    try:
        async with anyio.create_task_group() as tg:
            log.info("control socket listening on %s", path)
            task_status.started(path)
            while True:
                # Wake for the summary of refused clients, if one is due.
                due = refusals.next_summary_at()
                delay = None if due is None else max(0.0, due - time.monotonic())
                with anyio.move_on_after(delay):
                    await anyio.wait_readable(listener)
                summary = refusals.summary(time.monotonic())
                if summary is not None:
                    log.warning("control socket %s: %s", path, summary)
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                except OSError as exc:  # out of file descriptors, say: let it pass
                    log.warning("control socket %s: accept failed: %s", path, exc)
                    await anyio.sleep(_ACCEPT_RETRY_S)
                    continue
                sock.setblocking(False)
                if _admit(sock, access, refusals, path):
                    tg.start_soon(_serve_client, node, sock, clients)
    finally:
        listener.close()
        _remove_socket(path, created)


def _admit(sock: socket.socket, access: ControlAccess, refusals: RefusalLog, path: Path) -> bool:
    """Check a new client's credentials; answer and close it if it is not allowed.

    Done in the accept loop, before a task or a read is spent on the client:
    a refused client cannot hold one of the :data:`MAX_CLIENTS` places.
    """
    try:
        peer = peer_credentials(sock)
    except OSError:  # gone already
        sock.close()
        return False
    refusal = None if peer is None else access.refusal(peer)
    if refusal is None:
        return True
    assert peer is not None
    reason = f"pid {peer.pid} {refusal}"
    line = refusals.record(f"uid {peer.uid}", reason, time.monotonic())
    if line is not None:
        log.warning("control socket %s: %s", path, line, extra={"reason": reason})
    error = NotPermitted(f"uid {peer.uid} (pid {peer.pid}) {refusal}")
    reply = json.dumps(failure(error, None), separators=(",", ":"))
    try:
        sock.send(reply.encode() + b"\n")  # a short line into an empty buffer: never blocks
    except OSError:
        pass
    sock.close()
    return False


def _create_listener(path: Path, gid: int | None) -> tuple[socket.socket, os.stat_result]:
    size = len(os.fsencode(path))
    if size > _MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"control socket {path}: path of {size} bytes exceeds "
            f"{_MAX_SOCKET_PATH_BYTES}-byte limit of unix sockets"
        )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"control socket {path}: cannot create directory {path.parent}: {exc.strerror or exc}"
        ) from None
    _clear_stale(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask makes the socket owner-only from the moment bind creates
        # it, whatever the parent directory's mode; the chmod makes sure.
        old_umask = os.umask(0o177)
        try:
            listener.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        if gid is None:
            os.chmod(path, 0o600)
        else:
            _give_to_group(path, gid)
        listener.listen(MAX_CLIENTS)
        listener.setblocking(False)
        created = os.stat(path)
    except ConfigError:
        listener.close()
        path.unlink(missing_ok=True)
        raise
    except OSError as exc:
        listener.close()
        raise ConfigError(f"control socket {path}: cannot listen: {exc.strerror or exc}") from None
    return listener, created


def _give_to_group(path: Path, gid: int) -> None:
    """Let group ``gid`` connect: its members need write permission on the socket."""
    try:
        os.chown(path, -1, gid)
    except OSError as exc:
        raise ConfigError(
            f"control socket {path}: cannot give it to control_group {gid}: "
            f"{(exc.strerror or str(exc)).lower()} (the node's user must be a member of the group)"
        ) from None
    os.chmod(path, 0o660)


def _clear_stale(path: Path) -> None:
    """Remove a socket left by a dead node; refuse anything else at ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"control socket {path}: cannot check: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            f"control socket {path}: path exists and is not a socket "
            f"({_file_kind(st.st_mode)}); remove it or choose another path"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a full backlog answers EAGAIN: someone listens
        try:
            probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            pass  # nobody listens: a node died without removing it
        except BlockingIOError:
            raise ConfigError(
                f"control socket {path}: another node is running and listening on it"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"control socket {path}: cannot check whether a node uses it: {exc.strerror or exc}"
            ) from None
        else:
            raise ConfigError(f"control socket {path}: another node is running and listening on it")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(
            f"control socket {path}: cannot remove stale socket: {exc.strerror or exc}"
        ) from None
    log.info("removed stale control socket %s", path)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a fifo"),
    ):
        if test(mode):
            return kind
    return f"file mode {mode:o}"


def _remove_socket(path: Path, created: os.stat_result) -> None:
    """Remove our socket, unless something else has been put in its place since."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino, st.st_ctime_ns) == (
            created.st_dev,
            created.st_ino,
            created.st_ctime_ns,
        ):
            os.unlink(path)
    except OSError:
        pass


class _Clients:
    __slots__ = ("count", "watchers")

    def __init__(self) -> None:
        self.count = 0
        #: Connections given over to a watch.
        self.watchers = 0


async def _serve_client(node: Node, sock: socket.socket, clients: _Clients) -> None:
    clients.count += 1
    try:
        with sock:
            if clients.count > MAX_CLIENTS:
                error = TooManyPending(
                    f"{MAX_CLIENTS} control clients already connected (limit {MAX_CLIENTS})"
                )
                await _reply(sock, failure(error, None))
                return
            await _serve_requests(node, sock, clients)
    except (EndOfStream, OSError):
        pass  # the client went away, or did not take its answer
    except Exception:  # a bug: contain it, the node carries on
        log.exception("control client failed")
    finally:
        clients.count -= 1


async def _serve_requests(node: Node, sock: socket.socket, clients: _Clients) -> None:
    buffer = bytearray()
    while True:
        line: bytes | None = None
        with anyio.move_on_after(REQUEST_TIMEOUT_S):
            try:
                line = await _read_line(sock, buffer)
            except RequestTooLarge as exc:
                await _reply(sock, failure(exc, None))
                return
            except EndOfStream:
                # A last request without its newline still gets an answer.
                if not buffer.strip():
                    return
                line, buffer[:] = bytes(buffer), b""
        if line is None:
            error = BadRequest(f"no complete request within {REQUEST_TIMEOUT_S} s")
            await _reply(sock, failure(error, None))
            return
        if line.strip():
            response, watch = await answer(node, line, clients)
            if watch is None:
                await _reply(sock, response)
                continue
            # The connection is the watch's from now on, until the client leaves.
            try:
                await _reply(sock, response)
                await watch.run(sock)
            finally:
                watch.close()
                clients.watchers -= 1
            return


async def _read_line(sock: socket.socket, buffer: bytearray) -> bytes:
    """Take one line from ``buffer``, reading ``sock`` as needed.

    Raises :class:`RequestTooLarge` past :data:`MAX_REQUEST_BYTES` and
    ``EndOfStream`` when the client has sent all it will.
    """
    searched = 0
    # Yield to the loop on every request, even when the data is already
    # there: a client that pipelines requests must not starve the node.
    await anyio.lowlevel.checkpoint()
    while True:
        end = buffer.find(b"\n", searched)
        if end >= 0:
            if end > MAX_REQUEST_BYTES:
                break
            line = bytes(buffer[:end])
            buffer[: end + 1] = b""
            return line
        if len(buffer) > MAX_REQUEST_BYTES:
            break
        searched = len(buffer)
        try:
            data = sock.recv(_READ_BYTES)
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        if not data:
            raise EndOfStream
        buffer += data
    raise RequestTooLarge(
        f"request of more than {MAX_REQUEST_BYTES} bytes exceeds "
        f"{MAX_REQUEST_BYTES}-byte limit; closing the connection"
    )


async def _reply(sock: socket.socket, response: dict[str, Any]) -> None:
    """Send one response line; raises OSError if the client does not take it in time."""
    view = memoryview(json.dumps(response, separators=(",", ":")).encode() + b"\n")
    with anyio.move_on_after(WRITE_TIMEOUT_S):
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                await anyio.wait_writable(sock)
        return
    raise TimeoutError(f"client did not take its answer within {WRITE_TIMEOUT_S} s")
