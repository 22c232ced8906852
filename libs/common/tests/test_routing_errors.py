"""A path or method no route takes answers in the services' error shape and says what is allowed;
what a route raises itself is answered unchanged; the path is never echoed (a client may put an
identifier there)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from enclave_common.service import ServiceRuntime
from enclave_common.settings import BaseServiceSettings
from fastapi import APIRouter, HTTPException
from fastapi.testclient import TestClient

PLANTED = "PHI-MRN-55501-QX"


@pytest.fixture
def client() -> Iterator[TestClient]:
    router = APIRouter()

    @router.post("/things")
    async def make_thing() -> dict[str, str]:
        return {"made": "yes"}

    @router.post("/named")
    async def name_thing(body: dict[str, str]) -> dict[str, str]:
        return body

    @router.get("/things/{thing}")
    async def get_thing(thing: str) -> dict[str, str]:
        raise HTTPException(404, detail={"code": "not_found", "message": "no such resource"})

    @router.delete("/things/{thing}")
    async def delete_thing(thing: str) -> dict[str, str]:
        raise HTTPException(404)  # a route's own 404 with the default (string) detail

    runtime = ServiceRuntime(BaseServiceSettings(service_name="routing-test"))
    app = runtime.http_app(
        title="t", routers=[router], start_runtime=False, unknown_route_hint="Nothing else is offered"
    )
    with TestClient(app) as test_client:
        yield test_client


def test_an_unknown_path_says_where_the_routes_are_and_does_not_echo_the_path(client: TestClient) -> None:
    answer = client.get(f"/patients/{PLANTED}/studies")
    assert answer.status_code == 404
    detail = answer.json()["detail"]
    assert detail["code"] == "no_such_route"
    assert "/openapi.json" in detail["message"]
    assert detail["message"].endswith("Nothing else is offered")
    assert PLANTED not in answer.text


def test_a_wrong_method_names_the_methods_the_path_takes(client: TestClient) -> None:
    answer = client.delete("/things")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "POST"
    detail = answer.json()["detail"]
    assert detail["code"] == "method_not_allowed"
    assert "does not take DELETE; it takes POST" in detail["message"]


def test_what_a_route_raises_is_answered_unchanged(client: TestClient) -> None:
    answer = client.get(f"/things/{PLANTED}")
    assert answer.status_code == 404
    assert answer.json() == {"detail": {"code": "not_found", "message": "no such resource"}}
    answer = client.delete(f"/things/{PLANTED}")
    assert answer.status_code == 404
    assert answer.json() == {"detail": "Not Found"}  # not mistaken for a path no route takes


def test_a_wrong_method_names_every_method_of_every_route_on_the_path(client: TestClient) -> None:
    answer = client.patch("/things/one")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "DELETE, GET"
    assert "it takes DELETE, GET" in answer.json()["detail"]["message"]


def test_a_body_that_cannot_be_parsed_says_what_to_send(client: TestClient) -> None:
    """Invalid UTF-8 or nesting past the parser's limit: FastAPI's bare "There was an error parsing the
    body" said neither what was wrong nor what is allowed (found by an API hunt)."""
    for body in (b'{"name": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000):
        answer = client.post("/named", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, answer.text
        detail = answer.json()["detail"]
        assert detail["code"] == "unparseable_body" and "UTF-8 JSON" in detail["message"]
