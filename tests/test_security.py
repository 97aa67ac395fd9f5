"""Security cases (issue 6, part 5), each explicit: the error and the node carrying on.

Cases already covered in full elsewhere are not repeated here:

- an untrusted (unauthorised) certificate at the listener:
  ``test_bad_input.py::test_node_rejects_unauthorised_node``; a plain TLS
  client with one: ``::test_node_rejects_plain_tls_client_with_untrusted_certificate``;
  TLS presenting another certificate than the preamble's:
  ``::test_node_rejects_tls_certificate_other_than_the_preamble_one``;
- a hello naming another node than the certificate's:
  ``test_bad_input.py::test_node_rejects_hello_naming_another_node``;
- a forged certificate (an authorised key, another signer) pinned first
  cannot lock out the real node, at the TLS layer:
  ``test_identity.py::test_forged_certificate_cannot_lock_out_the_real_node``;
- a key file readable by others:
  ``test_identity.py::test_load_rejects_key_readable_by_others``,
  ``::test_load_rejects_key_with_group_bits``,
  ``test_cli.py::test_run_rejects_key_file_readable_by_others``;
- a serial key file readable by others:
  ``test_cli.py::test_run_rejects_serial_key_readable_by_others``;
- a known-peers file writable by others (ignored, with a warning):
  ``test_state.py::test_load_ignores_a_file_writable_by_others``;
- replay and reordering on the UART link, in the pure link:
  ``firmware_bridge/test_link.py::test_psk_replayed_frame_is_dropped``,
  ``::test_psk_reordered_frames_drop_the_older``,
  ``::test_psk_replay_of_an_earlier_boot_is_dropped``.

Here: the same cases where they were not yet tested end to end (a dialler
meeting an untrusted listener; a certificate naming an authorised node with
another key; a forged certificate through a real node; replay and reordering
through a node's serial bridge on a real pseudo-terminal), and state
directories and authorised-nodes files that others can use.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import ssl
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.tls import TLSStream
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from edgenode.errors import ConfigError, HandshakeError, InsecureKeyFile, NotAuthorised
from edgenode.identity import KEY_FILENAME, create_identity, load_identity
from edgenode.node import Node, PeerUp, Refused
from edgenode.proto.preamble import ACCEPTED, encode_preamble
from edgenode.simdevice import PtyPair, SimulatedDevice
from edgenode.tls import client_context
from edgenode.trust import load_authorised
from firmware_bridge import cobs
from firmware_bridge.link import DATA, FLAG_AUTH

from .conftest import Pair, RawPeer, echo, wait_event, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def _refused_from(ip: str) -> Any:
    return lambda e: isinstance(e, Refused) and e.peer == ip


def _self_signed(key: Ed25519PrivateKey, common_name: str, public_key: Any = None) -> bytes:
    """A certificate over ``public_key`` (default: ``key``'s), signed by ``key``, DER."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    utc = datetime.timezone.utc
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key if public_key is not None else key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(1970, 1, 1, tzinfo=utc))
        .not_valid_after(datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
        .public_bytes(serialization.Encoding.DER)
    )


# -- an untrusted certificate, an unknown node ID: the dialler's side ----------------------


async def test_dialler_refuses_a_listener_with_an_unknown_node_id(
    pair: Pair, make_config: Any, identities: Any
) -> None:
    # The outsider would accept A; A must not accept the outsider.
    outsider = identities["outsider"]
    config = make_config("outsider", "127.0.0.4", authorised=identities.ids("a"))
    async with Node(config) as stranger:
        await pair.a.add_peer("127.0.0.4", stranger.listen_port)
        refused = await wait_event(pair.events, _refused_from("127.0.0.4"))
        assert type(refused.error) is NotAuthorised
        assert str(refused.error) == f"127.0.0.4: node {outsider.node_id} is not authorised"
        assert [p.state for p in pair.a.peers() if p.ip == "127.0.0.4"] == ["down"]
        assert stranger.peers() == [] or all(p.state != "up" for p in stranger.peers())
        await pair.still_working()


# -- the right node ID with the wrong key -------------------------------------------------


