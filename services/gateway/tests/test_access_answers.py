"""Each request is one access event, and the event claims the answer the request got: its status and
an outcome that says the same (docs/gateway.md, "Status codes common to every route").

Until the nineteenth session an allowed upload or grant change was recorded at its decision as
``success`` with status 200, and the route's own event followed: a refused upload read "success,
200" then "rejected, 415"; a partly refused one "success, 200" then "rejected, 409" per refused
part although it was answered 202; a grant "success, 200" then "success, 201". And a grant or
break-glass body that did not match the API (422) was not recorded at all.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from corpus import builders
from enclave_common import topics
from pymongo.errors import ServerSelectionTimeoutError
from route_harness import Exchange, Harness, asgi_request, gateway_routes

PLANTED = "PHI-MRN-30917-KX"
UPLOAD_TOPICS = {topics.UPLOAD_CHUNK, topics.UPLOAD_RECEIVED, topics.UPLOAD_COMPLETED}


def the_event(harness: Harness, answer: Exchange) -> dict[str, Any]:
    """The request's one access event; it claims the status the request was answered with."""
    mine = [
        e for e in harness.publisher.access_events() if e["correlation_id"] == answer.header("x-request-id")
    ]
    assert len(mine) == 1, mine
    assert mine[0]["status_code"] == answer.status, (mine, answer.body)
    return mine[0]


async def upload(harness: Harness, route: str, body: builders.Body) -> Exchange:
    return await asgi_request(
        harness.app,
        "POST",
        route.encode(),
        [
            ("authorization", f"Bearer {harness.token('hospital-a', 'uploader')}"),
            ("content-type", body.content_type),
        ],
        [body.data],
    )


async def post_json(
    harness: Harness,
    path: str,
    body: bytes,
    role: str,
    pieces: list[bytes] | None = None,
    *,
    chunked: bool = False,
    **options: Any,
) -> Exchange:
    """POST ``body`` as JSON by a principal of hospital-a with ``role``: sent whole, or as ``pieces``
    (with ``chunked``, without a Content-Length); ``options`` as :func:`asgi_request`'s."""
    headers = [
        ("authorization", f"Bearer {harness.token('hospital-a', role, subject=f'it-{role}')}"),
        ("content-type", "application/json"),
    ]
    if not chunked:
        headers.append(("content-length", str(len(body))))
    return await asgi_request(harness.app, "POST", path.encode(), headers, pieces or [body], **options)


def grant_body(**change: object) -> bytes:
    return json.dumps(
        {
            "grantee": "it-caregiver",
            "patient_id": PLANTED,
            "actions": ["read_status"],
            "expires_at": (datetime.now(UTC) + timedelta(days=2)).isoformat(),
            "justification": "daughter, consent form on file",
            **change,
        }
    ).encode()


@pytest.mark.parametrize(
    ("content_type", "status", "detail"),
    [("text/plain", 415, "unsupported_media_type"), ("multipart/related; boundary=nowhere", 400, None)],
)
async def test_a_refused_upload_is_recorded_once_as_refused(
    tmp_path: Path, content_type: str, status: int, detail: str | None
) -> None:
    harness = gateway_routes(tmp_path)
    body = builders.Body(content_type, builders.make_instance())
    answer = await upload(harness, "/dicomweb/studies", body)
    assert answer.status == status, answer.body
    event = the_event(harness, answer)
    assert (event["action"], event["outcome"]) == ("upload", "rejected")
    assert event["detail"] == (detail or json.loads(answer.body)["error"])
    assert not UPLOAD_TOPICS & set(harness.publisher.topics())


@pytest.mark.parametrize("route", ["/dicomweb/studies", "/api/v1/imaging/upload"])
async def test_an_upload_is_recorded_after_its_hand_off_with_its_answer(tmp_path: Path, route: str) -> None:
    harness = gateway_routes(tmp_path)
    body_of = builders.multipart_body if route == "/dicomweb/studies" else builders.form_data_body
    answer = await upload(harness, route, body_of([builders.make_instance(patient_id=PLANTED)]))
    assert answer.status == 200, answer.body
    event = the_event(harness, answer)
    assert (event["action"], event["outcome"], event["detail"]) == (
        "upload",
        "success",
        "accepted=1 rejected=0",
    )
    completed = [e for t, e in harness.publisher.sent if t == topics.UPLOAD_COMPLETED]
    assert event["target"] == f"upload:{completed[0].data['upload_id']}"
    # The last event of the request: its answer is known only once the hand-off was acknowledged.
    assert harness.publisher.topics()[-1] == topics.ACCESS_RECORDED
    assert PLANTED not in json.dumps(event)


