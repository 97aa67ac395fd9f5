"""Who may use the control socket: peer credentials, not only the file mode (issue 15, item 2).

The node in these tests runs as root (the test process). A real second
user, and a real group, are made with ``useradd``/``groupadd`` for each
test and removed after it; a client runs as that user in its own process
(a short stdlib-only script, so any Python the user may run will do). Where
that is impossible (not root, no useradd, not Linux) the tests say why and
skip; the pure checks of :class:`ControlAccess` run everywhere.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from edgenode.config import NodeConfig
from edgenode.control import serve_control
from edgenode.control_access import ControlAccess, PeerCredentials, peer_credentials
from edgenode.control_client import NoNodeRunning, control_request
from edgenode.errors import ConfigError
from edgenode.node import Node
from edgenode.settings import resolve

from .conftest import wait_until

pytestmark = pytest.mark.anyio

CLIENT_TIMEOUT_S = 20.0

# What `edgenode status` does, in the standard library only: another user
# may not be able to import edgenode's dependencies from this environment.
CLIENT = r"""
import json, socket, sys
path, count = sys.argv[1], int(sys.argv[2])
for _ in range(count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    try:
        sock.sendall(b'{"op": "status"}\n')
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused as it connected: the answer is waiting
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    print(data.split(b"\n")[0].decode())
"""


class User:
    """A real local user (and its own primary group), removed afterwards."""

    def __init__(self, name: str) -> None:
        import pwd

        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid
        self.python = _python_for(self)


def _cannot_make_users() -> str | None:
    if not sys.platform.startswith("linux"):
        return "SO_PEERCRED is Linux's: elsewhere the socket's file mode alone guards it"
    if os.geteuid() != 0:
        return "making a second user needs root (useradd)"
    for tool in ("useradd", "userdel", "groupadd", "groupdel"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


class Accounts:
    """Real users and groups made for one test; :meth:`remove` deletes them all."""

    def __init__(self) -> None:
        self.made: list[tuple[str, str]] = []  # (the del command, name), newest last

    def user(self, groups: tuple[str, ...] = ()) -> User:
        """A new system user with a primary group of its own, and ``groups`` besides."""
        name = f"en15-{uuid.uuid4().hex[:10]}"
        command = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        if groups:
            command += ["--groups", ",".join(groups)]
        _run(*command, "--user-group", name)
        self.made.append(("userdel", name))
        return User(name)

    def group(self) -> tuple[str, int]:
        """(name, gid) of a new system group."""
        import grp

        name = f"en15g-{uuid.uuid4().hex[:10]}"
        _run("groupadd", "--system", name)
        self.made.append(("groupdel", name))
        return name, grp.getgrnam(name).gr_gid

    def remove(self) -> None:
        # Users first: a group is not removed while it is a user's primary group.
        for command, name in reversed(self.made):
            subprocess.run([command, name], capture_output=True, timeout=30, check=False)


@pytest.fixture
def accounts() -> Iterator[Accounts]:
    """Real users and groups (root only; skipped with the reason elsewhere)."""
    reason = _cannot_make_users()
    if reason is not None:
        pytest.skip(reason)
    made = Accounts()
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may pass through (mode 0711), for the control socket."""
    path = Path(tempfile.mkdtemp(prefix="en-acc-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _python_for(user: User) -> str:
    """An interpreter ``user`` may run (ours may live under a private home)."""
    for python in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not python:
            continue
        try:
            probe = subprocess.run(
                [python, "-c", "pass"],
                user=user.uid,
                group=user.gid,
                extra_groups=[],
                capture_output=True,
                timeout=30,
                check=False,
            )
        except OSError:  # not there, or not for this user
            continue
        if probe.returncode == 0:
            return python
    pytest.skip(f"no python interpreter that user {user.name} may run")


async def status_as(
    user: User, path: Path, *, count: int = 1, groups: tuple[int, ...] = ()
) -> list[dict[str, Any]]:
    """Ask the node on ``path`` for its status ``count`` times, as ``user``; the answers."""
    # In a worker thread, not anyio.run_process: with extra_groups, that
    # fails on Python 3.9 (anyio 4.12) with a TypeError inside Popen.
    command = [user.python, "-c", CLIENT, str(path), str(count)]
    result = await anyio.to_thread.run_sync(
        functools.partial(
            subprocess.run,
            command,
            user=user.uid,
            group=user.gid,
            extra_groups=list(groups),
            capture_output=True,
            timeout=CLIENT_TIMEOUT_S,
            check=False,
        )
    )
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


@asynccontextmanager
async def serving(make_config: Any, path: Path, **overrides: Any) -> AsyncIterator[Node]:
    async with Node(make_config("a", "127.0.0.2", **overrides)) as node:
        async with anyio.create_task_group() as tg:
            await tg.start(serve_control, node, path)
            yield node
            tg.cancel_scope.cancel()


async def ask_status(path: Path) -> dict[str, Any]:
    """``edgenode status``'s request, as this process's user (root), off the event loop."""
    return await anyio.to_thread.run_sync(control_request, path, {"op": "status"})


def _refused_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "edgenode.control" and "refused" in r.getMessage()
    ]


# -- with a real second user ---------------------------------------------------------


async def test_control_socket_refuses_another_user_even_if_its_mode_was_widened(
    make_config: Any, accounts: Accounts, open_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgenode.control")
    other = accounts.user()
    path = open_dir / "control.sock"
    async with serving(make_config, path):
        path.chmod(0o666)  # the mistake: every local user may connect now
        [answer] = await status_as(other, path)
        # We (root, and the node's own user) still may.
        assert (await ask_status(path))["ok"] is True
    assert answer["ok"] is False
    pid = answer["error"].split("(pid ")[1].split(")")[0]
    assert answer["error"] == (
        f"uid {other.uid} (pid {pid}) may not use this node's control socket: expected root"
    )
    assert answer["type"] == "NotPermitted"
    assert _refused_lines(caplog) == [
        f"control socket {path}: refused control connection from uid {other.uid}: "
        f"pid {pid} may not use this node's control socket: expected root"
    ]


async def test_control_socket_rations_its_log_of_refused_users(
    make_config: Any, accounts: Accounts, open_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A local user looping on the socket must not fill the journal either.
    caplog.set_level(logging.INFO, logger="edgenode.control")
    other = accounts.user()
    path = open_dir / "control.sock"
    summary = re.compile(
        rf"control socket {re.escape(str(path))}: refused (\d+) more control connections? "
        rf"in \d+\.\d s from 1 user: \d+ pid \d+ may not use this node's control socket: "
        rf"expected root; "
        rf"most from uid {other.uid} \(\d+\)"
    )

    def lines() -> tuple[list[str], list[int]]:
        """(lines of their own, refusals each summary covered)."""
        all_lines = _refused_lines(caplog)
        singles = [line for line in all_lines if " refused control connection from " in line]
        counts = [int(m.group(1)) for m in map(summary.fullmatch, all_lines) if m]
        assert len(singles) + len(counts) == len(all_lines), all_lines
        return singles, counts

    async with serving(make_config, path):
        path.chmod(0o666)
        started = time.monotonic()
        answers = await status_as(other, path, count=30)
        assert all(a["type"] == "NotPermitted" for a in answers)
        # Every refusal is in one line: its own or a summary's count.
        await wait_until(lambda: len(lines()[0]) + sum(lines()[1]) == 30)
        elapsed = time.monotonic() - started
        assert (await ask_status(path))["ok"] is True
    singles, counts = lines()
    # The burst of five (and one more per 10 s), then summaries, at most one a second.
    assert 5 <= len(singles) <= 5 + elapsed / 10 + 1, singles
    assert 1 <= len(counts) <= elapsed + 1, counts


async def test_control_group_members_may_use_the_socket(
    make_config: Any, accounts: Accounts, open_dir: Path
) -> None:
    group, gid = accounts.group()
    member = accounts.user(groups=(group,))  # a supplementary group (SO_PEERGROUPS)
    outsider = accounts.user()
    path = open_dir / "control.sock"
    async with serving(make_config, path, control_group=group) as node:
        st = path.stat()
        assert (st.st_gid, st.st_mode & 0o777) == (gid, 0o660)
        [as_member] = await status_as(member, path, groups=(gid,))
        assert as_member["ok"] is True and as_member["node"]["node_id"] == node.node_id
        path.chmod(0o666)  # the file mode no longer keeps the outsider out
        [as_outsider] = await status_as(outsider, path)
    assert as_outsider["ok"] is False
    assert as_outsider["error"].endswith(
        f"may not use this node's control socket: expected root and members of group "
        f"{gid} ({group})"
    ), as_outsider["error"]


async def test_control_group_as_primary_group_is_enough(
    make_config: Any, accounts: Accounts, open_dir: Path
) -> None:
    user = accounts.user()  # its own primary group, which it alone is in
    path = open_dir / "control.sock"
    async with serving(make_config, path, control_group=user.gid):
        [answer] = await status_as(user, path)
    assert answer["ok"] is True


# -- without a second user ----------------------------------------------------------


def test_peer_credentials_are_the_connecting_process_s() -> None:
    if not hasattr(socket, "SO_PEERCRED"):
        pytest.skip("SO_PEERCRED is Linux's")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        peer = peer_credentials(ours)
    assert peer is not None
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    if peer.groups is not None:  # Linux 4.13 and later
        assert set(peer.groups) == set(os.getgroups())


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        (PeerCredentials(10, 0, 0, ()), True),  # root
        (PeerCredentials(10, 1000, 1000, ()), True),  # the node's own user
        (PeerCredentials(10, 1001, 900, ()), True),  # the group, as primary group
        (PeerCredentials(10, 1001, 1001, (5, 900)), True),  # the group, supplementary
        (PeerCredentials(10, 1001, 1001, (5, 6)), False),
        (PeerCredentials(10, 1001, 1001, None), False),  # groups unknown: primary only
    ],
)
def test_control_access_allows_root_the_node_s_user_and_its_group(
    peer: PeerCredentials, allowed: bool
) -> None:
    access = ControlAccess(1000, 900, "edgenode")
    refusal = access.refusal(peer)
    if allowed:
        assert refusal is None
    else:
        assert refusal == (
            "may not use this node's control socket: expected root and uid 1000 "
            "(the node's own user) and members of group 900 (edgenode)"
        )


def test_control_access_without_a_group_names_root_and_the_node_s_user() -> None:
    assert ControlAccess(1000).refusal(PeerCredentials(7, 1001, 1001, ())) == (
        "may not use this node's control socket: expected root and uid 1000 "
        "(the node's own user)"
    )
    assert ControlAccess(0).refusal(PeerCredentials(7, 1001, 1001, ())) == (
        "may not use this node's control socket: expected root"
    )


def test_config_rejects_a_control_group_that_does_not_exist() -> None:
    with pytest.raises(ConfigError) as info:
        NodeConfig(control_group="no-such-group-en15").validate()
    assert str(info.value) == (
        "control_group: expected a group of this system (getent group), "
        "got 'no-such-group-en15'"
    )
    with pytest.raises(ConfigError) as info:
        NodeConfig(control_group=4_000_000_000).validate()
    assert str(info.value) == (
        "control_group: expected a group of this system (getent group), got 4000000000"
    )


def test_config_file_takes_a_control_group_by_name_or_number(tmp_path: Path) -> None:
    import grp

    root_group = grp.getgrgid(0).gr_name
    config = tmp_path / "edgenode.toml"
    config.write_text(f'[node]\ncontrol_group = "{root_group}"\n')
    assert resolve(config_file=config).config.control_group == root_group
    config.write_text("[node]\ncontrol_group = 0\n")
    assert resolve(config_file=config).config.control_group == 0
    config.write_text("[node]\ncontrol_group = true\n")
    with pytest.raises(ConfigError) as info:
        resolve(config_file=config)
    assert str(info.value) == (
        f"{config}: node.control_group: expected a group name or number, got true"
    )


async def test_control_socket_refuses_to_start_when_its_group_is_gone(
    make_config: Any, accounts: Accounts, open_dir: Path
) -> None:
    # The configuration was checked when the node was made; the group was
    # removed before the control socket started.
    group, gid = accounts.group()
    node = Node(make_config("a", "127.0.0.2", control_group=gid))
    subprocess.run(["groupdel", group], check=True, capture_output=True, timeout=30)
    path = open_dir / "control.sock"
    async with node:
        async with anyio.create_task_group() as tg:
            with pytest.raises(ConfigError) as info:
                await tg.start(serve_control, node, path)
    assert str(info.value) == (
        f"control_group: expected a group of this system (getent group), got {gid}"
    )
    assert not path.exists()
    with pytest.raises(NoNodeRunning):
        control_request(path, {"op": "status"})