async def test_node_judges_a_certificate_by_its_key_not_the_name_it_claims(
    pair: Pair, identities: Any, tmp_path: Path
) -> None:
    # A certificate whose subject names B (authorised) but whose key is the
    # outsider's: the node ID is the key's, so it is refused as the outsider.
    outsider = identities["outsider"]
    key = serialization.load_pem_private_key(outsider.key_path.read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    state = tmp_path / "impostor"
    state.mkdir(mode=0o700)
    shutil.copyfile(outsider.key_path, state / KEY_FILENAME)
    os.chmod(state / KEY_FILENAME, 0o600)
    der = _self_signed(key, common_name=pair.b.node_id)
    (state / "node.crt").write_text(ssl.DER_cert_to_PEM_cert(der))
    impostor = load_identity(state)
    assert impostor.node_id == outsider.node_id != pair.b.node_id

    with pytest.raises(HandshakeError):  # the listener closes before any hello
        await RawPeer.connect(impostor, "127.0.0.2", pair.a.listen_port)
    refused = await wait_event(pair.events, _refused_from("127.0.0.9"))
    assert type(refused.error) is NotAuthorised
    assert str(refused.error) == f"127.0.0.9: node {outsider.node_id} is not authorised"
    await pair.still_working()


async def test_node_refuses_an_authorised_key_without_its_private_key(
    pair: Pair, identities: Any
) -> None:
    # The preamble carries a certificate over B's public key (so B's node
    # ID), signed by the attacker. TLS then needs B's private key, which the
    # attacker does not have (ssl will not even load a certificate with a
    # key that does not match it): the attacker's own certificate is refused.
    b_cert = x509.load_der_x509_certificate(identities["b"].cert_der)
    forged = _self_signed(Ed25519PrivateKey.generate(), pair.b.node_id, b_cert.public_key())
    stream = await anyio.connect_tcp("127.0.0.2", pair.a.listen_port, local_host="127.0.0.9")
    await stream.send(encode_preamble(forged))
    assert await stream.receive(1) == ACCEPTED  # the listener's verdict on the preamble
    with pytest.raises((ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError)):
        tls = await TLSStream.wrap(
            stream, server_side=False, ssl_context=client_context(identities["outsider"])
        )
        await tls.receive()  # TLS 1.3: the server's verdict comes after the client's finished
    refused = await wait_event(pair.events, _refused_from("127.0.0.9"))
    assert type(refused.error) is HandshakeError
    # Regression: the reason read as OpenSSL's constant, certificate_verify_failed.
    assert str(refused.error) == "127.0.0.9: tls handshake failed: certificate verify failed"
    await anyio.aclose_forcefully(stream)
    # The forged certificate, pinned first, locks nobody out: B's real key
    # completes a fresh handshake and hello exchange with A.
    raw = await RawPeer.connect(identities["b"], "127.0.0.2", pair.a.listen_port)
    hello = await raw.hello(identities["b"], epoch=7)
    assert hello.node_id == pair.a.node_id
    await raw.aclose()
    await pair.still_working()


# -- a state directory with unsafe permissions ----------------------------------------------


@pytest.fixture
def own_state(tmp_path: Path) -> Path:
    """A fresh identity in a state directory of its own (mode 0700)."""
    create_identity(tmp_path / "state")
    return tmp_path / "state"


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o730, 0o702])
def test_load_rejects_a_state_directory_others_can_write(own_state: Path, mode: int) -> None:
    # 0o1777 is sticky, as /tmp: others can still add files.
    os.chmod(own_state, mode)
    with pytest.raises(InsecureKeyFile) as info:
        load_identity(own_state)
    assert str(info.value) == (
        f"state directory {own_state} is writable by others (mode {mode:04o}): they could "
        f"replace this node's key or authorised nodes; run: chmod 700 {own_state}"
    )


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o700])
def test_a_state_directory_others_can_only_read_is_accepted(own_state: Path, mode: int) -> None:
    # As ssh accepts a readable ~/.ssh: the key file itself stays owner-only.
    os.chmod(own_state, mode)
    assert load_identity(own_state).state_dir == own_state


def test_keygen_refuses_a_state_directory_others_can_write(tmp_path: Path) -> None:
    # Refused before a key is made, so none is ever written where others write.
    state = tmp_path / "shared"
    state.mkdir()
    os.chmod(state, 0o777)
    with pytest.raises(InsecureKeyFile, match=r"^state directory .* is writable by others"):
        create_identity(state)
    assert list(state.iterdir()) == []


async def test_node_refuses_to_start_from_an_unsafe_state_directory_until_fixed(
    own_state: Path, make_config: Any, identities: Any
) -> None:
    config = make_config("a", "127.0.0.2", state_dir=own_state, authorised=identities.ids("b"))
    os.chmod(own_state, 0o777)
    with pytest.raises(InsecureKeyFile) as info:
        Node(config)
    assert str(info.value).startswith(f"state directory {own_state} is writable by others")
    # Fixed as the message says, the same node starts and a peer gets in.
    os.chmod(own_state, 0o700)
    node_id = load_identity(own_state).node_id
    async with Node(config) as a:
        a.handle("echo", echo)
        b_config = make_config(
            "b", "127.0.0.3", [("127.0.0.2", a.listen_port)], authorised=frozenset([node_id])
        )
        async with Node(b_config) as b:
            assert await b.request("127.0.0.2", "echo", b"fixed", timeout=5, wait_s=5) == b"fixed"


