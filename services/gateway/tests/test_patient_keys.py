"""``POST /api/v1/patient-keys`` (docs/gateway.md, "Patient keys"): an auditor or admin turns a patient id
it holds into the tenant-scoped pseudonym the audit trail files that patient's records under.

Until the twenty-third session only a clinician's patient query (a PHI read) answered a patient's key, so
a privacy office answering "who accessed my records?" needed a clinician to look the patient up first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from route_harness import PSEUDONYMIZER, Exchange, Harness, asgi_request, gateway_routes
from test_access_answers import the_event

PLANTED = "PHI-MRN-66310-PK"


async def ask(
    harness: Harness, role: str, body: Any, *, tenant: str = "hospital-a", raw: bytes | None = None
) -> Exchange:
    token = harness.token(tenant, role, subject=f"it-{role}")
    data = raw if raw is not None else json.dumps(body).encode()
    headers = [
        ("authorization", f"Bearer {token}"),
        ("content-type", "application/json"),
        ("content-length", str(len(data))),
    ]
    return await asgi_request(harness.app, "POST", b"/api/v1/patient-keys", headers, [data])


@pytest.mark.parametrize("role", ["auditor", "admin"])
async def test_an_auditor_or_admin_gets_the_key_the_trail_files_the_patient_under(
    tmp_path: Path, role: str
) -> None:
    harness = gateway_routes(tmp_path)
    answer = await ask(harness, role, {"patient_id": f"  {PLANTED} "})  # DICOM's padding is not part of it
    assert answer.status == 200, answer.body
    key = PSEUDONYMIZER.pseudonym("hospital-a", "patient", PLANTED)
    assert json.loads(answer.body) == {"patient_key": key, "tenant": "hospital-a"}
    event = the_event(harness, answer)
    assert (event["action"], event["outcome"], event["target"]) == (
        "query_patient_key",
        "success",
        f"patient:{key}",
    )
    # Keys are tenant-scoped: another hospital's auditor gets its own tenant's key for the same id.
    other = json.loads((await ask(harness, role, {"patient_id": PLANTED}, tenant="hospital-b")).body)
    assert other["patient_key"] == PSEUDONYMIZER.pseudonym("hospital-b", "patient", PLANTED) != key
    everything = (
        json.dumps([e.model_dump(mode="json") for _, e in harness.publisher.sent]) + answer.body.decode()
    )
    assert PLANTED not in everything
    # Nothing was looked up: the answer says nothing of whether the patient has records.
    assert harness.read_model.patient_queries == [] and harness.read_model.gets == []


@pytest.mark.parametrize("role", ["uploader", "clinician", "researcher", "caregiver"])
async def test_other_roles_are_refused(tmp_path: Path, role: str) -> None:
    harness = gateway_routes(tmp_path)
    refused = await ask(harness, role, {"patient_id": PLANTED})
    assert refused.status == 403, refused.body
    key = PSEUDONYMIZER.pseudonym("hospital-a", "patient", PLANTED)
    assert key not in refused.body.decode() and PLANTED not in refused.body.decode()
    assert the_event(harness, refused)["outcome"] == "denied"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"patient_id": ""},
        {"patient_id": "   "},
        {"patient_id": "x" * 65},
        {"patient_id": PLANTED, "tenant": "b"},
    ],
)
async def test_a_body_that_is_not_one_patient_id_is_the_common_422_without_the_value(
    tmp_path: Path, body: dict[str, Any]
) -> None:
    harness = gateway_routes(tmp_path)
    refused = await ask(harness, "auditor", body)
    assert refused.status == 422, refused.body
    assert json.loads(refused.body)["error"] == "invalid_request"
    assert PLANTED not in refused.body.decode()
    assert PLANTED not in json.dumps(the_event(harness, refused))


async def test_a_body_that_is_not_json_is_refused_without_a_5xx(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    refused = await ask(harness, "auditor", None, raw=b'{"patient_id": "' + PLANTED.encode())
    assert 400 <= refused.status < 500, refused.body
    assert PLANTED not in refused.body.decode()


async def test_lookups_past_the_hourly_limit_are_a_recorded_429(tmp_path: Path) -> None:
    """A key, with the audit trail, tells whether someone is a patient: guessing ids is bounded per
    principal (ENCLAVE_GATEWAY_PATIENT_KEY_LOOKUPS_PER_HOUR) and alerted by the audit service."""
    harness = gateway_routes(tmp_path, patient_keys_per_hour=3)
    for n in range(3):
        assert (await ask(harness, "auditor", {"patient_id": f"{PLANTED}-{n}"})).status == 200
    limited = await ask(harness, "auditor", {"patient_id": PLANTED})
    assert limited.status == 429, limited.body
    assert int(limited.header("retry-after") or 0) > 0
    answer = json.loads(limited.body)
    assert (answer["error"], answer["detail"]["code"]) == ("rate_limited", "rate_limited")
    assert "at most 3 at once, then 3 per hour" in answer["message"]
    event = the_event(harness, limited)
    assert (event["outcome"], event["detail"], event["target"]) == (
        "rejected",
        "patient_key_lookups_limited",
        None,
    )
    assert PLANTED not in limited.body.decode() + json.dumps(event)
    # Per principal: another principal is not held back.
    other = await ask(harness, "admin", {"patient_id": PLANTED})
    assert other.status == 200, other.body
