"""Tests of firmware_bridge.cobs: the codec, the stream splitter, every error."""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import cobs
from firmware_bridge.cobs import (
    FrameError,
    FrameSplitter,
    LinkError,
    decode,
    encode,
    hex_preview,
    max_encoded_len,
)


@contextlib.contextmanager
def bad_cobs(match: str) -> Iterator[pytest.ExceptionInfo[FrameError]]:
    """Expect a FrameError whose reason is "bad cobs" and whose message matches."""
    with pytest.raises(FrameError, match=match) as info:
        yield info
    assert info.value.reason == "bad cobs"


def is_oversize(item: object) -> bool:
    return isinstance(item, FrameError) and item.reason == "oversize"


# --- the codec -----------------------------------------------------------------

# The examples of the Wikipedia article on COBS (the usual reference vectors).
RUN_254 = bytes(range(1, 255))
VECTORS = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (RUN_254, b"\xff" + RUN_254),
    (b"\x00" + RUN_254, b"\x01\xff" + RUN_254),
    (bytes(range(1, 256)), b"\xff" + RUN_254 + b"\x02\xff"),
    (bytes(range(2, 256)) + b"\x00", b"\xff" + bytes(range(2, 256)) + b"\x01\x01"),
    (bytes(range(3, 256)) + b"\x00\x01", b"\xfe" + bytes(range(3, 256)) + b"\x02\x01"),
]


@pytest.mark.parametrize(("raw", "encoded"), VECTORS)
def test_encode_matches_reference_vectors(raw: bytes, encoded: bytes) -> None:
    assert encode(raw) == encoded
    assert decode(encoded) == raw


def test_encode_empty_is_one_code_byte() -> None:
    assert encode(b"") == b"\x01"
    assert decode(b"\x01") == b""


def test_decode_accepts_a_trailing_empty_block_after_a_full_one() -> None:
    # Some encoders write 0x01 after a final full block; it means nothing.
    assert decode(b"\xff" + RUN_254 + b"\x01") == RUN_254


def test_encode_accepts_bytearray_and_memoryview() -> None:
    assert encode(bytearray(b"\x11\x00")) == b"\x02\x11\x01"
    assert encode(memoryview(b"\x11\x00")) == b"\x02\x11\x01"
    assert decode(bytearray(b"\x02\x11\x01")) == b"\x11\x00"


@given(st.binary(max_size=2000))
def test_round_trip(raw: bytes) -> None:
    encoded = encode(raw)
    assert b"\x00" not in encoded
    assert len(encoded) <= max_encoded_len(len(raw))
    assert decode(encoded) == raw


@given(st.binary(max_size=600).filter(lambda b: b"\x00" not in b))
def test_zero_free_data_costs_one_byte_per_254(raw: bytes) -> None:
    assert len(encode(raw)) == max_encoded_len(len(raw)) - (1 if raw and len(raw) % 254 == 0 else 0)


@given(st.binary(max_size=600))
def test_decoder_raises_only_its_own_error(data: bytes) -> None:
    try:
        decode(data)
    except FrameError as exc:
        assert exc.reason == "bad cobs"
        assert str(exc).startswith("bad cobs: ")


def test_decode_rejects_empty_frame() -> None:
    with bad_cobs(r"^bad cobs: empty frame$"):
        decode(b"")


def test_decode_rejects_zero_inside_frame() -> None:
    with bad_cobs(r"^bad cobs: 0x00 at offset 2 inside a frame: 03 11 00 22$"):
        decode(b"\x03\x11\x00\x22")


@given(st.binary(min_size=1, max_size=300).filter(lambda data: b"\x00" in data))
def test_decode_names_the_first_zero_wherever_it_is(data: bytes) -> None:
    """A 0x00 in a block, as a code byte, or past a block that overruns: the first one."""
    with bad_cobs(rf"^bad cobs: 0x00 at offset {data.index(0)} inside"):
        decode(data)


def test_decode_rejects_block_past_the_end() -> None:
    with bad_cobs(r"^bad cobs: block at offset 2 claims 4 bytes, only 1 remain: 02 11 05 22$"):
        decode(b"\x02\x11\x05\x22")


def test_decode_error_shows_truncated_hex() -> None:
    with bad_cobs("^bad cobs: ") as info:
        decode(b"\x50" + b"\x11" * 40)
    assert str(info.value).endswith(
        "50 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 ... (41 bytes)"
    )


def test_hex_preview() -> None:
    assert hex_preview(b"") == ""
    assert hex_preview(b"\x00\xab") == "00 ab"
    assert hex_preview(bytes(17)) == " ".join(["00"] * 16) + " ... (17 bytes)"


def test_max_encoded_len() -> None:
    assert max_encoded_len(0) == 1
    assert max_encoded_len(253) == 254
    assert max_encoded_len(254) == 256
    assert max_encoded_len(260) == 262


# --- errors --------------------------------------------------------------------


