"""The spool's record format: round trips, and a torn or corrupt tail stops the read."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgenode.uplink.queue import Outgoing
from edgenode.uplink.records import (
    HEADER_BYTES,
    decode_records,
    encode_done,
    encode_message,
    message_record_bytes,
)


def test_round_trip() -> None:
    items = [Outgoing(1, "a/b", b"payload", 1), Outgoing(2, "tö", b"", 0)]
    data = encode_message(items[0]) + encode_done(7) + encode_message(items[1])
    messages, done, valid = decode_records(data)
    assert [(m.seq, m.topic, m.payload, m.qos) for m in messages] == [
        (1, "a/b", b"payload", 1),
        (2, "tö", b"", 0),
    ]
    assert done == [7] and valid == len(data)
    assert message_record_bytes(items[0]) == len(encode_message(items[0]))


def test_a_torn_record_ends_the_segment_where_it_starts() -> None:
    whole = encode_message(Outgoing(1, "t", b"one", 1))
    torn = encode_message(Outgoing(2, "t", b"two", 1))
    for cut in range(1, len(torn)):
        messages, _, valid = decode_records(whole + torn[:cut])
        assert [m.seq for m in messages] == [1] and valid == len(whole)


def test_a_corrupt_record_ends_the_segment() -> None:
    first = encode_message(Outgoing(1, "t", b"one", 1))
    second = bytearray(encode_message(Outgoing(2, "t", b"two", 1)))
    second[-1] ^= 0x01
    messages, _, valid = decode_records(first + bytes(second) + encode_done(1))
    assert [m.seq for m in messages] == [1] and valid == len(first)


def test_impossible_lengths_and_kinds_end_the_segment() -> None:
    assert decode_records(b"X" + bytes(8))[2] == 0
    assert decode_records(b"M\xff\xff\xff\xff" + bytes(4))[2] == 0
    assert decode_records(bytes(HEADER_BYTES - 1))[2] == 0


@given(st.binary(max_size=300))
def test_any_bytes_decode_without_raising(data: bytes) -> None:
    valid = decode_records(data)[2]
    assert 0 <= valid <= len(data)


@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=20), st.binary(max_size=50), st.sampled_from([0, 1]))
    )
)
def test_any_messages_round_trip(specs: list[tuple[str, bytes, int]]) -> None:
    items = [Outgoing(i + 1, t, p, q) for i, (t, p, q) in enumerate(specs)]
    data = b"".join(encode_message(i) for i in items)
    messages, _, valid = decode_records(data)
    assert [(m.topic, m.payload, m.qos) for m in messages] == specs and valid == len(data)
