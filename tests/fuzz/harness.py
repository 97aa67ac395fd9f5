"""The fuzzing oracle: what every decoder must do with any input.

For each input a :class:`Target` decodes, :func:`run_guarded` checks that

- the decoder either returns or raises one of the exceptions it documents
  (exactly those classes, not merely a subclass of a base), with a message
  that is one printable line, lowercase first, of bounded length, and
  without key material;
- it uses at most ``CPU_LIMIT_S`` of CPU time (a watchdog interrupts a hang:
  a CPU-time timer, so a loaded machine does not cause false alarms, and
  not SIGALRM, which pytest-timeout uses);
- its peak allocation (tracemalloc, during the decode only) stays under the
  target's bound, linear in the input size: a decoder that allocates by a
  declared length before checking it against the input fails here;
- whatever it accepts passes the target's own checks (round trips through
  the encoder, chunking invariance, limits respected).

A violation raises :class:`FuzzFailure` (an ``AssertionError``), whose
message says what broke and shows the input as hex, so that it can be
replayed with ``python -m tests.fuzz.long --decoder NAME --replay HEX``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import Any

#: CPU time one input may take before it counts as a hang.
CPU_LIMIT_S = float(os.environ.get("EDGENODE_FUZZ_CPU_LIMIT_S", "1.0"))
#: Longest error message accepted: messages show truncated hex, never a whole input.
MAX_MESSAGE_CHARS = 400
#: Multiplies every allocation bound. Under atheris it is 4: instrumented code
#: has larger frames (a raise there materialises 1.9 KiB of frame, not 0.2).
ALLOC_SCALE = 1


class FuzzFailure(AssertionError):
    """A decoder broke the fuzzing oracle on one input."""


class Hang(BaseException):
    """A decoder used more CPU time than the per-input limit.

    A BaseException, so that no ``except Exception`` in a decoder swallows it.
    """


class Target:
    """One decoder under fuzzing.

    ``decode(data, cuts)`` runs the decoder on ``data`` (fed in chunks cut at
    the offsets ``cuts`` where the decoder takes a stream) and returns what it
    decoded, or raises one of ``allowed``. ``verify`` and ``verify_rejected``
    check an outcome outside the measured region, so they may re-run the
    decoder and call encoders. ``valid(rnd)`` returns a random valid input
    drawn with ``rnd`` (a ``random.Random``): the seeds that mutation starts
    from.
    """

    name = ""
    #: The exception classes the decoder documents, matched exactly.
    allowed: tuple[type[BaseException], ...] = ()
    #: Byte strings that must never appear in a message (key material).
    secrets: tuple[bytes, ...] = ()
    #: Messages (regular expressions) known to break the message rules in
    #: code this suite may not change; reported, not fixed here.
    known_message_defects: tuple[str, ...] = ()
    #: The longest input the mutation fuzzer makes.
    max_input = 4096
    #: Whether the decoder takes a stream (so chunking matters).
    streaming = False
    #: Peak allocation allowed: alloc_base + alloc_per_byte * len(data).
    alloc_base = 64 * 1024
    alloc_per_byte = 16
    #: Default number of hypothesis examples per test in the short form.
    short_examples = 100

    def valid(self, rnd: Any) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, cuts: Sequence[int]) -> Any:
        raise NotImplementedError

    def verify(self, data: bytes, cuts: Sequence[int], value: Any) -> None:
        """Check an accepted input's outcome; raise FuzzFailure if wrong."""

    def verify_rejected(self, data: bytes, cuts: Sequence[int], exc: BaseException) -> None:
        """Check a rejected input's outcome; raise FuzzFailure if wrong."""

    def alloc_bound(self, data: bytes) -> int:
        """The most the decoder may allocate at once for ``data``."""
        return self.alloc_base + self.alloc_per_byte * len(data)

    def __repr__(self) -> str:
        return f"<fuzz target {self.name}>"


class Result:
    """The outcome of one guarded decode."""

    __slots__ = ("accepted", "cpu_s", "error", "peak_bytes", "value")

    def __init__(
        self, accepted: bool, value: Any, error: BaseException | None, cpu_s: float, peak: int
    ) -> None:
        self.accepted = accepted
        self.value = value
        self.error = error
        self.cpu_s = cpu_s
        self.peak_bytes = peak


