"""The node the soak runs: answers requests, asks and messages random peers, all logged.

Run as ``python -m edgenode.testing.soak_node --config FILE --handled-log H
--acked-log A --sent-log S --received-log R --tag T``, one process per node,
by :mod:`edgenode.testing.soak` through
:class:`~edgenode.testing.procs.NodeProcess`. It is ``edgenode run`` plus a
small application:

* A handler on :data:`SOAK_TOPIC` records each request's ID in the handled
  log *before* answering. Each record is one ``write(2)`` to a file opened
  with ``O_APPEND``: once the call returns the line is in the kernel's page
  cache, so it survives SIGKILL of the node, and concurrent writers never
  interleave within a line.
* A client task sends requests with unique IDs (``TAG.SEQ``; the runner gives
  each start of each node its own tag) to random peers that are up, at a
  paced rate with a bound on requests in flight, and records each
  acknowledged ID, after the answer arrived and matched, in the acked log.

* A sender (:class:`SoakSender`) sends one-way messages with ``await
  node.send()`` on :data:`SEND_TOPIC`, in paced bursts to random up peers,
  at most one burst in flight per peer (so that "the order sent" to a peer
  is one sequence) and a bounded number in all. Each payload is its
  message ID, ``TAG.SEQ``: the sender (the tag of this process start) and
  its sequence number, counted over all peers. The sent log gets ``> ID
  TO_IP T`` before the call, then ``= ID TO_IP T`` once it returned, or
  ``x ID TO_IP ERROR`` if it raised, each before the next send.
* A default ``subscribe(SEND_TOPIC)`` logs each message it delivers, in
  arrival order, in the received log: ``ID FROM_IP T``; a payload that is
  not a message ID, or the subscription ending, as ``! WHAT``.

``T`` is ``time.monotonic()``, the system-wide CLOCK_MONOTONIC on Linux: the
runner's fault times are on the same clock.

The soak then checks that every acknowledged ID was handled exactly once,
by the peer it was sent to (handled ``ID FROM_IP``; acked ``ID TO_IP``; an
answer that does not match its request is recorded in the acked log as
``! ID TO_IP REPLY`` and fails the soak), and that every message whose
``send()`` returned was delivered exactly once and in order, or lost to a
fault (:func:`edgenode.testing.soak_checks.check_sends`).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import anyio

from ..errors import ConfigError, EdgeNodeError, SubscriberStalled

log = logging.getLogger("edgenode.soak")

#: The topic of the soak's requests.
SOAK_TOPIC = "soak/request"
#: What a handler answers: this prefix and the request ID.
REPLY_PREFIX = b"handled "
#: The topic of the soak's one-way messages.
SEND_TOPIC = "soak/send"
_MAX_ID_BYTES = 64


def _valid_id(payload: bytes) -> bool:
    """Whether ``payload`` is a soak ID: printable ASCII, no spaces, not too long."""
    if not 0 < len(payload) <= _MAX_ID_BYTES:
        return False
    text = payload.decode("ascii", errors="replace")
    return text.isprintable() and " " not in text and "\ufffd" not in text


def _append(fd: int, line: str) -> None:
    """Append one line with a single write: it survives SIGKILL once this returns."""
    data = line.encode()
    written = os.write(fd, data)
    if written != len(data):  # pragma: no cover - a full disk
        raise OSError(f"short write: {written} of {len(data)} bytes")


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


async def _paced(period_s: float, rng: random.Random) -> AsyncIterator[None]:
    """Yield every ``period_s`` on average, with jitter so that nodes do not act in
    step; after a long pause (a SIGSTOP) carry on from now instead of bursting."""
    due = anyio.current_time()
    while True:
        due += period_s * rng.uniform(0.5, 1.5)
        await anyio.sleep_until(due)
        now = anyio.current_time()
        if now - due > 5 * period_s:
            due = now
        yield


async def _report_every(every_s: float, line: Callable[[], str]) -> None:
    """Log ``line()`` every ``every_s`` seconds, until cancelled."""
    while True:
        await anyio.sleep(every_s)
        log.info("%s", line())


def _outcomes(outcomes: Counter[str]) -> str:
    return ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items())) or "no outcomes yet"


class SoakApp:
    """The soak's handler and client, on one node."""

    def __init__(
        self,
        node: object,
        *,
        handled_fd: int,
        acked_fd: int,
        tag: str,
        rate_per_s: float,
        max_inflight: int,
        request_timeout_s: float,
        rng: random.Random,
        report_every_s: float = 10.0,
    ) -> None:
        self.node = node
        self.handled_fd = handled_fd
        self.acked_fd = acked_fd
        self.tag = tag
        self.rate_per_s = rate_per_s
        self.max_inflight = max_inflight
        self.request_timeout_s = request_timeout_s
        self.rng = rng
        self.report_every_s = report_every_s
        self.sent = 0
        self.inflight = 0
        self.outcomes: Counter[str] = Counter()
        self.handled = 0

    async def answer(self, request: object) -> bytes:
        """The request handler: record the ID durably, then answer."""
        payload: bytes = request.payload  # type: ignore[attr-defined]
        request_id = payload.decode("ascii", errors="replace")
        if not _valid_id(payload):
            raise ValueError(f"bad soak request id {payload[:_MAX_ID_BYTES]!r}")
        _append(self.handled_fd, f"{request_id} {request.peer}\n")  # type: ignore[attr-defined]
        self.handled += 1
        return REPLY_PREFIX + payload

    async def run_client(self) -> None:
        """Send requests to random up peers until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(_report_every, self.report_every_s, self._figures)
            async for _ in _paced(1.0 / self.rate_per_s, self.rng):
                if self.inflight >= self.max_inflight:
                    self.outcomes["skipped: too many in flight"] += 1
                    continue
                up = [
                    row.ip
                    for row in self.node.peers()  # type: ignore[attr-defined]
                    if row.state == "up" and "/" not in row.ip
                ]
                if not up:
                    self.outcomes["skipped: no peer up"] += 1
                    continue
                self.sent += 1
                request_id = f"{self.tag}.{self.sent}"
                self.inflight += 1
                tg.start_soon(self._ask, self.rng.choice(up), request_id)

    async def _ask(self, ip: str, request_id: str) -> None:
        try:
            reply = await self.node.request(  # type: ignore[attr-defined]
                ip, SOAK_TOPIC, request_id.encode(), timeout=self.request_timeout_s
            )
        except EdgeNodeError as exc:
            self.outcomes[type(exc).__name__] += 1
            return
        finally:
            self.inflight -= 1
        if reply == REPLY_PREFIX + request_id.encode():
            _append(self.acked_fd, f"{request_id} {ip}\n")
            self.outcomes["acknowledged"] += 1
        else:
            _append(self.acked_fd, f"! {request_id} {ip} {reply[:80].hex()}\n")
            self.outcomes["wrong answer"] += 1

    def _figures(self) -> str:
        return (
            f"soak: sent {self.sent}, handled {self.handled}, in flight {self.inflight}; "
            + _outcomes(self.outcomes)
        )


class SoakSender:
    """The soak's one-way messages on one node: sends them and logs what arrives."""

    def __init__(
        self,
        node: object,
        *,
        sent_fd: int,
        received_fd: int,
        tag: str,
        rate_per_s: float,
        burst: int,
        max_inflight: int,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
        report_every_s: float = 10.0,
    ) -> None:
        self.node = node
        self.sent_fd = sent_fd
        self.received_fd = received_fd
        self.tag = tag
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_inflight = max_inflight
        self.rng = rng
        self.clock = clock
        self.report_every_s = report_every_s
        #: The last sequence number used (one count over every peer).
        self.seq = 0
        #: Peers with a burst in flight: one at a time each, so that the order
        #: sent to a peer is the order of its sequence numbers.
        self.busy: set[str] = set()
        self.outcomes: Counter[str] = Counter()
        self.received = 0

    async def run(self) -> None:
        """Send bursts to random up peers until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(_report_every, self.report_every_s, self._figures)
            async for _ in _paced(self.burst / self.rate_per_s, self.rng):
                if len(self.busy) >= self.max_inflight:
                    self.outcomes["bursts skipped: too many in flight"] += 1
                    continue
                idle = [
                    row.ip
                    for row in self.node.peers()  # type: ignore[attr-defined]
                    if row.state == "up" and "/" not in row.ip and row.ip not in self.busy
                ]
                if not idle:
                    self.outcomes["bursts skipped: no idle peer up"] += 1
                    continue
                ip = self.rng.choice(idle)
                self.busy.add(ip)
                tg.start_soon(self._send_burst, ip)

    async def _send_burst(self, ip: str) -> None:
        try:
            for _ in range(self.burst):
                self.seq += 1
                message_id = f"{self.tag}.{self.seq}"
                _append(self.sent_fd, f"> {message_id} {ip} {self.clock():.6f}\n")
                try:
                    await self.node.send(ip, SEND_TOPIC, message_id.encode())  # type: ignore[attr-defined]
                except EdgeNodeError as exc:
                    _append(self.sent_fd, f"x {message_id} {ip} {type(exc).__name__}\n")
                    self.outcomes[f"refused: {type(exc).__name__}"] += 1
                    return  # the peer is down: the rest of the burst would be refused too
                _append(self.sent_fd, f"= {message_id} {ip} {self.clock():.6f}\n")
                self.outcomes["sent"] += 1
        finally:
            self.busy.discard(ip)

    async def receive(self, stream: object) -> None:
        """Log each message the default subscription ``stream`` delivers, in arrival order."""
        while True:
            try:
                async for msg in stream:  # type: ignore[attr-defined]
                    payload: bytes = msg.payload
                    if _valid_id(payload):
                        line = f"{payload.decode()} {msg.peer} {self.clock():.6f}\n"
                    else:
                        line = f"! bad payload from {msg.peer}: {payload[:_MAX_ID_BYTES].hex()}\n"
                    _append(self.received_fd, line)
                    self.received += 1
                return  # closed: the node is closing
            except SubscriberStalled as exc:
                # The node's documented outcome for a stuck consumer; this one only
                # writes a line, so it is a finding: recorded, then subscribe again.
                _append(self.received_fd, f"! {exc}\n")
                log.error("soak: %s", exc)
            finally:
                stream.close()  # type: ignore[attr-defined]
            stream = self.node.subscribe(SEND_TOPIC)  # type: ignore[attr-defined]

    def _figures(self) -> str:
        return (
            f"soak messages: sequence {self.seq}, received {self.received}, bursts in flight "
            f"{len(self.busy)}; " + _outcomes(self.outcomes)
        )


async def _run(args: argparse.Namespace, config: object, identity: object) -> None:
    from ..node import Node

    fds = [_open_log(path) for path in (args.handled_log, args.acked_log)]
    fds += [_open_log(path) for path in (args.sent_log, args.received_log)]
    handled_fd, acked_fd, sent_fd, received_fd = fds
    rng = random.Random(args.seed)
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with Node(config, identity=identity) as node:  # type: ignore[arg-type]
                app = SoakApp(
                    node,
                    handled_fd=handled_fd,
                    acked_fd=acked_fd,
                    tag=args.tag,
                    rate_per_s=args.rate,
                    max_inflight=args.max_inflight,
                    request_timeout_s=args.request_timeout,
                    rng=rng,
                    report_every_s=args.report_every,
                )
                sender = SoakSender(
                    node,
                    sent_fd=sent_fd,
                    received_fd=received_fd,
                    tag=args.tag,
                    rate_per_s=args.send_rate,
                    burst=args.send_burst,
                    max_inflight=args.send_max_inflight,
                    rng=random.Random(rng.getrandbits(32)),
                    report_every_s=args.report_every,
                )
                # Before any await: a message that came before the subscription
                # would have nowhere to go.
                stream = node.subscribe(SEND_TOPIC)
                node.handle(SOAK_TOPIC, app.answer)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sender.receive, stream)
                    tg.start_soon(app.run_client)
                    tg.start_soon(sender.run)
                    async for signum in signals:
                        log.info("received %s: saying bye to peers", signal.Signals(signum).name)
                        break
                    tg.cancel_scope.cancel()
    finally:
        for fd in fds:
            os.close(fd)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edgenode.testing.soak_node",
        description="A node for the soak: answers requests, asks and messages random peers, "
        "and logs it all durably.",
    )
    parser.add_argument("--config", type=Path, required=True, metavar="FILE")
    parser.add_argument("--handled-log", type=Path, required=True, metavar="FILE")
    parser.add_argument("--acked-log", type=Path, required=True, metavar="FILE")
    parser.add_argument("--sent-log", type=Path, required=True, metavar="FILE")
    parser.add_argument("--received-log", type=Path, required=True, metavar="FILE")
    parser.add_argument(
        "--tag", required=True, help="prefix of this process's request and message IDs"
    )
    parser.add_argument("--rate", type=_positive, default=2.0, help="requests per second")
    parser.add_argument("--max-inflight", type=int, default=8)
    parser.add_argument("--request-timeout", type=_positive, default=5.0, metavar="S")
    parser.add_argument(
        "--send-rate", type=_positive, default=8.0, help="one-way messages per second"
    )
    parser.add_argument(
        "--send-burst", type=_count, default=4, help="messages sent to one peer in a row"
    )
    parser.add_argument(
        "--send-max-inflight", type=_count, default=4, help="most bursts in flight at once"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--report-every", type=_positive, default=10.0, metavar="S", help="log figures this often"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak node until SIGTERM or SIGINT; returns the exit status."""
    from ..cli import AUTHORISED_FILE
    from ..identity import load_identity
    from ..logs import setup_logging
    from ..settings import resolve
    from ..trust import load_authorised

    args = build_parser().parse_args(argv)
    if not args.tag or " " in args.tag or "." in args.tag:
        print("error: --tag must be non-empty, without spaces or dots", file=sys.stderr)
        return 2
    try:
        setup_logging(args.log_level, "text")
        config = resolve(config_file=args.config).config
        authorised = load_authorised(os.path.join(config.state_dir, AUTHORISED_FILE))
        config = config.replace(authorised=authorised | (config.authorised or frozenset()))
        identity = load_identity(config.state_dir)
        anyio.run(_run, args, config, identity)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EdgeNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
