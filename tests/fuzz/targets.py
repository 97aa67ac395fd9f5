"""The decoders under fuzzing, each with its oracle.

One :class:`~tests.fuzz.harness.Target` per decoder that takes bytes from
outside the process:

==============  ============================================================
name            decoder (documented exceptions)
==============  ============================================================
framing         proto.framing.FrameDecoder (FrameTooLarge, TruncatedFrame)
messages        proto.decoding.decode_message (MalformedMessage,
                UnknownMessageType, VersionMismatch)
hello           proto.connection.PeerProtocol checking the first message
                against the certificate's node ID (the connection's errors,
                plus HandshakeError)
connection      proto.connection.PeerProtocol: framing, messages and their
                order (FrameTooLarge, TruncatedFrame, MalformedMessage,
                UnknownMessageType, VersionMismatch, UnexpectedMessage)
preamble        proto.preamble.parse_preamble as the listener runs it, then
                the node ID of the certificate it carries (BadPreamble,
                IdentityError)
beacon          proto.beacon.decode_beacon (MalformedMessage, VersionMismatch)
cobs            firmware_bridge.cobs.decode (FrameError "bad cobs")
cobs_stream     firmware_bridge.cobs.FrameSplitter (never raises; oversize
                frames come back as FrameError "oversize" items)
cbor            firmware_bridge.cbor.decode (CBORError)
link_hello      firmware_bridge.link.Hello.decode (FrameError "bad hello")
link            firmware_bridge.link.Link.receive_bytes, a host whose
                session is up (never raises: bad frames become Dropped events)
link_reliable   the same in reliable mode
link_psk        a device in reliable mode with a pre-shared key
link_frames     frame bodies sealed with a correct CRC and HMAC tag before
                they reach a reliable, authenticated host, so that mutations
                get past the checksum and the tag
hmac            firmware_bridge.hmac_sha256 (never raises; equals hmac)
==============  ============================================================
"""

from __future__ import annotations

import hmac as std_hmac
import pickle
import re
import struct
from binascii import crc32
from collections.abc import Sequence
from typing import Any

import cbor2

from edgenode.errors import (
    BadPreamble,
    FrameTooLarge,
    HandshakeError,
    IdentityError,
    MalformedMessage,
    ProtocolError,
    TruncatedFrame,
    UnexpectedMessage,
    UnknownMessageType,
    VersionMismatch,
)
from edgenode.identity import node_id_from_cert_der, parse_node_id
from edgenode.proto.beacon import MAX_BEACON_BYTES, decode_beacon, encode_beacon
from edgenode.proto.connection import ERROR, PeerProtocol
from edgenode.proto.decoding import decode_message
from edgenode.proto.framing import HEADER_BYTES, FrameDecoder, encode_frame
from edgenode.proto.messages import (
    BYE,
    DEFAULT_LIMITS,
    HELLO,
    MAX_DEVICE_ID_BYTES,
    PROTOCOL_VERSION,
    Bye,
    Data,
    DeviceRequest,
    Devices,
    ErrorResponse,
    FromDevice,
    Hello,
    Message,
    PeerInfo,
    Peers,
    Ping,
    Pong,
    Ready,
    Request,
    Response,
    ToDevice,
    encode_message,
)
from edgenode.proto.preamble import HEAD_BYTES, MAX_CERT_BYTES, encode_preamble, parse_preamble
from firmware_bridge import cbor, cobs
from firmware_bridge import link as fl

# A Link loads these on first use (with a key, in reliable mode): loaded now,
# so that importing them is not counted as a fuzz input's allocation.
import firmware_bridge.auth  # isort: skip
import firmware_bridge.reliable  # noqa: F401  # isort: skip
from firmware_bridge.hmac_sha256 import HmacSha256, equal

from .harness import FuzzFailure, Target, check_message, chunks, fail

# A real node certificate (Ed25519, made by edgenode.identity.create_identity).
CERT_DER = bytes.fromhex(
    "3082012d3081e0a0030201020214664b0ca5c6a3afcd8890bb7a9517001718a951c1300506032b65"
    "70302d312b302906035504030c227a6f71332d786a68712d716b646c2d647037372d646f7a6e2d78"
    "76776f2d6f7870323020170d3730303130313030303030305a180f39393939313233313233353935"
    "395a302d312b302906035504030c227a6f71332d786a68712d716b646c2d647037372d646f7a6e2d"
    "7876776f2d6f787032302a300506032b657003210049d44ad5226dd8d2bd85750553b5223940d18d"
    "aaa7242059607e13d683bf64ada310300e300c0603551d130101ff04023000300506032b65700341"
    "00848fd30ac6d62fe26cab52beb8ce76b34b64955ca975f47247500c5833075e57891ea87b8907db"
    "6d6ae72c47dc9546aa658418daee10017761ff821aeef98d05"
)
CERT_NODE_ID = "zoq3-xjhq-qkdl-dp77-dozn-xvwo-oxp2"

# --- random valid values -----------------------------------------------------

_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_./: " + "\u00e9\u00fc\u20ac\u4e2d\U0001f600"
_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


def rand_chars(rnd: Any, size: int, alphabet: str) -> str:
    # One draw for the lot: hypothesis's Random pays per call.
    return "".join(alphabet[b % len(alphabet)] for b in rnd.randbytes(size))


