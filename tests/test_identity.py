"""Tests of edgenode.identity and edgenode.tls: real files, real certificates,
real TLS on loopback."""

from __future__ import annotations

import datetime
import gc
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from edgenode.errors import (
    HandshakeError,
    IdentityError,
    InsecureKeyFile,
    InvalidArgument,
    InvalidNodeId,
)
from edgenode.identity import (
    CERT_FILENAME,
    KEY_FILENAME,
    MAX_CERT_BYTES,
    Identity,
    IdentityExists,
    create_identity,
    load_identity,
    load_or_create_identity,
    node_id_from_cert_der,
    node_id_from_public_key,
    parse_node_id,
    public_key_from_cert_der,
)
from edgenode.tls import PinnedContexts, client_context, peer_node_id, server_context

NODE_ID_RE = re.compile(r"^[a-z2-7]{4}(-[a-z2-7]{4}){6}$")
LOOPBACK = "127.0.0.2"
IO_TIMEOUT_S = 10.0

# Fixed vectors: changing the node ID format would orphan every deployed ID.
VECTOR_KEY = bytes(range(32))
VECTOR_ID = "mmg4-2klg-yqzw-neis-krel-xms3-qjpg"
ZERO_KEY_ID = "mzuh-vlpy-mk6x-o3ep-ygfy-5h4o-kx3w"


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("identities")


@pytest.fixture(scope="module")
def node_a(shared_dir: Path) -> Identity:
    return create_identity(shared_dir / "a")


@pytest.fixture(scope="module")
def node_b(shared_dir: Path) -> Identity:
    return create_identity(shared_dir / "b")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- node IDs -----------------------------------------------------------------


def test_node_id_from_public_key_matches_fixed_vectors() -> None:
    assert node_id_from_public_key(VECTOR_KEY) == VECTOR_ID
    assert node_id_from_public_key(bytes(32)) == ZERO_KEY_ID


def test_node_id_from_public_key_rejects_wrong_length() -> None:
    with pytest.raises(IdentityError) as info:
        node_id_from_public_key(bytes(31))
    assert str(info.value) == "ed25519 public key should be 32 bytes, got 31"


def test_parse_node_id_accepts_variants() -> None:
    bare = VECTOR_ID.replace("-", "")
    for text in (
        VECTOR_ID,
        VECTOR_ID.upper(),
        bare,
        bare.upper(),
        f"  {VECTOR_ID}\n",
        "\t" + bare[:10] + "-" + bare[10:] + " ",
        "Mmg4-2KLG-yqzw-NEIS-krel-xms3-qjpg",
    ):
        assert parse_node_id(text) == VECTOR_ID


def test_parse_node_id_rejects_bad_length() -> None:
    with pytest.raises(InvalidNodeId) as info:
        parse_node_id("xyz")
    assert str(info.value) == (
        "node id 'xyz' should be 28 base32 characters (dashes optional), got 3"
    )


def test_parse_node_id_rejects_one_character_too_many() -> None:
    with pytest.raises(InvalidNodeId) as info:
        parse_node_id(VECTOR_ID + "a")
    assert str(info.value) == (
        f"node id '{VECTOR_ID}a' should be 28 base32 characters (dashes optional), got 29"
    )


def test_parse_node_id_truncates_long_text_in_message() -> None:
    with pytest.raises(InvalidNodeId) as info:
        parse_node_id("q" * 500)
    assert str(info.value) == (
        f"node id '{'q' * 40}...' should be 28 base32 characters (dashes optional), got 500"
    )


@pytest.mark.parametrize("bad", ["0", "1", "8", "9", "_", "é", " "])
def test_parse_node_id_rejects_non_base32_characters(bad: str) -> None:
    text = VECTOR_ID[:5] + bad + VECTOR_ID[6:]
    with pytest.raises(InvalidNodeId) as info:
        parse_node_id(text)
    assert str(info.value) == (
        f"node id {text!r} has {bad!r}, which is not a base32 character (a-z, 2-7)"
    )


def test_parse_node_id_rejects_bad_checksum() -> None:
    mistyped = "nmg4" + VECTOR_ID[4:]
    with pytest.raises(InvalidNodeId) as info:
        parse_node_id(mistyped)
    assert str(info.value) == f"node id '{mistyped}' has a bad checksum (mistyped?)"


def test_parse_node_id_catches_every_single_character_typo() -> None:
    bare = VECTOR_ID.replace("-", "")
    for i in range(len(bare)):
        for ch in "abcdefghijklmnopqrstuvwxyz234567":
            if ch != bare[i]:
                with pytest.raises(InvalidNodeId):
                    parse_node_id(bare[:i] + ch + bare[i + 1 :])


