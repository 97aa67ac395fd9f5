"""Tests of the keepalive scheduler and backoff (pure, simulated time, no sleeps)."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable

import pytest

from edgenode.errors import ConfigError
from edgenode.keepalive import (
    DEAD,
    DIAL,
    MAX_OUTSTANDING_PINGS,
    PING,
    Backoff,
    Keepalive,
    Liveness,
)

EPS = 1e-9
PEER = "127.0.0.3"


def constant(value: float) -> Callable[[], float]:
    return lambda: value


def make(
    rand: Callable[[], float] | None = None,
    *,
    interval_s: float = 5.0,
    timeout_s: float = 15.0,
    jitter: float = 0.1,
    **kwargs: float,
) -> Keepalive:
    return Keepalive(
        interval_s=interval_s,
        timeout_s=timeout_s,
        rand=rand if rand is not None else constant(0.0),
        jitter=jitter,
        **kwargs,
    )


Action = tuple[str, Hashable, int]


def run_until(
    keepalive: Keepalive,
    end: float,
    on_action: Callable[[Action, float], None] | None = None,
) -> list[tuple[float, Action]]:
    """Act as the node's dispatcher with no inbox traffic: wake at each deadline up to ``end``."""
    log: list[tuple[float, Action]] = []
    while True:
        deadline = keepalive.next_deadline()
        if deadline is None or deadline > end:
            return log
        for action in keepalive.due(deadline):
            log.append((deadline, action))
            if on_action is not None:
                on_action(action, deadline)


