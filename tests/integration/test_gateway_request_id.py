"""X-Request-ID on the running gateway, followed into the audit trail: whatever id a client sends,
the answer names the correlation id its request is filed under, and an auditor of the tenant finds
the request's access record with exactly that id (docs/gateway.md, Request ids).

Until the sixteenth session an upper-case UUID was recorded lower-cased (a search with the id sent
found nothing), nginx's 32-hex ``$request_id`` and anything else were replaced silently, and no
answer said which id was used.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx

from .conftest import SERVICE_PORTS
from .support import PHI
from .test_gateway_support import GATEWAY, bearer, new_tenant

AUDIT_URL = f"http://127.0.0.1:{SERVICE_PORTS['audit']}"


async def _audit_records(client: httpx.AsyncClient, tenant: str, correlation_id: str) -> list[dict[str, Any]]:
    """The tenant's audit records under ``correlation_id``, once the audit service has stored one."""
    auditor = bearer("it-reqid-auditor", tenant, "auditor")
    deadline = time.monotonic() + 60
    while True:
        answer = await client.get(
            f"{AUDIT_URL}/audit/events", params={"correlation_id": correlation_id}, headers=auditor
        )
        assert answer.status_code == 200, answer.text
        records: list[dict[str, Any]] = answer.json()["records"]
        if records or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.5)


async def test_the_answer_names_the_id_the_audit_trail_files_the_request_under() -> None:
    tenant = new_tenant("it-reqid")
    clinician = bearer("it-reqid-clinician", tenant, "clinician")
    sent_uuid = str(uuid.uuid4()).upper()
    nginx_id = uuid.uuid4().hex
    async with httpx.AsyncClient(timeout=30) as client:
        answers = {
            sent: await client.get(
                f"{GATEWAY}/api/v1/imaging/patient/PX-REQID", headers={**clinician, "X-Request-ID": sent}
            )
            for sent in (sent_uuid, nginx_id, PHI["PatientID"])
        }
        used = {sent: answer.headers["x-request-id"] for sent, answer in answers.items()}
        assert {answer.status_code for answer in answers.values()} == {200}
        assert used[sent_uuid] == sent_uuid.lower()
        assert used[nginx_id] == str(uuid.UUID(hex=nginx_id))
        replaced = uuid.UUID(used[PHI["PatientID"]])
        assert replaced.version == 7 and str(replaced) == used[PHI["PatientID"]]

        for sent, correlation_id in used.items():
            records = await _audit_records(client, tenant, correlation_id)
            gateway = [r for r in records if r["actor"] == "it-reqid-clinician"]
            assert [(r["event_type"], r["correlation_id"]) for r in gateway] == [
                ("enclave.access.recorded", correlation_id)
            ], (sent, records)
            assert PHI["PatientID"] not in json.dumps(records)


async def test_refusals_name_their_request_id_too() -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        unauthenticated = await client.get(
            f"{GATEWAY}/api/v1/imaging/patient/PX-REQID", headers={"X-Request-ID": "0" * 32}
        )
        no_route = await client.get(f"{GATEWAY}/dicomweb/studies/1.2.3/series")
        wrong_method = await client.get(f"{GATEWAY}/dicomweb/studies")
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["x-request-id"] == "00000000-0000-0000-0000-000000000000"
    for answer in (no_route, wrong_method):
        assert answer.status_code in (404, 405)
        assert uuid.UUID(answer.headers["x-request-id"]).version == 7
