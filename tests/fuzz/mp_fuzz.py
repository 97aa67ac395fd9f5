"""Mutation fuzzing of firmware_bridge's decoders on MicroPython (and CPython).

A microcontroller runs these decoders on what its UART delivers, so they
must keep their contract on MicroPython itself, whose built-ins differ
(``str(b, "utf-8")``, ``int.from_bytes``, exceptions). No hypothesis, no
``random`` (a port may lack it), no typing: a seeded xorshift mutates valid
encodings made by firmware_bridge's own encoders.

    python -m tests.fuzz.long --micropython [--inputs N]    # the real runtime
    python3 tests/fuzz/mp_fuzz.py [N]                       # CPython

The oracle is the short form's, as far as MicroPython allows: only the
documented exceptions, each with a message; a Link never raises on line
bytes and every Dropped event carries a FrameError; and whatever a decoder
accepts survives a round trip through its encoder. Prints one line per
decoder and ends with ``N failures``; exits 1 if there was any.
"""

import sys

from firmware_bridge import cbor, cobs
from firmware_bridge import link as fl


class Rng:
    """xorshift32: the same inputs on every runtime."""

    def __init__(self, seed):
        self.state = (seed * 2654435761 + 1) & 0xFFFFFFFF or 1

    def next(self):
        x = self.state
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.state = x
        return x

    def below(self, n):
        return self.next() % n if n > 0 else 0

    def bytes(self, n):
        return bytes(self.next() & 0xFF for _ in range(n))


_INTERESTING = (0x00, 0x01, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1F, 0x3F, 0x40, 0x5F, 0x60,
                0x7F, 0x80, 0x9F, 0xA0, 0xBF, 0xC0, 0xF4, 0xF5, 0xF6, 0xF7, 0xFB, 0xFF,
                0xC3, 0xE2, 0xED, 0xF0, 0xF4)  # fmt: skip


def mutate(data, rng, pool, max_len):
    buf = bytearray(data)
    for _ in range(1 + rng.below(4)):
        op = rng.below(9)
        n = len(buf)
        if op == 0 and n:
            i = rng.below(n)
            buf[i] ^= 1 << rng.below(8)
        elif op == 1 and n:
            buf[rng.below(n)] = _INTERESTING[rng.below(len(_INTERESTING))]
        elif op == 2 and n:
            i = rng.below(n)
            buf[i] = (buf[i] + rng.below(33) - 16) & 0xFF
        elif op == 3:
            i = rng.below(n + 1)
            buf[i:i] = rng.bytes(1 + rng.below(8))
        elif op == 4 and n:
            i = rng.below(n)
            buf[i : i + 1 + rng.below(16)] = b""
        elif op == 5 and n:
            buf[rng.below(n) :] = b""
        elif op == 6 and pool:
            other = pool[rng.below(len(pool))]
            buf[rng.below(n + 1) :] = other[rng.below(len(other) + 1) :]
        elif op == 7 and n:
            i = rng.below(n)
            j = i + 1 + rng.below(32)
            k = rng.below(n + 1)
            buf[k:k] = buf[i:j]
        else:
            buf += rng.bytes(1 + rng.below(16))
        if len(buf) > max_len:
            buf[max_len:] = b""
    return bytes(buf)


def _message_ok(exc):
    msg = str(exc)
    return bool(msg) and msg[0] == msg[0].lower()


# --- targets: each returns True if accepted, False if rejected, or raises --------


def _values(rng):
    out = []
    for i in range(24):
        out.append(
            [
                None,
                True,
                i,
                -i - 1,
                (1 << 64) - 1 - i,
                -(1 << 64) + i,
                rng.bytes(rng.below(40)),
                "t\u00e9\u20ac" * rng.below(5),
                {"k": [1, 2, {3: b"x"}], 7: "v"},
                [[[]]],
            ][: 1 + rng.below(10)]
        )
    return out


def cbor_seeds(rng):
    return [cbor.encode(v) for v in _values(rng)]


def cbor_target(data):
    try:
        value = cbor.decode(data)
    except cbor.CBORError as exc:
        if type(exc) is not cbor.CBORError or not _message_ok(exc):
            raise
        return False
    if cbor.decode(cbor.encode(value)) != value:
        raise AssertionError("cbor: decoded value does not survive a round trip")
    return True


def cobs_seeds(rng):
    return [cobs.encode(rng.bytes(rng.below(600)) + b"\x00" * rng.below(3)) for _ in range(24)]


def cobs_target(data):
    try:
        raw = cobs.decode(data)
    except cobs.FrameError as exc:
        if type(exc) is not cobs.FrameError or exc.reason != "bad cobs" or not _message_ok(exc):
            raise
        return False
    if cobs.decode(cobs.encode(raw)) != raw:
        raise AssertionError("cobs: decoded bytes do not survive a round trip")
    return True


