"""edgenode: a small peer-to-peer node for edge boards.

``from edgenode import Node, NodeConfig, PeerUnavailable, ...``: the node, its
configuration, the types its API takes and returns, and the errors a
caller catches. Importing the package is cheap: each name loads its module
on first use, so ``edgenode.proto`` and the other pure layers can be
imported alone, and a program that only reads a config does not load the
node.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .api import Incoming, NodeEvent, PeerDown, PeerSnapshot, PeerUp, Refused
    from .config import NodeConfig
    from .errors import (
        ConfigError,
        EdgeNodeError,
        HandshakeError,
        InvalidArgument,
        NodeClosed,
        PeerUnavailable,
        ProtocolError,
        RemoteError,
        RequestTimeout,
        SubscriberStalled,
        TooManyPending,
    )
    from .node import Node
    from .subscriptions import Stream

# name -> the module that defines it
_LAZY = {
    "Node": ".node",
    "NodeConfig": ".config",
    "Stream": ".subscriptions",
    **dict.fromkeys(
        ("Incoming", "NodeEvent", "PeerDown", "PeerSnapshot", "PeerUp", "Refused"), ".api"
    ),
    **dict.fromkeys(
        (
            "ConfigError",
            "EdgeNodeError",
            "HandshakeError",
            "InvalidArgument",
            "NodeClosed",
            "PeerUnavailable",
            "ProtocolError",
            "RemoteError",
            "RequestTimeout",
            "SubscriberStalled",
            "TooManyPending",
        ),
        ".errors",
    ),
}

__all__ = [
    "ConfigError",
    "EdgeNodeError",
    "HandshakeError",
    "Incoming",
    "InvalidArgument",
    "Node",
    "NodeClosed",
    "NodeConfig",
    "NodeEvent",
    "PeerDown",
    "PeerSnapshot",
    "PeerUnavailable",
    "PeerUp",
    "ProtocolError",
    "Refused",
    "RemoteError",
    "RequestTimeout",
    "Stream",
    "SubscriberStalled",
    "TooManyPending",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgenode' has no attribute {name!r}")
    return getattr(import_module(module, __name__), name)


def __dir__() -> list[str]:
    return __all__
