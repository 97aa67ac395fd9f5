"""When to redial a peer that is down: soon after a short outage, slowly if it flaps.

The rules
---------

A node redials each down peer it knows a listen port for. Two things pull
the delay in opposite directions: a peer that comes back after a short
outage (a restart, a cable, a reboot) should be reachable again within a
second or two, whatever happened before; a peer that accepts and then
drops every link (a crash on start, a refusal after the handshake) must
not be made to run a handshake every second for ever. The old rule, one
exponential backoff for every failed try, reset only by a link that lived
a whole keepalive timeout, got the second right and the first wrong: after
links that lived 2 s the waits grew 0.4, 3.3, 13.3 s, and a peer whose
link had lived 5 s was redialled 17.7 s later.

1. **Flaps, not tries, grow the backoff.** A flap costs the peer a
   handshake: a link that went down, or a dial that reached the peer's
   listener and then failed (TLS, not authorised, closed during the
   handshake). Each adds one to the peer's *debt*; the delay before the
   next dial is ``base_s * 2**debt`` (the debt before this flap is
   added), capped at ``cap_s``, times a random factor in [0.5, 1).
2. **Links pay the debt back.** A link that carried frames for ``L``
   seconds takes ``L / stable_after_s`` off the debt when it goes down,
   before its own flap is added. With the default ``stable_after_s`` of
   2 s (or the keepalive timeout, if shorter), a link that lived 2 s pays
   for its own end, so a peer whose links live a few seconds is always
   redialled after ``base_s`` (0.25 to 0.5 s at the defaults); one that
   lived a minute clears any debt; a link that dies at once pays nothing,
   and the waits grow 0.5, 1, 2, 4 ... to ``cap_s``.
3. **A dial that finds no listener is not a flap.** When the connect is
   refused, the address unreachable or the connect unanswered, the peer
   is away and trying cost it nothing. Such a dial is retried after a
   tenth of the time the peer has been away (``probe_fraction``), at least
   ``base_s`` and at most ``cap_s``, whatever the debt: a peer away for
   10 s is tried about every second, one away for an hour every ``cap_s``.
   This is how "its listener answers" is noticed cheaply: by the connect
   of the redial itself, which fails at no cost to the peer or goes on at
   once into the handshake. No separate probe connection ever reaches the
   peer (nor its refusal log).
4. **Signs of life pull the dial in.** When a peer is heard while down
   (its discovery beacon, or a connection from its address), its pending
   dial moves to now, plus a random delay of up to ``base_s`` so that the
   peers that heard one beacon do not all dial at once; at most once per
   ``hint_interval_s`` per peer, so a peer that flaps while beaconing or
   dialling us costs at most one handshake per ``hint_interval_s``
   through hints.

So a peer that comes back is redialled within about ``base_s`` of the
first sign of life, within a tenth of its absence if there is none, and
within ``base_s`` of its link dropping if its links have been living a
few seconds; a peer that flaps is redialled ever more slowly, at most one
handshake per ``cap_s`` once its debt has grown, and per
``hint_interval_s`` while it keeps showing signs of life.

This module is pure: time comes in as ``now`` and randomness as ``rand``
(a float in [0, 1)). :class:`~edgenode.keepalive.Keepalive` keeps one
:class:`RedialState` per peer and schedules the dials.
"""

from __future__ import annotations

import math

from .errors import ConfigError

#: 2**60 times any sane base is far above any cap, and still a finite float.
_MAX_EXPONENT = 60.0


def check_backoff(base_s: float, cap_s: float) -> None:
    """Raise :class:`ConfigError` unless ``0 < base_s <= cap_s``, both finite."""
    if not (base_s > 0 and math.isfinite(base_s)):
        raise ConfigError(f"backoff base must be a positive number of seconds, got {base_s!r}")
    if not (cap_s >= base_s and math.isfinite(cap_s)):
        raise ConfigError(
            f"backoff cap must be at least the base ({base_s!r} s) and finite, got {cap_s!r}"
        )