def rand_text(rnd: Any, max_bytes: int, min_chars: int = 0) -> str:
    """Random text of at most ``max_bytes`` utf-8 bytes (multi-byte characters too)."""
    size = rnd.choice((min_chars, rnd.randint(min_chars, max(min_chars, 12)), max_bytes))
    text = rand_chars(rnd, max(size, min_chars), _CHARS)
    while len(text.encode()) > max_bytes:
        text = text[:-1]
    return text if len(text) >= min_chars else "t" * min_chars


def rand_node_id(rnd: Any) -> str:
    chars = rand_chars(rnd, 28, _BASE32)
    return "-".join(chars[i : i + 4] for i in range(0, 28, 4))


def rand_uint(rnd: Any, bits: int = 64) -> int:
    top = (1 << bits) - 1
    return rnd.choice((0, 1, 23, 24, 255, 256, 65535, 65536, top, rnd.getrandbits(bits)))


def rand_bytes(rnd: Any, max_size: int) -> bytes:
    size = rnd.choice((0, 1, rnd.randint(0, 24), rnd.randint(0, max_size)))
    return rnd.randbytes(size)


def rand_message(rnd: Any) -> Message:
    """A random valid node message of any type."""

    def topic() -> str:
        return rand_text(rnd, DEFAULT_LIMITS.max_topic_bytes, 1)

    def text() -> str:
        return rand_text(rnd, DEFAULT_LIMITS.max_text_bytes)

    def payload() -> bytes:
        return rand_bytes(rnd, 600)

    def device() -> str:
        return rand_text(rnd, MAX_DEVICE_ID_BYTES, 1)

    code = rnd.randrange(14)
    if code == 13:
        return Ready()
    if code == 0:
        return Hello(rand_node_id(rnd), rand_uint(rnd, 16), rand_uint(rnd))
    if code in (1, 2):
        return (Ping if code == 1 else Pong)(rand_uint(rnd))
    if code == 3:
        return Data(topic(), payload())
    if code == 4:
        return Request(rand_uint(rnd), topic(), payload())
    if code == 5:
        return Response(rand_uint(rnd), payload())
    if code == 6:
        return ErrorResponse(rand_uint(rnd), rand_uint(rnd, 16), text())
    if code == 7:
        return Bye(text())
    if code == 8:
        peers = [
            PeerInfo(
                rnd.choice(("10.0.0.1", "::ffff:10.1.2.3", "fe80::1%eth0", "x" * 45)),
                rand_uint(rnd, 16),
                rnd.choice((None, rand_node_id(rnd))),
            )
            for _ in range(rnd.choice((0, 1, rnd.randint(0, 8), DEFAULT_LIMITS.max_peers_listed)))
        ]
        return Peers(peers)
    if code in (9, 10):
        return (ToDevice if code == 9 else FromDevice)(device(), topic(), payload())
    if code == 11:
        return DeviceRequest(rand_uint(rnd), device(), topic(), payload())
    count = rnd.choice((0, 1, rnd.randint(0, 4), DEFAULT_LIMITS.max_devices_listed))
    return Devices([rand_text(rnd, MAX_DEVICE_ID_BYTES, 1) for _ in range(count)])


