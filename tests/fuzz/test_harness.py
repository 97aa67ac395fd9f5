"""Tests of the fuzzing oracle itself: each rule catches a decoder that breaks it."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import pytest

from edgenode.errors import FrameTooLarge, ProtocolError

from .harness import FuzzFailure, Target, chunks, run_guarded
from .mutate import mutate, random_cuts


class Fake(Target):
    """A decoder that does whatever the test says."""

    name = "fake"
    allowed = (ProtocolError,)
    secrets = (b"\x01secret-key\xff",)

    def __init__(self, behaviour: Any) -> None:
        self.behaviour = behaviour

    def decode(self, data: bytes, cuts: Sequence[int]) -> Any:
        return self.behaviour(data)


def _raise(exc: BaseException) -> Any:
    def behaviour(data: bytes) -> None:
        raise exc

    return behaviour


def test_oracle_accepts_a_documented_error_with_a_good_message() -> None:
    result = run_guarded(Fake(_raise(ProtocolError("peer: bad frame 00 01"))), b"\x00\x01")
    assert not result.accepted
    assert type(result.error) is ProtocolError
    assert result.cpu_s >= 0 and result.peak_bytes >= 0


def test_oracle_returns_what_the_decoder_accepted() -> None:
    result = run_guarded(Fake(lambda data: data[::-1]), b"ab")
    assert result.accepted and result.value == b"ba" and result.error is None


def test_oracle_rejects_an_undocumented_exception() -> None:
    def index_error(data: bytes) -> None:
        raise IndexError("index out of range")

    with pytest.raises(FuzzFailure, match=r"^fake: raised IndexError: index out of range "):
        run_guarded(Fake(index_error), b"\x07")


def test_oracle_rejects_a_subclass_of_a_documented_error() -> None:
    # "Raises ProtocolError" documents that class, not every subclass.
    expected = r"^fake: raised FrameTooLarge: x \(documented: ProtocolError\)"
    with pytest.raises(FuzzFailure, match=expected):
        run_guarded(Fake(_raise(FrameTooLarge("x"))), b"")


def test_oracle_rejects_an_assertion_in_the_decoder() -> None:
    with pytest.raises(FuzzFailure, match=r"^fake: raised AssertionError"):
        run_guarded(Fake(_raise(AssertionError("unreachable"))), b"")


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        ("", "ProtocolError without a message"),
        ("bad\nframe", "ProtocolError message is not one printable line"),
        ("bad frame: ", "ProtocolError message is not one printable line"),
        ("Bad frame", "ProtocolError message does not start lowercase"),
        ("x" * 401, "ProtocolError message of 401 characters exceeds 400"),
        ("tag 01736563726574 2d6b6579ff", None),
        ("key 01 73 65 63 72 65 74 2d 6b 65 79 ff", "ProtocolError message shows key material"),
        ("key \\x01secret-key\\xff", "ProtocolError message shows key material"),
    ],
)
def test_oracle_checks_error_messages(message: str, complaint: str | None) -> None:
    target = Fake(_raise(ProtocolError(message)))
    if complaint is None:
        run_guarded(target, b"")
        return
    with pytest.raises(FuzzFailure, match="^fake: " + re.escape(complaint)):
        run_guarded(target, b"")


def test_oracle_interrupts_a_hang() -> None:
    def spin(data: bytes) -> None:
        while True:
            pass

    with pytest.raises(FuzzFailure, match=r"^fake: hang: more than 0.05 s of cpu time\ninput "):
        run_guarded(Fake(spin), b"\xff", cpu_limit_s=0.05)


def test_oracle_bounds_allocation_by_input_size() -> None:
    def believes_a_length(data: bytes) -> int:
        return len(bytearray(int.from_bytes(data, "big")))

    target = Fake(believes_a_length)
    assert run_guarded(target, b"\x01\x00").accepted  # 256 bytes: fine
    with pytest.raises(
        FuzzFailure, match=r"^fake: allocated \d+ bytes at peak, over the 65568-byte bound for 2 "
    ):
        run_guarded(target, b"\xff\xff")  # 64 KiB for 2 bytes of input


def test_oracle_runs_the_targets_checks() -> None:
    class Picky(Fake):
        def verify(self, data: bytes, cuts: Sequence[int], value: Any) -> None:
            raise FuzzFailure("does not round-trip")

    with pytest.raises(FuzzFailure, match=r"^does not round-trip$"):
        run_guarded(Picky(lambda data: data), b"")


def test_failure_shows_the_input_for_replay() -> None:
    with pytest.raises(FuzzFailure) as info:
        run_guarded(Fake(_raise(KeyError(1))), b"\xde\xad", [1])
    assert str(info.value).endswith("\ninput (2 bytes) dead cut at [1]")


def test_chunks_cover_the_input_in_order() -> None:
    assert chunks(b"abcdef", [4, 2, 2, 99, -3]) == [b"ab", b"cd", b"ef"]
    assert chunks(b"", [1]) == [b""]


def test_mutation_is_deterministic_and_bounded() -> None:
    def run(seed: int) -> list[tuple[bytes, list[int]]]:
        rnd = random.Random(seed)
        out = []
        for _ in range(200):
            data = mutate(b"\x82\x01\x63abc", rnd, [b"\x00" * 50], max_len=40)
            out.append((data, random_cuts(rnd, len(data))))
        return out

    first = run(1)
    assert first == run(1) != run(2)
    assert all(len(d) <= 40 and all(0 < c < len(d) for c in cuts) for d, cuts in first)
    assert len({d for d, _ in first}) > 150
