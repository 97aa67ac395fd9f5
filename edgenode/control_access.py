"""Who may use the control socket: the connecting process's credentials, as the kernel saw them.

The control socket's file mode (0600, or 0660 for ``control_group``) is
the first guard; this is the second, so that a mode widened by mistake
does not open the node to every local user. ``SO_PEERCRED`` gives the
connecting process's pid, uid and gid as they were at ``connect()``, and
``SO_PEERGROUPS`` (Linux 4.13+) its supplementary groups; neither can be
forged by the client. :class:`ControlAccess` decides: root, the node's own
user and members of the configured group may use the socket.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import NamedTuple

from .config import resolve_group

# Linux's SO_PEERGROUPS (asm-generic value; Python's socket module lacks the
# name). getsockopt takes at most 1024 bytes: 256 groups.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_PEER_GROUPS_BYTES = 1024
_UCRED = struct.Struct("3i")


class PeerCredentials(NamedTuple):
    """Who is on the other end of a unix socket, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    #: Supplementary groups, or None where the kernel cannot tell (before 4.13).
    groups: tuple[int, ...] | None


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """The credentials of the process that connected ``sock``, or None off Linux.

    Raises OSError if the socket cannot be asked (it was closed).
    """
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    groups: tuple[int, ...] | None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _PEER_GROUPS_BYTES)
    except OSError:  # an older kernel, or more than 256 groups
        groups = None
    else:
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return PeerCredentials(pid, uid, gid, groups)


class ControlAccess:
    """Who may use the control socket: root, ``uid`` and members of ``gid``, if given."""

    __slots__ = ("gid", "group_name", "uid")

    def __init__(self, uid: int, gid: int | None = None, group_name: str | None = None) -> None:
        self.uid = uid
        self.gid = gid
        self.group_name = group_name

    @classmethod
    def for_config(cls, control_group: str | int | None) -> ControlAccess:
        """This process's user, and ``control_group`` resolved; raises :class:`ConfigError`."""
        if control_group is None:
            return cls(os.geteuid())
        gid, name = resolve_group(control_group, "control_group")
        return cls(os.geteuid(), gid, name)

    def refusal(self, peer: PeerCredentials) -> str | None:
        """Why ``peer`` may not use the socket (``"may not use ..."``), or None if it may."""
        if peer.uid in (0, self.uid):
            return None
        if self.gid is not None and (
            peer.gid == self.gid or (peer.groups is not None and self.gid in peer.groups)
        ):
            return None
        allowed = "root" if self.uid == 0 else f"root and uid {self.uid} (the node's own user)"
        if self.gid is not None:
            allowed += f" and members of group {self.gid} ({self.group_name})"
        return f"may not use this node's control socket: expected {allowed}"
