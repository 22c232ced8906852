"""Restricted patients (docs/gateway.md, "Restricted patients"): an admin's confidentiality flag on one
patient makes its PHI need break-glass even for the tenant's clinicians; every read under break-glass
raises a security alert; every request is recorded with the answer it got.

Until the twenty-second session nothing could restrict a patient (``Resource.restricted`` was never
set by the gateway), so the break-glass read path could not be reached: a clinician's role allowed
every PHI read of its tenant, and a break-glass session changed nothing.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from enclave_common import topics
from enclave_gateway.restrictions_api import LIFT_UNRECORDED, RESTRICTION_UNRECORDED
from pymongo.errors import ServerSelectionTimeoutError
from route_harness import PSEUDONYMIZER, Exchange, Harness, asgi_request, gateway_routes
from test_access_answers import the_event
from test_unaudited_grants import refuse

IMAGING_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
OTHER_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c"
ANALYSIS_ID = "an-" + "1" * 32
PLANTED = "PHI-MRN-77310-RV"
OTHER_PATIENT = "PHI-MRN-77311-RW"
KEY = PSEUDONYMIZER.pseudonym("hospital-a", "patient", PLANTED)
REASON = "hospital employee, privacy office request"


def stored(harness: Harness, imaging_id: str = IMAGING_ID, patient_id: str = PLANTED) -> None:
    harness.read_model.docs[imaging_id] = {
        "_id": imaging_id,
        "tenant": "hospital-a",
        "upload_id": "up-1",
        "patient_key": PSEUDONYMIZER.pseudonym("hospital-a", "patient", patient_id),
        "study_key": "st-1",
        "latest_analysis": f"ev-1|{ANALYSIS_ID}|completed",
    }


async def call(
    harness: Harness,
    method: str,
    path: str,
    role: str,
    body: dict[str, Any] | None = None,
    *,
    tenant: str = "hospital-a",
    subject: str | None = None,
    also: tuple[str, ...] = (),
) -> Exchange:
    """``method path`` as ``subject`` (default ``it-<role>``) holding ``role`` and the roles ``also``."""
    token = harness.token(tenant, role, *also, subject=subject or f"it-{role}")
    headers = [("authorization", f"Bearer {token}")]
    pieces: list[bytes] = []
    if body is not None:
        data = json.dumps(body).encode()
        headers += [("content-type", "application/json"), ("content-length", str(len(data)))]
        pieces = [data]
    return await asgi_request(harness.app, method, path.encode(), headers, pieces)


async def restrict(harness: Harness, patient_id: str = PLANTED, **kwargs: Any) -> Exchange:
    return await call(
        harness,
        "POST",
        "/api/v1/restrictions",
        "admin",
        {"patient_id": patient_id, "justification": REASON},
        **kwargs,
    )


async def grant_results(harness: Harness, patient_id: str) -> Exchange:
    """An admin's grant of the patient's results to it-caregiver."""
    return await call(
        harness,
        "POST",
        "/api/v1/grants",
        "admin",
        {
            "grantee": "it-caregiver",
            "patient_id": patient_id,
            "actions": ["read_results_phi"],
            "expires_at": (datetime.now(UTC) + timedelta(days=2)).isoformat(),
            "justification": "daughter, consent form on file",
        },
    )


LIFTED_BECAUSE = "employment ended, privacy office decision"


async def lift(
    harness: Harness, patient_key: str, justification: str = LIFTED_BECAUSE, **kwargs: Any
) -> Exchange:
    return await call(
        harness,
        "POST",
        f"/api/v1/restrictions/{patient_key}/lift",
        "admin",
        {"justification": justification},
        **kwargs,
    )


def hold_the_liftings_record(harness: Harness, *, then_refuse: bool) -> tuple[asyncio.Event, asyncio.Event]:
    """Kafka holds a lifting's access event until ``release`` is set (``held`` is set once it is held),
    then acknowledges it, or refuses it with ``then_refuse``."""
    held, release = asyncio.Event(), asyncio.Event()
    send = harness.publisher.send

    async def holding(topic: str, envelope: Any, *, key: str) -> Any:
        if envelope.data.get("detail", "").startswith("restriction_lifted"):
            held.set()
            await release.wait()
            if then_refuse:
                raise TimeoutError("not acknowledged")
        return await send(topic, envelope, key=key)

    harness.publisher.send = holding  # type: ignore[method-assign]
    return held, release


async def ready_for(tmp_path: Path, change: str) -> Harness:
    """A harness with the instance stored, and for ``change`` "lift" the patient restricted."""
    harness = gateway_routes(tmp_path)
    stored(harness)
    if change == "lift":
        await restrict(harness)
    return harness


async def make(harness: Harness, change: str) -> Exchange:
    """The request of ``change``: restrict the patient, or lift its restriction."""
    return await (restrict(harness) if change == "restrict" else lift(harness, KEY))


def alerts(harness: Harness) -> list[Any]:
    return [e for t, e in harness.publisher.sent if t == topics.SECURITY_ALERT]


def everything_sent(harness: Harness, *answers: Exchange) -> str:
    return json.dumps([e.model_dump(mode="json") for _, e in harness.publisher.sent]) + "".join(
        a.body.decode() for a in answers
    )


async def test_a_restricted_patients_phi_needs_break_glass_and_each_read_under_it_raises_an_alert(
    tmp_path: Path,
) -> None:
    harness = gateway_routes(tmp_path)
    stored(harness)
    restricted = await restrict(harness)
    assert restricted.status == 201, restricted.body
    view = json.loads(restricted.body)
    assert (view["patient_key"], view["restricted"], view["restricted_by"]) == (KEY, True, "it-admin")
    event = the_event(harness, restricted)
    assert (event["action"], event["outcome"], event["detail"], event["target"]) == (
        "manage_restrictions",
        "success",
        f"patient_restricted restricted_at={view['restricted_at']} active_grants=0",
        f"patient:{KEY}",
    )
    assert view["active_grants"] == []

    # The clinician's role no longer suffices for PHI: 403, with how to proceed.
    refusals = [
        await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "clinician"),
        await call(harness, "GET", f"/api/v1/imaging/patient/{PLANTED}", "clinician"),
    ]
    for refused in refusals:
        assert refused.status == 403, refused.body
        body = json.loads(refused.body)
        assert body["detail"]["code"] == "break_glass_required"
        assert body["detail"]["break_glass_available"] is True
        assert "restricted" in body["message"] and "break-glass" in body["message"]
        refusal = the_event(harness, refused)
        assert (refusal["outcome"], refusal["detail"]) == (
            "denied",
            "break_glass_required restricted_patient",
        )
    # The status (no PHI) is read as before.
    assert (await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}", "clinician")).status == 200
    assert alerts(harness) == []

    opened = await call(
        harness,
        "POST",
        "/api/v1/break-glass",
        "clinician",
        {"patient_id": PLANTED, "justification": "unconscious patient in the emergency room"},
    )
    assert opened.status == 201, opened.body
    reads = [
        await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "clinician"),
        await call(harness, "GET", f"/api/v1/imaging/patient/{PLANTED}", "clinician"),
    ]
    for read in reads:
        assert read.status == 200, read.body
        assert the_event(harness, read)["detail"] == "break_glass"
    rules = [a.data["rule"] for a in alerts(harness)]
    assert rules == ["break_glass_opened", "break_glass", "break_glass"]
    assert all(KEY in a.data["detail"] for a in alerts(harness))
    assert PLANTED not in everything_sent(harness, restricted, *refusals, opened, *reads)


async def test_only_the_restricted_patient_and_only_the_tenant_scope_is_affected(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    stored(harness)
    stored(harness, OTHER_ID, OTHER_PATIENT)
    assert (await restrict(harness)).status == 201
    # Another patient of the tenant: read by role, as before.
    assert (await call(harness, "GET", f"/api/v1/imaging/{OTHER_ID}/analysis", "clinician")).status == 200
    # The same patient key in another tenant's name is another patient (keys are tenant-scoped).
    assert (await restrict(harness, tenant="hospital-b")).status == 201
    assert len(harness.restrictions._restrictions) == 2
    # A caregiver an admin granted this patient reads what the grant names: no break-glass, no alert.
    grant = await grant_results(harness, PLANTED)
    assert grant.status == 201, grant.body
    granted = await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "caregiver")
    assert granted.status == 200, granted.body
    assert the_event(harness, granted)["detail"] == "grant"
    assert alerts(harness) == []


async def test_an_admin_whose_reads_a_restriction_holds_back_may_restrict_but_not_lift(
    tmp_path: Path,
) -> None:
    """Separation of duties: an admin who is also a clinician lifting a restriction would lift its own
    limit (lift, read by role, restrict again). It may restrict (that only narrows) and read under
    break-glass; another admin lifts. Until the twenty-third session it could lift."""
    harness = gateway_routes(tmp_path)
    stored(harness)
    both = {"subject": "it-admin-clinician", "also": ("clinician",)}
    restricted = await restrict(harness, **both)
    assert restricted.status == 201, restricted.body
    refused = await lift(harness, KEY, **both)
    assert refused.status == 403, refused.body
    detail = json.loads(refused.body)["detail"]
    assert detail["code"] == "separation_of_duties"
    assert "clinician" in detail["message"]
    assert "an admin without those roles must lift it" in detail["message"]
    event = the_event(harness, refused)
    assert (event["action"], event["outcome"], event["detail"], event["target"]) == (
        "manage_restrictions",
        "denied",
        "separation_of_duties",
        f"patient:{KEY}",
    )
    # Nothing was lifted: its reads by role are still held back.
    assert await harness.restrictions.get("hospital-a", KEY) is not None
    assert harness.restrictions.history == []
    read = await call(
        harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "clinician", subject="it-admin-clinician"
    )
    assert read.status == 403, read.body
    assert json.loads(read.body)["detail"]["code"] == "break_glass_required"
    # A refusal is not a bad request: the justification is not even looked at.
    short = await lift(harness, KEY, "short", **both)
    assert json.loads(short.body)["detail"]["code"] == "separation_of_duties"
    # An admin holding a role the restriction does not hold back (a caregiver's grant still applies,
    # restricted or not) lifts, as does an admin alone.
    lifted = await lift(harness, KEY, subject="it-admin-caregiver", also=("caregiver",))
    assert lifted.status == 200, lifted.body
    assert PLANTED not in everything_sent(harness, restricted, refused, read, lifted)


async def test_restricting_twice_is_200_and_records_who_restricted_and_when(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    first = await restrict(harness)
    again = await restrict(harness, subject="it-other-admin")
    assert again.status == 200, again.body
    assert json.loads(again.body)["restricted_by"] == "it-admin"
    detail = the_event(harness, again)["detail"]
    assert detail == (
        f"patient_restricted_already restricted_by=it-admin restricted_at={json.loads(first.body)['restricted_at']}"
    )


async def test_lifting_restores_the_clinicians_role_and_lifting_again_is_404(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    stored(harness)
    await restrict(harness)
    lifted = await lift(harness, KEY)
    assert lifted.status == 200, lifted.body
    view = json.loads(lifted.body)
    assert (view["restricted"], view["lifted_by"], view["restricted_by"]) == (False, "it-admin", "it-admin")
    event = the_event(harness, lifted)
    assert (event["outcome"], event["target"]) == ("success", f"patient:{KEY}")
    assert event["detail"].startswith("restriction_lifted restricted_by=it-admin restricted_at=")
    assert (await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "clinician")).status == 200
    again = await lift(harness, KEY)
    assert again.status == 404, again.body
    assert json.loads(again.body)["error"] == "not_found"  # the app's one 404
    assert (the_event(harness, again)["outcome"], the_event(harness, again)["detail"]) == (
        "not_found",
        "not_found",
    )
    [kept] = harness.restrictions.history  # the lifted restriction, both justifications with it
    assert (kept.restriction.justification, kept.lifted_by, kept.justification) == (
        REASON,
        "it-admin",
        LIFTED_BECAUSE,
    )
    assert kept.lifted_at.isoformat() == view["lifted_at"]


async def test_another_tenants_restriction_is_neither_listed_nor_lifted(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    other_key = PSEUDONYMIZER.pseudonym("hospital-b", "patient", PLANTED)
    await restrict(harness, tenant="hospital-b")
    await restrict(harness)
    refused = await lift(harness, other_key)
    assert refused.status == 404, refused.body
    assert len(harness.restrictions._restrictions) == 2
    listing = await call(harness, "GET", "/api/v1/restrictions", "admin")
    assert listing.status == 200, listing.body
    assert [r["patient_key"] for r in json.loads(listing.body)["restrictions"]] == [KEY]
    event = the_event(harness, listing)
    assert (event["action"], event["outcome"]) == ("read_restrictions", "success")


async def test_the_listing_pages_by_patient_key(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    for n in range(5):
        await restrict(harness, f"PID-{n}")
    keys: list[str] = []
    path = "/api/v1/restrictions?limit=2"
    while True:
        page = json.loads((await call(harness, "GET", path, "admin")).body)
        keys += [r["patient_key"] for r in page["restrictions"]]
        if page["next_after"] is None:
            break
        path = f"/api/v1/restrictions?limit=2&after={page['next_after']}"
    assert keys == sorted(PSEUDONYMIZER.pseudonym("hospital-a", "patient", f"PID-{n}") for n in range(5))


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/restrictions", {"patient_id": PLANTED, "justification": REASON}),
        ("POST", f"/api/v1/restrictions/{KEY}/lift", {"justification": LIFTED_BECAUSE}),
        ("GET", "/api/v1/restrictions", None),
    ],
)
@pytest.mark.parametrize("role", ["uploader", "clinician", "researcher", "auditor", "caregiver"])
async def test_only_admins_manage_restrictions(
    tmp_path: Path, method: str, path: str, body: dict[str, Any] | None, role: str
) -> None:
    harness = gateway_routes(tmp_path)
    answer = await call(harness, method, path, role, body)
    assert answer.status == 403, answer.body
    assert the_event(harness, answer)["outcome"] == "denied"
    assert harness.restrictions._restrictions == {}


@pytest.mark.parametrize(
    ("body", "error", "detail"),
    [
        ({"patient_id": PLANTED, "justification": "short"}, "invalid_restriction", "restriction_refused"),
        ({"patient_id": "   ", "justification": REASON}, "invalid_request", "invalid_request"),
        ({"patient_id": PLANTED * 5, "justification": REASON}, "invalid_request", "invalid_request"),
        ({"patient_id": PLANTED, "justification": REASON, "extra": 1}, "invalid_request", "invalid_request"),
    ],
)
async def test_a_refused_restriction_says_what_is_allowed_stores_nothing_and_is_recorded(
    tmp_path: Path, body: dict[str, Any], error: str, detail: str
) -> None:
    harness = gateway_routes(tmp_path)
    answer = await call(harness, "POST", "/api/v1/restrictions", "admin", body)
    assert answer.status == 422, answer.body
    answered = json.loads(answer.body)
    assert answered["error"] == error, answered
    assert harness.restrictions._restrictions == {}
    event = the_event(harness, answer)
    assert (event["outcome"], event["detail"].split(":")[0]) == ("rejected", detail)
    if body["patient_id"].strip():  # the planted id (or five of it), never echoed
        assert body["patient_id"] not in everything_sent(harness, answer)


@pytest.mark.parametrize("path", ["/api/v1/restrictions/NOT-A-KEY/lift", "/api/v1/restrictions?after=zz"])
async def test_a_patient_key_that_is_no_pseudonym_is_422(tmp_path: Path, path: str) -> None:
    harness = gateway_routes(tmp_path)
    if "?" in path:
        answer = await call(harness, "GET", path, "admin")
    else:
        answer = await call(harness, "POST", path, "admin", {"justification": LIFTED_BECAUSE})
    assert answer.status == 422, answer.body
    assert the_event(harness, answer)["outcome"] == "rejected"


async def test_a_restriction_kafka_did_not_record_is_not_made(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    stored(harness)
    refuse(harness, topics.ACCESS_RECORDED, times=1)
    first = await restrict(harness)
    assert first.status == 503, first.body
    assert json.loads(first.body)["message"].startswith(RESTRICTION_UNRECORDED)
    # The refused 201 may still reach the trail (a timed-out acknowledgement is not a recall): the
    # request's second event says nothing was made.
    [event] = harness.publisher.access_events()
    assert (event["status_code"], event["detail"].split(" ")[0], event["detail"].split(" ")[-1]) == (
        503,
        "restriction_not_stored",
        "cause=access_unrecorded",
    )
    assert harness.restrictions._restrictions == {}
    assert (await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "clinician")).status == 200
    again = await restrict(harness)
    assert again.status == 201, again.body


async def test_a_lifting_kafka_did_not_record_is_not_made(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    stored(harness)
    await restrict(harness)
    refuse(harness, topics.ACCESS_RECORDED, times=1)
    answer = await lift(harness, KEY)
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["message"].startswith(LIFT_UNRECORDED)
    assert list(harness.restrictions._restrictions) == [("hospital-a", KEY)]
    assert harness.restrictions.history == []
    event = the_event(harness, answer)
    assert (event["detail"].split(" ")[0], event["detail"].split(" ")[-1]) == (
        "restriction_not_lifted",
        "cause=access_unrecorded",
    )
    assert (await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "clinician")).status == 403


async def test_no_read_is_allowed_by_role_while_a_lifting_is_being_recorded(tmp_path: Path) -> None:
    """The review's case: the lifting's event held by Kafka, a clinician reads meanwhile. Until the
    review of the twenty-second session the restriction was removed first, so that read got 200 by role
    although the lifting was then refused (503) and the trail never said it had happened."""
    harness = gateway_routes(tmp_path)
    stored(harness)
    await restrict(harness)
    held, release = hold_the_liftings_record(harness, then_refuse=True)
    lifting = asyncio.create_task(lift(harness, KEY))
    await held.wait()
    meanwhile = await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "clinician")
    release.set()
    assert meanwhile.status == 403, meanwhile.body
    assert (await lifting).status == 503


@pytest.mark.parametrize("change", ["restrict", "lift"])
async def test_a_change_the_store_did_not_make_after_its_record_is_a_503_with_a_second_event(
    tmp_path: Path, change: str
) -> None:
    harness = await ready_for(tmp_path, change)

    async def silent(*_: object, **__: object) -> Any:
        raise ServerSelectionTimeoutError("no server answered")

    setattr(harness.restrictions, change, silent)
    answer = await make(harness, change)
    assert answer.status == 503, answer.body
    rid = answer.header("x-request-id")
    recorded, failed = [e for e in harness.publisher.access_events() if e["correlation_id"] == rid]
    assert recorded["status_code"] == (201 if change == "restrict" else 200)
    word = "stored" if change == "restrict" else "lifted"
    assert (failed["outcome"], failed["status_code"]) == ("error", 503)
    assert failed["detail"].startswith(f"restriction_not_{word} ")
    assert failed["detail"].endswith(" cause=dependency_unavailable")
    # The patient keeps the state it had.
    expected = 200 if change == "restrict" else 403
    assert (
        await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "clinician")
    ).status == expected


async def test_a_lookup_the_store_did_not_answer_is_503_and_recorded(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)

    async def silent(*_: object, **__: object) -> Any:
        raise ServerSelectionTimeoutError("no server answered")

    harness.restrictions.get = silent  # type: ignore[method-assign]
    answer = await restrict(harness)
    assert answer.status == 503, answer.body
    event = the_event(harness, answer)
    assert (event["outcome"], event["detail"]) == ("error", "dependency_unavailable")


async def test_restricting_names_the_grants_and_sessions_that_stay_in_effect(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    grant = await grant_results(harness, PLANTED)
    other_patient = await grant_results(harness, OTHER_PATIENT)
    assert {grant.status, other_patient.status} == {201}
    answer = await restrict(harness)
    assert answer.status == 201, answer.body
    assert [g["grant_id"] for g in json.loads(answer.body)["active_grants"]] == [
        json.loads(grant.body)["grant_id"]
    ]
    assert the_event(harness, answer)["detail"].endswith(" active_grants=1")


async def test_a_clinicians_phi_read_of_an_unrestricted_patient_looks_the_restriction_up_once(
    tmp_path: Path,
) -> None:
    """One lookup by the patient's key for a clinician's PHI read; none for a status read or a caregiver
    (a restriction cannot change those decisions)."""
    harness = gateway_routes(tmp_path)
    stored(harness)
    asked: list[tuple[str, str]] = []
    get_restriction = harness.restrictions.get

    async def counted(tenant: str, patient_key: str) -> Any:
        asked.append((tenant, patient_key))
        return await get_restriction(tenant, patient_key)

    harness.restrictions.get = counted  # type: ignore[method-assign]
    assert (await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "clinician")).status == 200
    assert asked == [("hospital-a", KEY)]
    assert (await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}", "clinician")).status == 200
    assert (await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "caregiver")).status == 404
    assert asked == [("hospital-a", KEY)]


async def test_a_padded_patient_id_names_the_patient_its_uploads_name(tmp_path: Path) -> None:
    """DICOM pads values with spaces and uploads are keyed without them; so are a restriction, a grant and
    a break-glass session (until the twenty-second session a grant on " PID " was keyed apart)."""
    harness = gateway_routes(tmp_path)
    assert json.loads((await restrict(harness, f"  {PLANTED} ")).body)["patient_key"] == KEY
    grant = await call(
        harness,
        "POST",
        "/api/v1/grants",
        "admin",
        {
            "grantee": "it-caregiver",
            "patient_id": f"{PLANTED}  ",
            "actions": ["read_status"],
            "expires_at": (datetime.now(UTC) + timedelta(days=2)).isoformat(),
            "justification": "daughter, consent form on file",
        },
    )
    session = await call(
        harness,
        "POST",
        "/api/v1/break-glass",
        "clinician",
        {"patient_id": f" {PLANTED}", "justification": "unconscious patient in the emergency room"},
    )
    assert [json.loads(a.body)["patient_key"] for a in (grant, session)] == [KEY, KEY]


def request_events(harness: Harness, answer: Exchange) -> list[dict[str, Any]]:
    rid = answer.header("x-request-id")
    return [e for e in harness.publisher.access_events() if e["correlation_id"] == rid]


async def test_a_restriction_confirmed_while_a_lifting_is_recorded_is_not_lifted(tmp_path: Path) -> None:
    """The review's race: admin B is told the patient is restricted (200) while admin A's lifting is
    being recorded; A's lifting then removes nothing and is answered 409, with a second event."""
    harness = gateway_routes(tmp_path)
    stored(harness)
    await restrict(harness)
    held, release = hold_the_liftings_record(harness, then_refuse=False)
    lifting = asyncio.create_task(lift(harness, KEY))
    await held.wait()
    confirmed = await restrict(harness, subject="it-admin-b")
    assert confirmed.status == 200, confirmed.body
    release.set()
    lifted = await lifting
    assert lifted.status == 409, lifted.body
    assert json.loads(lifted.body)["error"] == "restricted_again"
    first, second = request_events(harness, lifted)
    assert first["detail"].startswith("restriction_lifted ")
    assert (second["status_code"], second["detail"].split(" ")[0]) == (409, "restriction_not_lifted")
    assert "cause=restricted_again" in second["detail"]
    assert (await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "clinician")).status == 403


