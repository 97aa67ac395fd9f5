"""A node's identity: its Ed25519 key, its certificate, its node ID.

A node is known by its *node ID*, a short checksummed text form of the
SHA-256 of its raw Ed25519 public key (``abcd-efgh-ijkl-mnop-qrst-uvwx-cccc``).
The key and a self-signed certificate live in the node's state directory
(``node.key``, owner-only, and ``node.crt``) next to the list of node IDs
this node accepts (``authorised_nodes``, read and written by
:mod:`edgenode.trust`).

Only :func:`create_identity` uses ``cryptography``, and imports it when
called: a running node never loads it (it costs about 11 MB of RSS on a
Pi). Everything else here uses the standard library. The node ID of a
certificate comes from a small DER walker. The TLS contexts made from an
identity, and how mutual TLS 1.3 works with them, are in
:mod:`edgenode.tls`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import stat
from pathlib import Path

from .errors import IdentityError, InsecureKeyFile, InvalidNodeId, hexdump
from .proto.preamble import MAX_CERT_BYTES

__all__ = [
    "AUTHORISED_FILENAME",
    "CERT_FILENAME",
    "KEY_FILENAME",
    "MAX_CERT_BYTES",
    "Identity",
    "create_identity",
    "load_identity",
    "load_or_create_identity",
    "node_id_from_cert_der",
    "node_id_from_public_key",
    "parse_node_id",
    "public_key_from_cert_der",
    "write_atomic",
]

KEY_FILENAME = "node.key"
CERT_FILENAME = "node.crt"
AUTHORISED_FILENAME = "authorised_nodes"

#: Largest certificate accepted, in DER bytes (an edgenode one is ~300).
# A PEM file is 4/3 of its DER plus line breaks and armour.
_MAX_CERT_FILE_BYTES = 8192
_MAX_KEY_FILE_BYTES = 8192

_PEM_CERT_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_KEY_BEGIN = b"-----BEGIN PRIVATE KEY-----"
_PEM_KEY_END = b"-----END PRIVATE KEY-----"
_PEM_ENCRYPTED_KEY_BEGIN = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"

# -- node IDs ---------------------------------------------------------------

_ID_BODY_BYTES = 15  # 24 base32 characters
_ID_BODY_CHARS = 24
_ID_CHECK_CHARS = 4
_ID_CHARS = _ID_BODY_CHARS + _ID_CHECK_CHARS
_ID_GROUP = 4
_ID_CHECK_DOMAIN = b"edgenode node id"
_BASE32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_SHOW_CHARS = 40
_ED25519_KEY_BYTES = 32


def _shown(text: str) -> str:
    """Quote user text for a message, truncated to about 40 characters."""
    if len(text) > _SHOW_CHARS:
        return repr(text[:_SHOW_CHARS] + "...")
    return repr(text)


def _id_check(body_bytes: bytes) -> str:
    digest = hashlib.sha256(_ID_CHECK_DOMAIN + body_bytes).digest()
    return base64.b32encode(digest[:5]).decode("ascii").lower()[:_ID_CHECK_CHARS]


def _group(chars: str) -> str:
    return "-".join(chars[i : i + _ID_GROUP] for i in range(0, len(chars), _ID_GROUP))


def node_id_from_public_key(raw: bytes) -> str:
    """Return the node ID of a raw 32-byte Ed25519 public key.

    Raises :class:`IdentityError` if ``raw`` is not 32 bytes.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise IdentityError(f"ed25519 public key should be bytes, got {type(raw).__name__}")
    if len(raw) != _ED25519_KEY_BYTES:
        raise IdentityError(
            f"ed25519 public key should be {_ED25519_KEY_BYTES} bytes, got {len(raw)}"
        )
    body_bytes = hashlib.sha256(bytes(raw)).digest()[:_ID_BODY_BYTES]
    body = base64.b32encode(body_bytes).decode("ascii").lower()
    return _group(body + _id_check(body_bytes))


