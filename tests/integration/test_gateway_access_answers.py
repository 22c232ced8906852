"""On the running stack, each upload, grant change, break-glass request, read and query is one
``access.recorded`` event, and that event claims the answer the client got: the same status, an outcome that says the
same (docs/gateway.md, "Status codes common to every route"); the audit service files it so.

Until the nineteenth session the allowed decision of an upload or grant change was recorded first as
``success`` with status 200, then the route's own event: a refused upload read "success, 200", a
partly refused one had a "rejected, 409" per refused part although it was answered 202. A grant or
break-glass body that did not match the API (422) was not recorded at all. Until its review, a grant
body the body limit refused (413) was recorded as the client leaving (499), and a grant id that is not
a UUID (422) was not recorded. Until the twentieth session a query parameter out of range (422) was
not recorded either, and a read was recorded at its decision, before its data was read.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from enclave_common import topics

from .conftest import SERVICE_PORTS
from .support import PHI, mr_instance
from .test_gateway_support import GATEWAY, TopicWatch, bearer, builders, new_tenant

AUDIT = f"http://127.0.0.1:{SERVICE_PORTS['audit']}"


def _grant(patient_id: str, **change: object) -> dict[str, Any]:
    return {
        "grantee": "it-cg-answers",
        "patient_id": patient_id,
        "actions": ["read_status"],
        "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        "justification": "caregiver follow-up agreed with the care team",
        **change,
    }


async def test_each_request_is_one_access_event_claiming_the_answer_it_got():
    tenant = new_tenant("it-answers")
    uploader = bearer("it-answers-pacs", tenant, "uploader")
    admin = bearer("it-answers-admin", tenant, "admin")
    clinician = bearer("it-answers-dr", tenant, "clinician")
    good, good_ds = mr_instance()
    cut = builders.truncate(mr_instance()[0], 6000)
    patient = PHI["PatientID"]
    sent: dict[str, tuple[str, httpx.Response]] = {}

    async with TopicWatch(topics.ACCESS_RECORDED, topics.UPLOAD_COMPLETED) as watch:
        async with httpx.AsyncClient(base_url=GATEWAY, timeout=60) as client:

            async def send(name: str, method: str, path: str, headers: dict[str, str], **kwargs: Any) -> None:
                request_id = str(uuid.uuid4())
                response = await client.request(
                    method, path, headers={**headers, "X-Request-ID": request_id}, **kwargs
                )
                sent[request_id] = (name, response)

            stow = builders.python_dicomweb_client_body([good, cut])
            await send(
                "stow_202",
                "POST",
                f"/dicomweb/studies/{good_ds.StudyInstanceUID}",
                {**uploader, "Content-Type": stow.content_type},
                content=stow.data,
            )
            await send(
                "stow_415",
                "POST",
                "/dicomweb/studies",
                {**uploader, "Content-Type": "text/plain"},
                content=good,
            )
            await send(
                "form_409",
                "POST",
                "/api/v1/imaging/upload",
                uploader,
                files=[("file", ("cut.dcm", cut, "application/dicom"))],
            )
            await send("grant_201", "POST", "/api/v1/grants", admin, json=_grant(patient))
            await send("grant_422", "POST", "/api/v1/grants", admin, json=_grant(patient, justification="x"))
            await send(
                "grant_body_422",
                "POST",
                "/api/v1/grants",
                {**admin, "Content-Type": "application/json"},
                content=b'{"patient_id": "' + patient.encode() + b'", ',
            )
            await send(
                "break_glass_body_422",
                "POST",
                "/api/v1/break-glass",
                clinician,
                json={"patient_id": [patient], "justification": "x", "extra": patient},
            )
            grant_id = next(r for n, r in sent.values() if n == "grant_201").json()["grant_id"]
            await send("revoke_200", "DELETE", f"/api/v1/grants/{grant_id}", admin)
            await send("revoke_409", "DELETE", f"/api/v1/grants/{grant_id}", admin)
            await send("revoke_bad_id_422", "DELETE", "/api/v1/grants/not-a-grant-id", admin)
            await send("read_bad_id_422", "GET", "/api/v1/grants/not-a-grant-id", admin)
            await send("query_200", "GET", f"/api/v1/imaging/patient/{patient}", clinician)
            await send("research_limit_422", "GET", "/api/v1/research/analyses?limit=0", clinician)
            grant = json.dumps(_grant(patient)).encode()

            async def past_the_limit() -> Any:  # chunked (no Content-Length), over 64 KiB in all
                yield grant[:-1]
                for _ in range(9):
                    yield b" " * 8192
                yield grant[-1:]

            await send(
                "grant_chunked_413",
                "POST",
                "/api/v1/grants",
                {**admin, "Content-Type": "application/json"},
                content=past_the_limit(),
            )
        events = await watch.read(lambda env: env.tenant == tenant, settle=3.0)

    expected = {
        "stow_202": ("upload", 202, "success"),
        "stow_415": ("upload", 415, "rejected"),
        "form_409": ("upload", 409, "rejected"),
        "grant_201": ("manage_grants", 201, "success"),
        "grant_422": ("manage_grants", 422, "rejected"),
        "grant_body_422": ("manage_grants", 422, "rejected"),
        "break_glass_body_422": ("break_glass", 422, "rejected"),
        "revoke_200": ("manage_grants", 200, "success"),
        "revoke_409": ("manage_grants", 409, "rejected"),
        "revoke_bad_id_422": ("manage_grants", 422, "rejected"),
        "read_bad_id_422": ("read_grants", 422, "rejected"),
        "query_200": ("query_patient", 200, "success"),
        "research_limit_422": ("read_results_deid", 422, "rejected"),
        "grant_chunked_413": ("manage_grants", 413, "rejected"),
    }
    access_type = topics.event_type(topics.ACCESS_RECORDED)
    by_name: dict[str, dict[str, Any]] = {}
    for request_id, (name, response) in sent.items():
        action, status, outcome = expected[name]
        assert response.status_code == status, (name, response.text)
        mine = [e.data for e in events if e.type == access_type and e.correlation_id == request_id]
        assert [(e["action"], e["status_code"], e["outcome"]) for e in mine] == [(action, status, outcome)], (
            name,
            mine,
        )
        by_name[name] = mine[0]
    # Every access event of the tenant belongs to one of these requests: none was filed elsewhere.
    assert len([e for e in events if e.type == access_type]) == len(sent)

    # The upload's one event names the upload its downstream events carry, and what its answer said.
    [completed] = [e for e in events if e.type == topics.event_type(topics.UPLOAD_COMPLETED)]
    assert by_name["stow_202"]["target"] == f"upload:{completed.data['upload_id']}"
    assert by_name["stow_202"]["detail"].startswith("accepted=1 rejected=1 problems=")
    assert by_name["form_409"]["detail"].startswith("accepted=0 rejected=1 problems=")
    for name in ("grant_body_422", "break_glass_body_422", "revoke_bad_id_422", "read_bad_id_422"):
        assert (by_name[name]["detail"], by_name[name]["target"]) == ("invalid_request", None), name
    assert by_name["grant_chunked_413"]["detail"] == "body_too_large"
    for event in events:
        assert patient not in json.dumps(event.data), "no body content in an event"

    # The audit service files the upload's event as the answer: one record, "success (202)", under the
    # upload.
    stow_id = next(rid for rid, (n, _) in sent.items() if n == "stow_202")
    auditor = bearer("it-answers-auditor", tenant, "auditor")
    deadline = time.monotonic() + 90
    async with httpx.AsyncClient(base_url=AUDIT, timeout=30) as audit:
        while True:
            page = await audit.get("/audit/events", params={"correlation_id": stow_id}, headers=auditor)
            assert page.status_code == 200, page.text
            records = page.json()["records"]
            if records:
                break
            assert time.monotonic() < deadline, "the audit service did not file the upload's access event"
            await asyncio.sleep(0.5)
    [record] = records
    assert (record["event_code"]["code"], record["action"], record["outcome"]) == ("110104", "C", 0)
    assert record["outcome_description"] == "success (202)"
    assert {"kind": "upload", "object_id": completed.data["upload_id"]} in record["objects"]
