"""A renewed Kafka client certificate is used without a restart: the SSL context the clients were
built with reloads the files when they change (``TlsMaterialReloader``), through a real TLS handshake
with a server that requires client certificates."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from enclave_common.kafka import TlsMaterialReloader, TlsMetrics, connection_options
from enclave_common.settings import BaseServiceSettings
from prometheus_client import CollectorRegistry

PEM = serialization.Encoding.PEM


def _issue(
    name: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    *,
    server: bool = False,
    days: int = 1,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (path / "user.crt").write_bytes(cert.public_bytes(PEM))
    (path / "user.key").write_bytes(
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


async def test_a_renewed_client_certificate_is_presented_after_a_reload_without_a_restart(
    tmp_path: Path,
) -> None:
    ca_cert, ca_key = _issue("enclave-clients-ca")
    ca = (ca_cert.subject, ca_key)
    (tmp_path / "ca.crt").write_bytes(ca_cert.public_bytes(PEM))
    server_cert, server_key = _issue("broker", ca, server=True)
    (tmp_path / "server").mkdir()
    _write(tmp_path / "server", server_cert, server_key)
    _write(tmp_path, *_issue("enclave-ingest-before", ca))

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.crt"))
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_cert_chain(tmp_path / "server" / "user.crt", tmp_path / "server" / "user.key")
    presented: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("ssl_object").getpeercert()
        presented.append(dict(item[0] for item in peer["subject"])["commonName"])
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    settings = BaseServiceSettings(
        service_name="tls-test",
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(tmp_path / "ca.crt"),
        kafka_ssl_certfile=str(tmp_path / "user.crt"),
        kafka_ssl_keyfile=str(tmp_path / "user.key"),
    )
    reloader = TlsMaterialReloader()
    context = connection_options(settings)["ssl_context"]
    reloader.watch(context, settings)

    async def connect() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        await asyncio.sleep(0.05)
        writer.close()

    async with server:
        await connect()
        assert reloader.check() == 0  # nothing changed: nothing reloaded
        _write(tmp_path, *_issue("enclave-ingest-renewed", ca))  # what Strimzi's renewal does
        await connect()  # not reloaded yet: the context still holds the first certificate
        assert reloader.check() == 1
        await connect()
    assert presented == ["enclave-ingest-before", "enclave-ingest-before", "enclave-ingest-renewed"]


def _settings(path: Path) -> BaseServiceSettings:
    return BaseServiceSettings(
        service_name="tls-test",
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(path / "ca.crt"),
        kafka_ssl_certfile=str(path / "user.crt"),
        kafka_ssl_keyfile=str(path / "user.key"),
    )


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(PEM) for cert in certs)


def test_the_metrics_show_the_certificate_in_use_its_expiry_and_failed_reloads(tmp_path: Path) -> None:
    ca_cert, ca_key = _issue("enclave-clients-ca")
    ca = (ca_cert.subject, ca_key)
    (tmp_path / "ca.crt").write_bytes(_pem(ca_cert))
    first, _ = before = _issue("enclave-ingest-before", ca, days=10)
    _write(tmp_path, *before)
    settings = _settings(tmp_path)
    reloader, registry = TlsMaterialReloader(), CollectorRegistry()
    TlsMetrics(reloader, registry)
    context = connection_options(settings)["ssl_context"]  # held: the reloader holds contexts weakly
    reloader.watch(context, settings)

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name)

    expiry = "enclave_kafka_tls_certificate_expiry_timestamp_seconds"
    failures = "enclave_kafka_tls_reload_failures_total"
    assert sample(expiry) == first.not_valid_after_utc.timestamp()
    assert sample(failures) == 0

    renewed, renewed_key = _issue("enclave-ingest-renewed", ca, days=40)
    (tmp_path / "user.crt").write_bytes(_pem(renewed))  # the key is not its pair yet
    assert reloader.check() == 0
    assert reloader.check() == 0  # retried each minute, counted each time
    assert sample(failures) == 2
    assert sample(expiry) == first.not_valid_after_utc.timestamp()  # still the one in use

    _write(tmp_path, renewed, renewed_key)
    assert reloader.check() == 1
    assert sample(expiry) == renewed.not_valid_after_utc.timestamp()
    assert sample(failures) == 2


async def test_a_ca_removed_from_the_ca_file_is_reported_as_still_trusted(tmp_path: Path) -> None:
    """An SSL context cannot forget a CA: the metric says a restart is needed, and the handshake
    below shows why (a server certificate of the retired CA is still accepted after the reload)."""
    retired_cert, retired_key = _issue("enclave-cluster-ca-old")
    current_cert, current_key = _issue("enclave-cluster-ca-new")
    (tmp_path / "ca.crt").write_bytes(_pem(retired_cert, current_cert))  # Strimzi's CA renewal
    _write(tmp_path, *_issue("enclave-ingest", (current_cert.subject, current_key)))
    settings = _settings(tmp_path)
    reloader, registry = TlsMaterialReloader(), CollectorRegistry()
    TlsMetrics(reloader, registry)
    context = connection_options(settings)["ssl_context"]
    reloader.watch(context, settings)
    assert registry.get_sample_value("enclave_kafka_tls_retired_ca_trusted") == 0

    (tmp_path / "ca.crt").write_bytes(_pem(current_cert))  # the old CA is retired
    assert reloader.check() == 1
    assert registry.get_sample_value("enclave_kafka_tls_retired_ca_trusted") == 1

    server_cert, server_key = _issue("broker", (retired_cert.subject, retired_key), server=True)
    (tmp_path / "server").mkdir()
    _write(tmp_path / "server", server_cert, server_key)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "server" / "user.crt", tmp_path / "server" / "user.key")

    async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    async with server:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1], ssl=context
        )
        writer.close()
