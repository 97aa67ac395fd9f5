"""A noisy serial line: two pseudo-terminals joined by a relay that garbles bytes.

The relay sits between two real pseudo-terminals. ``near.path`` is a serial
port for one end (a node opens it, ``--serial PATH``); the other end runs on
``far.master`` (a :class:`~edgenode.simdevice.SimulatedDevice` takes
``pty=relay.far``). Everything written at one end reaches the other through
the relay, which, while noisy, hits each byte with three faults at seeded
rates:

* ``insert``: a random byte is inserted before it;
* ``drop``: it is lost;
* ``corrupt``: one of its bits is flipped.

Rates are per direction (``to_far``, ``to_near``) and can change at any
time; the counters say what was done. Each direction is copied by a thread
of its own, so the relay works the same for in-process and subprocess nodes.
"""

from __future__ import annotations

import os
import random
import select
import threading
from typing import Any

from edgenode.errors import InvalidArgument
from edgenode.simdevice import PtyPair

TO_FAR = "to_far"
TO_NEAR = "to_near"
BOTH = "both"

_READ_BYTES = 4096
_HANGUP_RETRY_MS = 50


class NoiseLane:
    """One direction of the relay: its rates, switch and counters.

    Each lane is driven by one thread, which alone updates its counters.
    """

    def __init__(self, name: str, rng: random.Random) -> None:
        self.name = name
        self.noisy = False
        self.corrupt = 0.0
        self.drop = 0.0
        self.insert = 0.0
        #: Bytes read from the sending end.
        self.bytes = 0
        self.corrupted = 0
        self.dropped = 0
        self.inserted = 0
        #: Times the sending end was found closed (EIO); the relay waits for it.
        self.hangups = 0
        self._rng = rng

    def __repr__(self) -> str:
        state = "noisy" if self.noisy else "quiet"
        return (
            f"<NoiseLane {self.name} {state}: corrupt {self.corrupt}, drop {self.drop}, "
            f"insert {self.insert}>"
        )

    def garble(self, data: bytes) -> bytes:
        """Apply the lane's faults to ``data`` (its random draws advance)."""
        rng, insert, drop = self._rng, self.insert, self.drop
        corrupt_below = drop + self.corrupt
        out = bytearray()
        for byte in data:
            if rng.random() < insert:
                out.append(rng.randrange(256))
                self.inserted += 1
            roll = rng.random()
            if roll < drop:
                self.dropped += 1
                continue
            if roll < corrupt_below:
                byte ^= 1 << rng.randrange(8)
                self.corrupted += 1
            out.append(byte)
        return bytes(out)


