"""Decoding node-to-node messages (the layouts are in :mod:`edgenode.proto.messages`).

Decoding uses the strict CBOR subset decoder of ``firmware_bridge.cbor``
(no tags, floats, maps or indefinite lengths; every count and length
checked before anything is allocated), behind a fast path for the flat
arrays of integers and strings that nearly every message is
(:func:`_flat_items`): it accepts exactly what the strict decoder accepts
and gives the same items, or declines and leaves the input to it.
"""

from __future__ import annotations

from typing import Any

from firmware_bridge.cbor import CBORError
from firmware_bridge.cbor import decode as _cbor_decode

from ..errors import MalformedMessage, UnknownMessageType, VersionMismatch, hexdump
from .messages import (
    _NAMES,
    _U64,
    BYE,
    DATA,
    DEFAULT_LIMITS,
    DEVICE_REQUEST,
    DEVICES,
    ERROR,
    FROM_DEVICE,
    HELLO,
    MAX_DEVICE_ID_BYTES,
    PING,
    PONG,
    PROTOCOL_VERSION,
    READY,
    REQUEST,
    RESPONSE,
    TO_DEVICE,
    AnyMessage,
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
)

_ARITY = (5, 2, 2, 3, 4, 3, 4, 2, 2, 4, 4, 5, 2, 1)


