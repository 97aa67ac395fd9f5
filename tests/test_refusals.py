"""The refusal log (edgenode/refusals.py): exact counts, a bounded number of lines.

Pure: every test feeds refusals with the time as an argument. The node's
own flood tests (tests/test_floods.py) check the same bound on a live node.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgenode.errors import ConfigError
from edgenode.refusals import RefusalLog, address_group, reason_kind

TIMEOUT = "handshake not finished within 0.5 s"
MAGIC = "expected preamble magic 45 44 47 4e ('EDGN'), got 58"
SUMMARY = re.compile(
    r"refused ([\d,]+) more connections? in (\d+\.\d) s from (?:over )?([\d,]+) address(?:es)?: "
    r"(.*); most from (.*)"
)


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (
            "4 handshakes already in progress (limit 4)",
            "N handshakes already in progress (limit N)",
        ),
        (
            "64 handshakes in progress from all addresses (limit 64)",
            "N handshakes in progress from all addresses (limit N)",
        ),
        (
            "handshakes arriving faster than 4 a second (bursts of up to 8)",
            "handshakes arriving faster than N a second (bursts of up to N)",
        ),
        (TIMEOUT, "handshake not finished within N s"),
        (MAGIC, "expected preamble magic N ('EDGN')"),
        (
            "expected preamble magic 45 44 47 4e ('EDGN'), got 16 03 01",
            "expected preamble magic N ('EDGN')",
        ),
        (
            "preamble certificate length 65535 outside 1..2048",
            "preamble certificate length N outside N",
        ),
        ("tls handshake failed: certificate verify failed", "tls handshake failed"),
        (
            "connection failed during handshake: connection reset by peer",
            "connection failed during handshake",
        ),
        (
            "connection closed by the peer during the handshake",
            "connection closed by the peer during the handshake",
        ),
        ("", "no reason"),
    ],
)
def test_reason_kind_blanks_numbers_and_cuts_details(reason: str, kind: str) -> None:
    assert reason_kind(reason) == kind


def test_address_group_puts_an_ipv6_address_in_its_slash_64() -> None:
    assert address_group("192.0.2.7") == "192.0.2.7"
    assert address_group("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_group("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert address_group("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert address_group("::1") == "::/64"
    assert address_group("not:an:address") == "not:an:address"


def test_first_refusals_get_lines_then_one_summary_a_second() -> None:
    log = RefusalLog(burst=2, refill_s=10.0, interval_s=1.0, top=2)
    assert log.record("10.0.0.1", f"10.0.0.1: {TIMEOUT}", 0.0) == (
        f"refused connection from 10.0.0.1: {TIMEOUT}"
    )
    assert log.record("10.0.0.2", MAGIC, 0.1) == f"refused connection from 10.0.0.2: {MAGIC}"
    assert log.next_summary_at() is None  # nothing waits yet
    assert log.record("10.0.0.1", TIMEOUT, 0.2) is None
    assert log.next_summary_at() == pytest.approx(1.2)
    for at in (0.3, 0.4):
        assert log.record("10.0.0.3", MAGIC, at) is None
    assert log.record("10.0.0.3", "65 handshakes in progress (limit 64)", 0.5) is None
    assert log.summary(1.1) is None  # not due yet
    assert log.summary(1.25) == (
        "refused 4 more connections in 1.1 s from 2 addresses: "
        f"2 {MAGIC}; 1 {TIMEOUT}; 1 other; most from 10.0.0.3 (3), 10.0.0.1 (1)"
    )
    assert log.summary(5.0) is None and log.next_summary_at() is None
    # Summaries are an interval apart even when refusals keep coming.
    assert log.record("10.0.0.1", TIMEOUT, 1.3) is None
    assert log.next_summary_at() == pytest.approx(2.3)
    assert log.summary(2.3) == (
        f"refused 1 more connection in 1.0 s from 1 address: 1 {TIMEOUT}; most from 10.0.0.1 (1)"
    )
    # Tokens come back at one per refill_s: a trickle gets its lines.
    assert log.record("10.0.0.1", TIMEOUT, 11.0) is not None
    counters = log.counters(12.0)
    assert counters == {
        "total": 8,
        "lines": 3,
        "summaries": 2,
        "waiting": 0,
        "by_reason": {
            "handshake not finished within N s": 4,
            "expected preamble magic N ('EDGN')": 3,
            "N handshakes in progress (limit N)": 1,
        },
        "top_addresses": [["10.0.0.1", 4], ["10.0.0.3", 3]],
        "other_addresses": 0,
        "last": {"ip": "10.0.0.1", "reason": TIMEOUT, "age_s": 1.0},
    }


def test_a_quiet_refusal_is_counted_and_summed_up_but_spends_no_line() -> None:
    log = RefusalLog(burst=2, refill_s=10.0, interval_s=1.0)
    given_up = "dial given up by its node before it was accepted"
    for at in (0.0, 0.1, 0.2):
        assert log.record("10.0.0.1", given_up, at, quiet=True) is None
    # The line budget is untouched: the next loud refusal still has its line.
    assert log.record("10.0.0.2", MAGIC, 0.3) == f"refused connection from 10.0.0.2: {MAGIC}"
    assert log.summary(1.0) == (
        f"refused 3 more connections in 1.0 s from 1 address: 3 {given_up}; most from 10.0.0.1 (3)"
    )
    assert log.counters(1.0)["by_reason"] == {given_up: 3, "expected preamble magic N ('EDGN')": 1}
    assert log.lines == 1 and log.total == 4


def test_summary_counts_ipv6_addresses_by_slash_64_and_caps_what_it_tracks() -> None:
    log = RefusalLog(burst=1, max_kinds=2, max_addresses=2, top=1)
    assert log.record("2001:db8::1", TIMEOUT, 0.0) is not None
    for host in range(1, 11):
        assert log.record(f"2001:db8::{host:x}", TIMEOUT, 0.0) is None
    for n in range(3):
        assert log.record(f"192.0.2.{n}", f"kind {'abc'[n]}", 0.0) is None
    line = log.summary(1.0)
    assert line == (
        "refused 13 more connections in 1.0 s from over 2 addresses: "
        f"10 {TIMEOUT}; 3 other; most from 2001:db8::/64 (10)"
    )
    counters = log.counters(1.0)
    assert counters["total"] == 14
    assert counters["by_reason"] == {
        "handshake not finished within N s": 11,
        "kind a": 1,
        "other": 2,
    }
    assert counters["top_addresses"] == [["2001:db8::/64", 11]]
    assert counters["other_addresses"] == 2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("burst", 0, "refusal log burst: expected an integer >= 1, got 0"),
        ("top", 1.5, "refusal log top: expected an integer >= 1, got 1.5"),
        ("max_addresses", -1, "refusal log max_addresses: expected an integer >= 1, got -1"),
        ("refill_s", 0, "refusal log refill_s: expected a positive number of seconds, got 0"),
        (
            "interval_s",
            float("inf"),
            "refusal log interval_s: expected a positive number of seconds, got inf",
        ),
    ],
)
def test_refusal_log_rejects_bad_settings(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        RefusalLog(**{field: value})  # type: ignore[arg-type]
    assert str(info.value) == message


def _drive(log: RefusalLog, gaps: list[float], sources: list[int]) -> tuple[list[float], int]:
    """Record refusals ``gaps`` apart, summarising when due as a node does.

    Returns the times of every line written and the refusals they covered.
    """
    written: list[float] = []
    covered = 0
    now = 0.0

    def flush_until(t: float) -> None:
        nonlocal covered
        due = log.next_summary_at()
        while due is not None and due <= t:
            line = log.summary(due)
            assert line is not None
            match = SUMMARY.fullmatch(line)
            assert match, line
            covered += int(match.group(1).replace(",", ""))
            written.append(due)
            due = log.next_summary_at()

    for gap, source in zip(gaps, sources):
        flush_until(now + gap)
        now += gap
        if log.record(f"10.0.{source // 250}.{source % 250}", TIMEOUT, now) is not None:
            written.append(now)
            covered += 1
    flush_until(now + 60.0)
    return written, covered


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=1, max_size=400),
    seed=st.integers(0, 1000),
)
def test_any_flood_writes_a_bounded_number_of_lines_and_loses_no_count(
    gaps: list[float], seed: int
) -> None:
    log = RefusalLog()
    sources = [(seed * 7919 + i * 104729) % 3000 for i in range(len(gaps))]
    written, covered = _drive(log, gaps, sources)
    # Each refusal is in exactly one line: its own, or one summary.
    assert covered == log.total == len(gaps)
    assert log.counters(0.0)["waiting"] == 0
    # In any minute: the burst, the refill and one summary a second.
    bound = log.burst + 60 / log.refill_s + 60 / log.interval_s + 1
    for i, start in enumerate(written):
        in_minute = sum(1 for t in written[i:] if t < start + 60.0)
        assert in_minute <= bound


def test_a_minute_long_flood_from_twenty_addresses_writes_about_seventy_lines() -> None:
    # The flood: ~6,150 lines a minute before, one per refusal.
    log = RefusalLog()
    count = 6150
    written, covered = _drive(log, [60.0 / count] * count, [i % 20 for i in range(count)])
    assert covered == log.total == count
    in_first_minute = [t for t in written if t < 60.0]
    assert len(in_first_minute) <= 5 + 6 + 60