def rand_cbor(rnd: Any, depth: int = 3) -> Any:
    """A random value of the CBOR subset firmware_bridge.cbor speaks."""
    kind = rnd.randrange(10 if depth > 0 else 7)
    if kind == 0:
        return rnd.choice((None, True, False))
    if kind == 1:
        return rand_uint(rnd)
    if kind == 2:
        return -1 - rand_uint(rnd)
    if kind == 3:
        return rand_bytes(rnd, 300)
    if kind in (4, 5, 6):
        return rand_text(rnd, 300)
    if kind in (7, 8):
        return [rand_cbor(rnd, depth - 1) for _ in range(rnd.choice((0, 1, 2, 5, 30)))]
    out: dict[Any, Any] = {}
    for _ in range(rnd.choice((0, 1, 3, 8))):
        key = rand_text(rnd, 20) if rnd.random() < 0.5 else rnd.randint(-(1 << 64), (1 << 64) - 1)
        out[key] = rand_cbor(rnd, depth - 1)
    return out


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (1 == True, but not here)."""
    if type(a) is not type(b):
        return False
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def _sticky(exc: BaseException, *calls: Any) -> None:
    """After an error, every later call must raise that same error object."""
    for call in calls:
        try:
            call()
        except BaseException as again:
            if again is not exc:
                raise FuzzFailure(
                    f"after {type(exc).__name__} ({exc}), a later call raised "
                    f"{type(again).__name__} ({again}) instead of the same error"
                ) from None
        else:
            raise FuzzFailure(f"after {type(exc).__name__} ({exc}), a later call did not raise")


# --- edgenode.proto ------------------------------------------------------------


class Framing(Target):
    """proto.framing.FrameDecoder: length-prefixed frames from a stream."""

    name = "framing"
    allowed = (FrameTooLarge, TruncatedFrame)
    streaming = True
    limit = 1024
    alloc_per_byte = 4
    short_examples = 150

    def valid(self, rnd: Any) -> bytes:
        bodies = []
        for _ in range(rnd.randint(0, 4)):
            size = rnd.choice((0, 1, rnd.randint(0, 64), rnd.randint(0, self.limit), self.limit))
            bodies.append(rnd.randbytes(size))
        return b"".join(encode_frame(b) for b in bodies)

    def _run(self, data: bytes, cuts: Sequence[int], frames: list[bytes]) -> None:
        decoder = FrameDecoder(self.limit, "fuzz")
        try:
            for part in chunks(data, cuts):
                frames += decoder.feed(part)
                if decoder.buffered >= HEADER_BYTES + self.limit:
                    raise FuzzFailure(
                        f"decoder holds {decoder.buffered} bytes, more than a frame of "
                        f"{self.limit} bytes and its header"
                    )
            decoder.eof()
        except ProtocolError as exc:
            _sticky(exc, lambda: decoder.feed(b"\x00"), decoder.eof)
            raise

    def decode(self, data: bytes, cuts: Sequence[int]) -> list[bytes]:
        frames: list[bytes] = []
        self._run(data, cuts, frames)
        return frames

    def reference(self, data: bytes) -> tuple[list[bytes], type[ProtocolError] | None]:
        """The frames of ``data`` and the error it ends in, by the format's definition."""
        frames, pos = [], 0
        while pos < len(data):
            if len(data) - pos < HEADER_BYTES:
                return frames, TruncatedFrame
            size = int.from_bytes(data[pos : pos + HEADER_BYTES], "big")
            if size > self.limit:
                return frames, FrameTooLarge
            if len(data) - pos - HEADER_BYTES < size:
                return frames, TruncatedFrame
            frames.append(data[pos + HEADER_BYTES : pos + HEADER_BYTES + size])
            pos += HEADER_BYTES + size
        return frames, None

    def verify(self, data: bytes, cuts: Sequence[int], frames: list[bytes]) -> None:
        expected, error = self.reference(data)
        if error is not None or frames != expected:
            raise fail(self, data, cuts, f"accepted; the format says {error} / {len(expected)}")
        if b"".join(encode_frame(f) for f in frames) != data:
            raise fail(self, data, cuts, "frames do not re-encode to the input")

    def verify_rejected(self, data: bytes, cuts: Sequence[int], exc: BaseException) -> None:
        expected, error = self.reference(data)
        if type(exc) is not error:
            raise fail(self, data, cuts, f"raised {type(exc).__name__}; the format says {error}")
        frames: list[bytes] = []
        try:
            self._run(data, cuts, frames)
        except ProtocolError:
            pass
        if frames != expected[: len(frames)]:
            raise fail(self, data, cuts, "frames before the error differ from the format's")
        if type(exc) is FrameTooLarge:
            pattern = r"fuzz: frame length \d+ exceeds 1024-byte limit"
        else:
            pattern = r"fuzz: stream ended mid-frame: got \d+ of \d+ (header|body) bytes"
        if not re.fullmatch(pattern, str(exc)):
            raise fail(self, data, cuts, f"unexpected message {str(exc)!r}")


_MESSAGE_ERRORS = (MalformedMessage, UnknownMessageType, VersionMismatch)


def _within_limits(msg: Message) -> bool:
    limits = DEFAULT_LIMITS

    def text_ok(text: object, limit: int, empty: bool = True) -> bool:
        return type(text) is str and len(text.encode()) <= limit and (empty or bool(text))

    if isinstance(msg, (Data, Request, ToDevice, FromDevice, DeviceRequest)):
        if not text_ok(msg.topic, limits.max_topic_bytes, False):
            return False
    if isinstance(msg, (ToDevice, FromDevice, DeviceRequest)):
        if not text_ok(msg.device_id, MAX_DEVICE_ID_BYTES, False):
            return False
    if isinstance(msg, (ErrorResponse,)):
        return text_ok(msg.message, limits.max_text_bytes) and 0 <= msg.error_code <= 0xFFFF
    if isinstance(msg, Bye):
        return text_ok(msg.reason, limits.max_text_bytes)
    if isinstance(msg, Hello):
        return msg.version == PROTOCOL_VERSION and text_ok(msg.node_id, 64, False)
    if isinstance(msg, Peers):
        return len(msg.peers) <= limits.max_peers_listed
    if isinstance(msg, Devices):
        return len(msg.device_ids) <= limits.max_devices_listed
    return True


class Messages(Target):
    """proto.decoding.decode_message: one frame body into a node message."""

    name = "messages"
    allowed = _MESSAGE_ERRORS
    short_examples = 200

    def valid(self, rnd: Any) -> bytes:
        return encode_message(rand_message(rnd))  # type: ignore[arg-type]

    def decode(self, data: bytes, cuts: Sequence[int]) -> Message:
        return decode_message(data)

    def verify(self, data: bytes, cuts: Sequence[int], msg: Message) -> None:
        encoded = encode_message(msg)  # type: ignore[arg-type]
        if decode_message(encoded) != msg:
            raise fail(self, data, cuts, f"{msg!r:.200} does not survive a round trip")
        # The same array as cbor2 reads it: no field lost, reordered or retyped.
        if cbor2.dumps(cbor2.loads(data)) != encoded:
            raise fail(self, data, cuts, f"decoded as {msg!r:.200}, which cbor2 reads otherwise")
        if not _within_limits(msg):
            raise fail(self, data, cuts, f"{msg!r:.200} is outside the limits")


_STREAM_ERRORS = (
    FrameTooLarge,
    TruncatedFrame,
    MalformedMessage,
    UnknownMessageType,
    VersionMismatch,
    UnexpectedMessage,
)


