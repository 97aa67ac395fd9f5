"""The hot path's CBOR codec against cbor2's C extension, on one data message.

Encodes and decodes a 64-byte data message (``[3, topic, payload]``) with
``edgenode.proto`` (what the node uses) and with cbor2 (the reference, in
the same run). Prints, as JSON, the median and range over 7 runs of
100,000 each, in microseconds per message (docs/performance.md, "The
codec")::

    python -m tests.measure.codec
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import timeit
from importlib import metadata
from typing import Any, Callable

import cbor2

from edgenode.proto.decoding import decode_message
from edgenode.proto.messages import encode_data

TOPIC = "sensors/t"
PAYLOAD = b"x" * 50  # a 64-byte message body: array head, code, topic, payload
RUNS, NUMBER = 7, 100_000


def per_call_us(call: Callable[[], Any]) -> dict[str, float]:
    runs = [timeit.timeit(call, number=NUMBER) / NUMBER * 1e6 for _ in range(RUNS)]
    return {"median": round(statistics.median(runs), 2), "min": round(min(runs), 2),
            "max": round(max(runs), 2)}  # fmt: skip


def main() -> None:
    body = encode_data(TOPIC, PAYLOAD)
    item = cbor2.loads(body)
    assert len(body) == 64 and cbor2.dumps(item) == body  # the same bytes both ways
    figures = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cbor2": metadata.version("cbor2"),
        "message_bytes": len(body),
        "edgenode_encode_us": per_call_us(lambda: encode_data(TOPIC, PAYLOAD)),
        "edgenode_decode_us": per_call_us(lambda: decode_message(body)),
        "cbor2_encode_us": per_call_us(lambda: cbor2.dumps(item)),
        "cbor2_decode_us": per_call_us(lambda: cbor2.loads(body)),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
