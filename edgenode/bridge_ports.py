"""One configured serial port: its state, its faults as the log tells them, its counters.

A port is in one of four states (``edgenode status`` shows them):

- ``opening``: the node has not tried it yet;
- ``open``: the node has the port (a device may or may not answer on it);
- ``waiting for the device``: the device file is missing (unplugged, or not
  plugged in yet): the node tries again, every few seconds at most, and
  opens it once it appears. A port absent at start is waited for, never
  fatal;
- ``error``: the port exists but cannot be opened (busy, not permitted, or
  another error, whose text ``error`` holds); tried again likewise.

Faults are logged at WARNING once, with the reason and the fix, and once
more when the port opens again; the retries in between are quiet (DEBUG).
A port that is lost while open (unplugged) is logged once; its device file
then missing is the same fault, not a new one.

Counters are kept across reopenings: those of the link sessions that ended
are added into ``totals``. Everything here is plain data the dispatcher
changes (through the bridge), in one synchronous step at a time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .mailbox import Mailbox
from .transports.serial import MISSING

if TYPE_CHECKING:
    from firmware_bridge.events import Received
    from firmware_bridge.link import Link

    from .transports.serial import SerialUnavailable

OPENING = "opening"
OPEN = "open"
WAITING = "waiting for the device"
ERROR = "error"

#: A port lost while open: its device file is then usually missing too.
LOST = "lost"

#: What a port's delivery queue holds: (device id, session number, message).
Delivery = tuple[str, int, "Received"]

#: Link counters summed over a port's sessions, as shown in status.
_COUNTERS = ("frames_in", "frames_out", "bytes_in", "bytes_out", "retransmits", "held_back")
_COUNTERS += ("out_of_memory", "tx_skipped")


def first_of_a_power_of_ten(count: int) -> bool:
    """True for the 1st, 10th, 100th ... occurrence: how repeated faults are logged."""
    return count == 10 ** (len(str(count)) - 1)


class Port:
    """One configured serial port and, while a device answers on it, its session."""

    __slots__ = (
        "attempts",
        "baud",
        "delivery",
        "device_id",
        "device_memory_errors",
        "drops",
        "dtr",
        "error",
        "fault",
        "link",
        "next_request_id",
        "outbox",
        "path",
        "pending",
        "rts",
        "session",
        "since",
        "state",
        "tick_at",
        "totals",
        "undelivered",
        "up_since",
    )

    def __init__(self, path: str, baud: int, *, dtr: bool, rts: bool, delivery_slots: int) -> None:
        self.path = path
        self.baud = baud
        self.dtr = dtr
        self.rts = rts
        self.link: Link | None = None
        self.outbox: Mailbox[bytes] | None = None  # while open
        self.device_id: str | None = None
        self.up_since: float | None = None
        self.tick_at: float | None = None
        #: link request id -> a node ``Pending`` or (conn, peer's request id), deadline
        self.pending: dict[int, tuple[Any, float]] = {}
        self.next_request_id = 1
        #: What the port's devices sent, in order, for its delivery task.
        self.delivery: Mailbox[Delivery] = Mailbox(delivery_slots)
        #: Sessions that came up on this port: answers name the one they are for.
        self.session = 0
        self.state = OPENING
        #: Failed tries to open it since it was last open.
        self.attempts = 0
        self.error: str | None = None
        #: The fault last logged (a SerialUnavailable kind, or LOST); None once open.
        self.fault: str | None = None
        self.since = time.monotonic()
        #: Messages from the port's devices that were not delivered (counted here too).
        self.undelivered = 0
        #: The MemoryErrors its device says it has survived (MEMORY_TOPIC), if it said.
        self.device_memory_errors: int | None = None
        self.totals = dict.fromkeys(_COUNTERS, 0)
        self.drops: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<serial {self.path} {self.state} {self.device_id or '-'}>"

    # -- state changes: each returns the line to log at WARNING, or None ---------------

    def open_failed(self, error: SerialUnavailable, now: float) -> str | None:
        """The port could not be opened: its state, and the warning, once per fault."""
        state = WAITING if error.kind == MISSING else ERROR
        self.attempts += 1
        if state != self.state:
            self.since = now
        self.state = state
        self.error = None if state == WAITING else str(error)
        if error.kind == self.fault or (self.fault == LOST and error.kind == MISSING):
            return None
        self.fault = error.kind
        return str(error)

    def opened(self, now: float) -> str | None:
        """The port is open; the warning that says it recovered, if a fault was logged."""
        fault, self.fault = self.fault, None
        was = self.state
        away_s = now - self.since
        self.state = OPEN
        self.error = None
        self.since = now
        self.attempts = 0
        if fault is None:
            return None
        what = "lost" if fault == LOST else (was if was == WAITING else f"in error ({fault})")
        return (
            f"serial port {self.path} is open again at {self.baud} baud "
            f"(it was {what} for {away_s:.1f} s)"
        )

    def lost(self, reason: str, now: float) -> str:
        """The open port went away (unplugged): the warning to log."""
        self.fault = LOST
        self.state = WAITING
        self.error = None
        self.since = now
        return f"serial port {self.path} lost: {reason}; waiting for it to come back"

    def link_ended(self) -> None:
        """The port's link is gone (port lost): keep its counters."""
        link = self.link
        if link is None:
            return
        stats = link.stats
        for name in _COUNTERS:
            self.totals[name] += getattr(stats, name)
        for reason, count in stats.drops.items():
            self.drops[reason] = self.drops.get(reason, 0) + count

    # -- status ----------------------------------------------------------------------

    def row(self, now: float) -> dict[str, Any]:
        """This port's object in ``edgenode status`` (``serial_ports``)."""
        link = self.link
        counters = dict(self.totals)
        drops = dict(self.drops)
        if link is not None:
            stats = link.stats
            for name in _COUNTERS:
                counters[name] += getattr(stats, name)
            for reason, count in stats.drops.items():
                drops[reason] = drops.get(reason, 0) + count
        return {
            "path": self.path,
            "baud": self.baud,
            "dtr": self.dtr,
            "rts": self.rts,
            "state": self.state,
            "error": self.error,
            "for_s": now - self.since,
            "attempts": self.attempts,
            "device": self.device_id,
            "session": "up" if link is not None and link.is_up else "down",
            "reliable": bool(link is not None and link.reliable),
            **counters,
            "drops": drops,
            "dropped": sum(drops.values()),
            "queued": len(self.delivery),
            "undelivered": self.undelivered,
            "device_out_of_memory": self.device_memory_errors,
        }
