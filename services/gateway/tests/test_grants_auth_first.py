"""The grant and break-glass routes authenticate and check the caller's role before they parse the
request body (docs/gateway.md, "Grants and break-glass").

FastAPI parses a route's declared body before it resolves the route's dependencies. Until the
eighteenth session a caller without a token, or with a role that may not call the route, had its
body parsed first: a body that was not JSON answered 422 with what the API expects, not 401 or 403,
and was not recorded as a refused access. Now the decision comes first, whatever the body; the
caller the route is for gets the same 422 as before, and the OpenAPI document still names the body
schema (scripts/specs.py --check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from enclave_common.auth import RateLimit
from route_harness import Harness, asgi_request, gateway_routes

PATHS = {"/api/v1/grants": "admin", "/api/v1/break-glass": "clinician"}
#: Bodies a caller without a token may send, none of them parsed: under the 64 KiB body limit.
BODIES = {
    "not-json": (b"{'patient_id': PHI-MRN-5521", "application/json"),
    "json-of-another-shape": (
        json.dumps({"patient_id": ["PHI-MRN-5521"], "x": 1}).encode(),
        "application/json",
    ),
    "60-kib-array": (b"[" + b"1," * 30_000 + b"1]", "application/json"),
    "60-kib-unterminated": (b'{"patient_id": "PHI-MRN-5521' + b"x" * 60_000, "application/json"),
    "empty": (b"", "application/json"),
    "not-declared-json": (b"patient_id=PHI-MRN-5521", "application/x-www-form-urlencoded"),
}


async def post(harness: Harness, path: str, body: bytes, content_type: str, token: str | None = None):
    headers = [("content-type", content_type), ("content-length", str(len(body)))]
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    return await asgi_request(harness.app, "POST", path.encode(), headers, [body])


@pytest.mark.parametrize("body", sorted(BODIES))
@pytest.mark.parametrize("path", sorted(PATHS))
async def test_without_a_token_any_body_is_401_and_recorded(tmp_path: Path, path: str, body: str) -> None:
    harness = gateway_routes(tmp_path)
    data, content_type = BODIES[body]
    answer = await post(harness, path, data, content_type)
    assert answer.status == 401, answer.body
    assert answer.header("www-authenticate") == 'Bearer realm="enclave"'
    assert json.loads(answer.body)["error"] == "missing_token"
    assert b"PHI-MRN" not in answer.body
    [event] = harness.publisher.access_events()
    assert (event["outcome"], event["status_code"], event["detail"]) == (
        "unauthenticated",
        401,
        "missing_token",
    )


@pytest.mark.parametrize("body", ["not-json", "60-kib-unterminated", "json-of-another-shape"])
@pytest.mark.parametrize("path", sorted(PATHS))
async def test_a_role_that_may_not_call_the_route_is_403_before_its_body_is_parsed(
    tmp_path: Path, path: str, body: str
) -> None:
    harness = gateway_routes(tmp_path)
    data, content_type = BODIES[body]
    answer = await post(
        harness, path, data, content_type, harness.token("hospital-a", "uploader", "researcher")
    )
    assert answer.status == 403, answer.body  # the access matrix's answer for these roles
    assert json.loads(answer.body)["error"] == "role_not_permitted"
    [event] = harness.publisher.access_events()
    assert (event["outcome"], event["status_code"]) == ("denied", 403)


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_the_role_the_route_is_for_gets_the_same_422_as_before(tmp_path: Path, path: str) -> None:
    harness = gateway_routes(tmp_path)
    token = harness.token("hospital-a", PATHS[path])
    data, content_type = BODIES["not-json"]
    not_json = await post(harness, path, data, content_type, token)
    assert not_json.status == 422
    assert json.loads(not_json.body) == {
        "status": 422,
        "error": "invalid_request",
        "message": "the request does not match the API",
        "problems": [{"field": "body.1", "problem": "JSON decode error"}],
    }
    data, content_type = BODIES["json-of-another-shape"]
    shape = await post(harness, path, data, content_type, token)
    assert shape.status == 422
    fields = {p["field"] for p in json.loads(shape.body)["problems"]}
    assert {"body.patient_id", "body.justification", "body.x"} <= fields
    assert b"PHI-MRN" not in shape.body


async def test_an_allowed_request_is_authenticated_and_rate_limited_once(tmp_path: Path) -> None:
    """The decision made before the body is the one the route uses: one token of a burst of one."""
    harness = gateway_routes(tmp_path, rate_limit=RateLimit(burst=1, per_second=0.001))
    body = {"patient_id": "PHI-MRN-5521", "justification": "unconscious patient in the emergency room"}
    answer = await post(
        harness,
        "/api/v1/break-glass",
        json.dumps(body).encode(),
        "application/json",
        harness.token("hospital-a", "clinician"),
    )
    assert answer.status == 201, answer.body
    assert json.loads(answer.body)["kind"] == "break_glass"
    assert [e["detail"].split(":")[0] for e in harness.publisher.access_events()] == ["break_glass_opened"]
