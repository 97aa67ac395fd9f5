"""Tests of firmware_bridge.cbor that run on MicroPython as well as under pytest.

``tests/micropython/run.py`` runs them on the real MicroPython runtime (see
``.ci/micropython.sh``); pytest collects them on CPython. So: plain
``test_*`` functions and asserts, no pytest, hypothesis or cbor2 (the
CPython-only tests with those are in tests/firmware_bridge/test_cbor.py).
MicroPython dicts are not ordered: multi-key maps are compared as decoded
values, never as bytes.
"""

import sys

from firmware_bridge.cbor import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ITEMS,
    MAX_DEPTH,
    CBORError,
    decode,
    encode,
)

ON_MICROPYTHON = sys.implementation.name == "micropython"

# MicroPython's str(bytes, "utf-8") rejects malformed sequences but accepts
# encoded surrogates, overlong forms and code points above U+10FFFF, which
# RFC 8949 (and CPython) reject; and its str can hold a lone surrogate. The
# runner reports these as xfail on MicroPython until cbor.py validates UTF-8
# itself; under pytest on CPython they must pass.
KNOWN_FAILURES = (
    {
        "test_decode_rejects_utf8_that_micropython_str_accepts": (
            "MicroPython's str() accepts surrogates, overlong forms and > U+10FFFF"
        ),
        "test_encode_rejects_str_with_lone_surrogate": (
            "a MicroPython str can hold a lone surrogate and encodes it as utf-8"
        ),
    }
    if ON_MICROPYTHON
    else {}
)


def _raises(kind: type, prefix: str, call, *args, **kwargs) -> str:
    """Assert ``call(*args, **kwargs)`` raises exactly ``kind`` with a message
    starting with ``prefix``; return the message."""
    caught = None
    try:
        call(*args, **kwargs)
    except Exception as exc:
        caught = exc
    assert caught is not None, f"nothing raised, expected {kind.__name__}: {prefix}"
    assert type(caught) is kind, f"{type(caught).__name__} raised, not {kind.__name__}: {caught}"
    message = str(caught)
    assert message.startswith(prefix), f"message {message!r} does not start with {prefix!r}"
    return message


