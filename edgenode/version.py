"""The package's version, in a module of its own so that anything can import it
without importing the package's lazy attributes (and the node behind them)."""

from __future__ import annotations

__version__ = "0.1.0"