@pytest.mark.parametrize("route", ["/dicomweb/studies", "/api/v1/imaging/upload"])
async def test_a_partly_refused_upload_is_one_202_and_a_wholly_refused_one_one_409(
    tmp_path: Path, route: str
) -> None:
    harness = gateway_routes(tmp_path)
    body_of = builders.multipart_body if route == "/dicomweb/studies" else builders.form_data_body
    cut = builders.truncate(builders.make_instance(patient_id=PLANTED), 600)

    partly = await upload(harness, route, body_of([builders.make_instance(), cut, cut]))
    assert partly.status == 202, partly.body
    event = the_event(harness, partly)
    assert event["outcome"] == "success"  # an instance was stored
    assert event["detail"].startswith("accepted=1 rejected=2 problems=")
    assert "," not in event["detail"].removeprefix("accepted=1 rejected=2 problems="), "each problem once"

    wholly = await upload(harness, route, body_of([cut]))
    assert wholly.status == 409, wholly.body
    event = the_event(harness, wholly)
    assert (event["outcome"], event["detail"].split(" problems=")[0]) == ("rejected", "accepted=0 rejected=1")
    assert event["target"].startswith("upload:")
    assert PLANTED not in json.dumps(harness.publisher.access_events())


async def test_an_upload_the_gateway_fails_on_is_recorded_with_the_answer_it_gets(tmp_path: Path) -> None:
    """A dependency that did not answer outside the paths that expect it: 503, recorded as an error,
    not as the allowed decision's 200."""
    harness = gateway_routes(tmp_path)

    async def silent(*_: object, **__: object) -> None:
        raise ServerSelectionTimeoutError("no server answered")

    harness.uploads.publish = silent  # type: ignore[method-assign]
    answer = await upload(harness, "/dicomweb/studies", builders.multipart_body([builders.make_instance()]))
    assert answer.status == 503, answer.body
    event = the_event(harness, answer)
    assert (event["outcome"], event["detail"]) == ("error", "dependency_unavailable")


async def test_a_grant_is_recorded_once_as_created_201(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    answer = await post_json(harness, "/api/v1/grants", grant_body(), "admin")
    assert answer.status == 201, answer.body
    event = the_event(harness, answer)
    assert event["outcome"] == "success"
    assert event["detail"].startswith(f"grant_created:{json.loads(answer.body)['grant_id']} ")


async def test_an_invalid_grant_is_recorded_once_as_refused_422(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    answer = await post_json(harness, "/api/v1/grants", grant_body(justification="short"), "admin")
    assert answer.status == 422, answer.body
    event = the_event(harness, answer)
    assert (event["outcome"], event["detail"]) == ("rejected", "grant_refused:invalid_grant")


@pytest.mark.parametrize(
    ("path", "role"), [("/api/v1/grants", "admin"), ("/api/v1/break-glass", "clinician")]
)
@pytest.mark.parametrize(
    "body",
    [
        b'{"patient_id": "' + PLANTED.encode() + b'", ',  # not JSON
        json.dumps({"patient_id": [PLANTED], "extra": PLANTED}).encode(),  # JSON of another shape
    ],
)
async def test_a_body_that_does_not_match_the_api_is_recorded_as_rejected_without_its_content(
    tmp_path: Path, path: str, role: str, body: bytes
) -> None:
    harness = gateway_routes(tmp_path)
    answer = await post_json(harness, path, body, role)
    assert answer.status == 422, answer.body
    event = the_event(harness, answer)
    action = "manage_grants" if role == "admin" else "break_glass"
    assert (event["action"], event["outcome"], event["detail"]) == (action, "rejected", "invalid_request")
    assert (event["actor"], event["roles"], event["target"]) == (f"it-{role}", [role], None)
    assert PLANTED not in json.dumps(event)


async def test_a_revocation_is_one_200_and_revoking_again_one_409(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    created = await post_json(harness, "/api/v1/grants", grant_body(), "admin")
    grant_id = json.loads(created.body)["grant_id"]
    admin = [("authorization", f"Bearer {harness.token('hospital-a', 'admin')}")]
    path = f"/api/v1/grants/{grant_id}".encode()

    revoked = await asgi_request(harness.app, "DELETE", path, admin)
    assert revoked.status == 200, revoked.body
    assert the_event(harness, revoked)["detail"] == f"grant_revoked:{grant_id}"
    again = await asgi_request(harness.app, "DELETE", path, admin)
    assert again.status == 409, again.body
    event = the_event(harness, again)
    assert (event["outcome"], event["detail"]) == ("rejected", f"grant_already_revoked:{grant_id}")


@pytest.mark.parametrize(
    ("path", "role"), [("/api/v1/grants", "admin"), ("/api/v1/break-glass", "clinician")]
)
async def test_a_change_the_grant_store_did_not_take_is_recorded_as_an_error_503(
    tmp_path: Path, path: str, role: str
) -> None:
    harness = gateway_routes(tmp_path)

    async def silent(*_: object) -> None:
        raise ServerSelectionTimeoutError("no server answered")

    harness.grants.create = silent  # type: ignore[method-assign]
    body = (
        grant_body()
        if role == "admin"
        else json.dumps({"patient_id": PLANTED, "justification": "x" * 12}).encode()
    )
    answer = await post_json(harness, path, body, role)
    assert answer.status == 503, answer.body
    event = the_event(harness, answer)
    assert (event["outcome"], event["detail"]) == ("error", "dependency_unavailable")
    assert event["target"].startswith("patient:")
    assert not [e for t, e in harness.publisher.sent if t == topics.SECURITY_ALERT], "no session was opened"
