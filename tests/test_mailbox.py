"""The bounded queue of the data path, and the subscription table on top of it."""

from __future__ import annotations

import anyio
import pytest
from anyio import ClosedResourceError, EndOfStream, WouldBlock

from edgenode.api import Incoming
from edgenode.errors import InvalidArgument, SubscriberStalled
from edgenode.mailbox import DROP_NEWEST, DROP_OLDEST, WAIT, Mailbox
from edgenode.subscriptions import EventFeed, Subscriptions, check_policy, check_size

pytestmark = pytest.mark.anyio


def test_mailbox_is_fifo_and_refuses_when_full_by_default() -> None:
    box: Mailbox[int] = Mailbox(2)
    assert box.put_nowait(1) and box.put_nowait(2)
    assert not box.put_nowait(3)  # WAIT: refused, for the caller to wait
    assert len(box) == 2 and box.dropped == 0
    assert [box.get_nowait(), box.get_nowait()] == [1, 2]
    with pytest.raises(WouldBlock):
        box.get_nowait()


@pytest.mark.parametrize(
    ("policy", "kept", "accepted"),
    [(DROP_OLDEST, [2, 3], True), (DROP_NEWEST, [1, 2], False)],
)
def test_mailbox_drop_policies_count_what_they_drop(
    policy: str, kept: list[int], accepted: bool
) -> None:
    box: Mailbox[int] = Mailbox(2, policy)
    box.put_nowait(1)
    box.put_nowait(2)
    assert box.put_nowait(3) is accepted
    assert list(box.drain()) == kept
    assert box.dropped == 1


def test_mailbox_rejects_bad_construction() -> None:
    with pytest.raises(ValueError, match=r"^mailbox capacity: expected at least 1, got 0$"):
        Mailbox(0)
    with pytest.raises(ValueError, match=r"^mailbox policy: expected one of"):
        Mailbox(1, "drop-everything")


def test_closed_mailbox_hands_out_what_it_holds_then_its_error() -> None:
    box: Mailbox[int] = Mailbox(4)
    box.put_nowait(1)
    box.close()
    with pytest.raises(ClosedResourceError):
        box.put_nowait(2)
    assert box.get_nowait() == 1
    with pytest.raises(EndOfStream):
        box.get_nowait()
    other: Mailbox[int] = Mailbox(4)
    other.put_nowait(7)
    error = SubscriberStalled("stalled")
    other.close(error)
    other.close()  # idempotent: the first error stays
    assert other.get_nowait() == 7
    with pytest.raises(SubscriberStalled) as raised:
        other.get_nowait()
    assert raised.value is error


def test_put_beyond_capacity_is_for_the_frames_that_may_not_wait() -> None:
    box: Mailbox[bytes] = Mailbox(1)
    box.put_nowait(b"data")
    box.put_beyond_capacity(b"bye")
    assert len(box) == 2
    box.close()
    with pytest.raises(ClosedResourceError):
        box.put_beyond_capacity(b"late")


async def test_get_does_not_yield_while_items_wait() -> None:
    box: Mailbox[int] = Mailbox(8)
    for i in range(8):
        box.put_nowait(i)
    ran = False

    async def other() -> None:
        nonlocal ran
        ran = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        assert [await box.get() for _ in range(8)] == list(range(8))
        assert not ran  # no checkpoint while items were there
        await anyio.lowlevel.checkpoint()
        assert ran


async def test_waiting_putter_and_getter_are_woken_and_a_cancelled_waiter_loses_nothing() -> None:
    box: Mailbox[int] = Mailbox(1)
    box.put_nowait(1)
    order: list[str] = []

    async def put_second() -> None:
        await box.put(2)
        order.append("put 2")

    async with anyio.create_task_group() as tg:
        tg.start_soon(put_second)
        await anyio.wait_all_tasks_blocked()
        assert order == [] and len(box) == 1  # full: the putter waits
        assert box.get_nowait() == 1
        await anyio.wait_all_tasks_blocked()
        assert order == ["put 2"]
    # A getter cancelled while it waited took nothing: the item is still there.
    empty: Mailbox[int] = Mailbox(1)
    with anyio.move_on_after(0.01):
        await empty.get()
    empty.put_nowait(5)
    assert empty.get_nowait() == 5


async def test_closing_wakes_waiters() -> None:
    box: Mailbox[int] = Mailbox(1)
    outcome: list[str] = []

    async def getter() -> None:
        try:
            await box.get()
        except EndOfStream:
            outcome.append("end")

    async with anyio.create_task_group() as tg:
        tg.start_soon(getter)
        await anyio.wait_all_tasks_blocked()
        box.close()
    assert outcome == ["end"]


