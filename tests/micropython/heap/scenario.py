"""What a whole session does in the heap measurement: shared by both sides.

The device publishes ``PUBLISHES`` messages and sends ``REQUESTS`` requests;
the host sends ``PUBLISHES`` messages and ``REQUESTS`` requests back. Every
payload is ``PAYLOAD_BYTES`` long: 200, as in the issue's target.
"""

PAYLOAD_BYTES = 200
PUBLISHES = 24
REQUESTS = 6
TOPIC_DATA = "t/data"
TOPIC_ECHO = "t/echo"
PSK = b"0123456789abcdef0123456789abcdef"
MODES = ("plain", "reliable", "psk", "psk+reliable")
DEVICE_EPOCH = 0x0D0D0D0D
HOST_EPOCH = 0x0A0A0A0A


def payload():
    return bytes(range(PAYLOAD_BYTES))


def options(mode):
    """The link options of ``mode`` (both ends use the same)."""
    return {"psk": PSK if "psk" in mode else None, "reliable": "reliable" in mode}
