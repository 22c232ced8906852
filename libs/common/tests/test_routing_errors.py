"""A path or method no route takes answers in the services' error shape and says what is allowed;
what a route raises itself is answered unchanged; the path is never echoed (a client may put an
identifier there)."""

from __future__ import annotations

import asyncio
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

    @router.get("/listed")
    async def listed(limit: int = 10) -> dict[str, int]:
        return {"limit": limit}

    @router.get("/things/{thing}")
    async def get_thing(thing: str) -> dict[str, str]:
        raise HTTPException(404, detail={"code": "not_found", "message": "no such resource"})

    @router.delete("/things/{thing}")
    async def delete_thing(thing: str) -> dict[str, str]:
        raise HTTPException(404)  # a route's own 404 with the default (string) detail

    runtime = ServiceRuntime(BaseServiceSettings(service_name="routing-test", max_header_bytes=2048))
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
    assert answer.headers["allow"] == "DELETE, GET, HEAD"
    assert "it takes DELETE, GET, HEAD" in answer.json()["detail"]["message"]


def test_a_body_that_cannot_be_parsed_says_what_to_send(client: TestClient) -> None:
    """Invalid UTF-8 or nesting past the parser's limit: FastAPI's bare "There was an error parsing the
    body" said neither what was wrong nor what is allowed (found by an API hunt)."""
    for body in (b'{"name": "\xff\xfe"}', b"[" * 20_000 + b"]" * 20_000):  # 40 KB: under the body limit
        answer = client.post("/named", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, answer.text
        detail = answer.json()["detail"]
        assert detail["code"] == "unparseable_body" and "UTF-8 JSON" in detail["message"]


def test_head_answers_like_get_without_a_body(client: TestClient) -> None:
    """RFC 9110: a general-purpose server supports HEAD; FastAPI's GET routes answered it 405."""
    got = client.get("/listed")
    head = client.head("/listed")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"] != "0"
    metrics = client.get("/metrics").text
    assert 'enclave_http_requests_total{method="HEAD",route="/listed",status="200"} 1.0' in metrics
    answer = client.head("/things")  # a POST-only path
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"


def test_a_trailing_slash_is_not_redirected(client: TestClient) -> None:
    """A 307 to the path without the slash made clients resend the request (and its body) elsewhere."""
    answer = client.get("/listed/", follow_redirects=False)
    assert answer.status_code == 404
    assert "paths do not end in '/'" in answer.json()["detail"]["message"]


def test_a_request_that_does_not_match_the_api_names_the_field_and_does_not_echo_it(
    client: TestClient,
) -> None:
    """FastAPI's own 422 echoes the value sent ("input"): a client's PHI would come back and be logged
    by anything that logs responses (found by an API hunt)."""
    answer = client.get("/listed", params={"limit": PLANTED})
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert detail["code"] == "invalid_request"
    assert detail["problems"][0]["field"] == "query.limit"
    assert PLANTED not in answer.text
    answer = client.post("/named", json={"name": {"nested": PLANTED}})
    assert answer.status_code == 422 and PLANTED not in answer.text


def test_an_oversized_head_is_431_naming_the_setting(client: TestClient) -> None:
    answer = client.get("/listed", headers={"X-Padding": "x" * 2048})
    assert answer.status_code == 431
    detail = answer.json()["detail"]
    assert detail["code"] == "headers_too_large"
    assert "at most 2048 bytes" in detail["message"] and "ENCLAVE_MAX_HEADER_BYTES" in detail["message"]
    assert client.get("/listed", headers={"X-Padding": "x" * 1500}).status_code == 200


def test_a_service_with_its_own_error_shape_answers_it_for_every_error_and_keeps_detail() -> None:
    """The gateway's shape is {status, error, message}; what the guard and routing raised answered
    {detail: {code, message}} only, so a client had to read two shapes (found by an API hunt)."""

    def shaped(status: int, code: str, message: str, **fields: object) -> dict[str, object]:
        return {"status": status, "error": code, "message": message, **fields}

    router = APIRouter()

    @router.get("/things/{thing}")
    async def get_thing(thing: str) -> dict[str, str]:
        detail = {"code": "break_glass_required", "message": "restricted", "break_glass_available": True}
        raise HTTPException(403, detail=detail, headers={"X-Why": "restricted"})

    runtime = ServiceRuntime(BaseServiceSettings(service_name="shape-test"))
    app = runtime.http_app(title="t", routers=[router], start_runtime=False, error_body=shaped)
    with TestClient(app) as shaped_client:
        refused = shaped_client.get("/things/a")
        assert refused.status_code == 403 and refused.headers["x-why"] == "restricted"
        detail = {"code": "break_glass_required", "message": "restricted", "break_glass_available": True}
        assert refused.json() == {
            "status": 403,
            "error": "break_glass_required",
            "message": "restricted",
            "break_glass_available": True,
            "detail": detail,
        }
        missing = shaped_client.get("/nowhere").json()
        assert (missing["status"], missing["error"]) == (404, "no_such_route")
        assert missing["detail"] == {"code": "no_such_route", "message": missing["message"]}
        assert shaped_client.get("/things/a", params={"x": 1}).status_code == 403


def test_a_service_without_its_own_shape_answers_detail_only(client: TestClient) -> None:
    assert client.get("/things/x").json() == {"detail": {"code": "not_found", "message": "no such resource"}}


def test_a_json_body_the_client_stopped_sending_is_a_499_not_a_400() -> None:
    """FastAPI answers a JSON body cut off by the client's disconnect as an unparseable body (400),
    counting the client's choice among its errors; every route counts it as 499, as the uploads do."""
    router = APIRouter()

    @router.post("/named")
    async def name_thing(body: dict[str, str]) -> dict[str, str]:
        return body

    runtime = ServiceRuntime(BaseServiceSettings(service_name="routing-test", max_header_bytes=2048))
    app = runtime.http_app(title="t", routers=[router], start_runtime=False)
    incoming = [
        {"type": "http.request", "body": b'{"name": "PHI-MRN', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/named",
        "raw_path": b"/named",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"200")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 499
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")  # type: ignore[misc]
    assert b"client_closed_request" in body and b"PHI-MRN" not in body
    with TestClient(app) as client:
        metrics = client.get("/metrics").text
    assert 'enclave_http_requests_total{method="POST",route="/named",status="499"} 1.0' in metrics
