"""An object store whose TLS certificate a private CA signs (an on-premises S3: MinIO, Ceph, a
storage appliance), on a second, real MinIO serving HTTPS with a certificate made here:
``ENCLAVE_<SERVICE>_S3_CA_BUNDLE`` makes it trusted; without it a service refuses to start with one
``cannot start`` line naming the TLS failure, and a call that fails so is retried, never
dead-lettered (fixed outside the event)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from enclave_common.errors import TransientError, classify_exception, startup_failure
from enclave_common.settings import BaseServiceSettings
from enclave_common.storage import S3ObjectStore

from .support import ROOT, dev_env, self_signed_certificate

USER, PASSWORD = "it-tls-user", "it-tls-password"


@dataclass(frozen=True)
class TlsObjectStore:
    endpoint: str
    ca_bundle: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tls_minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsObjectStore]:
    """The stack's MinIO binary serving HTTPS on a port of its own (``--certs-dir``)."""
    binary = subprocess.run(
        ["bash", "-c", '. scripts/stack/common.sh && printf %s "$MINIO_BIN"'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    home = tmp_path_factory.mktemp("tls-minio")
    certs = home / "certs"
    certs.mkdir()
    cert, key = self_signed_certificate(home)
    shutil.copy(cert, certs / "public.crt")
    shutil.copy(key, certs / "private.key")
    port = _free_port()
    env = {
        **os.environ,
        "MINIO_ROOT_USER": USER,
        "MINIO_ROOT_PASSWORD": PASSWORD,
        # Default bucket encryption (SSE-S3), which a service turns on, needs a KMS key.
        "MINIO_KMS_SECRET_KEY": "it-tls:" + base64.b64encode(os.urandom(32)).decode(),
        "MINIO_BROWSER": "off",
        "MINIO_UPDATE": "off",
    }
    with open(home / "minio.log", "wb") as log:
        server = subprocess.Popen(
            [binary, "server", str(home / "data"), "--address", f"127.0.0.1:{port}"]
            + ["--console-address", f"127.0.0.1:{_free_port()}", "--certs-dir", str(certs), "--quiet"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"https://127.0.0.1:{port}"
    trusting = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/minio/health/live", context=trusting, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"MinIO with TLS did not start: {(home / 'minio.log').read_text()[-2000:]}")
            time.sleep(0.2)
    try:
        yield TlsObjectStore(endpoint, cert)
    finally:
        server.terminate()
        server.wait(timeout=30)


def settings(store: TlsObjectStore, *, trusted: bool) -> BaseServiceSettings:
    return BaseServiceSettings(
        service_name="it-tls",
        s3_endpoint_url=store.endpoint,
        s3_access_key_id=USER,
        s3_secret_access_key=PASSWORD,
        s3_ca_bundle=str(store.ca_bundle) if trusted else None,
    )


async def test_with_the_ca_bundle_a_service_uses_an_object_store_with_a_private_ca(tls_minio, unique):
    store = S3ObjectStore(settings(tls_minio, trusted=True))
    bucket = f"it-tls-{unique}"
    await store.ensure_bucket(bucket)
    await store.put(bucket, "k/1", io.BytesIO(b"ciphertext"))
    assert await store.read(bucket, "k/1") == b"ciphertext"


async def test_without_it_the_failure_is_named_and_retried_not_dead_lettered(tls_minio, unique):
    store = S3ObjectStore(settings(tls_minio, trusted=False))
    with pytest.raises(Exception) as refused:
        await store.ensure_bucket(f"it-tls-{unique}")
    assert isinstance(classify_exception(refused.value), TransientError)
    assert startup_failure(refused.value) == (
        "TLS with the object store failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
        "failed: self-signed certificate (an object store whose certificate a private CA signs: "
        "ENCLAVE_<SERVICE>_S3_CA_BUNDLE)"
    )


async def test_a_service_without_the_ca_bundle_refuses_to_start_saying_why(tls_minio, unique):
    """The real ``enclave-ingest``: its bucket check fails before it consumes anything."""
    started = await asyncio.to_thread(
        subprocess.run,
        [str(ROOT / ".venv/bin/enclave-ingest")],
        env={
            **os.environ,
            **dev_env(),
            "ENCLAVE_INGEST_SERVICE_NAME": f"ingest_tls_{unique}",
            "ENCLAVE_INGEST_HTTP_PORT": str(_free_port()),
            "ENCLAVE_S3_ENDPOINT_URL": tls_minio.endpoint,
            "ENCLAVE_S3_ACCESS_KEY_ID": USER,
            "ENCLAVE_S3_SECRET_ACCESS_KEY": PASSWORD,
            "ENCLAVE_INGEST_ORIGINALS_BUCKET": f"it-tls-originals-{unique}",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = started.stdout + started.stderr
    assert started.returncode != 0, output[-2000:]
    [line] = [line for line in output.splitlines() if '"cannot start"' in line]
    assert "TLS with the object store failed: [SSL: CERTIFICATE_VERIFY_FAILED]" in line, line
    assert "S3_CA_BUNDLE" in line