def _has_multi_key_map(value: object) -> bool:
    if isinstance(value, dict):
        if len(value) > 1:
            return True
        return any(_has_multi_key_map(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_multi_key_map(v) for v in value)
    return False


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

FLOATS = "(floats are not allowed)"
TAGS = "(tags are not allowed)"
SIMPLE = "(only false, true and null are allowed)"
INDEFINITE = "(indefinite lengths are not allowed)"

# (hex, message fragment, offset of the offending initial byte) for every
# Appendix A vector of a kind the subset rejects.
APPENDIX_A_REJECTED = [
    ("c249010000000000000000", TAGS, 0),  # bignums are tags 2 and 3
    ("c349010000000000000000", TAGS, 0),
    ("f90000", "float16 " + FLOATS, 0),
    ("f98000", FLOATS, 0),
    ("f93c00", FLOATS, 0),
    ("fb3ff199999999999a", "float64 " + FLOATS, 0),
    ("f93e00", FLOATS, 0),
    ("f97bff", FLOATS, 0),
    ("fa47c35000", "float32 " + FLOATS, 0),
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


def test_appendix_a_encodes() -> None:
    for value, hexed in APPENDIX_A_SUPPORTED:
        encoded = encode(value)
        if _has_multi_key_map(value):
            # Pair order follows the dict's, which MicroPython does not keep.
            assert len(encoded) == len(hexed) // 2, hexed
            assert decode(encoded) == value, hexed
        else:
            assert encoded.hex() == hexed, (encoded.hex(), hexed)


def test_appendix_a_decodes() -> None:
    for value, hexed in APPENDIX_A_SUPPORTED:
        decoded = decode(bytes.fromhex(hexed))
        assert decoded == value, hexed
        assert type(decoded) is type(value), hexed


def test_appendix_a_unsupported_kinds_are_rejected() -> None:
    for hexed, fragment, offset in APPENDIX_A_REJECTED:
        data = bytes.fromhex(hexed)
        message = _raises(CBORError, "cbor: unsupported ", decode, data)
        assert fragment in message, (hexed, message)
        assert message.endswith(f"initial byte 0x{data[offset]:02x} at offset {offset}"), message


# --- decoding: accepted inputs -----------------------------------------------


def test_decode_accepts_non_shortest_int_heads() -> None:
    for hexed in ("1800", "190000", "1a00000000", "1b0000000000000000"):
        assert decode(bytes.fromhex(hexed)) == 0, hexed
    assert decode(bytes.fromhex("3b0000000000000000")) == -1


def test_decode_accepts_bytes_like_input_and_returns_bytes() -> None:
    for kind in (bytes, bytearray, memoryview):
        decoded = decode(kind(bytes.fromhex("824201026161")))
        assert decoded == [b"\x01\x02", "a"]
        assert type(decoded[0]) is bytes


def test_decode_accepts_memoryview_slice() -> None:
    buf = memoryview(b"\xff\x83\x01\x02\x03\xff")
    assert decode(buf[1:-1]) == [1, 2, 3]


def test_decode_accepts_nesting_at_default_max_depth() -> None:
    value = decode(b"\x81" * DEFAULT_MAX_DEPTH + b"\x00")
    for _ in range(DEFAULT_MAX_DEPTH):
        value = value[0]
    assert value == 0


def test_decode_accepts_nesting_at_max_depth_ceiling() -> None:
    # The decoder recurses once per level: this is the deepest it may go,
    # on this runtime's stack.
    value = decode(b"\x81" * MAX_DEPTH + b"\xf6", max_depth=MAX_DEPTH)
    for _ in range(MAX_DEPTH):
        value = value[0]
    assert value is None
    value = decode(b"\xa1\x00" * MAX_DEPTH + b"\x01", max_depth=MAX_DEPTH)
    for _ in range(MAX_DEPTH):
        value = value[0]
    assert value == 1


def test_decode_accepts_items_at_max_items() -> None:
    data = encode([[0] * 511, {i: 0 for i in range(511)}])
    assert len(decode(data)[1]) == 511  # 2 + 511 + 511 = 1024 items


def test_decode_accepts_input_at_max_bytes() -> None:
    data = encode(b"x" * 10)
    assert decode(data, max_bytes=len(data)) == b"x" * 10


def test_default_limits() -> None:
    assert (DEFAULT_MAX_DEPTH, DEFAULT_MAX_ITEMS, MAX_DEPTH) == (8, 1024, 32)


def test_decode_keeps_big_ints_exact() -> None:
    # Beyond a small int on a 32-bit port: the runtime must use big ints.
    for value in (2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63) - 1, -(2**64)):
        assert decode(encode(value)) == value, value


# --- decoding: every error ---------------------------------------------------


def test_decode_rejects_empty_input() -> None:
    _raises(CBORError, "cbor: truncated: need 1 bytes at offset 0, have 0", decode, b"")


def test_decode_rejects_truncated_input() -> None:
    for hexed, need, offset, have in (
        ("18", 1, 1, 0),
        ("19ff", 2, 1, 1),
        ("1a0000ff", 4, 1, 3),
        ("1b00000000000000", 8, 1, 7),
        ("3b", 8, 1, 0),
        ("828101", 1, 3, 0),  # [[1], <missing>]
        ("a201820000", 1, 5, 0),  # {1: [0, 0], <missing key>}
        ("a20182000000", 1, 6, 0),  # {1: [0, 0], 0: <missing value>}
    ):
        message = _raises(CBORError, "cbor: truncated: ", decode, bytes.fromhex(hexed))
        assert message == f"cbor: truncated: need {need} bytes at offset {offset}, have {have}"


def _is_truncation(message: str) -> bool:
    return message.startswith("cbor: truncated: ") or (
        message.startswith("cbor: ")
        and (" exceeds the " in message or " needs at least " in message)
    )


def test_decode_rejects_every_strict_prefix() -> None:
    encodings = [bytes.fromhex(hexed) for _, hexed in APPENDIX_A_SUPPORTED]
    encodings.append(encode({"id": 7, "data": b"\x00" * 30, "tags": ["a", "\u6c34", None]}))
    encodings.append(encode([2**64 - 1, -(2**64), "x" * 300, {1: [True, False]}]))
    for data in encodings:
        for cut in range(len(data)):
            message = _raises(CBORError, "cbor: ", decode, data[:cut], max_depth=MAX_DEPTH)
            assert _is_truncation(message), (data[:cut].hex(), message)


def test_decode_rejects_trailing_bytes() -> None:
    for hexed, message in (
        ("00ff", "cbor: 1 trailing bytes after item at offset 1: ff"),
        ("f6f6f6", "cbor: 2 trailing bytes after item at offset 1: f6 f6"),
        (
            "00" + "ab" * 20,
            "cbor: 20 trailing bytes after item at offset 1: " + "ab " * 16 + "... (20 bytes)",
        ),
        ("83010203" + "00", "cbor: 1 trailing bytes after item at offset 4: 00"),
    ):
        assert _raises(CBORError, "cbor: ", decode, bytes.fromhex(hexed)) == message


def test_decode_rejects_string_longer_than_input() -> None:
    for hexed, kind in (("5bffffffffffffffff", "byte string"), ("7a00010000", "text string")):
        _raises(CBORError, f"cbor: {kind} of ", decode, bytes.fromhex(hexed))
    _raises(
        CBORError,
        "cbor: byte string of 3 bytes at offset 1 exceeds the 2 bytes remaining",
        decode,
        bytes.fromhex("81430102"),
    )


def test_decode_rejects_count_larger_than_input_can_hold() -> None:
    for hexed, message in (
        (
            "9bffffffffffffffff",
            "cbor: array of 18446744073709551615 elements at offset 0 needs at least "
            "18446744073709551615 bytes, only 0 remain",
        ),
        ("84000102", "cbor: array of 4 elements at offset 0 needs at least 4 bytes, only 3 remain"),
        ("a30102030405", "cbor: map of 3 pairs at offset 0 needs at least 6 bytes, only 5 remain"),
        (
            "bbffffffffffffffff00",
            "cbor: map of 18446744073709551615 pairs at offset 0 needs at least "
            "36893488147419103230 bytes, only 1 remain",
        ),
    ):
        assert _raises(CBORError, "cbor: ", decode, bytes.fromhex(hexed)) == message


def test_decode_checks_declared_length_before_allocating() -> None:
    # A 9-byte frame that declares 2**64-1 elements must fail on the count
    # check, not by building a huge list (a MemoryError on a board).
    for head in ("9b", "bb", "5b", "7b"):
        message = _raises(CBORError, "cbor: ", decode, bytes.fromhex(head + "ff" * 8))
        assert " needs at least " in message or " exceeds the " in message, message


def test_decode_rejects_nesting_deeper_than_default_max_depth() -> None:
    data = b"\x81" * (DEFAULT_MAX_DEPTH + 1) + b"\x00"
    _raises(CBORError, "cbor: nesting deeper than 8 levels at offset 8", decode, data)


def test_decode_rejects_nesting_deeper_than_given_max_depth() -> None:
    data = bytes.fromhex("81a1616180")  # [{"a": []}]
    assert decode(data, max_depth=3) == [{"a": []}]
    _raises(CBORError, "cbor: nesting deeper than 2 levels at offset 4", decode, data, max_depth=2)
    _raises(CBORError, "cbor: nesting deeper than 0 levels at offset 0", decode, data, max_depth=0)


def test_decode_rejects_max_depth_above_ceiling() -> None:
    message = _raises(ValueError, "cbor: max_depth 33 ", decode, b"\x00", max_depth=MAX_DEPTH + 1)
    assert message == "cbor: max_depth 33 is above the ceiling of 32"


def test_decode_rejects_more_items_than_max_items() -> None:
    data = encode([[0] * 511, {i: 0 for i in range(512)}])  # 1025 items
    offset = len(encode([[0] * 511]))
    message = _raises(CBORError, "cbor: more than 1024 array elements and map pairs", decode, data)
    assert message.endswith(f"in total (1025 with the map at offset {offset})"), message


def test_decode_rejects_more_items_than_given_max_items() -> None:
    _raises(
        CBORError,
        "cbor: more than 2 array elements and map pairs in total (3 with the array at offset 0)",
        decode,
        encode([1, 2, 3]),
        max_items=2,
    )


def test_decode_rejects_input_over_max_bytes() -> None:
    data = encode(b"x" * 10)
    _raises(
        CBORError, "cbor: input of 11 bytes exceeds the 10-byte limit", decode, data, max_bytes=10
    )


def test_decode_rejects_invalid_utf8() -> None:
    # Malformed sequences: rejected on both runtimes.
    for hexed, message in (
        ("62c328", "cbor: text string at offset 0 is not valid utf-8: c3 28"),
        ("8161ff", "cbor: text string at offset 1 is not valid utf-8: ff"),
        ("62e6b0", "cbor: text string at offset 0 is not valid utf-8: e6 b0"),
        ("6180", "cbor: text string at offset 0 is not valid utf-8: 80"),
    ):
        assert _raises(CBORError, "cbor: text string ", decode, bytes.fromhex(hexed)) == message


def test_decode_rejects_utf8_that_micropython_str_accepts() -> None:
    accepted = []
    for hexed, shown in (
        ("63eda080", "ed a0 80"),  # an encoded surrogate, U+D800
        ("62c080", "c0 80"),  # overlong NUL
        ("64f4908080", "f4 90 80 80"),  # U+110000, above the last code point
    ):
        try:
            value = decode(bytes.fromhex(hexed))
        except CBORError as exc:
            assert str(exc) == "cbor: text string at offset 0 is not valid utf-8: " + shown, exc
            continue
        accepted.append(f"{shown} as {value!r}")
    assert not accepted, "decoded invalid utf-8: " + ", ".join(accepted)


def test_decode_rejects_map_key_of_wrong_type() -> None:
    for hexed, initial, offset in (
        ("a1f500", "f5", 1),  # {true: 0}
        ("a1f600", "f6", 1),  # {null: 0}
        ("a1420102f6", "42", 1),  # {h'0102': null}
        ("a18000", "80", 1),  # {[]: 0}
        ("a1a000", "a0", 1),  # {{}: 0}
        ("a20001f9000000", "f9", 3),  # float key, after a valid pair
        ("a1c000", "c0", 1),  # tag key
    ):
        _raises(
            CBORError,
            f"cbor: map key at offset {offset} must be an int or text string, "
            f"got initial byte 0x{initial}",
            decode,
            bytes.fromhex(hexed),
        )


def test_decode_rejects_duplicate_map_key() -> None:
    for hexed, shown, offset in (
        ("a2010201f6", "1", 3),
        ("a2616101616102", "'a'", 4),
        ("a220003800f6", "-1", 3),  # the same key again, in a non-shortest head
        ("a2" + "7828" + "61" * 40 + "00" + "7828" + "61" * 40 + "00", "'" + "a" * 36 + "...", 44),
    ):
        message = _raises(CBORError, "cbor: duplicate map key ", decode, bytes.fromhex(hexed))
        assert message == f"cbor: duplicate map key {shown} at offset {offset}", message


def test_decode_rejects_reserved_additional_info() -> None:
    for major in range(8):
        for ai in (28, 29, 30):
            ib = major << 5 | ai
            data = bytes((ib,)) + b"\x00" * 8
            if major == 6:  # a tag is rejected as a tag, whatever follows
                message = _raises(CBORError, "cbor: unsupported tag ", decode, data)
            else:
                message = _raises(
                    CBORError,
                    f"cbor: unsupported reserved additional info {ai}: initial byte 0x{ib:02x}",
                    decode,
                    data,
                )
            assert message.endswith(f"0x{ib:02x} at offset 0"), message


def test_decode_rejects_indefinite_lengths() -> None:
    for ib, kind in (
        (0x1F, "int"),
        (0x3F, "negative int"),
        (0x5F, "byte string"),
        (0x7F, "text string"),
        (0x9F, "array"),
        (0xBF, "map"),
    ):
        _raises(
            CBORError,
            f"cbor: unsupported indefinite-length {kind} {INDEFINITE}: initial byte 0x{ib:02x} "
            "at offset 0",
            decode,
            bytes((ib, 0xFF)),
        )


def test_decode_rejects_lone_break() -> None:
    _raises(
        CBORError,
        f"cbor: unsupported break code outside an indefinite-length item {INDEFINITE}: "
        "initial byte 0xff at offset 0",
        decode,
        b"\xff",
    )


def test_decode_rejects_tags() -> None:
    for ib in range(0xC0, 0xDC):
        _raises(
            CBORError,
            f"cbor: unsupported tag {TAGS}: initial byte 0x{ib:02x}",
            decode,
            bytes((ib, 0)),
        )


def test_decode_rejects_floats() -> None:
    for hexed, name in (
        ("f93c00", "float16"),
        ("fa3f800000", "float32"),
        ("fb3ff0000000000000", "float64"),
    ):
        _raises(
            CBORError,
            f"cbor: unsupported {name} {FLOATS}: initial byte ",
            decode,
            bytes.fromhex(hexed),
        )


def test_decode_rejects_simple_values_other_than_false_true_null() -> None:
    for ib in range(0xE0, 0xF9):
        if ib in (0xF4, 0xF5, 0xF6):
            continue
        _raises(CBORError, f"cbor: unsupported simple value {SIMPLE}", decode, bytes((ib, 0)))


def test_decode_rejects_input_that_is_not_bytes_like() -> None:
    for value, name in (("", "str"), ([], "list"), (0, "int"), (None, "NoneType")):
        _raises(
            CBORError,
            f"cbor: cannot decode {name} (expected bytes, bytearray or memoryview)",
            decode,
            value,
        )


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(CBORError, ValueError)
    try:
        decode(b"")
    except ValueError as exc:  # callers may catch ValueError
        assert isinstance(exc, CBORError)
    else:
        raise AssertionError("decode(b'') did not raise")


# --- encoding ----------------------------------------------------------------


def test_encode_uses_shortest_heads() -> None:
    for value, hexed in (
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
        ({"b": 1}, "a1616201"),
        ("x" * 24, "7818" + "78" * 24),
        ([None] * 256, "990100" + "f6" * 256),
    ):
        assert encode(value).hex() == hexed, hexed


def test_encode_writes_every_pair_of_a_multi_key_map() -> None:
    value = {"b": 1, 2: 3, -1: [None], "": {}}
    encoded = encode(value)
    assert encoded[0] == 0xA4
    # a4, then "b": 1, 2: 3, -1: [null], "": {} in some order.
    assert len(encoded) == len(bytes.fromhex("a4" + "616201" + "0203" + "2081f6" + "60a0"))
    assert decode(encoded) == value


def test_encode_accepts_nesting_at_max_depth() -> None:
    value = [0]
    for _ in range(MAX_DEPTH - 1):
        value = [value]
    assert encode(value) == b"\x81" * MAX_DEPTH + b"\x00"


def test_encode_rejects_float() -> None:
    _raises(CBORError, "cbor: cannot encode float (floats are not allowed)", encode, [1.0])


def test_encode_rejects_int_out_of_range() -> None:
    for value, shown in (
        (2**64, "18446744073709551616"),
        (-(2**64) - 1, "-18446744073709551617"),
        (10**50, "of more than 40 digits"),
        (-(10**500), "of more than 40 digits"),
    ):
        _raises(
            CBORError, f"cbor: cannot encode int {shown} (outside -2**64 .. 2**64-1)", encode, value
        )


def test_encode_rejects_unsupported_type() -> None:
    for value, name in (
        ({1}, "set"),
        (frozenset(), "frozenset"),
        (object(), "object"),
        (1j, "complex"),
    ):
        _raises(
            CBORError, f"cbor: cannot encode {name} (supported: None, bool, ", encode, {"k": value}
        )


def test_encode_rejects_map_key_of_wrong_type() -> None:
    for key, name in ((True, "bool"), (None, "NoneType"), (b"k", "bytes"), ((1,), "tuple")):
        _raises(
            CBORError,
            f"cbor: cannot encode map key of type {name} (keys must be int or str)",
            encode,
            {key: 1},
        )


def test_encode_rejects_str_with_lone_surrogate() -> None:
    _raises(
        CBORError,
        "cbor: cannot encode str that is not valid utf-8 (it contains a lone surrogate)",
        encode,
        "a\ud800",
    )


def test_encode_rejects_nesting_deeper_than_max_depth() -> None:
    for container in ("list", "dict"):
        value = 0
        for _ in range(MAX_DEPTH + 1):
            value = [value] if container == "list" else {"k": value}
        _raises(CBORError, "cbor: cannot encode nesting deeper than 32 levels", encode, value)


def test_encode_rejects_self_referencing_list() -> None:
    value = []
    value.append(value)
    _raises(CBORError, "cbor: cannot encode nesting deeper than 32 levels", encode, value)


# --- deterministic fuzz ------------------------------------------------------


class _Lcg:
    """A linear congruential generator (glibc's constants): the same numbers
    on every runtime, no ``random`` module needed."""

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = seed & 0x7FFFFFFF

    def below(self, n: int) -> int:
        """Return a number in [0, n), n <= 65536, from the generator's high bits."""
        self.state = (self.state * 1103515245 + 12345) & 0x7FFFFFFF
        return ((self.state >> 15) & 0xFFFF) % n

    def raw(self, length: int) -> bytes:
        return bytes(self.below(256) for _ in range(length))


# Integers at the head-width boundaries, where codecs go wrong.
_HEAD_LIMITS = (0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1)
_INTS = _HEAD_LIMITS + tuple(-1 - n for n in _HEAD_LIMITS)
_TEXT = ("", "a", "IETF", "\u00fc", "\u6c34", "\U00010151", "x" * 30)


def _value(rng: _Lcg, depth: int) -> object:
    kind = rng.below(9 if depth > 0 else 7)
    if kind == 0:
        return (None, False, True)[rng.below(3)]
    if kind in (1, 2):
        return _INTS[rng.below(len(_INTS))]
    if kind == 3:
        return rng.below(256) - 128
    if kind == 4:
        return rng.raw(rng.below(40))
    if kind in (5, 6):
        return _TEXT[rng.below(len(_TEXT))]
    if kind == 7:
        return [_value(rng, depth - 1) for _ in range(rng.below(5))]
    result = {}
    for _ in range(rng.below(5)):
        key = _INTS[rng.below(len(_INTS))] if rng.below(2) else _TEXT[rng.below(len(_TEXT))]
        result[key] = _value(rng, depth - 1)
    return result


def _decode_expecting_only_cbor_error(data: bytes, bad: list) -> None:
    try:
        value = decode(data)
    except CBORError:
        return
    except Exception as exc:
        bad.append(f"decode({data.hex()}) raised {type(exc).__name__}: {exc}")
        return
    # Whatever decodes re-encodes, and decodes to the same value again.
    if decode(encode(value)) != value:
        bad.append(f"decode({data.hex()}) = {value!r} does not survive encode and decode")


def test_roundtrip_of_pseudo_random_values() -> None:
    rng = _Lcg(1)
    for _ in range(500):
        value = _value(rng, 4)
        assert decode(encode(value), max_depth=MAX_DEPTH) == value, value


def test_every_strict_prefix_of_pseudo_random_values_is_truncated() -> None:
    rng = _Lcg(2)
    for _ in range(60):
        data = encode(_value(rng, 3))
        for cut in range(len(data)):
            message = _raises(CBORError, "cbor: ", decode, data[:cut], max_depth=MAX_DEPTH)
            assert _is_truncation(message), (data[:cut].hex(), message)


def test_decode_of_pseudo_random_bytes_raises_only_cbor_error() -> None:
    rng = _Lcg(3)
    bad = []
    for _ in range(2000):
        data = rng.raw(rng.below(24))
        if data and rng.below(2):
            # Open with an array or map head so the decoder goes deeper.
            data = bytes((0x80 + rng.below(0x3C),)) + data[1:]
        _decode_expecting_only_cbor_error(data, bad)
    assert not bad, f"{len(bad)} bad inputs, the first: {bad[0]}"


def test_decode_of_mutated_encodings_raises_only_cbor_error() -> None:
    # Random bytes rarely get deep into the decoder; corrupted valid
    # encodings do.
    rng = _Lcg(4)
    bad = []
    for _ in range(2000):
        data = bytearray(encode(_value(rng, 3)))
        for _ in range(1 + rng.below(3)):
            pos = rng.below(len(data))
            how = rng.below(4)
            if how == 0:
                data[pos] = rng.below(256)
            elif how == 1:
                data[pos] ^= 1 << rng.below(8)
            elif how == 2:
                data[pos : pos + 1] = b""
                if not data:
                    data.append(rng.below(256))
            else:
                data[pos:pos] = bytes((rng.below(256),))
        _decode_expecting_only_cbor_error(bytes(data), bad)
    assert not bad, f"{len(bad)} bad inputs, the first: {bad[0]}"
