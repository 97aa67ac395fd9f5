"""SIGKILL, SIGSTOP and SIGCONT for any process: a pid, or anything with ``.pid``.

Small on purpose: process wrappers (``subprocess.Popen``, a node process
class) reuse them. :func:`stop` and :func:`cont` return once the kernel
reports the new state, so a test that stops a node knows it is frozen.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from edgenode.errors import InvalidArgument

_STATE_TIMEOUT_S = 5.0


def pid_of(proc: Any) -> int:
    """The pid of ``proc``: an int, or an object with an int ``pid``."""
    pid = (
        proc if isinstance(proc, int) and not isinstance(proc, bool) else getattr(proc, "pid", None)
    )
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise InvalidArgument(f"expected a pid or a process with one, got {proc!r:.60}")
    return pid


def process_state(proc: Any) -> str | None:
    """The kernel's one-letter state of ``proc`` (R, S, T, Z...); None once it is gone.

    Reads ``/proc/PID/stat`` (Linux).
    """
    try:
        with open(f"/proc/{pid_of(proc)}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ")".
    return stat[stat.rindex(b")") + 2 :].split(b" ", 1)[0].decode()


def _wait_state(proc: Any, wanted: bool, stopped_states: str = "Tt") -> None:
    deadline = time.monotonic() + _STATE_TIMEOUT_S
    while True:
        state = process_state(proc)
        if state is None or state == "Z" or (state in stopped_states) == wanted:
            return
        if time.monotonic() >= deadline:
            what = "stop" if wanted else "continue"
            raise TimeoutError(
                f"process {pid_of(proc)} did not {what} within {_STATE_TIMEOUT_S} s (state {state})"
            )
        time.sleep(0.001)


def kill(proc: Any, *, wait_s: float | None = 5.0) -> int | None:
    """SIGKILL ``proc``. If it has a ``wait(timeout=)`` method (a Popen), reap it.

    Returns the exit status when reaped, else None. A process already gone
    is not an error.
    """
    try:
        os.kill(pid_of(proc), signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait = getattr(proc, "wait", None)
    if wait is None or wait_s is None:
        return None
    return wait(timeout=wait_s)


def stop(proc: Any) -> None:
    """SIGSTOP ``proc`` and return once it is stopped (frozen: no loop, no keepalive).

    Raises ProcessLookupError if it is gone, TimeoutError if it does not stop.
    """
    os.kill(pid_of(proc), signal.SIGSTOP)
    _wait_state(proc, True)


def cont(proc: Any) -> None:
    """SIGCONT ``proc`` and return once it runs again. A process already gone is not an error."""
    try:
        os.kill(pid_of(proc), signal.SIGCONT)
    except ProcessLookupError:
        return
    _wait_state(proc, False)


@contextmanager
def stopped(proc: Any) -> Iterator[None]:
    """``with stopped(proc):`` freeze ``proc`` for the block; it continues afterwards."""
    stop(proc)
    try:
        yield
    finally:
        cont(proc)
