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

The bookkeeping of these checks is in :mod:`edgenode.testing.soak_checks`.
It prints a progress line every ten seconds and a final summary with the
figures of every check; the exit status is 0 only if every check held.
``--json FILE`` also writes the summary as JSON (with each action, when it
happened and how long agreement took, and the survivors' RSS over time);
``--verbose`` prints a line per action.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..control_client import ControlError
from .procs import NodeProcess, NodeProcessError, free_port
from .signals import process_state
from .soak_checks import (
    AgreementTracker,
    DuplicateTracker,
    Expected,
    Sends,
    check_exactly_once,
    check_sends,
    read_connections,
)

LIVE = "live"
STOPPED = "stopped"
DEAD = "dead"
STARTING = "starting"

#: RSS drift allowed for the survivors (2 MB, decimal).
RSS_LIMIT_BYTES = 2_000_000
#: RSS samples whose median is the baseline, and the final figure.
_RSS_SAMPLES = 5
_MAX_LISTED = 20


def _read_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as log_file:
            return [line.rstrip("\n") for line in log_file if line.strip()]
    except FileNotFoundError:
        return []


# -- the runner ---------------------------------------------------------------------------------


@dataclass
class SoakOptions:
    """Everything a soak run is told; the defaults are the long form's."""

    nodes: int = 20
    duration_s: float = 600.0
    seed: int | None = None
    first_ip: str = "127.0.60.1"
    survivors: int = 3
    max_down: int = 3
    keepalive_interval_s: float = 0.5
    keepalive_timeout_s: float = 2.0
    handshake_timeout_s: float = 2.0
    backoff_cap_s: float = 1.0
    shutdown_grace_s: float = 1.0
    margin_s: float = 1.0
    hold_s: tuple[float, float] = (1.0, 3.0)
    request_rate: float = 2.0
    request_timeout_s: float = 5.0
    send_rate: float = 8.0
    send_burst: int = 4
    warmup_s: float | None = None
    rss_limit_bytes: int = RSS_LIMIT_BYTES
    round_s: float = 0.25
    tcp_every_s: float = 0.5
    rss_every_s: float = 1.0
    status_timeout_s: float = 5.0
    start_timeout_s: float = 30.0
    settle_limit_s: float = 30.0
    progress_every_s: float = 10.0
    workdir: Path | None = None
    keep: bool = False
    verbose: bool = False

    @property
    def bound_s(self) -> float:
        """Longest a node may disagree with the processes' states."""
        return self.keepalive_timeout_s + self.margin_s

    @property
    def duplicate_grace_s(self) -> float:
        """Longest two connections of one pair may be established together."""
        slowest = max(self.keepalive_timeout_s, self.handshake_timeout_s)
        return slowest + self.shutdown_grace_s + self.tcp_every_s + self.margin_s

    @property
    def send_loss_window_s(self) -> float:
        """How near a fault of its sender or receiver a message's send must be for
        that fault to explain its loss, either side of the moment ``send()``
        returned (the message was queued on the connection then).

        The keepalive timeout, plus the poll margin for a loaded machine:

        * A fault *before* the send: after its peer dies, a node's ``send()``
          still queues on the dead connection until it declares the peer
          down: at once for a closed socket (a kill, a SIGTERM), after the
          keepalive timeout for a silent one (a stop); and a node resumed
          from a stop sends on connections its peers have closed until it
          reads that they did. The registry check holds every node to
          declaring a change within the keepalive timeout plus the margin;
          so a message queued later than that went on a live connection
          (to the peer's new process, if it restarted) and must arrive.
        * A fault *after* the send: a message on a live connection arrives
          unless the connection dies first. The receiver reads in order, so
          while the message has not arrived nothing sent after it has, and a
          peer heard nothing from for the keepalive timeout is declared dead
          (our consumer never fills its subscription, the one thing that
          holds a silent peer). So a message not delivered a keepalive
          timeout (plus the margin) after its send was lost by a connection
          that died while both ends were well: a failure, not a fault's.
        """
        return self.keepalive_timeout_s + self.margin_s

    @property
    def warmup(self) -> float:
        """Seconds of chaos before the survivors' RSS baseline."""
        if self.warmup_s is not None:
            return self.warmup_s
        return min(60.0, self.duration_s / 4)


class Member:
    """One node of the fleet and what the runner knows of it."""

    def __init__(self, index: int, ip: str, port: int, node_id: str, proc: NodeProcess) -> None:
        self.index = index
        self.name = f"n{index:02d}"
        self.ip = ip
        self.port = port
        self.node_id = node_id
        self.proc = proc
        self.state = DEAD
        self.changed_at = 0.0
        self.survivor = False
        self.starting_since = 0.0

    def expected(self) -> Expected:
        return Expected(self.name, self.ip, self.node_id, self.state == LIVE, self.changed_at)


@dataclass
class Action:
    """One chaos action and how long the fleet took to agree after it."""

    kind: str
    member: str
    issued_at: float
    #: When the new state took effect (a started node: when it listened).
    effective_at: float | None = None
    agreed_after_s: float | None = None


@dataclass
class Check:
    """One of the soak's checks: held or not, its figures, and what went wrong."""

    name: str
    ok: bool
    summary: str
    details: list[str] = field(default_factory=list)


class SoakError(Exception):
    """The soak could not run (not a failed check)."""


class Soak:
    """One soak run: :meth:`run` returns the checks; see the module docstring."""

    def __init__(self, options: SoakOptions, out: Any = None) -> None:
        if options.nodes < 2:
            raise SoakError(f"--nodes: expected at least 2, got {options.nodes}")
        if not 0 <= options.survivors < options.nodes:
            raise SoakError(f"--survivors: expected 0..{options.nodes - 1}")
        if options.send_burst < 1:
            raise SoakError(f"--send-burst: expected at least 1, got {options.send_burst}")
        first = ipaddress.IPv4Address(options.first_ip)
        self.ips = [str(first + i) for i in range(options.nodes)]
        loopback = ipaddress.IPv4Network("127.0.0.0/8")
        if not all(ipaddress.IPv4Address(ip) in loopback for ip in self.ips):
            raise SoakError(f"--first-ip: {options.nodes} nodes from {first} leave 127.0.0.0/8")
        if options.workdir is not None and Path(options.workdir).is_dir():
            if any(Path(options.workdir).iterdir()):
                # Old logs would mix with this run's (request IDs start again at 1).
                raise SoakError(f"--workdir: {options.workdir} is not empty")
        self.options = options
        self.out = out if out is not None else sys.stdout
        self.seed = options.seed if options.seed is not None else random.randrange(1 << 31)
        self.rng = random.Random(self.seed)
        self.members: list[Member] = []
        self.actions: list[Action] = []
        #: What was done to each node (by IP) that may cost it messages, and when.
        self.faults: dict[str, list[tuple[float, str]]] = defaultdict(list)
        #: When each node's processes were started (by IP): context, not faults.
        self.starts: dict[str, list[float]] = defaultdict(list)
        self.agreement = AgreementTracker(options.bound_s)
        self.duplicates = DuplicateTracker(options.duplicate_grace_s)
        self.rss: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self.status_failures: list[str] = []
        self.process_troubles: list[str] = []
        #: Restarts by SIGTERM: {True: exited 0, False: did not}.
        self.graceful_exits: Counter[bool] = Counter()
        self.start_failures: list[str] = []
        self.exit_codes: dict[str, int | None] = {}
        self.rounds = 0
        self.round_worst_s = 0.0
        self.status_worst_s = 0.0
        self.t0 = 0.0
        self.chaos_s = 0.0
        self.initial_agreement_s: float | None = None
        self.startup_disagreements = 0
        self.final_agreement_s: float | None = None
        self.baseline_from: float | None = None
        self.final_from: float | None = None
        self._sends_result: Sends | None = None
        self._next_tcp = 0.0
        self._next_rss = 0.0
        self._next_progress = 0.0
        self.workdir = Path(".")

    # -- output --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- setting up ----------------------------------------------------------------------

    def _setup(self) -> None:
        from ..identity import create_identity  # cryptography: in the runner only

        opts = self.options
        if opts.workdir is not None:
            self.workdir = Path(opts.workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="edgenode-soak-"))
        identities = [create_identity(self.workdir / f"n{i:02d}") for i in range(opts.nodes)]
        ports = [free_port(ip) for ip in self.ips]
        authorised = [identity.node_id for identity in identities]
        for index, (ip, port, identity) in enumerate(zip(self.ips, ports, identities)):
            state = self.workdir / f"n{index:02d}"
            proc = NodeProcess(
                state,
                ip,
                port=port,
                peers=[(p_ip, p_port) for p_ip, p_port in zip(self.ips, ports) if p_ip != ip],
                authorised=authorised,
                keepalive_interval_s=opts.keepalive_interval_s,
                keepalive_timeout_s=opts.keepalive_timeout_s,
                handshake_timeout_s=opts.handshake_timeout_s,
                backoff_cap_s=opts.backoff_cap_s,
                shutdown_grace_s=opts.shutdown_grace_s,
                app=("-m", "edgenode.testing.soak_node"),
                name=f"n{index:02d}",
                log_path=state / "node.log",
            )
            member = Member(index, ip, port, identity.node_id, proc)
            member.survivor = index < opts.survivors
            self.members.append(member)

    def _start(self, member: Member, now: float) -> None:
        """Start ``member``'s process (not waiting); it is live once it listens."""
        opts = self.options
        state = member.proc.state_dir
        member.proc.app_args = [
            "--handled-log",
            str(state / "handled.log"),
            "--acked-log",
            str(state / "acked.log"),
            "--sent-log",
            str(state / "sent.log"),
            "--received-log",
            str(state / "received.log"),
            "--send-rate",
            str(opts.send_rate),
            "--send-burst",
            str(opts.send_burst),
            "--tag",
            f"{member.name}s{member.proc.starts + 1}",
            "--rate",
            str(opts.request_rate),
            "--request-timeout",
            str(opts.request_timeout_s),
            "--seed",
            str(self.rng.getrandbits(32)),
        ]
        member.proc.start(wait=False)
        member.state = STARTING
        member.starting_since = now
        self.starts[member.ip].append(now)

    def _fault(self, member: Member, what: str, at: float) -> None:
        """Record something done to ``member`` that may lose messages in flight."""
        self.faults[member.ip].append((at, what))

    # -- watching ------------------------------------------------------------------------

    def _check_processes(self, now: float) -> None:
        opts = self.options
        for m in self.members:
            if m.state == DEAD:
                continue
            if not m.proc.running:
                code = m.proc.returncode
                self.process_troubles.append(
                    f"{m.name} exited by itself with status {code} while {m.state}; "
                    f"log: {m.proc.log_path}"
                )
                self._fault(m, "exit by itself", now)
                m.state, m.changed_at = DEAD, now
                continue
            # Only the soak signals its nodes: anything else makes its expectations wrong.
            frozen = process_state(m.proc.proc) in ("T", "t")
            if frozen != (m.state == STOPPED):
                what = "continued" if m.state == STOPPED else "stopped"
                self.process_troubles.append(
                    f"{m.name} was {what} by something outside the soak (pid {m.proc.pid}); "
                    "the checks of this run are not to be trusted"
                )
                self._fault(m, f"{what} outside the soak", now)
                m.state, m.changed_at = (STOPPED if frozen else LIVE), now
                continue
            if m.state == STARTING:
                if m.proc.ready_at is not None:
                    m.state, m.changed_at = LIVE, m.proc.ready_at
                elif now - m.starting_since > opts.start_timeout_s:
                    self.start_failures.append(
                        f"{m.name} not listening {opts.start_timeout_s} s after its start; "
                        f"log: {m.proc.log_path}"
                    )
                    m.proc.kill()
                    self._fault(m, "kill (not listening)", now)
                    m.state, m.changed_at = DEAD, now

    def _round(self) -> tuple[bool, float]:
        """Poll every running node once and take the samples that are due.

        Returns (whether every node agrees and none is starting, when the
        round ended).
        """
        opts = self.options
        started = time.monotonic()
        self._check_processes(started)
        expected = [m.expected() for m in self.members]
        all_agree = all(m.state != STARTING for m in self.members)
        for m in self.members:
            if m.state != LIVE:
                continue
            asked = time.monotonic()
            try:
                status = m.proc.status(timeout_s=opts.status_timeout_s)
            except (ControlError, NodeProcessError) as exc:
                all_agree = False
                if m.proc.running:
                    self.status_failures.append(f"{m.name}: {exc}")
                continue
            now = time.monotonic()
            if self.t0:
                self.status_worst_s = max(self.status_worst_s, now - asked)
            node_id = status.get("node", {}).get("node_id")
            if node_id != m.node_id:
                self.agreement.wrong_ids.append(
                    f"{m.name} reports node ID {node_id}, expected {m.node_id}"
                )
            others = [e for e in expected if e.name != m.name]
            if not self.agreement.observe(now, m.expected(), others, status.get("peers", [])):
                all_agree = False
        # The round's verdict holds as of its last status; the samples follow.
        polled = time.monotonic()
        if self.t0:
            self.round_worst_s = max(self.round_worst_s, polled - started)
        ended = polled
        if ended >= self._next_tcp:
            self._next_tcp = ended + opts.tcp_every_s
            listen = [(m.ip, m.port) for m in self.members]
            self.duplicates.sample(ended, read_connections(self.ips, listen))
        if ended >= self._next_rss:
            self._next_rss = ended + opts.rss_every_s
            for m in self.members:
                if m.survivor and m.proc.running:
                    try:
                        self.rss[m.name].append((ended, m.proc.rss_bytes()))
                    except NodeProcessError:
                        pass  # it just exited: the next round reports that
        self.rounds += 1
        if self.t0 and ended >= self._next_progress:
            self._next_progress = ended + opts.progress_every_s
            self._progress(ended)
        # Pace the polls: a sampling period, not a wait for anything.
        pause = started + opts.round_s - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        return all_agree, polled

    def _settle(self, action: Action | None, limit_s: float) -> float | None:
        """Poll until every node agrees; return how long it took from the action.

        None if there was no agreement within ``limit_s``.
        """
        begun = time.monotonic()
        while True:
            agree, ended = self._round()
            if action is not None and action.effective_at is None:
                member = self._member(action.member)
                if member.state == LIVE:
                    action.effective_at = member.changed_at
                elif member.state == DEAD and action.kind in ("restart", "start"):
                    action.effective_at = ended  # it never came up: measure from now
            origin = begun if action is None else (action.effective_at or action.issued_at)
            if agree and (action is None or action.effective_at is not None):
                took = max(0.0, ended - origin)
                if action is not None:
                    action.agreed_after_s = took
                return took
            if ended - origin > limit_s:
                return None

    def _member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def _progress(self, now: float) -> None:
        states = Counter(m.state for m in self.members)
        kinds = Counter(a.kind for a in self.actions)
        agreed = [a.agreed_after_s for a in self.actions if a.agreed_after_s is not None]
        worst = f"{max(agreed):.2f}" if agreed else "-"
        acked = sum(len(_read_lines(m.proc.state_dir / "acked.log")) for m in self.members)
        delivered = sum(len(_read_lines(m.proc.state_dir / "received.log")) for m in self.members)
        violations = (
            len(self.agreement.violations)
            + len(self.duplicates.violations)
            + len(self.status_failures)
            + len(self.process_troubles)
            + len(self.start_failures)
        )
        rss = " ".join(
            f"{name} {samples[-1][1] / 1e6:.1f}" for name, samples in sorted(self.rss.items())
        )
        self.say(
            f"soak {now - self.t0:5.0f}/{self.options.duration_s:.0f} s | actions "
            f"{len(self.actions)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}) | "
            f"live {states[LIVE]} stopped {states[STOPPED]} dead {states[DEAD]} "
            f"starting {states[STARTING]} | agreement worst {worst}/"
            f"{self.options.bound_s:.2f} s | acked {acked} | messages delivered {delivered} | "
            f"conns per pair max "
            f"{self.duplicates.most_at_once} | survivors' RSS MB {rss or '-'} | "
            f"violations {violations}"
        )

    # -- chaos ---------------------------------------------------------------------------

    def _act(self) -> Action | None:
        """Do one random action; None if no node can be acted on now."""
        opts = self.options
        targets = [m for m in self.members if not m.survivor]
        down = [m for m in targets if m.state in (DEAD, STOPPED)]
        running = [m for m in targets if m.state == LIVE]
        kinds: list[str] = []
        weights: list[float] = []
        if running and len(down) < opts.max_down:
            kinds += ["kill", "stop"]
            weights += [1.0, 1.0]
        if running:
            kinds.append("restart")
            weights.append(1.0)
        if down:
            kinds.append("revive")
            weights.append(float(len(down)))
        if not kinds:
            return None
        kind = self.rng.choices(kinds, weights)[0]
        if kind == "revive":
            member = self.rng.choice(down)
            kind = "cont" if member.state == STOPPED else "start"
        else:
            member = self.rng.choice(running)
        if kind == "restart":
            graceful = self.rng.random() < 0.5
            kind = "restart (SIGTERM)" if graceful else "restart (SIGKILL)"
        now = time.monotonic()
        action = Action(kind, member.name, now)
        self.actions.append(action)
        try:
            self._do(action, member, now)
        except NodeProcessError as exc:
            # It exited by itself, or would not obey: a finding, and the run goes on.
            self.process_troubles.append(f"{kind} of {member.name}: {str(exc).splitlines()[0]}")
            self._fault(member, f"{kind} failed", time.monotonic())
            if not member.proc.running:
                member.state, member.changed_at = DEAD, time.monotonic()
                action.effective_at = member.changed_at
        return action

    def _do(self, action: Action, member: Member, now: float) -> None:
        kind = action.kind
        if kind != "start":  # a start loses nothing: a new connection carries everything
            self._fault(member, kind, now)
        if kind == "kill":
            member.proc.kill()
            member.state, member.changed_at = DEAD, now
            action.effective_at = now
        elif kind == "stop":
            member.proc.stop()
            member.state, member.changed_at = STOPPED, now
            action.effective_at = now
        elif kind == "cont":
            member.proc.cont()
            member.state, member.changed_at = LIVE, now
            action.effective_at = now
        elif kind == "start":
            self._start(member, now)
        else:  # a restart: SIGTERM (a clean exit, status 0) or SIGKILL, then start
            if kind == "restart (SIGTERM)":
                code = member.proc.terminate(timeout_s=10.0)
                self.graceful_exits[code == 0] += 1
                if code != 0:
                    self.process_troubles.append(
                        f"{member.name} exited {code} on SIGTERM; log: {member.proc.log_path}"
                    )
            else:
                member.proc.kill()
            ended = time.monotonic()
            member.state, member.changed_at = DEAD, ended
            self._start(member, ended)

    # -- the run -------------------------------------------------------------------------

    def run(self) -> list[Check]:
        """Run the soak; return its checks (each with ``ok``)."""
        opts = self.options
        self.say(
            f"soak: {opts.nodes} nodes on {self.ips[0]}-{self.ips[-1]}, {opts.duration_s:.0f} s "
            f"of chaos, seed {self.seed}; keepalive {opts.keepalive_interval_s} s / "
            f"{opts.keepalive_timeout_s} s, handshake {opts.handshake_timeout_s} s; "
            f"survivors {opts.survivors}, at most {opts.max_down} down"
        )
        self._setup()
        self.say(f"soak: work directory {self.workdir}")
        try:
            self._run_phases()
        finally:
            for m in self.members:
                m.proc.close()
        return self._checks()

    def _run_phases(self) -> None:
        opts = self.options
        begun = time.monotonic()
        for m in self.members:
            self._start(m, begun)
        self.initial_agreement_s = self._settle(None, opts.start_timeout_s + opts.settle_limit_s)
        if self.initial_agreement_s is None:
            self.say("soak: the fleet never agreed after starting; stopping")
            self._shutdown()
            return
        self.say(f"soak: {opts.nodes} nodes up and agreeing after {self.initial_agreement_s:.2f} s")
        # The checks start with the chaos: while the whole fleet starts at once
        # (every process importing, every pair's TLS handshake) nodes lag.
        self.startup_disagreements = len(self.agreement.violations)
        self.agreement.restart_counts()
        self.duplicates.restart_counts()
        self.t0 = time.monotonic()
        self._next_progress = self.t0 + opts.progress_every_s
        baseline_at = self.t0 + opts.warmup
        end = self.t0 + opts.duration_s
        while time.monotonic() < end:
            action = self._act()
            if action is not None:
                self._settle(action, opts.settle_limit_s)
                if opts.verbose:
                    self.say(
                        f"soak {action.issued_at - self.t0:7.2f} s: {action.kind} of "
                        f"{action.member}: agreement after {_secs(action.agreed_after_s)}"
                    )
            hold_until = min(end, time.monotonic() + self.rng.uniform(*opts.hold_s))
            while time.monotonic() < hold_until:
                self._round()
        self.chaos_s = time.monotonic() - self.t0
        self.baseline_from = baseline_at
        # The fleet whole again, then the survivors' final RSS.
        now = time.monotonic()
        for m in self.members:
            if m.state == STOPPED:
                self._fault(m, "cont (chaos over)", time.monotonic())
                m.proc.cont()
                m.state, m.changed_at = LIVE, time.monotonic()
            elif m.state == DEAD:
                self._start(m, now)
        self.final_agreement_s = self._settle(None, opts.start_timeout_s + opts.settle_limit_s)
        final_from = time.monotonic()
        self.final_from = final_from
        # A few samples of each survivor, the fleet whole (bounded in time).
        while time.monotonic() < final_from + opts.settle_limit_s and any(
            len(_since(samples, final_from)) < _RSS_SAMPLES for samples in self.rss.values()
        ):
            self._round()
        self._shutdown()

    def _shutdown(self) -> None:
        for m in self.members:
            if m.proc.running:
                self._fault(m, "end of the soak", time.monotonic())
                try:
                    self.exit_codes[m.name] = m.proc.terminate(timeout_s=10.0)
                except NodeProcessError as exc:
                    self.exit_codes[m.name] = None
                    self.process_troubles.append(str(exc).splitlines()[0])
            m.state = DEAD

    # -- the verdict ---------------------------------------------------------------------

    def _checks(self) -> list[Check]:
        return [
            self._check_agreement(),
            self._check_connections(),
            self._check_exactly_once(),
            self._check_sends(),
            self._check_rss(),
            self._check_clean(),
        ]

    def _check_agreement(self) -> Check:
        opts = self.options
        agreement = self.agreement
        timed = [a for a in self.actions if a.agreed_after_s is not None]
        late = [a for a in self.actions if a.agreed_after_s is None]
        over = [
            a for a in timed if a.agreed_after_s is not None and a.agreed_after_s > opts.bound_s
        ]
        worst = max(timed, key=lambda a: a.agreed_after_s or 0.0, default=None)
        by_kind: dict[str, float] = {}
        for a in timed:
            by_kind[a.kind] = max(by_kind.get(a.kind, 0.0), a.agreed_after_s or 0.0)
        times = [a.agreed_after_s for a in timed if a.agreed_after_s is not None]
        details = [
            *agreement.violations,
            *agreement.wrong_ids,
            *(f"status failed: {f}" for f in self.status_failures),
            *(f"{a.kind} of {a.member}: no agreement within {opts.settle_limit_s} s" for a in late),
            *(f"{a.kind} of {a.member}: agreement after {a.agreed_after_s:.2f} s" for a in over),
        ]
        if self.initial_agreement_s is None:
            details.insert(0, "the fleet never agreed after starting")
        if self.final_agreement_s is None and self.t0:
            details.insert(0, "the fleet never agreed after the chaos ended")
        ok = not details and bool(self.actions)
        if not self.actions:
            details.append("no chaos action ran")
        summary = (
            f"worst {worst.agreed_after_s:.2f} s (after a {worst.kind} of {worst.member})"
            if worst is not None and worst.agreed_after_s is not None
            else "no action measured"
        )
        summary += (
            f" against a bound of {opts.bound_s:.2f} s (keepalive timeout "
            f"{opts.keepalive_timeout_s:.2f} s + {opts.margin_s:.2f} s poll margin); "
            f"median {statistics.median(times):.2f} s over {len(times)} actions; "
            if times
            else "; "
        )
        summary += (
            "worst by action: "
            + ", ".join(f"{kind} {s:.2f} s" for kind, s in sorted(by_kind.items()))
            + f"; {agreement.statuses} statuses in {self.rounds} poll rounds (slowest round "
            f"{self.round_worst_s:.2f} s, slowest status {self.status_worst_s * 1000:.0f} ms), "
            f"longest disagreement {agreement.longest_s:.2f} s, "
            f"{len(agreement.violations)} beyond the bound, {len(self.status_failures)} "
            f"status failures; fleet agreed {_secs(self.initial_agreement_s)} after start "
            f"({self.startup_disagreements} slow pairs while all started at once, not counted), "
            f"{_secs(self.final_agreement_s)} after the chaos"
        )
        return Check("registry agrees with the processes", ok, summary, details)

    def _check_connections(self) -> Check:
        d = self.duplicates
        ok = not d.violations and d.samples > 0
        summary = (
            f"{d.samples} samples of /proc/net/tcp; most connections between one pair at once "
            f"{d.most_at_once}; {d.episodes} transient duplicates (longest {d.longest_s:.2f} s, "
            f"grace {self.options.duplicate_grace_s:.2f} s); "
            f"{len(d.violations)} beyond the grace"
        )
        return Check("one connection per pair", ok, summary, list(d.violations))

    def _check_exactly_once(self) -> Check:
        handled = {m.ip: _read_lines(m.proc.state_dir / "handled.log") for m in self.members}
        acked = {m.ip: _read_lines(m.proc.state_dir / "acked.log") for m in self.members}
        r = check_exactly_once(handled, acked)
        summary = (
            f"{r.acknowledged} acknowledged requests, each handled exactly once by its target"
            if r.ok
            else f"{r.acknowledged} acknowledged requests"
        )
        summary += (
            f"; {r.handled} handled in all, {r.handled_not_acknowledged} handled but not "
            f"acknowledged (in flight at a kill or stop); duplicates {len(r.duplicates)}, "
            f"missing {len(r.missing)}, misrouted {len(r.misrouted)}, wrong answers "
            f"{len(r.wrong_answers)}, malformed lines {len(r.malformed)}"
        )
        details = [
            *(f"handled twice: {x}" for x in r.duplicates),
            *(f"acknowledged, never handled: {x}" for x in r.missing),
            *(f"misrouted: {x}" for x in r.misrouted),
            *(f"wrong answer: {x}" for x in r.wrong_answers),
            *(f"malformed: {x}" for x in r.malformed),
        ]
        if r.acknowledged == 0:
            details.append("no request was acknowledged: the check means nothing")
        return Check("every acknowledged request handled exactly once", r.ok, summary, details)

    def _sends(self) -> Sends:
        if self._sends_result is None:
            logs = {m.ip: m.proc.state_dir for m in self.members}
            self._sends_result = check_sends(
                {ip: _read_lines(state / "sent.log") for ip, state in logs.items()},
                {ip: _read_lines(state / "received.log") for ip, state in logs.items()},
                self.faults,
                self.options.send_loss_window_s,
                origin=self.t0,
                starts=self.starts,
            )
        return self._sends_result

    def _check_sends(self) -> Check:
        r = self._sends()
        details = r.troubles()
        if r.lost:
            details.insert(
                0, "(times from the start of the chaos; negative: while the fleet started)"
            )
        if r.sent == 0 or r.delivered == 0:
            details.append("no message was sent and delivered: the check means nothing")
        return Check(
            "every message whose send() returned delivered once and in order, or lost to a fault",
            r.ok,
            r.describe(),
            details,
        )

    def _check_rss(self) -> Check:
        limit = self.options.rss_limit_bytes
        details: list[str] = []
        parts: list[str] = []
        ok = bool(self.rss)
        for name, samples in sorted(self.rss.items()):
            # The medians of the first samples after the warm-up and of the last ones.
            after = _since(samples, self.baseline_from)
            base = after[:_RSS_SAMPLES]
            final = _since(samples, self.final_from)[:_RSS_SAMPLES]
            if len(base) < _RSS_SAMPLES or len(final) < _RSS_SAMPLES or len(after) <= len(base):
                ok = False
                details.append(
                    f"{name}: too few samples (after the warm-up {len(after)}, at the end "
                    f"{len(final)}); run longer than the warm-up"
                )
                continue
            base_b, final_b = statistics.median(base), statistics.median(final)
            drift = final_b - base_b
            parts.append(
                f"{name} {_mb(base_b)} -> {_mb(final_b)} MB (drift {drift / 1e6:+.2f} MB, "
                f"range after warm-up {_mb(min(after))}-{_mb(max(after))} MB)"
            )
            if abs(drift) >= limit:
                ok = False
                details.append(
                    f"{name}: RSS drifted {drift / 1e6:+.2f} MB (limit {limit / 1e6} MB)"
                )
        summary = (
            "; ".join(parts) or ("no figures" if self.rss else "no survivors")
        ) + f"; limit {limit / 1e6:.1f} MB, baseline after {self.options.warmup:.0f} s warm-up"
        return Check("survivors' RSS flat", ok, summary, details)

    def _check_clean(self) -> Check:
        tracebacks = []
        for m in self.members:
            if any("Traceback" in line for line in _read_lines(m.proc.log_path)):
                tracebacks.append(f"{m.name}: traceback in {m.proc.log_path}")
        bad_exits = [
            f"{name} exited {code} on SIGTERM"
            for name, code in sorted(self.exit_codes.items())
            if code != 0
        ]
        details = [*self.process_troubles, *self.start_failures, *bad_exits, *tracebacks]
        starts = sum(m.proc.starts for m in self.members)
        summary = (
            f"{starts} process starts; {len(self.exit_codes)} nodes exited on SIGTERM at the end, "
            f"{sum(1 for c in self.exit_codes.values() if c == 0)} with status 0; "
            f"{self.graceful_exits[True]} of {sum(self.graceful_exits.values())} restarts by "
            f"SIGTERM exited 0; {len(self.process_troubles)} unexpected exits or signals not "
            f"obeyed, {len(self.start_failures)} failed starts, {len(tracebacks)} logs with a "
            "traceback"
        )
        return Check("clean exits, no crashes", not details, summary, details)

    def summary(self, checks: Sequence[Check]) -> dict[str, Any]:
        """The run's figures and verdicts, as JSON-ready data."""
        kinds = Counter(a.kind for a in self.actions)
        return {
            "nodes": self.options.nodes,
            "duration_s": round(self.chaos_s, 1),
            "seed": self.seed,
            "workdir": str(self.workdir),
            "actions": dict(kinds),
            "agreement_s": [a.agreed_after_s for a in self.actions],
            "action_log": [
                {
                    "t_s": round(a.issued_at - self.t0, 3),
                    "kind": a.kind,
                    "node": a.member,
                    "agreed_after_s": a.agreed_after_s,
                }
                for a in self.actions
            ],
            "bound_s": self.options.bound_s,
            "sends": self._send_figures(),
            # Every tenth sample: enough to see a trend.
            "rss_bytes": {
                name: [[round(t - self.t0, 1), b] for t, b in samples[::10]]
                for name, samples in sorted(self.rss.items())
            },
            "checks": [
                {"name": c.name, "ok": c.ok, "summary": c.summary, "details": c.details}
                for c in checks
            ],
            "ok": all(c.ok for c in checks),
        }

    def _send_figures(self) -> dict[str, Any]:
        r = self._sends()
        return {
            "sent": r.sent,
            "delivered": r.delivered,
            "refused": dict(r.refused),
            "unfinished": r.unfinished,
            "excused": dict(r.excused),
            "lost": len(r.lost),
            "duplicates": len(r.duplicates),
            "out_of_order": len(r.out_of_order),
            "window_s": r.window_s,
            "slowest_s": round(r.slowest_s, 3),
        }

    def report(self, checks: Sequence[Check]) -> None:
        """Print the final summary."""
        kinds = Counter(a.kind for a in self.actions)
        self.say("")
        self.say(
            f"== soak summary: {self.options.nodes} nodes, {self.chaos_s:.0f} s of chaos, "
            f"seed {self.seed} =="
        )
        self.say(
            f"actions: {len(self.actions)} ("
            + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
            + ")"
        )
        for check in checks:
            self.say(f"{'PASS' if check.ok else 'FAIL'} {check.name}: {check.summary}")
            for detail in check.details[:_MAX_LISTED]:
                self.say(f"    {detail}")
            if len(check.details) > _MAX_LISTED:
                self.say(f"    ... and {len(check.details) - _MAX_LISTED} more")
        held = sum(1 for c in checks if c.ok)
        verdict = "PASS" if held == len(checks) else "FAIL"
        self.say(f"result: {verdict} ({held} of {len(checks)} checks held)")


def _since(samples: Sequence[tuple[float, int]], start: float | None) -> list[int]:
    """The values of the (time, value) ``samples`` taken at or after ``start``."""
    if start is None:
        return []
    return [b for t, b in samples if t >= start]


def _mb(count: float) -> str:
    return f"{count / 1e6:.2f}"


def _secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


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
        checks = soak.run()
    except KeyboardInterrupt:
        print("soak: interrupted; every node killed", file=sys.stderr)
        return 130
    soak.report(checks)
    if args.json is not None:
        args.json.write_text(json.dumps(soak.summary(checks), indent=2) + "\n")
    ok = all(c.ok for c in checks)
    if ok and not options.keep and options.workdir is None:
        shutil.rmtree(soak.workdir, ignore_errors=True)
    elif not ok:
        print(f"soak: state and logs kept in {soak.workdir}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
