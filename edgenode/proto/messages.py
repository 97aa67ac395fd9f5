"""Node-to-node messages and their CBOR form.

Every message is one CBOR array whose first element is a small integer type
code. The shapes are fixed: an array of the wrong length, a field of the
wrong type or a value over its limit is a :class:`MalformedMessage`.

======  ========  ==================================================
code    name      array
======  ========  ==================================================
0       hello     [0, version, node_id, listen_port, epoch]
1       ping      [1, nonce]
2       pong      [2, nonce]
3       data      [3, topic, payload]
4       request   [4, request_id, topic, payload]
5       response  [5, request_id, payload]
6       error     [6, request_id, code, message]
7       bye       [7, reason]
8       peers     [8, [[ip, port, node_id or null], ...]]
9       to-dev    [9, device_id, topic, payload]
10      from-dev  [10, device_id, topic, payload]
11      dev-req   [11, request_id, device_id, topic, payload]
12      devices   [12, [device_id, ...]]
13      ready     [13]
======  ========  ==================================================

Types 9-12 carry traffic of microcontrollers bridged over UART: a node
addresses a device as ``<bridging node's ip>/<device id>``. ``to-dev`` asks
the receiver to pass data to one of its devices, ``from-dev`` is data one
of the sender's devices published, ``dev-req`` is a request for one of the
receiver's devices (answered by a response or error with its id), and
``devices`` lists the devices the sender bridges now.

``ready`` (new in version 2) says that the sender has admitted the
connection and will keep it: no simultaneous open can displace it any
more. Data, requests and device traffic flow only once both sides have
sent it, so nothing is ever queued on a connection that may lose a tie
(docs/architecture.md, "Simultaneous open").

Decoding is in :mod:`edgenode.proto.decoding`. Encoding writes the same
shortest-form bytes as cbor2 (the tests cross-check).
Neither needs cbor2: measured on a 64-byte data message, cbor2's C
extension encodes 8x slower than the encoders here and decodes 1.7x
faster than the checking decoder, costs about 1.2 MB of resident memory,
and does not install on 32-bit ARM without a Rust compiler
(docs/performance.md, "The codec").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from firmware_bridge.cbor import encode as _cbor_dumps

PROTOCOL_VERSION = 2

HELLO = 0
PING = 1
PONG = 2
DATA = 3
REQUEST = 4
RESPONSE = 5
ERROR = 6
BYE = 7
PEERS = 8
TO_DEVICE = 9
FROM_DEVICE = 10
DEVICE_REQUEST = 11
DEVICES = 12
READY = 13

_NAMES = (
    "hello",
    "ping",
    "pong",
    "data",
    "request",
    "response",
    "error",
    "bye",
    "peers",
    "to-dev",
    "from-dev",
    "dev-req",
    "devices",
    "ready",
)

#: Error codes carried by an error response.
ERR_NO_HANDLER = 1
ERR_HANDLER_FAILED = 2
ERR_BUSY = 3
ERR_NO_DEVICE = 4
ERR_DEVICE_FAILED = 5
ERR_HANDLER_TIMEOUT = 6

MAX_DEVICE_ID_BYTES = 32

_U64 = (1 << 64) - 1


class Limits:
    """Caps on everything a peer controls in a message."""

    __slots__ = (
        "max_devices_listed",
        "max_frame_bytes",
        "max_peers_listed",
        "max_text_bytes",
        "max_topic_bytes",
    )

    def __init__(
        self,
        max_frame_bytes: int = 64 * 1024,
        max_topic_bytes: int = 128,
        max_text_bytes: int = 512,
        max_peers_listed: int = 64,
        max_devices_listed: int = 32,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_topic_bytes = max_topic_bytes
        self.max_text_bytes = max_text_bytes
        self.max_peers_listed = max_peers_listed
        self.max_devices_listed = max_devices_listed


DEFAULT_LIMITS = Limits()


class Message:
    """Base of the message classes: equality and repr from the slots."""

    __slots__ = ()
    code = -1

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, s) == getattr(other, s) for s in self.__slots__
        )

    def __hash__(self) -> int:
        return hash((self.code, *(repr(getattr(self, s)) for s in self.__slots__)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{s}={getattr(self, s)!r}" for s in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Hello(Message):
    """First message on every connection, in both directions."""

    __slots__ = ("epoch", "listen_port", "node_id", "version")
    code = HELLO

    def __init__(self, node_id: str, listen_port: int, epoch: int, version: int = PROTOCOL_VERSION):
        self.version = version
        self.node_id = node_id
        self.listen_port = listen_port
        self.epoch = epoch


class Ping(Message):
    """Keepalive probe; the peer answers with a pong carrying the same nonce."""

    __slots__ = ("nonce",)
    code = PING

    def __init__(self, nonce: int) -> None:
        self.nonce = nonce


class Pong(Message):
    """Answer to a ping."""

    __slots__ = ("nonce",)
    code = PONG

    def __init__(self, nonce: int) -> None:
        self.nonce = nonce


class Data(Message):
    """A one-way message on a topic."""

    __slots__ = ("payload", "topic")
    code = DATA

    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.payload = payload


class Request(Message):
    """A request; answered by a response or an error with the same id."""

    __slots__ = ("payload", "request_id", "topic")
    code = REQUEST

    def __init__(self, request_id: int, topic: str, payload: bytes) -> None:
        self.request_id = request_id
        self.topic = topic
        self.payload = payload


class Response(Message):
    """The successful answer to a request."""

    __slots__ = ("payload", "request_id")
    code = RESPONSE

    def __init__(self, request_id: int, payload: bytes) -> None:
        self.request_id = request_id
        self.payload = payload


class ErrorResponse(Message):
    """The failed answer to a request."""

    __slots__ = ("error_code", "message", "request_id")
    code = ERROR

    def __init__(self, request_id: int, error_code: int, message: str) -> None:
        self.request_id = request_id
        self.error_code = error_code
        self.message = message


class Bye(Message):
    """The sender is closing the connection, and says why."""

    __slots__ = ("reason",)
    code = BYE

    def __init__(self, reason: str) -> None:
        self.reason = reason


class PeerInfo(Message):
    """One entry of a peer list (not a message on its own)."""

    __slots__ = ("ip", "node_id", "port")

    def __init__(self, ip: str, port: int, node_id: str | None) -> None:
        self.ip = ip
        self.port = port
        self.node_id = node_id


class Peers(Message):
    """The peers the sender knows, so the receiver can find them too."""

    __slots__ = ("peers",)
    code = PEERS

    def __init__(self, peers: list[PeerInfo]) -> None:
        self.peers = peers


class ToDevice(Message):
    """Data for one of the receiver's bridged devices."""

    __slots__ = ("device_id", "payload", "topic")
    code = TO_DEVICE

    def __init__(self, device_id: str, topic: str, payload: bytes) -> None:
        self.device_id = device_id
        self.topic = topic
        self.payload = payload