async def test_two_admins_restricting_at_once_get_one_restriction_and_a_true_record(tmp_path: Path) -> None:
    """Both find no restriction; the second one's store finds the first's: it is answered 200 with the
    restriction in effect, and its second event says its own was not made."""
    harness = gateway_routes(tmp_path)
    restrict_first = harness.restrictions.restrict
    earlier = None

    async def beaten(restriction: Any) -> Any:
        nonlocal earlier
        earlier = replace(restriction, restricted_by="it-admin-a")
        await restrict_first(earlier)
        return await restrict_first(restriction)

    harness.restrictions.restrict = beaten  # type: ignore[method-assign]
    answer = await restrict(harness)
    assert answer.status == 200, answer.body
    assert json.loads(answer.body)["restricted_by"] == "it-admin-a"
    first, second = request_events(harness, answer)
    assert (first["status_code"], second["status_code"]) == (201, 200)
    assert second["detail"].startswith("restriction_not_stored ")
    assert "cause=restricted_already restricted_by=it-admin-a" in second["detail"]


@pytest.mark.parametrize("change", ["restrict", "lift"])
async def test_a_write_whose_answer_was_lost_but_which_was_made_is_answered_as_made(
    tmp_path: Path, change: str
) -> None:
    harness = await ready_for(tmp_path, change)
    write = getattr(harness.restrictions, change)

    async def applied_then_lost(*args: Any, **kwargs: Any) -> Any:
        await write(*args, **kwargs)
        raise ServerSelectionTimeoutError("the answer was lost")

    setattr(harness.restrictions, change, applied_then_lost)
    answer = await make(harness, change)
    assert answer.status == (201 if change == "restrict" else 200), answer.body
    assert len(request_events(harness, answer)) == 1


