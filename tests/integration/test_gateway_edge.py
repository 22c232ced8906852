"""The gateway's edge on a second process: HTTPS with a self-signed certificate made here (TLS 1.0 and
1.1 refused by the server, 1.2 and 1.3 accepted), the per-principal rate limit (429 + Retry-After),
and signing-key rotation picked up from the JWKS file without a restart."""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import uuid
import warnings
from pathlib import Path

import httpx
import pytest
from enclave_common import topics
from enclave_common.auth.dev_issuer import DevIssuer

from .support import STATE, self_signed_certificate
from .test_gateway_support import TopicWatch, bearer, gateway_process, new_tenant

BURST = 4


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("gw-edge")
    cert, key = self_signed_certificate(tmp)
    jwks = tmp / "jwks.json"
    jwks.write_text((STATE / "keys" / "jwks.json").read_text())
    overrides = {
        "ENCLAVE_GATEWAY_TLS_CERT_FILE": str(cert),
        "ENCLAVE_GATEWAY_TLS_KEY_FILE": str(key),
        "ENCLAVE_GATEWAY_RATE_LIMIT_BURST": str(BURST),
        "ENCLAVE_GATEWAY_RATE_LIMIT_PER_SECOND": "0.2",
        "ENCLAVE_GATEWAY_OIDC_JWKS_FILE": str(jwks),
    }
    with gateway_process(tmp, overrides, tls=True) as gateway:
        gateway.cert = cert  # type: ignore[attr-defined]
        gateway.jwks = jwks  # type: ignore[attr-defined]
        yield gateway


def _client_context(cert: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that speaks only ``version``, with OpenSSL's security level lowered so that the client
    itself is willing to speak TLS 1.0/1.1: a refusal must then come from the server."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _handshake(port: int, context: ssl.SSLContext) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return str(tls.version())


def _permissive_server(cert: Path, key: Path) -> int:
    """A one-shot TLS server that accepts TLS 1.0+: shows the client really can speak old versions."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_context.minimum_version = ssl.TLSVersion.TLSv1
    server_context.set_ciphers("DEFAULT:@SECLEVEL=0")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        connection, _ = listener.accept()
        try:
            server_context.wrap_socket(connection, server_side=True).close()
        finally:
            listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"])
def test_tls_before_1_2_is_refused_by_the_gateway(edge, version):
    key = edge.cert.with_name("key.pem")
    context = _client_context(edge.cert, version)
    assert _handshake(_permissive_server(edge.cert, key), context).startswith("TLSv1")  # the client can
    with pytest.raises(ssl.SSLError) as refused:
        _handshake(edge.port, context)
    # The server refuses: with a protocol_version alert, or (asyncio's TLS under uvicorn) by closing the
    # connection during the handshake. Not the client: it completed this very handshake above.
    assert "ALERT_PROTOCOL_VERSION" in str(refused.value) or isinstance(refused.value, ssl.SSLEOFError)


@pytest.mark.parametrize(
    ("version", "name"), [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")]
)
def test_tls_1_2_and_1_3_are_accepted(edge, version, name):
    assert _handshake(edge.port, _client_context(edge.cert, version)) == name
    answer = httpx.get(f"{edge.url}/readyz", verify=_client_context(edge.cert, version))
    assert answer.status_code == 200


def test_plain_http_is_not_served_on_the_tls_port(edge):
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{edge.port}/readyz", timeout=5)


async def test_rate_limit_answers_429_with_retry_after_and_is_audited(edge):
    tenant = new_tenant("it-edge")
    headers = bearer(f"it-busy-{uuid.uuid4().hex[:6]}", tenant, "clinician")
    url = f"{edge.url}/api/v1/imaging/{uuid.uuid4()}"
    ids: list[str] = []
    async with TopicWatch(topics.ACCESS_RECORDED) as watch:
        async with httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=str(edge.cert)), timeout=30
        ) as client:
            statuses = []
            for _ in range(BURST + 2):
                ids.append(str(uuid.uuid4()))
                answer = await client.get(url, headers={**headers, "X-Request-ID": ids[-1]})
                statuses.append(answer.status_code)
            assert statuses == [404] * BURST + [429, 429]
            assert 1 <= int(answer.headers["retry-after"]) <= 10
            assert answer.json()["detail"]["code"] == "rate_limited"
            other = await client.get(url, headers=bearer("it-calm", tenant, "clinician"))
            assert other.status_code == 404  # the limit is per principal
        events = await watch.read(lambda env: env.correlation_id in ids)
    limited = [e for e in events if e.data["status_code"] == 429]
    assert len(limited) == 2 and all(e.data["detail"] == "rate_limited" for e in limited)


async def test_jwks_rotation_is_picked_up_without_restart(edge):
    tenant = new_tenant("it-edge")
    published = json.loads(edge.jwks.read_text())
    rotated = DevIssuer.generate(["ES256"])
    url = f"{edge.url}/api/v1/imaging/{uuid.uuid4()}"

    def token_headers(dev: DevIssuer | None) -> dict[str, str]:
        subject = f"it-rot-{uuid.uuid4().hex[:6]}"  # a fresh principal per request: no rate limit here
        if dev is None:
            return bearer(subject, tenant, "clinician")
        return {"Authorization": f"Bearer {dev.mint(subject=subject, tenant=tenant, roles=['clinician'])}"}

    def replace_jwks(keys: list[dict[str, object]]) -> None:
        staging = edge.jwks.with_suffix(".new")
        staging.write_text(json.dumps({"keys": keys}))
        os.replace(staging, edge.jwks)

    async with httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=str(edge.cert)), timeout=30
    ) as client:
        assert (await client.get(url, headers=token_headers(None))).status_code == 404
        refused = await client.get(url, headers=token_headers(rotated))
        assert refused.status_code == 401 and refused.json()["detail"]["code"] == "unknown_kid"
        try:
            replace_jwks(published["keys"] + rotated.jwks()["keys"])  # the IdP publishes its new key
            assert (await client.get(url, headers=token_headers(rotated))).status_code == 404
            assert (await client.get(url, headers=token_headers(None))).status_code == 404
            replace_jwks(rotated.jwks()["keys"])  # ... and retires the old ones
            retired = await client.get(url, headers=token_headers(None))
            assert retired.status_code == 401 and retired.json()["detail"]["code"] == "unknown_kid"
            assert (await client.get(url, headers=token_headers(rotated))).status_code == 404
        finally:
            replace_jwks(published["keys"])
