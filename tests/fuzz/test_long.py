"""Tests of the long-form runner (python -m tests.fuzz.long), on a few inputs."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest

from edgenode.errors import MalformedMessage

from . import mp_fuzz
from .harness import Target
from .long import main
from .targets import TARGETS


def test_long_form_prints_figures_per_decoder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--inputs", "40", "--decoder", "cbor", "--decoder", "link", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "engine builtin, seed 0, 40 inputs per decoder, allocation traced on 1 input in 10"
    )
    assert out[1].split() == [
        "decoder", "inputs", "seconds", "inputs/s", "accepted", "rejected",
        "slowest", "ms", "peak", "bytes", "failures",
    ]  # fmt: skip
    for line, name in zip(out[2:4], ["cbor", "link"]):
        fields = line.split()
        assert fields[0] == name and fields[1] == "40" and fields[-1] == "0"
        assert int(fields[4]) + int(fields[5]) == 40
    assert re.fullmatch(r"total 80 inputs in \d+ s", out[4])


def test_long_form_is_reproducible(capsys: pytest.CaptureFixture[str]) -> None:
    def counts(seed: str) -> list[str]:
        assert main(["--inputs", "60", "--decoder", "messages", "--seed", seed, "--quiet"]) == 0
        row = capsys.readouterr().out.splitlines()[2].split()
        return [row[1], row[4], row[5]]  # inputs, accepted, rejected

    assert counts("7") == counts("7")


def test_long_form_replays_one_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--decoder", "beacon", "--replay", "45444742"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "beacon: rejected: MalformedMessage('beacon of 4 bytes ends before its version: "
        "45 44 47 42'); "
    )


class _Broken(Target):
    name = "broken"
    allowed = (MalformedMessage,)

    def valid(self, rnd: Any) -> bytes:
        return bytes([rnd.randrange(256)])

    def decode(self, data: bytes, cuts: Sequence[int]) -> None:
        if data and data[0] % 3 == 0:
            raise KeyError(data[0])


def test_long_form_reports_failures_and_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(TARGETS, "broken", _Broken())
    assert main(["--inputs", "500", "--decoder", "broken", "--max-failures", "2", "--quiet"]) == 1
    out = capsys.readouterr().out
    row = out.splitlines()[2].split()
    assert row[0] == "broken" and row[-1] == "2"
    assert out.count("\nFAILED broken: raised KeyError: ") == 2
    assert "(documented: MalformedMessage)\ninput (" in out


def test_long_form_refuses_an_unknown_decoder(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--decoder", "nope"])
    assert info.value.code == 2
    assert "error: unknown decoder nope; choose from framing, messages, " in capsys.readouterr().err


def test_long_form_lists_the_decoders(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == list(TARGETS)


def test_micropython_fuzzer_runs_on_cpython(capsys: pytest.CaptureFixture[str]) -> None:
    # The same script runs on the real runtime (--engine micropython).
    assert mp_fuzz.run(150) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == [
        "cbor", "cobs", "cobs_stream", "link_hello", "link", "link_psk",
    ]  # fmt: skip
    assert lines[-1] == "0 failures"
