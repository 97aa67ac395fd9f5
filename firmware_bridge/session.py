"""The session half of the UART link: hellos, the session's transitions, keepalive.

:class:`Session` is the base of :class:`firmware_bridge.link.Link`, which
adds framing, sending and receiving; the link's constructor sets every
field used here. docs/serial-protocol.md, section 4. The rules:

- Each side has a boot epoch (random, 1..2**32-1, new at every start) and
  sends a hello at start. A hello names the sender's epoch, echoes the
  epoch it last heard from the peer (0 if none), and says whether the
  sender considers the session up. The transitions are the table in
  :meth:`Session._on_hello`. In short: a side answers a hello when the
  peer's epoch changed, when the hello does not echo our epoch, or when
  the hello says the peer is not up; the session is up once a hello
  arrives that echoes our current epoch, and goes down when one arrives
  with a new epoch (the peer restarted) or one that no longer echoes ours
  (the peer lost the session). A restart on either side resynchronises
  within about one round trip, with no reset line.
- With a pre-shared key, a hello can take an up session down only by
  proving it is fresh: a new epoch must first echo ours, which it learns
  only by our answer, so a recorded hello of an old boot cannot bounce a
  session; and a hello echoing an epoch that is neither ours nor 0 (meant
  for an old boot of ours) is answered but changes nothing.
- While the session is down, every frame but a hello is dropped ("not up")
  and answered with a hello (at most once per ``rto_ms``), and hellos are
  repeated every keepalive interval. After a keepalive timeout a side
  forgets the peer's epoch, so its hellos echo 0 and take the peer's
  session down too.
- Keepalive. Once up, each side pings when it has sent nothing for its
  interval (and for less than half the peer's timeout), and declares the
  session down when nothing valid has arrived for its timeout. Any valid
  frame proves liveness, a frame held back for want of room included
  (link.py), so a receiver that pauses its sender never loses the session
  for it.

Runs unchanged on CPython 3.9+ and MicroPython.
"""

import struct

from .events import SessionDown, SessionUp
from .frame import (
    DOWN_PEER_RESET,
    DOWN_PEER_RESTART,
    DOWN_TIMEOUT,
    HELLO,
    PING,
    LinkUsageError,
)
from .hello import Hello


