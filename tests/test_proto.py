"""Tests of edgenode.proto: framing, messages, preamble and the connection state machine.

Pure: no sockets, no clock, no sleeps. Bytes go in whole, one at a time and
in random chunks; every limit and error is checked by type and message. The
byte vectors below are the ones docs/protocol.md shows: keep them identical.
"""

from __future__ import annotations

import re
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgenode.errors import (
    BadPreamble,
    FrameTooLarge,
    HandshakeError,
    MalformedMessage,
    PeerRefused,
    ProtocolError,
    TruncatedFrame,
    UnexpectedMessage,
    UnknownMessageType,
    VersionMismatch,
)
from edgenode.proto import connection
from edgenode.proto.connection import PeerProtocol
from edgenode.proto.decoding import decode_message
from edgenode.proto.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    FrameDecoder,
    encode_frame,
)
from edgenode.proto.messages import (
    DATA,
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    READY,
    REQUEST,
    RESPONSE,
    Bye,
    Data,
    DeviceRequest,
    Devices,
    ErrorResponse,
    FromDevice,
    Hello,
    Limits,
    PeerInfo,
    Peers,
    Ping,
    Pong,
    Ready,
    Request,
    Response,
    ToDevice,
    encode_message,
    message_name,
)
from edgenode.proto.preamble import (
    ACCEPTED,
    HEAD_BYTES,
    MAGIC,
    MAX_CERT_BYTES,
    NOT_AUTHORISED,
    PREAMBLE_VERSION,
    encode_preamble,
    encode_refusal,
    parse_preamble,
    parse_verdict,
)
from firmware_bridge import cbor

U64_MAX = (1 << 64) - 1
# The node ID of the raw Ed25519 public key bytes(range(32)) (docs/protocol.md).
NODE_A = "mmg4-2klg-yqzw-neis-krel-xms3-qjpg"
NODE_B = "aaaa-bbbb-cccc-dddd-eeee-ffff-gggg"


