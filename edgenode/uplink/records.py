"""The spool's record format (pure): messages and their completions.

A spool segment is a sequence of records, each::

    kind (1 byte) | body length (4 bytes, big-endian) | CRC-32 of the body (4) | body

``M`` (a message): sequence number (8) | QoS (1) | topic length (2) | topic (UTF-8) | payload.
``D`` (done): sequence number (8): the message was acknowledged by the
broker, or dropped by the queue's policy.

A record cut short (the node died while writing it) or corrupt ends the
segment: :func:`decode_records` returns what came before it and where it
stopped, so the spool can cut the tail off.
"""

from __future__ import annotations

import struct
from binascii import crc32

from .queue import Outgoing

MESSAGE = 0x4D  # "M"
DONE = 0x44  # "D"
_HEADER = struct.Struct(">BII")
_MESSAGE_HEAD = struct.Struct(">QBH")
_DONE_BODY = struct.Struct(">Q")
HEADER_BYTES = _HEADER.size
#: The largest body a record may have: a 16 MiB frame (the node's largest
#: frame limit) and the longest MQTT topic. Anything larger is corruption.
MAX_BODY_BYTES = 16 * 1024 * 1024 + 65535 + _MESSAGE_HEAD.size


def encode_message(item: Outgoing) -> bytes:
    """The record of a queued message."""
    topic = item.topic.encode("utf-8", "surrogatepass")
    body = _MESSAGE_HEAD.pack(item.seq, item.qos, len(topic)) + topic + item.payload
    return _HEADER.pack(MESSAGE, len(body), crc32(body)) + body


def message_record_bytes(item: Outgoing) -> int:
    """How many bytes :func:`encode_message` makes of ``item``."""
    topic_bytes = len(item.topic.encode("utf-8", "surrogatepass"))
    return HEADER_BYTES + _MESSAGE_HEAD.size + topic_bytes + len(item.payload)


def encode_done(seq: int) -> bytes:
    """The record that message ``seq`` needs no sending any more."""
    body = _DONE_BODY.pack(seq)
    return _HEADER.pack(DONE, len(body), crc32(body)) + body


def decode_records(data: bytes) -> tuple[list[Outgoing], list[int], int]:
    """Decode a segment: (messages, done sequence numbers, bytes of whole valid records).

    Stops at the first record that is cut short, has a bad CRC, an unknown
    kind or an impossible length; the third value is where it starts.
    """
    messages: list[Outgoing] = []
    done: list[int] = []
    view = memoryview(data)
    pos = 0
    while pos + HEADER_BYTES <= len(data):
        kind, length, check = _HEADER.unpack_from(view, pos)
        start = pos + HEADER_BYTES
        end = start + length
        if kind not in (MESSAGE, DONE) or length > MAX_BODY_BYTES or end > len(data):
            break
        body = view[start:end]
        if crc32(body) != check:
            break
        if kind == DONE:
            if length != _DONE_BODY.size:
                break
            done.append(_DONE_BODY.unpack_from(body)[0])
        else:
            if length < _MESSAGE_HEAD.size:
                break
            seq, qos, topic_len = _MESSAGE_HEAD.unpack_from(body)
            topic_end = _MESSAGE_HEAD.size + topic_len
            if topic_end > length or qos not in (0, 1):
                break
            try:
                topic = bytes(body[_MESSAGE_HEAD.size : topic_end]).decode("utf-8")
            except UnicodeDecodeError:
                break
            messages.append(Outgoing(seq, topic, bytes(body[topic_end:]), qos))
        pos = end
    return messages, done, pos
