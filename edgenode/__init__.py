"""edgenode: a small peer-to-peer node for edge boards.

Importing the package is cheap: the node and its I/O load on first use, so
``edgenode.proto`` and the other pure layers can be imported alone.
"""

from __future__ import annotations

from typing import Any

from .version import __version__

__all__ = ["Node", "NodeConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Node":
        from .node import Node

        return Node
    if name == "NodeConfig":
        from .config import NodeConfig

        return NodeConfig
    raise AttributeError(f"module 'edgenode' has no attribute {name!r}")