def test_parse_node_id_rejects_non_text() -> None:
    with pytest.raises(InvalidNodeId) as info:
        parse_node_id(VECTOR_ID.encode())  # type: ignore[arg-type]
    assert str(info.value) == "node id should be text, got bytes"


@given(st.binary(min_size=32, max_size=32))
def test_node_id_round_trips_through_parse(raw: bytes) -> None:
    node_id = node_id_from_public_key(raw)
    assert NODE_ID_RE.match(node_id)
    assert parse_node_id(node_id.upper().replace("-", "")) == node_id


@given(st.text(max_size=60))
def test_parse_node_id_raises_only_invalid_node_id(text: str) -> None:
    try:
        parsed = parse_node_id(text)
    except InvalidNodeId:
        return
    assert NODE_ID_RE.match(parsed)


# -- creating and loading ------------------------------------------------------


def test_create_then_load_round_trip(tmp_path: Path) -> None:
    state = tmp_path / "state"
    created = create_identity(state)
    loaded = load_identity(state)
    assert NODE_ID_RE.match(created.node_id)
    assert loaded.node_id == created.node_id
    assert loaded.cert_der == created.cert_der
    assert loaded.state_dir == state
    assert loaded.key_path == state / KEY_FILENAME
    assert loaded.cert_path == state / CERT_FILENAME
    assert load_identity(str(state)).node_id == created.node_id  # stable, str accepted


def test_created_files_have_owner_only_modes(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    old_umask = os.umask(0o077)  # modes must not depend on the umask
    try:
        identity = create_identity(state)
    finally:
        os.umask(old_umask)
    assert _mode(state) == 0o700
    assert _mode(identity.key_path) == 0o600
    assert _mode(identity.cert_path) == 0o644
    assert sorted(p.name for p in state.iterdir()) == [CERT_FILENAME, KEY_FILENAME]


def test_created_key_is_unencrypted_pkcs8_matching_the_certificate(node_a: Identity) -> None:
    pem = node_a.key_path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(pem, password=None)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public_key_from_cert_der(node_a.cert_der) == raw
    assert node_id_from_public_key(raw) == node_a.node_id


def test_created_certificate_fields(node_a: Identity) -> None:
    cert = x509.load_der_x509_certificate(node_a.cert_der)
    assert cert.version == x509.Version.v3
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_a.node_id)])
    assert cert.subject == name
    assert cert.issuer == name
    utc = datetime.timezone.utc
    assert cert.not_valid_before_utc == datetime.datetime(1970, 1, 1, tzinfo=utc)
    assert cert.not_valid_after_utc == datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=utc)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    assert cert.serial_number > 0
    public_key = cert.public_key()
    assert isinstance(public_key, Ed25519PublicKey)
    public_key.verify(cert.signature, cert.tbs_certificate_bytes)  # self-signed
    assert node_a.cert_path.read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_two_identities_differ(node_a: Identity, node_b: Identity) -> None:
    assert node_a.node_id != node_b.node_id


def test_identity_repr_shows_id_and_paths_only(node_a: Identity) -> None:
    text = repr(node_a)
    assert text == (
        f"Identity(node_id='{node_a.node_id}', cert_path='{node_a.cert_path}', "
        f"key_path='{node_a.key_path}')"
    )
    assert "PRIVATE" not in text


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    first = create_identity(tmp_path)
    with pytest.raises(IdentityExists) as info:
        create_identity(tmp_path)
    assert str(info.value) == (
        f"state directory {tmp_path} already holds identity {first.node_id}; "
        "pass overwrite=True to replace it"
    )
    assert isinstance(info.value, IdentityError)
    assert info.value.what == f"identity {first.node_id}"
    assert load_identity(tmp_path).node_id == first.node_id


def test_create_refuses_to_overwrite_a_lone_key(tmp_path: Path) -> None:
    create_identity(tmp_path)
    (tmp_path / CERT_FILENAME).unlink()
    with pytest.raises(IdentityExists) as info:
        create_identity(tmp_path)
    assert str(info.value) == (
        f"state directory {tmp_path} already holds an identity (node.key); "
        "pass overwrite=True to replace it"
    )