def test_error_hierarchy() -> None:
    assert issubclass(LinkError, Exception)
    assert issubclass(FrameError, LinkError)
    error = FrameError("bad cobs: empty frame", "bad cobs")
    assert (str(error), error.reason) == ("bad cobs: empty frame", "bad cobs")


# --- the splitter --------------------------------------------------------------

FRAMES = [b"\x01", b"\x05hello", b"\x02\x11\x01", b"\xff" + RUN_254]
STREAM = b"".join(f + b"\x00" for f in FRAMES)


def _feed_all(splitter: FrameSplitter, chunks: list[bytes]) -> list[object]:
    items: list[object] = []
    for chunk in chunks:
        items += splitter.feed(chunk)
        assert splitter.buffered <= splitter.max_frame_bytes
    return items


def test_splitter_whole_stream() -> None:
    assert FrameSplitter(300).feed(STREAM) == FRAMES


def test_splitter_byte_by_byte() -> None:
    splitter = FrameSplitter(300)
    assert _feed_all(splitter, [STREAM[i : i + 1] for i in range(len(STREAM))]) == FRAMES
    assert splitter.buffered == 0


@given(st.data())
def test_splitter_any_chunking(data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(STREAM)), max_size=20)))
    bounds = [0, *cuts, len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(bounds, bounds[1:])]
    assert _feed_all(FrameSplitter(300), chunks) == FRAMES


def test_splitter_holds_partial_frame() -> None:
    splitter = FrameSplitter(10)
    assert splitter.feed(b"\x03ab") == []
    assert splitter.buffered == 3
    assert splitter.feed(b"\x00") == [b"\x03ab"]
    assert splitter.buffered == 0


def test_splitter_ignores_empty_frames() -> None:
    assert FrameSplitter(10).feed(b"\x00\x00\x02a\x00\x00") == [b"\x02a"]


def test_splitter_accepts_memoryview() -> None:
    assert FrameSplitter(10).feed(memoryview(b"\x02a\x00")) == [b"\x02a"]


def test_splitter_rejects_oversize_frame_and_resynchronises() -> None:
    splitter = FrameSplitter(8)
    items = splitter.feed(b"\x02a\x00" + b"\x11" * 20 + b"\x00\x02b\x00")
    assert items[0] == b"\x02a"
    assert is_oversize(items[1])
    assert str(items[1]) == (
        "oversize frame: 20 bytes exceed the 8-byte limit: "
        "11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11"
    )
    assert items[2:] == [b"\x02b"]


def test_splitter_never_buffers_an_oversize_frame() -> None:
    splitter = FrameSplitter(8)
    items = _feed_all(splitter, [b"\x22"] * 1000)
    assert items == []
    assert splitter.buffered == 0
    items = splitter.feed(b"\x00\x02c\x00")
    assert len(items) == 2
    assert is_oversize(items[0])
    assert str(items[0]).startswith("oversize frame: 1000 bytes exceed the 8-byte limit: 22 22")
    assert items[1] == b"\x02c"


def test_splitter_frame_at_the_limit_passes() -> None:
    splitter = FrameSplitter(8)
    assert splitter.feed(b"\x09" + b"x" * 7 + b"\x00") == [b"\x09" + b"x" * 7]
    assert is_oversize(splitter.feed(b"\x0a" + b"x" * 8 + b"\x00")[0])


def test_splitter_resynchronises_after_garbage() -> None:
    # Garbage before a frame merges with it (the link's CRC rejects that);
    # the frame after the next delimiter is clean.
    splitter = FrameSplitter(300)
    items = splitter.feed(b"\x99\x98\x97" + STREAM)
    assert items[0] == b"\x99\x98\x97\x01"
    assert items[1:] == FRAMES[1:]


def test_splitter_reset_forgets_partial_frame() -> None:
    splitter = FrameSplitter(8)
    splitter.feed(b"\x05abc")
    splitter.reset()
    assert splitter.buffered == 0
    assert splitter.feed(b"\x02z\x00") == [b"\x02z"]
    splitter.feed(b"x" * 20)
    splitter.reset()
    assert splitter.feed(b"\x02z\x00") == [b"\x02z"]


def test_splitter_rejects_bad_limit() -> None:
    with pytest.raises(ValueError, match=r"^max_frame_bytes must be positive, got 0$"):
        FrameSplitter(0)


@settings(max_examples=50)
@given(st.lists(st.binary(max_size=60), max_size=10), st.integers(0, 2**32 - 1))
def test_splitter_with_codec_on_random_chunks(payloads: list[bytes], seed: int) -> None:
    stream = b"".join(encode(p) + b"\x00" for p in payloads)
    rng = random.Random(seed)
    chunks = []
    pos = 0
    while pos < len(stream):
        step = rng.randint(1, 17)
        chunks.append(stream[pos : pos + step])
        pos += step
    splitter = FrameSplitter(max_encoded_len(60))
    assert [decode(f) for f in _feed_all(splitter, chunks)] == payloads


def test_module_names_its_delimiter() -> None:
    assert cobs.DELIMITER == b"\x00"
    assert re.fullmatch(r"[0-9a-f ]*", hex_preview(bytes(range(16))))
