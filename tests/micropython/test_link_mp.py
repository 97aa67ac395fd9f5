"""Tests of firmware_bridge's link (cobs, hmac_sha256, link) on MicroPython and under pytest.

``tests/micropython/run.py`` runs them on the real MicroPython runtime (see
``.ci/micropython.sh``); pytest collects them on CPython. So: plain
``test_*`` functions and asserts; no pytest, hypothesis or ``random`` (a
tiny deterministic PRNG stands in). The CPython-only tests, with property
tests and a fuller simulation, are in tests/firmware_bridge/test_link.py.
"""

import struct
from binascii import crc32

from firmware_bridge import cobs
from firmware_bridge.hmac_sha256 import HmacSha256, hmac_sha256
from firmware_bridge.link import (
    Dropped,
    FrameError,
    Link,
    LinkDown,
    Received,
    SessionDown,
    SessionUp,
)

HOST_EPOCH = 0x11111111
DEVICE_EPOCH = 0x22222222
PSK = b"0123456789abcdef"


class Prng:
    """xorshift32: the same numbers on every runtime."""

    def __init__(self, seed: int) -> None:
        self.state = seed or 1

    def next(self) -> int:
        x = self.state
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.state = x
        return x

    def chance(self, per_million: int) -> bool:
        return self.next() % 1000000 < per_million


class Wire:
    """Two links joined by a line with a fixed delay and optional byte loss."""

    def __init__(self, host: Link, device: Link, loss_per_million: int = 0, seed: int = 1) -> None:
        self.host = host
        self.device = device
        self.now = 0
        self.delay = 5
        self.loss = loss_per_million
        self.prng = Prng(seed)
        self.to_host = []  # (arrival ms, bytes)
        self.to_device = []
        self.host_events = []
        self.device_events = []
        self.host_room = None  # reliable mode's flow control at the host

    def start(self) -> None:
        self.host.start(self.now)
        self.device.start(self.now)

    def _send(self, link: Link, queue: list) -> None:
        data = link.bytes_to_send()
        if not data:
            return
        if self.loss:
            kept = bytearray()
            for b in data:
                if not self.prng.chance(self.loss):
                    kept.append(b)
            data = bytes(kept)
        queue.append((self.now + self.delay, data))

    def step(self, ms: int = 1) -> None:
        self.now += ms
        self._send(self.host, self.to_device)
        self._send(self.device, self.to_host)
        for queue, link, events in (
            (self.to_device, self.device, self.device_events),
            (self.to_host, self.host, self.host_events),
        ):
            room = self.host_room if link is self.host else None
            while queue and queue[0][0] <= self.now:
                events.extend(link.receive_bytes(queue.pop(0)[1], self.now, room))
        for link, events in ((self.host, self.host_events), (self.device, self.device_events)):
            deadline = link.next_deadline_ms()
            if deadline is not None and deadline <= self.now:
                events.extend(link.tick(self.now))

    def run(self, ms: int, step: int = 1) -> None:
        end = self.now + ms
        while self.now < end:
            self.step(step)


def _wire(body: bytes) -> bytes:
    return cobs.encode(body + struct.pack("<I", crc32(body) & 0xFFFFFFFF)) + b"\x00"


def _up_pair(**kw) -> Wire:
    wire = Wire(
        Link("host", "node-a", HOST_EPOCH, **kw), Link("device", "pico-1", DEVICE_EPOCH, **kw)
    )
    wire.start()
    wire.run(30)
    assert wire.host.is_up and wire.device.is_up
    return wire


def _received(events: list) -> list:
    return [e for e in events if isinstance(e, Received)]


def test_cobs_round_trip() -> None:
    prng = Prng(7)
    for n in (0, 1, 253, 254, 255, 300):
        raw = bytes(prng.next() & 0xFF if i % 7 else 0 for i in range(n))
        encoded = cobs.encode(raw)
        assert b"\x00" not in encoded
        assert cobs.decode(encoded) == raw
    assert cobs.encode(b"\x11\x22\x00\x33") == b"\x03\x11\x22\x02\x33"


def test_splitter_resynchronises() -> None:
    splitter = cobs.FrameSplitter(8)
    items = splitter.feed(b"\x02a\x00" + b"\x11" * 20 + b"\x00\x02b\x00")
    assert items[0] == b"\x02a" and items[2] == b"\x02b"
    assert type(items[1]) is cobs.FrameError and items[1].reason == "oversize"
    assert str(items[1]).startswith("oversize frame: 20 bytes exceed the 8-byte limit")


def test_handshake() -> None:
    wire = Wire(Link("host", "node-a", HOST_EPOCH), Link("device", "pico-1", DEVICE_EPOCH))
    wire.start()
    wire.run(30)
    ups = [e for e in wire.host_events if isinstance(e, SessionUp)]
    assert len(ups) == 1
    assert ups[0].peer_hello.id == "pico-1"
    assert ups[0].peer_hello.epoch == DEVICE_EPOCH
    assert wire.device.peer_id == "node-a"


def test_data_round_trip() -> None:
    wire = _up_pair()
    wire.device.send_data("temp", b"\x00\x01\x02", wire.now)
    wire.device.send_request(7, "cfg", b"q", wire.now)
    wire.device.send_to("127.0.0.3/pico-2", "hi", b"!", wire.now)
    wire.host.send_response(7, 0, b"answer", wire.now)
    wire.host.send_response(8, 2, "no such key", wire.now)
    wire.run(20)
    assert _received(wire.host_events) == [
        Received("data", "temp", b"\x00\x01\x02"),
        Received("request", "cfg", b"q", req_id=7),
        Received("send_to", "hi", b"!", dest="127.0.0.3/pico-2"),
    ]
    answers = _received(wire.device_events)
    assert answers[0] == Received("response", None, b"answer", req_id=7, status=0)
    assert answers[1].status == 2 and answers[1].error == "no such key"


