"""The patient query on the running gateway: every PatientID an upload takes can be queried,
percent-encoded (docs/gateway.md, The PatientID in the path), and a caregiver who follows the grant
example of docs/gateway.md can find and read its patient; an action the grant does not name is 404,
as docs/access.md says for a grant-only principal.

Until the sixteenth session a PatientID with '/' could be uploaded but its query was 404
``no_such_route`` (the server decodes %2F before routing), the PatientID ``analysis`` was taken by
the instance analysis route, and the grant example left out ``query_patient``.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
from enclave_common import topics

from .support import ROOT, mr_instance
from .test_gateway_support import GATEWAY, TopicWatch, bearer, new_tenant, patient_key

#: PatientIDs with what a URL reserves; each is a legal LO value (a backslash separates two values,
#: which the gateway and ingest key as written).
PATIENT_IDS = ("HX16/SLASH", "HX16\\BS", "HX 16?#%;+&=", "analysis", "/LEAD", "TRAIL/")
ACCESS_TYPE = topics.event_type(topics.ACCESS_RECORDED)


async def _upload(client: httpx.AsyncClient, tenant: str, patient_id: str) -> str:
    data, _ = mr_instance(patient_id=patient_id)
    answer = await client.post(
        f"{GATEWAY}/api/v1/imaging/upload",
        files=[("file", ("x.dcm", data, "application/dicom"))],
        headers=bearer("it-pid-uploader", tenant, "uploader"),
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["accepted"][0]["imaging_id"])


def _patient_url(patient_id: str) -> str:
    return f"{GATEWAY}/api/v1/imaging/patient/{quote(patient_id, safe='')}"


async def test_every_uploaded_patient_id_is_queried_percent_encoded() -> None:
    tenant = new_tenant("it-pid")
    clinician = bearer("it-pid-clinician", tenant, "clinician")
    async with httpx.AsyncClient(timeout=60) as client:
        uploaded = {pid: await _upload(client, tenant, pid) for pid in PATIENT_IDS}
        async with TopicWatch(topics.ACCESS_RECORDED) as watch:
            for pid, imaging_id in uploaded.items():
                answer = await client.get(_patient_url(pid), headers=clinician)
                assert answer.status_code == 200, (pid, answer.text)
                assert answer.json()["patient_key"] == patient_key(tenant, pid), pid
                assert [i["imaging_id"] for i in answer.json()["instances"]] == [imaging_id], pid
            # The '/' as it is (a client that did not encode it, a proxy that decoded %2F): the same id.
            plain = await client.get(f"{GATEWAY}/api/v1/imaging/patient/HX16/SLASH", headers=clinician)
            assert [i["imaging_id"] for i in plain.json()["instances"]] == [uploaded["HX16/SLASH"]]
            queries = await watch.read(
                lambda env: (
                    env.tenant == tenant and env.type == ACCESS_TYPE and env.data["action"] == "query_patient"
                )
            )
    # Recorded as before: the patient's pseudonymous key, never the id.
    assert [e.data["target"] for e in queries] == [
        f"patient:{patient_key(tenant, pid)}" for pid in (*PATIENT_IDS, "HX16/SLASH")
    ]
    assert {e.data["outcome"] for e in queries} == {"success"}
    for pid in PATIENT_IDS:
        assert pid not in json.dumps([e.data for e in queries])


async def test_a_path_ending_in_a_slash_is_still_no_route() -> None:
    tenant = new_tenant("it-pid")
    clinician = bearer("it-pid-clinician", tenant, "clinician")
    async with httpx.AsyncClient(timeout=30) as client:
        for path in ("/api/v1/imaging/patient/HX16/", "/api/v1/imaging/patient/"):
            answer = await client.get(f"{GATEWAY}{path}", headers=clinician)
            assert answer.status_code == 404, path
            body = answer.json()
            assert body["error"] == body["detail"]["code"] == "no_such_route"
            assert "do not end in '/'" in body["message"]
        too_long = await client.get(_patient_url("/" * 65), headers=clinician)
        assert too_long.status_code == 422


def _doc_grant_example() -> dict[str, Any]:
    """The body of the grant example in docs/gateway.md, as a reader would copy it."""
    text = (ROOT / "docs" / "gateway.md").read_text()
    found = re.search(r"/api/v1/grants -H .*?-d '(\{.*?\})'", text, re.DOTALL)
    assert found is not None, "docs/gateway.md has no grant example"
    return dict(json.loads(found.group(1)))


async def _grant(client: httpx.AsyncClient, tenant: str, body: dict[str, Any]) -> None:
    body = {**body, "expires_at": (datetime.now(UTC) + timedelta(hours=2)).isoformat()}
    answer = await client.post(
        f"{GATEWAY}/api/v1/grants", json=body, headers=bearer("it-grant-admin", tenant, "admin")
    )
    assert answer.status_code == 201, answer.text


async def test_a_caregiver_following_the_grant_example_finds_and_reads_its_patient() -> None:
    tenant = new_tenant("it-cg")
    patient_id = f"CG-{uuid.uuid4().hex[:8]}"
    caregiver = bearer("it-cg-doc", tenant, "caregiver")
    async with httpx.AsyncClient(timeout=60) as client:
        imaging_id = await _upload(client, tenant, patient_id)
        await _grant(
            client, tenant, {**_doc_grant_example(), "grantee": "it-cg-doc", "patient_id": patient_id}
        )
        found = await client.get(_patient_url(patient_id), headers=caregiver)
        assert found.status_code == 200, found.text
        assert [i["imaging_id"] for i in found.json()["instances"]] == [imaging_id]
        status = await client.get(f"{GATEWAY}/api/v1/imaging/{imaging_id}", headers=caregiver)
        assert status.status_code == 200, status.text
        results = await client.get(f"{GATEWAY}/api/v1/imaging/{imaging_id}/analysis", headers=caregiver)
        assert results.status_code == 200, results.text


async def test_an_action_the_grant_does_not_name_is_404_like_no_grant_at_all() -> None:
    tenant = new_tenant("it-cg")
    patient_id = f"CG-{uuid.uuid4().hex[:8]}"
    granted = bearer("it-cg-partial", tenant, "caregiver")
    stranger = bearer("it-cg-none", tenant, "caregiver")
    async with httpx.AsyncClient(timeout=60) as client:
        imaging_id = await _upload(client, tenant, patient_id)
        # The example as it was until the sixteenth session: no query_patient.
        await _grant(
            client,
            tenant,
            {
                **_doc_grant_example(),
                "grantee": "it-cg-partial",
                "patient_id": patient_id,
                "actions": ["read_status", "read_results_phi"],
            },
        )
        async with TopicWatch(topics.ACCESS_RECORDED) as watch:
            refused = await client.get(_patient_url(patient_id), headers=granted)
            unknown = await client.get(_patient_url(patient_id), headers=stranger)
            status = await client.get(f"{GATEWAY}/api/v1/imaging/{imaging_id}", headers=granted)
            recorded = await watch.read(
                lambda env: (
                    env.tenant == tenant and env.type == ACCESS_TYPE and env.data["action"] == "query_patient"
                )
            )
    assert refused.status_code == unknown.status_code == 404
    assert refused.json() == unknown.json()
    assert refused.json()["error"] == "not_found"
    assert status.status_code == 200
    assert [(e.actor, e.data["outcome"], e.data["status_code"], e.data["detail"]) for e in recorded] == [
        ("it-cg-partial", "not_found", 404, "no_grant"),
        ("it-cg-none", "not_found", 404, "no_grant"),
    ]
