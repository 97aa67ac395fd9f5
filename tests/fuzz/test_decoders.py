"""Fuzzing every decoder: only its documented errors, in bounded time and memory.

edgenode.proto's (framing, messages, hello, connection, preamble, beacon)
and firmware_bridge's (COBS and its splitter, CBOR, the link in each mode,
HMAC). Each gets arbitrary bytes and mutated valid encodings, fed in random
reads where it takes a stream; ``harness.run_guarded`` is the oracle (see
tests/fuzz/harness.py and targets.py for what each one must do).
"""

from __future__ import annotations

import pytest
from hypothesis import given

from .harness import run_guarded
from .settings import fuzz_settings, fuzz_timeout, mutated_inputs, raw_inputs
from .targets import TARGETS


def _params() -> list:
    return [pytest.param(n, marks=fuzz_timeout(TARGETS[n].short_examples), id=n) for n in TARGETS]


@pytest.mark.parametrize("name", _params())
def test_decoder_takes_arbitrary_bytes(name: str) -> None:
    target = TARGETS[name]

    @fuzz_settings(target.short_examples, f"{name}-raw")
    @given(raw_inputs(target))
    def check(case: tuple[bytes, list[int]]) -> None:
        run_guarded(target, *case)

    check()


@pytest.mark.parametrize("name", _params())
def test_decoder_takes_mutated_valid_input(name: str) -> None:
    target = TARGETS[name]

    @fuzz_settings(target.short_examples, f"{name}-mutated")
    @given(mutated_inputs(target))
    def check(case: tuple[bytes, list[int]]) -> None:
        run_guarded(target, *case)

    check()