def raises(exc_type: type[BaseException], message: str, fn, *args, **kwargs) -> BaseException:
    """Call ``fn``; check it raises exactly ``exc_type`` with exactly ``message``."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert type(info.value) is exc_type
    assert str(info.value) == message
    return info.value


def body(*item: object) -> bytes:
    """The CBOR body of an array, written by cbor2 (the reference encoder)."""
    return cbor2.dumps(list(item))


def hx(text: str) -> bytes:
    return bytes.fromhex(text)


# -- framing ----------------------------------------------------------------


def test_frame_encoding_is_a_big_endian_length_then_the_body() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frame(b"x" * 0x10203) == b"\x00\x01\x02\x03" + b"x" * 0x10203


def test_frame_round_trip() -> None:
    bodies = [b"", b"a", b"\x00" * 5, bytes(range(256)), b"z" * DEFAULT_MAX_FRAME_BYTES]
    decoder = FrameDecoder()
    assert decoder.feed(b"".join(encode_frame(b) for b in bodies)) == bodies
    assert decoder.buffered == 0
    decoder.eof()


def test_frame_decoder_gives_the_same_frames_whole_and_byte_by_byte() -> None:
    bodies = [b"hello", b"", b"\x83\x03", b"x" * 300]
    stream = b"".join(encode_frame(b) for b in bodies)
    whole = FrameDecoder().feed(stream)
    decoder = FrameDecoder()
    one_by_one = []
    for i in range(len(stream)):
        one_by_one += decoder.feed(stream[i : i + 1])
    assert whole == one_by_one == bodies
    decoder.eof()


def test_frame_decoder_holds_a_partial_frame_until_it_completes() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00") == []
    assert decoder.buffered == 2
    assert decoder.feed(b"\x00\x03ab") == []
    assert decoder.buffered == 2  # the header is consumed, the body waits
    assert decoder.feed(b"c\x00") == [b"abc"]
    assert decoder.buffered == 1


def test_frame_decoder_accepts_a_frame_of_exactly_the_limit() -> None:
    decoder = FrameDecoder(max_frame_bytes=10)
    assert decoder.feed(encode_frame(b"0123456789")) == [b"0123456789"]


@given(
    bodies=st.lists(st.binary(max_size=300), max_size=8),
    data=st.data(),
)
def test_frame_decoder_gives_the_same_frames_in_any_chunks(bodies: list[bytes], data) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = FrameDecoder()
    frames: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        frames += decoder.feed(stream[start:cut])
        start = cut
    assert frames == bodies
    assert decoder.buffered == 0
    decoder.eof()


def test_frame_decoder_rejects_oversize_length_as_soon_as_the_header_arrives() -> None:
    decoder = FrameDecoder()
    header = (DEFAULT_MAX_FRAME_BYTES + 1).to_bytes(HEADER_BYTES, "big")
    assert decoder.feed(header[:3]) == []
    raises(
        FrameTooLarge,
        "peer: frame length 65537 exceeds 65536-byte limit",
        decoder.feed,
        header[3:],
    )


def test_frame_decoder_rejects_oversize_length_naming_the_connection() -> None:
    decoder = FrameDecoder(max_frame_bytes=100, name="10.0.0.7")
    raises(
        FrameTooLarge,
        "10.0.0.7: frame length 4294967295 exceeds 100-byte limit",
        decoder.feed,
        b"\xff\xff\xff\xff",
    )


def test_frame_decoder_rejects_oversize_length_after_good_frames_in_one_chunk() -> None:
    decoder = FrameDecoder(max_frame_bytes=4)
    raises(
        FrameTooLarge,
        "peer: frame length 5 exceeds 4-byte limit",
        decoder.feed,
        encode_frame(b"ok") + b"\x00\x00\x00\x05",
    )


def test_frame_decoder_rejects_truncated_header_at_eof() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00")
    raises(TruncatedFrame, "peer: stream ended mid-frame: got 2 of 4 header bytes", decoder.eof)


def test_frame_decoder_rejects_truncated_body_at_eof() -> None:
    decoder = FrameDecoder(name="10.0.0.2")
    assert decoder.feed(encode_frame(b"0123456789")[:-7]) == []
    raises(TruncatedFrame, "10.0.0.2: stream ended mid-frame: got 3 of 10 body bytes", decoder.eof)


def test_frame_decoder_accepts_eof_between_frames() -> None:
    decoder = FrameDecoder()
    decoder.eof()
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(b"a") + encode_frame(b"")) == [b"a", b""]
    decoder.eof()


def test_frame_decoder_stays_broken_after_oversize_length() -> None:
    decoder = FrameDecoder(max_frame_bytes=8)
    error = raises(
        FrameTooLarge,
        "peer: frame length 9 exceeds 8-byte limit",
        decoder.feed,
        b"\x00\x00\x00\x09",
    )
    for call in (lambda: decoder.feed(encode_frame(b"ok")), lambda: decoder.feed(b""), decoder.eof):
        with pytest.raises(FrameTooLarge) as again:
            call()
        assert again.value is error


def test_frame_decoder_stays_broken_after_truncation() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00")
    error = raises(
        TruncatedFrame, "peer: stream ended mid-frame: got 1 of 4 header bytes", decoder.eof
    )
    for call in (decoder.eof, lambda: decoder.feed(b"\x00\x00\x00")):
        with pytest.raises(TruncatedFrame) as again:
            call()
        assert again.value is error


# -- messages: round trips and byte vectors ----------------------------------

EVERY_MESSAGE = [
    Hello(NODE_A, 7300, 1234567890123),
    Hello(NODE_B, 0, 0),
    Hello(NODE_A, 65535, U64_MAX),
    Ping(0),
    Ping(U64_MAX),
    Pong(7),
    Data("temp", b"\x01\x02\x03"),
    Data("t" * 128, b""),
    Data("\u00e9t\u00e9", b"\x00" * 1000),
    Request(1, "sensors/read", b"now"),
    Request(U64_MAX, "x", b""),
    Response(1, b"21.5"),
    Response(0, b""),
    ErrorResponse(9, 1, "no handler"),
    ErrorResponse(0, 65535, ""),
    ErrorResponse(2, 3, "m" * 512),
    Bye("shutting down"),
    Bye(""),
    Bye("r" * 512),
    Peers([]),
    Peers([PeerInfo("10.0.0.2", 7300, NODE_A), PeerInfo("10.0.0.3", 7300, None)]),
    Peers([PeerInfo("fe80::1", 1, NODE_B)] * 64),
    Ready(),
    ToDevice("pico-1", "led", b"on"),
    FromDevice("d" * 32, "temp", b"21.5"),
    DeviceRequest(5, "esp32", "read", b""),
    Devices([]),
    Devices(["pico-1", "esp32"]),
]


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=repr)
def test_message_round_trip(msg) -> None:
    encoded = encode_message(msg)
    assert decode_message(encoded) == msg
    # The MicroPython-side encoder writes the same bytes as cbor2.
    assert cbor.encode(cbor2.loads(encoded)) == encoded


def test_every_message_type_has_a_round_trip_case() -> None:
    assert {m.code for m in EVERY_MESSAGE} == set(range(14))
    assert [message_name(c) for c in range(15)] == [
        "hello", "ping", "pong", "data", "request", "response", "error", "bye", "peers",
        "to-dev", "from-dev", "dev-req", "devices", "ready", "type 14",
    ]  # fmt: skip


# The same vectors as docs/protocol.md, frame header included.
HELLO_FRAME = hx(
    "00 00 00 33"  # frame length 51
    " 85"  # array(5)
    " 00"  # 0: hello
    " 02"  # version 2
    " 78 22"  # text(34)
    " 6d 6d 67 34 2d 32 6b 6c 67 2d 79 71 7a 77 2d 6e 65 69 73"
    " 2d 6b 72 65 6c 2d 78 6d 73 33 2d 71 6a 70 67"  # "mmg4-2klg-yqzw-neis-krel-xms3-qjpg"
    " 19 1c 84"  # listen port 7300
    " 1b 00 00 01 1f 71 fb 04 cb"  # epoch 1234567890123
)
DATA_FRAME = hx(
    "00 00 00 0b"  # frame length 11
    " 83"  # array(3)
    " 03"  # 3: data
    " 64 74 65 6d 70"  # text(4) "temp"
    " 43 01 02 03"  # bytes(3) 01 02 03
)

BODY_VECTORS = [
    (Ping(7), "82 01 07"),
    (Pong(300), "82 02 19 01 2c"),
    (Request(1, "t", b""), "84 04 01 61 74 40"),
    (Response(1, b"ok"), "83 05 01 42 6f 6b"),
    (ErrorResponse(9, 1, "no handler"), "84 06 09 01 6a 6e 6f 20 68 61 6e 64 6c 65 72"),
    (Bye("bye"), "82 07 63 62 79 65"),
    (
        Peers([PeerInfo("10.0.0.3", 7300, None)]),
        "82 08 81 83 68 31 30 2e 30 2e 30 2e 33 19 1c 84 f6",
    ),
]


def test_hello_frame_is_byte_exact() -> None:
    hello = Hello(NODE_A, 7300, 1234567890123)
    assert PeerProtocol.send(hello) == HELLO_FRAME
    assert FrameDecoder().feed(HELLO_FRAME) == [HELLO_FRAME[4:]]
    assert decode_message(HELLO_FRAME[4:]) == hello


def test_data_frame_is_byte_exact() -> None:
    data = Data("temp", b"\x01\x02\x03")
    assert PeerProtocol.send(data) == DATA_FRAME
    assert decode_message(DATA_FRAME[4:]) == data


@pytest.mark.parametrize(("msg", "hex_body"), BODY_VECTORS, ids=[v[1] for v in BODY_VECTORS])
def test_message_body_is_byte_exact(msg, hex_body: str) -> None:
    assert encode_message(msg) == hx(hex_body)
    assert decode_message(hx(hex_body)) == msg


def test_message_decoder_accepts_non_shortest_integer_heads() -> None:
    # Decoders are liberal here; encoders always write the shortest form.
    assert decode_message(hx("82 01 1b 00 00 00 00 00 00 00 07")) == Ping(7)


def test_message_decoder_applies_custom_limits() -> None:
    limits = Limits(max_topic_bytes=4, max_text_bytes=3, max_peers_listed=1)
    assert decode_message(body(3, "abcd", b""), limits) == Data("abcd", b"")
    raises(
        MalformedMessage,
        "topic of 5 bytes exceeds 4-byte limit",
        decode_message,
        body(3, "abcde", b""),
        limits,
    )
    raises(
        MalformedMessage, "bye reason of 4 bytes exceeds 3-byte limit", decode_message,
        body(7, "four"), limits,
    )  # fmt: skip
    raises(
        MalformedMessage,
        "peer list of 2 entries exceeds 1-entry limit",
        decode_message,
        body(8, [["a", 1, None], ["b", 2, None]]),
        limits,
    )


# -- messages: every rejection ------------------------------------------------

_CBOR_PREFIX = "invalid cbor in frame "

INVALID_CBOR = [
    ("empty", b"", "invalid cbor in frame : cbor: truncated: need 1 bytes at offset 0, have 0"),
    (
        "break",
        b"\xff",
        "invalid cbor in frame ff: cbor: unsupported break code outside an indefinite-length"
        " item (indefinite lengths are not allowed): initial byte 0xff at offset 0",
    ),
    (
        "float",
        hx("82 01 f9 3c 00"),
        "invalid cbor in frame 82 01 f9 3c 00: cbor: unsupported float16 (floats are not"
        " allowed): initial byte 0xf9 at offset 2",
    ),
    (
        "tag",
        hx("82 01 c1 01"),
        "invalid cbor in frame 82 01 c1 01: cbor: unsupported tag (tags are not allowed):"
        " initial byte 0xc1 at offset 2",
    ),
    (
        "indefinite array",
        hx("9f 01 07 ff"),
        "invalid cbor in frame 9f 01 07 ff: cbor: unsupported indefinite-length array"
        " (indefinite lengths are not allowed): initial byte 0x9f at offset 0",
    ),
    (
        "undefined",
        hx("82 07 f7"),
        "invalid cbor in frame 82 07 f7: cbor: unsupported simple value (only false, true and"
        " null are allowed): initial byte 0xf7 at offset 2",
    ),
    (
        "trailing bytes",
        hx("82 01 07 00"),
        "invalid cbor in frame 82 01 07 00: cbor: 1 trailing bytes after item at offset 3: 00",
    ),
    (
        "truncated",
        hx("83 03 64 74 65"),
        "invalid cbor in frame 83 03 64 74 65: cbor: text string of 4 bytes at offset 2"
        " exceeds the 2 bytes remaining",
    ),
    (
        "bad utf-8",
        hx("83 03 61 ff 40"),
        "invalid cbor in frame 83 03 61 ff 40: cbor: text string at offset 2 is not valid"
        " utf-8: ff",
    ),
    (
        "nesting over depth 3",
        hx("83 03 61 74 81 81 80"),
        "invalid cbor in frame 83 03 61 74 81 81 80: cbor: nesting deeper than 3 levels at"
        " offset 6",
    ),
    (
        "bad map key",
        hx("83 03 61 74 a1 40 00"),
        "invalid cbor in frame 83 03 61 74 a1 40 00: cbor: map key at offset 5 must be an int"
        " or text string, got initial byte 0x40",
    ),
]


@pytest.mark.parametrize(
    ("case", "data", "message"), INVALID_CBOR, ids=[c[0] for c in INVALID_CBOR]
)
def test_message_decoder_rejects_invalid_cbor(case: str, data: bytes, message: str) -> None:
    raises(MalformedMessage, message, decode_message, data)


def test_message_decoder_rejects_invalid_cbor_showing_truncated_hex() -> None:
    data = b"\x82\x01" + b"\xf9" * 30
    raises(
        MalformedMessage,
        "invalid cbor in frame 82 01 f9 f9 f9 f9 f9 f9 f9 f9 f9 f9 f9 f9 f9 f9 ... (32 bytes):"
        " cbor: unsupported float16 (floats are not allowed): initial byte 0xf9 at offset 2",
        decode_message,
        data,
    )


def test_message_decoder_accepts_nesting_of_depth_3() -> None:
    # [3, "t", [[]]] is three levels deep: valid CBOR, refused for its payload type.
    raises(
        MalformedMessage,
        "payload should be a byte string, got list",
        decode_message,
        hx("83 03 61 74 81 80"),
    )


NOT_AN_ARRAY = [
    ("int", "01"),
    ("map", "a0"),
    ("bytes", "41 00"),
    ("text", "61 31"),
    ("null", "f6"),
    ("empty array", "80"),
    ("text code", "81 61 31"),
    ("bool code", "81 f5"),
    ("null code", "82 f6 01"),
]


@pytest.mark.parametrize(("case", "hex_body"), NOT_AN_ARRAY, ids=[c[0] for c in NOT_AN_ARRAY])
def test_message_decoder_rejects_not_an_array_with_a_type_code(case: str, hex_body: str) -> None:
    raises(
        MalformedMessage,
        f"a message is an array starting with a type code, got {hex_body}",
        decode_message,
        hx(hex_body),
    )


@pytest.mark.parametrize(
    ("hex_body", "code"),
    [
        ("81 0e", 14),
        ("82 18 ff 01", 255),
        ("81 20", -1),
        ("81 1b ff ff ff ff ff ff ff ff", U64_MAX),
    ],
)
def test_message_decoder_rejects_unknown_type_code(hex_body: str, code: int) -> None:
    raises(
        UnknownMessageType,
        f"unknown message type {code} in frame {hex_body}",
        decode_message,
        hx(hex_body),
    )


WRONG_ARITY = [
    ([0, 2, NODE_A, 7300], "hello should have 4 fields, got 3"),
    ([0, 2, NODE_A, 7300, 5, 6], "hello should have 4 fields, got 5"),
    ([0], "hello should have 4 fields, got 0"),
    ([1], "ping should have 1 fields, got 0"),
    ([1, 1, 2], "ping should have 1 fields, got 2"),
    ([2], "pong should have 1 fields, got 0"),
    ([3, "t"], "data should have 2 fields, got 1"),
    ([3, "t", b"", b""], "data should have 2 fields, got 3"),
    ([4, 1, "t"], "request should have 3 fields, got 2"),
    ([5, 1], "response should have 2 fields, got 1"),
    ([6, 1, 1], "error should have 3 fields, got 2"),
    ([7], "bye should have 1 fields, got 0"),
    ([7, "a", "b"], "bye should have 1 fields, got 2"),
    ([8], "peers should have 1 fields, got 0"),
    ([8, [], []], "peers should have 1 fields, got 2"),
]


@pytest.mark.parametrize(("item", "message"), WRONG_ARITY, ids=[w[1] for w in WRONG_ARITY])
def test_message_decoder_rejects_wrong_arity(item: list, message: str) -> None:
    raises(MalformedMessage, message, decode_message, body(*item))


_UINT = "should be an integer in 0..18446744073709551615, got"

WRONG_FIELDS = [
    # hello
    ([0, True, NODE_A, 7300, 1], f"hello version {_UINT} True"),
    ([0, "1", NODE_A, 7300, 1], f"hello version {_UINT} '1'"),
    ([0, None, NODE_A, 7300, 1], f"hello version {_UINT} None"),
    ([0, 2, 5, 7300, 1], "hello node id should be text, got int"),
    ([0, 2, NODE_A.encode(), 7300, 1], "hello node id should be text, got bytes"),
    ([0, 2, "", 7300, 1], "hello node id should not be empty"),
    ([0, 2, "n" * 65, 7300, 1], "hello node id of 65 bytes exceeds 64-byte limit"),
    ([0, 2, NODE_A, 65536, 1], "hello listen port should be an integer in 0..65535, got 65536"),
    ([0, 2, NODE_A, -1, 1], "hello listen port should be an integer in 0..65535, got -1"),
    ([0, 2, NODE_A, "7300", 1], "hello listen port should be an integer in 0..65535, got '7300'"),
    ([0, 2, NODE_A, 7300, -5], f"hello epoch {_UINT} -5"),
    ([0, 2, NODE_A, 7300, False], f"hello epoch {_UINT} False"),
    # ping, pong
    ([1, -1], f"ping nonce {_UINT} -1"),
    ([1, "x"], f"ping nonce {_UINT} 'x'"),
    ([1, True], f"ping nonce {_UINT} True"),
    ([2, None], f"pong nonce {_UINT} None"),
    ([2, b"\x01"], f"pong nonce {_UINT} b'\\x01'"),
    # data
    ([3, b"t", b""], "topic should be text, got bytes"),
    ([3, 1, b""], "topic should be text, got int"),
    ([3, None, b""], "topic should be text, got NoneType"),
    ([3, "", b""], "topic should not be empty"),
    ([3, "t" * 129, b""], "topic of 129 bytes exceeds 128-byte limit"),
    ([3, "\u00e9" * 65, b""], "topic of 130 bytes exceeds 128-byte limit"),
    ([3, "t", "payload"], "payload should be a byte string, got str"),
    ([3, "t", 1], "payload should be a byte string, got int"),
    ([3, "t", None], "payload should be a byte string, got NoneType"),
    ([3, "t", [1]], "payload should be a byte string, got list"),
    ([3, "t", {}], "payload should be a byte string, got dict"),
    # request
    ([4, -1, "t", b""], f"request id {_UINT} -1"),
    ([4, "1", "t", b""], f"request id {_UINT} '1'"),
    ([4, 1, "", b""], "topic should not be empty"),
    ([4, 1, "t" * 129, b""], "topic of 129 bytes exceeds 128-byte limit"),
    ([4, 1, "t", "x"], "payload should be a byte string, got str"),
    # response
    ([5, None, b""], f"request id {_UINT} None"),
    ([5, 1, "ok"], "payload should be a byte string, got str"),
    # error
    ([6, "1", 1, "m"], f"request id {_UINT} '1'"),
    ([6, 1, 65536, "m"], "error code should be an integer in 0..65535, got 65536"),
    ([6, 1, -1, "m"], "error code should be an integer in 0..65535, got -1"),
    ([6, 1, 1, b"m"], "error message should be text, got bytes"),
    ([6, 1, 1, "m" * 513], "error message of 513 bytes exceeds 512-byte limit"),
    # bye
    ([7, None], "bye reason should be text, got NoneType"),
    ([7, b"reason"], "bye reason should be text, got bytes"),
    ([7, "r" * 513], "bye reason of 513 bytes exceeds 512-byte limit"),
]


@pytest.mark.parametrize(("item", "message"), WRONG_FIELDS, ids=[w[1] for w in WRONG_FIELDS])
def test_message_decoder_rejects_wrong_field_type_or_value(item: list, message: str) -> None:
    raises(MalformedMessage, message, decode_message, body(*item))


def test_message_decoder_accepts_fields_at_their_limits() -> None:
    assert decode_message(body(3, "t" * 128, b"")) == Data("t" * 128, b"")
    assert decode_message(body(3, "\u00e9" * 64, b"")) == Data("\u00e9" * 64, b"")
    assert decode_message(body(6, U64_MAX, 65535, "m" * 512)) == ErrorResponse(
        U64_MAX, 65535, "m" * 512
    )
    assert decode_message(body(0, 2, "n" * 64, 65535, U64_MAX)) == Hello("n" * 64, 65535, U64_MAX)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ([0, 3, NODE_A, 7300, 1], "peer speaks protocol version 3; this node speaks 2"),
        ([0, 1, NODE_A, 7300, 1], "peer speaks protocol version 1; this node speaks 2"),
        ([0, 0, NODE_A, 7300, 1], "peer speaks protocol version 0; this node speaks 2"),
        # Checked before the arity: a later version may have another shape.
        ([0, 3], "peer speaks protocol version 3; this node speaks 2"),
        ([0, 3, {"new": "shape"}], "peer speaks protocol version 3; this node speaks 2"),
    ],
)
def test_message_decoder_rejects_hello_of_another_version(item: list, message: str) -> None:
    raises(VersionMismatch, message, decode_message, body(*item))
    assert PROTOCOL_VERSION == 2


PEER_LIST_ERRORS = [
    ([8, {}], "peer list should be an array, got dict"),
    ([8, None], "peer list should be an array, got NoneType"),
    ([8, b""], "peer list should be an array, got bytes"),
    ([8, ["10.0.0.1"]], "peer list entry should be [ip, port, node_id], got '10.0.0.1'"),
    ([8, [["10.0.0.1", 1]]], "peer list entry should be [ip, port, node_id], got ['10.0.0.1', 1]"),
    (
        [8, [["10.0.0.1", 1, None, 0]]],
        "peer list entry should be [ip, port, node_id], got ['10.0.0.1', 1, None, 0]",
    ),
    ([8, [[b"\x0a\x00\x00\x01", 1, None]]], "peer list ip should be text, got bytes"),
    ([8, [["", 1, None]]], "peer list ip should not be empty"),
    ([8, [["1" * 46, 1, None]]], "peer list ip of 46 bytes exceeds 45-byte limit"),
    (
        [8, [["10.0.0.1", 65536, None]]],
        "peer list port should be an integer in 0..65535, got 65536",
    ),
    ([8, [["10.0.0.1", None, None]]], "peer list port should be an integer in 0..65535, got None"),
    ([8, [["10.0.0.1", 1, ""]]], "peer list node id should not be empty"),
    ([8, [["10.0.0.1", 1, 7]]], "peer list node id should be text, got int"),
    ([8, [["10.0.0.1", 1, False]]], "peer list node id should be text, got bool"),
    ([8, [["10.0.0.1", 1, "n" * 65]]], "peer list node id of 65 bytes exceeds 64-byte limit"),
    (
        [8, [["10.0.0.1", 1, None], ["10.0.0.2", 1, b"id"]]],
        "peer list node id should be text, got bytes",
    ),
    (
        [8, [["10.0.0.1", 1, None], ["10.0.0.2", 1, []]]],  # a fourth level of nesting
        "invalid cbor in frame 82 08 82 83 68 31 30 2e 30 2e 30 2e 31 01 f6 83 ... (27 bytes):"
        " cbor: nesting deeper than 3 levels at offset 26",
    ),
    ([8, [["10.0.0.1", 1, None]] * 65], "peer list of 65 entries exceeds 64-entry limit"),
]


@pytest.mark.parametrize(
    ("item", "message"), PEER_LIST_ERRORS, ids=[p[1] for p in PEER_LIST_ERRORS]
)
def test_message_decoder_rejects_bad_peer_list(item: list, message: str) -> None:
    raises(MalformedMessage, message, decode_message, body(*item))


def test_message_decoder_rejects_peer_list_far_over_limit_before_building_it() -> None:
    # Past the element budget (4 per listed peer + 8) the cbor decoder stops
    # counting, so a huge list is refused without decoding all of it.
    data = body(8, [["10.0.0.1", 1, None]] * 1000)
    with pytest.raises(MalformedMessage) as info:
        decode_message(data)
    assert str(info.value).startswith(_CBOR_PREFIX)
    assert "cbor: more than 264 array elements and map pairs in total" in str(info.value)


def test_message_decoder_accepts_a_full_peer_list() -> None:
    peers = [PeerInfo(f"10.0.0.{i}", 7300, NODE_A if i % 2 else None) for i in range(64)]
    assert decode_message(encode_message(Peers(peers))) == Peers(peers)


# -- messages: properties -------------------------------------------------------

_u64 = st.integers(0, U64_MAX)
_port = st.integers(0, 0xFFFF)


def _text(min_size: int, max_bytes: int) -> st.SearchStrategy[str]:
    return st.text(min_size=min_size, max_size=max_bytes).filter(
        lambda s: len(s.encode()) <= max_bytes
    )


_node_id = _text(1, 64)
_topic = _text(1, DEFAULT_LIMITS.max_topic_bytes)
_reason = _text(0, DEFAULT_LIMITS.max_text_bytes)
_payload = st.binary(max_size=2000)

valid_messages = st.one_of(
    st.builds(Hello, _node_id, _port, _u64),
    st.builds(Ping, _u64),
    st.builds(Pong, _u64),
    st.builds(Data, _topic, _payload),
    st.builds(Request, _u64, _topic, _payload),
    st.builds(Response, _u64, _payload),
    st.builds(ErrorResponse, _u64, st.integers(0, 0xFFFF), _reason),
    st.builds(Bye, _reason),
    st.builds(
        Peers,
        st.lists(
            st.builds(PeerInfo, _text(1, 45), _port, st.none() | _node_id),
            max_size=DEFAULT_LIMITS.max_peers_listed,
        ),
    ),
)


@given(valid_messages)
def test_message_round_trip_property(msg) -> None:
    encoded = encode_message(msg)
    assert decode_message(encoded) == msg
    assert cbor.encode(cbor2.loads(encoded)) == encoded


def _only_protocol_errors(data: bytes) -> None:
    try:
        result = decode_message(data)
    except ProtocolError:
        return
    assert 0 <= result.code <= READY
    assert decode_message(encode_message(result)) == result


@given(st.binary(max_size=200))
def test_message_decoder_raises_only_protocol_errors_on_arbitrary_bytes(data: bytes) -> None:
    _only_protocol_errors(data)


_cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 64), U64_MAX)
    | st.binary(max_size=20)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.integers() | st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


@given(st.integers(-3, 12), st.lists(_cbor_values, max_size=6))
def test_message_decoder_raises_only_protocol_errors_on_arbitrary_arrays(
    code: int, fields: list
) -> None:
    # Well-formed CBOR of the right outer shape reaches the field checks.
    _only_protocol_errors(cbor2.dumps([code, *fields]))


@given(valid_messages, st.data())
def test_message_decoder_raises_only_protocol_errors_on_mutated_messages(msg, data) -> None:
    encoded = bytearray(encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(encoded) - 1))
        encoded[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    _only_protocol_errors(bytes(encoded[:cut]))
    _only_protocol_errors(bytes(encoded))


# -- preamble ---------------------------------------------------------------

# The preamble carries the certificate as opaque DER; these tests need no real one.
CERT = bytes([0x30, 0x82, 0x01, 0x2A]) + bytes(range(256)) + bytes(42)


def test_preamble_layout() -> None:
    pre = encode_preamble(CERT)
    assert pre[:4] == MAGIC == b"EDGN"
    assert pre[4] == PREAMBLE_VERSION == 2
    assert pre[5:7] == len(CERT).to_bytes(2, "big") == b"\x01\x2e"
    assert pre[HEAD_BYTES:] == CERT
    assert encode_preamble(b"\x30") == hx("45 44 47 4e 02 00 01 30")


def test_preamble_round_trip() -> None:
    pre = encode_preamble(CERT)
    assert parse_preamble(pre) == (CERT, len(pre))
    assert parse_preamble(bytearray(pre)) == (CERT, len(pre))
    # The TLS ClientHello that follows is not consumed.
    assert parse_preamble(pre + b"\x16\x03\x01") == (CERT, len(pre))
    big = bytes(MAX_CERT_BYTES)
    assert parse_preamble(encode_preamble(big)) == (big, HEAD_BYTES + MAX_CERT_BYTES)


def test_preamble_parse_of_every_prefix_needs_more() -> None:
    pre = encode_preamble(CERT)
    for n in range(len(pre)):
        assert parse_preamble(pre[:n]) is None, n


@pytest.mark.parametrize("size", [0, MAX_CERT_BYTES + 1])
def test_preamble_encoder_rejects_certificate_size(size: int) -> None:
    raises(
        ValueError,
        f"certificate of {size} bytes; limit is {MAX_CERT_BYTES}",
        encode_preamble,
        bytes(size),
    )


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"X", "58"),
        (b"E", None),
        (b"ED", None),
        (b"EDGX", "45 44 47 58"),
        (b"edgn\x01\x00\x01\x30", "65 64 67 6e 01 00 01 30"),
        (
            b"GET / HTTP/1.1\r\n\r\n",
            "47 45 54 20 2f 20 48 54 54 50 2f 31 2e 31 0d 0a ... (18 bytes)",
        ),
    ],
)
def test_preamble_parse_rejects_bad_magic_at_the_first_wrong_byte(data: bytes, shown) -> None:
    if shown is None:  # a right prefix of the magic: wait for more
        assert parse_preamble(data) is None
        return
    raises(
        BadPreamble,
        f"expected preamble magic 45 44 47 4e ('EDGN'), got {shown}",
        parse_preamble,
        data,
    )


def test_preamble_parse_rejects_tls_client_hello_with_a_hint() -> None:
    client_hello = hx("16 03 01 02 00 01 00 01 fc 03 03")
    raises(
        BadPreamble,
        "expected preamble magic 45 44 47 4e ('EDGN'), got 16 03 01 02 00 01 00 01 fc 03 03"
        " (a plain TLS client? edgenode dialers send a preamble first)",
        parse_preamble,
        client_hello,
    )
    raises(
        BadPreamble,
        "expected preamble magic 45 44 47 4e ('EDGN'), got 16"
        " (a plain TLS client? edgenode dialers send a preamble first)",
        parse_preamble,
        b"\x16",
    )


@pytest.mark.parametrize("version", [0, 1, 255])
def test_preamble_parse_rejects_bad_version(version: int) -> None:
    raises(
        BadPreamble,
        f"preamble version {version} not supported; expected 2",
        parse_preamble,
        MAGIC + bytes([version]) + b"\x00\x01\x30",
    )


@pytest.mark.parametrize("length", [0, MAX_CERT_BYTES + 1, 0xFFFF])
def test_preamble_parse_rejects_bad_length(length: int) -> None:
    # Refused from the 7 head bytes alone, before any certificate byte arrives.
    raises(
        BadPreamble,
        f"preamble certificate length {length} outside 1..2048",
        parse_preamble,
        MAGIC + b"\x02" + length.to_bytes(2, "big"),
    )


def test_verdict_accepts_and_takes_one_byte() -> None:
    from edgenode.proto.preamble import ACCEPTED, parse_verdict

    assert parse_verdict(b"") is None
    assert parse_verdict(ACCEPTED) == 1
    assert parse_verdict(ACCEPTED + b"\x16\x03\x03") == 1  # the TLS records follow


def test_verdict_refusal_carries_its_reason_byte_by_byte() -> None:
    from edgenode.errors import PeerRefused
    from edgenode.proto.preamble import NOT_AUTHORISED, encode_refusal, parse_verdict

    refusal = encode_refusal(NOT_AUTHORISED)
    assert refusal == b"\x00\x0enot authorised"
    for n in range(len(refusal)):
        assert parse_verdict(refusal[:n], "10.0.0.2") is None, n
    raises(
        PeerRefused, "10.0.0.2: the peer refused this node: not authorised",
        parse_verdict, refusal, "10.0.0.2",
    )  # fmt: skip
    assert encode_refusal("x" * 300)[1] == 255


def test_verdict_rejects_anything_else() -> None:
    from edgenode.proto.preamble import parse_verdict

    raises(
        BadPreamble,
        "10.0.0.2: expected the listener's verdict (01 or 00), got 16 03 03",
        parse_verdict, b"\x16\x03\x03", "10.0.0.2",
    )  # fmt: skip


@given(st.binary(max_size=64))
def test_preamble_parse_raises_only_bad_preamble_on_arbitrary_bytes(data: bytes) -> None:
    try:
        result = parse_preamble(data)
    except BadPreamble:
        return
    if result is not None:
        cert_der, consumed = result
        assert consumed == HEAD_BYTES + len(cert_der) <= len(data)
        assert data[:consumed] == encode_preamble(cert_der)


@given(st.binary(min_size=1, max_size=MAX_CERT_BYTES), st.binary(max_size=32))
def test_preamble_parse_finds_any_certificate_before_any_tail(cert_der: bytes, tail: bytes) -> None:
    pre = encode_preamble(cert_der)
    assert parse_preamble(pre + tail) == (cert_der, len(pre))


def test_verdicts_are_the_bytes_docs_protocol_shows() -> None:
    assert ACCEPTED == hx("01")
    assert encode_refusal(NOT_AUTHORISED) == hx("00 0e 6e 6f 74 20 61 75 74 68 6f 72 69 73 65 64")
    # A reason is ASCII and at most 255 bytes.
    assert encode_refusal("é" + "x" * 300) == b"\x00\xff?" + b"x" * 254


def test_verdict_parse_accepts_needs_more_or_says_the_reason() -> None:
    assert parse_verdict(ACCEPTED + b"\x16\x03") == 1
    refusal = encode_refusal(NOT_AUTHORISED)
    for n in range(len(refusal)):
        assert parse_verdict(refusal[:n]) is None, n
    raises(
        PeerRefused,
        "127.0.0.3: the peer refused this node: not authorised",
        parse_verdict,
        refusal,
        "127.0.0.3",
    )
    raises(
        BadPreamble,
        "127.0.0.3: expected the listener's verdict (01 or 00), got 16 03",
        parse_verdict,
        b"\x16\x03",
        "127.0.0.3",
    )


# -- connection (PeerProtocol) -------------------------------------------------

HELLO_A = Hello(NODE_A, 7300, 11)
HELLO_B = Hello(NODE_B, 7301, 22)


def open_pair() -> tuple[PeerProtocol, PeerProtocol]:
    """Two machines joined by feeding each other's bytes, hellos exchanged."""
    a = PeerProtocol(expected_node_id=NODE_B, name="10.0.0.2")
    b = PeerProtocol(expected_node_id=NODE_A, name="10.0.0.1")
    # Both sides send their hello first, without waiting for the other's.
    to_b, to_a = a.send(HELLO_A), b.send(HELLO_B)
    assert b.receive_data(to_b) == [HELLO_A]
    assert a.receive_data(to_a) == [HELLO_B]
    return a, b


