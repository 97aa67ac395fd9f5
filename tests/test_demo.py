"""The demo's bounded waits: they say what they wait for, and fail naming it.

The whole demo runs in tests/test_cli.py (test_demo_runs_all_steps).
"""

from __future__ import annotations

import pytest

from edgenode.demo import NOTE_AFTER_S, NOTE_EVERY_S, DemoError, _Wait
from edgenode.errors import EdgeNodeError


def test_wait_within_its_bound_is_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    wait = _Wait("alpha to report bravo up", 60.0)
    assert 0 < wait.slice_s() <= NOTE_AFTER_S
    assert capsys.readouterr().out == ""


def test_wait_that_takes_long_says_what_it_waits_for(capsys: pytest.CaptureFixture[str]) -> None:
    wait = _Wait("alpha to report bravo up", 60.0)
    # As if the wait had begun NOTE_AFTER_S + 1 seconds ago.
    wait.started -= NOTE_AFTER_S + 1
    wait.next_note -= NOTE_AFTER_S + 1
    assert 0 < wait.slice_s() <= NOTE_EVERY_S
    out = capsys.readouterr().out
    assert out.startswith("   ... still waiting for alpha to report bravo up: 11 s so far"), out
    assert out.rstrip().endswith("(gives up after 60 s)"), out
    # Said once per NOTE_EVERY_S, not on every check.
    wait.slice_s()
    assert capsys.readouterr().out == ""


def test_wait_past_its_bound_raises_demo_error_naming_what() -> None:
    wait = _Wait("the console to see charlie down", 60.0)
    wait.started -= 61
    with pytest.raises(DemoError) as raised:
        wait.slice_s()
    assert isinstance(raised.value, EdgeNodeError)
    assert str(raised.value) == "gave up waiting for the console to see charlie down after 60 s"
