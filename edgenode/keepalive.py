"""One deadline scheduler for every peer: pings, dead-peer detection and redials.

The rules
---------

Timers are not tasks. The node's single dispatcher asks
:meth:`Keepalive.next_deadline` how long it may wait for its inbox, and when
it wakes it calls :meth:`Keepalive.due` and carries out what comes back:

* ``(PING, key, nonce)``: send a ping carrying ``nonce``. A node pings when it
  has *sent* nothing to the peer for an interval. Any frame sent counts, so
  pings are skipped while data flows; emitting a ping counts as a send, and
  the scheduler records it itself. The interval is shortened by a random
  fraction of up to ``jitter`` on every cycle, so peers that came up together
  drift apart instead of waking together.
* ``(DEAD, key, 0)``: nothing was *received* from the peer for ``timeout_s``.
  Any frame received proves liveness, data as much as a pong. Tracking of the
  key stops at once; the node closes the connection and calls
  :meth:`Keepalive.link_down`.
* ``(DIAL, key, 0)``: a scheduled dial is due.

Inbound and outbound links are one type with one code path (docs/architecture.md, failure
2): the scheduler never learns a link's direction, and both ends ping. It
reports liveness per direction instead (:meth:`Keepalive.liveness`): whether
our pings are answered, and whether the peer's frames are arriving.

Redials follow the rules of :mod:`edgenode.redial`, one state per key:
flaps (links that went down, dials that reached the peer and failed) grow
an exponential backoff, links that carried frames pay it back at one step
per ``stable_after_s`` of life, a dial that found no listener is retried
after a tenth of the peer's absence whatever the backoff, and a sign of
life (:meth:`Keepalive.peer_alive`: a beacon, a connection from the peer)
pulls a pending dial in. :meth:`Keepalive.pending_dial` says when the next
dial is due, for status displays.

How it stays cheap
------------------

All deadlines live in one heap, with lazy invalidation. :meth:`sent` and
:meth:`received` run for every frame, so they only store a timestamp; they
never touch the heap. This is correct because a link's real deadline,
``min(last_sent + ping_after, last_received + timeout)``, only ever moves
*later* between two visits of the scheduler: a heap entry is therefore never
later than the deadline it stands for. When an entry comes due, the real
deadline is recomputed from the timestamps, and the scheduler either acts or
pushes the entry back at the real deadline. Each link and each pending dial
has at most one live entry; an entry whose link went down, or whose dial was
cancelled or rescheduled, is dropped when it surfaces. So the scheduler's
work is one heap operation per link per ping interval, whether the link is
idle (and pinged) or busy (and the entry merely moves), and not per frame.

Pings are also batched: with ``ping_slack_s``, a visit that is due anyway
sends every ping that would fall due within the slack, early, instead of
waking again for each. Deaths and dials never fire early. With N peers, an
interval I and a slack S the dispatcher wakes for its own pings about
``min(N, I / S)`` times per interval rather than N times, and the peers'
pongs come back together too.

This module is pure: no clock, no randomness, no I/O. Time comes in as
``now`` (monotonic seconds) and randomness from the ``rand`` callable given
to the constructor. Ping nonces come from a per-scheduler counter.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Hashable

from edgenode.errors import ConfigError
from edgenode.redial import RedialPolicy, RedialState, check_backoff

PING = "ping"
DEAD = "dead"
DIAL = "dial"

# Pongs are matched against at most this many outstanding pings per link.
MAX_OUTSTANDING_PINGS = 4
# 2**60 times any sane base is far above any cap, and still a finite float.
_MAX_BACKOFF_EXPONENT = 60
_MAX_NONCE = 0xFFFFFFFF
# Stale heap entries tolerated beyond twice the live ones before compacting.
_COMPACT_SLACK = 64
#: The default of ``stable_after_s`` (or the timeout, if shorter): a link
#: that carried frames this long pays for its own end (edgenode.redial).
STABLE_AFTER_S = 2.0


class Backoff:
    """Capped exponential backoff with jitter (the serial bridge reopens ports with it)."""

    __slots__ = ("attempt", "base_s", "cap_s")

    def __init__(self, base_s: float, cap_s: float) -> None:
        """Raises :class:`ConfigError` unless ``0 < base_s <= cap_s`` (both finite)."""
        check_backoff(base_s, cap_s)
        self.base_s: float = base_s
        self.cap_s: float = cap_s
        self.attempt: int = 0

    def next_delay(self, rand: float) -> float:
        """Return the next delay for a ``rand`` in [0, 1), and count the attempt.

        The delay is ``min(cap_s, base_s * 2**attempt)``, scaled by
        ``0.5 + 0.5 * rand`` so that peers that failed together retry apart.
        """
        exponent = min(self.attempt, _MAX_BACKOFF_EXPONENT)
        delay = min(self.cap_s, self.base_s * 2**exponent) * (0.5 + 0.5 * rand)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from ``base_s``."""
        self.attempt = 0

    def __repr__(self) -> str:
        return f"<Backoff attempt={self.attempt} base={self.base_s}s cap={self.cap_s}s>"


