"""The soak's runner: a fleet of node processes, chaos among them, and a record of both.

:class:`Soak` starts every node (:class:`~edgenode.testing.procs.NodeProcess`
running :mod:`edgenode.testing.soak_node`), then, until the duration is
over, does one random chaos action at a time and polls every running
node's status, the kernel's connections and the survivors' RSS in rounds,
feeding the trackers of :mod:`edgenode.testing.soak_checks`. It records the
actions, the faults it made, the processes' troubles and the figures the
checks need; :class:`~edgenode.testing.soak_verdict.Verdict` judges them.
What is checked, and why, is in :mod:`edgenode.testing.soak`.
"""

from __future__ import annotations

import ipaddress
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..control_client import ControlError
from .procs import NodeProcess, NodeProcessError, free_port
from .signals import process_state
from .soak_checks import AgreementTracker, DuplicateTracker, Expected, read_connections
from .soak_options import RSS_SAMPLES, SoakOptions

LIVE = "live"
STOPPED = "stopped"
DEAD = "dead"
STARTING = "starting"


def read_log_lines(path: Path) -> list[str]:
    """The non-blank lines of a node's log file (none if it does not exist yet)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as log_file:
            return [line.rstrip("\n") for line in log_file if line.strip()]
    except FileNotFoundError:
        return []


def samples_since(samples: Sequence[tuple[float, int]], start: float | None) -> list[int]:
    """The values of the (time, value) ``samples`` taken at or after ``start``."""
    if start is None:
        return []
    return [b for t, b in samples if t >= start]


def seconds_text(value: float | None) -> str:
    """``value`` seconds as text, or "never" for None."""
    return "never" if value is None else f"{value:.2f} s"


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


class SoakError(Exception):
    """The soak could not run (not a failed check)."""


class Soak:
    """One soak run: :meth:`run` runs the fleet and its chaos, and records what it saw.

    :class:`~edgenode.testing.soak_verdict.Verdict` judges the record; the
    checks are described in :mod:`edgenode.testing.soak`.
    """

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
        acked = sum(len(read_log_lines(m.proc.state_dir / "acked.log")) for m in self.members)
        delivered = sum(
            len(read_log_lines(m.proc.state_dir / "received.log")) for m in self.members
        )
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

    def run(self) -> None:
        """Run the soak: start the fleet, make chaos, make it whole and stop it.

        Every process is killed and reaped on the way out, whatever happens.
        """
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
                        f"{action.member}: agreement after {seconds_text(action.agreed_after_s)}"
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
            len(samples_since(samples, final_from)) < RSS_SAMPLES for samples in self.rss.values()
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
