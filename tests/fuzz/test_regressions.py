"""Regression tests for what the fuzzers found: one test per bug, named after it."""

from __future__ import annotations

import cbor2
import pytest

from edgenode.errors import MalformedMessage, UnexpectedMessage
from edgenode.proto.connection import PeerProtocol
from edgenode.proto.decoding import decode_message
from edgenode.proto.framing import FrameDecoder
from edgenode.proto.messages import Bye, Hello
from firmware_bridge.cobs import FrameError, FrameSplitter
from firmware_bridge.link import Dropped, Link

from .harness import run_guarded
from .targets import CERT_NODE_ID, TARGETS


def _oversize_messages(splitter: FrameSplitter, *reads: bytes) -> list[str]:
    items = [item for data in reads for item in splitter.feed(data)]
    return [str(item) if isinstance(item, FrameError) else repr(item) for item in items]


def test_splitter_oversize_message_does_not_depend_on_how_reads_cut_the_frame() -> None:
    # Found by cobs_stream: the preview joined 16 buffered bytes and 16 new
    # ones, so a frame cut across two reads showed 32 bytes and claimed a
    # "(32 bytes)" length that was neither the frame's nor the preview's.
    frame = bytes(range(1, 41)) + b"\x00"
    expected = (
        "oversize frame: 40 bytes exceed the 30-byte limit: "
        "01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10"
    )
    assert _oversize_messages(FrameSplitter(30), frame) == [expected]
    assert _oversize_messages(FrameSplitter(30), frame[:20], frame[20:]) == [expected]
    assert _oversize_messages(FrameSplitter(30), *[frame[i : i + 1] for i in range(41)]) == [
        expected
    ]


def test_splitter_oversize_message_shows_no_bytes_past_the_delimiter() -> None:
    # Found by cobs_stream: with a small limit the preview ran on past the
    # frame's 0x00 into the next frame.
    messages = _oversize_messages(FrameSplitter(4), b"abc", b"defgh\x00xyz\x00")
    assert messages == [
        "oversize frame: 8 bytes exceed the 4-byte limit: 61 62 63 64 65 66 67 68",
        "b'xyz'",
    ]


def test_link_empty_frame_message_has_no_dangling_preview() -> None:
    # Found by link: a frame that decodes to no bytes at all (COBS 01) was
    # reported as "...-byte minimum: " with nothing after the colon.
    link = Link("host", "node-a", 1)
    link.start(0)
    events = link.receive_bytes(b"\x01\x00", 1)
    assert len(events) == 1 and type(events[0]) is Dropped
    assert type(events[0].error) is FrameError and events[0].reason == "bad frame"
    assert events[0].message == "bad frame: 0 bytes is shorter than the 5-byte minimum"
    events = link.receive_bytes(b"\x03ab\x00", 2)
    assert events[0].message == "bad frame: 2 bytes is shorter than the 5-byte minimum: 61 62"


@pytest.mark.parametrize(
    ("name", "data", "cuts"),
    [
        pytest.param("link", b"\x01\x00", [], id="link-empty-frame"),
        pytest.param("cobs_stream", bytes(range(1, 255)) * 2 + b"\x00", [300], id="split-oversize"),
        pytest.param(
            "connection",
            bytes.fromhex(
                "00000032850001782263346b6e2d6e6e726c2d703362322d773775682d666878672d356969332d"
                "7564743518181b1b37d365fc5c240c00000012840a64396e7367692d3235e282ac6e7063400000"
                "00048207616700000007"
            ),
            [1, 8, 31, 47, 65, 70, 75, 84],
            id="bye-then-header",
        ),
        pytest.param(
            "messages",
            bytes.fromhex(
                "8202840978206362e4b8ad366c713233c3bc64786f746e2f7a6d66e4b8ad5f6c7a376c755f62617241f4"
            ),
            [],
            id="repr-cut-at-a-space",
        ),
    ],
)
def test_fuzz_findings_pass_the_oracle_now(name: str, data: bytes, cuts: list[int]) -> None:
    run_guarded(TARGETS[name], data, cuts)


def test_bye_then_a_bare_frame_header_in_one_read_is_bytes_after_bye() -> None:
    # Found by connection: after a bye, a next frame's 4-byte header with no
    # body yet was not "bytes after bye" when it came in the bye's read (the
    # check asked FrameDecoder.buffered, which does not count a parsed
    # header), only when it came in a later read.
    stream = (
        PeerProtocol.send(Hello(CERT_NODE_ID, 7300, 1))
        + PeerProtocol.send(Bye("done"))
        + (7).to_bytes(4, "big")
    )
    for cut in (len(stream), len(stream) - 4):
        proto = PeerProtocol(name="peer")
        with pytest.raises(UnexpectedMessage) as info:
            proto.receive_data(stream[:cut])
            proto.receive_data(stream[cut:])
        assert type(info.value) is UnexpectedMessage
        assert str(info.value) == "peer: bytes after bye"


def test_frame_decoder_is_mid_frame_after_a_bare_header() -> None:
    decoder = FrameDecoder()
    assert not decoder.mid_frame
    assert decoder.feed(b"\x00\x00") == []
    assert decoder.mid_frame and decoder.buffered == 2
    assert decoder.feed(b"\x00\x07") == []
    assert decoder.mid_frame and decoder.buffered == 0  # the header is consumed
    assert decoder.feed(b"abcdefg") == [b"abcdefg"]
    assert not decoder.mid_frame


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            [2, [1] * 20],
            "pong nonce should be an integer in 0..18446744073709551615, got "
            "[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, ...",
        ),
        (
            [8, [[1] * 30]],
            "peer list entry should be [ip, port, node_id], got "
            "[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,...",
        ),
    ],
)
def test_message_field_shown_cut_ends_with_an_ellipsis_not_a_space(
    item: list, message: str
) -> None:
    # Found by messages (a million inputs): a field's repr cut at 40 (60)
    # characters could end in ", " and left no sign it was cut.
    with pytest.raises(MalformedMessage) as info:
        decode_message(cbor2.dumps(item))
    assert type(info.value) is MalformedMessage
    assert str(info.value) == message


def test_empty_algorithm_identifier_is_named_not_left_blank() -> None:
    # Found by preamble: a certificate whose key algorithm identifier was
    # empty gave a message ending in "got ".
    from edgenode.identity import _describe_algorithm

    assert _describe_algorithm(b"") == "an empty algorithm identifier"


def test_empty_beacon_is_named_not_left_blank() -> None:
    # Found by beacon: an empty datagram gave a message ending in "got ".
    from edgenode.proto.beacon import decode_beacon

    with pytest.raises(MalformedMessage) as raised:
        decode_beacon(b"")
    assert str(raised.value) == (
        "expected beacon magic 45 44 47 42 ('EDGB'), got an empty datagram"
    )