def test_connection_exchanges_hellos_then_messages_both_ways() -> None:
    a = PeerProtocol(expected_node_id=NODE_B)
    b = PeerProtocol(expected_node_id=NODE_A)
    assert a.state == b.state == connection.AWAIT_HELLO
    assert a.their_hello is None
    a, b = open_pair()
    assert a.state == b.state == connection.OPEN
    assert a.their_hello == HELLO_B and b.their_hello == HELLO_A
    # Keepalive and peer lists may flow before ready; data waits for it.
    assert b.receive_data(a.send(Ping(4)) + a.send(Peers([]))) == [Ping(4), Peers([])]
    assert b.receive_data(a.send(Ready())) == [Ready()]
    assert a.receive_data(b.send(Ready())) == [Ready()]
    assert a.state == b.state == connection.READY_STATE
    flow = [Data("temp", b"\x01"), Request(1, "read", b""), Ping(5), Peers([])]
    assert b.receive_data(b"".join(a.send(m) for m in flow)) == flow
    answers = [Response(1, b"21.5"), Pong(5), ErrorResponse(2, 1, "no handler for topic 'x'")]
    assert a.receive_data(b"".join(b.send(m) for m in answers)) == answers
    assert a.state == b.state == connection.READY_STATE


DATA_CLASS = [
    Data("t", b""),
    Request(1, "t", b""),
    Response(1, b""),
    ErrorResponse(1, 1, "x"),
    ToDevice("d", "t", b""),
    FromDevice("d", "t", b""),
    DeviceRequest(1, "d", "t", b""),
]


