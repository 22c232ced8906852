"""``GET /api/v1/grants``: an admin finds the grants and break-glass sessions of its tenant, by kind,
grantee, patient and state, page by page (docs/gateway.md, "Grants and break-glass"); each listing and
each grant read is one ``read_grants`` event recorded once its answer was read.

Until the twenty-second session an admin could read a grant only by its id: a grant whose 201 the
admin's client lost, or a clinician's break-glass session (whose id only the clinician and the audit
trail had), could not be found and so not be revoked early. And a grant read was recorded at its
decision, before the lookup that could still fail.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo.errors import ServerSelectionTimeoutError
from route_harness import PSEUDONYMIZER, Harness, gateway_routes
from test_access_answers import the_event
from test_restrictions import call

PLANTED = "PHI-MRN-88120-LG"
KEY = PSEUDONYMIZER.pseudonym("hospital-a", "patient", PLANTED)


def grant_request(grantee: str, patient_id: str = PLANTED) -> dict[str, Any]:
    return {
        "grantee": grantee,
        "patient_id": patient_id,
        "actions": ["read_status"],
        "expires_at": (datetime.now(UTC) + timedelta(days=2)).isoformat(),
        "justification": "daughter, consent form on file",
    }


async def made(harness: Harness) -> list[str]:
    """Three grants and one break-glass session of hospital-a, and one grant of hospital-b: their ids
    in the order they were made (hospital-a's only)."""
    ids = []
    for grantee, patient in (("cg-1", PLANTED), ("cg-2", PLANTED), ("cg-1", "PID-OTHER")):
        answer = await call(harness, "POST", "/api/v1/grants", "admin", grant_request(grantee, patient))
        assert answer.status == 201, answer.body
        ids.append(json.loads(answer.body)["grant_id"])
    session = await call(
        harness,
        "POST",
        "/api/v1/break-glass",
        "clinician",
        {"patient_id": PLANTED, "justification": "unconscious patient in the emergency room"},
    )
    ids.append(json.loads(session.body)["grant_id"])
    other = await call(harness, "POST", "/api/v1/grants", "admin", grant_request("cg-1"), tenant="hospital-b")
    assert other.status == 201, other.body
    return ids


async def listed(harness: Harness, query: str = "") -> list[str]:
    answer = await call(harness, "GET", f"/api/v1/grants{query}", "admin")
    assert answer.status == 200, answer.body
    return [g["grant_id"] for g in json.loads(answer.body)["grants"]]


async def test_an_admin_lists_its_tenants_grants_and_sessions_by_kind_grantee_patient_and_state(
    tmp_path: Path,
) -> None:
    harness = gateway_routes(tmp_path)
    first, second, third, session = await made(harness)
    assert await listed(harness) == [first, second, third, session]
    assert await listed(harness, "?kind=break_glass") == [session]
    assert await listed(harness, "?kind=patient&grantee=cg-1") == [first, third]
    assert await listed(harness, f"?patient_key={KEY}") == [first, second, session]
    assert await listed(harness, "?grantee=it-clinician") == [session]

    revoked = await call(harness, "DELETE", f"/api/v1/grants/{second}", "admin")
    assert revoked.status == 200, revoked.body
    expired = replace(
        harness.grants._grants[third],
        expires_at=datetime.now(UTC) - timedelta(seconds=1),
        not_before=datetime.now(UTC) - timedelta(hours=1),
    )
    harness.grants._grants[third] = expired
    assert await listed(harness, "?state=active") == [first, session]
    assert await listed(harness, "?state=all") == [first, second, third, session]


async def test_the_listing_pages_in_the_order_grants_were_made(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    made_ids = await made(harness)
    seen: list[str] = []
    query = "?limit=3"
    while True:
        page = json.loads((await call(harness, "GET", f"/api/v1/grants{query}", "admin")).body)
        seen += [g["grant_id"] for g in page["grants"]]
        if page["next_after"] is None:
            break
        query = f"?limit=3&after={page['next_after']}"
    assert seen == made_ids


async def test_a_listing_is_one_read_grants_event_naming_the_patient_it_was_filtered_on(
    tmp_path: Path,
) -> None:
    harness = gateway_routes(tmp_path)
    await made(harness)
    answer = await call(harness, "GET", f"/api/v1/grants?patient_key={KEY}", "admin")
    event = the_event(harness, answer)
    assert (event["action"], event["outcome"], event["target"]) == (
        "read_grants",
        "success",
        f"patient:{KEY}",
    )
    unfiltered = await call(harness, "GET", "/api/v1/grants", "admin")
    assert the_event(harness, unfiltered)["target"] is None
    assert PLANTED not in answer.body.decode() + unfiltered.body.decode()
    assert PLANTED not in json.dumps(harness.publisher.access_events())


@pytest.mark.parametrize("role", ["uploader", "clinician", "researcher", "auditor", "caregiver"])
async def test_only_admins_list_grants(tmp_path: Path, role: str) -> None:
    harness = gateway_routes(tmp_path)
    answer = await call(harness, "GET", "/api/v1/grants", role)
    assert answer.status == 403, answer.body
    assert the_event(harness, answer)["outcome"] == "denied"


@pytest.mark.parametrize(
    "query",
    [
        "?kind=caregiver",
        "?state=expired",
        "?limit=0",
        "?limit=1001",
        "?after=nope",
        f"?patient_key={PLANTED}",
        # A grantee is an OIDC subject (twenty-third session): a filter that is none matches no grant
        # (until the twenty-fourth session answered an empty page, as if the subject had none).
        "?grantee=cg%201",
        "?grantee=cg-1%0Agrant_created:forged",
        f"?grantee={'x' * 256}",
    ],
)
async def test_a_filter_the_api_does_not_offer_is_422_and_recorded(tmp_path: Path, query: str) -> None:
    harness = gateway_routes(tmp_path)
    answer = await call(harness, "GET", f"/api/v1/grants{query}", "admin")
    assert answer.status == 422, answer.body
    assert json.loads(answer.body)["problems"], answer.body
    event = the_event(harness, answer)
    assert (event["action"], event["outcome"], event["detail"]) == (
        "read_grants",
        "rejected",
        "invalid_request",
    )
    assert PLANTED not in json.dumps(event)


async def test_a_listing_the_store_did_not_answer_is_recorded_as_the_503_it_gets(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)

    async def silent(*_: object, **__: object) -> None:
        raise ServerSelectionTimeoutError("no server answered")

    harness.grants.list = silent  # type: ignore[method-assign]
    answer = await call(harness, "GET", "/api/v1/grants", "admin")
    assert answer.status == 503, answer.body
    event = the_event(harness, answer)  # one event, claiming the 503 (not a 200 recorded before the lookup)
    assert (event["outcome"], event["detail"]) == ("error", "dependency_unavailable")


async def test_a_grant_read_is_recorded_once_after_its_lookup(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    [first, *_] = await made(harness)
    answer = await call(harness, "GET", f"/api/v1/grants/{first}", "admin")
    assert answer.status == 200, answer.body
    event = the_event(harness, answer)
    assert (event["action"], event["outcome"], event["target"]) == (
        "read_grants",
        "success",
        f"patient:{KEY}",
    )


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/grants?gratnee=cg-1",
        f"/api/v1/imaging/patient/{PLANTED}?limt=5",
        "/api/v1/research/analyses?aftr=x",
    ],
)
async def test_a_misspelt_filter_of_a_read_is_422_naming_the_ones_it_takes(tmp_path: Path, path: str) -> None:
    """FastAPI ignores query parameters a route does not declare: until the twenty-second session
    ``?gratnee=cg-1`` answered every grant of the tenant as if filtered. The answer names the parameters
    the route takes, never the one sent."""
    harness = gateway_routes(tmp_path)
    await made(harness)
    role = "admin" if "grants" in path else "clinician"
    answer = await call(harness, "GET", path, role)
    assert answer.status == 422, answer.body
    [problem] = json.loads(answer.body)["problems"]
    assert problem["field"] == "query" and "it takes: " in problem["problem"]
    assert all(sent not in answer.body.decode() for sent in ("gratnee", "limt", "aftr"))
    event = the_event(harness, answer)
    assert (event["outcome"], event["detail"]) == ("rejected", "invalid_request")


async def test_a_read_without_query_parameters_still_ignores_extra_ones(tmp_path: Path) -> None:
    """A route that takes none (the grant by id, the instance status) ignores them, as before: a
    client's cache-busting ``?_=...`` keeps working."""
    harness = gateway_routes(tmp_path)
    [first, *_] = await made(harness)
    answer = await call(harness, "GET", f"/api/v1/grants/{first}?_=1732460000", "admin")
    assert answer.status == 200, answer.body
