"""The options of ``edgenode bench`` (and ``python -m edgenode.bench``).

Their own small module: the command line builds its parser with them
without importing the benchmark, and the benchmark reads them without
importing the command line.
"""

from __future__ import annotations

import argparse

#: The parts of ``edgenode bench``, in the order they run.
BENCH_SECTIONS = ("tls", "serial", "fleet", "uplink")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options, for ``edgenode bench`` and ``python -m edgenode.bench``."""
    parser.add_argument("--runs", type=int, default=5, help="repeat each measurement (default 5)")
    parser.add_argument("--messages", type=int, default=2000, help="serial messages per run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument(
        "--peers", type=int, default=None, help="fleet peers (default 200, --quick 20)"
    )
    parser.add_argument(
        "--window",
        type=float,
        default=None,
        metavar="S",
        help="idle CPU / wake-up measuring time per peer behaviour (default 30, --quick 0.5)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCH_SECTIONS,
        help="run only this section (repeatable)",
    )