@pytest.mark.parametrize("early", DATA_CLASS, ids=lambda m: message_name(m.code))
def test_connection_rejects_data_before_ready(early: Any) -> None:
    a, b = open_pair()
    raises(
        UnexpectedMessage,
        f"10.0.0.1: {message_name(early.code)} before ready",
        b.receive_data,
        a.send(Ping(1)) + a.send(early),
    )
    assert b.state == connection.ERROR


def test_connection_rejects_a_second_ready() -> None:
    a, b = open_pair()
    b.receive_data(a.send(Ready()))
    raises(
        UnexpectedMessage, "10.0.0.1: second ready on one connection", b.receive_data,
        a.send(Ready()),
    )  # fmt: skip


def test_connection_delivers_the_same_messages_byte_by_byte() -> None:
    msgs = [HELLO_A, Ping(1), Ready(), Data("t", b"x" * 100), Ping(1), Bye("done")]
    stream = b"".join(PeerProtocol.send(m) for m in msgs)
    proto = PeerProtocol(expected_node_id=NODE_A)
    got = []
    for i in range(len(stream)):
        got += proto.receive_data(stream[i : i + 1])
    assert got == msgs
    assert proto.state == connection.CLOSED
    proto.receive_eof()


def test_connection_returns_messages_that_follow_the_hello_in_one_read() -> None:
    proto = PeerProtocol()
    data = b"".join(PeerProtocol.send(m) for m in (HELLO_A, Ready(), Data("t", b"")))
    assert proto.receive_data(data) == [HELLO_A, Ready(), Data("t", b"")]