def parse_node_id(text: str) -> str:
    """Return the canonical form of a node ID typed by a person.

    Accepts any case, surrounding whitespace and dashes anywhere. Raises
    :class:`InvalidNodeId` for a wrong length, a character outside base32
    or a bad checksum.
    """
    if not isinstance(text, str):
        raise InvalidNodeId(f"node id should be text, got {type(text).__name__}")
    chars = text.strip().replace("-", "").lower()
    if len(chars) != _ID_CHARS:
        raise InvalidNodeId(
            f"node id {_shown(text.strip())} should be {_ID_CHARS} base32 characters "
            f"(dashes optional), got {len(chars)}"
        )
    for ch in chars:
        if ch not in _BASE32_ALPHABET:
            raise InvalidNodeId(
                f"node id {_shown(text.strip())} has {ch!r}, which is not a base32 "
                "character (a-z, 2-7)"
            )
    body, check = chars[:_ID_BODY_CHARS], chars[_ID_BODY_CHARS:]
    body_bytes = base64.b32decode(body.upper())
    if _id_check(body_bytes) != check:
        raise InvalidNodeId(f"node id {_shown(text.strip())} has a bad checksum (mistyped?)")
    return _group(chars)


# -- a minimal DER walker ---------------------------------------------------

_TAG_INTEGER = 0x02
_TAG_BIT_STRING = 0x03
_TAG_OID = 0x06
_TAG_SEQUENCE = 0x30
_TAG_VERSION = 0xA0  # [0] EXPLICIT, constructed
_ED25519_ALGORITHM = b"\x06\x03\x2b\x65\x70"  # SEQUENCE content: OID 1.3.101.112
_ED25519_OID = "1.3.101.112"
_KNOWN_KEY_OIDS = {
    "1.2.840.10045.2.1": "ec",
    "1.2.840.113549.1.1.1": "rsa",
    "1.3.101.110": "x25519",
    "1.3.101.111": "x448",
    "1.3.101.113": "ed448",
}


def _der_error(message: str) -> IdentityError:
    return IdentityError(f"certificate: {message}")


def _read_tlv(der: bytes, pos: int, end: int, tag: int, what: str) -> tuple[int, int]:
    """Read one DER element with ``tag`` at ``pos``; return its content span.

    Only definite lengths of up to two bytes, in their shortest form, are
    accepted (DER; a certificate is capped at 4096 bytes anyway).
    """
    if pos >= end:
        raise _der_error(f"expected {what} at offset {pos}, got end of data")
    if der[pos] != tag:
        raise _der_error(
            f"expected {what} (tag 0x{tag:02x}) at offset {pos}, "
            f"got tag 0x{der[pos]:02x}: {hexdump(der[pos:end], 8)}"
        )
    if pos + 1 >= end:
        raise _der_error(f"expected the length of {what} at offset {pos + 1}, got end of data")
    first = der[pos + 1]
    if first < 0x80:
        length, start = first, pos + 2
    elif first in (0x81, 0x82):
        n = first - 0x80
        if pos + 2 + n > end:
            raise _der_error(
                f"expected the {n}-byte length of {what} at offset {pos + 2}, got end of data"
            )
        length = int.from_bytes(der[pos + 2 : pos + 2 + n], "big")
        start = pos + 2 + n
        if length < (0x80 if n == 1 else 0x100):
            raise _der_error(
                f"expected the shortest length form for {what} at offset {pos + 1}, "
                f"got {hexdump(der[pos + 1 : start])}"
            )
    else:
        raise _der_error(
            f"expected a definite length of at most 2 bytes for {what} at offset {pos + 1}, "
            f"got 0x{first:02x}"
        )
    if length > end - start:
        raise _der_error(
            f"expected {what} at offset {pos} to fit its {length} bytes, "
            f"got only {end - start} bytes before the end of its container"
        )
    return start, start + length


def _describe_algorithm(content: bytes) -> str:
    """Describe an AlgorithmIdentifier's content for an error message."""
    if not content:
        return "an empty algorithm identifier"
    if len(content) >= 2 and content[0] == _TAG_OID and content[1] < 0x80:
        oid_bytes = content[2 : 2 + content[1]]
        if len(oid_bytes) == content[1] and oid_bytes and oid_bytes[-1] < 0x80:
            arcs = []
            value = 0
            for byte in oid_bytes:
                value = (value << 7) | (byte & 0x7F)
                if not byte & 0x80:
                    arcs.append(value)
                    value = 0
            first = min(arcs[0] // 40, 2)
            dotted = ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])
            name = _KNOWN_KEY_OIDS.get(dotted)
            return f"oid {dotted} ({name})" if name else f"oid {dotted}"
    return hexdump(content)


