"""Access over HTTP on the running gateway: one table (role x endpoint x own/other tenant, with and
without a patient grant) gives the expected status of every cell; JWT attacks get 401 with a
``WWW-Authenticate`` challenge; and every decision is an ``access.recorded`` event (found by the
``X-Request-ID`` each request carries)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from enclave_common import topics
from enclave_common.auth.dev_issuer import DevIssuer

from .support import mr_instance
from .test_gateway_support import GATEWAY, TopicWatch, bearer, issuer, new_tenant, patient_key

#: Principals of tenant A. ``caregiver+grant`` holds an admin's grant on patient P of tenant A.
ROLES = ("uploader", "clinician", "researcher", "auditor", "admin", "caregiver", "caregiver+grant")
OWN, OTHER = "own", "other"

#: THE table: endpoint -> role -> (status on own tenant's target, status on other tenant's target).
#: Endpoints without a target in another tenant (upload, the research listing of one's own tenant,
#: create grant, break-glass, patient key, token revocation, create and list restrictions) list one
#: status.
EXPECTED: dict[str, dict[str, tuple[int, ...]]] = {
    "upload": {"uploader": (200,), "clinician": (403,), "researcher": (403,), "auditor": (403,),
               "admin": (403,), "caregiver": (403,), "caregiver+grant": (403,)},
    "status": {"uploader": (200, 404), "clinician": (200, 404), "researcher": (200, 404), "auditor": (403, 403),
               "admin": (403, 403), "caregiver": (404, 404), "caregiver+grant": (200, 404)},
    # One upload's instances: read by the roles that read status in the tenant; a caregiver's grant
    # names one patient, not an upload.
    "upload_status": {"uploader": (200, 404), "clinician": (200, 404), "researcher": (200, 404),
                      "auditor": (403, 403), "admin": (403, 403), "caregiver": (404, 404),
                      "caregiver+grant": (404, 404)},
    "analysis": {"uploader": (403, 403), "clinician": (200, 404), "researcher": (403, 403), "auditor": (403, 403),
                 "admin": (403, 403), "caregiver": (404, 404), "caregiver+grant": (200, 404)},
    # A patient of another tenant is, in one's own tenant, a patient with no instances (200, empty).
    "patient": {"uploader": (403, 403), "clinician": (200, 200), "researcher": (403, 403), "auditor": (403, 403),
                "admin": (403, 403), "caregiver": (404, 404), "caregiver+grant": (200, 404)},
    "research": {"uploader": (403,), "clinician": (200,), "researcher": (200,), "auditor": (403,),
                 "admin": (403,), "caregiver": (403,), "caregiver+grant": (403,)},
    "grant_create": {"uploader": (403,), "clinician": (403,), "researcher": (403,), "auditor": (403,),
                     "admin": (201,), "caregiver": (403,), "caregiver+grant": (403,)},
    "grant_list": {"uploader": (403,), "clinician": (403,), "researcher": (403,), "auditor": (403,),
                   "admin": (200,), "caregiver": (403,), "caregiver+grant": (403,)},
    "grant_read": {"uploader": (403, 403), "clinician": (403, 403), "researcher": (403, 403), "auditor": (403, 403),
                   "admin": (200, 404), "caregiver": (403, 403), "caregiver+grant": (403, 403)},
    "grant_revoke": {"uploader": (403, 403), "clinician": (403, 403), "researcher": (403, 403), "auditor": (403, 403),
                     "admin": (200, 404), "caregiver": (403, 403), "caregiver+grant": (403, 403)},
    "break_glass": {"uploader": (403,), "clinician": (201,), "researcher": (403,), "auditor": (403,),
                    "admin": (403,), "caregiver": (403,), "caregiver+grant": (403,)},
    # Restricted patients: patient R of tenant A is restricted by the admin's cell, then lifted; the
    # other tenant's cell names R's key in tenant B, restricted there by the fixture.
    # A patient id's key, for the audit trail: auditors and admins of the tenant (no other target).
    "patient_key": {"uploader": (403,), "clinician": (403,), "researcher": (403,), "auditor": (200,),
                    "admin": (200,), "caregiver": (403,), "caregiver+grant": (403,)},
    # Ending a subject's tokens (a subject no other cell uses): admins of the tenant.
    "token_revoke": {"uploader": (403,), "clinician": (403,), "researcher": (403,), "auditor": (403,),
                     "admin": (201,), "caregiver": (403,), "caregiver+grant": (403,)},
    "restriction_create": {"uploader": (403,), "clinician": (403,), "researcher": (403,), "auditor": (403,),
                           "admin": (201,), "caregiver": (403,), "caregiver+grant": (403,)},
    "restriction_list": {"uploader": (403,), "clinician": (403,), "researcher": (403,), "auditor": (403,),
                         "admin": (200,), "caregiver": (403,), "caregiver+grant": (403,)},
    "restriction_lift": {"uploader": (403, 403), "clinician": (403, 403), "researcher": (403, 403),
                         "auditor": (403, 403), "admin": (200, 404), "caregiver": (403, 403),
                         "caregiver+grant": (403, 403)},
}  # fmt: skip


@dataclass
class World:
    """Two tenants, each with one uploaded patient and one grant; tenant A's caregiver is granted P."""

    tenant_a: str
    tenant_b: str
    patient_a: str
    patient_b: str
    imaging_a: str
    imaging_b: str
    grant_a: str
    grant_b: str
    #: A patient with no instances, restricted in tenant B by the fixture and in A by the matrix.
    patient_r: str
    #: The uploads of imaging_a and imaging_b.
    upload_a: str
    upload_b: str


