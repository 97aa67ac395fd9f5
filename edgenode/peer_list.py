"""The configured peers, checked as a node will dial them: one per IP, never itself.

Used by ``edgenode run``'s settings (edgenode.settings) and by
:class:`~edgenode.node.Node` for a configuration built in Python, so both
accept and refuse exactly the same peer lists.
"""

from __future__ import annotations

import errno
import logging
import socket

from .config import NodeConfig
from .errors import ConfigError, EdgeNodeError
from .ips import normalise_ip

log = logging.getLogger("edgenode.settings")


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_WILDCARDS = ("0.0.0.0", "::", "")


def check_peers(
    config: NodeConfig, *, where: str = "peers"
) -> tuple[list[tuple[str, int]], list[str]]:
    """Check ``config.peers``; return them one per IP, and warnings about the rest.

    Peers are keyed by IP address, so of two entries with one IP only the
    last counts (the registry would replace the first with it): it is kept,
    in its place, and a warning says so. ``where`` (the setting, and the
    file or flag it came from) heads the messages.

    Raises :class:`ConfigError` for a peer that is this node: its listen
    address, or, on a wildcard listener, an address of this host at the
    node's own port. A host name is passed over here (it is resolved when
    dialled).
    """
    kept: dict[str, tuple[str, int]] = {}
    warnings = []
    for host, port in config.peers:
        key = _ip_or_none(host) or host.strip().lower()
        earlier = kept.pop(key, None)
        if earlier == (host, port):
            warnings.append(f"{where}: {host_port(host, port)} is listed twice")
        elif earlier is not None:
            warnings.append(
                f"{where}: {host_port(*earlier)} and {host_port(host, port)} are one peer "
                f"(peers are keyed by ip address): using {host_port(host, port)}, the last"
            )
        kept[key] = (host, port)
    peers = list(kept.values())
    for host, port in peers:
        _refuse_ourselves(config, host, port, where)
    return peers, warnings


def _refuse_ourselves(config: NodeConfig, host: str, port: int, where: str) -> None:
    ip = _ip_or_none(host)
    if ip is None:
        return
    listen = host_port(config.listen_host, config.listen_port)
    peer = host_port(host, port)
    if config.listen_host not in _WILDCARDS:
        if ip == _ip_or_none(config.listen_host):
            raise ConfigError(
                f"{where}: {peer} is this node's own address (node.listen is {listen}); "
                "list the other nodes"
            )
        return
    if port == config.listen_port and _is_local_address(ip):
        raise ConfigError(
            f"{where}: {peer} is this node itself: listening on {listen}, it is reachable at "
            f"every address of this host, {ip} included; list the other nodes"
        )


def _ip_or_none(host: str) -> str | None:
    try:
        return normalise_ip(host)
    except EdgeNodeError:
        return None


def _is_local_address(ip: str) -> bool:
    """Whether ``ip`` is an address of this host: whether a socket can be bound to it.

    Where the system lets any address be bound (``ip_nonlocal_bind``), that
    proves nothing, and the answer is False: the check is skipped rather
    than refuse a peer that may be another host.
    """
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    version = "ipv6" if family == socket.AF_INET6 else "ipv4"
    try:
        with open(f"/proc/sys/net/{version}/ip_nonlocal_bind", "rb") as flag:
            if flag.read().strip() not in (b"", b"0"):
                return False
    except OSError:
        pass  # not Linux, or no such setting: binding tells
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL):
                log.debug("cannot tell whether %s is an address of this host: %s", ip, exc)
            return False
    return True
