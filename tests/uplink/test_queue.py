"""The store-and-forward queue: order, in-flight messages, both caps, both policies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgenode.uplink.queue import ITEM_OVERHEAD_BYTES, Outgoing, OutQueue


def item(seq: int, payload: bytes = b"x", topic: str = "t") -> Outgoing:
    return Outgoing(seq, topic, payload, 1)


def test_size_counts_payload_topic_and_overhead() -> None:
    assert item(1, b"abc", "tö").size == 3 + 3 + ITEM_OVERHEAD_BYTES


def test_messages_leave_in_order_and_stay_until_acknowledged() -> None:
    q = OutQueue(10, 10_000)
    for seq in (1, 2, 3):
        assert q.offer(item(seq)) == (True, [])
    taken = [q.take(), q.take()]
    assert [i.seq for i in taken if i] == [1, 2]
    assert (len(q), q.waiting, q.inflight) == (3, 1, 2)
    assert q.done(2) is taken[1]
    assert q.done(2) is None
    assert (len(q), q.acknowledged) == (2, 1)


def test_a_lost_connection_puts_in_flight_messages_back_in_front_in_order() -> None:
    q = OutQueue(10, 10_000)
    for seq in range(1, 6):
        q.offer(item(seq))
    for _ in range(3):
        q.take()
    q.done(2)
    assert q.requeue_inflight() == 2
    assert [q.take().seq for _ in range(4)] == [1, 3, 4, 5]  # type: ignore[union-attr]


def test_drop_oldest_drops_the_oldest_waiting_and_counts_them() -> None:
    q = OutQueue(3, 10_000, "drop-oldest")
    for seq in (1, 2, 3):
        q.offer(item(seq))
    q.take()  # 1 is in flight: never dropped
    accepted, dropped = q.offer(item(4))
    assert accepted and [i.seq for i in dropped] == [2]
    assert q.dropped_oldest == 1 and len(q) == 3
    assert [q.take().seq, q.take().seq] == [3, 4]  # type: ignore[union-attr]


def test_refuse_new_refuses_and_counts() -> None:
    q = OutQueue(2, 10_000, "refuse-new")
    q.offer(item(1))
    q.offer(item(2))
    assert q.offer(item(3)) == (False, [])
    assert q.refused_new == 1 and len(q) == 2


def test_the_byte_cap_holds_too() -> None:
    big = b"x" * 1000
    q = OutQueue(100, 3 * (1000 + 1 + ITEM_OVERHEAD_BYTES), "drop-oldest")
    for seq in range(1, 6):
        q.offer(item(seq, big))
    assert len(q) == 3 and q.dropped_oldest == 2
    assert q.bytes == 3 * (1000 + 1 + ITEM_OVERHEAD_BYTES)


def test_a_message_larger_than_the_queue_is_refused_under_either_policy() -> None:
    for policy in ("drop-oldest", "refuse-new"):
        q = OutQueue(10, 500, policy)
        q.offer(item(1))
        assert q.offer(item(2, b"x" * 600)) == (False, [])
        assert q.refused_new == 1 and len(q) == 1


def test_when_all_are_in_flight_drop_oldest_must_refuse() -> None:
    q = OutQueue(2, 10_000, "drop-oldest")
    q.offer(item(1))
    q.offer(item(2))
    q.take()
    q.take()
    assert q.offer(item(3)) == (False, [])
    assert (q.refused_new, q.dropped_oldest) == (1, 0)


def test_drop_by_sequence_numbers_counts_as_dropped_oldest() -> None:
    q = OutQueue(10, 10_000)
    for seq in range(1, 5):
        q.offer(item(seq))
    assert [i.seq for i in q.drop({1, 3})] == [1, 3]
    assert q.dropped_oldest == 2 and len(q) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 10, "drop-oldest"), "caps: expected >= 1, got 0 messages, 10 bytes"),
        ((1, 10, "x"), "policy: expected one of ('drop-oldest', 'refuse-new'), got 'x'"),
    ],
)
def test_bad_construction(args: tuple[int, int, str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        OutQueue(*args)
    assert str(info.value) == message


@given(
    st.sampled_from(["drop-oldest", "refuse-new"]),
    st.lists(st.sampled_from(["offer", "take", "ack", "lose"]), max_size=200),
)
def test_caps_and_order_hold_whatever_happens(policy: str, actions: list[str]) -> None:
    q = OutQueue(5, 5 * (2 + 1 + ITEM_OVERHEAD_BYTES) + 100, policy)
    seq = 0
    inflight: list[int] = []
    sent: list[int] = []
    for action in actions:
        if action == "offer":
            seq += 1
            q.offer(item(seq, b"ab"))
        elif action == "take":
            taken = q.take()
            if taken is not None:
                inflight.append(taken.seq)
                sent.append(taken.seq)
        elif action == "ack" and inflight:
            assert q.done(inflight.pop(0)) is not None
        elif action == "lose":
            q.requeue_inflight()
            inflight.clear()
        assert len(q) <= 5 and 0 <= q.bytes <= q.max_bytes
        assert q.accepted == q.acknowledged + len(q) + q.dropped_oldest
    # Sent again after a loss, never out of order otherwise: first sends increase.
    firsts = list(dict.fromkeys(sent))
    assert firsts == sorted(firsts)