def _role_headers(world: World, role: str) -> dict[str, str]:
    if role == "caregiver+grant":
        return bearer("it-cg-granted", world.tenant_a, "caregiver")
    return bearer(f"it-{role}", world.tenant_a, role)


def _grant_body(patient_id: str, grantee: str = "it-cg-granted") -> dict[str, Any]:
    return {
        "grantee": grantee,
        "patient_id": patient_id,
        "actions": ["read_status", "read_results_phi", "query_patient"],
        "expires_at": (datetime.now(UTC) + timedelta(hours=2)).isoformat(),
        "justification": "caregiver follow-up agreed with the care team",
    }


def _restriction_body(patient_id: str) -> dict[str, Any]:
    return {"patient_id": patient_id, "justification": "hospital employee, privacy office request"}


def _upload(client: httpx.Client, tenant: str, patient_id: str) -> tuple[str, str]:
    """The imaging id and the upload id of one instance of ``patient_id`` uploaded to ``tenant``."""
    data, _ = mr_instance(patient_id=patient_id)
    answer = client.post(
        f"{GATEWAY}/api/v1/imaging/upload",
        files=[("file", ("x.dcm", data, "application/dicom"))],
        headers=bearer("it-setup", tenant, "uploader"),
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["accepted"][0]["imaging_id"]), str(answer.json()["upload_id"])


def _grant(client: httpx.Client, tenant: str, patient_id: str) -> str:
    answer = client.post(
        f"{GATEWAY}/api/v1/grants",
        json=_grant_body(patient_id),
        headers=bearer("it-admin-setup", tenant, "admin"),
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["grant_id"])


@pytest.fixture(scope="module")
def world() -> World:
    tenant_a, tenant_b = new_tenant("it-acl-a"), new_tenant("it-acl-b")
    patient_a, patient_b = f"PID-A-{uuid.uuid4().hex[:8]}", f"PID-B-{uuid.uuid4().hex[:8]}"
    with httpx.Client(timeout=30) as client:
        imaging_a, upload_a = _upload(client, tenant_a, patient_a)
        imaging_b, upload_b = _upload(client, tenant_b, patient_b)
        _grant(client, tenant_a, patient_a)  # for it-cg-granted on P
        grant_a = _grant(client, tenant_a, patient_a)  # revoked by the matrix's admin cell
        grant_b = _grant(client, tenant_b, patient_b)
        patient_r = f"PID-R-{uuid.uuid4().hex[:8]}"
        restricted = client.post(
            f"{GATEWAY}/api/v1/restrictions",
            json=_restriction_body(patient_r),
            headers=bearer("it-admin-setup", tenant_b, "admin"),
        )
        assert restricted.status_code == 201, restricted.text
    return World(
        tenant_a,
        tenant_b,
        patient_a,
        patient_b,
        imaging_a,
        imaging_b,
        grant_a,
        grant_b,
        patient_r,
        upload_a,
        upload_b,
    )