def test_connection_accepts_any_node_id_when_none_is_expected() -> None:
    proto = PeerProtocol()
    assert proto.receive_data(PeerProtocol.send(Hello("anything", 1, 2))) == [
        Hello("anything", 1, 2)
    ]


@pytest.mark.parametrize(
    "first", [Data("t", b""), Ping(1), Pong(1), Request(1, "t", b""), Bye("x"), Peers([])]
)
def test_connection_rejects_message_before_hello(first) -> None:
    proto = PeerProtocol(name="10.0.0.9")
    raises(
        UnexpectedMessage,
        f"10.0.0.9: expected hello as the first message, got {message_name(first.code)}",
        proto.receive_data,
        proto.send(first),
    )
    assert proto.state == connection.ERROR


def test_connection_rejects_data_before_hello() -> None:
    raises(
        UnexpectedMessage,
        "peer: expected hello as the first message, got data",
        PeerProtocol().receive_data,
        DATA_FRAME,
    )


def test_connection_rejects_second_hello() -> None:
    a, _ = open_pair()
    raises(
        UnexpectedMessage,
        "10.0.0.2: second hello on one connection",
        a.receive_data,
        a.send(HELLO_B),
    )


def test_connection_rejects_second_hello_in_the_same_read() -> None:
    proto = PeerProtocol()
    raises(
        UnexpectedMessage,
        "peer: second hello on one connection",
        proto.receive_data,
        proto.send(HELLO_A) + proto.send(HELLO_A),
    )


