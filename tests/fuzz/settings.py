"""Hypothesis settings and strategies shared by the fuzz tests.

EDGENODE_FUZZ_EXAMPLES=N runs every fuzz test with N examples instead of
its default (the long form through hypothesis; ``tests.fuzz.long`` is
faster per input). The examples are derandomized, so that CI sees the same
inputs on every run and never fails by luck; EDGENODE_FUZZ_RANDOM=1 draws
new ones each run (and keeps failures in hypothesis's example database).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from .harness import Target
from .mutate import mutate, random_cuts

EXAMPLES = int(os.environ.get("EDGENODE_FUZZ_EXAMPLES", "0") or 0)
RANDOM = os.environ.get("EDGENODE_FUZZ_RANDOM", "") not in ("", "0")


def examples(default: int) -> int:
    return EXAMPLES or default


def fuzz_settings(default_examples: int, key: str) -> Callable[[Any], Any]:
    """The settings of a fuzz test: its example count, no wall-clock deadline.

    The harness bounds each input's CPU time itself (a wall-clock deadline
    fails at random on a loaded machine). ``key`` names the test's own
    example database (used with EDGENODE_FUZZ_RANDOM only).
    """
    database = None
    if RANDOM:
        database = DirectoryBasedExampleDatabase(os.path.join(".hypothesis", "fuzz", key))
    return settings(
        max_examples=examples(default_examples),
        deadline=None,
        derandomize=not RANDOM,
        database=database,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=RANDOM,
    )


def timeout_s(default_examples: int, per_example_s: float = 0.05) -> float:
    """A pytest timeout for a fuzz test: 60 s, more for a long run."""
    return max(60.0, examples(default_examples) * per_example_s * 2)


def fuzz_timeout(default_examples: int) -> Any:
    return pytest.mark.timeout(timeout_s(default_examples))


def raw_inputs(target: Target) -> st.SearchStrategy[tuple[bytes, list[int]]]:
    """Arbitrary bytes, cut anywhere if the decoder takes a stream."""
    data = st.binary(max_size=min(target.max_input, 1024))
    if not target.streaming:
        return st.tuples(data, st.just([]))
    return data.flatmap(
        lambda d: st.tuples(st.just(d), st.lists(st.integers(0, len(d)), max_size=8))
    )


@st.composite
def mutated_inputs(draw: Any, target: Target) -> tuple[bytes, list[int]]:
    """A valid encoding, then mutated (or not), then cut into reads."""
    rnd = draw(st.randoms(use_true_random=False))
    data = target.valid(rnd)
    if rnd.random() < 0.9:
        # Splices within the one seed: each valid() costs hypothesis draws.
        data = mutate(data, rnd, [data], target.max_input)
    cuts = random_cuts(rnd, len(data)) if target.streaming else []
    return data, cuts