def test_authorised_nodes_file_writable_by_others_is_refused(
    own_state: Path, identities: Any
) -> None:
    path = own_state / "authorised_nodes"
    path.write_text(identities["b"].node_id + "\n")
    for mode in (0o666, 0o620):
        os.chmod(path, mode)
        with pytest.raises(ConfigError) as info:
            load_authorised(path)
        assert str(info.value) == (
            f"authorised nodes file {path} is writable by others (mode {mode:04o}): they "
            f"could make this node trust anyone; run: chmod go-w {path}"
        )
    os.chmod(path, 0o644)  # readable by others is fine: node IDs are not secret
    assert load_authorised(path) == frozenset([identities["b"].node_id])
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


async def test_node_refuses_an_authorised_nodes_file_others_can_write(
    own_state: Path, make_config: Any, identities: Any
) -> None:
    path = own_state / "authorised_nodes"
    path.write_text(identities["b"].node_id + "\n")
    os.chmod(path, 0o666)
    config = make_config("a", "127.0.0.2", state_dir=own_state, authorised=None)
    with pytest.raises(ConfigError, match=r"^authorised nodes file .* is writable by others"):
        Node(config)
    os.chmod(path, 0o600)
    async with Node(config) as a:
        assert a.authorised == frozenset([identities["b"].node_id])


# -- replayed and reordered microcontroller frames under a pre-shared key ----------------

KEY = b"k" * 32
DEVICE = "127.0.0.2/pico-1"


class TapLine:
    """A serial line through a tap, between a node and a device.

    The node opens ``near.path``; the device runs on ``far.master``. Frames
    from the device pass one by one and are recorded, as an attacker on the
    wire would record them; while ``holding``, they are kept back instead.
    """

    def __init__(self) -> None:
        self.near = PtyPair()
        self.far = PtyPair()
        os.set_blocking(self.near.master, False)
        self._far_end = os.open(self.far.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.far.release_slave()
        self.forwarded: list[bytes] = []  # frames from the device, each with its delimiter
        self.held: list[bytes] = []
        self.holding = False
        self._partial = b""

    def to_node(self, frame: bytes) -> None:
        os.write(self.near.master, frame)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._node_to_device)
            tg.start_soon(self._device_to_node)

    async def _node_to_device(self) -> None:
        while True:
            await anyio.wait_readable(self.near.master)
            try:
                data = os.read(self.near.master, 4096)
            except BlockingIOError:
                continue
            except OSError:  # EIO: the node closed its end
                return
            os.write(self._far_end, data)

    async def _device_to_node(self) -> None:
        while True:
            await anyio.wait_readable(self._far_end)
            try:
                data = os.read(self._far_end, 4096)
            except BlockingIOError:
                continue
            except OSError:  # EIO: the device's end closed
                return
            *frames, self._partial = (self._partial + data).split(cobs.DELIMITER)
            for frame in frames:
                if not frame:
                    continue
                wire = frame + cobs.DELIMITER
                if self.holding:
                    self.held.append(wire)
                else:
                    self.forwarded.append(wire)
                    self.to_node(wire)

    def close(self) -> None:
        os.close(self._far_end)
        self.near.close()
        self.far.close()


def frame_body(wire: bytes) -> bytes:
    """The body of a frame on the line (COBS decoded, CRC-32 removed)."""
    return cobs.decode(wire.rstrip(cobs.DELIMITER))[:-4]


def counter_of(wire: bytes) -> int:
    body = frame_body(wire)
    assert body[0] & FLAG_AUTH, "not an authenticated frame"
    return int.from_bytes(body[1:5], "big")


def data_payload(wire: bytes, topic: bytes) -> bytes | None:
    """The payload of an authenticated data frame on ``topic``, else None."""
    body = frame_body(wire)
    if body[0] & 0x0F != DATA:
        return None
    fields = body[5:-16]  # after header and counter, before the tag
    if fields[1 : 1 + fields[0]] != topic:
        return None
    return fields[1 + fields[0] :]


class Keyed:
    def __init__(self, node: Node, sim: SimulatedDevice, line: TapLine) -> None:
        self.node, self.sim, self.line = node, sim, line
        self.inbox: list[bytes] = []

    @property
    def link(self) -> Any:
        assert self.node.bridge is not None and self.node.bridge.ports[0].link is not None
        return self.node.bridge.ports[0].link

    def replay_logs(self, caplog: pytest.LogCaptureFixture) -> list[str]:
        prefix = f"{self.line.near.path}: dropped a frame (replay #"
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]

    async def still_working(self) -> None:
        answer = await self.node.request(DEVICE, "echo", b"still", timeout=5)
        assert answer == b"pico says still"
        assert self.link.is_up and self.sim.device is not None
        assert self.sim.device.stats["sessions"] == 1  # the session never went down


