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
from enclave_common.kafka import TlsMaterialReloader, connection_options
from enclave_common.settings import BaseServiceSettings

PEM = serialization.Encoding.PEM


def _issue(
    name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None, *, server: bool = False
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
        .not_valid_after(now + dt.timedelta(days=1))
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
