"""A real link cut silently: two node processes in network namespaces, a veth between.

Taking the veth down sends nothing to either end: no FIN, no reset; bytes
just stop. Only keepalive can tell, on both sides; when the link comes back
they redial by themselves. Needs root (the ``netns_pair`` fixture skips
otherwise, saying so).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgenode.control_client import ControlError, control_request
from edgenode.identity import create_identity
from edgenode.testing import wait_for
from edgenode.testing.netns import NetnsError, NetnsPair, skip_reason

INTERVAL_S = 0.3
TIMEOUT_S = 1.2
HANDSHAKE_S = 1.0
BACKOFF_CAP_S = 0.5
KEEPALIVE = f"no frames for {TIMEOUT_S} s (keepalive timeout)"
MARGIN_S = 3.0  # slack for a busy machine; never a target
PORT = 7300  # each namespace has its own ports


class NodeInNamespace:
    """``edgenode run`` inside one side of the pair, asked for its status over its socket."""

    def __init__(self, pair: NetnsPair, side: str, state_dir: Path, argv: list[str]) -> None:
        self.state_dir = state_dir
        self.log_path = state_dir.parent / f"{side}.log"
        with open(self.log_path, "w") as log:
            self.proc = pair.popen(side, argv, stdout=log, stderr=subprocess.STDOUT)

    def peer(self, ip: str) -> dict[str, Any] | None:
        """This node's row for ``ip`` now, or None (no row, or not answering yet)."""
        try:
            status = control_request(self.state_dir / "control.sock", {"op": "status"})
        except ControlError:  # not listening yet
            return None
        rows = [row for row in status.get("peers", []) if row["ip"] == ip]
        return rows[0] if rows else None

    def state(self, ip: str) -> str | None:
        row = self.peer(ip)
        return None if row is None else row["state"]


def start(pair: NetnsPair, tmp_path: Path) -> tuple[NodeInNamespace, NodeInNamespace]:
    """Node a (dials b) and node b, each in its namespace, trusting each other."""
    ids = {side: create_identity(tmp_path / side).node_id for side in ("a", "b")}
    nodes = []
    for side, other in (("a", "b"), ("b", "a")):
        argv = [
            sys.executable, "-m", "edgenode", "run",
            "--state-dir", str(tmp_path / side),
            "--listen", f"{pair.side(side).ip}:{PORT}",
            "--authorise", ids[other],
            "--keepalive-interval", str(INTERVAL_S),
            "--keepalive-timeout", str(TIMEOUT_S),
            "--handshake-timeout", str(HANDSHAKE_S),
            "--backoff-cap", str(BACKOFF_CAP_S),
        ]  # fmt: skip
        if side == "a":
            argv += ["--peer", f"{pair.b.ip}:{PORT}"]
        nodes.append(NodeInNamespace(pair, side, tmp_path / side, argv))
    return nodes[0], nodes[1]


def test_link_cut_silently_is_noticed_by_keepalive_and_heals(
    netns_pair: NetnsPair, tmp_path: Path
) -> None:
    a, b = start(netns_pair, tmp_path)
    a_sees, b_sees = netns_pair.b.ip, netns_pair.a.ip

    def both(state: str) -> bool:
        return a.state(a_sees) == state and b.state(b_sees) == state

    wait_for(lambda: both("up"), 15, "both nodes up")  # start-up included

    netns_pair.cut()
    wait_for(lambda: both("down"), TIMEOUT_S + MARGIN_S, "both nodes seeing the other down")
    # Nothing was said: each side decided by keepalive.
    assert a.peer(a_sees)["down_reason"] == KEEPALIVE  # type: ignore[index]
    assert b.peer(b_sees)["down_reason"] == KEEPALIVE  # type: ignore[index]

    netns_pair.restore()
    wait_for(lambda: both("up"), HANDSHAKE_S + BACKOFF_CAP_S + MARGIN_S, "both nodes up again")

    # They carry on: pings round-trip on the new connection, both ways.
    def answered(node: NodeInNamespace, ip: str) -> bool:
        row = node.peer(ip)
        return bool(row and row["state"] == "up" and row["rtt_s"] is not None)

    wait_for(lambda: answered(a, a_sees) and answered(b, b_sees), MARGIN_S, "pings answered")
    assert a.proc.poll() is None and b.proc.poll() is None


def test_netns_pair_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError) as caught:
        NetnsPair("192.168.1.0")
    assert str(caught.value) == (
        "subnet: expected the first address of a /30 in 10.0.0.0/8, got '192.168.1.0'"
    )
    pair = NetnsPair("10.77.0.4")
    assert (pair.a.ip, pair.b.ip) == ("10.77.0.5", "10.77.0.6")
    with pytest.raises(ValueError) as caught:
        pair.side("c")
    assert str(caught.value) == "side: expected 'a' or 'b', got 'c'"
    with pytest.raises(NetnsError) as error:
        pair.popen("a", ["true"])
    assert str(error.value) == "the namespaces are not created (use create() or a with block)"


def test_netns_pair_cleans_up_after_itself() -> None:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetnsPair() as pair:
        names = (pair.a.name, pair.b.name)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(name in listed for name in names)
        sleeper = pair.popen("a", [sys.executable, "-c", "import time; time.sleep(60)"])
    assert sleeper.poll() == -9
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