# -- the subscription table ----------------------------------------------------------


def incoming(topic: str, payload: bytes = b"x") -> Incoming:
    return Incoming("10.0.0.2", "node", topic, payload)


def test_offer_matches_exact_and_wildcard_topics_and_counts_the_unrouted() -> None:
    subs = Subscriptions(stall_timeout_s=1.0)
    exact = subs.subscribe("a/b", 4)
    wild = subs.subscribe("a/#", 4)
    everything = subs.subscribe("#", 4)
    assert subs.offer(incoming("a/b")) is None
    assert subs.offer(incoming("a/c")) is None
    assert subs.offer(incoming("z")) is None
    assert [exact.queued, wild.queued, everything.queued] == [1, 2, 3]
    exact.close()
    wild.close()
    everything.close()
    assert subs.offer(incoming("a/b")) is None
    assert subs.unrouted == 1


def test_offer_returns_the_full_subscriptions_and_drop_policies_never_wait() -> None:
    subs = Subscriptions(stall_timeout_s=1.0)
    waits = subs.subscribe("t", 1)
    drops = subs.subscribe("t", 1, DROP_NEWEST)
    assert subs.offer(incoming("t", b"1")) is None
    full = subs.offer(incoming("t", b"2"))
    assert full == [waits]
    assert drops.dropped == 1 and drops.delivered == 2


async def test_wait_for_delivers_once_there_is_room() -> None:
    subs = Subscriptions(stall_timeout_s=10.0)
    sub = subs.subscribe("t", 1)
    subs.offer(incoming("t", b"1"))
    second = incoming("t", b"2")
    full = subs.offer(second)
    assert full == [sub]
    async with anyio.create_task_group() as tg:
        tg.start_soon(subs.wait_for, full, second, "10.0.0.2")
        await anyio.wait_all_tasks_blocked()
        assert (await sub.receive()).payload == b"1"
    assert (await sub.receive()).payload == b"2"
    assert subs.stalled == 0 and sub.dropped == 0


async def test_a_subscription_that_takes_nothing_is_ended_after_its_stall_bound() -> None:
    subs = Subscriptions(stall_timeout_s=0.05)
    stuck = subs.subscribe("t", 1)
    subs.offer(incoming("t", b"held"))
    late = incoming("t", b"late")
    full = subs.offer(late)
    assert full is not None
    await subs.wait_for(full, late, "10.0.0.2")
    assert subs.stalled == 1 and stuck.dropped == 1 and stuck.stalled_at is not None
    assert (await stuck.receive()).payload == b"held"
    with pytest.raises(SubscriberStalled) as raised:
        await stuck.receive()
    assert str(raised.value) == (
        "subscription to 't' took nothing for 0.05 s and was ended; "
        "a message from 10.0.0.2 was not delivered to it"
    )
    assert subs.offer(incoming("t")) is None  # no longer subscribed
    assert subs.unrouted == 1


def test_event_feed_drops_the_oldest_and_counts() -> None:
    feed = EventFeed()
    stream = feed.open(2)
    for event in ("up", "down", "up again"):
        feed.publish(event)
    assert [stream.receive_nowait(), stream.receive_nowait()] == ["down", "up again"]
    assert feed.dropped == 1
    stream.close()
    stream.close()  # idempotent
    feed.publish("nobody listens")


def test_stream_argument_checks() -> None:
    assert check_policy(WAIT) == WAIT and check_policy(DROP_OLDEST) == DROP_OLDEST
    with pytest.raises(InvalidArgument) as raised:
        check_policy("drop")
    assert str(raised.value) == (
        "on_full: expected one of 'wait', 'drop-oldest', 'drop-newest', got 'drop'"
    )
    with pytest.raises(InvalidArgument) as raised:
        check_size(0)
    assert str(raised.value) == "buffer: expected an integer in 1..1000000, got 0"
    with pytest.raises(InvalidArgument):
        check_size(True)


def test_drops_of_closed_subscriptions_and_event_streams_stay_counted() -> None:
    from edgenode.api import Incoming
    from edgenode.subscriptions import EventFeed, Subscriptions

    subs = Subscriptions(stall_timeout_s=1.0)
    for topic in ("t", "#"):
        stream = subs.subscribe(topic, 1, "drop-oldest")
        for n in range(3):
            subs.offer(Incoming("127.0.0.3", None, "t", b"%d" % n))
        stream.close()
        stream.close()  # idempotent: counted once
    assert subs.dropped == 4
    feed = EventFeed()
    events = feed.open(1)
    for n in range(3):
        feed.publish(n)
    events.close()
    events.close()
    assert feed.dropped == 2