class Connection(Target):
    """proto.connection.PeerProtocol: frames, messages and their order."""

    name = "connection"
    allowed: tuple[type[BaseException], ...] = _STREAM_ERRORS
    streaming = True
    expected_node_id: str | None = None
    alloc_per_byte = 24
    short_examples = 150

    def _hello(self, rnd: Any) -> Message:
        return Hello(rand_node_id(rnd), rand_uint(rnd, 16), rand_uint(rnd))

    def valid(self, rnd: Any) -> bytes:
        msgs: list[Message] = []
        if rnd.random() < 0.9:
            msgs.append(self._hello(rnd))
        for _ in range(rnd.choice((0, 1, 2, 4))):
            msg = rand_message(rnd)
            if msg.code != HELLO:
                msgs.append(msg)
        if rnd.random() < 0.2:
            msgs.append(Bye("fuzz"))
        return b"".join(PeerProtocol.send(m) for m in msgs)  # type: ignore[arg-type]

    def _run(self, data: bytes, cuts: Sequence[int], out: list[Message]) -> None:
        proto = PeerProtocol(expected_node_id=self.expected_node_id, name="fuzz")
        try:
            for part in chunks(data, cuts):
                out += proto.receive_data(part)
            proto.receive_eof()
        except (ProtocolError, HandshakeError) as exc:
            if proto.state != ERROR:
                raise FuzzFailure(f"state {proto.state!r} after {type(exc).__name__}") from None
            _sticky(exc, lambda: proto.receive_data(b""), proto.receive_eof)
            raise

    def decode(self, data: bytes, cuts: Sequence[int]) -> list[Message]:
        out: list[Message] = []
        self._run(data, cuts, out)
        return out

    def _one_shot(self, data: bytes) -> tuple[list[Message], BaseException | None]:
        out: list[Message] = []
        try:
            self._run(data, [], out)
        except (ProtocolError, HandshakeError) as exc:
            return out, exc
        return out, None

    def verify(self, data: bytes, cuts: Sequence[int], msgs: list[Message]) -> None:
        if msgs:
            first = msgs[0]
            if not isinstance(first, Hello) or any(m.code == HELLO for m in msgs[1:]):
                raise fail(self, data, cuts, "accepted a stream not opened by one hello")
            if self.expected_node_id is not None and first.node_id != self.expected_node_id:
                raise fail(self, data, cuts, f"accepted a hello naming {first.node_id!r}")
            if any(m.code == BYE for m in msgs[:-1]):
                raise fail(self, data, cuts, "accepted messages after a bye")
        if b"".join(PeerProtocol.send(m) for m in msgs) != data:  # type: ignore[arg-type]
            # Non-shortest CBOR re-encodes shorter: compare the messages instead.
            again = PeerProtocol(expected_node_id=self.expected_node_id)
            if again.receive_data(b"".join(PeerProtocol.send(m) for m in msgs)) != msgs:  # type: ignore[arg-type]
                raise fail(self, data, cuts, "messages do not survive a round trip")
        if cuts:
            whole, error = self._one_shot(data)
            if error is not None or whole != msgs:
                raise fail(self, data, cuts, f"in one read the outcome differs: {error!r}")

    def verify_rejected(self, data: bytes, cuts: Sequence[int], exc: BaseException) -> None:
        if not cuts:
            return
        _, error = self._one_shot(data)
        if error is None:
            raise fail(self, data, cuts, f"in one read accepted; in chunks {exc!r}")
        # A frame over the size limit is refused for the whole read that holds
        # it, before the frames ahead of it are checked (docs/protocol.md).
        if FrameTooLarge not in (type(exc), type(error)) and type(exc) is not type(error):
            raise fail(self, data, cuts, f"in one read {error!r}; in chunks {exc!r}")


class HelloCheck(Connection):
    """proto.connection.PeerProtocol: the hello against the certificate's node ID."""

    name = "hello"
    allowed = (*_STREAM_ERRORS, HandshakeError)
    expected_node_id = CERT_NODE_ID

    def _hello(self, rnd: Any) -> Message:
        roll = rnd.random()
        node_id = CERT_NODE_ID if roll < 0.8 else rnd.choice((rand_node_id(rnd), "", "x" * 65))
        version = PROTOCOL_VERSION if rnd.random() < 0.9 else rnd.choice((0, 2, (1 << 64) - 1))
        return Hello(node_id, rand_uint(rnd, 16), rand_uint(rnd), version)