class RedialState:
    """What the redial rules remember about one peer."""

    __slots__ = ("away_since", "debt", "hinted_at")

    def __init__(self) -> None:
        #: Flaps not yet paid back by links that lived (rule 2).
        self.debt = 0.0
        #: Since when no link or listener has answered, or None.
        self.away_since: float | None = None
        #: When a sign of life last pulled a dial in.
        self.hinted_at = -math.inf

    def __repr__(self) -> str:
        return f"<RedialState debt={self.debt:.2f} away_since={self.away_since}>"


class RedialPolicy:
    """The redial rules of the module docstring, for all peers (state is per peer)."""

    __slots__ = (
        "base_s",
        "cap_s",
        "hint_interval_s",
        "probe_fraction",
        "stable_after_s",
    )

    def __init__(
        self,
        *,
        base_s: float,
        cap_s: float,
        stable_after_s: float,
        probe_fraction: float = 0.1,
        hint_interval_s: float = 5.0,
    ) -> None:
        """Raises :class:`ConfigError` unless ``0 < base_s <= cap_s`` (finite),
        ``stable_after_s >= 0`` (0: every link clears the debt),
        ``0 < probe_fraction <= 1`` and ``hint_interval_s >= 0``."""
        check_backoff(base_s, cap_s)
        if not (stable_after_s >= 0 and math.isfinite(stable_after_s)):
            raise ConfigError(
                f"keepalive stable_after_s must be >= 0 seconds, got {stable_after_s!r}"
            )
        if not 0 < probe_fraction <= 1:
            raise ConfigError(f"redial probe fraction must be in (0, 1], got {probe_fraction!r}")
        if not (hint_interval_s >= 0 and math.isfinite(hint_interval_s)):
            raise ConfigError(
                f"redial hint interval must be >= 0 seconds, got {hint_interval_s!r}"
            )
        self.base_s = base_s
        self.cap_s = cap_s
        self.stable_after_s = stable_after_s
        self.probe_fraction = probe_fraction
        self.hint_interval_s = hint_interval_s

    def link_up(self, state: RedialState) -> None:
        """A link came up: the peer is no longer away."""
        state.away_since = None

    def link_down(self, state: RedialState, lived_s: float, now: float, rand: float) -> float:
        """A link that carried frames for ``lived_s`` went down: return the delay to redial.

        Pays the debt back (rule 2), then counts the drop as a flap (rule 1).
        """
        if self.stable_after_s == 0:
            state.debt = 0.0
        else:
            state.debt = max(0.0, state.debt - max(0.0, lived_s) / self.stable_after_s)
        state.away_since = now
        return self._flap(state, rand)

    def dial_failed(self, state: RedialState, now: float, rand: float, *, reached: bool) -> float:
        """A dial failed: return the delay to the next one.

        ``reached``: the connect succeeded (the peer's listener answered), so
        the failure cost the peer a handshake (rule 1); otherwise the peer is
        away (rule 3).
        """
        if state.away_since is None:
            state.away_since = now
        if reached:
            return self._flap(state, rand)
        away_s = now - state.away_since
        delay = min(self.cap_s, max(self.base_s, self.probe_fraction * away_s))
        return delay * (0.5 + 0.5 * rand)

    def may_hint(self, state: RedialState, now: float) -> bool:
        """Whether a sign of life now would pull the dial in (rule 4); changes nothing."""
        return now - state.hinted_at >= self.hint_interval_s

    def hint(self, state: RedialState, now: float, rand: float) -> float | None:
        """A sign of life: return the delay to dial now (rule 4), or None if hinted too lately."""
        if not self.may_hint(state, now):
            return None
        state.hinted_at = now
        return self.base_s * rand

    def _flap(self, state: RedialState, rand: float) -> float:
        exponent = min(state.debt, _MAX_EXPONENT)
        delay = min(self.cap_s, self.base_s * 2.0**exponent) * (0.5 + 0.5 * rand)
        state.debt += 1.0
        return delay
