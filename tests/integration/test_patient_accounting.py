"""A privacy office answers a patient's "who accessed my records?" on the running stack: the tenant's
auditor turns the patient id into its key at the gateway (``POST /api/v1/patient-keys``) and finds,
under that key in the audit trail, the clinician's reads, the upload's storage and its own lookup
(docs/access.md, "Patient keys for auditors").

Until the twenty-third session an auditor could not get a patient's key: only a clinician's patient
query (a PHI read) answered it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx

from .conftest import SERVICE_PORTS
from .test_gateway_support import GATEWAY, bearer, form_upload, new_tenant, patient_key

AUDIT = f"http://127.0.0.1:{SERVICE_PORTS['audit']}"


async def test_an_auditor_accounts_for_every_access_to_one_patient_by_its_key() -> None:
    tenant = new_tenant("it-pa")
    patient = f"PID-PA-{uuid.uuid4().hex[:8]}"
    clinician = bearer("it-pa-clinician", tenant, "clinician")
    auditor = bearer("it-pa-auditor", tenant, "auditor")
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=GATEWAY, timeout=30) as client:
        uploaded = await form_upload(client, bearer("it-pa-pacs", tenant, "uploader"), patient)
        assert uploaded.status_code == 200, uploaded.text
        imaging_id = uploaded.json()["accepted"][0]["imaging_id"]
        reads = [
            await client.get(f"/api/v1/imaging/{imaging_id}/analysis", headers=clinician),
            await client.get(f"/api/v1/imaging/patient/{patient}", headers=clinician),
        ]
        assert [r.status_code for r in reads] == [200, 200]
        looked_up = await client.post("/api/v1/patient-keys", json={"patient_id": patient}, headers=auditor)
        assert looked_up.status_code == 200, looked_up.text
        key = looked_up.json()["patient_key"]
        assert key == patient_key(tenant, patient)
        answers += [uploaded, *reads, looked_up]

    def accounted(records: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {(r["actor"], str(r["envelope"]["data"].get("action"))) for r in records}

    wanted = {
        ("it-pa-clinician", "read_results_phi"),
        ("it-pa-clinician", "query_patient"),
        ("it-pa-auditor", "query_patient_key"),
    }
    deadline = time.monotonic() + 90
    async with httpx.AsyncClient(base_url=AUDIT, timeout=30) as audit:
        while True:
            page = await audit.get("/audit/events", params={"patient": key}, headers=auditor)
            assert page.status_code == 200, page.text
            records = page.json()["records"]
            if wanted <= accounted(records) and any(
                r["event_type"] == "enclave.instance.stored" for r in records
            ):
                break
            assert time.monotonic() < deadline, accounted(records)
            await asyncio.sleep(1)
        answers.append(page)
    lookup = next(r for r in records if r["envelope"]["data"].get("action") == "query_patient_key")
    assert (lookup["event_code"]["code"], lookup["action"]) == ("110100", "E")
    assert all(r["tenant"] == tenant for r in records)
    assert all(patient not in a.text for a in answers)
    assert patient not in json.dumps(records)


async def test_many_patient_keys_looked_up_by_one_auditor_raise_an_alert(mongo) -> None:
    """Guessing ids and querying the trail would tell who is a patient: 20 distinct lookups by one
    actor within a day raise many_patient_keys (high), once."""
    tenant = new_tenant("it-pk")
    auditor = bearer("it-pk-auditor", tenant, "auditor")
    async with httpx.AsyncClient(base_url=GATEWAY, timeout=30) as client:
        for n in range(21):
            answer = await client.post(
                "/api/v1/patient-keys", json={"patient_id": f"MRN-{n:06d}"}, headers=auditor
            )
            assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 90
    while True:
        alerts = [
            d
            async for d in mongo["audit"]["records"].find(
                {"tenant": tenant, "event_type": "enclave.security.alert"}
            )
        ]
        rules = [a["envelope"]["data"]["rule"] for a in alerts]
        if "many_patient_keys" in rules:
            break
        assert time.monotonic() < deadline, rules
        await asyncio.sleep(1)
    await asyncio.sleep(3)  # the 21st lookup, consumed after: no second alert
    alerts = [
        d
        async for d in mongo["audit"]["records"].find(
            {"tenant": tenant, "event_type": "enclave.security.alert"}
        )
    ]
    [alert] = [a for a in alerts if a["envelope"]["data"]["rule"] == "many_patient_keys"]
    assert (alert["envelope"]["data"]["subject"], alert["envelope"]["data"]["severity"]) == (
        f"it-pk-auditor tenant:{tenant}",
        "high",
    )
    assert "MRN-" not in str(alerts)
