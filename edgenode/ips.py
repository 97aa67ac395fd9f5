"""IP addresses as the node keys peers by them: one spelling per address.

Pure: parsing only, no resolver (host names are edgenode.names' job).
"""

from __future__ import annotations

import functools
import ipaddress

from .errors import InvalidAddress

_MAX_SHOWN_CHARS = 64


def normalise_ip(text: str) -> str:
    """Return the registry key for an IP address written as ``text``.

    An IPv4-mapped IPv6 address becomes the IPv4 address, IPv6 addresses
    are compressed and lowercase, and surrounding brackets and an IPv6
    ``%zone`` are dropped. Raises :class:`InvalidAddress` for anything that is
    not an IP address.
    """
    if not isinstance(text, str):
        raise InvalidAddress(f"invalid ip address {_shown(text)}")
    return _normalise_text(text)


# Cached (bounded): every send and registry lookup goes through here, and
# parsing the address each time was a quarter of the send path's time.
@functools.lru_cache(maxsize=1024)
def _normalise_text(text: str) -> str:
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        host = host.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidAddress(f"invalid ip address {_shown(text)}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IP address (as :func:`normalise_ip` reads it)."""
    try:
        normalise_ip(text)
    except InvalidAddress:
        return False
    return True


def ip_sort_key(ip: str) -> tuple[int, int]:
    """Return ``(version, integer value)`` of ``ip``: a total order over v4 and v6.

    Every IPv4 address sorts below every IPv6 address. Raises
    :class:`InvalidAddress` for an invalid address.
    """
    address = ipaddress.ip_address(normalise_ip(ip))
    return (address.version, int(address))


def _shown(value: object) -> str:
    text = repr(value)
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[:_MAX_SHOWN_CHARS] + "..."
    return text
