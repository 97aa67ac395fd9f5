"""Addresses the API takes: a peer by IP or node ID, a device as ``node/device``.

``split_address`` only parses (pure); turning a node ID into the IP it is
connected at takes the registry, and is the node's job.
"""

from __future__ import annotations

from .errors import EdgeNodeError, InvalidArgument
from .identity import parse_node_id
from .ips import normalise_ip
from .proto.messages import MAX_DEVICE_ID_BYTES

#: The node part of a device on this node's own ports, whatever its address.
LOCAL = "local"


def split_address(text: str) -> tuple[str, str | None]:
    """Split ``node`` or ``node/device`` into (node, device or None).

    ``node`` comes back as a normalised IP, a parsed node ID, or
    :data:`LOCAL`. Raises :class:`InvalidArgument` for anything else.
    """
    if not isinstance(text, str):
        raise InvalidArgument(f"peer: expected text, got {type(text).__name__}")
    node, slash, device = text.partition("/")
    if slash and (not device or len(device.encode()) > MAX_DEVICE_ID_BYTES):
        raise InvalidArgument(
            f"peer {text!r:.60}: device id should be 1..{MAX_DEVICE_ID_BYTES} bytes"
        )
    if slash and node == LOCAL:
        return LOCAL, device
    return _node(node, text), (device if slash else None)


def _node(node: str, text: str) -> str:
    try:
        return normalise_ip(node)
    except EdgeNodeError:
        pass
    try:
        return parse_node_id(node)
    except EdgeNodeError:
        raise InvalidArgument(f"peer {text!r:.60} is neither an ip address nor a node id") from None


def is_ip(node: str) -> bool:
    """Whether a node part returned by :func:`split_address` is an IP (else a node ID)."""
    return ":" in node or node.replace(".", "").isdigit()