def _request(world: World, endpoint: str, target: str) -> tuple[str, str, dict[str, Any]]:
    """(method, url, httpx keyword arguments) of one cell."""
    own = target == OWN
    imaging = world.imaging_a if own else world.imaging_b
    if endpoint == "upload":
        data, _ = mr_instance(patient_id=world.patient_a)
        return (
            "POST",
            f"{GATEWAY}/dicomweb/studies",
            {"content": data, "headers": {"Content-Type": "application/dicom"}},
        )
    if endpoint == "status":
        return "GET", f"{GATEWAY}/api/v1/imaging/{imaging}", {}
    if endpoint == "analysis":
        return "GET", f"{GATEWAY}/api/v1/imaging/{imaging}/analysis", {}
    if endpoint == "upload_status":
        return "GET", f"{GATEWAY}/api/v1/uploads/{world.upload_a if own else world.upload_b}", {}
    if endpoint == "patient":
        return "GET", f"{GATEWAY}/api/v1/imaging/patient/{world.patient_a if own else world.patient_b}", {}
    if endpoint == "research":
        return "GET", f"{GATEWAY}/api/v1/research/analyses", {}
    if endpoint == "grant_create":
        return "POST", f"{GATEWAY}/api/v1/grants", {"json": _grant_body(world.patient_a, "it-cg-other")}
    if endpoint == "grant_list":
        return "GET", f"{GATEWAY}/api/v1/grants", {}
    if endpoint == "grant_read":
        return "GET", f"{GATEWAY}/api/v1/grants/{world.grant_a if own else world.grant_b}", {}
    if endpoint == "grant_revoke":
        return "DELETE", f"{GATEWAY}/api/v1/grants/{world.grant_a if own else world.grant_b}", {}
    if endpoint == "break_glass":
        return (
            "POST",
            f"{GATEWAY}/api/v1/break-glass",
            {
                "json": {
                    "patient_id": world.patient_a,
                    "justification": "unconscious patient in the emergency room",
                }
            },
        )
    if endpoint == "patient_key":
        return "POST", f"{GATEWAY}/api/v1/patient-keys", {"json": {"patient_id": world.patient_a}}
    if endpoint == "token_revoke":
        body = {"subject": "it-matrix-nobody", "justification": "incident drill, matrix test"}
        return "POST", f"{GATEWAY}/api/v1/token-revocations", {"json": body}
    if endpoint == "restriction_create":
        return "POST", f"{GATEWAY}/api/v1/restrictions", {"json": _restriction_body(world.patient_r)}
    if endpoint == "restriction_list":
        return "GET", f"{GATEWAY}/api/v1/restrictions", {}
    if endpoint == "restriction_lift":
        key = patient_key(world.tenant_a if own else world.tenant_b, world.patient_r)
        lifting = {"justification": "employment ended, privacy office decision"}
        return "POST", f"{GATEWAY}/api/v1/restrictions/{key}/lift", {"json": lifting}
    raise AssertionError(endpoint)


def _cells() -> list[tuple[str, str, str, int]]:
    cells = []
    for endpoint, row in EXPECTED.items():
        assert set(row) == set(ROLES), endpoint
        for role, statuses in row.items():
            for target, status in zip((OWN, OTHER), statuses, strict=False):
                cells.append((endpoint, role, target, status))
    return cells


async def test_access_matrix_and_one_access_event_per_decision(world: World):
    cells = _cells()
    sent: dict[str, tuple[tuple[str, str, str, int], httpx.Response]] = {}
    async with TopicWatch(topics.ACCESS_RECORDED, topics.SECURITY_ALERT) as watch:
        async with httpx.AsyncClient(timeout=30) as client:
            for cell in cells:
                endpoint, role, target, _ = cell
                method, url, kwargs = _request(world, endpoint, target)
                request_id = str(uuid.uuid4())
                headers = {
                    **kwargs.pop("headers", {}),
                    **_role_headers(world, role),
                    "X-Request-ID": request_id,
                }
                sent[request_id] = (cell, await client.request(method, url, headers=headers, **kwargs))
        events = await watch.read(lambda env: env.correlation_id in sent)
    wrong = [
        f"{endpoint}/{role}/{target}: expected {status}, got {response.status_code}"
        for (endpoint, role, target, status), response in sent.values()
        if response.status_code != status
    ]
    assert not wrong, "\n".join(wrong)
    for request_id, ((endpoint, role, target, status), response) in sent.items():
        body = response.json()
        if endpoint == "patient" and status == 200:
            found = {i["imaging_id"] for i in body["instances"]}
            assert (world.imaging_a in found) if target == OWN else not found, (role, target)
        if status == 404:
            assert body == {  # no tenant leak: the same answer as for an id that does not exist
                "status": 404,
                "error": "not_found",
                "message": "no such resource",
                "detail": {"code": "not_found", "message": "no such resource"},
            }
        mine = [
            e
            for e in events
            if e.correlation_id == request_id and e.type == topics.event_type(topics.ACCESS_RECORDED)
        ]
        assert mine, f"no access event for {endpoint}/{role}/{target}"
        assert status in {e.data["status_code"] for e in mine}, (
            endpoint,
            role,
            target,
            [e.data for e in mine],
        )
        for event in mine:
            assert event.tenant == world.tenant_a and event.data["actor"].startswith("it-")
        if endpoint == "break_glass" and status == 201:
            alerts = [
                e
                for e in events
                if e.correlation_id == request_id
                and e.type == topics.event_type(topics.SECURITY_ALERT)
                and e.source == "gateway"  # the audit service's anomaly rules may add their own
            ]
            assert [a.data["rule"] for a in alerts] == ["break_glass_opened"]
            assert patient_key(world.tenant_a, world.patient_a) in alerts[0].data["detail"]
            assert world.patient_a not in json.dumps(alerts[0].data)