def test_create_with_overwrite_replaces_the_identity(tmp_path: Path) -> None:
    first = create_identity(tmp_path)
    second = create_identity(tmp_path, overwrite=True)
    assert second.node_id != first.node_id
    assert load_identity(tmp_path).node_id == second.node_id
    assert _mode(second.key_path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [CERT_FILENAME, KEY_FILENAME]


def test_create_rejects_a_file_as_state_directory(tmp_path: Path) -> None:
    not_dir = tmp_path / "file"
    not_dir.write_text("")
    with pytest.raises(IdentityError) as info:
        create_identity(not_dir)
    assert str(info.value) == f"state directory {not_dir} is not a directory"


def test_load_or_create_creates_once(tmp_path: Path) -> None:
    created = load_or_create_identity(tmp_path / "s")
    assert load_or_create_identity(tmp_path / "s").node_id == created.node_id


def test_load_or_create_refuses_a_half_identity(tmp_path: Path) -> None:
    create_identity(tmp_path)
    (tmp_path / KEY_FILENAME).unlink()
    with pytest.raises(IdentityError, match=r"^key file .* not found"):
        load_or_create_identity(tmp_path)


def test_load_rejects_key_readable_by_others(tmp_path: Path) -> None:
    identity = create_identity(tmp_path)
    os.chmod(identity.key_path, 0o644)
    with pytest.raises(InsecureKeyFile) as info:
        load_identity(tmp_path)
    assert str(info.value) == (
        f"key file {identity.key_path} is readable by others (mode 0644); "
        f"run: chmod 600 {identity.key_path}"
    )


def test_load_rejects_key_with_group_bits(tmp_path: Path) -> None:
    identity = create_identity(tmp_path)
    os.chmod(identity.key_path, 0o640)
    with pytest.raises(InsecureKeyFile, match=r"\(mode 0640\)"):
        load_identity(tmp_path)


def test_load_quotes_paths_in_suggested_commands(tmp_path: Path) -> None:
    state = tmp_path / "my state"
    identity = create_identity(state)
    os.chmod(identity.key_path, 0o604)
    with pytest.raises(InsecureKeyFile) as info:
        load_identity(state)
    assert str(info.value).endswith(f"run: chmod 600 '{identity.key_path}'")


def test_load_reports_missing_identity(tmp_path: Path) -> None:
    with pytest.raises(IdentityError) as info:
        load_identity(tmp_path)
    assert str(info.value) == (
        f"no identity in {tmp_path}: {tmp_path / KEY_FILENAME} not found; "
        f"create one with: edgenode keygen --state-dir {tmp_path}"
    )


def test_load_reports_missing_key(tmp_path: Path) -> None:
    create_identity(tmp_path)
    (tmp_path / KEY_FILENAME).unlink()
    with pytest.raises(IdentityError) as info:
        load_identity(tmp_path)
    assert str(info.value) == (
        f"key file {tmp_path / KEY_FILENAME} not found (the certificate is there); "
        "restore it, or make a new identity (a new node id) with: "
        f"edgenode keygen --force --state-dir {tmp_path}"
    )


def test_load_reports_missing_certificate(tmp_path: Path) -> None:
    create_identity(tmp_path)
    (tmp_path / CERT_FILENAME).unlink()
    with pytest.raises(IdentityError) as info:
        load_identity(tmp_path)
    assert str(info.value) == (
        f"certificate file {tmp_path / CERT_FILENAME} not found (the key is there); "
        "restore it, or make a new identity (a new node id) with: "
        f"edgenode keygen --force --state-dir {tmp_path}"
    )


def test_load_rejects_key_that_is_not_pem_without_showing_it(tmp_path: Path) -> None:
    identity = create_identity(tmp_path)
    identity.key_path.write_bytes(b"secret-key-material")
    with pytest.raises(IdentityError) as info:
        load_identity(tmp_path)
    assert str(info.value) == (
        f"key file {identity.key_path} is not a PEM private key "
        "(expected a '-----BEGIN PRIVATE KEY-----' block)"
    )
    assert "secret" not in str(info.value)


def test_load_rejects_encrypted_key(tmp_path: Path) -> None:
    identity = create_identity(tmp_path)
    identity.key_path.write_bytes(
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    with pytest.raises(IdentityError) as info:
        load_identity(tmp_path)
    assert str(info.value) == (
        f"key file {identity.key_path} is encrypted; edgenode needs an unencrypted PKCS#8 key"
    )


def test_load_rejects_oversized_key_file(tmp_path: Path) -> None:
    identity = create_identity(tmp_path)
    identity.key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 9000)
    with pytest.raises(IdentityError) as info:
        load_identity(tmp_path)
    assert str(info.value) == f"key file {identity.key_path} is larger than the 8192-byte limit"


def test_load_rejects_certificate_that_is_not_pem(tmp_path: Path) -> None:
    identity = create_identity(tmp_path)
    identity.cert_path.write_bytes(b"\xffnot a certificate")
    with pytest.raises(IdentityError) as info:
        load_identity(tmp_path)
    assert str(info.value) == (
        f"certificate file {identity.cert_path} is not a PEM certificate "
        "(expected a single '-----BEGIN CERTIFICATE-----' block)"
    )


def test_load_rejects_certificate_with_a_non_ed25519_key(tmp_path: Path) -> None:
    identity = create_identity(tmp_path)
    identity.cert_path.write_text(ssl.DER_cert_to_PEM_cert(_p256_cert_der()))
    with pytest.raises(IdentityError) as info:
        load_identity(tmp_path)
    assert str(info.value).startswith(
        f"{identity.cert_path}: certificate: expected an ed25519 key (oid 1.3.101.112)"
    )


# -- the DER walker ------------------------------------------------------------


def _p256_cert_der() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p256")])
    utc = datetime.timezone.utc
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=utc))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=utc))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _tlv(tag: int, content: bytes) -> bytes:
    """Encode one DER element (test helper, lengths up to 65535)."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    return bytes([tag]) + length + content


def _minimal_cert(
    *,
    version: bool = True,
    algorithm: bytes = b"\x06\x03\x2b\x65\x70",
    key_bits: bytes = b"\x00" + VECTOR_KEY,
    subject: bytes = b"",
    trailer: bytes = b"",
) -> bytes:
    """A structurally valid certificate with the given parts (unsigned)."""
    tbs = b"".join(
        [
            _tlv(0xA0, _tlv(0x02, b"\x02")) if version else b"",
            _tlv(0x02, b"\x01"),
            _tlv(0x30, _tlv(0x06, b"\x2b\x65\x70")),
            _tlv(0x30, b""),
            _tlv(0x30, b""),
            _tlv(0x30, subject),
            _tlv(0x30, _tlv(0x30, algorithm) + _tlv(0x03, key_bits)),
        ]
    )
    return (
        _tlv(
            0x30,
            _tlv(0x30, tbs)
            + _tlv(0x30, _tlv(0x06, b"\x2b\x65\x70"))
            + _tlv(0x03, b"\x00" + bytes(64)),
        )
        + trailer
    )


def _walker_error(der: bytes) -> str:
    with pytest.raises(IdentityError) as info:
        public_key_from_cert_der(der)
    return str(info.value)


def test_walker_reads_created_certificate(node_a: Identity) -> None:
    assert node_id_from_cert_der(node_a.cert_der) == node_a.node_id
    assert node_id_from_cert_der(bytearray(node_a.cert_der)) == node_a.node_id


def test_walker_reads_minimal_certificates_with_and_without_version() -> None:
    assert public_key_from_cert_der(_minimal_cert()) == VECTOR_KEY
    assert public_key_from_cert_der(_minimal_cert(version=False)) == VECTOR_KEY
    assert node_id_from_cert_der(_minimal_cert()) == VECTOR_ID


def test_walker_reads_long_form_lengths() -> None:
    # A 200-byte subject makes the tbsCertificate and certificate use 0x81/0x82.
    der = _minimal_cert(subject=_tlv(0x31, bytes(200)))
    assert der[1] == 0x82
    assert public_key_from_cert_der(der) == VECTOR_KEY


def test_walker_rejects_p256_certificate() -> None:
    message = _walker_error(_p256_cert_der())
    assert re.fullmatch(
        r"certificate: expected an ed25519 key \(oid 1\.3\.101\.112\) at offset \d+, "
        r"got oid 1\.2\.840\.10045\.2\.1 \(ec\)",
        message,
    ), message


def test_walker_rejects_ed25519_algorithm_with_parameters() -> None:
    message = _walker_error(_minimal_cert(algorithm=b"\x06\x03\x2b\x65\x70\x05\x00"))
    assert message.startswith("certificate: expected an ed25519 key (oid 1.3.101.112) at offset")
    assert message.endswith("got oid 1.3.101.112")


def test_walker_rejects_algorithm_that_is_not_an_oid() -> None:
    message = _walker_error(_minimal_cert(algorithm=b"\x05\x00"))
    assert re.fullmatch(
        r"certificate: expected an ed25519 key \(oid 1\.3\.101\.112\) at offset \d+, got 05 00",
        message,
    ), message


def test_walker_rejects_short_key() -> None:
    message = _walker_error(_minimal_cert(key_bits=b"\x00" + bytes(31)))
    assert re.fullmatch(
        r"certificate: expected a 33-byte public key bit string at offset \d+, got 32 bytes",
        message,
    ), message


def test_walker_rejects_unused_bits_in_key() -> None:
    message = _walker_error(_minimal_cert(key_bits=b"\x01" + VECTOR_KEY))
    assert re.fullmatch(
        r"certificate: expected 0 unused bits in the public key at offset \d+, got 1", message
    ), message


def test_walker_rejects_trailing_bytes(node_a: Identity) -> None:
    der = node_a.cert_der + b"\x00\x01"
    assert _walker_error(der) == (
        f"certificate: expected end of data at offset {len(node_a.cert_der)}, "
        "got 2 more bytes: 00 01"
    )


def test_walker_rejects_oversized_certificate() -> None:
    assert _walker_error(bytes(MAX_CERT_BYTES + 1)) == (
        "certificate: 2049 bytes exceeds the 2048-byte limit"
    )


def test_walker_rejects_wrong_outer_tag() -> None:
    assert _walker_error(b"\x31\x00") == (
        "certificate: expected a certificate sequence (tag 0x30) at offset 0, got tag 0x31: 31 00"
    )


def test_walker_rejects_empty_input() -> None:
    assert _walker_error(b"") == (
        "certificate: expected a certificate sequence at offset 0, got end of data"
    )


def test_walker_rejects_indefinite_and_long_lengths() -> None:
    assert _walker_error(b"\x30\x80\x00\x00") == (
        "certificate: expected a definite length of at most 2 bytes for a certificate "
        "sequence at offset 1, got 0x80"
    )
    assert _walker_error(b"\x30\x83\x00\x00\x01\x00") == (
        "certificate: expected a definite length of at most 2 bytes for a certificate "
        "sequence at offset 1, got 0x83"
    )


def test_walker_rejects_non_minimal_lengths() -> None:
    assert _walker_error(b"\x30\x81\x05" + bytes(5)) == (
        "certificate: expected the shortest length form for a certificate sequence "
        "at offset 1, got 81 05"
    )
    assert _walker_error(b"\x30\x82\x00\x05" + bytes(5)) == (
        "certificate: expected the shortest length form for a certificate sequence "
        "at offset 1, got 82 00 05"
    )


def test_walker_rejects_length_past_end() -> None:
    assert _walker_error(b"\x30\x05\x00") == (
        "certificate: expected a certificate sequence at offset 0 to fit its 5 bytes, "
        "got only 1 bytes before the end of its container"
    )


def test_walker_rejects_non_bytes() -> None:
    assert _walker_error("0\x00") == "certificate: expected bytes, got str"  # type: ignore[arg-type]


def test_walker_rejects_every_truncation(node_a: Identity) -> None:
    der = node_a.cert_der
    for n in range(len(der)):
        with pytest.raises(IdentityError):
            public_key_from_cert_der(der[:n])


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_walker_raises_only_identity_error_on_random_bytes(data: bytes) -> None:
    try:
        key = public_key_from_cert_der(data)
    except IdentityError:
        return
    assert len(key) == 32


@settings(max_examples=300)
@given(st.data())
def test_walker_raises_only_identity_error_on_mutated_certificates(data: st.DataObject) -> None:
    der = bytearray(_minimal_cert())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(der) - 1))
        der[i] = data.draw(st.integers(0, 255))
    try:
        key = public_key_from_cert_der(bytes(der))
    except IdentityError:
        return
    assert len(key) == 32


def test_running_node_paths_do_not_import_cryptography(node_a: Identity) -> None:
    script = (
        "import sys\n"
        "import edgenode.identity as i\n"
        "import edgenode.tls as t\n"
        f"ident = i.load_identity({str(node_a.state_dir)!r})\n"
        "t.server_context(ident)\n"
        "t.PinnedContexts(ident).for_certificate(ident.cert_der, ident.node_id)\n"
        "t.client_context(ident)\n"
        "i.node_id_from_cert_der(ident.cert_der)\n"
        "i.parse_node_id(ident.node_id)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'cryptography']\n"
        "assert not bad, bad\n"
        "print(ident.node_id)\n"
    )
    repo_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=repo_root)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=repo_root,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == node_a.node_id


# -- TLS -----------------------------------------------------------------------


def _run_tls(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    server_then: Callable[[ssl.SSLSocket], object],
    client_then: Callable[[ssl.SSLSocket], object],
) -> tuple[object, object]:
    """Run one handshake over real loopback sockets; return each side's result.

    A side's result is whatever its callback returned, or the exception its
    handshake or callback raised.
    """
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        listener.settimeout(IO_TIMEOUT_S)
        port = listener.getsockname()[1]

        def serve() -> object:
            conn, _ = listener.accept()
            conn.settimeout(IO_TIMEOUT_S)
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    return server_then(tls)
            except Exception as exc:
                return exc
            finally:
                conn.close()

        with ThreadPoolExecutor(max_workers=1) as pool:
            server_future = pool.submit(serve)
            try:
                with socket.create_connection((LOOPBACK, port), timeout=IO_TIMEOUT_S) as raw:
                    with client_ctx.wrap_socket(raw) as tls:
                        client_result: object = client_then(tls)
            except Exception as exc:
                client_result = exc
            server_result = server_future.result(timeout=IO_TIMEOUT_S * 2)
    return server_result, client_result


def _server_view(tls: ssl.SSLSocket) -> tuple[str, str | None]:
    tls.sendall(b"k")  # tells the dialler the listener accepted it
    return peer_node_id(tls), tls.version()


def _client_view(tls: ssl.SSLSocket) -> tuple[str, str | None, bytes]:
    # In TLS 1.3 the dialler finishes its handshake before the listener has
    # checked its certificate; the listener's verdict arrives with this read.
    return peer_node_id(tls), tls.version(), tls.recv(1)


def test_tls_pinned_dialler_completes_mutual_tls13(node_a: Identity, node_b: Identity) -> None:
    listener_ctx = PinnedContexts(node_a).for_certificate(node_b.cert_der, node_b.node_id)
    server_result, client_result = _run_tls(
        listener_ctx, client_context(node_b), _server_view, _client_view
    )
    assert server_result == (node_b.node_id, "TLSv1.3")
    assert client_result == (node_a.node_id, "TLSv1.3", b"k")


def test_tls_unpinned_dialler_is_refused(node_a: Identity, node_b: Identity) -> None:
    server_result, client_result = _run_tls(
        server_context(node_a), client_context(node_b), _server_view, _client_view
    )
    assert isinstance(server_result, ssl.SSLCertVerificationError), server_result
    assert isinstance(client_result, ssl.SSLError), client_result


def test_tls_pin_of_another_node_does_not_admit_the_dialler(
    tmp_path: Path, node_a: Identity, node_b: Identity
) -> None:
    listener_ctx = PinnedContexts(node_a).for_certificate(node_b.cert_der, node_b.node_id)
    stranger = create_identity(tmp_path)
    server_result, _ = _run_tls(listener_ctx, client_context(stranger), _server_view, _client_view)
    assert isinstance(server_result, ssl.SSLError), server_result


def test_tls_refuses_tls12_dialler(node_a: Identity, node_b: Identity) -> None:
    listener_ctx = PinnedContexts(node_a).for_certificate(node_b.cert_der, node_b.node_id)
    old_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old_client.check_hostname = False
    old_client.verify_mode = ssl.CERT_NONE
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    old_client.load_cert_chain(node_b.cert_path, node_b.key_path)
    server_result, client_result = _run_tls(listener_ctx, old_client, _server_view, _client_view)
    assert isinstance(server_result, ssl.SSLError), server_result
    assert isinstance(client_result, ssl.SSLError), client_result


def test_peer_node_id_rejects_peer_without_certificate(node_a: Identity) -> None:
    listener_ctx = server_context(node_a)
    listener_ctx.verify_mode = ssl.CERT_NONE  # do not ask the dialler for a certificate
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.verify_mode = ssl.CERT_NONE

    def server_then(tls: ssl.SSLSocket) -> object:
        try:
            return peer_node_id(tls)
        except HandshakeError as exc:
            return exc
        finally:
            tls.sendall(b"k")

    server_result, client_result = _run_tls(
        listener_ctx, anonymous, server_then, lambda tls: (peer_node_id(tls), tls.recv(1))
    )
    assert isinstance(server_result, HandshakeError)
    assert str(server_result) == "peer sent no certificate"
    assert client_result == (node_a.node_id, b"k")


def test_peer_node_id_rejects_unfinished_handshake(node_a: Identity) -> None:
    tls = client_context(node_a).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    with pytest.raises(HandshakeError) as info:
        peer_node_id(tls)
    assert str(info.value) == "tls handshake not complete: no peer certificate yet"


def test_contexts_are_tls13_only(node_a: Identity) -> None:
    server = server_context(node_a)
    client = client_context(node_a)
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.cert_store_stats()["x509"] == 0  # nothing trusted until pinned
    assert client.verify_mode == ssl.CERT_NONE
    assert client.check_hostname is False


def test_context_rejects_key_that_does_not_match_certificate(
    tmp_path: Path, node_b: Identity
) -> None:
    identity = create_identity(tmp_path)
    shutil.copyfile(node_b.key_path, identity.key_path)
    loaded = load_identity(tmp_path)  # the key is not parsed on load
    with pytest.raises(IdentityError) as info:
        server_context(loaded)
    assert str(info.value).startswith(
        f"cannot use key file {identity.key_path} with certificate {identity.cert_path}: "
    )


# -- pinned contexts -------------------------------------------------------------


def _cert_der(
    subject_key: Ed25519PublicKey,
    signer: Ed25519PrivateKey,
    *,
    common_name: str,
    ca: bool | None = False,
) -> bytes:
    """A certificate for ``subject_key`` signed by ``signer`` (``ca=None``: no constraints)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    utc = datetime.timezone.utc
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(1970, 1, 1, tzinfo=utc))
        .not_valid_after(datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=utc))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    return builder.sign(signer, None).public_bytes(serialization.Encoding.DER)


