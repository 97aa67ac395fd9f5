"""A process's figures as Linux shows them in /proc: memory, CPU time, open descriptors.

For the QA tools that watch node processes: :class:`~edgenode.testing.procs.NodeProcess`
(:meth:`~edgenode.testing.procs.NodeProcess.rss_bytes`), the soak, the flood
tool and ``edgenode bench``. Each reads once, when called: no thread, no
sampling of its own (:class:`CpuMeter` reads at its start and its stop).
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..errors import EdgeNodeError


# Defined here, the lowest of the kit's process modules, so that the readers
# below and NodeProcess (procs.py, which offers it with NodeProcess) raise one type.
class NodeProcessError(EdgeNodeError):
    """A node process did not start, exited unexpectedly or did not obey a signal, or a
    process's figures could not be read (it is gone, or a zombie)."""


def read_rss_bytes(pid: int) -> int:
    """The resident memory of process ``pid`` (``VmRSS``), in bytes.

    Raises :class:`NodeProcessError` if the process is gone or has no RSS
    (a zombie).
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as status_file:
            for line in status_file:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError as exc:
        raise NodeProcessError(f"process {pid}: cannot read its memory: {exc.strerror}") from None
    raise NodeProcessError(f"process {pid}: no VmRSS in /proc/{pid}/status (a zombie?)")


def read_cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time process ``pid`` has used (all its threads), in seconds.

    Raises :class:`NodeProcessError` if the process is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            # The command name, in parentheses, may hold spaces: split after it.
            fields = stat_file.read().rpartition(")")[2].split()
    except OSError as exc:
        raise NodeProcessError(f"process {pid}: cannot read its CPU time: {exc.strerror}") from None
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks  # fields 14 and 15 of proc(5)


def process_figures(pid: int) -> dict[str, Any]:
    """RSS, peak RSS (MB) and open file descriptors of process ``pid`` (Linux /proc)."""
    figures: dict[str, Any] = {"rss_mb": None, "peak_rss_mb": None, "fds": None}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    figures["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
                elif line.startswith("VmHWM:"):
                    figures["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
        figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return figures


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process ``pid`` has used, in seconds; None if it is gone."""
    try:
        return sum(read_cpu_seconds(pid))
    except NodeProcessError:
        return None


class CpuMeter:
    """A process's CPU use, in % of one CPU, from now until :meth:`stop`."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.percent: float | None = None
        self._cpu = cpu_seconds(pid) if pid else None
        self._started = time.monotonic()

    def stop(self) -> None:
        """Read the CPU time again and set :attr:`percent` (None if the process is gone)."""
        end = cpu_seconds(self.pid) if self.pid else None
        elapsed = time.monotonic() - self._started
        if self._cpu is not None and end is not None and elapsed > 0:
            self.percent = round((end - self._cpu) * 100 / elapsed, 1)
