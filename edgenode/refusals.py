"""What a node may write about the connections it refuses: bounded, whatever the flood.

A node on a site network refuses connections all day under attack: over
the handshake limits, stalled handshakes, garbage instead of a preamble,
unauthorised certificates. One warning line each wrote about 6,150 lines a
minute during a flood from 20 addresses: SD-card wear and a full journal on
a Pi. :class:`RefusalLog` decides what may be written, and keeps the exact
counts for ``edgenode status``. It is pure: time comes in as ``now``, and
it returns text for its caller to log.

The rules
---------

* Every refusal is counted, exactly: in all, by kind of reason, and by
  address (:meth:`RefusalLog.counters`).
* A refusal gets a line of its own while the line budget lasts: a bucket of
  ``burst`` lines, refilled at one line per ``refill_s``. A trickle (one
  misconfigured node redialling) is logged line by line; a flood spends the
  bucket on its first few connections.
* Refusals past the budget are summarised in one line, at most once per
  ``interval_s``, across all addresses: how many, in how long, from how
  many addresses, the commonest reasons with their counts, and the
  addresses refused most.
* Addresses are counted as the handshake limits count them
  (:func:`address_group`): an IPv6 address by its /64, since one host can
  use any address of its /64.

So a node writes at most ``burst + 60 / refill_s + 60 / interval_s`` lines
a minute about refusals, 71 at the defaults, however many connections and
addresses a flood uses. The caller must call :meth:`RefusalLog.summary` at
:meth:`RefusalLog.next_summary_at` (whoever records a refusal arranges for
that wake-up), or the last summary of a flood waits for the next refusal.

Reasons are told apart by their wording with the numbers blanked
(:func:`reason_kind`): ``handshake not finished within 0.5 s`` from any
address is one kind. At most ``max_kinds`` kinds and ``max_addresses``
addresses are told apart; the rest are counted as "other".
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

from .errors import ConfigError

__all__ = ["RefusalLog", "address_group", "reason_kind"]

IPV6_GROUP_PREFIX = 64
#: Longest kind of reason kept, and longest example shown in a summary.
MAX_KIND_CHARS = 80
MAX_EXAMPLE_CHARS = 100
OTHER = "other"

# A number, or a hex byte with a digit in it ("4e"): what varies between refusals.
_NUMBER = re.compile(r"\b[\da-f]*\d[\da-f.]*")
_REPEATED_N = re.compile(r"\bN(?:,? N\b)+")


def address_group(ip: str) -> str:
    """The unit the per-address limits count ``ip`` in: itself, or its /64 for IPv6.

    ``ip`` is normalised (:func:`edgenode.registry.normalise_ip`): an
    IPv4-mapped address is already its IPv4 address. Text that is not an
    address is returned as it is.
    """
    if ":" not in ip:
        return ip
    try:
        network = ipaddress.IPv6Network((ip, IPV6_GROUP_PREFIX), strict=False)
    except ValueError:
        return ip
    return f"{network.network_address}/{IPV6_GROUP_PREFIX}"


def reason_kind(reason: str) -> str:
    """``reason`` with numbers blanked and details cut: what refusals are grouped by.

    The wording up to the first ``": "`` or ``", got "`` is kept, each number
    becomes ``N`` (a run of them one ``N``): ``4 handshakes already in
    progress (limit 4)`` is ``N handshakes already in progress (limit N)``;
    ``tls handshake failed: certificate verify failed`` is ``tls handshake
    failed``.
    """
    head = reason
    for separator in (", got ", ": "):
        cut = head.find(separator)
        if cut > 0:
            head = head[:cut]
    head = _REPEATED_N.sub("N", _NUMBER.sub("N", head))
    return " ".join(head.split())[:MAX_KIND_CHARS] or "no reason"


def _plural(count: int, noun: str) -> str:
    if count == 1:
        return f"{count:,} {noun}"
    return f"{count:,} {noun}{'es' if noun.endswith('ss') else 's'}"


class _Counts:
    """Counts by key for at most ``limit`` keys; the rest are added up as other."""

    __slots__ = ("by_key", "limit", "other")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_key: dict[str, int] = {}
        self.other = 0

    def add(self, key: str) -> None:
        by_key = self.by_key
        count = by_key.get(key)
        if count is not None:
            by_key[key] = count + 1
        elif len(by_key) < self.limit:
            by_key[key] = 1
        else:
            self.other += 1

    def top(self, n: int) -> list[tuple[str, int]]:
        return sorted(self.by_key.items(), key=lambda item: (-item[1], item[0]))[:n]


class RefusalLog:
    """Counts refused connections and rations the lines written about them.

    See the module docstring for the rules. ``noun`` and ``source`` name what
    is refused and where from, in the lines (``connection``, ``address``).
    """

    def __init__(
        self,
        *,
        burst: int = 5,
        refill_s: float = 10.0,
        interval_s: float = 1.0,
        top: int = 3,
        max_kinds: int = 32,
        max_addresses: int = 1024,
        noun: str = "connection",
        source: str = "address",
    ) -> None:
        """Raises :class:`ConfigError` unless ``burst``, ``top`` and the caps are
        integers >= 1 and ``refill_s`` and ``interval_s`` are positive and finite."""
        for name, count in (
            ("burst", burst),
            ("top", top),
            ("max_kinds", max_kinds),
            ("max_addresses", max_addresses),
        ):
            if not isinstance(count, int) or count < 1:
                raise ConfigError(f"refusal log {name}: expected an integer >= 1, got {count!r}")
        for name, seconds in (("refill_s", refill_s), ("interval_s", interval_s)):
            if not (seconds > 0 and math.isfinite(seconds)):
                raise ConfigError(
                    f"refusal log {name}: expected a positive number of seconds, got {seconds!r}"
                )
        self.burst = burst
        self.refill_s = refill_s
        self.interval_s = interval_s
        self.top = top
        self.noun = noun
        self.source = source
        self._max_kinds = max_kinds
        self._max_addresses = max_addresses
        # Exact, for status.
        self.total = 0
        self.lines = 0
        self.summaries = 0
        self._kinds = _Counts(max_kinds)
        self._addresses = _Counts(max_addresses)
        self._last: tuple[str, str, float] | None = None
        # The line budget: tokens, and when they were counted.
        self._tokens = float(burst)
        self._tokens_at: float | None = None
        # Refusals since the last summary that had no line of their own.
        self._pending = 0
        self._pending_since = 0.0
        self._window_kinds: dict[str, list[Any]] = {}  # kind -> [count, latest reason]
        self._window_other_kinds = 0
        self._window_addresses = _Counts(max_addresses)

    def record(self, ip: str, reason: str, now: float, *, quiet: bool = False) -> str | None:
        """Count one refused connection from ``ip``; return the line to log now, or None.

        None means the refusal is counted for the next summary
        (:meth:`summary`). A leading ``"{ip}: "`` in ``reason`` is dropped.
        A ``quiet`` refusal never has a line of its own, only its share of
        a summary: for what is not the peer's fault and comes in bursts
        (a dial its node gave up before it was accepted).
        """
        if reason.startswith(ip) and reason[len(ip) : len(ip) + 2] == ": ":
            reason = reason[len(ip) + 2 :]
        kind = reason_kind(reason)
        group = address_group(ip)
        self.total += 1
        self._kinds.add(kind)
        self._addresses.add(group)
        self._last = (ip, reason, now)
        if not quiet and self._take_token(now):
            self.lines += 1
            return f"refused {self.noun} from {ip}: {reason}"
        if not self._pending:
            self._pending_since = now
        self._pending += 1
        window = self._window_kinds.get(kind)
        if window is not None:
            window[0] += 1
            window[1] = reason
        elif len(self._window_kinds) < self._max_kinds:
            self._window_kinds[kind] = [1, reason]
        else:
            self._window_other_kinds += 1
        self._window_addresses.add(group)
        return None

    def next_summary_at(self) -> float | None:
        """When :meth:`summary` has a line to give, or None while nothing waits."""
        if not self._pending:
            return None
        # The refusals waiting all came after the last summary, so summaries
        # are at least interval_s apart.
        return self._pending_since + self.interval_s

    def summary(self, now: float) -> str | None:
        """The summary line of the refusals waiting, if it is due at ``now``; else None."""
        due = self.next_summary_at()
        if due is None or now < due:
            return None
        kinds = sorted(self._window_kinds.values(), key=lambda entry: -entry[0])
        shown = [
            f"{count:,} {_clip(example, MAX_EXAMPLE_CHARS)}" for count, example in kinds[: self.top]
        ]
        rest = sum(count for count, _ in kinds[self.top :]) + self._window_other_kinds
        if rest:
            shown.append(f"{rest:,} other")
        addresses = self._window_addresses
        sources = len(addresses.by_key)
        counted = _plural(sources, self.source)
        if addresses.other:
            counted = f"over {counted}"
        top = ", ".join(f"{group} ({count:,})" for group, count in addresses.top(self.top))
        more = _plural(self._pending, f"more {self.noun}")
        line = (
            f"refused {more} in {now - self._pending_since:.1f} s from {counted}: "
            f"{'; '.join(shown)}; most from {top}"
        )
        self.summaries += 1
        self._pending = 0
        self._window_kinds = {}
        self._window_other_kinds = 0
        self._window_addresses = _Counts(self._max_addresses)
        return line

    def counters(self, now: float) -> dict[str, Any]:
        """The exact counts, for status: every figure since the node started.

        ``by_reason`` maps each kind of reason to its count (past
        ``max_kinds`` kinds, under ``"other"``); ``top_addresses`` lists
        ``[address or /64, count]``, most refused first; ``last`` is the
        latest refusal (address, reason, seconds ago) or None.
        """
        by_reason = dict(self._kinds.top(self._max_kinds))
        if self._kinds.other:
            by_reason[OTHER] = self._kinds.other
        last = None
        if self._last is not None:
            ip, reason, at = self._last
            last = {"ip": ip, "reason": reason, "age_s": now - at}
        return {
            "total": self.total,
            "lines": self.lines,
            "summaries": self.summaries,
            "waiting": self._pending,
            "by_reason": by_reason,
            "top_addresses": [list(item) for item in self._addresses.top(self.top)],
            "other_addresses": self._addresses.other,
            "last": last,
        }

    def _take_token(self, now: float) -> bool:
        if self._tokens_at is not None:
            self._tokens = min(
                float(self.burst), self._tokens + (now - self._tokens_at) / self.refill_s
            )
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def __repr__(self) -> str:
        return (
            f"<RefusalLog total={self.total} lines={self.lines} "
            f"summaries={self.summaries} waiting={self._pending}>"
        )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
