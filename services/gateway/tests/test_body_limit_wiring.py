"""The gateway's JSON routes are under the common body limit; its upload routes, which stream their
bodies under limits and a pace rule of their own, are not (a 64 KiB cap there would refuse every
instance)."""

from __future__ import annotations

import base64

import pytest
from enclave_gateway.config import GatewaySettings
from enclave_gateway.main import create_app
from fastapi.testclient import TestClient
from pydantic import SecretStr

BODY = b'{"patient_id": "PHI-MRN-80817-QX", "pad": "' + b"x" * 100_000 + b'"}'


def client() -> TestClient:
    return TestClient(
        create_app(GatewaySettings(pseudonym_key=SecretStr(base64.b64encode(bytes(32)).decode())))
    )


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