@asynccontextmanager
async def keyed_line(make_config: Any) -> AsyncIterator[Keyed]:
    """A node and a device sharing a pre-shared key through a :class:`TapLine`, up."""
    line = TapLine()
    sim = SimulatedDevice(
        "pico-1", line.far, psk=KEY, keepalive_interval_ms=200, keepalive_timeout_ms=2000
    )
    config = make_config(
        "a",
        "127.0.0.2",
        serial_ports=[(line.near.path, 115200)],
        serial_psk=KEY,
        serial_keepalive_interval_s=0.2,
        serial_keepalive_timeout_s=2.0,
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(line.run)
            async with Node(config) as node:
                events = node.events()
                rig = Keyed(node, sim, line)
                device = await sim.start()

                async def echo(payload: bytes) -> bytes:
                    return b"pico says " + payload

                device.handle("echo", echo)
                await wait_event(events, lambda e: isinstance(e, PeerUp) and e.peer == DEVICE)
                with anyio.fail_after(5):
                    await device.wait_up()  # the two ends come up one after the other
                line.near.release_slave()
                with node.subscribe("t") as sub:

                    async def collect() -> None:
                        async for msg in sub:
                            rig.inbox.append(msg.payload)

                    async with anyio.create_task_group() as watchers:
                        watchers.start_soon(collect)
                        yield rig
                        watchers.cancel_scope.cancel()
                await sim.stop()
            tg.cancel_scope.cancel()
    finally:
        await sim.aclose()
        line.close()


async def test_replayed_device_frame_is_dropped_by_the_node(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgenode.bridge")
    async with keyed_line(make_config) as rig:
        assert rig.sim.device is not None
        await rig.sim.device.publish("t", b"pay me once")
        await wait_until(lambda: rig.inbox == [b"pay me once"])
        [captured] = [f for f in rig.line.forwarded if data_payload(f, b"t") == b"pay me once"]
        # Replayed as captured: its tag is valid, its counter is not new.
        last = max(counter_of(f) for f in rig.line.forwarded)
        rig.line.to_node(captured)
        await wait_until(lambda: rig.link.stats.drops.get("replay", 0) == 1)
        epoch = rig.link.peer_hello.epoch
        assert rig.replay_logs(caplog) == [
            f"{rig.line.near.path}: dropped a frame (replay #1): replay: data frame's counter "
            f"{counter_of(captured)} is not above {last}, the last accepted from epoch {epoch}"
        ]
        # Delivered once: the next message arrives and the replay never did.
        await rig.sim.device.publish("t", b"next")
        await wait_until(lambda: len(rig.inbox) == 2)
        assert rig.inbox == [b"pay me once", b"next"]
        await rig.still_working()


async def test_reordered_device_frames_deliver_the_newer_and_drop_the_older(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgenode.bridge")
    async with keyed_line(make_config) as rig:
        assert rig.sim.device is not None
        rig.line.holding = True
        await rig.sim.device.publish("t", b"first")
        await rig.sim.device.publish("t", b"second")

        def both_held() -> bool:
            payloads = [data_payload(f, b"t") for f in rig.line.held]
            return b"first" in payloads and b"second" in payloads

        await wait_until(both_held)
        held = rig.line.held
        first = next(i for i, f in enumerate(held) if data_payload(f, b"t") == b"first")
        second = next(i for i, f in enumerate(held) if data_payload(f, b"t") == b"second")
        c1, c2 = counter_of(held[first]), counter_of(held[second])
        assert c1 < c2
        # The attacker swaps the two: the newer arrives first.
        held[first], held[second] = held[second], held[first]
        rig.line.holding = False
        rig.line.held = []
        for frame in held:
            rig.line.forwarded.append(frame)
            rig.line.to_node(frame)
        await wait_until(lambda: rig.inbox == [b"second"])
        epoch = rig.link.peer_hello.epoch
        expected = (
            f"replay: data frame's counter {c1} is not above {c2}, "
            f"the last accepted from epoch {epoch}"
        )
        await wait_until(lambda: any(log.endswith(expected) for log in rig.replay_logs(caplog)))
        assert rig.link.stats.drops.get("replay", 0) >= 1
        await rig.sim.device.publish("t", b"third")
        await wait_until(lambda: len(rig.inbox) == 2)
        assert rig.inbox == [b"second", b"third"]  # "first" never delivered
        await rig.still_working()
