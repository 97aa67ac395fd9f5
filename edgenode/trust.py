"""Whom a node trusts: the node IDs it accepts and dials, changed while it runs.

Trust is the union of two lists: the IDs the configuration names
(``peers.authorised``, fixed for the life of the node) and the state
directory's ``authorised_nodes`` file, which ``edgenode authorise`` and
``edgenode revoke`` edit. The file is read when the node starts and again
on :meth:`Node.reload_trust <edgenode.node.Node.reload_trust>` (the
control socket's ``reload-trust`` op, and SIGHUP, which is what
``systemctl reload edgenode`` sends).

A reload that fails (a bad line, a file others can write) changes nothing:
the node keeps trusting what it trusted, and the caller gets the
:class:`~edgenode.errors.ConfigError`.

Everything that checks trust (the TLS handshake, learned and discovered
peers, the dispatcher admitting a connection) asks :meth:`Trust.allows`,
so a change is seen by the next check; connections of a node that is no
longer trusted are closed by the dispatcher (docs/architecture.md,
"Trust").
"""

from __future__ import annotations

import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, InvalidNodeId
from .identity import AUTHORISED_FILENAME, parse_node_id, write_atomic


@dataclass(frozen=True)
class TrustChange:
    """What a reload changed: node IDs now trusted, and no longer trusted."""

    added: frozenset[str]
    removed: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class Trust:
    """The node IDs a node trusts: configured ones plus its authorised-nodes file."""

    __slots__ = ("_fixed", "_ids", "path")

    def __init__(self, configured: frozenset[str] | None, path: str | os.PathLike[str]) -> None:
        self._fixed = frozenset(parse_node_id(i) for i in configured or ())
        self.path = path
        self._ids = self._fixed | load_authorised(path)

    @property
    def ids(self) -> frozenset[str]:
        """Every node ID trusted now."""
        return self._ids

    def allows(self, node_id: str) -> bool:
        """Whether ``node_id`` (canonical form) is trusted now."""
        return node_id in self._ids

    def read(self) -> frozenset[str]:
        """Read the file and return what trust would become (blocking I/O:
        run it off the event loop). Raises :class:`ConfigError` as
        :func:`load_authorised` does."""
        return self._fixed | load_authorised(self.path)

    def replace(self, ids: frozenset[str]) -> TrustChange:
        """Trust exactly ``ids`` from now on; return what changed."""
        before, self._ids = self._ids, ids
        return TrustChange(added=ids - before, removed=before - ids)


# -- the authorised-nodes file ------------------------------------------------


def authorised_path(state_dir: str | os.PathLike[str]) -> Path:
    """Return the default authorised-nodes file of a state directory."""
    return Path(state_dir) / AUTHORISED_FILENAME


def _read_authorised(path: Path) -> tuple[str, frozenset[str]]:
    try:
        with open(path, "rb") as f:
            # The mode of the file read, not of whatever the path names later.
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            raw = f.read()
    except FileNotFoundError:
        return "", frozenset()
    except OSError as exc:
        raise ConfigError(f"cannot read authorised nodes file {path}: {exc.strerror}") from None
    if mode & 0o022:
        raise ConfigError(
            f"authorised nodes file {path} is writable by others (mode {mode:04o}): they "
            f"could make this node trust anyone; run: chmod go-w {shlex.quote(str(path))}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not utf-8 text") from None
    ids = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            ids.add(parse_node_id(entry))
        except InvalidNodeId as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from None
    return text, frozenset(ids)


def load_authorised(path: str | os.PathLike[str]) -> frozenset[str]:
    """Return the canonical node IDs listed in an authorised-nodes file.

    One node ID per line; ``#`` starts a comment; blank lines are ignored. A
    missing file is an empty list. Raises :class:`ConfigError` naming the
    file and line of a bad entry, or for a file others can write.
    """
    return _read_authorised(Path(path))[1]


def add_authorised(path: str | os.PathLike[str], node_id: str) -> bool:
    """Append ``node_id`` to an authorised-nodes file unless it is listed.

    Rewrites the file atomically (temp file and rename), keeping its
    comments and its mode. Returns whether the ID was added. Raises
    :class:`InvalidNodeId` for a bad ID and :class:`ConfigError` for a bad
    or unwritable file.
    """
    target = Path(path)
    canonical = parse_node_id(node_id)
    text, ids = _read_authorised(target)
    if canonical in ids:
        return False
    if text and not text.endswith("\n"):
        text += "\n"
    _rewrite_authorised(target, text + canonical + "\n")
    return True


def remove_authorised(path: str | os.PathLike[str], node_id: str) -> bool:
    """Remove ``node_id`` from an authorised-nodes file.

    Drops each line that lists it (in any spelling ``parse_node_id``
    accepts), keeping the other lines, comments and the file's mode; the
    file is rewritten atomically. Returns whether the ID was listed.
    Raises as :func:`add_authorised` does.
    """
    target = Path(path)
    canonical = parse_node_id(node_id)
    text, ids = _read_authorised(target)
    if canonical not in ids:
        return False
    kept = [
        line
        for line in text.splitlines(keepends=True)
        if (entry := line.split("#", 1)[0].strip()) == "" or parse_node_id(entry) != canonical
    ]
    _rewrite_authorised(target, "".join(kept))
    return True


def _rewrite_authorised(target: Path, text: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = 0o644
    try:
        write_atomic(target, text.encode("utf-8"), mode)
    except OSError as exc:
        raise ConfigError(f"cannot write authorised nodes file {target}: {exc.strerror}") from None