def splitter_target(data):
    splitter = cobs.FrameSplitter(300)
    for item in splitter.feed(data[: len(data) // 2]) + splitter.feed(data[len(data) // 2 :]):
        if isinstance(item, cobs.FrameError):
            if item.reason != "oversize" or not _message_ok(item):
                raise AssertionError("splitter: bad message " + repr(str(item)))
        elif type(item) is not bytes or not 0 < len(item) <= 300 or b"\x00" in item:
            raise AssertionError("splitter: bad item " + repr(item))
    if splitter.buffered > 300:
        raise AssertionError("splitter holds too much")
    return True


def hello_seeds(rng):
    out = []
    for i in range(16):
        hello = fl.Hello(
            "dev-" + "\u00e9" * rng.below(30),
            1 + rng.below(0xFFFFFFFE),
            128 + rng.below(4000),
            1 + rng.below(10000),
            1 + rng.below(30000),
            bool(i & 1),
            bool(i & 2),
            rng.below(3) and rng.next(),
            bool(i & 4),
        )
        out.append(hello.encode())
    return out


def hello_target(data):
    try:
        hello = fl.Hello.decode(data)
    except fl.FrameError as exc:
        if type(exc) is not fl.FrameError or exc.reason != "bad hello" or not _message_ok(exc):
            raise
        return False
    if fl.Hello.decode(hello.encode()) != hello:
        raise AssertionError("link hello does not survive a round trip")
    return True


_PSK = bytes(range(100, 132))


def _pair(psk, reliable):
    """(a started host, the device's bytes that bring a fresh host up, the device's frames)."""
    host = fl.Link("host", "node-a", 0x11111111, psk=psk, reliable=reliable)
    device = fl.Link("device", "pico-1", 0x22222222, psk=psk, reliable=reliable)
    host.start(0)
    device.start(0)
    handshake = b""
    for _ in range(4):
        out = device.bytes_to_send()
        handshake += out
        host.receive_bytes(out, 0)
        device.receive_bytes(host.bytes_to_send(), 0)
    frames = []

    def take():
        out = device.bytes_to_send()
        frames.extend(p + b"\x00" for p in out.split(b"\x00") if p)
        host.receive_bytes(out, 0)
        device.receive_bytes(host.bytes_to_send(), 0)

    device.send_data("sensors/t", b"\x01\x00\x02", 0)
    take()
    device.send_request(9, "rpc", b"q", 0)
    take()
    device.send_response(9, 2, "no \u00e9", 0)
    take()
    device.send_to("10.0.0.2/x", "t", b"", 0)
    take()
    device.tick(2000)
    take()
    return handshake, frames


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


def link_target_for(psk, reliable):
    handshake, frames = _pair(psk, reliable)

    def target(data):
        host = fl.Link("host", "node-a", 0x11111111, psk=psk, reliable=reliable)
        host.start(0)
        host.receive_bytes(handshake, 0)
        events = host.receive_bytes(data, 100) + host.receive_bytes(b"\x00", 100)
        events += host.tick(5000)
        for event in events:
            if type(event) is fl.Dropped:
                error = event.error
                if type(error) is not fl.FrameError or error.reason not in _DROP_REASONS:
                    raise AssertionError("link dropped for " + repr(error))
                if event.reason != error.reason or not _message_ok(error):
                    raise AssertionError("link dropped for " + repr(event.error))
            elif type(event) not in (fl.Received, fl.SessionUp, fl.SessionDown):
                raise AssertionError("link event " + repr(event))
        if host.pending_output > host.max_output_bytes:
            raise AssertionError("link output over its limit")
        return True

    def seeds(rng):
        out = []
        for _ in range(24):
            picked = [f for f in frames if rng.below(3) == 0] or frames[:1]
            out.append(b"".join(picked))
        return out

    return seeds, target


def run(inputs):
    plain = link_target_for(None, False)
    secure = link_target_for(_PSK, True)
    targets = (
        ("cbor", cbor_seeds, cbor_target, 1024),
        ("cobs", cobs_seeds, cobs_target, 1024),
        ("cobs_stream", cobs_seeds, splitter_target, 1024),
        ("link_hello", hello_seeds, hello_target, 512),
        ("link", plain[0], plain[1], 1024),
        ("link_psk", secure[0], secure[1], 1024),
    )
    failures = 0
    for name, make_seeds, target, max_len in targets:
        rng = Rng(len(name))
        seeds = make_seeds(rng)
        accepted = 0
        errors = 0
        for _ in range(inputs):
            roll = rng.below(20)
            if roll == 0:
                data = seeds[rng.below(len(seeds))]
            elif roll == 1:
                data = rng.bytes(rng.below(64))
            else:
                data = mutate(seeds[rng.below(len(seeds))], rng, seeds, max_len)
            try:
                if target(data):
                    accepted += 1
            except Exception as exc:  # the oracle: anything else is a bug
                errors += 1
                if errors <= 3:
                    print("FAILED", name, type(exc).__name__, str(exc)[:200])
                    print("  input", " ".join(f"{b:02x}" for b in data))
        failures += errors
        print(f"{name} {inputs} inputs, {accepted} accepted, {errors} failures")
    print(f"{failures} failures")
    return failures


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    sys.exit(1 if run(count) else 0)
