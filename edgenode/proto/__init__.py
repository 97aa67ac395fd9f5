"""The node-to-node wire protocol, sans-IO.

``messages`` defines the messages and their CBOR form, ``framing`` the
length-prefixed stream framing, ``preamble`` the few bytes a dialler sends
before TLS, and ``connection`` the per-connection state machine that ties
them together. Nothing here does I/O, reads a clock or draws a random
number: bytes go in, messages and bytes come out. ``docs/protocol.md``
describes the same format byte by byte.
"""