class Liveness:
    """A snapshot of one link's keepalive state, for status displays and tests."""

    __slots__ = (
        "last_received_age_s",
        "last_sent_age_s",
        "our_pings_answered",
        "pings_sent",
        "pongs_received",
        "rtt_s",
        "their_frames_arriving",
    )

    def __init__(
        self,
        *,
        last_sent_age_s: float | None,
        last_received_age_s: float | None,
        pings_sent: int,
        pongs_received: int,
        rtt_s: float | None,
        our_pings_answered: bool,
        their_frames_arriving: bool,
    ) -> None:
        self.last_sent_age_s: float | None = last_sent_age_s
        self.last_received_age_s: float | None = last_received_age_s
        self.pings_sent: int = pings_sent
        self.pongs_received: int = pongs_received
        self.rtt_s: float | None = rtt_s
        # Outbound direction: no ping has waited longer than timeout_s for its pong.
        self.our_pings_answered: bool = our_pings_answered
        # Inbound direction: some frame arrived within timeout_s.
        self.their_frames_arriving: bool = their_frames_arriving

    def __repr__(self) -> str:
        rtt = "?" if self.rtt_s is None else f"{self.rtt_s * 1000:.1f}ms"
        return (
            f"<Liveness out={'ok' if self.our_pings_answered else 'unanswered'} "
            f"in={'ok' if self.their_frames_arriving else 'silent'} rtt={rtt} "
            f"pings={self.pings_sent} pongs={self.pongs_received}>"
        )


class _Link:
    """The timestamps and counters of one link that is up."""

    __slots__ = (
        "alive",
        "held",
        "last_received",
        "last_sent",
        "outstanding",
        "ping_after_s",
        "pings_sent",
        "pongs_received",
        "rtt_s",
        "unanswered_since",
        "up_since",
    )

    def __init__(self, now: float, ping_after_s: float) -> None:
        self.alive: bool = True
        # Paused by our own slow consumer: silence is ours, not the peer's.
        self.held: bool = False
        self.up_since: float = now
        # The hello exchange just went both ways.
        self.last_sent: float = now
        self.last_received: float = now
        self.ping_after_s: float = ping_after_s
        self.pings_sent: int = 0
        self.pongs_received: int = 0
        self.rtt_s: float | None = None
        # nonce -> time sent, oldest first.
        self.outstanding: dict[int, float] = {}
        # When the oldest ping still unanswered was sent (even if its nonce
        # was dropped from `outstanding`).
        self.unanswered_since: float | None = None