class Session:
    """Hellos, the session's state and the keepalive timers of one end of a link.

    Not used alone: :class:`firmware_bridge.link.Link` derives from it and
    provides ``_emit`` (frame and queue), ``_retransmit``, ``_rel`` (reliable
    mode's state) and ``_auth`` (a pre-shared key's).
    """

    __slots__ = (
        "_challenge",
        "_frame_limit",
        "_last_hello_ms",
        "_last_rx_ms",
        "_last_tx_ms",
        "_ping_interval_ms",
        "_ping_nonce",
        "_ping_sent_ms",
        "_started",
        "_their_epoch",
        "epoch",
        "is_up",
        "keepalive_interval_ms",
        "keepalive_timeout_ms",
        "max_frame",
        "my_id",
        "peer_hello",
        "reliable",
        "role",
        "rtt_ms",
        "want_reliable",
    )

    def __repr__(self) -> str:
        state = "up with " + repr(self.peer_id) if self.is_up else "down"
        return f"Link({self.role} {self.my_id!r}, epoch={self.epoch}, {state})"

    @property
    def peer_id(self) -> "str | None":
        """The ID in the peer's latest hello, or None before one arrived."""
        return None if self.peer_hello is None else self.peer_hello.id

    def start(self, now_ms: int) -> None:
        """Begin: queue our first hello and start the timers."""
        if self._started:
            raise LinkUsageError("link already started")
        self._started = True
        self._last_rx_ms = now_ms
        self._send_hello(now_ms)

    def tick(self, now_ms: int) -> list:
        """Run the timers due at ``now_ms``; return the events (a SessionDown on timeout)."""
        events = []
        if not self._started:
            return events
        if not self.is_up:
            if now_ms - self._last_hello_ms >= self.keepalive_interval_ms:
                self._send_hello(now_ms)
            return events
        if now_ms - self._last_rx_ms >= self.keepalive_timeout_ms:
            self._down(DOWN_TIMEOUT, events)
            # Forget the peer's epoch: our hello then echoes 0, which tells a
            # peer that still thinks the session is up that it is not.
            self._their_epoch = 0
            self._send_hello(now_ms)
            return events
        rel = self._rel
        if rel is not None and rel.rto_deadline_ms is not None and now_ms >= rel.rto_deadline_ms:
            rel.backoff += 1  # no progress for a whole timeout: wait longer next time
            self._retransmit(now_ms)
        if now_ms - self._last_tx_ms >= self._ping_interval_ms:
            self._ping_nonce = (self._ping_nonce + 1) & 0xFFFF
            self._ping_sent_ms = now_ms
            self._emit(PING, struct.pack(">H", self._ping_nonce), now_ms)
        return events

    def liveness(self, now_ms: int) -> "tuple[bool, bool, int]":
        """(their frames arriving, our pings answered, ms since the last frame).

        Each direction is alive when nothing has waited longer than the
        keepalive timeout: the last frame from the peer, and the oldest ping
        still unanswered.
        """
        timeout = self.keepalive_timeout_ms
        heard_ms = now_ms - self._last_rx_ms
        waiting = self._ping_sent_ms
        answered = waiting is None or now_ms - waiting < timeout
        return self.is_up and heard_ms < timeout, self.is_up and answered, heard_ms

    def next_deadline_ms(self) -> "int | None":
        """When ``tick`` next has work to do, in the ``now_ms`` scale (None before start)."""
        if not self._started:
            return None
        if not self.is_up:
            return self._last_hello_ms + self.keepalive_interval_ms
        deadline = self._last_rx_ms + self.keepalive_timeout_ms
        ping = self._last_tx_ms + self._ping_interval_ms
        if ping < deadline:
            deadline = ping
        rel = self._rel
        if rel is not None and rel.rto_deadline_ms is not None and rel.rto_deadline_ms < deadline:
            deadline = rel.rto_deadline_ms
        return deadline

    # --- the session -------------------------------------------------------

    def _send_hello(self, now_ms: int, echo: "int | None" = None, up: "bool | None" = None) -> None:
        hello = Hello(
            self.my_id,
            self.epoch,
            self.max_frame,
            self.keepalive_interval_ms,
            self.keepalive_timeout_ms,
            self.want_reliable,
            self._auth is not None,
            self._their_epoch if echo is None else echo,
            self.is_up if up is None else up,
        )
        self._last_hello_ms = now_ms
        self._emit(HELLO, hello.encode(), now_ms, None, True, hello.echo_epoch)

    def _on_hello(self, hello: Hello, now_ms: int, events: list) -> None:
        """The session's transitions on a valid hello, as one table.

        =====================  ===================  =============================
        the hello's epoch      the hello's echo     then
        =====================  ===================  =============================
        new (not theirs)       any                  down if up (peer restart);
                                                    learn it; answer
        theirs                 not ours             down if up (peer lost it);
                                                    answer
        theirs                 ours                 up if down
        any, not up flag       any                  answer (it waits for us)
        =====================  ===================  =============================

        With a key, while up, a new epoch or an echo of neither ours nor 0
        must prove itself first (see the module docstring): a new epoch is
        answered with a hello echoing it, and replaces the session only once
        a hello of that epoch echoes ours; an echo of an old epoch of ours is
        answered and changes nothing.
        """
        if self._auth is not None and self.is_up and self._guard_hello(hello, now_ms):
            return
        reply = False
        if hello.epoch != self._their_epoch:
            if self.is_up:
                self._down(DOWN_PEER_RESTART, events)
            self._their_epoch = hello.epoch
            reply = True
        self._challenge = 0
        self.peer_hello = hello
        if hello.echo_epoch != self.epoch:
            if self.is_up:
                self._down(DOWN_PEER_RESET, events)
            reply = True
        elif not self.is_up:
            self._up(hello, now_ms, events)
        if not hello.up:
            # The peer waits for a hello that echoes its epoch: it may have
            # lost ours (a hello that is up itself needs no answer, which
            # ends the exchange).
            reply = True
        if reply:
            self._send_hello(now_ms)

    def _guard_hello(self, hello: Hello, now_ms: int) -> bool:
        """With a key and the session up: True if ``hello`` must not change the session yet."""
        if hello.epoch != self._their_epoch:
            if hello.echo_epoch == self.epoch and hello.epoch == self._challenge:
                return False  # the new epoch answered our challenge: a live restart
            # Challenge it: only a live peer of that epoch can echo ours back
            # (not up, so that it answers). Our session stays as it is meanwhile.
            self._challenge = hello.epoch
            self._send_hello(now_ms, hello.epoch, False)
            return True
        echo = hello.echo_epoch
        if echo != self.epoch and echo != 0:
            # Meant for an old boot of ours: answer, so a live peer learns
            # our epoch, but keep the session.
            self._send_hello(now_ms)
            return True
        return False

    def _up(self, hello: Hello, now_ms: int, events: list) -> None:
        self.is_up = True
        self.reliable = self.want_reliable and hello.reliable
        limit = hello.max_frame
        self._frame_limit = limit if limit < self.max_frame else self.max_frame
        # Send often enough for the peer's timeout as well as our interval.
        half = hello.keepalive_timeout_ms // 2
        interval = self.keepalive_interval_ms
        self._ping_interval_ms = half if 0 < half < interval else interval
        if self._rel is not None:
            self._rel.reset()
        self._ping_sent_ms = None
        events.append(SessionUp(hello))

    def _down(self, reason: str, events: list) -> None:
        rel = self._rel
        lost = 0
        if rel is not None:
            lost = rel.lost()
            rel.reset()
        self.is_up = False
        self.reliable = False
        events.append(SessionDown(reason, lost))