class Preamble(Target):
    """proto.preamble.parse_preamble as the listener reads it, then the cert's node ID."""

    name = "preamble"
    allowed = (BadPreamble, IdentityError)
    streaming = True
    max_input = MAX_CERT_BYTES + 64
    alloc_per_byte = 8

    def valid(self, rnd: Any) -> bytes:
        cert = CERT_DER if rnd.random() < 0.8 else rand_bytes(rnd, MAX_CERT_BYTES) or b"\x30"
        return encode_preamble(cert) + rand_bytes(rnd, 16)

    def decode(self, data: bytes, cuts: Sequence[int]) -> tuple[bytes, int, str] | None:
        # As the listener reads it: parse again as each read arrives.
        buf = bytearray()
        parsed = None
        for part in chunks(data, cuts):
            buf += part
            parsed = parse_preamble(buf)
            if parsed is not None:
                break
        if parsed is None:
            return None
        cert_der, used = parsed
        return cert_der, used, node_id_from_cert_der(cert_der)

    def verify(self, data: bytes, cuts: Sequence[int], value: Any) -> None:
        whole = parse_preamble(data)
        if value is None:
            need = HEAD_BYTES + int.from_bytes(data[5:7], "big")
            if whole is not None or (len(data) >= HEAD_BYTES and len(data) >= need):
                raise fail(self, data, cuts, "waits for more bytes than a preamble needs")
            return
        cert_der, used, node_id = value
        if whole is None or whole != (cert_der, used):
            raise fail(self, data, cuts, f"in one read parsed as {whole!r:.100}")
        if data[:used] != encode_preamble(cert_der):
            raise fail(self, data, cuts, "the preamble does not re-encode to its bytes")
        if parse_node_id(node_id) != node_id:
            raise fail(self, data, cuts, f"node id {node_id!r} is not canonical")

    def verify_rejected(self, data: bytes, cuts: Sequence[int], exc: BaseException) -> None:
        try:
            parsed = parse_preamble(data)
            if parsed is not None:
                node_id_from_cert_der(parsed[0])
        except (BadPreamble, IdentityError) as again:
            if type(again) is not type(exc):
                raise fail(self, data, cuts, f"in one read {again!r}; in chunks {exc!r}") from None
        else:
            raise fail(self, data, cuts, f"in one read accepted; in chunks {exc!r}")


class BeaconTarget(Target):
    """proto.beacon.decode_beacon: one UDP discovery datagram."""

    name = "beacon"
    allowed = (MalformedMessage, VersionMismatch)
    max_input = 2 * MAX_BEACON_BYTES
    short_examples = 150

    def valid(self, rnd: Any) -> bytes:
        size = rnd.choice((1, 28 + 6, rnd.randint(1, 64), 64))
        node_id = rand_chars(rnd, size, _BASE32 + "-")
        return encode_beacon(node_id, rnd.randint(1, 65535), rand_uint(rnd))

    def decode(self, data: bytes, cuts: Sequence[int]) -> Any:
        return decode_beacon(data)

    def verify(self, data: bytes, cuts: Sequence[int], beacon: Any) -> None:
        if encode_beacon(beacon.node_id, beacon.listen_port, beacon.epoch) != data:
            raise fail(self, data, cuts, f"{beacon!r} does not re-encode to its bytes")


# --- firmware_bridge ------------------------------------------------------------------


def _check_reason(
    target: Target, data: bytes, cuts: Sequence[int], exc: BaseException, reason: str
) -> None:
    """A firmware_bridge FrameError, exactly, and for ``reason``."""
    if type(exc) is not cobs.FrameError or exc.reason != reason:
        got = getattr(exc, "reason", None)
        raise fail(target, data, cuts, f"{type(exc).__name__} ({got!r}), not {reason!r}")