def public_key_from_cert_der(der: bytes) -> bytes:
    """Return the raw 32-byte Ed25519 public key of a DER certificate.

    Walks Certificate -> tbsCertificate -> subjectPublicKeyInfo without
    checking any signature. Raises :class:`IdentityError` for anything that
    is not a well-formed certificate of at most ``MAX_CERT_BYTES`` (the
    preamble's limit, edgenode.proto.preamble) holding an Ed25519 key.
    """
    if not isinstance(der, (bytes, bytearray, memoryview)):
        raise _der_error(f"expected bytes, got {type(der).__name__}")
    der = bytes(der)
    n = len(der)
    if n > MAX_CERT_BYTES:
        raise _der_error(f"{n} bytes exceeds the {MAX_CERT_BYTES}-byte limit")
    cert_start, cert_end = _read_tlv(der, 0, n, _TAG_SEQUENCE, "a certificate sequence")
    if cert_end != n:
        raise _der_error(
            f"expected end of data at offset {cert_end}, got {n - cert_end} more bytes: "
            f"{hexdump(der[cert_end:])}"
        )
    tbs_start, tbs_end = _read_tlv(der, cert_start, cert_end, _TAG_SEQUENCE, "tbsCertificate")
    pos = tbs_start
    if pos < tbs_end and der[pos] == _TAG_VERSION:
        pos = _read_tlv(der, pos, tbs_end, _TAG_VERSION, "version")[1]
    pos = _read_tlv(der, pos, tbs_end, _TAG_INTEGER, "serialNumber")[1]
    pos = _read_tlv(der, pos, tbs_end, _TAG_SEQUENCE, "signature algorithm")[1]
    pos = _read_tlv(der, pos, tbs_end, _TAG_SEQUENCE, "issuer")[1]
    pos = _read_tlv(der, pos, tbs_end, _TAG_SEQUENCE, "validity")[1]
    pos = _read_tlv(der, pos, tbs_end, _TAG_SEQUENCE, "subject")[1]
    spki_start, spki_end = _read_tlv(der, pos, tbs_end, _TAG_SEQUENCE, "subjectPublicKeyInfo")
    alg_start, alg_end = _read_tlv(der, spki_start, spki_end, _TAG_SEQUENCE, "public key algorithm")
    if der[alg_start:alg_end] != _ED25519_ALGORITHM:
        raise _der_error(
            f"expected an ed25519 key (oid {_ED25519_OID}) at offset {alg_start}, "
            f"got {_describe_algorithm(der[alg_start:alg_end])}"
        )
    key_start, key_end = _read_tlv(der, alg_end, spki_end, _TAG_BIT_STRING, "public key")
    if key_end - key_start != 1 + _ED25519_KEY_BYTES:
        raise _der_error(
            f"expected a {1 + _ED25519_KEY_BYTES}-byte public key bit string at offset "
            f"{key_start}, got {key_end - key_start} bytes"
        )
    if der[key_start] != 0:
        raise _der_error(
            f"expected 0 unused bits in the public key at offset {key_start}, got {der[key_start]}"
        )
    if key_end != spki_end:
        raise _der_error(
            f"expected the end of subjectPublicKeyInfo at offset {key_end}, "
            f"got {hexdump(der[key_end:spki_end])}"
        )
    # The outer signatureAlgorithm and signatureValue must follow, and end it.
    pos = _read_tlv(der, tbs_end, cert_end, _TAG_SEQUENCE, "signatureAlgorithm")[1]
    pos = _read_tlv(der, pos, cert_end, _TAG_BIT_STRING, "signatureValue")[1]
    if pos != cert_end:
        raise _der_error(
            f"expected the end of the certificate at offset {pos}, got {hexdump(der[pos:cert_end])}"
        )
    return der[key_start + 1 : key_end]


def node_id_from_cert_der(der: bytes) -> str:
    """Return the node ID of a DER certificate's Ed25519 key.

    Raises :class:`IdentityError` as :func:`public_key_from_cert_der` does.
    """
    return node_id_from_public_key(public_key_from_cert_der(der))


# -- the identity files -----------------------------------------------------


class Identity:
    """A node's certificate and the paths of its key and certificate files.

    Holds no key material: TLS contexts read the key file themselves.
    """

    __slots__ = ("cert_der", "cert_path", "key_path", "node_id", "state_dir")

    def __init__(
        self, node_id: str, state_dir: Path, cert_path: Path, key_path: Path, cert_der: bytes
    ) -> None:
        self.node_id = node_id
        self.state_dir = state_dir
        self.cert_path = cert_path
        self.key_path = key_path
        self.cert_der = cert_der

    def __repr__(self) -> str:
        return (
            f"Identity(node_id={self.node_id!r}, cert_path='{self.cert_path}', "
            f"key_path='{self.key_path}')"
        )