def chunks(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Cut ``data`` at the offsets ``cuts`` (any order, out of range clamped)."""
    bounds = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    parts = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    return parts or [b""]


def show(data: bytes, cuts: Sequence[int] = ()) -> str:
    """Describe an input for a failure message (hex, whole: it must be replayable)."""
    text = f"input ({len(data)} bytes) {data.hex()}"
    if cuts:
        text += f" cut at {sorted(cuts)}"
    return text


def fail(target: Target, data: bytes, cuts: Sequence[int], what: str) -> FuzzFailure:
    return FuzzFailure(f"{target.name}: {what}\n{show(data, cuts)}")


def check_message(target: Target, exc: BaseException, data: bytes, cuts: Sequence[int]) -> None:
    """Check that an error's message follows the project's rules."""
    msg = str(exc)
    name = type(exc).__name__
    if any(re.fullmatch(known, msg) for known in target.known_message_defects):
        return
    if not msg:
        raise fail(target, data, cuts, f"{name} without a message")
    if not msg.isprintable() or msg != msg.strip():
        raise fail(target, data, cuts, f"{name} message is not one printable line: {msg!r:.300}")
    if msg[0].isupper():
        raise fail(target, data, cuts, f"{name} message does not start lowercase: {msg!r:.300}")
    if len(msg) > MAX_MESSAGE_CHARS:
        raise fail(
            target,
            data,
            cuts,
            f"{name} message of {len(msg)} characters exceeds {MAX_MESSAGE_CHARS}: {msg!r:.300}",
        )
    for secret in target.secrets:
        for form in (secret.hex(), secret.hex(" "), repr(secret)[2:-1]):
            if form in msg:
                raise fail(target, data, cuts, f"{name} message shows key material: {msg!r:.300}")


@contextlib.contextmanager
def tracing() -> Iterator[None]:
    """Trace allocations over many inputs; ``run_guarded`` then only resets the peak.

    Starting and stopping tracemalloc around each input, as ``run_guarded``
    does outside this, leaks up to 3 KiB each time on CPython (a million
    link inputs took a gigabyte); tracing everything costs time instead.
    The long form traces blocks of inputs in this; the short form, a few
    thousand inputs, starts and stops.
    """
    if tracemalloc.is_tracing():
        yield
        return
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def _on_cpu_limit(signum: int, frame: Any) -> None:
    raise Hang("cpu time limit")


_HAVE_TIMER = hasattr(signal, "setitimer") and hasattr(signal, "SIGPROF")


def run_guarded(
    target: Target,
    data: bytes,
    cuts: Sequence[int] = (),
    *,
    trace_alloc: bool = True,
    cpu_limit_s: float = CPU_LIMIT_S,
) -> Result:
    """Decode ``data`` under the oracle; return the result or raise FuzzFailure.

    ``trace_alloc=False`` skips the allocation bound (tracemalloc slows the
    decoder several times); the result's ``peak_bytes`` is then -1. See
    ``tracing`` for running many inputs.
    """
    data = bytes(data)
    cuts = list(cuts)
    tracing_before = tracemalloc.is_tracing()
    base = 0
    # Signal handlers work in the main thread only; elsewhere, no watchdog.
    watchdog = _HAVE_TIMER and threading.current_thread() is threading.main_thread()
    previous: Any = None
    if watchdog:
        previous = signal.signal(signal.SIGPROF, _on_cpu_limit)
    value: Any = None
    error: BaseException | None = None
    try:
        if tracing_before:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        elif trace_alloc:
            tracemalloc.start()
        # Thread CPU time: once a CPU-time timer is armed, Linux reports the
        # process's CPU time only at scheduler ticks (4 ms), the thread's exactly.
        start = time.thread_time()
        if watchdog:
            signal.setitimer(signal.ITIMER_PROF, cpu_limit_s)
        try:
            value = target.decode(data, cuts)
        except Hang:
            raise
        except BaseException as exc:
            error = exc
        finally:
            if watchdog:
                signal.setitimer(signal.ITIMER_PROF, 0)
            cpu_s = time.thread_time() - start
            if tracing_before or trace_alloc:
                peak = tracemalloc.get_traced_memory()[1] - base
            else:
                peak = -1
            if trace_alloc and not tracing_before:
                tracemalloc.stop()
    except Hang:
        raise fail(target, data, cuts, f"hang: more than {cpu_limit_s} s of cpu time") from None
    finally:
        if watchdog:
            signal.signal(signal.SIGPROF, signal.SIG_DFL if previous is None else previous)
    if error is not None:
        if type(error) not in target.allowed or isinstance(error, AssertionError):
            raise fail(
                target,
                data,
                cuts,
                f"raised {type(error).__name__}: {str(error)[:300]} "
                f"(documented: {', '.join(e.__name__ for e in target.allowed) or 'nothing'})",
            ) from error
        check_message(target, error, data, cuts)
    bound = target.alloc_bound(data) * ALLOC_SCALE
    if peak > bound:
        raise fail(
            target,
            data,
            cuts,
            f"allocated {peak} bytes at peak, over the {bound}-byte bound for "
            f"{len(data)} bytes of input",
        )
    if error is None:
        target.verify(data, cuts, value)
    else:
        target.verify_rejected(data, cuts, error)
    return Result(error is None, value, error, cpu_s, peak)
