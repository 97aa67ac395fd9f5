"""``edgenode authorise`` and ``revoke`` on a running node, and SIGHUP.

Real ``edgenode run`` processes on loopback, watched through their logs
(the helpers of tests/test_cli.py). Node A (127.0.0.2) starts without
trusting B (127.0.0.3), which dials it and trusts A.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from edgenode.trust import add_authorised, remove_authorised

from .test_cli import (
    NOT_RUNNING,
    StartNode,
    assert_one_error_line,
    edgenode,
    free_port,
    keygen,
    start_node,
)

__all__ = ["start_node"]  # the fixture, for pytest

pytestmark = pytest.mark.timeout(120)


def _pair(tmp_path: Path, start_node: StartNode, *a_args: str) -> tuple[object, object, str, str]:
    a, b = tmp_path / "a", tmp_path / "b"
    a_id, b_id = keygen(tmp_path, a), keygen(tmp_path, b)
    assert edgenode(tmp_path, "authorise", "--state-dir", str(b), a_id).returncode == 0
    port = free_port("127.0.0.2", "127.0.0.3")
    node_a = start_node(
        "--state-dir",
        str(a),
        "--listen",
        f"127.0.0.2:{port}",
        "--keepalive-interval",
        "0.5",
        *a_args,
    )
    node_a.wait_for(rf"node {a_id} listening on ")
    node_b = start_node(
        "--state-dir",
        str(b),
        "--listen",
        f"127.0.0.3:{port}",
        "--peer",
        f"127.0.0.2:{port}",
        "--keepalive-interval",
        "0.5",
        "--backoff-cap",
        "0.5",
    )
    return node_a, node_b, a_id, b_id


def test_authorise_and_revoke_change_a_running_node_at_once(
    tmp_path: Path, start_node: StartNode
) -> None:
    node_a, node_b, a_id, b_id = _pair(tmp_path, start_node)
    a = str(tmp_path / "a")
    # B is refused, and told so.
    node_a.wait_for(rf"refused connection from 127\.0\.0\.3: node {b_id} is not authorised")
    node_b.wait_for(r"the peer refused this node: not authorised")

    result = edgenode(tmp_path, "authorise", "--state-dir", a, b_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"authorised: {b_id}\nthe running node accepts it now\n"
    node_a.wait_for(r"trust reloaded from .*: 1 authorised \(1 added, 0 removed\)")
    node_a.wait_for(rf"peer up 127\.0\.0\.3 \(node {b_id}, ")

    result = edgenode(tmp_path, "revoke", "--state-dir", a, b_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"revoked: {b_id}\nthe running node no longer trusts it\n"
    reason = f"node {b_id} is no longer authorised"
    node_a.wait_for(rf"127\.0\.0\.3 \(node {b_id}\).*: {reason}")
    node_b.wait_for(rf"peer down 127\.0\.0\.2 \(node {a_id}\): peer said bye: {reason}")
    assert (tmp_path / "a" / "authorised_nodes").read_text() == ""

    result = edgenode(tmp_path, "revoke", "--state-dir", a, b_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"not in the authorised nodes file: {b_id}\nthe running node no longer trusts it\n"
    )
    assert "Traceback" not in node_a.log() + node_b.log()


def test_sighup_rereads_the_file_and_a_bad_file_changes_nothing(
    tmp_path: Path, start_node: StartNode
) -> None:
    node_a, node_b, a_id, b_id = _pair(tmp_path, start_node)
    trust_file = tmp_path / "a" / "authorised_nodes"
    node_a.wait_for(rf"refused connection from 127\.0\.0\.3: node {b_id} is not authorised")
    add_authorised(trust_file, b_id)
    node_a.proc.send_signal(signal.SIGHUP)
    node_a.wait_for(rf"peer up 127\.0\.0\.3 \(node {b_id}, ")

    trust_file.write_text(f"{b_id}\nnot-a-node-id\n")
    node_a.proc.send_signal(signal.SIGHUP)
    node_a.wait_for(
        rf"SIGHUP: trust not reloaded, nothing changed: {trust_file}:2: node id 'not-a-node-id' "
    )
    status = edgenode(tmp_path, "status", "--json", "--state-dir", str(tmp_path / "a"))
    assert status.returncode == 0, status.stderr
    peers = json.loads(status.stdout)["peers"]
    assert [(p["ip"], p["state"]) for p in peers] == [("127.0.0.3", "up")]

    remove_authorised(trust_file.with_name("unused"), b_id)  # a missing file: nothing to do
    trust_file.write_text("")
    node_a.proc.send_signal(signal.SIGHUP)
    node_b.wait_for(rf"peer down 127\.0\.0\.2 \(node {a_id}\): peer said bye: node {b_id} is no ")
    assert node_a.stop(signal.SIGTERM) == 0, node_a.log()
    assert "Traceback" not in node_a.log()


def test_revoking_a_node_the_configuration_trusts_says_so(
    tmp_path: Path, start_node: StartNode
) -> None:
    b = tmp_path / "b"
    b_id = keygen(tmp_path, b)
    a = tmp_path / "a"
    a_id = keygen(tmp_path, a)
    assert edgenode(tmp_path, "authorise", "--state-dir", str(a), b_id).returncode == 0
    node_a = start_node("--state-dir", str(a), "--listen", "127.0.0.2:0", "--authorise", b_id)
    node_a.wait_for(rf"node {a_id} listening on ")
    result = edgenode(tmp_path, "revoke", "--state-dir", str(a), b_id)
    assert result.returncode == 1, result.stderr
    assert result.stdout == (
        f"revoked: {b_id}\nthe running node still trusts {b_id}: its configuration lists it "
        "(peers.authorised or --authorise)\n"
    )


def test_authorise_and_revoke_without_a_running_node(tmp_path: Path) -> None:
    other = keygen(tmp_path, tmp_path / "other")
    state = str(tmp_path / "state")
    result = edgenode(tmp_path, "authorise", "--state-dir", state, other)
    assert (result.returncode, result.stdout) == (0, f"authorised: {other}\n{NOT_RUNNING}\n")
    result = edgenode(tmp_path, "revoke", "--state-dir", state, other)
    assert (result.returncode, result.stdout) == (0, f"revoked: {other}\n{NOT_RUNNING}\n")
    result = edgenode(tmp_path, "revoke", "--state-dir", state, "abcd")
    assert_one_error_line(result, 2, r"^error: node id 'abcd' should be 28 base32 characters")