def test_crc_rejection() -> None:
    wire = _up_pair()
    body = b"\x04\x01tpay"
    bad = cobs.encode(body + struct.pack("<I", (crc32(body) ^ 1) & 0xFFFFFFFF)) + b"\x00"
    events = wire.host.receive_bytes(bad, wire.now)
    assert len(events) == 1 and isinstance(events[0], Dropped)
    assert type(events[0].error) is FrameError and events[0].error.reason == "bad crc"
    assert events[0].reason == "bad crc"
    assert events[0].message.startswith("bad crc: frame says 0x")
    assert wire.host.stats.drops == {"bad crc": 1}
    assert wire.host.is_up
    events = wire.host.receive_bytes(_wire(body), wire.now)
    assert events == [Received("data", "t", b"pay")]


def test_bit_flips_never_deliver() -> None:
    wire = _up_pair()
    wire.device.send_data("t", b"payload", wire.now)
    raw = cobs.decode(wire.device.bytes_to_send()[:-1])
    for i in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[i // 8] ^= 1 << (i % 8)
        events = wire.host.receive_bytes(cobs.encode(flipped) + b"\x00", wire.now)
        assert len(events) == 1 and isinstance(events[0], Dropped), events


def test_send_while_down_raises() -> None:
    link = Link("device", "pico-1", DEVICE_EPOCH)
    link.start(0)
    try:
        link.send_data("t", b"", 0)
    except LinkDown as exc:
        assert str(exc) == "cannot send data: the session is not up"
    else:
        raise AssertionError("no LinkDown")


def test_device_restart_resynchronises() -> None:
    wire = _up_pair()
    wire.run(200)
    wire.device = Link("device", "pico-1", 0x33333333)
    wire.device.start(wire.now)
    wire.run(20)
    downs = [e for e in wire.host_events if isinstance(e, SessionDown)]
    assert downs == [SessionDown("peer restart")]
    assert wire.host.is_up and wire.device.is_up
    assert wire.host.peer_hello.epoch == 0x33333333


def test_keepalive_timeout() -> None:
    wire = _up_pair()
    wire.loss = 1000000  # every byte lost
    wire.run(4000, step=10)
    downs = [e for e in wire.device_events if isinstance(e, SessionDown)]
    assert downs == [SessionDown("keepalive timeout")]


def test_reliable_delivery_over_lossy_wire() -> None:
    wire = _up_pair(reliable=True)
    wire.loss = 1500  # 0.15 % of bytes: about one frame in four lost
    wire.prng = Prng(12345)
    count = 40
    sent = 0
    for _ in range(5000):
        if sent < count:
            try:
                wire.device.send_data("n", struct.pack(">H", sent) + b"x" * 150, wire.now)
                sent += 1
            except Exception as exc:  # SendQueueFull: try again later
                assert type(exc).__name__ == "SendQueueFull", exc
        wire.run(10, step=5)
        if sent == count and len(_received(wire.host_events)) == count:
            break
    got = [struct.unpack(">H", m.payload[:2])[0] for m in _received(wire.host_events)]
    assert got == list(range(count)), got
    for m in _received(wire.host_events):
        assert m.payload[2:] == b"x" * 150
    assert wire.device.stats.retransmits > 0
    assert not [e for e in wire.host_events if isinstance(e, SessionDown)]


def test_flow_control_holds_back_then_resumes() -> None:
    wire = _up_pair(reliable=True)
    wire.host_room = 0
    for i in range(12):  # window 4 + queue 8
        wire.device.send_data("n", struct.pack(">H", i), wire.now)
    wire.run(3000, step=5)  # well past the timeouts: held, not lost, still up
    assert _received(wire.host_events) == []
    assert wire.host.stats.held_back > 4 and wire.host.stats.drops == {}
    assert wire.host.is_up and wire.device.is_up
    wire.host_room = None
    wire.host.resume(wire.now)
    wire.run(100, step=5)
    got = [struct.unpack(">H", m.payload)[0] for m in _received(wire.host_events)]
    assert got == list(range(12)), got
    assert not [e for e in wire.host_events if isinstance(e, SessionDown)]


def test_hmac_known_vectors() -> None:
    # RFC 4231 test cases 1 and 2.
    tag = hmac_sha256(b"\x0b" * 20, b"Hi There")
    assert tag == bytes.fromhex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
    tag = HmacSha256(b"Jefe").digest(b"what do ya want for nothing?")
    assert tag == bytes.fromhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


def test_psk_session_and_replay() -> None:
    wire = _up_pair(psk=PSK)
    wire.device.send_data("t", b"once", wire.now)
    frame = wire.device.bytes_to_send()
    assert wire.host.receive_bytes(frame, wire.now) == [Received("data", "t", b"once")]
    events = wire.host.receive_bytes(frame, wire.now)
    assert len(events) == 1 and events[0].error.reason == "replay"
    assert events[0].reason == "replay"


def test_wrong_psk_never_comes_up() -> None:
    wire = Wire(
        Link("host", "node-a", HOST_EPOCH, psk=PSK),
        Link("device", "pico-1", DEVICE_EPOCH, psk=b"fedcba9876543210"),
    )
    wire.start()
    wire.run(100)
    assert not wire.host.is_up and not wire.device.is_up
    assert wire.host.stats.drops.get("auth failure", 0) >= 1