def test_connection_rejects_hello_naming_another_node() -> None:
    proto = PeerProtocol(expected_node_id=NODE_B, name="10.0.0.5")
    error = raises(
        HandshakeError,
        f"10.0.0.5: hello names node '{NODE_A}' but the certificate belongs to {NODE_B}",
        proto.receive_data,
        proto.send(HELLO_A),
    )
    # Not a ProtocolError: the bytes were fine, the identity is not.
    assert not isinstance(error, ProtocolError)
    assert proto.state == connection.ERROR
    assert proto.their_hello is None


def test_connection_rejects_hello_naming_another_node_showing_a_truncated_id() -> None:
    proto = PeerProtocol(expected_node_id=NODE_B)
    raises(
        HandshakeError,
        # Control characters escaped, the repr cut to 70 characters.
        "peer: hello names node '" + "\\x00" * 17 + f"\\ but the certificate belongs to {NODE_B}",
        proto.receive_data,
        proto.send(Hello("\x00" * 20, 1, 1)),
    )


def test_connection_rejects_hello_of_another_version() -> None:
    proto = PeerProtocol()
    raises(
        VersionMismatch,
        "peer speaks protocol version 1; this node speaks 2",
        proto.receive_data,
        encode_frame(body(0, 1, NODE_A, 7300, 1)),
    )


