"""Bad input from the network: each gets a clear error and loses nothing.

Node A (127.0.0.2) has a healthy peer B (127.0.0.3). Each test sends one
kind of bad input to A from 127.0.0.9, checks the error's type and message,
and then checks that A and B still exchange requests.
"""

from __future__ import annotations

import ssl
from typing import Any

import anyio
import cbor2
import pytest

from edgenode.errors import (
    BadPreamble,
    FrameTooLarge,
    HandshakeError,
    MalformedMessage,
    NotAuthorised,
    TruncatedFrame,
    UnexpectedMessage,
    UnknownMessageType,
    VersionMismatch,
)
from edgenode.node import PeerDown, PeerUp, Refused
from edgenode.proto.connection import PeerProtocol
from edgenode.proto.framing import encode_frame
from edgenode.proto.messages import Bye, Data, Hello
from edgenode.proto.preamble import ACCEPTED, encode_preamble
from edgenode.tls import client_context

from .conftest import Pair, RawPeer, wait_event

pytestmark = pytest.mark.anyio




async def _established(pair: Pair, identities: Any) -> RawPeer:
    raw = await RawPeer.connect(identities["raw"], "127.0.0.2", pair.a.listen_port)
    await raw.hello(identities["raw"])
    await wait_event(pair.events, lambda e: isinstance(e, PeerUp) and e.peer == "127.0.0.9")
    return raw


async def _down(pair: Pair) -> PeerDown:
    return await wait_event(
        pair.events, lambda e: isinstance(e, PeerDown) and e.peer == "127.0.0.9"
    )


async def _refused(pair: Pair) -> Refused:
    return await wait_event(pair.events, lambda e: isinstance(e, Refused) and e.peer == "127.0.0.9")


async def test_node_rejects_oversize_frame(pair: Pair, identities: Any) -> None:
    raw = await _established(pair, identities)
    await raw.send((100_000).to_bytes(4, "big"))
    down = await _down(pair)
    assert isinstance(down.error, FrameTooLarge)
    assert down.reason == "127.0.0.9: frame length 100000 exceeds 65536-byte limit"
    # The peer is told why before the connection closes.
    received: list[Any] = []
    with anyio.fail_after(2):
        while Bye(down.reason) not in received:
            received += await raw.messages()
    await raw.aclose()
    await pair.still_working()


async def test_node_rejects_truncated_frame(pair: Pair, identities: Any) -> None:
    raw = await _established(pair, identities)
    await raw.send((100).to_bytes(4, "big") + b"0123456789")
    await raw.stream.transport_stream.send_eof()  # a clean TCP end, mid-frame
    down = await _down(pair)
    assert isinstance(down.error, TruncatedFrame)
    assert down.reason == "127.0.0.9: stream ended mid-frame: got 10 of 100 body bytes"
    await raw.aclose()
    await pair.still_working()


async def test_node_rejects_invalid_cbor(pair: Pair, identities: Any) -> None:
    raw = await _established(pair, identities)
    await raw.send(encode_frame(b"\xff\x00"))
    down = await _down(pair)
    assert isinstance(down.error, MalformedMessage)
    assert down.reason.startswith("invalid cbor in frame ff 00: cbor: ")
    await raw.aclose()
    await pair.still_working()


async def test_node_rejects_unknown_message_type(pair: Pair, identities: Any) -> None:
    raw = await _established(pair, identities)
    await raw.send(encode_frame(cbor2.dumps([99, "x"])))
    down = await _down(pair)
    assert isinstance(down.error, UnknownMessageType)
    assert down.reason == "unknown message type 99 in frame 82 18 63 61 78"
    await raw.aclose()
    await pair.still_working()


async def test_node_rejects_wrong_protocol_version(pair: Pair, identities: Any) -> None:
    raw = await RawPeer.connect(identities["raw"], "127.0.0.2", pair.a.listen_port)
    # Version 1 lacked the ready message (docs/protocol.md): not compatible.
    await raw.send(encode_frame(cbor2.dumps([0, 1, identities["raw"].node_id, 0, 1])))
    refused = await _refused(pair)
    assert isinstance(refused.error, VersionMismatch)
    assert str(refused.error) == "peer speaks protocol version 1; this node speaks 2"
    assert "127.0.0.9" not in [p.ip for p in pair.a.peers()]
    await raw.aclose()
    await pair.still_working()