# -- configuration errors ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"interval_s": 0.0},
            "keepalive interval must be a positive number of seconds, got 0.0",
        ),
        (
            {"interval_s": -1.0},
            "keepalive interval must be a positive number of seconds, got -1.0",
        ),
        (
            {"interval_s": float("nan")},
            "keepalive interval must be a positive number of seconds, got nan",
        ),
        (
            {"timeout_s": 5.0},
            "keepalive timeout must be greater than the interval (5.0 s), got 5.0",
        ),
        (
            {"timeout_s": 2.0},
            "keepalive timeout must be greater than the interval (5.0 s), got 2.0",
        ),
        (
            {"timeout_s": float("inf")},
            "keepalive timeout must be greater than the interval (5.0 s), got inf",
        ),
        ({"jitter": 0.5}, "keepalive jitter must be in [0, 0.5), got 0.5"),
        ({"jitter": -0.1}, "keepalive jitter must be in [0, 0.5), got -0.1"),
        (
            {"backoff_base_s": 0.0},
            "backoff base must be a positive number of seconds, got 0.0",
        ),
        (
            {"backoff_base_s": 2.0, "backoff_cap_s": 1.0},
            "backoff cap must be at least the base (2.0 s) and finite, got 1.0",
        ),
        (
            {"stable_after_s": -1.0},
            "keepalive stable_after_s must be >= 0 seconds, got -1.0",
        ),
        (
            {"ping_slack_s": -0.1},
            "keepalive ping slack must be >= 0 and below the shortest ping interval "
            "(4.5 s), got -0.1",
        ),
        (
            {"ping_slack_s": 4.5},
            "keepalive ping slack must be >= 0 and below the shortest ping interval "
            "(4.5 s), got 4.5",
        ),
    ],
)
def test_keepalive_rejects_bad_config(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        make(**kwargs)
    assert str(raised.value) == message


def test_keepalive_defaults() -> None:
    keepalive = make()
    assert keepalive.stable_after_s == 2.0  # or the timeout, if shorter
    assert make(interval_s=0.5, timeout_s=1.5).stable_after_s == 1.5
    assert keepalive.jitter == 0.1
    assert (keepalive.backoff_base_s, keepalive.backoff_cap_s) == (0.5, 30.0)
    assert keepalive.next_deadline() is None
    assert keepalive.due(1e9) == []


@pytest.mark.parametrize(
    ("base_s", "cap_s", "message"),
    [
        (0.0, 1.0, "backoff base must be a positive number of seconds, got 0.0"),
        (-1.0, 1.0, "backoff base must be a positive number of seconds, got -1.0"),
        (float("inf"), float("inf"), "backoff base must be a positive number of seconds, got inf"),
        (1.0, 0.5, "backoff cap must be at least the base (1.0 s) and finite, got 0.5"),
        (1.0, float("inf"), "backoff cap must be at least the base (1.0 s) and finite, got inf"),
    ],
)
def test_backoff_rejects_bad_config(base_s: float, cap_s: float, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Backoff(base_s, cap_s)
    assert str(raised.value) == message


# -- backoff, without sleeping ---------------------------------------------------


def test_backoff_sequence_with_rand_zero_is_half_the_exponential() -> None:
    backoff = Backoff(0.5, 30.0)
    delays = [backoff.next_delay(0.0) for _ in range(9)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert backoff.attempt == 9


def test_backoff_sequence_with_rand_near_one_is_the_full_exponential() -> None:
    backoff = Backoff(0.5, 30.0)
    delays = [backoff.next_delay(1.0 - EPS) for _ in range(9)]
    expected = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert delays == pytest.approx(expected, rel=1e-8)
    assert all(delay < full for delay, full in zip(delays, expected))


def test_backoff_delay_stays_within_jitter_bounds() -> None:
    rng = random.Random(7)
    backoff = Backoff(0.5, 30.0)
    for attempt in range(40):
        full = min(30.0, 0.5 * 2**attempt)
        delay = backoff.next_delay(rng.random())
        assert full * 0.5 <= delay < full


def test_backoff_never_overflows() -> None:
    backoff = Backoff(0.5, 30.0)
    backoff.attempt = 100_000
    assert backoff.next_delay(0.0) == 15.0
    assert backoff.attempt == 100_001


def test_backoff_reset_starts_from_base() -> None:
    backoff = Backoff(1.0, 60.0)
    for _ in range(5):
        backoff.next_delay(0.0)
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay(0.0) == 0.5
    assert repr(backoff) == "<Backoff attempt=1 base=1.0s cap=60.0s>"


# -- pings -------------------------------------------------------------------


def test_first_ping_after_interval_with_rand_zero() -> None:
    keepalive = make(constant(0.0))
    keepalive.link_up(PEER, now=100.0)
    assert PEER in keepalive
    assert keepalive.next_deadline() == 105.0
    assert keepalive.due(104.999) == []
    assert keepalive.due(105.0) == [(PING, PEER, 1)]
    assert keepalive.next_deadline() == 110.0


def test_ping_jitter_shortens_interval_by_at_most_jitter() -> None:
    keepalive = make(constant(1.0 - EPS), jitter=0.2)
    keepalive.link_up(PEER, now=0.0)
    deadline = keepalive.next_deadline()
    assert deadline is not None
    assert deadline == pytest.approx(4.0)
    assert deadline > 4.0


def test_ping_intervals_stay_within_jitter_bounds() -> None:
    rng = random.Random(1)
    keepalive = make(rng.random, interval_s=10.0, timeout_s=30.0, jitter=0.25)
    keepalive.link_up(PEER, now=0.0)
    pings: list[float] = []

    def answer(action: Action, now: float) -> None:
        assert action[0] == PING
        pings.append(now)
        keepalive.received(PEER, now)

    run_until(keepalive, 1000.0, answer)
    gaps = [later - earlier for earlier, later in zip([0.0, *pings], pings)]
    assert len(gaps) > 90
    assert all(7.5 <= gap <= 10.0 for gap in gaps)
    assert len({round(gap, 6) for gap in gaps}) > 10  # jitter varies per cycle


def test_pings_are_skipped_while_data_is_sent() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    actions: list[tuple[float, Action]] = []
    now = 0.0
    while now < 60.0:
        now += 1.0
        keepalive.sent(PEER, now)
        keepalive.received(PEER, now)
        actions += run_until(keepalive, now)
    assert actions == []
    # Data stops flowing out: a ping goes out an interval after the last frame sent.
    assert run_until(keepalive, 69.0) == [(65.0, (PING, PEER, 1))]


def test_emitting_a_ping_counts_as_a_send() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    keepalive.due(5.0)
    liveness = keepalive.liveness(PEER, now=6.0)
    assert liveness is not None
    assert liveness.last_sent_age_s == 1.0
    assert liveness.pings_sent == 1


def test_nonces_are_a_deterministic_counter_across_peers() -> None:
    keepalive = make()
    keepalive.link_up("a", now=0.0)
    keepalive.link_up("b", now=0.5)
    keepalive.link_up("c", now=1.0)
    log = run_until(keepalive, 11.0)
    assert [action for _, action in log] == [
        (PING, "a", 1),
        (PING, "b", 2),
        (PING, "c", 3),
        (PING, "a", 4),
        (PING, "b", 5),
        (PING, "c", 6),
    ]


# -- dead peers --------------------------------------------------------------------


def test_dead_after_timeout_with_no_frames() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    log = run_until(keepalive, 100.0)
    assert log == [
        (5.0, (PING, PEER, 1)),
        (10.0, (PING, PEER, 2)),
        (15.0, (DEAD, PEER, 0)),
    ]
    assert PEER not in keepalive
    assert keepalive.next_deadline() is None
    # Frames after death change nothing until the node calls link_down/link_up.
    keepalive.received(PEER, 16.0)
    assert keepalive.due(1000.0) == []


def test_held_link_is_not_declared_dead_but_keeps_pinging() -> None:
    """Our side stopped reading (a full subscriber): the peer's silence is ours."""
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    keepalive.hold(PEER, 1.0)
    log = run_until(keepalive, 60.0)
    assert [action[0] for _, action in log] == [PING] * 12  # every 5 s, no DEAD
    keepalive.release(PEER, 60.0)
    # Released: the timeout counts from the release.
    log = run_until(keepalive, 100.0)
    assert log[-1] == (75.0, (DEAD, PEER, 0))


def test_hold_and_release_per_message_cost_no_heap_entries() -> None:
    """Regression: each release pushed a heap entry that stayed current, so a
    slow consumer (a hold and a release per message) grew the heap without
    bound and its compaction stalled the loop for seconds."""
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    size = len(keepalive._heap)
    now = 0.0
    for _ in range(10_000):
        now += 0.001
        keepalive.hold(PEER, now)
        keepalive.release(PEER, now)
        keepalive.due(now)
    assert len(keepalive._heap) <= size + 1
    assert PEER in keepalive


def test_not_dead_while_frames_arrive() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    dead: list[float] = []
    now = 0.0
    while now < 600.0:
        now += 14.0  # just inside the timeout, no pongs: data alone proves liveness
        for when, action in run_until(keepalive, now - EPS):
            if action[0] == DEAD:
                dead.append(when)
        keepalive.received(PEER, now)
    assert dead == []
    assert PEER in keepalive


def test_dead_is_reported_once_then_link_down() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    assert [a for _, a in run_until(keepalive, 15.0) if a[0] == DEAD] == [(DEAD, PEER, 0)]
    assert keepalive.link_down(PEER, now=15.0, redial=False) is None
    assert keepalive.liveness(PEER, now=15.0) is None
    assert keepalive.next_deadline() is None


# -- pongs ----------------------------------------------------------------------------


def test_pong_returns_rtt_and_rejects_unknown_or_stale_nonce() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    assert keepalive.due(5.0) == [(PING, PEER, 1)]
    assert keepalive.pong(PEER, 99, now=5.1) is None
    assert keepalive.pong("127.0.0.9", 1, now=5.1) is None
    assert keepalive.pong(PEER, 1, now=5.25) == pytest.approx(0.25)
    assert keepalive.pong(PEER, 1, now=5.3) is None  # answered already
    liveness = keepalive.liveness(PEER, now=5.3)
    assert liveness is not None
    assert liveness.rtt_s == pytest.approx(0.25)
    assert liveness.pongs_received == 1


def test_pong_keeps_only_a_few_outstanding_nonces() -> None:
    keepalive = make(timeout_s=1000.0)
    keepalive.link_up(PEER, now=0.0)
    nonces = [action[2] for _, action in run_until(keepalive, 5.0 * (MAX_OUTSTANDING_PINGS + 1))]
    assert nonces == list(range(1, MAX_OUTSTANDING_PINGS + 2))
    assert keepalive.pong(PEER, nonces[0], now=26.0) is None  # dropped: too old
    assert keepalive.pong(PEER, nonces[2], now=26.0) == pytest.approx(26.0 - 15.0)
    assert keepalive.pong(PEER, nonces[1], now=26.0) is None  # settled by a later pong
    assert keepalive.pong(PEER, nonces[-1], now=26.0) == pytest.approx(1.0)


def test_pong_counts_as_a_frame_received() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    keepalive.due(5.0)
    keepalive.pong(PEER, 1, now=12.0)
    liveness = keepalive.liveness(PEER, now=12.0)
    assert liveness is not None
    assert liveness.last_received_age_s == 0.0


# -- liveness per direction --------------------------------------------------------------


def test_liveness_reports_each_direction() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    fresh = keepalive.liveness(PEER, now=0.0)
    assert isinstance(fresh, Liveness)
    assert fresh.our_pings_answered and fresh.their_frames_arriving
    assert (fresh.pings_sent, fresh.pongs_received, fresh.rtt_s) == (0, 0, None)

    # The peer sends data but never answers our pings: failure 2 (docs/architecture.md), seen
    # from our side. Inbound is alive, outbound is not.
    def data_but_no_pongs(action: Action, now: float) -> None:
        assert action[0] == PING

    now = 0.0
    while now < 30.0:
        now += 2.0
        keepalive.received(PEER, now)
        run_until(keepalive, now, data_but_no_pongs)
    liveness = keepalive.liveness(PEER, now=now)
    assert liveness is not None
    assert liveness.their_frames_arriving
    assert not liveness.our_pings_answered
    assert liveness.pings_sent >= 5
    assert liveness.pongs_received == 0
    assert PEER in keepalive  # frames arrive: not dead

    # The peer starts answering: outbound is alive again.
    keepalive.due(now + 5.0)
    nonce = keepalive.liveness(PEER, now=now + 5.0).pings_sent  # type: ignore[union-attr]
    assert keepalive.pong(PEER, nonce, now=now + 5.1) is not None
    liveness = keepalive.liveness(PEER, now=now + 5.1)
    assert liveness is not None
    assert liveness.our_pings_answered and liveness.their_frames_arriving


def test_liveness_reports_silent_peer_before_dead_is_processed() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    keepalive.sent(PEER, 14.0)
    liveness = keepalive.liveness(PEER, now=15.5)
    assert liveness is not None
    assert not liveness.their_frames_arriving
    assert liveness.last_received_age_s == 15.5
    assert liveness.last_sent_age_s == 1.5
    assert keepalive.liveness("unknown", now=1.0) is None


def test_liveness_repr() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    keepalive.due(5.0)
    keepalive.pong(PEER, 1, now=5.002)
    assert repr(keepalive.liveness(PEER, now=6.0)) == (
        "<Liveness out=ok in=ok rtt=2.0ms pings=1 pongs=1>"
    )


def test_both_ends_ping_and_neither_goes_dead() -> None:
    # Two schedulers joined by a fake link with no application data: each
    # end's pings and the other's pongs are the only frames. Neither end
    # knows which side dialled; neither link cycles (failure 2 (docs/architecture.md)).
    rng = random.Random(3)
    ends = {"a": make(rng.random), "b": make(rng.random)}
    other = {"a": "b", "b": "a"}
    for name, keepalive in ends.items():
        keepalive.link_up(other[name], now=0.0)
    pings = {"a": 0, "b": 0}
    now = 0.0
    while now < 3600.0:
        deadlines = [(ka.next_deadline(), name) for name, ka in ends.items()]
        when, name = min((d, n) for d, n in deadlines if d is not None)
        now = when
        for kind, key, nonce in ends[name].due(now):
            assert kind == PING, f"{name} saw {kind} for {key} at {now}"
            pings[name] += 1
            peer = ends[key]
            peer.received(name, now + 0.01)  # the ping arrives
            peer.sent(name, now + 0.01)  # the pong goes back
            ends[name].received(key, now + 0.02)
            assert ends[name].pong(key, nonce, now + 0.02) == pytest.approx(0.02)
    assert "b" in ends["a"] and "a" in ends["b"]
    assert pings["a"] > 0 and pings["b"] > 0
    for name, keepalive in ends.items():
        liveness = keepalive.liveness(other[name], now)
        assert liveness is not None
        assert liveness.our_pings_answered and liveness.their_frames_arriving


# -- dials and backoff through the scheduler -------------------------------------------------


def test_schedule_dial_and_due() -> None:
    keepalive = make()
    keepalive.schedule_dial(PEER, now=10.0, delay_s=2.0)
    assert keepalive.pending_dial(PEER) == 12.0
    assert keepalive.next_deadline() == 12.0
    assert keepalive.due(11.9) == []
    assert keepalive.due(12.0) == [(DIAL, PEER, 0)]
    assert keepalive.pending_dial(PEER) is None
    assert keepalive.due(100.0) == []
    assert keepalive.next_deadline() is None
    keepalive.schedule_dial(PEER, now=200.0)
    assert keepalive.due(200.0) == [(DIAL, PEER, 0)]


def test_schedule_dial_replaces_pending_dial() -> None:
    keepalive = make()
    keepalive.schedule_dial(PEER, now=0.0, delay_s=10.0)
    keepalive.schedule_dial(PEER, now=0.0, delay_s=3.0)
    keepalive.schedule_dial(PEER, now=0.0, delay_s=5.0)
    assert keepalive.next_deadline() == 5.0
    assert keepalive.due(100.0) == [(DIAL, PEER, 0)]


def test_cancel_dial_and_link_up_cancel_pending_dials() -> None:
    keepalive = make()
    keepalive.schedule_dial("a", now=0.0, delay_s=1.0)
    keepalive.schedule_dial("b", now=0.0, delay_s=2.0)
    keepalive.cancel_dial("a")
    keepalive.cancel_dial("never scheduled")
    keepalive.link_up("b", now=1.5)
    assert keepalive.pending_dial("b") is None
    assert keepalive.next_deadline() == 6.5  # b's first ping; both dials are gone
    assert all(kind == PING for _, (kind, _, _) in run_until(keepalive, 12.0))


def test_link_down_with_redial_schedules_backoff_dial() -> None:
    keepalive = make(constant(0.0))
    keepalive.link_up(PEER, now=0.0)
    delay = keepalive.link_down(PEER, now=1.0, redial=True)
    assert delay == 0.25
    assert PEER not in keepalive
    assert keepalive.next_deadline() == 1.25
    assert keepalive.due(1.25) == [(DIAL, PEER, 0)]


def test_link_down_without_redial_schedules_nothing() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    assert keepalive.link_down(PEER, now=1.0, redial=False) is None
    assert keepalive.next_deadline() is None


def test_dial_failed_backs_off_exponentially_with_cap() -> None:
    keepalive = make(constant(0.0), backoff_base_s=1.0, backoff_cap_s=8.0)
    now = 0.0
    delays = []
    for _ in range(7):
        delay = keepalive.dial_failed(PEER, now)
        delays.append(delay)
        assert keepalive.next_deadline() == now + delay
        now += delay
        assert keepalive.due(now) == [(DIAL, PEER, 0)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_links_pay_the_backoff_back_by_how_long_they_lived() -> None:
    # The redial rules (edgenode/redial.py, tests/test_redial.py): a link
    # that carried frames pays back one step per stable_after_s (2 s) of life.
    keepalive = make(constant(0.0))
    assert [keepalive.dial_failed(PEER, 0.0) for _ in range(3)] == [0.25, 0.5, 1.0]

    # Up for one second: half a step paid, one added for its end.
    keepalive.link_up(PEER, now=10.0)
    keepalive.received(PEER, 11.0)
    assert keepalive.link_down(PEER, now=11.0, redial=True) == pytest.approx(0.25 * 2**2.5)

    # Accepted, then silent until declared dead: never alive, pays nothing.
    keepalive.link_up(PEER, now=20.0)
    assert (DEAD, PEER, 0) in [a for _, a in run_until(keepalive, 35.0)]
    assert keepalive.link_down(PEER, now=35.0, redial=True) == pytest.approx(0.25 * 2**3.5)

    # Frames kept arriving for 15 s: the whole debt is paid, the next redial starts over.
    keepalive.link_up(PEER, now=100.0)
    for second in range(101, 116):
        keepalive.received(PEER, float(second))
    assert keepalive.link_down(PEER, now=115.0, redial=True) == 0.25
    assert keepalive.redial_state(PEER).debt == 1.0


def test_stable_after_can_be_configured() -> None:
    keepalive = make(constant(0.0), stable_after_s=60.0)
    keepalive.dial_failed(PEER, 0.0)
    keepalive.link_up(PEER, now=0.0)
    keepalive.received(PEER, 30.0)
    assert keepalive.link_down(PEER, now=30.0, redial=True) == pytest.approx(0.25 * 2**0.5)
    keepalive.link_up(PEER, now=40.0)
    keepalive.received(PEER, 200.0)
    assert keepalive.link_down(PEER, now=200.0, redial=True) == 0.25  # paid back
    # 0: every link that lived at all clears the debt.
    keepalive = make(constant(0.0), stable_after_s=0.0)
    for _ in range(5):
        keepalive.dial_failed(PEER, 0.0)
    keepalive.link_up(PEER, now=0.0)
    assert keepalive.link_down(PEER, now=0.1, redial=True) == 0.25


def test_forget_drops_links_dials_and_backoff() -> None:
    keepalive = make(constant(0.0))
    keepalive.dial_failed("a", 0.0)
    keepalive.dial_failed("a", 0.0)
    keepalive.link_up("b", now=0.0)
    keepalive.forget("a")
    keepalive.forget("b")
    keepalive.forget("never seen")
    assert "b" not in keepalive
    assert keepalive.pending_dial("a") is None
    assert keepalive.next_deadline() is None
    assert keepalive.due(1000.0) == []
    assert keepalive.dial_failed("a", 0.0) == 0.25  # a fresh backoff


def test_link_up_again_starts_a_fresh_link() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    keepalive.due(5.0)
    keepalive.link_up(PEER, now=7.0)  # a new connection replaced the old one
    liveness = keepalive.liveness(PEER, now=7.0)
    assert liveness is not None
    assert liveness.pings_sent == 0
    assert keepalive.next_deadline() == 12.0
    assert [a for _, a in run_until(keepalive, 12.0)] == [(PING, PEER, 2)]


# -- the heap: lazy invalidation and cost ------------------------------------------------


def test_traffic_never_touches_the_heap() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    pops = keepalive.heap_pops
    for step in range(10_000):
        keepalive.sent(PEER, step * 0.001)
        keepalive.received(PEER, step * 0.001)
    assert keepalive.heap_pops == pops
    assert len(keepalive._heap) == 1


def test_next_deadline_is_not_moved_by_traffic_but_by_due() -> None:
    keepalive = make()
    keepalive.link_up(PEER, now=0.0)
    assert keepalive.next_deadline() == 5.0
    assert keepalive.next_deadline() == 5.0  # asking again changes nothing
    keepalive.sent(PEER, 2.0)
    keepalive.received(PEER, 2.0)
    # Traffic only stores timestamps: the entry stays early (lazy invalidation) ...
    assert keepalive.next_deadline() == 5.0
    assert keepalive.due(4.9) == []
    # ... and when it surfaces with nothing to do, due moves it to the real deadline.
    assert keepalive.due(5.0) == []
    assert keepalive.next_deadline() == 7.0
    keepalive.sent(PEER, 20.0)
    assert keepalive.due(7.0) == []
    assert keepalive.next_deadline() == 17.0  # now the dead deadline comes first
    # Something new and earlier moves it earlier; cancelling restores it.
    keepalive.schedule_dial("other", now=3.0, delay_s=5.0)
    assert keepalive.next_deadline() == 8.0
    keepalive.cancel_dial("other")
    assert keepalive.next_deadline() == 17.0
    assert keepalive.due(16.9) == []
    assert keepalive.due(17.0) == [(DEAD, PEER, 0)]
    assert keepalive.next_deadline() is None


def test_next_deadline_drops_entries_of_links_that_went_down() -> None:
    keepalive = make()
    keepalive.link_up("a", now=0.0)
    keepalive.link_up("b", now=1.0)
    keepalive.link_down("a", now=2.0, redial=False)
    assert keepalive.next_deadline() == 6.0
    keepalive.forget("b")
    assert keepalive.next_deadline() is None


def test_next_deadline_is_never_in_the_past_after_due() -> None:
    rng = random.Random(5)
    keepalive = make(rng.random)
    for peer in range(20):
        keepalive.link_up(peer, now=rng.random())
    now = 0.0
    while now < 200.0:
        deadline = keepalive.next_deadline()
        assert deadline is not None
        assert deadline >= now
        now = deadline
        for _, key, _ in keepalive.due(now):
            keepalive.received(key, now)
        assert keepalive.due(now) == []


def test_wakeups_for_idle_peers_scale_with_peers_over_interval() -> None:
    peers, interval_s, intervals = 200, 5.0, 100
    rng = random.Random(42)
    keepalive = make(rng.random, interval_s=interval_s, timeout_s=3 * interval_s)
    for peer in range(peers):
        keepalive.link_up(peer, now=0.0)  # all at once: the worst case
    end = interval_s * intervals
    wakeups = 0
    pings = 0
    now = 0.0
    while True:
        deadline = keepalive.next_deadline()
        assert deadline is not None
        if deadline > end:
            break
        assert deadline >= now
        now = deadline
        wakeups += 1
        for kind, key, nonce in keepalive.due(now):
            assert kind == PING
            pings += 1
            keepalive.received(key, now)  # the pong
            keepalive.pong(key, nonce, now)
    per_second = wakeups / end
    ideal = peers / interval_s  # 40 per second
    # Jitter shortens each interval by up to 10 %, so pings run up to 1/0.9 faster.
    assert ideal * 0.95 <= per_second <= ideal / (1 - keepalive.jitter) + 1.0
    assert pings >= wakeups
    # The scheduler's own work is one heap operation per ping, plus a constant.
    assert keepalive.heap_pops <= pings + peers
    assert len(keepalive._heap) == peers


def test_ping_slack_batches_pings_that_fall_due_together() -> None:
    keepalive = make(interval_s=5.0, timeout_s=15.0, jitter=0.0, ping_slack_s=0.25)
    for i, up_at in enumerate([0.0, 0.1, 0.2, 0.3]):
        keepalive.link_up(f"p{i}", now=up_at)
    assert keepalive.next_deadline() == 5.0
    # p0 is due; p1 and p2 fall due within the slack and go early; p3 waits.
    assert keepalive.due(5.0) == [(PING, "p0", 1), (PING, "p1", 2), (PING, "p2", 3)]
    assert keepalive.next_deadline() == 5.3
    assert keepalive.due(5.3) == [(PING, "p3", 4)]
    assert keepalive.next_deadline() == 10.0


def test_ping_slack_never_declares_death_or_dials_early() -> None:
    keepalive = make(interval_s=5.0, timeout_s=6.0, jitter=0.0, ping_slack_s=0.5)
    keepalive.link_up("quiet", now=0.0)
    keepalive.schedule_dial("later", now=0.0, delay_s=5.3)
    # The dial falls due within the slack of this visit: it waits.
    assert keepalive.due(5.0) == [(PING, "quiet", 1)]
    assert keepalive.next_deadline() == 5.3
    assert keepalive.due(5.3) == [(DIAL, "later", 0)]
    # The death (6.0) falls due within the slack of a visit at 5.6: it waits.
    assert keepalive.due(5.6) == []
    assert keepalive.next_deadline() == 6.0
    assert keepalive.due(6.0) == [(DEAD, "quiet", 0)]


def test_ping_slack_cuts_wakeups_for_many_idle_peers() -> None:
    peers, interval_s, slack_s = 200, 5.0, 0.25
    rng = random.Random(42)
    keepalive = make(rng.random, interval_s=interval_s, ping_slack_s=slack_s)
    for peer in range(peers):
        keepalive.link_up(peer, now=rng.random() * interval_s)  # spread out
    end, wakeups, pings, now = 100 * interval_s, 0, 0, 0.0
    while True:
        deadline = keepalive.next_deadline()
        assert deadline is not None and deadline >= now
        if deadline > end:
            break
        now = deadline
        wakeups += 1
        for kind, key, nonce in keepalive.due(now):
            assert kind == PING
            pings += 1
            keepalive.received(key, now)
            keepalive.pong(key, nonce, now)
    # Without slack: one wake-up per ping (about 40 per second). With it, at
    # most one per slack, and every peer is still pinged at least once per
    # interval.
    assert wakeups / end <= 1 / slack_s + 0.1
    assert pings >= peers * 100
    shortest = interval_s * (1 - keepalive.jitter) - slack_s
    assert pings <= peers * end / shortest + peers


def test_wakeups_with_data_flowing_stay_at_one_per_interval_per_link() -> None:
    # Data flows on every link, so pings are skipped; each link's heap entry
    # surfaces and moves about once per interval, however many frames flow.
    peers, interval_s, duration_s = 50, 5.0, 500.0
    keepalive = make(constant(0.5), interval_s=interval_s, timeout_s=15.0)
    for peer in range(peers):
        keepalive.link_up(peer, now=0.0)
    now = 0.0
    actions = 0
    wakeups = 0
    while now < duration_s:
        now += 0.01  # an inbox event: a frame each way on every link
        for peer in range(peers):
            keepalive.sent(peer, now)
            keepalive.received(peer, now)
        deadline = keepalive.next_deadline()
        assert deadline is not None
        if deadline <= now:
            wakeups += 1
            actions += len(keepalive.due(now))
    assert actions == 0
    per_link_per_interval = keepalive.heap_pops / peers / (duration_s / interval_s)
    assert per_link_per_interval <= 1.1
    assert wakeups <= keepalive.heap_pops


def test_stale_entries_do_not_pile_up_in_the_heap() -> None:
    keepalive = make(constant(0.0), backoff_cap_s=3600.0)
    for attempt in range(10_000):
        keepalive.schedule_dial(PEER, now=0.0, delay_s=3600.0 - attempt * 0.01)
        keepalive.link_up("flapping", now=float(attempt))
        keepalive.link_down("flapping", now=float(attempt), redial=False)
    assert len(keepalive._heap) <= 2 * 1 + 64 + 1
    assert keepalive.due(3600.0) == [(DIAL, PEER, 0)]
    assert keepalive.next_deadline() is None
