"""The node the soak runs: answers requests durably and asks random peers.

Run as ``python -m edgenode.testing.soak_node --config FILE --handled-log H
--acked-log A --tag T``, one process per node, by :mod:`edgenode.testing.soak`
through :class:`~edgenode.testing.procs.NodeProcess`. It is ``edgenode run``
plus a small application:

* A handler on :data:`SOAK_TOPIC` records each request's ID in the handled
  log *before* answering. Each record is one ``write(2)`` to a file opened
  with ``O_APPEND``: once the call returns the line is in the kernel's page
  cache, so it survives SIGKILL of the node, and concurrent writers never
  interleave within a line.
* A client task sends requests with unique IDs (``TAG.SEQ``; the runner gives
  each start of each node its own tag) to random peers that are up, at a
  paced rate with a bound on requests in flight, and records each
  acknowledged ID, after the answer arrived and matched, in the acked log.

The soak then checks that every acknowledged ID was handled exactly once,
by the peer it was sent to. Lines: handled ``ID FROM_IP``; acked ``ID
TO_IP``; an answer that does not match its request is recorded in the
acked log as ``! ID TO_IP REPLY`` and fails the soak.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import anyio

from ..errors import ConfigError, EdgeNodeError

log = logging.getLogger("edgenode.soak")

#: The topic of the soak's requests.
SOAK_TOPIC = "soak/request"
#: What a handler answers: this prefix and the request ID.
REPLY_PREFIX = b"handled "
_MAX_ID_BYTES = 64


def _append(fd: int, line: str) -> None:
    """Append one line with a single write: it survives SIGKILL once this returns."""
    data = line.encode()
    written = os.write(fd, data)
    if written != len(data):  # pragma: no cover - a full disk
        raise OSError(f"short write: {written} of {len(data)} bytes")


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


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
        if (
            not 0 < len(payload) <= _MAX_ID_BYTES
            or not request_id.isprintable()
            or " " in request_id
        ):
            raise ValueError(f"bad soak request id {payload[:_MAX_ID_BYTES]!r}")
        _append(self.handled_fd, f"{request_id} {request.peer}\n")  # type: ignore[attr-defined]
        self.handled += 1
        return REPLY_PREFIX + payload

    async def run_client(self) -> None:
        """Send requests to random up peers until cancelled."""
        period_s = 1.0 / self.rate_per_s
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._report)
            due = anyio.current_time()
            while True:
                # Paced, with jitter so that nodes do not ask in step.
                due += period_s * self.rng.uniform(0.5, 1.5)
                await anyio.sleep_until(due)
                now = anyio.current_time()
                if now - due > 5 * period_s:  # fell behind (a SIGSTOP): do not burst
                    due = now
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

    async def _report(self) -> None:
        while True:
            await anyio.sleep(self.report_every_s)
            figures = ", ".join(f"{n} {what}" for what, n in sorted(self.outcomes.items()))
            log.info(
                "soak: sent %d, handled %d, in flight %d; %s",
                self.sent,
                self.handled,
                self.inflight,
                figures or "no outcomes yet",
            )


async def _run(args: argparse.Namespace, config: object, identity: object) -> None:
    from ..node import Node

    handled_fd = _open_log(args.handled_log)
    acked_fd = _open_log(args.acked_log)
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
                    rng=random.Random(args.seed),
                    report_every_s=args.report_every,
                )
                node.handle(SOAK_TOPIC, app.answer)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(app.run_client)
                    async for signum in signals:
                        log.info("received %s: saying bye to peers", signal.Signals(signum).name)
                        break
                    tg.cancel_scope.cancel()
    finally:
        os.close(handled_fd)
        os.close(acked_fd)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edgenode.testing.soak_node",
        description="A node for the soak: answers requests durably and asks random peers.",
    )
    parser.add_argument("--config", type=Path, required=True, metavar="FILE")
    parser.add_argument("--handled-log", type=Path, required=True, metavar="FILE")
    parser.add_argument("--acked-log", type=Path, required=True, metavar="FILE")
    parser.add_argument("--tag", required=True, help="prefix of this process's request IDs")
    parser.add_argument("--rate", type=_positive, default=2.0, help="requests per second")
    parser.add_argument("--max-inflight", type=int, default=8)
    parser.add_argument("--request-timeout", type=_positive, default=5.0, metavar="S")
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
    from ..identity import load_authorised, load_identity
    from ..logs import setup_logging
    from ..settings import resolve

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