async def test_revoked_grant_stops_access_on_the_next_request(world: World):
    async with httpx.AsyncClient(timeout=30) as client:
        grant = await client.post(
            f"{GATEWAY}/api/v1/grants",
            json=_grant_body(world.patient_a, "it-cg-short"),
            headers=bearer("it-admin", world.tenant_a, "admin"),
        )
        assert grant.status_code == 201
        assert grant.json()["patient_key"] == patient_key(world.tenant_a, world.patient_a)
        assert world.patient_a not in grant.text
        caregiver = bearer("it-cg-short", world.tenant_a, "caregiver")
        url = f"{GATEWAY}/api/v1/imaging/{world.imaging_a}"
        assert (await client.get(url, headers=caregiver)).status_code == 200
        revoke = await client.delete(
            f"{GATEWAY}/api/v1/grants/{grant.json()['grant_id']}",
            headers=bearer("it-admin", world.tenant_a, "admin"),
        )
        assert revoke.status_code == 200 and revoke.json()["revoked_by"] == "it-admin"
        assert (await client.get(url, headers=caregiver)).status_code == 404
        # The revocation's event was acknowledged, and the grant store (FerretDB) says so.
        stored = await client.get(
            f"{GATEWAY}/api/v1/grants/{grant.json()['grant_id']}",
            headers=bearer("it-admin", world.tenant_a, "admin"),
        )
        assert stored.json()["revocation_recorded"] is True
        again = await client.delete(
            f"{GATEWAY}/api/v1/grants/{grant.json()['grant_id']}",
            headers=bearer("it-admin", world.tenant_a, "admin"),
        )
        assert again.status_code == 409


async def test_invalid_grants_are_refused_with_what_is_allowed(world: World):
    admin = bearer("it-admin", world.tenant_a, "admin")
    cases = [
        ({"actions": ["manage_keys"]}, "grantable"),
        ({"justification": "short"}, "10 to 500 characters"),
        ({"expires_at": (datetime.now(UTC) + timedelta(days=400)).isoformat()}, "at most"),
        ({"expires_at": "2030-01-01T00:00:00"}, "timezone"),
        ({"grantee": "it-admin"}, "own creator"),
    ]
    async with httpx.AsyncClient(timeout=30) as client:
        for change, hint in cases:
            answer = await client.post(
                f"{GATEWAY}/api/v1/grants", json={**_grant_body(world.patient_a), **change}, headers=admin
            )
            assert answer.status_code == 422, (change, answer.text)
            assert hint in answer.text, (change, answer.text)
            assert world.patient_a not in answer.text


#: A body that is not JSON, under the 64 KiB body limit: what anyone may send the grant routes.
NOT_JSON = b'{"patient_id": "PHI-' + b"x" * 60_000