async def test_node_rejects_data_before_hello(pair: Pair, identities: Any) -> None:
    raw = await RawPeer.connect(identities["raw"], "127.0.0.2", pair.a.listen_port)
    await raw.send(PeerProtocol.send(Data("t", b"too early")))
    refused = await _refused(pair)
    assert isinstance(refused.error, UnexpectedMessage)
    assert str(refused.error) == "127.0.0.9: expected hello as the first message, got data"
    assert "127.0.0.9" not in [p.ip for p in pair.a.peers()]
    await raw.aclose()
    await pair.still_working()


async def test_node_rejects_hello_naming_another_node(pair: Pair, identities: Any) -> None:
    raw = await RawPeer.connect(identities["raw"], "127.0.0.2", pair.a.listen_port)
    claimed = pair.b.node_id  # an authorised ID, but not the certificate's
    await raw.send(PeerProtocol.send(Hello(claimed, 0, 1)))
    refused = await _refused(pair)
    assert isinstance(refused.error, HandshakeError)
    assert str(refused.error) == (
        f"127.0.0.9: hello names node '{claimed}' but the certificate belongs to "
        f"{identities['raw'].node_id}"
    )
    await raw.aclose()
    await pair.still_working()


async def test_node_rejects_unauthorised_node(pair: Pair, identities: Any) -> None:
    outsider = identities["outsider"]
    with pytest.raises(HandshakeError):
        await RawPeer.connect(outsider, "127.0.0.2", pair.a.listen_port)
    refused = await _refused(pair)
    assert isinstance(refused.error, NotAuthorised)
    assert str(refused.error) == f"127.0.0.9: node {outsider.node_id} is not authorised"
    assert "127.0.0.9" not in [p.ip for p in pair.a.peers()]
    await pair.still_working()


async def test_node_rejects_plain_tls_client_with_untrusted_certificate(
    pair: Pair, identities: Any
) -> None:
    stream = await anyio.connect_tcp("127.0.0.2", pair.a.listen_port, local_host="127.0.0.9")
    from anyio.streams.tls import TLSStream

    with pytest.raises((ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError)):
        await TLSStream.wrap(
            stream, server_side=False, ssl_context=client_context(identities["outsider"])
        )
    refused = await _refused(pair)
    assert isinstance(refused.error, BadPreamble)
    assert str(refused.error).startswith(
        "expected preamble magic 45 44 47 4e ('EDGN'), got 16 03 01"
    )
    assert str(refused.error).endswith(
        "(a plain TLS client? edgenode dialers send a preamble first)"
    )
    await anyio.aclose_forcefully(stream)
    await pair.still_working()


async def test_node_rejects_tls_certificate_other_than_the_preamble_one(
    pair: Pair, identities: Any
) -> None:
    # The preamble names an authorised node; TLS then presents another certificate.
    stream = await anyio.connect_tcp("127.0.0.2", pair.a.listen_port, local_host="127.0.0.9")
    from anyio.streams.tls import TLSStream

    await stream.send(encode_preamble(identities["raw"].cert_der))
    assert await stream.receive(1) == ACCEPTED  # the listener's verdict on the preamble
    with pytest.raises((ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError)):
        tls = await TLSStream.wrap(
            stream, server_side=False, ssl_context=client_context(identities["outsider"])
        )
        await tls.receive()  # TLS 1.3: the server's verdict arrives after the client's finished
    refused = await _refused(pair)
    assert isinstance(refused.error, HandshakeError)
    assert str(refused.error).startswith("127.0.0.9: tls handshake failed: ")
    await anyio.aclose_forcefully(stream)
    await pair.still_working()


async def test_node_rejects_garbage_instead_of_tls(pair: Pair) -> None:
    stream = await anyio.connect_tcp("127.0.0.2", pair.a.listen_port, local_host="127.0.0.9")
    await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    refused = await _refused(pair)
    assert isinstance(refused.error, BadPreamble)
    assert str(refused.error) == (
        "expected preamble magic 45 44 47 4e ('EDGN'), got 47 45 54 20 2f 20 48"
    )
    with anyio.fail_after(2):
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await stream.receive()  # the node hung up
    await anyio.aclose_forcefully(stream)
    await pair.still_working()
