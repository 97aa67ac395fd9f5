"""The soak: a fleet of node processes while a random one is killed, stopped or restarted.

::

    python -m edgenode.testing.soak --nodes 20 --duration 600 --seed 7     # the long form
    python -m edgenode.testing.soak --nodes 20 --duration 60 --seed 1      # the short form (CI)

Each node is a real process (:mod:`edgenode.testing.soak_node` through
:class:`~edgenode.testing.procs.NodeProcess`) on its own loopback IP
(``127.0.60.1``, ``127.0.60.2``, ...: a range of its own, so that tests
running at the same time on 127.0.0.x are not counted), with its own
identity, every node's ID authorised, every other node configured as a peer,
and short keepalive timings so that a minute of chaos means something.
Every few seconds one node that is not a *survivor* is chosen at random and
SIGKILLed, SIGSTOPped, restarted (SIGKILL or SIGTERM, then started again with
the same identity, IP and port), or revived (started, or SIGCONT). At most
``--max-down`` nodes are down at once. After each action the runner waits
until every node agrees (or the deadline passes), then holds for a random
one to three seconds, checking all along.

The checks, all along the run:

* **Registry agreement.** Each running node's status (its control socket,
  answered by a task of the node, not its dispatcher) must list every other
  running node as up, with the right node ID, and every killed, stopped or
  not-yet-listening node as not up. A disagreement may last at most the
  keepalive timeout plus a poll margin (``--margin``, 1 s) counted from the
  later of the last change of either node and the last poll that agreed. A
  stopped node's own view is stale and is not polled. For each action the
  time until every node agrees is measured, from the signal (kill, stop,
  cont) or from the moment a started node logs that it listens.
* **One connection per pair.** The kernel's view: ``/proc/net/tcp`` is read
  every half second; ESTABLISHED connections between two node IPs that
  reach a node's listen port are grouped by unordered IP pair (a loopback
  connection is listed once per end: both are one connection). Two at once
  happen by design while a simultaneous open is resolved; the same two
  connections seen together for longer than a grace (the longer of the
  keepalive and handshake timeouts, plus the shutdown grace, a sample
  period and the margin: 4.5 s by default) fail the check.
* **Exactly once.** Every request a node saw acknowledged (an answer that
  matched) must appear exactly once in the handled logs, in the log of the
  node it was sent to, recorded as coming from the node that sent it. No
  request ID may be handled twice, acknowledged or not.
* **send() exactly once, in order.** Each node also sends one-way messages
  (``await node.send()``, paced bursts to random up peers), each carrying
  its sender (the process's tag) and a per-sender sequence number, and logs
  every call and every message its default subscription delivers. No
  message may be delivered twice, to a node it was not sent to, or at all
  if it was never sent or its ``send()`` raised; per (sender, receiver) the
  sequence numbers delivered must strictly increase; and every message
  whose ``send()`` returned must be delivered, unless its sender or its
  receiver had a fault (killed, stopped, continued, restarted, or ended
  with the soak) within the loss window of the moment ``send()`` returned
  (the keepalive timeout plus the poll margin, 3 s by default; why is at
  :attr:`SoakOptions.send_loss_window_s`). A loss that no fault explains
  fails the check, listed with its message ID and the faults and process
  starts of its two nodes nearest it.
* **RSS flat.** The survivors (never killed or stopped) are sampled every
  second; the median of the first five samples after the warm-up and of
  five at the end, with the fleet whole again, may differ by less than 2 MB.
* **Clean exit.** Every node exits 0 on SIGTERM (restarts and the end), no
  node exits by itself, none is stopped or continued by anything but the
  soak (that would make its expectations wrong), and none logs a traceback.

The runner is :mod:`edgenode.testing.soak_runner`, its options
:mod:`edgenode.testing.soak_options`, the verdict
:mod:`edgenode.testing.soak_verdict`, and the bookkeeping of these checks
:mod:`edgenode.testing.soak_checks`. The soak prints a progress line every
ten seconds and a final summary with the figures of every check; the exit
status is 0 only if every check held.
``--json FILE`` also writes the summary as JSON (with each action, when it
happened and how long agreement took, and the survivors' RSS over time);
``--verbose`` prints a line per action.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .soak_options import SoakOptions
from .soak_runner import Soak, SoakError
from .soak_verdict import Verdict

# -- the command line -----------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = SoakOptions()
    p = argparse.ArgumentParser(
        prog="python -m edgenode.testing.soak",
        description="Run a fleet of nodes while a random one is killed, stopped or restarted "
        "every few seconds, and check the registry, the connections, exactly-once requests "
        "and messages, and memory all along. Exit status 0 only if every check held.",
    )
    p.add_argument("--nodes", type=int, default=defaults.nodes, help="fleet size (default 20)")
    p.add_argument(
        "--duration",
        type=_positive,
        default=defaults.duration_s,
        metavar="S",
        help="seconds of chaos (default 600)",
    )
    p.add_argument("--seed", type=int, default=None, help="chaos seed (default: random, printed)")
    p.add_argument("--first-ip", default=defaults.first_ip, help="first node's loopback IP")
    p.add_argument(
        "--survivors",
        type=int,
        default=defaults.survivors,
        help="nodes never killed or stopped, whose RSS is checked (default 3)",
    )
    p.add_argument(
        "--max-down",
        type=int,
        default=defaults.max_down,
        help="most nodes killed or stopped at once (default 3)",
    )
    p.add_argument(
        "--keepalive-interval", type=_positive, default=defaults.keepalive_interval_s, metavar="S"
    )
    p.add_argument(
        "--keepalive-timeout", type=_positive, default=defaults.keepalive_timeout_s, metavar="S"
    )
    p.add_argument(
        "--handshake-timeout", type=_positive, default=defaults.handshake_timeout_s, metavar="S"
    )
    p.add_argument(
        "--margin",
        type=_positive,
        default=defaults.margin_s,
        metavar="S",
        help="poll margin added to the keepalive timeout (default 1)",
    )
    p.add_argument(
        "--rate",
        type=_positive,
        default=defaults.request_rate,
        help="requests per second each node makes (default 2)",
    )
    p.add_argument(
        "--send-rate",
        type=_positive,
        default=defaults.send_rate,
        help="one-way messages per second each node sends (default 8)",
    )
    p.add_argument(
        "--send-burst",
        type=int,
        default=defaults.send_burst,
        help="messages each send burst sends to one peer in a row (default 4)",
    )
    p.add_argument(
        "--warmup",
        type=_positive,
        default=None,
        metavar="S",
        help="chaos before the RSS baseline (default a quarter, at most 60 s)",
    )
    p.add_argument("--rss-limit-mb", type=_positive, default=defaults.rss_limit_bytes / 1e6)
    p.add_argument("--workdir", type=Path, default=None, help="keep state and logs here")
    p.add_argument("--keep", action="store_true", help="keep the work directory after a pass")
    p.add_argument("--verbose", action="store_true", help="print a line for each action")
    p.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help="also write the summary as JSON"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak from the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    options = SoakOptions(
        nodes=args.nodes,
        duration_s=args.duration,
        seed=args.seed,
        first_ip=args.first_ip,
        survivors=args.survivors,
        max_down=args.max_down,
        keepalive_interval_s=args.keepalive_interval,
        keepalive_timeout_s=args.keepalive_timeout,
        handshake_timeout_s=args.handshake_timeout,
        margin_s=args.margin,
        request_rate=args.rate,
        send_rate=args.send_rate,
        send_burst=args.send_burst,
        warmup_s=args.warmup,
        rss_limit_bytes=int(args.rss_limit_mb * 1e6),
        workdir=args.workdir,
        keep=args.keep,
        verbose=args.verbose,
    )
    try:
        if options.keepalive_timeout_s <= options.keepalive_interval_s:
            raise SoakError("--keepalive-timeout must be more than --keepalive-interval")
        soak = Soak(options)
    except (SoakError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        soak.run()
        verdict = Verdict(soak)
        checks = verdict.checks()
    except KeyboardInterrupt:
        print("soak: interrupted; every node killed", file=sys.stderr)
        return 130
    verdict.report(checks)
    if args.json is not None:
        args.json.write_text(json.dumps(verdict.summary(checks), indent=2) + "\n")
    ok = all(c.ok for c in checks)
    if ok and not options.keep and options.workdir is None:
        shutil.rmtree(soak.workdir, ignore_errors=True)
    elif not ok:
        print(f"soak: state and logs kept in {soak.workdir}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