async def test_the_grant_routes_decide_access_before_they_parse_the_body(world: World):
    """No token is 401 and a role the table refuses gets the table's status, whatever the body; the
    role the route is for gets the 422 of a body that does not parse. Until the eighteenth session
    FastAPI parsed the body before the access guard ran: every caller got that 422."""
    paths = {"grant_create": "/api/v1/grants", "break_glass": "/api/v1/break-glass"}
    sent: dict[str, tuple[str, str, int, httpx.Response]] = {}
    async with TopicWatch(topics.ACCESS_RECORDED) as watch:
        async with httpx.AsyncClient(timeout=30) as client:
            for endpoint, path in paths.items():
                cells = [(role, EXPECTED[endpoint][role][0]) for role in ROLES] + [("anonymous", 401)]
                for role, status in cells:
                    request_id = str(uuid.uuid4())
                    headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
                    if role != "anonymous":
                        headers.update(_role_headers(world, role))
                    expected = 422 if status == 201 else status
                    response = await client.post(f"{GATEWAY}{path}", content=NOT_JSON, headers=headers)
                    sent[request_id] = (endpoint, role, expected, response)
        events = await watch.read(lambda env: env.correlation_id in sent)
    wrong = [
        f"{endpoint}/{role}: expected {expected}, got {response.status_code}"
        for endpoint, role, expected, response in sent.values()
        if response.status_code != expected
    ]
    assert not wrong, "\n".join(wrong)
    for request_id, (endpoint, role, expected, response) in sent.items():
        assert b"PHI-" not in response.content, (endpoint, role)
        if expected == 422:
            assert response.json()["problems"] == [{"field": "body.15", "problem": "JSON decode error"}]
            continue
        recorded = [e.data for e in events if e.correlation_id == request_id]
        assert [(e["status_code"], e["outcome"]) for e in recorded] == [
            (expected, "unauthenticated" if expected == 401 else "denied")
        ], (endpoint, role, recorded)


# ---- JWT attacks -------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(tenant: str, **override: Any) -> dict[str, Any]:
    now = int(time.time())
    dev = issuer()
    return {"iss": dev.issuer, "aud": dev.audience, "sub": "it-attacker", "tenant": tenant, "roles": ["clinician"],
            "iat": now, "exp": now + 600, **override}  # fmt: skip


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def _attacks(tenant: str) -> dict[str, tuple[str | None, str]]:
    """name -> (token or None for no header, expected failure code)."""
    dev = issuer()
    rsa = dev.current("RS256")
    public_pem = rsa.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    confused = _unsigned({"alg": "HS256", "typ": "JWT", "kid": rsa.kid}, _claims(tenant))
    confused += "." + _b64(hmac.new(public_pem, confused.encode(), hashlib.sha256).digest())
    valid = dev.mint(subject="it-attacker", tenant=tenant, roles=["clinician"])
    head, payload, signature = valid.split(".")
    forged_payload = _b64(json.dumps(_claims(tenant, roles=["clinician", "admin"])).encode())
    return {
        "missing": (None, "missing_token"),
        "alg_none": (_unsigned({"alg": "none", "typ": "JWT", "kid": rsa.kid}, _claims(tenant)) + ".", "alg_not_allowed"),
        "hs_rs_confusion": (confused, "alg_not_allowed"),
        "unknown_kid": (DevIssuer.generate(["ES256"]).mint(subject="it-attacker", tenant=tenant, roles=["clinician"]), "unknown_kid"),
        "expired": (dev.mint(subject="it-attacker", tenant=tenant, roles=["clinician"], now=datetime.now(UTC) - timedelta(hours=2), ttl_seconds=600), "expired"),
        "tampered_payload": (f"{head}.{forged_payload}.{signature}", "bad_signature"),
        "wrong_audience": (dev.mint(subject="it-attacker", tenant=tenant, roles=["clinician"], audience="someone-else"), "wrong_audience"),
    }  # fmt: skip


async def test_jwt_attacks_get_401_with_a_challenge_and_are_audited(world: World):
    attacks = _attacks(world.tenant_a)
    url = f"{GATEWAY}/api/v1/imaging/{world.imaging_a}"
    ids: dict[str, str] = {}
    async with TopicWatch(topics.ACCESS_RECORDED) as watch:
        async with httpx.AsyncClient(timeout=30) as client:
            for name, (token, code) in attacks.items():
                ids[name] = str(uuid.uuid4())
                headers = {"X-Request-ID": ids[name]}
                if token is not None:
                    headers["Authorization"] = f"Bearer {token}"
                answer = await client.get(url, headers=headers)
                assert answer.status_code == 401, (name, answer.text)
                challenge = answer.headers["www-authenticate"]
                assert challenge.startswith('Bearer realm="enclave"'), name
                if token is not None:
                    assert 'error="invalid_token"' in challenge, name
                    assert token not in answer.text and token.split(".")[1] not in challenge
                assert answer.json()["detail"]["code"] == code, (name, answer.text)
        events = await watch.read(lambda env: env.correlation_id in ids.values())
    for name, (_, code) in attacks.items():
        (event,) = [e for e in events if e.correlation_id == ids[name]]
        assert event.data["outcome"] == "unauthenticated" and event.data["status_code"] == 401, name
        assert event.data["detail"] == code and event.data["actor"] == "anonymous", name


