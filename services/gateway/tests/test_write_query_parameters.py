"""A write sent a query parameter it does not take is refused, the common 422 naming what it takes, and
changes nothing: until the twenty-fourth session FastAPI ignored it, so a script's
``DELETE /api/v1/grants/{id}?dry_run=true`` revoked the grant for real. Uploads still ignore them (a
DICOM client may add its own, and refusing them would refuse the data)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from corpus import builders
from route_harness import gateway_routes
from test_access_answers import the_event, upload
from test_grant_listing import grant_request
from test_restrictions import call

PLANTED = "PID-QP-7731"
REASON = "incident 2026-116: reviewed with the privacy office"


def refused_as_unknown_parameter(harness, answer) -> None:
    assert answer.status == 422, answer.body
    [problem] = json.loads(answer.body)["problems"]
    assert problem["field"] == "query" and "it takes none" in problem["problem"]
    assert "dry_run" not in answer.body.decode()  # the name sent is never echoed
    event = the_event(harness, answer)
    assert (event["outcome"], event["detail"]) == ("rejected", "invalid_request")


async def test_a_grant_is_neither_made_nor_revoked_under_a_parameter_it_does_not_take(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    refused = await call(harness, "POST", "/api/v1/grants?dry_run=true", "admin", grant_request("cg-1"))
    refused_as_unknown_parameter(harness, refused)
    assert harness.grants._grants == {}

    made = await call(harness, "POST", "/api/v1/grants", "admin", grant_request("cg-1"))
    assert made.status == 201, made.body
    grant_id = json.loads(made.body)["grant_id"]
    kept = await call(harness, "DELETE", f"/api/v1/grants/{grant_id}?dry_run=true", "admin")
    refused_as_unknown_parameter(harness, kept)
    assert harness.grants._grants[grant_id].revoked_at is None


async def test_no_token_is_revoked_under_a_parameter_the_route_does_not_take(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    body = {"subject": "dr-1", "justification": "incident 2026-115: laptop reported stolen"}
    refused = await call(harness, "POST", "/api/v1/token-revocations?dry_run=1", "admin", body)
    refused_as_unknown_parameter(harness, refused)
    assert await harness.token_revocations.since(datetime(2000, 1, 1, tzinfo=UTC)) == []


@pytest.mark.parametrize("route", ["/dicomweb/studies", "/api/v1/imaging/upload"])
async def test_an_upload_still_ignores_a_parameter_it_does_not_take(tmp_path: Path, route: str) -> None:
    harness = gateway_routes(tmp_path)
    body_of = builders.multipart_body if route == "/dicomweb/studies" else builders.form_data_body
    answer = await upload(harness, f"{route}?client=pacs-7", body_of([builders.make_instance()]))
    assert answer.status == 200, answer.body


@pytest.mark.parametrize(
    ("path", "role", "body"),
    [
        ("/api/v1/restrictions", "admin", {"patient_id": PLANTED, "justification": REASON}),
        ("/api/v1/break-glass", "clinician", {"patient_id": PLANTED, "justification": REASON}),
        ("/api/v1/patient-keys", "auditor", {"patient_id": PLANTED}),
    ],
)
async def test_the_other_writes_refuse_a_parameter_they_do_not_take(
    tmp_path: Path, path: str, role: str, body: dict[str, str]
) -> None:
    harness = gateway_routes(tmp_path)
    refused = await call(harness, "POST", f"{path}?dry_run=true", role, body)
    refused_as_unknown_parameter(harness, refused)
    assert harness.restrictions._restrictions == {} and harness.grants._grants == {}
    assert PLANTED not in refused.body.decode()


async def test_a_restriction_is_not_lifted_under_a_parameter_the_lift_does_not_take(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    made = await call(
        harness, "POST", "/api/v1/restrictions", "admin", {"patient_id": PLANTED, "justification": REASON}
    )
    assert made.status == 201, made.body
    key = json.loads(made.body)["patient_key"]
    kept = await call(
        harness, "POST", f"/api/v1/restrictions/{key}/lift?dry_run=1", "admin", {"justification": REASON}
    )
    refused_as_unknown_parameter(harness, kept)
    assert len(harness.restrictions._restrictions) == 1