def test_connection_rejects_oversize_frame_at_its_limit() -> None:
    proto = PeerProtocol(limits=Limits(max_frame_bytes=300), name="10.0.0.3")
    raises(
        FrameTooLarge,
        "10.0.0.3: frame length 301 exceeds 300-byte limit",
        proto.receive_data,
        (301).to_bytes(4, "big"),
    )


def test_connection_rejects_malformed_message_after_hello() -> None:
    a, _ = open_pair()
    raises(
        MalformedMessage,
        "topic should not be empty",
        a.receive_data,
        encode_frame(body(3, "", b"")),
    )
    assert a.state == connection.ERROR


def test_connection_closes_after_bye() -> None:
    a, b = open_pair()
    assert b.receive_data(a.send(Bye("shutting down"))) == [Bye("shutting down")]
    assert b.state == connection.CLOSED
    assert b.receive_data(b"") == []
    b.receive_eof()
    assert b.state == connection.CLOSED


@pytest.mark.parametrize(
    "after",
    [
        PeerProtocol.send(Ping(1)),  # a whole frame in the same read
        b"\x00\x00",  # part of a header in the same read
        PeerProtocol.send(Ping(1))[:5],  # part of a frame in the same read
        encode_frame(b"\xff"),  # a frame that would not even decode
        PeerProtocol.send(HELLO_A),
    ],
    ids=["frame", "partial header", "partial frame", "garbage frame", "hello"],
)
def test_connection_rejects_bytes_after_bye(after: bytes) -> None:
    bye = PeerProtocol.send(Bye("done"))
    for chunks in ([bye + after], [bye, after], [bytes([x]) for x in bye + after]):
        a, _ = open_pair()
        with pytest.raises(UnexpectedMessage) as info:
            for chunk in chunks:
                a.receive_data(chunk)
        assert str(info.value) == "10.0.0.2: bytes after bye"
        assert a.state == connection.ERROR