def _fresh_cert_der() -> tuple[bytes, str]:
    """A valid self-signed edgenode-style certificate and its node ID (no files)."""
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    node_id = node_id_from_public_key(raw)
    return _cert_der(key.public_key(), key, common_name=node_id), node_id


@pytest.mark.parametrize(
    ("same_name", "ca"),
    [(True, False), (True, True), (True, None), (False, False)],
    ids=["end-entity", "ca", "no-constraints", "other-name"],
)
def test_forged_certificate_cannot_lock_out_the_real_node(
    tmp_path: Path, node_a: Identity, node_b: Identity, same_name: bool, ca: bool | None
) -> None:
    # Regression: with one shared server context, a preamble carrying a
    # forged certificate with node C's public key got pinned as C's, and
    # C's real certificate was refused until the listener restarted.
    node_c = create_identity(tmp_path / "c")
    c_public = x509.load_der_x509_certificate(node_c.cert_der).public_key()
    assert isinstance(c_public, Ed25519PublicKey)
    forged = _cert_der(
        c_public,
        Ed25519PrivateKey.generate(),  # the attacker does not have C's key
        common_name=node_c.node_id if same_name else "forged",
        ca=ca,
    )
    assert forged != node_c.cert_der
    assert node_id_from_cert_der(forged) == node_c.node_id
    contexts = PinnedContexts(node_a)

    forged_ctx = contexts.for_certificate(forged, node_c.node_id)  # pinned first
    real_ctx = contexts.for_certificate(node_c.cert_der, node_c.node_id)

    assert real_ctx is not forged_ctx
    assert len(contexts) == 2
    assert real_ctx.cert_store_stats()["x509"] == 1
    server_result, client_result = _run_tls(
        real_ctx, client_context(node_c), _server_view, _client_view
    )
    assert server_result == (node_c.node_id, "TLSv1.3")
    assert client_result == (node_a.node_id, "TLSv1.3", b"k")
    # The forged certificate's context admits no one but C itself, if anyone.
    server_result, _ = _run_tls(forged_ctx, client_context(node_c), _server_view, _client_view)
    assert isinstance(server_result, ssl.SSLError) or server_result == (
        node_c.node_id,
        "TLSv1.3",
    ), server_result
    server_result, _ = _run_tls(forged_ctx, client_context(node_b), _server_view, _client_view)
    assert isinstance(server_result, ssl.SSLError), server_result


