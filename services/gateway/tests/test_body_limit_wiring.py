"""The gateway's JSON routes are under the common body limit; its upload routes, which stream their
bodies under limits and a pace rule of their own, are not (a 64 KiB cap there would refuse every
instance)."""

from __future__ import annotations

import base64
import socket
from contextlib import contextmanager

import pytest
from enclave_gateway.config import GatewaySettings
from enclave_gateway.linger import LingeringAnswer
from enclave_gateway.main import UPLOAD_ROUTES, create_app
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from test_linger import _read_until_closed, _serve

BODY = b'{"patient_id": "PHI-MRN-80817-QX", "pad": "' + b"x" * 100_000 + b'"}'


def gateway() -> FastAPI:
    return create_app(GatewaySettings(pseudonym_key=SecretStr(base64.b64encode(bytes(32)).decode())))


def client() -> TestClient:
    return TestClient(gateway())


@pytest.mark.parametrize("path", ["/api/v1/grants", "/api/v1/break-glass"])
def test_an_oversized_json_body_is_refused_before_authentication(path: str) -> None:
    answer = client().post(path, content=BODY, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413, answer.text
    assert "ENCLAVE_GATEWAY_MAX_BODY_BYTES" in answer.text
    assert "PHI-MRN" not in answer.text


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/dicomweb/studies", 'multipart/related; type="application/dicom"; boundary=b'),
        ("/dicomweb/studies/1.2.3", 'multipart/related; type="application/dicom"; boundary=b'),
        ("/api/v1/imaging/upload", "multipart/form-data; boundary=b"),
    ],
)
def test_the_upload_routes_are_not_under_the_body_limit(path: str, content_type: str) -> None:
    answer = client().post(path, content=BODY, headers={"Content-Type": content_type})
    # The access guard answered (here without Kafka to record the refusal: 503), not the body limit.
    assert answer.status_code in (401, 503), answer.text
    assert "MAX_BODY_BYTES" not in answer.text


@pytest.mark.parametrize("path", ["/api/v1/grants", "/api/v1/break-glass"])
def test_a_json_body_refused_part_way_is_drained_so_the_client_reads_the_413(path: str) -> None:
    """On a real server: a client that sends its whole body before it reads (most do) gets the 413,
    then a clean close, not a reset over the bytes the gateway did not read (linger.py). Until the
    twentieth session only the upload routes drained; the integration test of the grant 413
    (test_gateway_access_answers.py) then failed now and then with a connection reset."""
    sent = b'{"patient_id": "x", "pad": "' + b"x" * 400_000 + b'"}'
    with contextmanager(_serve)(gateway()) as port:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        # Declared past the limit: refused before any of it is read; the client sends it all anyway.
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(sent)}\r\n\r\n".encode()
        )
        sock.sendall(sent)
        data, closed = _read_until_closed(sock, 5.0)
        sock.close()
    assert data.startswith(b"HTTP/1.1 413 "), data[:200]
    assert b"ENCLAVE_GATEWAY_MAX_BODY_BYTES" in data and data.rstrip().endswith(b"}")
    assert closed is not None, "the connection was closed once the body had been read"


def test_the_gateway_drains_every_route_that_takes_a_body() -> None:
    """The routes the lingering answer covers are derived from the app (linger.body_routes): the
    uploads, the grant routes and break-glass, and nothing that only reads."""
    [lingering] = [m for m in gateway().user_middleware if m.cls is LingeringAnswer]
    routes = set(lingering.kwargs["routes"])
    assert routes >= {*UPLOAD_ROUTES, "/api/v1/grants", "/api/v1/grants/{grant_id}", "/api/v1/break-glass"}
    assert not {"/api/v1/imaging/{imaging_id}", "/healthz", "/metrics"} & routes