class PtyRelay:
    """Two pseudo-terminals (``near`` and ``far``) joined through a garbling relay.

    ``seed`` makes the noise reproducible. The rates given here apply to
    both directions; the line starts quiet unless ``noisy``. ``resync`` is
    written ahead of the first clean chunk after noise (for edgenode's COBS
    framing, ``b"\\x00"`` ends any half frame the noise left the receiver
    holding, so the first clean frame is not lost with it).

    Use as a context manager, or :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        corrupt: float = 0.0,
        drop: float = 0.0,
        insert: float = 0.0,
        noisy: bool = False,
        resync: bytes = b"",
    ) -> None:
        self.seed = seed
        self.resync = bytes(resync)
        self.near = PtyPair()
        self.far = PtyPair()
        os.set_blocking(self.near.master, False)
        # Our end of the far pseudo-terminal: its slave. The far program
        # holds the master.
        self._far_end = os.open(self.far.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.far.release_slave()
        self.to_far = NoiseLane(TO_FAR, random.Random(seed * 2))
        self.to_near = NoiseLane(TO_NEAR, random.Random(seed * 2 + 1))
        self.set_noise(corrupt=corrupt, drop=drop, insert=insert)
        self.noisy = noisy
        self._wake_r, self._wake_w = os.pipe()
        self._threads: list[threading.Thread] = []
        self._closed = False

    # -- control -------------------------------------------------------------------

    def lanes(self, direction: str = BOTH) -> list[NoiseLane]:
        """The lanes for ``direction``: TO_FAR, TO_NEAR or BOTH."""
        if direction == BOTH:
            return [self.to_far, self.to_near]
        if direction == TO_FAR:
            return [self.to_far]
        if direction == TO_NEAR:
            return [self.to_near]
        raise InvalidArgument(
            f"direction: expected {TO_FAR!r}, {TO_NEAR!r} or {BOTH!r}, got {direction!r}"
        )

    def set_noise(
        self,
        *,
        corrupt: float | None = None,
        drop: float | None = None,
        insert: float | None = None,
        direction: str = BOTH,
    ) -> None:
        """Set the rates (each a probability per byte; None keeps it)."""
        given = {"corrupt": corrupt, "drop": drop, "insert": insert}
        for name, value in given.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgument(f"{name}: expected a number, got {value!r}")
            if not 0 <= value <= 1:
                raise InvalidArgument(f"{name}: expected a rate in 0..1, got {value!r}")
        lanes = self.lanes(direction)
        for lane in lanes:
            drop_rate = lane.drop if drop is None else drop
            corrupt_rate = lane.corrupt if corrupt is None else corrupt
            if drop_rate + corrupt_rate > 1:
                raise InvalidArgument(
                    f"drop + corrupt: expected at most 1, got {drop_rate} + {corrupt_rate}"
                )
        for lane in lanes:
            for name, value in given.items():
                if value is not None:
                    setattr(lane, name, float(value))

    @property
    def noisy(self) -> bool:
        """Whether any lane is garbling bytes now; setting it switches both."""
        return self.to_far.noisy or self.to_near.noisy

    @noisy.setter
    def noisy(self, value: bool) -> None:
        self.to_far.noisy = self.to_near.noisy = bool(value)

    @property
    def counts(self) -> dict[str, int]:
        """Both directions' counters, summed: bytes, corrupted, dropped, inserted."""
        lanes = (self.to_far, self.to_near)
        return {
            name: sum(getattr(lane, name) for lane in lanes)
            for name in ("bytes", "corrupted", "dropped", "inserted")
        }

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> PtyRelay:
        """Start copying, one thread per direction; return self."""
        if self._closed:
            raise InvalidArgument("the relay is closed")
        if not self._threads:
            for src, dst, lane in (
                (self.near.master, self._far_end, self.to_far),
                (self._far_end, self.near.master, self.to_near),
            ):
                thread = threading.Thread(
                    target=self._pump, args=(src, dst, lane), name=f"pty relay {lane.name}"
                )
                thread.daemon = True
                thread.start()
                self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop the relay and close both pseudo-terminals (the ends read EIO). Idempotent."""
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        for thread in self._threads:
            thread.join(timeout=5)
        for fd in (self._far_end, self._wake_r, self._wake_w):
            os.close(fd)
        self.near.close()
        self.far.close()

    def __enter__(self) -> PtyRelay:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PtyRelay {self.near.path} <-> {self.far.path} {self.counts}>"

    # -- the copying threads -----------------------------------------------------------

    def _pump(self, src: int, dst: int, lane: NoiseLane) -> None:
        """Copy ``src`` to ``dst`` until the relay closes."""
        garbled = False
        readable = select.poll()
        readable.register(src, select.POLLIN)
        readable.register(self._wake_r, select.POLLIN)
        woken = select.poll()
        woken.register(self._wake_r, select.POLLIN)
        while True:
            if any(fd == self._wake_r for fd, _ in readable.poll()):
                return
            try:
                data = os.read(src, _READ_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                # EIO: nothing holds the other side of ``src`` open now (a node
                # restarting closes its port). Look again shortly, as a cable
                # that is plugged back in.
                lane.hangups += 1
                if woken.poll(_HANGUP_RETRY_MS):
                    return
                continue
            lane.bytes += len(data)
            if lane.noisy:
                data = lane.garble(data)
                garbled = True
            elif garbled:
                data = self.resync + data
                garbled = False
            if not self._write_all(dst, data):
                return

    def _write_all(self, fd: int, data: bytes) -> bool:
        view = memoryview(data)
        writable = select.poll()
        writable.register(fd, select.POLLOUT)
        writable.register(self._wake_r, select.POLLIN)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                if any(ready == self._wake_r for ready, _ in writable.poll()):
                    return False
            except OSError:
                return False
        return True