def test_pinned_contexts_trust_only_their_own_certificate(
    node_a: Identity, node_b: Identity
) -> None:
    contexts = PinnedContexts(node_a)
    b_ctx = contexts.for_certificate(node_b.cert_der, node_b.node_id)
    a_ctx = contexts.for_certificate(node_a.cert_der, node_a.node_id)
    assert b_ctx.cert_store_stats()["x509"] == 1
    assert a_ctx.cert_store_stats()["x509"] == 1
    server_result, _ = _run_tls(a_ctx, client_context(node_b), _server_view, _client_view)
    assert isinstance(server_result, ssl.SSLCertVerificationError), server_result
    server_result, _ = _run_tls(b_ctx, client_context(node_b), _server_view, _client_view)
    assert server_result == (node_b.node_id, "TLSv1.3")


def test_pinned_contexts_return_the_cached_context(node_a: Identity, node_b: Identity) -> None:
    contexts = PinnedContexts(node_a)
    assert len(contexts) == 0
    ctx = contexts.for_certificate(node_b.cert_der, node_b.node_id)
    assert contexts.for_certificate(node_b.cert_der, node_b.node_id) is ctx
    assert contexts.for_certificate(bytearray(node_b.cert_der), node_b.node_id) is ctx
    assert len(contexts) == 1
    assert ctx.cert_store_stats()["x509"] == 1
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    # Each PinnedContexts has its own cache.
    assert PinnedContexts(node_a).for_certificate(node_b.cert_der, node_b.node_id) is not ctx


