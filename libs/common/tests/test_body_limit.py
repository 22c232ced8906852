"""Every route's body is bounded before routing and authentication (413), and must arrive in time
(408); routes that stream their own bodies with limits of their own are exempt; a 422 lists at most
20 problems. Found by a security hunt: the gateway read and parsed a 250 MiB unauthenticated JSON body
before its 401, held bodies that stopped for good, and answered 1M invalid items with a 256 MiB 422."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from enclave_common.body_limit import BodyLimit, body_refusal
from enclave_common.service import MAX_LISTED_PROBLEMS, ServiceRuntime
from enclave_common.settings import BaseServiceSettings
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.testclient import TestClient

PLANTED = "PHI-MRN-55501-QX"
LIMIT = 1024

Receive = Callable[[], Awaitable[dict[str, Any]]]


def build_app(calls: list[str], **settings: Any) -> FastAPI:
    """A JSON route behind an "authentication" dependency that records that it ran, and an upload
    route that streams its body itself, named exempt."""
    router = APIRouter()

    def authenticate() -> str:
        calls.append("auth")
        return "someone"

    @router.post("/things")
    async def make_thing(body: dict[str, str], who: str = Depends(authenticate)) -> dict[str, str]:
        calls.append("route")
        return {"made": "yes"}

    @router.post("/numbers")
    async def numbers(body: list[int]) -> dict[str, int]:
        return {"count": len(body)}

    @router.post("/uploads/{name}")
    async def upload(name: str, request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"size": size}

    @router.post("/uploads/{name}/notes")
    async def notes(name: str, body: dict[str, str]) -> dict[str, str]:
        return body

    defaults: dict[str, Any] = {"service_name": "body-test", "max_body_bytes": LIMIT}
    runtime = ServiceRuntime(BaseServiceSettings(**(defaults | settings)))
    return runtime.http_app(
        title="t", routers=[router], start_runtime=False, streamed_body_routes=("/uploads/{name}",)
    )


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture
def client(calls: list[str]) -> Iterator[TestClient]:
    with TestClient(build_app(calls)) as test_client:
        yield test_client


def scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


async def call(app: FastAPI, path: str, headers: list[tuple[bytes, bytes]], receive: Receive) -> Any:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    # Bounded: without the limits a stalled body waits for ever.
    await asyncio.wait_for(app(scope(path, headers), receive, send), timeout=10)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent  # one answer: what the route answered after the refusal is dropped
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return starts[0], json.loads(body)


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read_or_the_route_runs(
    calls: list[str],
) -> None:
    app = build_app(calls)

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body was read")

    start, answer = asyncio.run(call(app, "/things", [(b"content-length", b"262144000")], receive))
    assert start["status"] == 413
    assert (b"connection", b"close") in start["headers"]
    detail = answer["detail"]
    assert detail["code"] == "body_too_large"
    assert "262144000 bytes" in detail["message"] and f"at most {LIMIT} bytes" in detail["message"]
    assert "ENCLAVE_MAX_BODY_BYTES" in detail["message"]
    assert calls == []  # neither authentication nor the route


def test_a_chunked_body_is_counted_and_cut_at_the_limit(calls: list[str]) -> None:
    """No Content-Length: the body is read until it passes the limit, and no further."""
    app = build_app(calls)
    chunk = b'{"name": "' + PLANTED.encode() * 20
    received = 0

    async def receive() -> dict[str, Any]:  # a body that never ends
        nonlocal received
        received += len(chunk)
        assert received < 100 * LIMIT, "the body was read past the limit"
        return {"type": "http.request", "body": chunk, "more_body": True}

    start, answer = asyncio.run(call(app, "/things", [(b"transfer-encoding", b"chunked")], receive))
    assert start["status"] == 413
    assert answer["detail"]["code"] == "body_too_large"
    assert f"over {LIMIT} bytes" in answer["detail"]["message"]
    assert PLANTED not in json.dumps(answer)
    assert received <= LIMIT + len(chunk)
    assert calls == []


def test_a_body_that_stops_is_408_within_the_timeout(calls: list[str]) -> None:
    app = build_app(calls, body_timeout_s=0.3)
    messages = [{"type": "http.request", "body": b'{"name": "a', "more_body": True}]

    async def receive() -> dict[str, Any]:  # 10 bytes of the 100 declared, then silence
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    began = time.monotonic()
    start, answer = asyncio.run(call(app, "/things", [(b"content-length", b"100")], receive))
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    assert answer["detail"]["code"] == "body_timeout"
    assert "0.3 seconds" in answer["detail"]["message"]
    assert "ENCLAVE_BODY_TIMEOUT_S" in answer["detail"]["message"]
    assert time.monotonic() - began < 3
    assert calls == []


def test_a_body_that_keeps_arriving_slowly_is_timed_in_all_not_per_chunk(calls: list[str]) -> None:
    app = build_app(calls, body_timeout_s=0.3)

    async def receive() -> dict[str, Any]:  # a byte every 0.1 s: never idle for 0.3 s
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b" ", "more_body": True}

    start, answer = asyncio.run(call(app, "/things", [(b"content-length", b"1000")], receive))
    assert start["status"] == 408


def test_a_body_within_the_limit_is_served_and_refusals_are_counted(
    client: TestClient, calls: list[str]
) -> None:
    assert client.post("/things", json={"name": "x" * (LIMIT - 20)}).status_code == 200
    assert calls == ["auth", "route"]

    def stream() -> Iterator[bytes]:
        yield b'{"name": "'
        yield b"x" * LIMIT
        yield b'"}'

    answer = client.post("/things", content=stream())  # chunked through the test client
    assert answer.status_code == 413 and answer.json()["detail"]["code"] == "body_too_large"
    assert client.post("/things", content=b"{}" + b" " * LIMIT).status_code == 413
    metrics = client.get("/metrics").text
    # Refused from its Content-Length before routing; refused while the route read it.
    assert 'enclave_http_requests_total{method="POST",route="unmatched",status="413"} 1.0' in metrics
    assert 'enclave_http_requests_total{method="POST",route="/things",status="413"} 1.0' in metrics


def test_an_upload_route_named_exempt_streams_past_the_limit(client: TestClient) -> None:
    size = 50 * LIMIT
    answer = client.post("/uploads/one", content=b"\0" * size)
    assert answer.status_code == 200 and answer.json() == {"size": size}

    def stream() -> Iterator[bytes]:
        for _ in range(50):
            yield b"\0" * LIMIT

    assert client.post("/uploads/two", content=stream()).json() == {"size": size}
    # Only the path named: a longer path under it is held to the limit.
    assert client.post("/uploads/one/notes", content=b"{}" + b" " * LIMIT).status_code == 413


def test_an_exempt_route_that_is_not_a_route_is_refused_when_the_app_is_built() -> None:
    runtime = ServiceRuntime(BaseServiceSettings(service_name="body-test"))
    with pytest.raises(ValueError, match="/uplaods"):
        runtime.http_app(title="t", start_runtime=False, streamed_body_routes=("/uplaods",))


def test_the_limits_default_to_64_kib_and_30_s_and_are_set_per_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = BaseServiceSettings()
    assert (settings.max_body_bytes, settings.body_timeout_s) == (64 * 1024, 30.0)
    monkeypatch.setenv("ENCLAVE_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("ENCLAVE_BODY_TIMEOUT_S", "5")
    assert (BaseServiceSettings().max_body_bytes, BaseServiceSettings().body_timeout_s) == (4096, 5.0)


def test_a_422_lists_the_first_problems_and_counts_the_rest(calls: list[str]) -> None:
    with TestClient(build_app(calls, max_body_bytes=64 * 1024)) as client:
        answer = client.post("/numbers", json=[PLANTED] * 1000)
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert detail["code"] == "invalid_request"
    assert len(detail["problems"]) == MAX_LISTED_PROBLEMS == 20
    assert detail["problems"][0]["field"] == "body.0"
    assert detail["problems_not_listed"] == 980
    assert "980 more" in detail["message"]
    assert PLANTED not in answer.text
    assert len(answer.content) < 4096


def test_a_422_with_few_problems_keeps_its_shape(client: TestClient) -> None:
    detail = client.post("/numbers", json=["a", "b"]).json()["detail"]
    assert detail == {
        "code": "invalid_request",
        "message": "the request does not match the API",
        "problems": [
            {"field": "body.0", "problem": detail["problems"][0]["problem"]},
            {"field": "body.1", "problem": detail["problems"][1]["problem"]},
        ],
    }


def limited(app: Any, **options: Any) -> BodyLimit:
    defaults: dict[str, Any] = {
        "max_bytes": LIMIT,
        "timeout_s": 0.3,
        "size_setting": "SIZE",
        "timeout_setting": "TIMEOUT",
        "error_body": lambda status, code, message: {"status": status, "error": code},
    }
    return BodyLimit(app, **(defaults | options))


@pytest.mark.parametrize(
    ("headers", "pieces", "noted"),
    [
        ([(b"content-length", b"262144000")], [], (413, "body_too_large")),
        ([(b"transfer-encoding", b"chunked")], [b" " * 600] * 3, (413, "body_too_large")),
        ([(b"content-length", b"100")], [b'{"name": "a'], (408, "body_timeout")),
        ([(b"content-length", b"2")], [b"{}"], None),
    ],
)
def test_a_refusal_is_noted_in_the_request_state_for_the_route_to_record(
    headers: list[tuple[bytes, bytes]], pieces: list[bytes], noted: tuple[int, str] | None
) -> None:
    """A route reading a refused body sees a client that left (``http.disconnect``); the refusal the
    client got is in ``request.state`` (:func:`body_refusal`), so the route records that instead."""
    seen: list[Any] = []

    async def route(scope: Any, receive: Receive, send: Any) -> None:
        while (message := await receive())["type"] == "http.request" and message.get("more_body"):
            pass
        seen.append((message["type"], body_refusal(scope)))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    messages = [{"type": "http.request", "body": p, "more_body": True} for p in pieces]
    if noted is None:
        messages[-1]["more_body"] = False

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    request = scope("/things", headers)
    asyncio.run(asyncio.wait_for(limited(route)(request, receive, send), 10))
    assert body_refusal(request) == noted
    assert sent[0]["status"] == (noted[0] if noted else 200)
    if noted is not None and noted[0] == 413 and not pieces:
        assert seen == []  # refused from its Content-Length: the route never ran
    else:
        assert seen == [("http.disconnect" if noted else "http.request", noted)]
