"""systemd's notify protocol: readiness, a status line, and a watchdog fed by the loop.

A ``Type=notify`` unit puts the address of a datagram socket in
``$NOTIFY_SOCKET``; a service tells systemd about itself by sending one
datagram of ``KEY=value`` lines to it (sd_notify(3)). The node sends:

- ``READY=1`` once it listens (``systemctl start`` returns then, and units
  ordered after it start), with a first ``STATUS=``;
- ``STATUS=2/3 peers up`` whenever the number of peers up or known changes
  (``systemctl status`` shows it), and while the watchdog is withheld, why;
- ``STOPPING=1`` when it starts shutting down;
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` (systemd's ``WatchdogSec=``;
  only in the process ``$WATCHDOG_PID`` names, when set), **from the
  dispatcher's own timer heap and only while the loop's lag stays under
  the keepalive timeout**. A loop that is wedged (a handler that blocks it)
  runs no timers, and a dispatcher that is stuck runs none of its own; a
  loop that still turns but handles events later than the node allows a
  peer to stay silent is starved. In all three cases the pings stop, and
  systemd restarts the node after ``WatchdogSec=`` (docs/systemd.md).

Why that bound: the keepalive timeout is how stale the node lets its view
of a peer become before it gives the peer up. A loop that acts on events
later than that runs on a view of the network its own rules call dead; the
same figure scales with the board (15 s by default, 30 s on a Pi Zero W)
and users already tune it, so it is not a separate setting.

The loop's lag over a window (the time between two ticks) is the larger of
how late this tick's timer ran and the mean lag of the inbox events the
dispatcher handled since the previous tick (the dispatcher's
``lag_sum_s`` and ``events_handled``). A mean, not the last or the worst
event's: one late event is a pause, a window of them is a starved loop;
and an idle node's figure must not stay stuck at an old event's lag.

The protocol needs ten lines of the standard library (``socket``), so no
package: ``sdnotify`` sends with a blocking socket and hides every error,
``systemd-python`` needs libsystemd's headers and a compiler to install.
Sends never wait: the socket is non-blocking, and a send that fails (the
socket full or gone) is counted and logged once, never fatal.

:class:`WatchdogRhythm`, the ``parse_*`` functions, :func:`status_text`
and :func:`message` are pure (time comes in as arguments); :class:`SystemdNotifier` is the thin
part that owns the socket. The node imports this module only when
``$NOTIFY_SOCKET`` is set.
"""

from __future__ import annotations

import faulthandler
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol, Union

from .errors import ConfigError

__all__ = [
    "MAX_ADDRESS_BYTES",
    "MIN_WATCHDOG_USEC",
    "SystemdNotifier",
    "WatchdogRhythm",
    "parse_notify_socket",
    "parse_watchdog",
    "status_text",
]

log = logging.getLogger("edgenode.systemd")

#: The size of ``sun_path`` in ``struct sockaddr_un`` on Linux.
MAX_ADDRESS_BYTES = 108
#: A shorter watchdog would restart a healthy node over its ordinary pauses
#: (a TLS handshake on a Pi Zero W, a garbage collection).
MIN_WATCHDOG_USEC = 1_000_000

Address = Union[str, bytes]


class Loop(Protocol):
    """What the watchdog needs of the dispatcher (``edgenode.dispatcher.Dispatcher``)."""

    events_handled: int
    lag_sum_s: float

    def schedule(self, when: float, callback: Callable[[float], None]) -> None:
        """Call ``callback(now)`` from the loop once ``when`` has passed."""


# -- the pure part ---------------------------------------------------------------------


def parse_notify_socket(value: str) -> Address:
    """The address ``$NOTIFY_SOCKET`` names: a path, or ``@name`` in Linux's
    abstract namespace (returned as bytes with a leading NUL).

    Raises :class:`ConfigError` for anything else (a relative path, systemd's
    ``vsock:`` form for virtual machines) and for an address longer than
    ``sun_path`` holds.
    """
    raw = value.encode("utf-8", "surrogateescape")
    if value.startswith("@"):
        address: Address = b"\0" + raw[1:]
    elif value.startswith("/"):
        address = value
    else:
        raise ConfigError(f"NOTIFY_SOCKET: expected an absolute path or @name, got {value!r:.80}")
    size = len(raw)
    if size > MAX_ADDRESS_BYTES:
        raise ConfigError(
            f"NOTIFY_SOCKET: expected at most {MAX_ADDRESS_BYTES} bytes, got {size}: {value!r:.80}"
        )
    return address