class FromDevice(Message):
    """Data published by one of the sender's bridged devices."""

    __slots__ = ("device_id", "payload", "topic")
    code = FROM_DEVICE

    def __init__(self, device_id: str, topic: str, payload: bytes) -> None:
        self.device_id = device_id
        self.topic = topic
        self.payload = payload


class DeviceRequest(Message):
    """A request for one of the receiver's bridged devices."""

    __slots__ = ("device_id", "payload", "request_id", "topic")
    code = DEVICE_REQUEST

    def __init__(self, request_id: int, device_id: str, topic: str, payload: bytes) -> None:
        self.request_id = request_id
        self.device_id = device_id
        self.topic = topic
        self.payload = payload


class Devices(Message):
    """The devices the sender bridges now."""

    __slots__ = ("device_ids",)
    code = DEVICES

    def __init__(self, device_ids: list[str]) -> None:
        self.device_ids = device_ids


class Ready(Message):
    """The sender has admitted this connection and keeps it: data may follow."""

    __slots__ = ()
    code = READY


AnyMessage = Union[
    Hello,
    Ping,
    Pong,
    Data,
    Request,
    Response,
    ErrorResponse,
    Bye,
    Peers,
    ToDevice,
    FromDevice,
    DeviceRequest,
    Devices,
    Ready,
]