class Keepalive:
    """The keepalive and redial scheduler for all of a node's peers."""

    def __init__(
        self,
        *,
        interval_s: float,
        timeout_s: float,
        rand: Callable[[], float],
        jitter: float = 0.1,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        stable_after_s: float | None = None,
        ping_slack_s: float = 0.0,
        probe_fraction: float = 0.1,
        hint_interval_s: float = 5.0,
    ) -> None:
        """Create a scheduler with nothing scheduled.

        ``rand`` returns a float in [0, 1). ``stable_after_s`` defaults to
        :data:`STABLE_AFTER_S` or ``timeout_s``, whichever is shorter; it,
        ``probe_fraction`` and ``hint_interval_s`` are the redial rules'
        (:mod:`edgenode.redial`). Raises :class:`ConfigError` if
        ``interval_s`` is not positive, ``timeout_s`` is not greater than
        ``interval_s``, ``jitter`` is not in [0, 0.5), the backoff base is
        not positive or the cap is below it, ``stable_after_s`` is negative,
        ``ping_slack_s`` is negative or not below ``interval_s * (1 -
        jitter)`` (the shortest ping interval), or a redial setting is out
        of its range.
        """
        if not (interval_s > 0 and math.isfinite(interval_s)):
            raise ConfigError(
                f"keepalive interval must be a positive number of seconds, got {interval_s!r}"
            )
        if not (timeout_s > interval_s and math.isfinite(timeout_s)):
            raise ConfigError(
                f"keepalive timeout must be greater than the interval ({interval_s!r} s), "
                f"got {timeout_s!r}"
            )
        if not 0 <= jitter < 0.5:
            raise ConfigError(f"keepalive jitter must be in [0, 0.5), got {jitter!r}")
        if stable_after_s is None:
            stable_after_s = min(STABLE_AFTER_S, timeout_s)
        self.redial_policy = RedialPolicy(
            base_s=backoff_base_s,
            cap_s=backoff_cap_s,
            stable_after_s=stable_after_s,
            probe_fraction=probe_fraction,
            hint_interval_s=hint_interval_s,
        )
        if not 0 <= ping_slack_s < interval_s * (1 - jitter):
            raise ConfigError(
                f"keepalive ping slack must be >= 0 and below the shortest ping interval "
                f"({interval_s * (1 - jitter)!r} s), got {ping_slack_s!r}"
            )
        self.ping_slack_s: float = ping_slack_s
        self.interval_s: float = interval_s
        self.timeout_s: float = timeout_s
        self.jitter: float = jitter
        self.backoff_base_s: float = backoff_base_s
        self.backoff_cap_s: float = backoff_cap_s
        self.stable_after_s: float = stable_after_s
        # Heap entries popped, stale or not: a measure of the scheduler's own
        # work, for tests and benchmarks.
        self.heap_pops: int = 0
        self._rand = rand
        # (when, seq, key, link): link is None for a dial. The unique seq
        # keeps keys (which need not be orderable) out of comparisons.
        self._heap: list[tuple[float, int, Hashable, _Link | None]] = []
        self._seq = itertools.count()
        self._nonce: int = 0
        self._links: dict[Hashable, _Link] = {}
        self._dials: dict[Hashable, tuple[int, float]] = {}  # key -> (seq, when)
        self._redials: dict[Hashable, RedialState] = {}

    # -- links ------------------------------------------------------------

    def link_up(self, key: Hashable, now: float) -> None:
        """Start pinging ``key`` and watching it for silence; cancel its pending dial.

        A key that is already up starts afresh (a new connection replaced
        the old one).
        """
        self._dials.pop(key, None)
        state = self._redials.get(key)
        if state is not None:
            self.redial_policy.link_up(state)
        link = _Link(now, self._ping_after_s())
        self._links[key] = link
        self._push(self._deadline(link), key, link)

    def link_down(self, key: Hashable, now: float, *, redial: bool) -> float | None:
        """Stop tracking ``key``; if ``redial``, schedule a dial and return its delay.

        The time the link was alive (frames arriving) pays back the key's
        backoff, and its end counts as a flap (:mod:`edgenode.redial`,
        rules 1 and 2).
        """
        link = self._links.pop(key, None)
        lived_s = 0.0 if link is None else link.last_received - link.up_since
        delay = self.redial_policy.link_down(self.redial_state(key), lived_s, now, self._rand())
        if not redial:
            return None
        self.schedule_dial(key, now, delay)
        return delay

    def dial_failed(self, key: Hashable, now: float, *, reached: bool = True) -> float:
        """Schedule the next dial of ``key`` after a failed one; return its delay.

        ``reached``: the peer's listener answered the connect, so the failure
        is a flap (backoff); False when the connect was refused, unreachable
        or unanswered (retried after a tenth of the peer's absence).
        """
        state = self.redial_state(key)
        delay = self.redial_policy.dial_failed(state, now, self._rand(), reached=reached)
        self.schedule_dial(key, now, delay)
        return delay

    def peer_alive(self, key: Hashable, now: float) -> float | None:
        """A sign that ``key`` is back (its beacon, a connection from its address).

        Pulls its pending dial in to now plus up to ``backoff_base_s``, at
        most once per ``hint_interval_s``; returns when the dial is now due,
        or None if nothing changed (no dial pending, one due as soon anyway,
        or a sign of life came too lately before).
        """
        if not self._dial_far(key, now):
            return None
        delay = self.redial_policy.hint(self.redial_state(key), now, self._rand())
        if delay is None:
            return None
        self.schedule_dial(key, now, delay)
        return now + delay

    def awaits_sign_of_life(self, key: Hashable, now: float) -> bool:
        """Whether :meth:`peer_alive` would pull ``key``'s dial in now; changes nothing."""
        if not self._dial_far(key, now):
            return False
        state = self._redials.get(key)
        return state is None or self.redial_policy.may_hint(state, now)

    def _dial_far(self, key: Hashable, now: float) -> bool:
        """Whether a dial of ``key`` is pending, due later than a hint would make it."""
        dial = self._dials.get(key)
        return dial is not None and dial[1] > now + self.backoff_base_s

    def schedule_dial(self, key: Hashable, now: float, delay_s: float = 0.0) -> None:
        """Schedule a dial of ``key`` at ``now + delay_s``, replacing any pending one."""
        when = now + delay_s
        seq = self._push(when, key, None)
        self._dials[key] = (seq, when)

    def cancel_dial(self, key: Hashable) -> None:
        """Cancel the pending dial of ``key``, if any."""
        self._dials.pop(key, None)

    def pending_dial(self, key: Hashable) -> float | None:
        """Return when the pending dial of ``key`` is due, or ``None``."""
        dial = self._dials.get(key)
        return None if dial is None else dial[1]

    def redial_state(self, key: Hashable) -> RedialState:
        """Return what the redial rules remember of ``key`` (created on first use)."""
        state = self._redials.get(key)
        if state is None:
            state = self._redials[key] = RedialState()
        return state

    def forget(self, key: Hashable) -> None:
        """Drop everything known about ``key`` (a pruned peer)."""
        self._links.pop(key, None)
        self._dials.pop(key, None)
        self._redials.pop(key, None)

    # -- traffic: the hot path, timestamps only -----------------------------

    def sent(self, key: Hashable, now: float) -> None:
        """Record that a frame was queued to ``key``."""
        link = self._links.get(key)
        if link is not None:
            link.last_sent = now

    def received(self, key: Hashable, now: float) -> None:
        """Record that a frame (any frame) arrived from ``key``."""
        link = self._links.get(key)
        if link is not None:
            link.last_received = now

    def hold(self, key: Hashable, now: float) -> None:
        """Stop declaring ``key`` dead for silence: our side stopped reading it.

        A node whose own subscriber is full stops reading the connection
        that feeds it, so the peer's frames wait in the socket; that silence
        is ours. Pings still go out. :meth:`release` ends the hold.
        """
        link = self._links.get(key)
        if link is not None:
            link.held = True

    def release(self, key: Hashable, now: float) -> None:
        """End a :meth:`hold`; the timeout counts from ``now`` at the earliest.

        Pushes nothing: the link's entry in the heap is due no later than its
        next ping, which comes before its new death deadline. (A hold and a
        release per message of a slow consumer must cost no heap entries.)
        """
        link = self._links.get(key)
        if link is not None and link.held:
            link.held = False
            if link.last_received < now:
                link.last_received = now

    def pong(self, key: Hashable, nonce: int, now: float) -> float | None:
        """Match a pong to an outstanding ping; return the round-trip time.

        Returns ``None`` for an unknown key or an unknown or stale nonce. A
        matched pong also settles every older outstanding ping.
        """
        link = self._links.get(key)
        if link is None:
            return None
        sent_at = link.outstanding.get(nonce)
        if sent_at is None:
            return None
        for older in list(link.outstanding):
            del link.outstanding[older]
            if older == nonce:
                break
        link.unanswered_since = next(iter(link.outstanding.values()), None)
        link.rtt_s = now - sent_at
        link.pongs_received += 1
        link.last_received = now
        return link.rtt_s

    # -- the scheduler -------------------------------------------------------

    def next_deadline(self) -> float | None:
        """Return the earliest time :meth:`due` may have something to do, or ``None``.

        Entries of links that went down and of cancelled or rescheduled
        dials are dropped here. An entry whose deadline traffic has pushed
        back is left for :meth:`due` to move: the dispatcher then wakes once
        with nothing to do, at most once per interval per link, however
        many frames flow.
        """
        heap = self._heap
        while heap:
            when, seq, key, link = heap[0]
            if self._is_current(seq, key, link):
                return when
            heapq.heappop(heap)
            self.heap_pops += 1
        return None

    def due(self, now: float) -> list[tuple[str, Hashable, int]]:
        """Pop everything due at ``now``; return the actions, earliest first.

        Actions are ``(PING, key, nonce)``, ``(DEAD, key, 0)`` and
        ``(DIAL, key, 0)``; see the module docstring.
        """
        actions: list[tuple[str, Hashable, int]] = []
        again: list[tuple[Hashable, _Link]] = []
        early: list[tuple[float, int, Hashable, _Link | None]] = []
        heap = self._heap
        # Entries up to the slack ahead are looked at for pings only.
        ping_until = now + self.ping_slack_s
        while heap and heap[0][0] <= ping_until:
            entry = heapq.heappop(heap)
            _, seq, key, link = entry
            self.heap_pops += 1
            if not self._is_current(seq, key, link):
                continue
            if entry[0] > now and (
                link is None or ping_until < link.last_sent + link.ping_after_s
            ):
                early.append(entry)  # a death or dial that is not due yet: as it was
                continue
            if link is None:
                del self._dials[key]
                actions.append((DIAL, key, 0))
                continue
            if now >= link.last_received + self.timeout_s and not link.held:
                link.alive = False
                actions.append((DEAD, key, 0))
                continue
            if ping_until >= link.last_sent + link.ping_after_s:
                nonce = self._next_nonce()
                if len(link.outstanding) >= MAX_OUTSTANDING_PINGS:
                    del link.outstanding[next(iter(link.outstanding))]
                link.outstanding[nonce] = now
                if link.unanswered_since is None:
                    link.unanswered_since = now
                link.pings_sent += 1
                link.last_sent = now
                link.ping_after_s = self._ping_after_s()
                actions.append((PING, key, nonce))
            again.append((key, link))
        # Pushed after the loop: every re-pushed deadline is later than now.
        for entry in early:
            heapq.heappush(heap, entry)
        for key, link in again:
            self._push(self._deadline(link), key, link)
        return actions

    # -- status -------------------------------------------------------------

    def liveness(self, key: Hashable, now: float) -> Liveness | None:
        """Return a snapshot of ``key``'s link, or ``None`` if it is not tracked."""
        link = self._links.get(key)
        if link is None:
            return None
        waiting = link.unanswered_since
        return Liveness(
            last_sent_age_s=now - link.last_sent,
            last_received_age_s=now - link.last_received,
            pings_sent=link.pings_sent,
            pongs_received=link.pongs_received,
            rtt_s=link.rtt_s,
            our_pings_answered=waiting is None or now - waiting <= self.timeout_s,
            their_frames_arriving=link.alive and now - link.last_received <= self.timeout_s,
        )

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is tracked as up (link_up called, not dead, not down)."""
        link = self._links.get(key)
        return link is not None and link.alive

    # -- internals ----------------------------------------------------------

    def _is_current(self, seq: int, key: Hashable, link: _Link | None) -> bool:
        if link is None:
            dial = self._dials.get(key)
            return dial is not None and dial[0] == seq
        return link.alive and self._links.get(key) is link

    def _push(self, when: float, key: Hashable, link: _Link | None) -> int:
        seq = next(self._seq)
        heapq.heappush(self._heap, (when, seq, key, link))
        # Stale entries normally leave when they surface; a burst of
        # rescheduled dials or flapping links could pile them up until then.
        if len(self._heap) > 2 * (len(self._links) + len(self._dials)) + _COMPACT_SLACK:
            # The entry just pushed may not be registered as current yet.
            self._heap = [
                entry
                for entry in self._heap
                if entry[1] == seq or self._is_current(entry[1], entry[2], entry[3])
            ]
            heapq.heapify(self._heap)
        return seq

    def _deadline(self, link: _Link) -> float:
        ping_due = link.last_sent + link.ping_after_s
        if link.held:
            return ping_due
        return min(ping_due, link.last_received + self.timeout_s)

    def _ping_after_s(self) -> float:
        return self.interval_s * (1.0 - self.jitter * self._rand())

    def _next_nonce(self) -> int:
        self._nonce = self._nonce % _MAX_NONCE + 1
        return self._nonce