class COBS(Target):
    """firmware_bridge.cobs.decode: one COBS frame."""

    name = "cobs"
    allowed = (cobs.FrameError,)
    max_input = 2048
    alloc_per_byte = 4

    def valid(self, rnd: Any) -> bytes:
        size = rnd.choice((0, 1, 253, 254, 255, 508, rnd.randint(0, 600)))
        raw = bytearray(rnd.randbytes(size))
        for _ in range(rnd.choice((0, 0, 1, 3, size // 4))):
            if raw:
                raw[rnd.randrange(len(raw))] = 0
        return cobs.encode(raw)

    def decode(self, data: bytes, cuts: Sequence[int]) -> bytes:
        return cobs.decode(data)

    def verify(self, data: bytes, cuts: Sequence[int], raw: bytes) -> None:
        encoded = cobs.encode(raw)
        if b"\x00" in encoded or cobs.decode(encoded) != raw:
            raise fail(self, data, cuts, "the decoded bytes do not survive a round trip")
        if len(raw) >= len(data):
            raise fail(self, data, cuts, f"{len(data)} bytes decoded to {len(raw)}")

    def verify_rejected(self, data: bytes, cuts: Sequence[int], exc: BaseException) -> None:
        _check_reason(self, data, cuts, exc, "bad cobs")


class COBSStream(Target):
    """firmware_bridge.cobs.FrameSplitter: a line stream into 0x00-delimited frames."""

    name = "cobs_stream"
    streaming = True
    cap = 300
    alloc_per_byte = 8
    short_examples = 150

    def valid(self, rnd: Any) -> bytes:
        parts = []
        for _ in range(rnd.randint(0, 5)):
            size = rnd.choice((0, 1, self.cap - 1, self.cap, self.cap + 1, rnd.randint(0, 400)))
            parts.append(cobs.encode(rnd.randbytes(size))[: self.cap + 20])
        lead = b"\x00" if rnd.random() < 0.5 else b""
        return lead + b"\x00".join(parts) + (b"\x00" if parts else b"")

    def decode(self, data: bytes, cuts: Sequence[int]) -> list[Any]:
        splitter = cobs.FrameSplitter(self.cap)
        items: list[Any] = []
        for part in chunks(data, cuts):
            items += splitter.feed(part)
            if splitter.buffered > self.cap:
                raise FuzzFailure(f"splitter holds {splitter.buffered} bytes over {self.cap}")
        return items

    def verify(self, data: bytes, cuts: Sequence[int], items: list[Any]) -> None:
        # By definition: each delimited, non-empty piece is a frame or too large.
        expected: list[Any] = []
        for piece in data.split(b"\x00")[:-1]:
            if len(piece) > self.cap:
                expected.append(
                    f"oversize frame: {len(piece)} bytes exceed the {self.cap}-byte limit: "
                    f"{cobs.hex_preview(piece[:16])}"
                )
            elif piece:
                expected.append(piece)
        got = []
        for item in items:
            if isinstance(item, cobs.FrameError):
                _check_reason(self, data, cuts, item, "oversize")
                check_message(self, item, data, cuts)
                got.append(str(item))
            elif type(item) is bytes:
                got.append(item)
            else:
                raise fail(self, data, cuts, f"item of type {type(item).__name__}")
        if got != expected:
            diff = next(i for i, (a, b) in enumerate(zip([*got, None], expected)) if a != b)
            raise fail(
                self,
                data,
                cuts,
                f"item {diff} is {got[diff] if diff < len(got) else None!r:.200}; "
                f"expected {expected[diff]!r:.200}",
            )


def _depth_and_items(value: Any) -> tuple[int, int]:
    if type(value) is list:
        inner = [_depth_and_items(v) for v in value]
        return 1 + max((d for d, _ in inner), default=0), len(value) + sum(n for _, n in inner)
    if type(value) is dict:
        inner = [_depth_and_items(v) for v in value.values()]
        return 1 + max((d for d, _ in inner), default=0), len(value) + sum(n for _, n in inner)
    return 0, 0


class CBOR(Target):
    """firmware_bridge.cbor.decode: the strict CBOR subset."""

    name = "cbor"
    allowed = (cbor.CBORError,)
    # An element of one byte (an empty map, say) can become a 64-byte object.
    alloc_per_byte = 128
    short_examples = 200

    def valid(self, rnd: Any) -> bytes:
        return cbor.encode(rand_cbor(rnd))

    def decode(self, data: bytes, cuts: Sequence[int]) -> Any:
        return cbor.decode(data)

    def verify(self, data: bytes, cuts: Sequence[int], value: Any) -> None:
        depth, items = _depth_and_items(value)
        if depth > cbor.DEFAULT_MAX_DEPTH or items > cbor.DEFAULT_MAX_ITEMS:
            raise fail(self, data, cuts, f"accepted depth {depth} with {items} items")
        theirs = cbor2.loads(data)
        if not same(theirs, value):
            raise fail(self, data, cuts, f"decoded {value!r:.100}; cbor2 reads {theirs!r:.100}")
        encoded = cbor.encode(value)
        if encoded != cbor2.dumps(value) or not same(cbor.decode(encoded), value):
            raise fail(self, data, cuts, f"{value!r:.100} does not survive a round trip")


class LinkHello(Target):
    """firmware_bridge.link.Hello.decode: a UART link hello's fields."""

    name = "link_hello"
    allowed = (fl.FrameError,)
    alloc_per_byte = 64
    short_examples = 150

    def valid(self, rnd: Any) -> bytes:
        hello = fl.Hello(
            rand_text(rnd, fl.MAX_ID_BYTES, 1),
            rnd.randint(1, 0xFFFFFFFF),
            rnd.choice((fl.MIN_FRAME_BYTES, 256, 0xFFFF, rnd.randint(fl.MIN_FRAME_BYTES, 0xFFFF))),
            rnd.randint(1, 0xFFFFFFFF),
            rnd.randint(1, 0xFFFFFFFF),
            rnd.random() < 0.5,
            rnd.random() < 0.5,
            rnd.choice((0, rnd.randint(0, 0xFFFFFFFF))),
            rnd.random() < 0.5,
        )
        raw = hello.encode()
        if rnd.random() < 0.2:  # a later version's extra fields
            extra = [rand_uint(rnd), rand_text(rnd, 8)][: rnd.randint(1, 2)]
            raw = bytes([raw[0] + len(extra)]) + raw[1:] + b"".join(cbor.encode(x) for x in extra)
        return raw

    def decode(self, data: bytes, cuts: Sequence[int]) -> fl.Hello:
        return fl.Hello.decode(data)

    def verify(self, data: bytes, cuts: Sequence[int], hello: fl.Hello) -> None:
        if fl.Hello.decode(hello.encode()) != hello:
            raise fail(self, data, cuts, f"{hello!r:.200} does not survive a round trip")
        if not 1 <= len(hello.id.encode()) <= fl.MAX_ID_BYTES or not 1 <= hello.epoch:
            raise fail(self, data, cuts, f"{hello!r:.200} is outside the limits")

    def verify_rejected(self, data: bytes, cuts: Sequence[int], exc: BaseException) -> None:
        _check_reason(self, data, cuts, exc, "bad hello")


# --- the UART link ----------------------------------------------------------------

_DROP_REASONS = (
    "bad cobs",
    "oversize",
    "bad crc",
    "bad frame",
    "unknown type",
    "bad hello",
    "not up",
    "auth failure",
    "replay",
    "duplicate",
    "out of order",
)
_EVENTS = (fl.Dropped, fl.Received, fl.SessionUp, fl.SessionDown)
_KINDS = (fl.KIND_DATA, fl.KIND_REQUEST, fl.KIND_RESPONSE, fl.KIND_SEND_TO)
_RECEIVER_EPOCH = 0x1111_1111
_SENDER_EPOCH = 0x2222_2222
_RESTART_EPOCH = 0x3333_3333
_PSK = bytes(range(100, 132))
_FEED_MS = 100
_IDS = {"host": "node-a", "device": "pico-1"}


def _frames(stream: bytes) -> list[bytes]:
    """Cut a line stream into its frames, each with its delimiter."""
    return [piece + b"\x00" for piece in stream.split(b"\x00") if piece]


class LinkTarget(Target):
    """firmware_bridge.link.Link.receive_bytes: line bytes to a link whose session is up."""

    streaming = True
    max_input = 2048
    alloc_per_byte = 48
    #: Each frame may become an event: a Dropped event holds its error, whose
    #: traceback holds frames; about 1 KiB on CPython.
    alloc_per_frame = 2048
    short_examples = 60

    def __init__(self, name: str, receiver: str, reliable: bool, psk: bytes | None) -> None:
        self.name = name
        self.receiver_role = receiver
        self.sender_role = "device" if receiver == "host" else "host"
        self.kw: dict[str, Any] = {"reliable": reliable, "psk": psk}
        self.secrets = (psk,) if psk else ()
        self._script: tuple[bytes, list[bytes], bytes] | None = None
        self._up: bytes | None = None

    def frame_count(self, data: bytes) -> int:
        return data.count(0) + 1

    def alloc_bound(self, data: bytes) -> int:
        return super().alloc_bound(data) + self.alloc_per_frame * self.frame_count(data)

    # The sender's side of a scripted conversation, recorded once.

    def new_receiver(self) -> fl.Link:
        """A receiver whose session is up, as after the recorded handshake."""
        if self._up is None:
            handshake, _, _ = self.script()
            link = self._bare_receiver()
            link.receive_bytes(handshake, 0)
            link.bytes_to_send()
            assert link.is_up
            self._up = pickle.dumps(link, pickle.HIGHEST_PROTOCOL)
        # Unpickling a copy is ten times faster than a handshake.
        link = pickle.loads(self._up)
        return link  # type: ignore[no-any-return]

    def _bare_receiver(self) -> fl.Link:
        link = fl.Link(self.receiver_role, _IDS[self.receiver_role], _RECEIVER_EPOCH, **self.kw)
        link.start(0)
        return link

    def script(self) -> tuple[bytes, list[bytes], bytes]:
        """(handshake bytes, frames the sender sent once up, one more data frame)."""
        if self._script is None:
            self._script = self._record()
        return self._script

    def _record(self) -> tuple[bytes, list[bytes], bytes]:
        receiver = self._bare_receiver()
        sender = fl.Link(self.sender_role, _IDS[self.sender_role], _SENDER_EPOCH, **self.kw)
        sender.start(0)
        handshake = bytearray()
        frames: list[bytes] = []
        now = 0

        def exchange(record: list[bytes] | bytearray) -> None:
            out = sender.bytes_to_send()
            if isinstance(record, bytearray):
                record += out
            else:
                record += _frames(out)
            receiver.receive_bytes(out, now)
            sender.receive_bytes(receiver.bytes_to_send(), now)

        for _ in range(4):
            exchange(handshake)
        assert receiver.is_up and sender.is_up, "the recorded handshake did not bring it up"
        sender.send_data("sensors/temp", b"\x01\x02\x00\x03", now)
        exchange(frames)
        sender.send_data("t", bytes(200 if sender.reliable else 150), now)
        exchange(frames)
        sender.send_request(7, "rpc/echo", b"ping", now)
        exchange(frames)
        sender.send_response(7, 0, b"\x00pong", now)
        sender.send_response(8, 3, "no handler for r\u00e9q", now)
        exchange(frames)
        if self.sender_role == "device":
            sender.send_to("10.0.0.2/pico-2", "to/peer", b"hi", now)
            exchange(frames)
        receiver.send_data("back", b"x", now)  # so that a reliable sender acks
        sender.receive_bytes(receiver.bytes_to_send(), now)
        now += sender.keepalive_interval_ms
        sender.tick(now)  # a ping
        exchange(frames)
        # A restarted sender's hello: a new epoch, echoing none.
        restarted = fl.Link(self.sender_role, _IDS[self.sender_role], _RESTART_EPOCH, **self.kw)
        restarted.start(0)
        frames += _frames(restarted.bytes_to_send())
        sender.send_data("resync", b"ok", now)
        resync = sender.bytes_to_send()
        return bytes(handshake), frames, resync

    def valid(self, rnd: Any) -> bytes:
        _, frames, _ = self.script()
        picked = [f for f in frames if rnd.random() < 0.4] or [rnd.choice(frames)]
        return b"".join(picked)

    def wire(self, data: bytes) -> bytes:
        return data

    def decode(self, data: bytes, cuts: Sequence[int]) -> tuple[list[Any], fl.Link, bool]:
        link = self.new_receiver()
        events: list[Any] = []
        for part in chunks(self.wire(data), cuts):
            events += link.receive_bytes(part, _FEED_MS)
        # Resynchronisation: after a delimiter ends whatever the input left
        # unfinished, a good frame always gets through (unless the input
        # changed the session: a peer's hello may restart it).
        events += link.receive_bytes(b"\x00", _FEED_MS)
        resync_due = not link.reliable and link.is_up and link._their_epoch == _SENDER_EPOCH
        if resync_due:
            events += link.receive_bytes(self.script()[2], _FEED_MS)
        resynced = bool(events) and events[-1] == fl.Received(fl.KIND_DATA, "resync", b"ok")
        for later in (link.rto_ms, link.keepalive_interval_ms, link.keepalive_timeout_ms):
            events += link.tick(_FEED_MS + later)
        return events, link, resynced or not resync_due

    def verify(self, data: bytes, cuts: Sequence[int], value: Any) -> None:
        events, link, resynced = value
        if not resynced:
            raise fail(self, data, cuts, "a good frame after the input did not get through")
        dropped = 0
        for event in events:
            if type(event) not in _EVENTS:
                raise fail(self, data, cuts, f"event of type {type(event).__name__}")
            if type(event) is fl.Dropped:
                dropped += 1
                error = event.error
                if type(error) is not fl.FrameError or error.reason not in _DROP_REASONS:
                    raise fail(self, data, cuts, f"dropped for {type(error).__name__}: {error}")
                if event.reason != error.reason:
                    raise fail(self, data, cuts, f"dropped as {event.reason!r}: {error}")
                check_message(self, error, data, cuts)
            elif type(event) is fl.Received:
                if event.kind not in _KINDS or type(event.payload) is not bytes:
                    raise fail(self, data, cuts, f"bad event {event!r:.200}")
        if sum(link.stats.drops.values()) != dropped:
            raise fail(self, data, cuts, f"{dropped} drops, counted {link.stats.drops}")
        if link.pending_output > link.max_output_bytes:
            raise fail(self, data, cuts, f"{link.pending_output} bytes wait for the line")
        if cuts:
            whole = self.decode(data, [])[0]
            if whole != events:
                diff = next(
                    (i for i, (a, b) in enumerate(zip(whole, events)) if a != b),
                    min(len(whole), len(events)),
                )
                raise fail(
                    self,
                    data,
                    cuts,
                    f"event {diff} differs when the input comes in one read: "
                    f"{whole[diff : diff + 1]!r:.200} vs {events[diff : diff + 1]!r:.200}",
                )


class LinkFrames(LinkTarget):
    """firmware_bridge.link.Link: frame bodies sealed with a good CRC and tag first.

    The input is a series of records, a 2-byte big-endian length and a body
    (header, sequence number, counter, fields; no tag, no CRC).
    """

    max_input = 1024

    def frame_count(self, data: bytes) -> int:
        return len(data) // 2 + 1

    def valid(self, rnd: Any) -> bytes:
        records = []
        for frame in _frames(super().valid(rnd)):
            body = cobs.decode(frame[:-1])[: -fl.CRC_BYTES]
            if body[0] & fl.FLAG_AUTH:
                body = body[: -fl.TAG_BYTES]
            records.append(len(body).to_bytes(2, "big") + body)
        return b"".join(records)

    def wire(self, data: bytes) -> bytes:
        psk = self.kw["psk"]
        mac = HmacSha256(psk) if psk else None
        out = bytearray()
        pos = 0
        while pos < len(data):
            size = int.from_bytes(data[pos : pos + 2], "big")
            body = data[pos + 2 : pos + 2 + size]
            pos += 2 + size
            if body and mac is not None and body[0] & fl.FLAG_AUTH:
                sender, receiver = _SENDER_EPOCH, _RECEIVER_EPOCH
                if body[0] & 0x0F == fl.HELLO:
                    skip = 1 + (1 if body[0] & fl.FLAG_RELIABLE else 0) + fl.COUNTER_BYTES
                    try:
                        hello = fl.Hello.decode(body[skip:])
                        sender, receiver = hello.epoch, hello.echo_epoch
                    except fl.FrameError:
                        pass
                tag = mac.digest(struct.pack(">II", sender, receiver) + body)[: fl.TAG_BYTES]
                body += tag
            body += struct.pack("<I", crc32(body) & 0xFFFFFFFF)
            out += cobs.encode(body) + b"\x00"
        return bytes(out)


class HMAC(Target):
    """firmware_bridge.hmac_sha256 against the standard library's hmac."""

    name = "hmac"
    max_input = 512
    short_examples = 100

    def valid(self, rnd: Any) -> bytes:
        key = rnd.randbytes(rnd.choice((0, 16, 32, 64, 65, 100)))
        return bytes([len(key)]) + key + rand_bytes(rnd, 300)

    def decode(self, data: bytes, cuts: Sequence[int]) -> tuple[bytes, bytes, bytes]:
        size = data[0] if data else 0
        key, msg = data[1 : 1 + size], data[1 + size :]
        return key, msg, HmacSha256(key).digest(msg)

    def verify(self, data: bytes, cuts: Sequence[int], value: Any) -> None:
        key, msg, tag = value
        if tag != std_hmac.new(key, msg, "sha256").digest():
            raise fail(self, data, cuts, "the tag differs from the standard library's hmac")
        other = bytes([tag[0] ^ 1]) + tag[1:]
        if not equal(tag, tag) or equal(tag, other) or equal(tag, tag[:16]):
            raise fail(self, data, cuts, "equal() compares wrongly")


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Framing(),
        Messages(),
        HelloCheck(),
        Connection(),
        Preamble(),
        BeaconTarget(),
        COBS(),
        COBSStream(),
        CBOR(),
        LinkHello(),
        LinkTarget("link", "host", reliable=False, psk=None),
        LinkTarget("link_reliable", "host", reliable=True, psk=None),
        LinkTarget("link_psk", "device", reliable=True, psk=_PSK),
        LinkFrames("link_frames", "host", reliable=True, psk=_PSK),
        HMAC(),
    )
}
