"""What the gateway answers DICOMweb clients that try to search or retrieve: the coded error, the
methods the path takes, and that retrieval and search are not offered (docs/gateway.md)."""

from __future__ import annotations

import base64

from enclave_gateway.config import GatewaySettings
from enclave_gateway.main import create_app
from fastapi.testclient import TestClient
from pydantic import SecretStr


def client() -> TestClient:
    return TestClient(
        create_app(GatewaySettings(pseudonym_key=SecretStr(base64.b64encode(bytes(32)).decode())))
    )


def test_qido_search_on_the_stow_path_is_refused_with_what_is_offered() -> None:
    answer = client().get("/dicomweb/studies", params={"PatientID": "PHI-77"})
    assert answer.status_code == 405
    assert answer.headers["allow"] == "POST"
    message = answer.json()["detail"]["message"]
    assert "it takes POST" in message
    assert "QIDO-RS" in message and "not offered" in message
    assert "PHI-77" not in answer.text


def test_a_retrieve_url_is_answered_with_why_retrieval_is_not_offered() -> None:
    answer = client().get("/dicomweb/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5")
    assert answer.status_code == 404
    detail = answer.json()["detail"]
    assert detail["code"] == "no_such_route"
    assert "WADO-RS" in detail["message"] and "holds no key" in detail["message"]
    assert "1.2.3.4.5" not in answer.text
