"""What a soak run is told: :class:`SoakOptions`, and the bounds its checks derive from them.

:mod:`edgenode.testing.soak` builds them from its command line;
:class:`~edgenode.testing.soak_runner.Soak` runs by them and
:class:`~edgenode.testing.soak_verdict.Verdict` judges by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: RSS drift allowed for the survivors (2 MB, decimal).
RSS_LIMIT_BYTES = 2_000_000
#: RSS samples whose median is the baseline, and the final figure.
RSS_SAMPLES = 5


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
