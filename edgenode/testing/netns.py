"""Two network namespaces joined by a veth pair: a real link to cut silently.

A proxy closes or black-holes connections; a real link that goes down does
neither. Nothing tells either end: no FIN, no reset, sends are queued and
retransmitted into the void. That is the failure keepalive exists for, and
:class:`NetnsPair` makes it on one machine:

    namespace A (10.77.0.1/30, dev veth-a) <== veth ==> namespace B (10.77.0.2/30, dev veth-b)

Programs run inside with ``ip netns exec`` (:meth:`NetnsPair.popen`). The
link is cut with ``ip link set veth-a down`` (:meth:`NetnsPair.cut`) and
restored with :meth:`NetnsPair.restore`. The namespaces are private
networks: only their own two addresses can be reached from inside.

Needs root and iproute2; :func:`skip_reason` says why it cannot run, for a
``pytest.skip``. Everything is cleaned up on :meth:`NetnsPair.close` (also
on leaving a ``with`` block and at interpreter exit), and namespaces that a
killed test run left behind are removed when the next pair is made.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from edgenode.errors import EdgeNodeError, InvalidArgument

A = "a"
B = "b"
BOTH = "both"

_PREFIX = "edgenode-"
# edgenode-<pid>-<n>-a: the pid says whether the run that made it is alive.
_NAME = re.compile(r"^edgenode-(\d+)-\d+-[ab]$")
_counter = itertools.count()
_open: set[NetnsPair] = set()
_IP_TIMEOUT_S = 10.0


class NetnsError(EdgeNodeError):
    """A network namespace or its link could not be made or changed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise NetnsError("iproute2's ip command is not installed") from None
    if check and done.returncode != 0:
        detail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise NetnsError(f"ip {' '.join(args)}: {detail[0]}")
    return done


def skip_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``), or None if they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (run the tests as root to include this)"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's ip command, which is not installed"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces left by runs that died before cleaning up; return their names."""
    listed = _ip("netns", "list", check=False).stdout
    removed = []
    for line in listed.splitlines():
        name = line.split(" ", 1)[0]
        match = _NAME.match(name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


class Namespace:
    """One side of a :class:`NetnsPair`: its name, address and device."""

    def __init__(self, name: str, ip: str, dev: str) -> None:
        self.name = name
        self.ip = ip
        self.dev = dev

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def __repr__(self) -> str:
        return f"<Namespace {self.name} {self.ip} dev {self.dev}>"


class NetnsPair:
    """Two namespaces ``a`` and ``b`` joined by a veth pair, addresses ``a.ip`` and ``b.ip``.

    ``subnet`` is the /30 the link uses (10.77.0.0 gives 10.77.0.1 and
    10.77.0.2). Use as a context manager, or :meth:`create` and :meth:`close`.
    """

    def __init__(self, subnet: str = "10.77.0.0") -> None:
        match = re.fullmatch(r"10\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})", subnet)
        if not match or any(int(g) > 255 for g in match.groups()) or int(match.group(3)) % 4:
            raise InvalidArgument(
                f"subnet: expected the first address of a /30 in 10.0.0.0/8, got {subnet!r}"
            )
        base = f"10.{match.group(1)}.{match.group(2)}."
        last = int(match.group(3))
        stem = f"{_PREFIX}{os.getpid()}-{next(_counter)}"
        self.a = Namespace(f"{stem}-a", f"{base}{last + 1}", "veth-a")
        self.b = Namespace(f"{stem}-b", f"{base}{last + 2}", "veth-b")
        self.cut_sides: set[str] = set()
        self._procs: list[subprocess.Popen[Any]] = []
        self._created = False

    # -- lifecycle -------------------------------------------------------------------

    def create(self) -> NetnsPair:
        """Make both namespaces and the link, up. Raises :class:`NetnsError`."""
        if self._created:
            return self
        reason = skip_reason()
        if reason is not None:
            raise NetnsError(reason)
        remove_stale()
        self._created = True
        _open.add(self)
        try:
            a, b = self.a, self.b
            _ip("netns", "add", a.name)
            _ip("netns", "add", b.name)
            _ip(
                "link", "add", a.dev, "netns", a.name, "type", "veth",
                "peer", "name", b.dev, "netns", b.name,
            )  # fmt: skip
            for side in (a, b):
                _ip("-n", side.name, "addr", "add", f"{side.ip}/30", "dev", side.dev)
                _ip("-n", side.name, "link", "set", "lo", "up")
                _ip("-n", side.name, "link", "set", side.dev, "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill what runs inside (SIGKILL) and delete both namespaces. Idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        if self._created:
            self._created = False
            _open.discard(self)
            for side in (self.a, self.b):
                _ip("netns", "del", side.name, check=False)

    def __enter__(self) -> NetnsPair:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "created" if self._created else "closed"
        cut = f", cut at {sorted(self.cut_sides)}" if self.cut_sides else ""
        return f"<NetnsPair {self.a.ip} <-> {self.b.ip} {state}{cut}>"

    # -- running things inside ---------------------------------------------------------

    def side(self, name: str) -> Namespace:
        """``a`` or ``b``."""
        if name == A:
            return self.a
        if name == B:
            return self.b
        raise InvalidArgument(f"side: expected {A!r} or {B!r}, got {name!r}")

    def popen(self, side: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside namespace ``side`` (a Popen; killed on :meth:`close`).

        ``ip netns exec`` replaces itself with ``argv``: the Popen's pid is the program's.
        """
        if not self._created:
            raise NetnsError("the namespaces are not created (use create() or a with block)")
        proc = subprocess.Popen(self.side(side).command(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self, side: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside namespace ``side`` to the end (``subprocess.run``)."""
        if not self._created:
            raise NetnsError("the namespaces are not created (use create() or a with block)")
        return subprocess.run(self.side(side).command(argv), check=False, **kwargs)

    # -- the fault ---------------------------------------------------------------------

    def _sides(self, side: str) -> list[Namespace]:
        return [self.a, self.b] if side == BOTH else [self.side(side)]

    def cut(self, side: str = A) -> None:
        """Take the link down at ``side`` (``a``, ``b`` or ``both``): silently.

        Connections across it get no FIN and no reset; their bytes vanish.
        New connections from the cut side fail at once (no route); from the
        other side, they time out.
        """
        for ns in self._sides(side):
            _ip("-n", ns.name, "link", "set", ns.dev, "down")
            self.cut_sides.add(ns.name[-1])

    def restore(self, side: str = BOTH) -> None:
        """Bring the link up again at ``side`` (routes come back with it)."""
        for ns in self._sides(side):
            _ip("-n", ns.name, "link", "set", ns.dev, "up")
            self.cut_sides.discard(ns.name[-1])


@atexit.register
def _close_all() -> None:
    for pair in list(_open):
        pair.close()