def _keygen_hint(state_dir: Path, *, force: bool = False) -> str:
    flag = " --force" if force else ""
    return f"edgenode keygen{flag} --state-dir {shlex.quote(str(state_dir))}"


def _fsync_dir(path: Path) -> None:
    # Without it, a power cut on an SD card can lose the rename.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` via a temp file and a rename.

    The temp file is created with O_EXCL and ``mode`` from the start, so a
    private key is never readable by others, not even for a moment.
    """
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits off
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _check_state_dir(state: Path) -> None:
    """Refuse a state directory that others can write in.

    Whoever can write in it can replace the node's key, certificate or
    authorised nodes, and so decide who the node is and whom it trusts.
    Reading is another matter: the key file itself must be owner-only
    (:func:`_check_key_file`), and the rest (certificate, node IDs, known
    peers) is not secret, so a 0755 directory is accepted, as ssh accepts
    a readable ``~/.ssh``; 0700 is what the node creates and recommends.
    Raises :class:`InsecureKeyFile`, or :class:`IdentityError` if the
    directory cannot be examined.
    """
    try:
        st = os.stat(state)
    except OSError as exc:
        raise IdentityError(f"cannot read state directory {state}: {exc.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise InsecureKeyFile(
            f"state directory {state} is writable by others (mode {mode:04o}): they could "
            f"replace this node's key or authorised nodes; run: chmod 700 {shlex.quote(str(state))}"
        )


class IdentityExists(IdentityError):
    """A state directory already holds an identity, and replacing it was not asked for."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        #: What is there: ``identity <node id>``, or the files of a broken one.
        self.what = what


def _existing_identity_error(state_dir: Path, key_path: Path, cert_path: Path) -> IdentityError:
    try:
        node_id = _read_cert(cert_path)[1]
        what = f"identity {node_id}"
    except IdentityError:
        present = [p.name for p in (key_path, cert_path) if os.path.lexists(p)]
        what = "an identity (" + " and ".join(present) + ")"
    # The command line words its own hint (edgenode keygen --force).
    return IdentityExists(
        f"state directory {state_dir} already holds {what}; pass overwrite=True to replace it",
        what,
    )


def create_identity(state_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Identity:
    """Generate a new key and self-signed certificate in ``state_dir``.

    Creates the directory (mode 0700) if missing, and writes ``node.key``
    (unencrypted PKCS#8 PEM, mode 0600) and ``node.crt`` (PEM, mode 0644),
    each atomically. Imports ``cryptography``. Raises
    :class:`IdentityExists` (an :class:`IdentityError`) if an identity is
    already there and ``overwrite`` is false, :class:`IdentityError` if the
    files cannot be written, and
    :class:`InsecureKeyFile` if the directory exists and others can write in it.
    """
    state = Path(state_dir)
    key_path = state / KEY_FILENAME
    cert_path = state / CERT_FILENAME
    try:
        if not state.exists():
            state.mkdir(mode=0o700, parents=True)
            os.chmod(state, 0o700)  # the umask may have taken bits off
        elif not state.is_dir():
            raise IdentityError(f"state directory {state} is not a directory")
    except OSError as exc:
        raise IdentityError(f"cannot create state directory {state}: {exc.strerror}") from None
    _check_state_dir(state)
    if not overwrite and (os.path.lexists(key_path) or os.path.lexists(cert_path)):
        raise _existing_identity_error(state, key_path, cert_path)

    key_pem, cert_pem = _generate_key_and_cert()
    try:
        # Key first: if we die between the two renames, the TLS contexts
        # report a key/certificate mismatch rather than use a stale key.
        write_atomic(key_path, key_pem, 0o600)
        write_atomic(cert_path, cert_pem, 0o644)
    except OSError as exc:
        raise IdentityError(
            f"cannot write identity in {state}: {exc.strerror} ({exc.filename})"
        ) from None
    return load_identity(state)


def _generate_key_and_cert() -> tuple[bytes, bytes]:
    """Return (PKCS#8 PEM key, PEM certificate) of a new Ed25519 identity."""
    # Imported here, and only here: a running node must not load cryptography.
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import NameOID

    key = Ed25519PrivateKey.generate()
    raw_public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id_from_public_key(raw_public))])
    utc = datetime.timezone.utc
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Boards without a real-time clock boot in 1970: a certificate that
        # is not valid yet would lock them out until NTP answers.
        .not_valid_before(datetime.datetime(1970, 1, 1, tzinfo=utc))
        # RFC 5280 4.1.2.5: 99991231235959Z means "no expiration date".
        .not_valid_after(datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise IdentityError(f"{what} {path} is larger than the {limit}-byte limit")
    return data


def _read_cert(cert_path: Path) -> tuple[bytes, str]:
    """Return (DER, node ID) of a PEM certificate file."""
    import ssl

    pem = _read_capped(cert_path, _MAX_CERT_FILE_BYTES, "certificate file")
    try:
        text = pem.decode("ascii").strip()
        der = ssl.PEM_cert_to_DER_cert(text)
    except ValueError:  # also UnicodeDecodeError and binascii.Error
        raise IdentityError(
            f"certificate file {cert_path} is not a PEM certificate "
            f"(expected a single '{_PEM_CERT_BEGIN}' block)"
        ) from None
    try:
        node_id = node_id_from_cert_der(der)
    except IdentityError as exc:
        raise IdentityError(f"{cert_path}: {exc}") from None
    return der, node_id


def _check_key_file(key_path: Path) -> None:
    """Check the key file is owner-only and holds a PEM private key.

    Opens the file before checking its mode, so the mode checked is the
    mode of the file read. Never puts key bytes in a message.
    """
    try:
        fd = os.open(key_path, os.O_RDONLY)
    except OSError as exc:
        raise IdentityError(f"cannot read key file {key_path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"key file {key_path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise InsecureKeyFile(
                f"key file {key_path} is readable by others (mode {mode:04o}); "
                f"run: chmod 600 {shlex.quote(str(key_path))}"
            )
        head = f.read(_MAX_KEY_FILE_BYTES + 1)
    if len(head) > _MAX_KEY_FILE_BYTES:
        raise IdentityError(
            f"key file {key_path} is larger than the {_MAX_KEY_FILE_BYTES}-byte limit"
        )
    head = head.strip()
    if head.startswith(_PEM_ENCRYPTED_KEY_BEGIN):
        raise IdentityError(
            f"key file {key_path} is encrypted; edgenode needs an unencrypted PKCS#8 key"
        )
    if not (head.startswith(_PEM_KEY_BEGIN) and head.endswith(_PEM_KEY_END)):
        raise IdentityError(
            f"key file {key_path} is not a PEM private key "
            f"(expected a '{_PEM_KEY_BEGIN.decode()}' block)"
        )


def load_identity(state_dir: str | os.PathLike[str]) -> Identity:
    """Load the identity in ``state_dir`` without importing cryptography.

    Raises :class:`InsecureKeyFile` if others can write in the state
    directory or the key file has any group or other permission bits, and
    :class:`IdentityError` if a file is missing, unreadable or malformed.
    The key is not parsed here; TLS contexts check that it matches the
    certificate.
    """
    state = Path(state_dir)
    key_path = state / KEY_FILENAME
    cert_path = state / CERT_FILENAME
    key_exists = os.path.lexists(key_path)
    cert_exists = os.path.lexists(cert_path)
    if not key_exists and not cert_exists:
        raise IdentityError(
            f"no identity in {state}: {key_path} not found; create one with: {_keygen_hint(state)}"
        )
    if not key_exists:
        raise IdentityError(
            f"key file {key_path} not found (the certificate is there); restore it, "
            f"or make a new identity (a new node id) with: {_keygen_hint(state, force=True)}"
        )
    if not cert_exists:
        raise IdentityError(
            f"certificate file {cert_path} not found (the key is there); restore it, "
            f"or make a new identity (a new node id) with: {_keygen_hint(state, force=True)}"
        )
    _check_state_dir(state)
    _check_key_file(key_path)
    der, node_id = _read_cert(cert_path)
    return Identity(node_id, state, cert_path, key_path, der)


def load_or_create_identity(state_dir: str | os.PathLike[str]) -> Identity:
    """Load the identity in ``state_dir``, creating one if neither file exists.

    A state directory holding only one of the two files is an error
    (:class:`IdentityError`), not a reason to make a new node ID.
    """
    state = Path(state_dir)
    if not os.path.lexists(state / KEY_FILENAME) and not os.path.lexists(state / CERT_FILENAME):
        return create_identity(state)
    return load_identity(state)