def test_pinned_contexts_evict_the_least_recently_used(node_a: Identity) -> None:
    (c1, id1), (c2, id2), (c3, id3) = (_fresh_cert_der() for _ in range(3))
    contexts = PinnedContexts(node_a, max_entries=2)
    ctx1 = contexts.for_certificate(c1, id1)
    ctx2 = contexts.for_certificate(c2, id2)
    assert contexts.for_certificate(c1, id1) is ctx1  # c2 is now the least recent
    ctx3 = contexts.for_certificate(c3, id3)
    assert len(contexts) == 2
    assert contexts.for_certificate(c1, id1) is ctx1
    assert contexts.for_certificate(c3, id3) is ctx3
    new_ctx2 = contexts.for_certificate(c2, id2)  # rebuilt; evicts c1
    assert new_ctx2 is not ctx2
    assert new_ctx2.cert_store_stats()["x509"] == 1
    assert len(contexts) == 2
    assert contexts.for_certificate(c3, id3) is ctx3
    assert contexts.for_certificate(c1, id1) is not ctx1


def test_pinned_contexts_forget_evicted_contexts(node_a: Identity, node_b: Identity) -> None:
    contexts = PinnedContexts(node_a, max_entries=1)
    ref = weakref.ref(contexts.for_certificate(node_b.cert_der, node_b.node_id))
    contexts.for_certificate(node_a.cert_der, node_a.node_id)
    gc.collect()
    assert ref() is None
    assert len(contexts) == 1


