"""Real node processes for tests and soaks: start, signal, watch, clean up.

:class:`NodeProcess` runs a node as a subprocess of its own: by default
``python -m edgenode run``, or any program built on :class:`~edgenode.node.Node`
that reads the same ``--config FILE --log-level LEVEL`` (such as
:mod:`edgenode.testing.soak_node`). Every setting goes in a TOML file the
process reads (``node.toml`` in its state directory, rewritten on each start
by :mod:`edgenode.testing.toml_writer`), so a restarted node comes back with
the same identity, IP, port and timings.

Readiness is an event, not a guess: a thread reads the node's stderr line by
line, appends each line to a log file and wakes any waiter. A node is ready
when it logs ``node ID listening on HOST:PORT``, which it does once it
listens and has scheduled its dials; its control socket already answers by
then. Waits have deadlines; no fixed sleeps.

The signals a soak needs: :meth:`~NodeProcess.kill` (SIGKILL),
:meth:`~NodeProcess.stop` (SIGSTOP), :meth:`~NodeProcess.cont` (SIGCONT),
:meth:`~NodeProcess.terminate` (SIGTERM, a clean exit) and
:meth:`~NodeProcess.restart`, built on :mod:`edgenode.testing.signals`
(stop and continue return once the kernel reports the new state).
:meth:`~NodeProcess.rss_bytes` reads
``/proc/PID/status`` (:mod:`edgenode.testing.procfs`, which also defines
:class:`NodeProcessError`); :meth:`~NodeProcess.status` asks the node over its
control socket (:mod:`edgenode.control`), which a task of the node answers,
not its dispatcher.

Each node runs in a session of its own, so that only its NodeProcess
signals it (see :meth:`NodeProcess.start`). Processes are always cleaned
up: :meth:`~NodeProcess.close` (also on leaving
a ``with`` block, and at interpreter exit for any left open) kills and reaps
the process; on Linux a child is also killed by the kernel if the process
that started it dies (``PR_SET_PDEATHSIG``). That signal follows the *thread*
that started the child, so start nodes from a thread that outlives them
(the main thread), or pass ``die_with_parent=False``.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ..control_client import ControlError, control_request
from . import signals
from .procfs import NodeProcessError, read_rss_bytes
from .toml_writer import toml_text

__all__ = [
    "READY_RE",
    "NodeProcess",
    "NodeProcessError",
    "free_port",
]

#: The line a node logs once it listens (``node.py``, end of ``Node.__aenter__``).
READY_RE = re.compile(r"node (\S+) listening on (.+):(\d+) \(")
#: Lines of output kept in memory per process (all of it is in the log file).
MAX_KEPT_LINES = 5000
#: Longest control socket path; sun_path is 108 bytes with its NUL.
_MAX_SOCKET_PATH_BYTES = 107
_PR_SET_PDEATHSIG = 1


# -- small helpers ---------------------------------------------------------------------


def free_port(ip: str) -> int:
    """A TCP port free on ``ip`` right now (the kernel's choice)."""
    with socket.socket() as probe:
        probe.bind((ip, 0))
        return int(probe.getsockname()[1])


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once, here: the child must not load libraries between fork and exec.
_PRCTL = _load_prctl()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


_OPEN: weakref.WeakSet[NodeProcess] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for proc in list(_OPEN):
        proc.close()


# -- the process -------------------------------------------------------------------------


class NodeProcess:
    """One node running as a subprocess; see the module docstring.

    ``NodeProcess(state_dir, "127.0.0.2", port=7300, peers=[("127.0.0.3", 7300)],
    authorised=[...]).start()`` writes the config file, starts the process and
    waits until it listens. The state directory must hold the node's identity
    already (``edgenode keygen`` or :func:`edgenode.identity.create_identity`).

    ``settings`` adds or overrides keys of the config file, by section
    (``{"peers": {"remember": False}}``). ``app`` is the program after
    ``python``: ``("-m", "edgenode", "run")`` by default; ``app_args`` follow
    it, then ``--config FILE --log-level LEVEL``.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        ip: str,
        *,
        port: int = 0,
        peers: Iterable[tuple[str, int]] = (),
        authorised: Iterable[str] = (),
        keepalive_interval_s: float = 0.5,
        keepalive_timeout_s: float = 2.0,
        handshake_timeout_s: float = 2.0,
        backoff_base_s: float = 0.05,
        backoff_cap_s: float = 1.0,
        shutdown_grace_s: float = 1.0,
        settings: Mapping[str, Mapping[str, object]] | None = None,
        app: Sequence[str] = ("-m", "edgenode", "run"),
        app_args: Sequence[str] = (),
        name: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        log_level: str = "info",
        control_socket: str | os.PathLike[str] | None = None,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.ip = ip
        #: The listen port: the one asked for, or the node's choice once it listened.
        self.port = port
        self.peers = list(peers)
        self.authorised = sorted(set(authorised))
        self.keepalive_interval_s = keepalive_interval_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.shutdown_grace_s = shutdown_grace_s
        self.settings = {k: dict(v) for k, v in (settings or {}).items()}
        self.app = list(app)
        self.app_args = list(app_args)
        self.name = name or f"node@{ip}"
        self.log_path = Path(log_path) if log_path is not None else self.state_dir / "node.log"
        self.log_level = log_level
        self.config_path = self.state_dir / "node.toml"
        self.python = python
        self.env = dict(env) if env is not None else None
        self.die_with_parent = die_with_parent
        self._own_socket_dir: str | None = None
        if control_socket is None:
            control_socket = self.state_dir / "control.sock"
            if len(os.fsencode(control_socket)) > _MAX_SOCKET_PATH_BYTES:
                self._own_socket_dir = tempfile.mkdtemp(prefix="en-ctl-")
                control_socket = Path(self._own_socket_dir) / "control.sock"
        self.control_socket = Path(control_socket)
        #: The node ID it logged when it last became ready.
        self.node_id: str | None = None
        #: How many times the process has been started.
        self.starts = 0
        #: ``time.monotonic()`` when the current process logged that it listens.
        self.ready_at: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._closed = False
        self._cond = threading.Condition()
        self._lines: collections.deque[str] = collections.deque(maxlen=MAX_KEPT_LINES)
        self._line_count = 0  # lines ever read, over every start
        self._first_line = 0  # index of the current process's first line
        self._eof = True
        self._pump: threading.Thread | None = None
        self._log: IO[str] | None = None

    def __repr__(self) -> str:
        return f"<NodeProcess {self.name} {self.ip}:{self.port} pid={self.pid}>"

    # -- state -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The current process's ID, or None if never started."""
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last process once reaped (``-9`` after SIGKILL)."""
        return self.proc.poll() if self.proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process exists (stopped or not) and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def stopped(self) -> bool:
        """True between :meth:`stop` and :meth:`cont` (or the process's end)."""
        return self._stopped and self.running

    @property
    def ready(self) -> bool:
        """True once the current process has logged that it listens."""
        return self.ready_at is not None and self.running

    @property
    def address(self) -> tuple[str, int]:
        """(ip, port) where the node listens."""
        return self.ip, self.port

    def lines(self, *, current: bool = False) -> list[str]:
        """Output lines kept in memory (the last :data:`MAX_KEPT_LINES`); with
        ``current``, only those of the current process."""
        with self._cond:
            lines = list(self._lines)
            if current:
                kept_from = self._line_count - len(lines)
                lines = lines[max(0, self._first_line - kept_from) :]
        return lines

    def log_text(self, last: int = 40) -> str:
        """The last ``last`` lines of output, for error messages."""
        return "\n".join(self.lines()[-last:])

    # -- starting ----------------------------------------------------------------------

    def config_sections(self) -> dict[str, dict[str, object]]:
        """The config file's content as ``{section: {key: value}}``."""
        sections: dict[str, dict[str, object]] = {
            "node": {
                "state_dir": self.state_dir.resolve(),
                "listen": f"{self.ip}:{self.port}",
                "shutdown_grace_s": self.shutdown_grace_s,
                "control_socket": self.control_socket.resolve(),
            },
            "peers": {
                "connect": [f"{ip}:{port}" for ip, port in self.peers],
                "authorised": self.authorised,
                "handshake_timeout_s": self.handshake_timeout_s,
            },
            "keepalive": {
                "interval_s": self.keepalive_interval_s,
                "timeout_s": self.keepalive_timeout_s,
            },
            "backoff": {"base_s": self.backoff_base_s, "cap_s": self.backoff_cap_s},
        }
        for section, values in self.settings.items():
            sections.setdefault(section, {}).update(values)
        return sections

    def command(self) -> list[str]:
        """The command line of the process."""
        return [
            self.python,
            *self.app,
            *self.app_args,
            "--config",
            str(self.config_path),
            "--log-level",
            self.log_level,
        ]

    def start(self, *, wait: bool = True, timeout_s: float = 30.0) -> NodeProcess:
        """Write the config file and start the process; with ``wait``, wait until ready.

        Raises :class:`NodeProcessError` if it is already running, or (with
        ``wait``) if it exits or is not ready within ``timeout_s``.
        """
        if self._closed:
            raise NodeProcessError(f"{self.name}: closed")
        if self.running:
            raise NodeProcessError(f"{self.name}: already running as pid {self.pid}")
        self._reap()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config_path.write_text(toml_text(self.config_sections()))
        env = dict(os.environ if self.env is None else self.env)
        env["EDGENODE_STATE_DIR"] = str(self.state_dir)
        env.pop("XDG_STATE_HOME", None)
        env["PYTHONUNBUFFERED"] = "1"
        if self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")
        with self._cond:
            self.ready_at = None
            self._stopped = False
            self._eof = False
            self._first_line = self._line_count
        self.starts += 1
        self._log.write(f"--- {self.name}: start {self.starts}: {' '.join(self.command())}\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
            # A session of its own: when the group of the process that started
            # nodes is orphaned (its shell exits) while one of them is stopped,
            # the kernel sends every member SIGHUP and SIGCONT. That must not
            # resume a node the soak stopped; nor should a terminal's Ctrl-C
            # reach nodes except through close().
            start_new_session=True,
        )
        _OPEN.add(self)
        self._pump = threading.Thread(
            target=self._read_output,
            args=(self.proc, self._log),
            name=f"{self.name}-stderr",
            daemon=True,
        )
        self._pump.start()
        if wait:
            self.wait_ready(timeout_s)
        return self

    def _read_output(self, proc: subprocess.Popen[bytes], log_file: IO[str]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                log_file.write(line + "\n")
                log_file.flush()
            except (OSError, ValueError):  # closed under us by close()
                pass
            with self._cond:
                self._lines.append(line)
                self._line_count += 1
                if self.ready_at is None:
                    match = READY_RE.search(line)
                    if match is not None:
                        self.node_id = match.group(1)
                        self.port = int(match.group(3))
                        self.ready_at = time.monotonic()
                self._cond.notify_all()
        proc.stderr.close()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the current process has logged that it listens.

        Raises :class:`NodeProcessError` if it exits first or the deadline passes.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.ready_at is None:
                if self._eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodeProcessError(
                        f"{self.name}: not listening within {timeout_s} s; output:\n"
                        + self.log_text()
                    )
                self._cond.wait(left)
            if self.ready_at is not None:
                return
        code = self._wait_exit(5.0)
        raise NodeProcessError(
            f"{self.name}: exited with status {code} before listening; output:\n" + self.log_text()
        )

    def line_mark(self) -> int:
        """A mark for :meth:`wait_for`'s ``since``: lines after it are new."""
        with self._cond:
            return self._line_count

    def wait_for(self, pattern: str, timeout_s: float = 20.0, *, since: int | None = None) -> str:
        """Return the first line of the current process's output matching ``pattern``.

        With ``since`` (from :meth:`line_mark`), only lines logged after the
        mark count. Waits up to ``timeout_s``. Raises
        :class:`NodeProcessError` if the output ends or the deadline passes first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            # Lines are counted over every start of the process.
            next_line = max(self._first_line, since or 0)
            while True:
                kept_from = self._line_count - len(self._lines)
                skip = max(next_line, kept_from) - kept_from
                for line in itertools.islice(self._lines, skip, None):
                    if regex.search(line):
                        return line
                next_line = self._line_count
                if self._eof:
                    raise NodeProcessError(
                        f"{self.name}: output ended without a line matching {pattern!r}; "
                        f"output:\n{self.log_text()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodeProcessError(
                        f"{self.name}: no line matching {pattern!r} within {timeout_s} s; "
                        f"output:\n{self.log_text()}"
                    )
                self._cond.wait(left)

    # -- signals -----------------------------------------------------------------------

    def _running_proc(self, what: str) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            raise NodeProcessError(f"{self.name}: not running, cannot send {what}")
        return self.proc

    def kill(self, timeout_s: float = 10.0) -> int:
        """SIGKILL the process (stopped or not) and reap it; return its exit status.

        Does nothing but return the status if it has already exited.
        """
        if self.proc is None:
            raise NodeProcessError(f"{self.name}: never started")
        if self.proc.poll() is None:
            signals.kill(self.proc, wait_s=None)
        return self._wait_exit(timeout_s)

    def stop(self) -> None:
        """SIGSTOP the process; return once the kernel reports it stopped.

        Raises :class:`NodeProcessError` if it is not running or does not stop.
        """
        proc = self._running_proc("SIGSTOP")
        self._stopped = True
        try:
            signals.stop(proc)
        except (ProcessLookupError, TimeoutError) as exc:
            raise NodeProcessError(f"{self.name}: cannot stop it: {exc}") from None
        if proc.poll() is not None:
            raise NodeProcessError(f"{self.name}: exited instead of stopping")

    def cont(self) -> None:
        """SIGCONT the process; return once the kernel reports it no longer stopped.

        Raises :class:`NodeProcessError` if it is not running or stays stopped.
        """
        proc = self._running_proc("SIGCONT")
        try:
            signals.cont(proc)
        except TimeoutError as exc:
            raise NodeProcessError(f"{self.name}: cannot continue it: {exc}") from None
        self._stopped = False

    def terminate(self, timeout_s: float = 10.0) -> int:
        """SIGTERM the process (continuing it if stopped) and wait; return its exit status.

        A node says bye to its peers and exits 0. Raises
        :class:`NodeProcessError` (after killing it) if it has not exited
        within ``timeout_s``.
        """
        proc = self._running_proc("SIGTERM")
        proc.send_signal(signal.SIGTERM)
        if self._stopped:
            signals.cont(proc)  # a stopped process acts on SIGTERM only once continued
            self._stopped = False
        try:
            return self._wait_exit(timeout_s)
        except NodeProcessError:
            self.kill()
            raise NodeProcessError(
                f"{self.name}: did not exit within {timeout_s} s of SIGTERM; killed it; "
                f"output:\n{self.log_text()}"
            ) from None

    def restart(
        self, *, graceful: bool = False, wait: bool = True, timeout_s: float = 30.0
    ) -> NodeProcess:
        """Stop the process (SIGTERM if ``graceful``, else SIGKILL) and start it again.

        Same identity, IP, port and settings. With ``wait``, returns once
        the new process listens.
        """
        if self.running:
            if graceful:
                self.terminate()
            else:
                self.kill()
        return self.start(wait=wait, timeout_s=timeout_s)

    def _wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise NodeProcessError(
                f"{self.name}: pid {self.proc.pid} did not exit within {timeout_s} s"
            ) from None
        self._stopped = False
        self._reap()
        return code

    def _reap(self) -> None:
        """Let the output thread of an exited process finish."""
        pump = self._pump
        if pump is not None and self.proc is not None and self.proc.poll() is not None:
            pump.join(timeout=5.0)
            if not pump.is_alive():
                self._pump = None

    # -- looking inside ----------------------------------------------------------------

    def rss_bytes(self) -> int:
        """The process's resident memory now, in bytes, from ``/proc``.

        Raises :class:`NodeProcessError` if it is not running.
        """
        if self.proc is None or self.proc.poll() is not None:
            raise NodeProcessError(f"{self.name}: not running")
        return read_rss_bytes(self.proc.pid)

    def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The node's ``status`` response over its control socket (``edgenode status --json``).

        Raises :class:`~edgenode.control_client.ControlError` if the node does not
        answer within ``timeout_s`` or answers with an error.
        """
        response = control_request(self.control_socket, {"op": "status"}, timeout_s=timeout_s)
        if not response.get("ok"):
            raise ControlError(f"{self.name}: status failed: {response.get('error')}")
        return response

    def peer_states(self, timeout_s: float = 5.0) -> dict[str, str]:
        """``{peer ip: state}`` from the node's status."""
        return {row["ip"]: row["state"] for row in self.status(timeout_s)["peers"]}

    # -- cleaning up -------------------------------------------------------------------

    def close(self) -> None:
        """Kill and reap the process if it runs; close the log. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - a kernel in trouble
                pass
        self._reap()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_socket_dir is not None:
            shutil.rmtree(self._own_socket_dir, ignore_errors=True)

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A last resort: close() is the way. Never leave a node running.
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass
