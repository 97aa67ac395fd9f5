"""Real brokers for the uplink's tests: Mosquitto (and nats-server) on loopback ports,
with a password file and TLS certificates made here, stopped by PID.

A machine without the broker skips these tests with the reason, except in
CI (``CI`` set), where .ci/run installs the brokers and a missing one fails.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgenode.config import NodeConfig
from edgenode.uplink.brokers import Mosquitto, NatsServer, find_program
from edgenode.uplink.config import UplinkConfig

USERS = {"site-a": "password-a", "site-b": "password-b"}


def need(program: str, package: str) -> None:
    if find_program(program) is None:
        message = f"{program} is not installed (apt-get install {package}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class Certs:
    """A CA, a broker certificate it signs (127.0.0.1 and localhost), a client
    certificate it signs, and a second CA that signs nothing of ours."""

    def __init__(self, root: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        root.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)

        def name(text: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

        def key_file(key: Any, path: Path) -> Path:
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            path.chmod(0o600)
            return path

        def make(
            subject: str, issuer: Any, issuer_key: Any, key: Any, ca: bool, sans: list[Any]
        ) -> Any:
            builder = (
                x509.CertificateBuilder()
                .subject_name(name(subject))
                .issuer_name(issuer)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            )
            # Python 3.13's default context is X.509-strict: key identifiers required.
            builder = builder.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            ).add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
            if ca:
                usage = dict.fromkeys(
                    (
                        "content_commitment",
                        "key_encipherment",
                        "data_encipherment",
                        "key_agreement",
                        "encipher_only",
                        "decipher_only",
                        "digital_signature",
                    ),
                    False,
                )
                builder = builder.add_extension(
                    x509.KeyUsage(key_cert_sign=True, crl_sign=True, **usage), critical=True
                )
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            return builder.sign(issuer_key, hashes.SHA256())

        def cert_file(cert: Any, path: Path) -> Path:
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            return path

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = make("edgenode test ca", name("edgenode test ca"), ca_key, ca_key, True, [])
        self.ca = cert_file(ca, root / "ca.pem")
        server_key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        self.server_cert = cert_file(
            make("broker", ca.subject, ca_key, server_key, False, sans), root / "broker.pem"
        )
        self.server_key = key_file(server_key, root / "broker.key")
        client_key = ec.generate_private_key(ec.SECP256R1())
        self.client_cert = cert_file(
            make("site-a", ca.subject, ca_key, client_key, False, []), root / "client.pem"
        )
        self.client_key = key_file(client_key, root / "client.key")
        other_key = ec.generate_private_key(ec.SECP256R1())
        other = make("someone else's ca", name("someone else's ca"), other_key, other_key, True, [])
        self.other_ca = cert_file(other, root / "other-ca.pem")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("uplink-certs"))


@pytest.fixture
def mosquitto(tmp_path: Path, certs: Certs) -> Iterator[Mosquitto]:
    """Mosquitto with password authentication: plain, TLS and TLS + client certificate listeners."""
    need("mosquitto", "mosquitto")
    broker = Mosquitto(
        tmp_path / "mosquitto",
        users=USERS,
        tls=(certs.ca, certs.server_cert, certs.server_key),
    )
    broker.start()
    yield broker
    broker.close()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    need("nats-server", "nats-server")
    broker = NatsServer(tmp_path / "nats")
    broker.start()
    yield broker
    broker.close()


def fast_uplink(url: str, user: str | None = "site-a", **changes: Any) -> UplinkConfig:
    """An uplink with test timings (reconnects within half a second)."""
    settings: dict[str, Any] = dict(
        broker=url,
        username=user,
        password=USERS[user] if user else None,
        reconnect_base_s=0.05,
        reconnect_cap_s=0.5,
        connect_timeout_s=5.0,
        keepalive_s=5,
    )
    settings.update(changes)
    return UplinkConfig(**settings)


@pytest.fixture
def uplink_config(make_config: Callable[..., NodeConfig]) -> Callable[..., NodeConfig]:
    """``uplink_config(name, ip, uplink, **node_overrides)`` -> a NodeConfig with that uplink."""

    def make(name: str, ip: str, uplink: UplinkConfig, **overrides: Any) -> NodeConfig:
        return make_config(name, ip, uplink=uplink, **overrides)

    return make