def _shown(value: object, limit: int) -> str:
    """``repr(value)`` for a message: at most ``limit`` characters, "..." marking a cut."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _uint(value: object, what: str, limit: int = _U64) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise MalformedMessage(
            f"{what} should be an integer in 0..{limit}, got {_shown(value, 40)}"
        )
    return value


def _text(value: object, what: str, limit: int, *, empty: bool = True) -> str:
    if type(value) is not str:
        raise MalformedMessage(f"{what} should be text, got {type(value).__name__}")
    if len(value) > limit or len(value.encode()) > limit:
        raise MalformedMessage(f"{what} of {len(value.encode())} bytes exceeds {limit}-byte limit")
    if not empty and not value:
        raise MalformedMessage(f"{what} should not be empty")
    return value


def _bytes(value: object, what: str) -> bytes:
    if type(value) is not bytes:
        raise MalformedMessage(f"{what} should be a byte string, got {type(value).__name__}")
    return value


def decode_message(body: bytes, limits: Limits = DEFAULT_LIMITS) -> AnyMessage:
    """Decode one frame body into a message.

    Raises :class:`MalformedMessage` (invalid CBOR or a bad shape),
    :class:`UnknownMessageType`, or :class:`VersionMismatch` (a hello of
    another protocol version).
    """
    item = _flat_items(body)
    if item is None:
        try:
            item = _cbor_decode(body, 3, 4 * limits.max_peers_listed + 8)
        except CBORError as exc:
            raise MalformedMessage(f"invalid cbor in frame {hexdump(body)}: {exc}") from None
    if type(item) is not list or not item or type(item[0]) is not int:
        raise MalformedMessage(
            f"a message is an array starting with a type code, got {hexdump(body)}"
        )
    code = item[0]
    if not 0 <= code < len(_ARITY):
        raise UnknownMessageType(f"unknown message type {code} in frame {hexdump(body)}")
    # The version is checked before the arity, so that a hello of another
    # version is reported as such whatever its shape. A bool is not a
    # version, although True == 1 in Python.
    if code == HELLO and len(item) >= 2:
        version = _uint(item[1], "hello version")
        if version != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"peer speaks protocol version {version}; this node speaks {PROTOCOL_VERSION}"
            )
    if len(item) != _ARITY[code]:
        raise MalformedMessage(
            f"{_NAMES[code]} should have {_ARITY[code] - 1} fields, got {len(item) - 1}"
        )
    if code == DATA:
        return Data(
            _text(item[1], "topic", limits.max_topic_bytes, empty=False), _bytes(item[2], "payload")
        )
    if code == PING:
        return Ping(_uint(item[1], "ping nonce"))
    if code == PONG:
        return Pong(_uint(item[1], "pong nonce"))
    if code == REQUEST:
        return Request(
            _uint(item[1], "request id"),
            _text(item[2], "topic", limits.max_topic_bytes, empty=False),
            _bytes(item[3], "payload"),
        )
    if code == RESPONSE:
        return Response(_uint(item[1], "request id"), _bytes(item[2], "payload"))
    if code == ERROR:
        return ErrorResponse(
            _uint(item[1], "request id"),
            _uint(item[2], "error code", 0xFFFF),
            _text(item[3], "error message", limits.max_text_bytes),
        )
    if code == HELLO:
        return Hello(
            _text(item[2], "hello node id", 64, empty=False),
            _uint(item[3], "hello listen port", 0xFFFF),
            _uint(item[4], "hello epoch"),
        )
    if code == BYE:
        return Bye(_text(item[1], "bye reason", limits.max_text_bytes))
    if code == TO_DEVICE or code == FROM_DEVICE:
        cls = ToDevice if code == TO_DEVICE else FromDevice
        return cls(
            _text(item[1], "device id", MAX_DEVICE_ID_BYTES, empty=False),
            _text(item[2], "topic", limits.max_topic_bytes, empty=False),
            _bytes(item[3], "payload"),
        )
    if code == DEVICE_REQUEST:
        return DeviceRequest(
            _uint(item[1], "request id"),
            _text(item[2], "device id", MAX_DEVICE_ID_BYTES, empty=False),
            _text(item[3], "topic", limits.max_topic_bytes, empty=False),
            _bytes(item[4], "payload"),
        )
    if code == READY:
        return _READY
    if code == DEVICES:
        ids = item[1]
        if type(ids) is not list:
            raise MalformedMessage(f"device list should be an array, got {type(ids).__name__}")
        if len(ids) > limits.max_devices_listed:
            raise MalformedMessage(
                f"device list of {len(ids)} entries exceeds {limits.max_devices_listed}-entry limit"
            )
        return Devices([_text(d, "device id", MAX_DEVICE_ID_BYTES, empty=False) for d in ids])
    # PEERS
    entries = item[1]
    if type(entries) is not list:
        raise MalformedMessage(f"peer list should be an array, got {type(entries).__name__}")
    if len(entries) > limits.max_peers_listed:
        raise MalformedMessage(
            f"peer list of {len(entries)} entries exceeds {limits.max_peers_listed}-entry limit"
        )
    peers = []
    for entry in entries:
        if type(entry) is not list or len(entry) != 3:
            raise MalformedMessage(
                f"peer list entry should be [ip, port, node_id], got {_shown(entry, 60)}"
            )
        node_id = entry[2]
        if node_id is not None:
            node_id = _text(node_id, "peer list node id", 64, empty=False)
        peers.append(
            PeerInfo(
                _text(entry[0], "peer list ip", 45, empty=False),
                _uint(entry[1], "peer list port", 0xFFFF),
                node_id,
            )
        )
    return Peers(peers)


_READY = Ready()
_MAX_FLAT_ITEMS = 5


def _flat_items(body: bytes) -> list[Any] | None:
    """The items of ``body`` if it is one array of at most five unsigned
    integers, byte strings and valid UTF-8 text strings that fills it exactly;
    else None, and the strict decoder has the final word.

    The fast path of :func:`decode_message`: it gives the same list as
    ``firmware_bridge.cbor.decode`` for every input it accepts (heads of
    any width, as that decoder takes them; the tests check the two agree).
    """
    end = len(body)
    if not end:
        return None
    head = body[0]
    count = head - 0x80
    if not 0 < count <= _MAX_FLAT_ITEMS:
        return None
    items: list[Any] = [None] * count
    pos = 1
    for i in range(count):
        if pos >= end:
            return None
        ib = body[pos]
        major = ib >> 5
        if major != 0 and major != 2 and major != 3:
            return None
        ai = ib & 31
        pos += 1
        if ai < 24:
            arg = ai
        elif ai < 28:
            stop = pos + (1 << (ai - 24))
            if stop > end:
                return None
            arg = int.from_bytes(body[pos:stop], "big")
            pos = stop
        else:
            return None
        if major == 0:
            items[i] = arg
            continue
        stop = pos + arg
        if stop > end:
            return None
        if major == 2:
            items[i] = body[pos:stop]
        else:
            try:
                items[i] = str(body[pos:stop], "utf-8")
            except UnicodeError:
                return None
        pos = stop
    return items if pos == end else None


_ONE_WAY_DATA = frozenset((DATA, TO_DEVICE, FROM_DEVICE))


def is_data_frame(frame: bytes) -> bool:
    """Whether a framed message (length prefix included) is one-way application
    data: data, to-dev or from-dev. Only their type code is read."""
    return len(frame) > 5 and frame[5] in _ONE_WAY_DATA and frame[4] >> 5 == 4