def test_connection_error_state_is_sticky() -> None:
    a, b = open_pair()
    error = raises(
        UnknownMessageType, "unknown message type 14 in frame 81 0e", a.receive_data,
        encode_frame(hx("81 0e")),
    )  # fmt: skip
    assert a.state == connection.ERROR
    for call in (
        lambda: a.receive_data(b.send(Ping(1))),
        lambda: a.receive_data(b""),
        a.receive_eof,
    ):
        with pytest.raises(UnknownMessageType) as again:
            call()
        assert again.value is error
        assert a.state == connection.ERROR


def test_connection_handshake_error_is_sticky() -> None:
    proto = PeerProtocol(expected_node_id=NODE_B)
    with pytest.raises(HandshakeError) as first:
        proto.receive_data(proto.send(HELLO_A))
    with pytest.raises(HandshakeError) as again:
        proto.receive_data(proto.send(HELLO_B))
    assert again.value is first.value


def test_connection_rejects_eof_mid_body() -> None:
    a, b = open_pair()
    frame = b.send(Data("temp", b"\x01\x02\x03"))
    assert a.receive_data(frame[:9]) == []
    raises(
        TruncatedFrame, "10.0.0.2: stream ended mid-frame: got 5 of 11 body bytes", a.receive_eof
    )
    assert a.state == connection.ERROR


def test_connection_rejects_eof_mid_header() -> None:
    proto = PeerProtocol()
    proto.receive_data(b"\x00\x00\x00")
    raises(
        TruncatedFrame, "peer: stream ended mid-frame: got 3 of 4 header bytes", proto.receive_eof
    )
    with pytest.raises(TruncatedFrame):
        proto.receive_data(b"\x00")


def test_connection_accepts_eof_between_frames() -> None:
    a, _ = open_pair()
    a.receive_eof()
    assert a.state == connection.CLOSED


_STREAM_PARTS = [
    PeerProtocol.send(HELLO_A),
    PeerProtocol.send(HELLO_B),
    PeerProtocol.send(Data("t", b"abc")),
    PeerProtocol.send(Ping(3)),
    PeerProtocol.send(Bye("done")),
    encode_frame(b"\xff"),
    encode_frame(body(3, "", b"")),
    encode_frame(b""),
]


@given(
    parts=st.lists(st.sampled_from(_STREAM_PARTS), max_size=6),
    hello_first=st.booleans(),
    tail=st.sampled_from([b"", b"\x00\x00", PeerProtocol.send(Ping(1))[:6]]),
    data=st.data(),
)
def test_connection_outcome_does_not_depend_on_how_reads_cut_the_stream(
    parts: list[bytes], hello_first: bool, tail: bytes, data
) -> None:
    # Frames within the size limit: a FrameTooLarge is raised by the framing
    # layer for the whole read, before the frames ahead of it are checked.
    stream = (_STREAM_PARTS[0] if hello_first else b"") + b"".join(parts) + tail

    def outcome(chunks: list[bytes]) -> tuple[object, ...]:
        proto = PeerProtocol(expected_node_id=NODE_A)
        got: list[object] = []
        try:
            for chunk in chunks:
                got += proto.receive_data(chunk)
            proto.receive_eof()
        except (ProtocolError, HandshakeError) as exc:
            # Messages completed in the failing read are not returned, so
            # only the error itself is compared.
            return ("error", type(exc), str(exc), proto.state)
        return ("ok", got, proto.state)

    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)])]
    expected = outcome([stream])
    assert outcome(chunks) == expected
    assert outcome([bytes([x]) for x in stream]) == expected


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ([9, "", "t", b""], "device id should not be empty"),
        ([10, "d" * 33, "t", b""], "device id of 33 bytes exceeds 32-byte limit"),
        ([11, 1, "dev", "", b""], "topic should not be empty"),
        ([12, "pico"], "device list should be an array, got str"),
        ([12, ["d"] * 33], "device list of 33 entries exceeds 32-entry limit"),
        ([12, [7]], "device id should be text, got int"),
    ],
)
def test_message_decoder_rejects_bad_device_messages(item: list, message: str) -> None:
    with pytest.raises(MalformedMessage, match=re.escape(message)):
        decode_message(cbor2.dumps(item))


# -- the fast path agrees with the strict decoder ------------------------------------

_flat_value = st.one_of(
    st.integers(0, U64_MAX),
    st.binary(max_size=300),
    st.text(max_size=80),
)


def _heads_of_any_width(item: list[object], widths: list[int]) -> bytes:
    """``item`` as CBOR, each head written in the width asked for (non-shortest too)."""
    out = bytearray([0x80 | len(item)])
    for value, width in zip(item, widths):
        if isinstance(value, int):
            major, arg, raw = 0x00, value, b""
        elif isinstance(value, bytes):
            major, arg, raw = 0x40, len(value), value
        else:
            raw = value.encode()  # type: ignore[union-attr]
            major, arg = 0x60, len(raw)
        need = (arg.bit_length() + 7) // 8
        if width == 0 and arg < 24:
            out.append(major | arg)
        else:
            size = max(1 << max(0, width - 1), need)
            size = next(s for s in (1, 2, 4, 8) if s >= size)
            out.append(major | {1: 24, 2: 25, 4: 26, 8: 27}[size])
            out += arg.to_bytes(size, "big")
        out += raw
    return bytes(out)


@given(
    st.lists(_flat_value, min_size=1, max_size=5),
    st.lists(st.integers(0, 4), min_size=5, max_size=5),
)
def test_fast_path_gives_the_strict_decoders_items(item: list[object], widths: list[int]) -> None:
    from edgenode.proto.decoding import _flat_items

    encoded = _heads_of_any_width(item, widths)
    assert _flat_items(encoded) == cbor.decode(encoded) == item


@given(st.binary(max_size=64))
def test_fast_path_accepts_nothing_the_strict_decoder_refuses(data: bytes) -> None:
    from edgenode.proto.decoding import _flat_items

    fast = _flat_items(data)
    if fast is not None:
        assert cbor.decode(data) == fast


@given(st.integers(0, U64_MAX), st.text(max_size=200), st.binary(max_size=70000))
def test_fast_encoders_write_the_generic_encoders_bytes(
    rid: int, topic: str, payload: bytes
) -> None:
    from edgenode.proto.messages import encode_data, encode_request, encode_response

    assert encode_data(topic, payload) == cbor.encode([DATA, topic, payload])
    assert encode_request(rid, topic, payload) == cbor.encode([REQUEST, rid, topic, payload])
    assert encode_response(rid, payload) == cbor.encode([RESPONSE, rid, payload])
    assert encode_data(topic, payload) == cbor2.dumps([DATA, topic, payload])
