"""Give the heap memory a node has freed back to the operating system, where the C library can.

A long-running node frees what floods and churn made it allocate, but
glibc's allocator keeps freed memory in the process for reuse: survivors
of the soak and the floods kept 1.2 to 1.8 MB more than they started
with, though Python's own heap was flat. glibc's ``malloc_trim(0)``
returns free pages (at the top of the heap, and whole free pages inside
it, with ``madvise``) to the kernel. The node calls :func:`trim` from its
housekeeping timer.

``malloc_trim`` is glibc's: elsewhere (musl as on Alpine, macOS, the BSDs,
Windows) :func:`trim` does nothing and returns False. ``ctypes`` is
imported on the first call only (about 0.3 MB; ``ctypes.util`` would cost
2 MB more, so the symbol is looked up in the running program instead).

It runs in microseconds to a few milliseconds, depending on how much there
is to give back; the housekeeping timer calls it every 30 s.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["available", "trim"]

# The C function, once looked up; False where there is none.
_malloc_trim: Any = None


def _lookup() -> Any:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        # The running program's namespace, libc included: no library path needed.
        function = ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):  # no ctypes, or not glibc (musl)
        return False
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def available() -> bool:
    """Whether this process's C library has ``malloc_trim`` (glibc)."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = _lookup()
    return _malloc_trim is not False


def trim() -> bool:
    """Return the heap's free memory to the operating system; True if some was returned.

    Does nothing, and returns False, where the C library has no ``malloc_trim``.
    """
    if not available():
        return False
    return bool(_malloc_trim(0))