def parse_watchdog(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog interval systemd asks of process ``pid``, in seconds, or None.

    None when ``$WATCHDOG_USEC`` is unset or empty, or when ``$WATCHDOG_PID``
    names another process (a child inherits the variables, not the duty).
    Raises :class:`ConfigError` for a value that is not a whole number, or a
    watchdog shorter than ``MIN_WATCHDOG_USEC``.
    """
    usec_text = environ.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    pid_text = environ.get("WATCHDOG_PID", "")
    if pid_text:
        if not pid_text.isdigit():
            raise ConfigError(f"WATCHDOG_PID: expected a process id, got {pid_text!r:.40}")
        if int(pid_text) != pid:
            return None
    if not usec_text.isdigit():
        raise ConfigError(
            f"WATCHDOG_USEC: expected a whole number of microseconds, got {usec_text!r:.40}"
        )
    usec = int(usec_text)
    if usec < MIN_WATCHDOG_USEC:
        raise ConfigError(
            f"WATCHDOG_USEC: expected at least {MIN_WATCHDOG_USEC} (WatchdogSec=1s), got {usec}"
        )
    return usec / 1e6


def status_text(up: int, known: int, withheld_lag_s: float | None, max_lag_s: float) -> str:
    """The ``STATUS=`` line: peers up of those known, and why the watchdog is
    not fed when it is not."""
    text = f"{up}/{known} peers up"
    if withheld_lag_s is not None:
        text += f"; loop lag {withheld_lag_s:.1f} s over {max_lag_s:g} s: watchdog not fed"
    return text


def message(*lines: str) -> bytes:
    """One notify datagram: ``KEY=value`` lines joined by newlines."""
    return "\n".join(lines).encode("utf-8", "replace")


class Tick:
    """What :meth:`WatchdogRhythm.tick` decided."""

    __slots__ = ("feed", "lag_s", "next_due")

    def __init__(self, feed: bool, lag_s: float, next_due: float) -> None:
        #: Send ``WATCHDOG=1`` now.
        self.feed = feed
        #: The loop's lag over the window that ended at this tick.
        self.lag_s = lag_s
        #: When the next tick is due.
        self.next_due = next_due


class WatchdogRhythm:
    """When to feed systemd's watchdog: every ``period_s`` (half its
    interval), while the loop's lag stays at most ``max_lag_s``.

    Pure: the caller passes the tick's time, when it was due, and the
    dispatcher's running event count and lag sum.
    """

    __slots__ = ("_events", "_lag_sum_s", "fed", "max_lag_s", "period_s", "withheld")

    def __init__(self, period_s: float, max_lag_s: float) -> None:
        self.period_s = period_s
        self.max_lag_s = max_lag_s
        #: Pings sent, and ticks at which the lag was over the bound.
        self.fed = 0
        self.withheld = 0
        self._events = 0
        self._lag_sum_s = 0.0

    def tick(self, now: float, due: float, events_handled: int, lag_sum_s: float) -> Tick:
        """Decide at a tick that was due at ``due`` and runs at ``now``."""
        handled = events_handled - self._events
        mean_s = (lag_sum_s - self._lag_sum_s) / handled if handled > 0 else 0.0
        self._events, self._lag_sum_s = events_handled, lag_sum_s
        lag_s = max(now - due, mean_s, 0.0)
        feed = lag_s <= self.max_lag_s
        if feed:
            self.fed += 1
        else:
            self.withheld += 1
        # From now, not from when it was due: a late tick is not followed by
        # a burst of catching-up pings.
        return Tick(feed, lag_s, now + self.period_s)


# -- the socket ------------------------------------------------------------------------


class SystemdNotifier:
    """Speaks to systemd through ``$NOTIFY_SOCKET``; made by :meth:`from_environ`.

    Every method sends at most one datagram and never waits.
    """

    def __init__(
        self, address: Address, *, watchdog_interval_s: float | None, max_lag_s: float
    ) -> None:
        self.address = address
        #: The rhythm of the watchdog pings, when systemd asks for them.
        self.watchdog: WatchdogRhythm | None = None
        if watchdog_interval_s is not None:
            self.watchdog = WatchdogRhythm(watchdog_interval_s / 2, max_lag_s)
        self.max_lag_s = max_lag_s
        #: Datagrams sent, and sends that failed (the socket full or gone).
        self.sent = 0
        self.send_failures = 0
        self._socket: socket.socket | None = None
        self._failure_logged = False
        self._closed = False
        self._stopping = False
        self._peers = (0, 0)
        self._status = ""
        self._withheld_lag_s: float | None = None

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str], *, pid: int, max_lag_s: float
    ) -> SystemdNotifier | None:
        """A notifier when ``$NOTIFY_SOCKET`` is set, else None.

        Raises :class:`ConfigError` for a ``$NOTIFY_SOCKET``,
        ``$WATCHDOG_USEC`` or ``$WATCHDOG_PID`` it cannot use: under a
        ``Type=notify`` unit a node that cannot say it is ready would only
        be killed when its start times out.
        """
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return None
        address = parse_notify_socket(value)
        interval_s = parse_watchdog(environ, pid)
        return cls(address, watchdog_interval_s=interval_s, max_lag_s=max_lag_s)

    @property
    def where(self) -> str:
        """The address, as ``$NOTIFY_SOCKET`` spells it."""
        address = self.address
        if isinstance(address, bytes):
            return "@" + address[1:].decode("utf-8", "replace")
        return address

    # -- what the node calls ---------------------------------------------------------

    def ready(self, known: int) -> None:
        """The node listens: ``READY=1``, with its first status line."""
        self._peers = (0, known)
        self._status = self._status_now()
        self._send(message("READY=1", f"STATUS={self._status}"))

    def peer_count(self, up: int, known: int) -> None:
        """The number of peers up or known changed: a new ``STATUS=``."""
        self._peers = (up, known)
        self._send_status()

    def stopping(self) -> None:
        """The node starts shutting down: ``STOPPING=1``."""
        if not self._closed and not self._stopping:
            self._stopping = True
            self._status = self._status_now()
            self._send(message("STOPPING=1", f"STATUS={self._status}"))

    def start_watchdog(self, loop: Loop, now: float) -> None:
        """Feed the watchdog from ``loop``'s timers, from ``now`` on; nothing
        when systemd asked for none.

        Also turns on :mod:`faulthandler`, so that when systemd kills a
        wedged node (``WatchdogSignal=``, SIGABRT by default) the journal
        shows the Python stack the loop was stuck in.
        """
        rhythm = self.watchdog
        if rhythm is None:
            return
        if not faulthandler.is_enabled():
            faulthandler.enable()

        def tick_due_at(due: float) -> Callable[[float], None]:
            def tick(now: float) -> None:
                if self._closed:
                    return
                decision = rhythm.tick(now, due, loop.events_handled, loop.lag_sum_s)
                self._after_tick(decision)
                loop.schedule(decision.next_due, tick_due_at(decision.next_due))

            return tick

        loop.schedule(now, tick_due_at(now))
        log.info(
            "feeding the systemd watchdog every %.1f s while the loop lags under %g s",
            rhythm.period_s,
            rhythm.max_lag_s,
        )

    def close(self) -> None:
        """Send nothing more; close the socket. Idempotent."""
        self._closed = True
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def figures(self) -> dict[str, Any]:
        """Counts for ``Node.stats()`` (and ``edgenode status --json``)."""
        rhythm = self.watchdog
        return {
            "systemd_notify_sent": self.sent,
            "systemd_notify_failures": self.send_failures,
            "systemd_watchdog_fed": rhythm.fed if rhythm is not None else 0,
            "systemd_watchdog_withheld": rhythm.withheld if rhythm is not None else 0,
        }

    # -- inside --------------------------------------------------------------------

    def _after_tick(self, decision: Tick) -> None:
        if decision.feed:
            if self._withheld_lag_s is not None:
                self._withheld_lag_s = None
                log.warning(
                    "loop lag back to %.3f s: feeding the systemd watchdog again",
                    decision.lag_s,
                )
                self._status = self._status_now()
                self._send(message("WATCHDOG=1", f"STATUS={self._status}"))
            else:
                self._send(b"WATCHDOG=1")
            return
        if self._withheld_lag_s is None:
            log.warning(
                "loop lag %.1f s over the %g s bound (the keepalive timeout): not feeding "
                "the systemd watchdog; systemd restarts the node if this lasts",
                decision.lag_s,
                self.max_lag_s,
            )
        self._withheld_lag_s = decision.lag_s
        self._send_status()

    def _status_now(self) -> str:
        if self._stopping:
            return "stopping"  # peers going down as the node says bye is no news
        up, known = self._peers
        return status_text(up, known, self._withheld_lag_s, self.max_lag_s)

    def _send_status(self) -> None:
        status = self._status_now()
        if status != self._status:
            self._status = status
            self._send(message(f"STATUS={status}"))

    def _send(self, payload: bytes) -> None:
        if self._closed:
            return
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(payload, self.address)
        except OSError as exc:
            # Full (EAGAIN), gone (ENOENT), nobody there (ECONNREFUSED): systemd
            # is the one to act on a node it does not hear from.
            self.send_failures += 1
            if not self._failure_logged:
                self._failure_logged = True
                log.warning(
                    "cannot notify systemd at %s: %s (further failures are counted, "
                    "not logged: systemd_notify_failures in edgenode status --json)",
                    self.where,
                    exc.strerror or exc,
                )
            return
        self.sent += 1