def message_name(code: int) -> str:
    """The name of a type code, for messages and logs."""
    return _NAMES[code] if 0 <= code < len(_NAMES) else f"type {code}"


def encode_message(msg: AnyMessage) -> bytes:
    """Return the CBOR body of ``msg``."""
    try:
        encoder = _ENCODERS[type(msg)]
    except KeyError:
        raise TypeError(f"not a message: {msg!r:.80}") from None
    return encoder(msg)


def _uint_head(major: int, n: int) -> bytes:
    """The shortest CBOR head of major type ``major`` (0, 2, 3: its top bits) for ``n``."""
    if n < 24:
        return _SMALL_HEADS[major][n]
    if n < 0x100:
        return bytes((major | 24, n))
    if n < 0x10000:
        return bytes((major | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major | 26,)) + n.to_bytes(4, "big")
    return bytes((major | 27,)) + n.to_bytes(8, "big")


_UINT, _BYTES, _TEXT = 0x00, 0x40, 0x60
_SMALL_HEADS = {m: [bytes((m | n,)) for n in range(24)] for m in (_UINT, _BYTES, _TEXT)}


def _text_item(text: str) -> bytes:
    raw = text.encode()
    return _uint_head(_TEXT, len(raw)) + raw


def encode_data(topic: str, payload: bytes) -> bytes:
    """The body of ``[3, topic, payload]``: a data message without the object."""
    raw = topic.encode()
    return b"".join(
        (b"\x83\x03", _uint_head(_TEXT, len(raw)), raw, _uint_head(_BYTES, len(payload)), payload)
    )


def encode_request(request_id: int, topic: str, payload: bytes) -> bytes:
    """The body of ``[4, request_id, topic, payload]``."""
    raw = topic.encode()
    return b"".join(
        (
            b"\x84\x04",
            _uint_head(_UINT, request_id),
            _uint_head(_TEXT, len(raw)),
            raw,
            _uint_head(_BYTES, len(payload)),
            payload,
        )
    )


def encode_response(request_id: int, payload: bytes) -> bytes:
    """The body of ``[5, request_id, payload]``."""
    return b"".join(
        (b"\x83\x05", _uint_head(_UINT, request_id), _uint_head(_BYTES, len(payload)), payload)
    )


def _generic(fields: Callable[[Any], tuple[Any, ...]]) -> Callable[[Any], bytes]:
    return lambda msg: _cbor_dumps(fields(msg))


_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    Data: lambda m: encode_data(m.topic, m.payload),
    Request: lambda m: encode_request(m.request_id, m.topic, m.payload),
    Response: lambda m: encode_response(m.request_id, m.payload),
    Ping: _generic(lambda m: (PING, m.nonce)),
    Pong: _generic(lambda m: (PONG, m.nonce)),
    ErrorResponse: _generic(lambda m: (ERROR, m.request_id, m.error_code, m.message)),
    Hello: _generic(lambda m: (HELLO, m.version, m.node_id, m.listen_port, m.epoch)),
    Bye: _generic(lambda m: (BYE, m.reason)),
    Peers: _generic(lambda m: (PEERS, [(p.ip, p.port, p.node_id) for p in m.peers])),
    ToDevice: _generic(lambda m: (TO_DEVICE, m.device_id, m.topic, m.payload)),
    FromDevice: _generic(lambda m: (FROM_DEVICE, m.device_id, m.topic, m.payload)),
    DeviceRequest: _generic(
        lambda m: (DEVICE_REQUEST, m.request_id, m.device_id, m.topic, m.payload)
    ),
    Devices: _generic(lambda m: (DEVICES, list(m.device_ids))),
    Ready: lambda m: b"\x81\x0d",
}