async def test_another_tenants_id_is_recorded_exactly_as_an_absent_one(world: World):
    """The access record of a refused lookup is filed under the actor's tenant, whose own auditors
    read it. It carried ``other_tenant`` and the other tenant's patient and study pseudonyms, so a
    principal with clinician and auditor roles could confirm an id existed elsewhere and learn its
    pseudonyms (found by an API hunt). Now both records say what a missing id's does."""
    absent = str(uuid.uuid4())
    clinician = bearer("it-clinician", world.tenant_a, "clinician")
    sent: dict[str, str] = {}
    async with TopicWatch(topics.ACCESS_RECORDED) as watch:
        async with httpx.AsyncClient(timeout=30) as client:
            for imaging_id in (world.imaging_b, absent):
                request_id = str(uuid.uuid4())
                answer = await client.get(
                    f"{GATEWAY}/api/v1/imaging/{imaging_id}",
                    headers={**clinician, "X-Request-ID": request_id},
                )
                assert answer.status_code == 404
                sent[request_id] = imaging_id
        events = await watch.read(lambda env: env.correlation_id in sent)
    by_id = {sent[e.correlation_id]: e.data for e in events}
    assert set(by_id) == {world.imaging_b, absent}
    for imaging_id, data in by_id.items():
        assert (data["outcome"], data["status_code"], data["detail"]) == ("not_found", 404, "not_found"), data
        assert data["target"] == imaging_id
    assert patient_key(world.tenant_b, world.patient_b) not in json.dumps(by_id[world.imaging_b])


async def test_an_admin_finds_a_clinicians_break_glass_session_and_ends_it():
    """The listing's filters on the real database: a session found by kind, state and patient, revoked,
    then no longer listed as active (a grant of another tenant is never listed)."""
    tenant, other = new_tenant("it-list"), new_tenant("it-list-b")
    patient = f"PID-L-{uuid.uuid4().hex[:8]}"
    admin = bearer("it-admin-list", tenant, "admin")
    async with httpx.AsyncClient(base_url=GATEWAY, timeout=30) as client:
        opened = await client.post(
            "/api/v1/break-glass",
            json={"patient_id": patient, "justification": "unconscious patient in the emergency room"},
            headers=bearer("it-dr-list", tenant, "clinician"),
        )
        assert opened.status_code == 201, opened.text
        session = opened.json()["grant_id"]
        granted = await client.post("/api/v1/grants", json=_grant_body(patient), headers=admin)
        assert granted.status_code == 201, granted.text
        elsewhere = await client.post(
            "/api/v1/grants", json=_grant_body(patient), headers=bearer("it-admin-list-b", other, "admin")
        )
        assert elsewhere.status_code == 201, elsewhere.text

        async def listed(**params: str) -> list[str]:
            answer = await client.get("/api/v1/grants", params=params, headers=admin)
            assert answer.status_code == 200, answer.text
            return [g["grant_id"] for g in answer.json()["grants"]]

        key = patient_key(tenant, patient)
        assert await listed() == [session, granted.json()["grant_id"]]
        assert await listed(kind="break_glass", state="active", patient_key=key) == [session]
        assert await listed(grantee="it-cg-granted") == [granted.json()["grant_id"]]
        later = await client.post(
            "/api/v1/grants",
            json={**_grant_body(patient), "not_before": (datetime.now(UTC) + timedelta(hours=1)).isoformat()},
            headers=admin,
        )
        assert later.status_code == 201, later.text
        assert await listed(kind="patient", state="active") == [granted.json()["grant_id"]]  # not later
        assert (await client.delete(f"/api/v1/grants/{session}", headers=admin)).status_code == 200
        assert await listed(kind="break_glass", state="active") == []
        assert await listed(kind="break_glass") == [session]
        page = await client.get("/api/v1/grants", params={"limit": 1}, headers=admin)
        assert page.json()["next_after"] == session
