"""A fault-injection kit for testing edgenode and applications built on it.

Importing this package is cheap: each tool loads on first use.

* :class:`TcpProxy` (``edgenode.testing.proxy``): a TCP proxy on loopback
  that delays, black-holes, pauses, cuts and half-opens connections.
* :class:`PtyRelay` (``edgenode.testing.ptyrelay``): two pseudo-terminals
  joined by a relay that corrupts, drops and inserts bytes.
* :class:`NetnsPair` (``edgenode.testing.netns``): two network namespaces
  joined by a veth pair, to cut a real link silently (root only).
* :func:`kill`, :func:`stop`, :func:`cont`, :func:`stopped`
  (``edgenode.testing.signals``): SIGKILL, SIGSTOP and SIGCONT a process.
* :func:`wait_for`: wait, in a plain test, until a condition holds.

The pytest plugin ``edgenode.testing.plugin`` (registered as ``edgenode``)
offers them as fixtures. A running node never imports this package.
docs/testing.md shows how to use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "NetnsPair",
    "ProxyLink",
    "PtyRelay",
    "TcpProxy",
    "cont",
    "kill",
    "stop",
    "stopped",
    "wait_for",
]

_LAZY = {
    "TcpProxy": "proxy",
    "ProxyLink": "proxy",
    "PtyRelay": "ptyrelay",
    "NetnsPair": "netns",
    "kill": "signals",
    "stop": "signals",
    "cont": "signals",
    "stopped": "signals",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgenode.testing' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)


def wait_for(condition: Callable[[], Any], timeout_s: float = 5.0, what: str = "") -> Any:
    """Check ``condition()`` every 10 ms until it returns something true; return that.

    For plain (not async) tests, e.g. with node processes. Raises
    :class:`TimeoutError` naming ``what`` (or the condition) after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            name = what or getattr(condition, "__name__", "condition")
            raise TimeoutError(f"{name} did not hold within {timeout_s} s")
        time.sleep(0.01)