async def test_a_lift_whose_outcome_the_store_cannot_tell_says_so(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    await restrict(harness)

    async def silent(*_: object, **__: object) -> Any:
        raise ServerSelectionTimeoutError("no server answered")

    harness.restrictions.lift = silent  # type: ignore[method-assign]
    read = harness.restrictions.get
    calls = 0

    async def then_silent(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise ServerSelectionTimeoutError("no server answered")
        return await read(*args)

    harness.restrictions.get = then_silent  # type: ignore[method-assign]
    answer = await lift(harness, KEY)
    assert answer.status == 503, answer.body
    _, second = request_events(harness, answer)
    assert second["detail"].startswith("restriction_state_unknown ")


async def test_restricting_names_grants_that_begin_later_too(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    later = await call(
        harness,
        "POST",
        "/api/v1/grants",
        "admin",
        {
            "grantee": "it-caregiver",
            "patient_id": PLANTED,
            "actions": ["read_results_phi"],
            "not_before": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
            "expires_at": (datetime.now(UTC) + timedelta(days=2)).isoformat(),
            "justification": "daughter, consent form on file",
        },
    )
    assert later.status == 201, later.body
    answer = json.loads((await restrict(harness)).body)
    assert [g["grant_id"] for g in answer["active_grants"]] == [json.loads(later.body)["grant_id"]]
    assert answer["active_grants_truncated"] is False


async def test_a_lifting_without_a_valid_justification_is_422_and_lifts_nothing(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    stored(harness)
    await restrict(harness)
    short = await lift(harness, KEY, "ok")
    assert short.status == 422, short.body
    assert json.loads(short.body)["error"] == "invalid_restriction"
    assert (the_event(harness, short)["outcome"], the_event(harness, short)["detail"]) == (
        "rejected",
        "lift_refused:invalid_restriction",
    )
    missing = await call(harness, "POST", f"/api/v1/restrictions/{KEY}/lift", "admin", {})
    assert missing.status == 422, missing.body
    assert list(harness.restrictions._restrictions) == [("hospital-a", KEY)]
    assert (await call(harness, "GET", f"/api/v1/imaging/{IMAGING_ID}/analysis", "clinician")).status == 403
