"""Restricted patients on the running stack (docs/gateway.md, "Restricted patients"): an admin
restricts a patient; the tenant's clinicians then read its PHI only under break-glass; each read under
it is a ``security.alert`` the audit service records as an emergency override; the restriction's
change is a security-attribute change in the audit trail; lifting it restores the role's reads. And the
MongoDB restriction store's contract on FerretDB.

Until the twenty-second session nothing set a restriction, so none of this path could be reached.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from enclave_common import topics
from enclave_common.auth import Restriction
from enclave_common.auth.restrictions_mongo import MongoRestrictionStore

from .conftest import SERVICE_PORTS
from .test_gateway_support import GATEWAY, TopicWatch, bearer, form_upload, new_tenant, patient_key

REASON = "hospital employee, privacy office request"


async def _upload(client: httpx.AsyncClient, tenant: str, patient_id: str) -> str:
    answer = await form_upload(client, bearer("it-rs-uploader", tenant, "uploader"), patient_id)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["accepted"][0]["imaging_id"])


async def _audit_records(mongo: Any, tenant: str, ready: Any, timeout: float = 90.0) -> list[dict[str, Any]]:
    records = mongo["audit"]["records"]
    deadline = time.monotonic() + timeout
    while True:
        found = [d async for d in records.find({"tenant": tenant})]
        if ready(found):
            return found
        assert time.monotonic() < deadline, f"{len(found)} audit records of {tenant}"
        await asyncio.sleep(0.5)


def _lifted_then_read(record: dict[str, Any]) -> bool:
    data = record["envelope"]["data"]
    return (
        record["event_type"] == "enclave.security.alert"
        and data.get("rule") == "restriction_lifted_then_read"
    )


async def test_a_restricted_patient_is_read_only_under_break_glass_and_each_read_is_an_audited_override(
    mongo,
):
    tenant = new_tenant("it-rs")
    patient = f"PID-RS-{uuid.uuid4().hex[:8]}"
    key = patient_key(tenant, patient)
    admin = bearer("it-rs-admin", tenant, "admin")
    clinician = bearer("it-rs-clinician", tenant, "clinician")
    answers: list[httpx.Response] = []
    async with TopicWatch(topics.ACCESS_RECORDED, topics.SECURITY_ALERT) as watch:
        async with httpx.AsyncClient(base_url=GATEWAY, timeout=30) as client:
            imaging_id = await _upload(client, tenant, patient)
            phi_reads = (f"/api/v1/imaging/{imaging_id}/analysis", f"/api/v1/imaging/patient/{patient}")
            for path in phi_reads:  # read by role before the restriction
                assert (await client.get(path, headers=clinician)).status_code == 200

            restricted = await client.post(
                "/api/v1/restrictions", json={"patient_id": patient, "justification": REASON}, headers=admin
            )
            assert restricted.status_code == 201, restricted.text
            assert restricted.json()["patient_key"] == key
            listed = await client.get("/api/v1/restrictions", headers=admin)
            assert restricted.json().pop("active_grants") == []
            assert listed.json()["restrictions"] == [
                {k: v for k, v in restricted.json().items() if not k.startswith("active_grants")}
            ]

            refused = [await client.get(p, headers=clinician) for p in phi_reads]
            for answer in refused:
                assert answer.status_code == 403, answer.text
                assert answer.json()["detail"]["code"] == "break_glass_required"
                assert answer.json()["detail"]["break_glass_available"] is True
            status = await client.get(f"/api/v1/imaging/{imaging_id}", headers=clinician)
            assert status.status_code == 200, status.text  # not PHI: read by role

            opened = await client.post(
                "/api/v1/break-glass",
                json={"patient_id": patient, "justification": "unconscious patient in the emergency room"},
                headers=clinician,
            )
            assert opened.status_code == 201, opened.text
            under_break_glass = [await client.get(p, headers=clinician) for p in phi_reads]
            assert [a.status_code for a in under_break_glass] == [200, 200]
            assert imaging_id in {i["imaging_id"] for i in under_break_glass[1].json()["instances"]}

            lifting = {"justification": "employment ended, privacy office decision"}
            # Separation of duties: an admin who is also a clinician would lift its own limit.
            both = bearer("it-rs-admin-clinician", tenant, "admin", "clinician")
            refused_lift = await client.post(f"/api/v1/restrictions/{key}/lift", json=lifting, headers=both)
            assert refused_lift.status_code == 403, refused_lift.text
            assert refused_lift.json()["detail"]["code"] == "separation_of_duties"
            lifted = await client.post(f"/api/v1/restrictions/{key}/lift", json=lifting, headers=admin)
            assert lifted.status_code == 200, lifted.text
            other_clinician = bearer("it-rs-clinician-2", tenant, "clinician")
            after = await client.get(phi_reads[0], headers=other_clinician)
            assert after.status_code == 200, after.text
            # The lifter, holding a second token (same sub, clinician only), reads by role: allowed,
            # and the audit service raises restriction_lifted_then_read.
            lifter_reads = await client.get(phi_reads[0], headers=bearer("it-rs-admin", tenant, "clinician"))
            assert lifter_reads.status_code == 200, lifter_reads.text
            answers += [
                restricted,
                listed,
                *refused,
                status,
                opened,
                *under_break_glass,
                refused_lift,
                lifted,
                after,
                lifter_reads,
            ]
        events = await watch.read(lambda e: e.tenant == tenant)

    gateway_alerts = [
        e for e in events if e.type == topics.event_type(topics.SECURITY_ALERT) and e.source == "gateway"
    ]
    assert sorted(a.data["rule"] for a in gateway_alerts) == [
        "break_glass",
        "break_glass",
        "break_glass_opened",
    ]
    assert all(key in a.data["detail"] for a in gateway_alerts)
    access = [e.data for e in events if e.type == topics.event_type(topics.ACCESS_RECORDED)]
    changes = [
        (a["action"], a["status_code"], a["detail"].split(" ")[0])
        for a in access
        if "restriction" in a["action"]
    ]
    assert changes == [
        ("manage_restrictions", 201, "patient_restricted"),
        ("read_restrictions", 200, "role"),
        ("manage_restrictions", 403, "separation_of_duties"),
        ("manage_restrictions", 200, "restriction_lifted"),
    ]
    assert [a["detail"] for a in access if a["status_code"] == 403] == [
        "break_glass_required restricted_patient"
    ] * 2 + ["separation_of_duties"]
    # No PHI in any event or answer of this test.
    assert patient not in json.dumps([e.model_dump(mode="json") for e in events])
    assert all(patient not in a.text for a in answers)

    # The audit trail: the restriction's changes are security-attribute changes (110113 + 110137, U),
    # each read under break-glass an emergency override (110127).
    def ready(found: list[dict[str, Any]]) -> bool:
        overrides = [d for d in found if d.get("outcome_description") == "break_glass"]
        changes = [d for d in found if d["envelope"]["data"].get("action") == "manage_restrictions"]
        return len(overrides) >= 2 and len(changes) >= 3 and any(_lifted_then_read(d) for d in found)

    found = await _audit_records(mongo, tenant, ready)
    for record in (d for d in found if d["envelope"]["data"].get("action") == "manage_restrictions"):
        assert (record["event_code"]["code"], record["action"]) == ("110113", "U")
        assert [c["code"] for c in record["event_type_codes"]] == ["110137"]
    for record in (d for d in found if d.get("outcome_description") == "break_glass"):
        assert [c["code"] for c in record["event_type_codes"]] == ["110127"]
    [alert] = [d for d in found if _lifted_then_read(d)]
    assert alert["envelope"]["data"]["subject"] == f"it-rs-admin patient:{key}"
    assert alert["envelope"]["data"]["severity"] == "high"

    # The tenant's auditor finds every change of access (110137) with one filter, the refused lifting
    # too, and every break-glass override (110127) with another.
    auditor = bearer("it-rs-auditor", tenant, "auditor")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{SERVICE_PORTS['audit']}", timeout=30) as audit:
        by_code = {}
        for code in ("110137", "110127"):
            answer = await audit.get("/audit/events", params={"event_type_code": code}, headers=auditor)
            assert answer.status_code == 200, answer.text
            by_code[code] = answer.json()["records"]
        # The same through the FHIR search (IHE RESTful ATNA): a searchset of the same records.
        fhir = await audit.get("/audit/fhir/AuditEvent", params={"subtype": "110137"}, headers=auditor)
        assert fhir.status_code == 200, fhir.text
        assert [e["resource"]["id"] for e in fhir.json()["entry"]] == [
            r["event_id"] for r in by_code["110137"]
        ]
    assert [
        (r["envelope"]["data"]["status_code"], r["envelope"]["data"]["detail"].split(" ")[0])
        for r in by_code["110137"]
    ] == [(201, "patient_restricted"), (403, "separation_of_duties"), (200, "restriction_lifted")]
    overrides = by_code["110127"]
    assert len(overrides) >= 3 and all(r["tenant"] == tenant for r in overrides)  # opened, two reads
    assert patient not in json.dumps(by_code)


async def test_the_mongo_restriction_store_keeps_its_contract_on_ferretdb(mongo):
    database = mongo[f"it_restrictions_{uuid.uuid4().hex[:8]}"]
    store = MongoRestrictionStore(database)
    try:
        await store.ensure_indexes()
        at = datetime.now(UTC).replace(microsecond=123000)

        def restriction(key: str, tenant: str = "hospital-a", by: str = "admin-1") -> Restriction:
            return Restriction(tenant, key, REASON, by, at)

        assert await store.restrict(restriction("k1")) is None
        assert await store.restrict(restriction("k1", by="admin-2")) == restriction("k1")
        assert await store.get("hospital-a", "k1") == restriction("k1")
        assert await store.get("hospital-b", "k1") is None
        assert (
            await store.lift(
                restriction("k1", tenant="hospital-b"), lifted_by="x", lifted_at=at, justification=REASON
            )
            is None
        )
        for key in ("k3", "k2"):
            await store.restrict(restriction(key))
        await store.restrict(restriction("k9", tenant="hospital-b"))
        assert [r.patient_key for r in await store.list("hospital-a", limit=2)] == ["k1", "k2"]
        assert [r.patient_key for r in await store.list("hospital-a", limit=2, after="k2")] == ["k3"]
        assert [r.patient_key for r in await store.list("hospital-b", limit=10)] == ["k9"]
        # Only that restriction at that revision is lifted (not one made or confirmed after it), and it
        # is kept in the history, marked lifted once removed.
        newer = Restriction("hospital-a", "k1", REASON, "admin-1", at + timedelta(seconds=1))
        assert await store.lift(newer, lifted_by="admin-3", lifted_at=at, justification=REASON) is None
        confirmed = await store.confirm(restriction("k1"))
        assert confirmed == replace(restriction("k1"), revision=1)
        assert await store.confirm(newer) is None
        assert (
            await store.lift(restriction("k1"), lifted_by="admin-3", lifted_at=at, justification=REASON)
            is None
        )  # revision 0
        assert (
            await store.lift(confirmed, lifted_by="admin-3", lifted_at=at, justification=REASON) == confirmed
        )
        assert await store.lift(confirmed, lifted_by="admin-3", lifted_at=at, justification=REASON) is None
        assert await store.get("hospital-a", "k1") is None
        [kept] = [d async for d in database["restriction_history"].find({"tenant": "hospital-a"})]
        assert kept["lift_justification"] == REASON
        assert (kept["patient_key"], kept["justification"], kept["lifted_by"], kept["lifted"]) == (
            "k1",
            REASON,
            "admin-3",
            True,
        )
        assert await store.restrict(restriction("k1", by="admin-2")) is None  # restricted anew
    finally:
        await mongo.drop_database(database.name)
