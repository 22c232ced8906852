"""Every Kafka client, the operator tools' included (scripts/dlq.py), reaches the cluster the same way:
PLAINTEXT locally, TLS 1.2+ with the configured CA when ENCLAVE_KAFKA_SECURITY_PROTOCOL says so."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from enclave_common.kafka import connection_options
from enclave_common.settings import BaseServiceSettings


def _ca_file(tmp_path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_plaintext_has_no_tls() -> None:
    options = connection_options(BaseServiceSettings(kafka_bootstrap_servers="k:9092"))
    assert options == {"bootstrap_servers": "k:9092", "security_protocol": "PLAINTEXT", "ssl_context": None}


def test_ssl_uses_the_configured_ca_and_tls_1_2_at_least(tmp_path: Path) -> None:
    options = connection_options(
        BaseServiceSettings(
            kafka_bootstrap_servers="k:9093",
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=str(_ca_file(tmp_path)),
        )
    )
    context = options["ssl_context"]
    assert options["security_protocol"] == "SSL"
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "test-ca"),),)]
