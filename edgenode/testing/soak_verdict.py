"""The soak's verdict: each check held or not, with its figures; the summary and report.

:class:`Verdict` reads what a :class:`~edgenode.testing.soak_runner.Soak`
recorded, and the logs its nodes wrote, and returns one :class:`Check` per
check of :mod:`edgenode.testing.soak`; the bookkeeping behind them is in
:mod:`edgenode.testing.soak_checks`. :meth:`Verdict.report` prints the final
summary, :meth:`Verdict.summary` gives it as JSON-ready data.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .soak_checks import Sends, check_exactly_once, check_sends
from .soak_options import RSS_SAMPLES
from .soak_runner import Soak, read_log_lines, samples_since, seconds_text

_MAX_LISTED = 20


@dataclass
class Check:
    """One of the soak's checks: held or not, its figures, and what went wrong."""

    name: str
    ok: bool
    summary: str
    details: list[str] = field(default_factory=list)


class Verdict:
    """The checks of one soak run, from what it recorded (after :meth:`Soak.run`)."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self._sends_result: Sends | None = None

    def checks(self) -> list[Check]:
        """Every check of the run, in the order they are reported."""
        return [
            self._check_agreement(),
            self._check_connections(),
            self._check_exactly_once(),
            self._check_sends(),
            self._check_rss(),
            self._check_clean(),
        ]

    def _check_agreement(self) -> Check:
        soak = self.soak
        opts = soak.options
        agreement = soak.agreement
        timed = [a for a in soak.actions if a.agreed_after_s is not None]
        late = [a for a in soak.actions if a.agreed_after_s is None]
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
            *(f"status failed: {f}" for f in soak.status_failures),
            *(f"{a.kind} of {a.member}: no agreement within {opts.settle_limit_s} s" for a in late),
            *(f"{a.kind} of {a.member}: agreement after {a.agreed_after_s:.2f} s" for a in over),
        ]
        if soak.initial_agreement_s is None:
            details.insert(0, "the fleet never agreed after starting")
        if soak.final_agreement_s is None and soak.t0:
            details.insert(0, "the fleet never agreed after the chaos ended")
        ok = not details and bool(soak.actions)
        if not soak.actions:
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
            + f"; {agreement.statuses} statuses in {soak.rounds} poll rounds (slowest round "
            f"{soak.round_worst_s:.2f} s, slowest status {soak.status_worst_s * 1000:.0f} ms), "
            f"longest disagreement {agreement.longest_s:.2f} s, "
            f"{len(agreement.violations)} beyond the bound, {len(soak.status_failures)} "
            f"status failures; fleet agreed {seconds_text(soak.initial_agreement_s)} after start "
            f"({soak.startup_disagreements} slow pairs while all started at once, not counted), "
            f"{seconds_text(soak.final_agreement_s)} after the chaos"
        )
        return Check("registry agrees with the processes", ok, summary, details)

    def _check_connections(self) -> Check:
        soak = self.soak
        d = soak.duplicates
        ok = not d.violations and d.samples > 0
        summary = (
            f"{d.samples} samples of /proc/net/tcp; most connections between one pair at once "
            f"{d.most_at_once}; {d.episodes} transient duplicates (longest {d.longest_s:.2f} s, "
            f"grace {soak.options.duplicate_grace_s:.2f} s); "
            f"{len(d.violations)} beyond the grace"
        )
        return Check("one connection per pair", ok, summary, list(d.violations))

    def _check_exactly_once(self) -> Check:
        soak = self.soak
        handled = {m.ip: read_log_lines(m.proc.state_dir / "handled.log") for m in soak.members}
        acked = {m.ip: read_log_lines(m.proc.state_dir / "acked.log") for m in soak.members}
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
        soak = self.soak
        if self._sends_result is None:
            logs = {m.ip: m.proc.state_dir for m in soak.members}
            self._sends_result = check_sends(
                {ip: read_log_lines(state / "sent.log") for ip, state in logs.items()},
                {ip: read_log_lines(state / "received.log") for ip, state in logs.items()},
                soak.faults,
                soak.options.send_loss_window_s,
                origin=soak.t0,
                starts=soak.starts,
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
        soak = self.soak
        limit = soak.options.rss_limit_bytes
        details: list[str] = []
        parts: list[str] = []
        ok = bool(soak.rss)
        for name, samples in sorted(soak.rss.items()):
            # The medians of the first samples after the warm-up and of the last ones.
            after = samples_since(samples, soak.baseline_from)
            base = after[:RSS_SAMPLES]
            final = samples_since(samples, soak.final_from)[:RSS_SAMPLES]
            if len(base) < RSS_SAMPLES or len(final) < RSS_SAMPLES or len(after) <= len(base):
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
            "; ".join(parts) or ("no figures" if soak.rss else "no survivors")
        ) + f"; limit {limit / 1e6:.1f} MB, baseline after {soak.options.warmup:.0f} s warm-up"
        return Check("survivors' RSS flat", ok, summary, details)

    def _check_clean(self) -> Check:
        soak = self.soak
        tracebacks = []
        for m in soak.members:
            if any("Traceback" in line for line in read_log_lines(m.proc.log_path)):
                tracebacks.append(f"{m.name}: traceback in {m.proc.log_path}")
        bad_exits = [
            f"{name} exited {code} on SIGTERM"
            for name, code in sorted(soak.exit_codes.items())
            if code != 0
        ]
        details = [*soak.process_troubles, *soak.start_failures, *bad_exits, *tracebacks]
        starts = sum(m.proc.starts for m in soak.members)
        summary = (
            f"{starts} process starts; {len(soak.exit_codes)} nodes exited on SIGTERM at the end, "
            f"{sum(1 for c in soak.exit_codes.values() if c == 0)} with status 0; "
            f"{soak.graceful_exits[True]} of {sum(soak.graceful_exits.values())} restarts by "
            f"SIGTERM exited 0; {len(soak.process_troubles)} unexpected exits or signals not "
            f"obeyed, {len(soak.start_failures)} failed starts, {len(tracebacks)} logs with a "
            "traceback"
        )
        return Check("clean exits, no crashes", not details, summary, details)

    def summary(self, checks: Sequence[Check]) -> dict[str, Any]:
        """The run's figures and verdicts, as JSON-ready data."""
        soak = self.soak
        kinds = Counter(a.kind for a in soak.actions)
        return {
            "nodes": soak.options.nodes,
            "duration_s": round(soak.chaos_s, 1),
            "seed": soak.seed,
            "workdir": str(soak.workdir),
            "actions": dict(kinds),
            "agreement_s": [a.agreed_after_s for a in soak.actions],
            "action_log": [
                {
                    "t_s": round(a.issued_at - soak.t0, 3),
                    "kind": a.kind,
                    "node": a.member,
                    "agreed_after_s": a.agreed_after_s,
                }
                for a in soak.actions
            ],
            "bound_s": soak.options.bound_s,
            "sends": self._send_figures(),
            # Every tenth sample: enough to see a trend.
            "rss_bytes": {
                name: [[round(t - soak.t0, 1), b] for t, b in samples[::10]]
                for name, samples in sorted(soak.rss.items())
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
        soak = self.soak
        kinds = Counter(a.kind for a in soak.actions)
        soak.say("")
        soak.say(
            f"== soak summary: {soak.options.nodes} nodes, {soak.chaos_s:.0f} s of chaos, "
            f"seed {soak.seed} =="
        )
        soak.say(
            f"actions: {len(soak.actions)} ("
            + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
            + ")"
        )
        for check in checks:
            soak.say(f"{'PASS' if check.ok else 'FAIL'} {check.name}: {check.summary}")
            for detail in check.details[:_MAX_LISTED]:
                soak.say(f"    {detail}")
            if len(check.details) > _MAX_LISTED:
                soak.say(f"    ... and {len(check.details) - _MAX_LISTED} more")
        held = sum(1 for c in checks if c.ok)
        verdict = "PASS" if held == len(checks) else "FAIL"
        soak.say(f"result: {verdict} ({held} of {len(checks)} checks held)")


def _mb(count: float) -> str:
    return f"{count / 1e6:.2f}"
