"""A line between two MicroPython runtimes: fixed buffers the JavaScript driver copies between.

Used by the heap measurement (see heap.py next to this directory's parent).
The driver (.ci/micropython-heap.mjs) reads and writes the buffers directly
in the runtime's memory, so moving bytes allocates nothing on either heap:
what the device's heap holds is the device's own.

``meta`` is an array of six 32-bit words the driver finds by its address:
rx address, rx capacity, rx length (the driver writes bytes for us and sets
it; we clear it once read), tx address, tx capacity, tx length (we append;
the driver takes the bytes and clears it).
"""

import array

import uctypes

_RX_LEN = 2
_TX_LEN = 5


class Mailbox:
    """The two buffers and their lengths."""

    def __init__(self, capacity):
        self.rx = bytearray(capacity)
        self.tx = bytearray(capacity)
        self.txv = memoryview(self.tx)
        self.meta = array.array("I", (0, 0, 0, 0, 0, 0))
        meta = self.meta
        meta[0] = uctypes.addressof(self.rx)
        meta[1] = capacity
        meta[3] = uctypes.addressof(self.tx)
        meta[4] = capacity
        self.pos = 0  # read position in rx

    def address(self):
        return uctypes.addressof(self.meta)

    def pending(self):
        """Bytes from the peer not read yet."""
        return self.meta[_RX_LEN] - self.pos

    def take(self, n):
        """Up to ``n`` bytes from the peer (empty if none)."""
        end = self.meta[_RX_LEN]
        stop = self.pos + n
        if stop > end:
            stop = end
        data = bytes(memoryview(self.rx)[self.pos : stop])
        self.pos = stop
        if stop == end:
            self.pos = 0
            self.meta[_RX_LEN] = 0
        return data

    def take_into(self, buf):
        """Read into ``buf``; return the count."""
        end = self.meta[_RX_LEN]
        n = end - self.pos
        if n > len(buf):
            n = len(buf)
        if n:
            memoryview(buf)[:n] = memoryview(self.rx)[self.pos : self.pos + n]
        self.pos += n
        if self.pos == end:
            self.pos = 0
            self.meta[_RX_LEN] = 0
        return n

    def room(self):
        return self.meta[4] - self.meta[_TX_LEN]

    def put(self, data):
        """Queue ``data`` for the peer. Raises OSError if it does not fit (a harness bug)."""
        n = len(data)
        start = self.meta[_TX_LEN]
        if start + n > self.meta[4]:
            raise OSError(f"mailbox full: {start} + {n} bytes")
        self.txv[start : start + n] = data
        self.meta[_TX_LEN] = start + n

    def unsent(self):
        return self.meta[_TX_LEN]