def test_pinned_contexts_keep_an_evicted_context_usable(node_a: Identity, node_b: Identity) -> None:
    contexts = PinnedContexts(node_a, max_entries=1)
    b_ctx = contexts.for_certificate(node_b.cert_der, node_b.node_id)
    contexts.for_certificate(node_a.cert_der, node_a.node_id)  # evicts b_ctx
    server_result, _ = _run_tls(b_ctx, client_context(node_b), _server_view, _client_view)
    assert server_result == (node_b.node_id, "TLSv1.3")


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "64"])
def test_pinned_contexts_reject_bad_max_entries(node_a: Identity, bad: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        PinnedContexts(node_a, max_entries=bad)  # type: ignore[arg-type]
    assert str(info.value) == f"max_entries: expected an integer >= 1, got {bad!r}"


def test_pinned_contexts_reject_certificate_of_another_node(
    node_a: Identity, node_b: Identity
) -> None:
    contexts = PinnedContexts(node_a)
    with pytest.raises(IdentityError) as info:
        contexts.for_certificate(node_b.cert_der, node_a.node_id)
    assert type(info.value) is IdentityError
    assert str(info.value) == (
        f"certificate is of node {node_b.node_id}, not of node {node_a.node_id}"
    )
    assert len(contexts) == 0


def test_pinned_contexts_reject_malformed_certificate(node_a: Identity) -> None:
    contexts = PinnedContexts(node_a)
    with pytest.raises(IdentityError) as info:
        contexts.for_certificate(b"\x30\x00", node_a.node_id)
    assert type(info.value) is IdentityError
    assert str(info.value) == "certificate: expected tbsCertificate at offset 2, got end of data"
    assert len(contexts) == 0


def test_pinned_contexts_reject_certificate_ssl_cannot_load(node_a: Identity) -> None:
    # Our DER walker accepts this skeleton; OpenSSL does not.
    contexts = PinnedContexts(node_a)
    with pytest.raises(IdentityError) as info:
        contexts.for_certificate(_minimal_cert(), VECTOR_ID)
    assert type(info.value) is IdentityError
    message = str(info.value)
    assert message.startswith(f"cannot pin the certificate of node {VECTOR_ID}: "), message
    assert len(message) > len(f"cannot pin the certificate of node {VECTOR_ID}: ")
    assert "_ssl.c" not in message
    assert len(contexts) == 0
