"""The audit service on the real stack: one record per event, tamper evidence, WORM checkpoints,
crash safety, the auditor API (filters, pagination, FHIR, signed export verified offline), alerts.

Tampering is done in the shared audit database on records this test created, verified over a
range, and always restored, so the shared chain stays intact for every other test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError
from enclave_audit.fhir import FHIR_JSON, validate_fhir
from enclave_common import topics
from enclave_common.auth.dev_issuer import DevIssuer
from enclave_common.envelope import Envelope

from .conftest import KAFKA, MONGO_URL, SERVICE_PORTS
from .support import (
    ROOT,
    STATE,
    access_event,
    dev_env,
    kill_hard,
    publish,
    restart,
    restarted_with,
    service_identity,
    wait_for_events,
)

AUDIT_URL = f"http://127.0.0.1:{SERVICE_PORTS['audit']}"
OPERATOR_TENANT = "enclave-operator"
WORM_BUCKET = "enclave-audit-worm"


# ---- helpers ----------------------------------------------------------------------------------


def token(subject: str, tenant: str, roles: Iterable[str]) -> str:
    return DevIssuer.load(STATE / "keys").mint(subject=subject, tenant=tenant, roles=list(roles))


def bearer(subject: str, tenant: str, *roles: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(subject, tenant, roles)}"}


async def wait_for_records(mongo: Any, keys: list[str], timeout: float = 90.0) -> dict[str, dict[str, Any]]:
    """The stored records of ``keys`` (audit keys = event ids), once all are there."""
    deadline = time.monotonic() + timeout
    while True:
        found = {d["_id"]: d async for d in mongo["audit"]["records"].find({"_id": {"$in": keys}})}
        if len(found) == len(keys):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(keys) - len(found)} of {len(keys)} events were not audited in {timeout}s"
            )
        await asyncio.sleep(0.5)


async def verify_range(
    client: httpx.AsyncClient, headers: dict[str, str], first: int, last: int
) -> dict[str, Any]:
    response = await client.get(
        "/audit/verify", params={"from_sequence": first, "to_sequence": last}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
async def auditor_client():
    async with httpx.AsyncClient(base_url=AUDIT_URL, timeout=60.0) as client:
        yield client


@pytest.fixture
def operator_auditor(unique: str) -> dict[str, str]:
    return bearer(f"it-auditor-{unique}", OPERATOR_TENANT, "auditor")


# ---- one record per event, DLQ -----------------------------------------------------------------


async def test_the_same_event_delivered_twice_is_recorded_once(mongo, unique):
    event = access_event(actor=f"it-dup-{unique}", tenant=f"it-{unique}")
    await publish(topics.ACCESS_RECORDED, [event, event], key=event.id)
    await publish(topics.ACCESS_RECORDED, [event], key=event.id)
    marker = access_event(actor=f"it-dup-after-{unique}", tenant=f"it-{unique}")
    await publish(topics.ACCESS_RECORDED, [marker], key=event.id)  # same partition, after the copies
    await wait_for_records(mongo, [event.id, marker.id])

    copies = await mongo["audit"]["records"].count_documents({"event_id": event.id})
    assert copies == 1


async def test_dead_lettered_copy_is_audited_with_its_reason(mongo, unique):
    event = access_event(actor=f"it-dlq-{unique}", tenant=f"it-{unique}")
    await publish(topics.ACCESS_RECORDED, [event], key=event.id)
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all")
    await producer.start()
    try:
        headers = [("x-dlq-code", b"it_permanent"), ("x-dlq-reason", b"rejected by the integration test")]
        dlq = topics.dlq(topics.ACCESS_RECORDED)
        await producer.send_and_wait(dlq, event.to_bytes(), key=event.id.encode(), headers=headers)
        await producer.send_and_wait(
            dlq, event.to_bytes(), key=event.id.encode(), headers=headers
        )  # redelivered
        await producer.send_and_wait(dlq, f"not an envelope {unique}".encode(), headers=headers)
    finally:
        await producer.stop()

    dlq_key = f"dlq:{topics.dlq(topics.ACCESS_RECORDED)}:{event.id}:it_permanent"
    records = await wait_for_records(mongo, [event.id, dlq_key])
    copy = records[dlq_key]
    assert copy["dead_lettered"] is True
    assert copy["event_id"] == event.id
    assert copy["outcome"] == 8
    assert "[it_permanent] rejected by the integration test" in copy["outcome_description"]
    assert await mongo["audit"]["records"].count_documents({"event_id": event.id}) == 2  # original + DLQ copy

    deadline = time.monotonic() + 60
    while not await mongo["audit"]["records"].find_one(
        {"topic": topics.dlq(topics.ACCESS_RECORDED), "event_id": {"$regex": "^derived-"}, "tenant": None}
    ):
        assert time.monotonic() < deadline, "a non-envelope DLQ message was not audited"
        await asyncio.sleep(0.5)


# ---- tamper evidence ---------------------------------------------------------------------------


async def test_tampering_in_the_database_is_found_at_the_exact_record(
    mongo, unique, auditor_client, operator_auditor
):
    events = [access_event(actor=f"it-tamper-{unique}-{i}", tenant=f"it-{unique}") for i in range(5)]
    await publish(topics.ACCESS_RECORDED, events, key=f"tamper-{unique}")
    stored = await wait_for_records(mongo, [e.id for e in events])
    sequences = sorted(d["sequence"] for d in stored.values())
    first, last = sequences[0], sequences[-1]
    target = sequences[2]
    records = mongo["audit"]["records"]
    assert (await verify_range(auditor_client, operator_auditor, first, last))["ok"] is True

    # 1. change a field
    original = await records.find_one({"sequence": target})
    await records.update_one({"_id": original["_id"]}, {"$set": {"actor": "mallory"}})
    try:
        report = await verify_range(auditor_client, operator_auditor, first, last)
    finally:
        await records.update_one({"_id": original["_id"]}, {"$set": {"actor": original["actor"]}})
    assert report["ok"] is False
    assert report["chain"]["broken_sequence"] == target
    assert report["chain"]["reason"] == "hash_mismatch"

    # 2. delete a record
    await records.delete_one({"_id": original["_id"]})
    try:
        report = await verify_range(auditor_client, operator_auditor, first, last)
    finally:
        await records.insert_one(original)
    assert report["ok"] is False
    assert report["chain"]["broken_sequence"] == target
    assert report["chain"]["reason"] == "missing_sequence"

    # 3. swap two neighbours (each keeps its content, they exchange positions)
    left = await records.find_one({"sequence": target})
    right = await records.find_one({"sequence": target + 1})
    await records.update_one({"_id": left["_id"]}, {"$set": {"sequence": -target}})
    await records.update_one({"_id": right["_id"]}, {"$set": {"sequence": target}})
    await records.update_one({"_id": left["_id"]}, {"$set": {"sequence": target + 1}})
    try:
        report = await verify_range(auditor_client, operator_auditor, first, last)
    finally:
        await records.update_one({"_id": left["_id"]}, {"$set": {"sequence": -target}})
        await records.update_one({"_id": right["_id"]}, {"$set": {"sequence": target + 1}})
        await records.update_one({"_id": left["_id"]}, {"$set": {"sequence": target}})
    assert report["ok"] is False
    assert report["chain"]["broken_sequence"] == target
    assert report["chain"]["reason"] == "hash_mismatch"

    assert (await verify_range(auditor_client, operator_auditor, first, last))["ok"] is True


async def test_a_range_past_the_end_of_the_chain_is_refused_not_reported_as_tampering(
    mongo, unique, auditor_client, operator_auditor
):
    """Before: `from_sequence` past the end answered `missing_sequence` ("the anchor of the range is
    missing"), a `to_sequence` past it `truncated`, each counted in enclave_audit_verify_failures_total
    (paged as possible tampering); the CLI said NOT VERIFIED, exit 1."""
    events = [access_event(actor=f"it-range-{unique}-{i}", tenant=f"it-{unique}") for i in range(3)]
    await publish(topics.ACCESS_RECORDED, events, key=f"range-{unique}")
    stored = await wait_for_records(mongo, [e.id for e in events])
    sequences = sorted(d["sequence"] for d in stored.values())
    failures = _verify_failures((await auditor_client.get("/metrics")).text)

    clamped = await verify_range(auditor_client, operator_auditor, sequences[0], 10**12)
    assert clamped["ok"] is True, clamped
    assert sequences[-1] <= clamped["last_sequence"] < 10**12
    beyond = clamped["last_sequence"] + 1000
    for params in ({"from_sequence": beyond, "to_sequence": beyond + 1000}, {"from_sequence": beyond}):
        response = await auditor_client.get("/audit/verify", params=params, headers=operator_auditor)
        assert response.status_code == 400, response.text
        assert response.json()["detail"]["code"] == "bad_range"
        assert "past the end of the chain: it holds records 1.." in response.json()["detail"]["message"]
    assert _verify_failures((await auditor_client.get("/metrics")).text) == failures

    cli = subprocess.run(
        [str(ROOT / ".venv/bin/enclave-audit-verify"), "--from", str(beyond), "--to", str(beyond + 1000)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | dev_env() | service_identity("audit") | {"ENCLAVE_MONGO_URL": MONGO_URL},
    )
    assert cli.returncode == 2, cli.stdout + cli.stderr
    assert f"the range starts at {beyond}, past the end of the chain" in cli.stderr
    assert "nothing was verified" in cli.stderr


def _verify_failures(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("enclave_audit_verify_failures_total "):
            return float(line.split()[1])
    raise AssertionError("enclave_audit_verify_failures_total is not exported")


# ---- WORM checkpoints --------------------------------------------------------------------------


async def _a_checkpoint(mongo: Any, timeout: float = 150.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        entry = await mongo["audit"]["checkpoints"].find_one({}, sort=[("_id", -1)])
        if entry is not None:
            return entry
        assert time.monotonic() < deadline, "the audit service signed no checkpoint"
        await asyncio.sleep(2)


async def _remove_the_last_checkpoint_entry(mongo: Any) -> dict[str, Any]:
    """The index entry of the last checkpoint, removed. A checkpoint the service was making meanwhile
    (it read the removed one as its predecessor, then stored and indexed the next) would leave the
    removed entry in the middle of the index: a gap, which is another case (verification reports it,
    nothing adopts it). CI met that race once, in the twenty-third session's run: the entry is then put
    back and the new last one removed. The wait narrows the race to a checkpoint whose making takes
    longer than it; the checkpointer may also adopt the entry meanwhile, which is what the test waits
    for anyway."""
    checkpoints = mongo["audit"]["checkpoints"]
    for _ in range(5):
        entry = await _a_checkpoint(mongo)
        await checkpoints.delete_one({"_id": entry["_id"]})
        await asyncio.sleep(5)  # a checkpoint being made when the entry was removed is indexed by now
        if await checkpoints.find_one({"_id": entry["_id"]}) is not None:
            return entry  # adopted already (and maybe a later one made)
        if await checkpoints.find_one({"_id": {"$gt": entry["_id"]}}) is None:
            return entry
        await checkpoints.insert_one(entry)
    raise AssertionError("a checkpoint was indexed after the removed one five times in a row")


async def test_checkpoint_object_cannot_be_deleted_or_overwritten(mongo, s3, unique):
    await publish(
        topics.ACCESS_RECORDED, [access_event(actor=f"it-cp-{unique}", tenant=f"it-{unique}")], key=unique
    )
    entry = await _a_checkpoint(mongo)
    key, version = entry["object_key"], entry["version_id"]
    original = s3.get_object(Bucket=WORM_BUCKET, Key=key, VersionId=version)
    original_bytes = original["Body"].read()
    assert original_bytes.decode() == entry["document"]
    assert original["ObjectLockMode"] == "COMPLIANCE"
    assert original["ObjectLockRetainUntilDate"] > datetime.now(UTC) + timedelta(days=6 * 365)

    for attempt in (
        lambda: s3.delete_object(Bucket=WORM_BUCKET, Key=key, VersionId=version),
        lambda: s3.delete_object(
            Bucket=WORM_BUCKET, Key=key, VersionId=version, BypassGovernanceRetention=True
        ),
        lambda: s3.put_object_retention(
            Bucket=WORM_BUCKET,
            Key=key,
            VersionId=version,
            Retention={"Mode": "GOVERNANCE", "RetainUntilDate": datetime.now(UTC) + timedelta(days=1)},
        ),
    ):
        with pytest.raises(ClientError) as refused:
            attempt()
        assert refused.value.response["Error"]["Code"] in ("AccessDenied", "InvalidRequest", "ObjectLocked")

    # An "overwrite" of a versioned, locked key only adds a version: the signed one stays as it was.
    forged = s3.put_object(Bucket=WORM_BUCKET, Key=key, Body=b'{"forged": true}')
    try:
        assert forged["VersionId"] != version
        again = s3.get_object(Bucket=WORM_BUCKET, Key=key, VersionId=version)["Body"].read()
        assert again == original_bytes
    finally:
        s3.delete_object(Bucket=WORM_BUCKET, Key=key, VersionId=forged["VersionId"])  # not locked: removable


async def test_a_checkpoint_removed_from_the_index_is_adopted_back_not_signed_again(
    mongo, s3, unique, auditor_client, operator_auditor
):
    """Whoever can write the database removes the index entry of the last checkpoint (a replica
    that dies between storing and indexing leaves the same state). Before the twelfth session the
    checkpointer signed that range again, as a second version of the same object, so records changed
    before the removal would have been signed as they were. Now it adopts the stored checkpoint (the
    records still match it), and verification, which reads every stored version, sees a sound trail
    meanwhile: the records are untouched."""
    await publish(
        topics.ACCESS_RECORDED, [access_event(actor=f"it-adopt-{unique}", tenant=f"it-{unique}")], key=unique
    )
    checkpoints = mongo["audit"]["checkpoints"]
    entry = await _remove_the_last_checkpoint_entry(mongo)
    try:
        report = await verify_range(auditor_client, operator_auditor, entry["_id"], entry["last_sequence"])
        assert report["ok"], report

        # The next checkpoint is due once a record is pending: the missing one is adopted first.
        await publish(
            topics.ACCESS_RECORDED,
            [access_event(actor=f"it-adopt2-{unique}", tenant=f"it-{unique}")],
            key=unique,
        )
        deadline = time.monotonic() + 150
        while (adopted := await checkpoints.find_one({"_id": entry["_id"]})) is None:
            if time.monotonic() >= deadline:
                later = [d["_id"] async for d in checkpoints.find({"_id": {"$gt": entry["_id"]}}, {"_id": 1})]
                refusals = _verify_failures((await auditor_client.get("/metrics")).text)
                raise AssertionError(
                    f"the checkpointer did not adopt the stored checkpoint {entry['_id']}: indexed after it "
                    f"{later}, verification failures counted {refusals}"
                )
            await asyncio.sleep(2)
    finally:
        if await checkpoints.find_one({"_id": entry["_id"]}) is None:
            await checkpoints.insert_one(entry)  # leave the shared trail as it was
    assert (adopted["object_key"], adopted["version_id"], adopted["document"]) == (
        entry["object_key"],
        entry["version_id"],
        entry["document"],
    )
    versions = s3.list_object_versions(Bucket=WORM_BUCKET, Prefix=entry["object_key"])["Versions"]
    assert [v["VersionId"] for v in versions if v["Key"] == entry["object_key"]] == [entry["version_id"]]


async def test_a_forged_version_in_the_object_lock_bucket_is_reported(
    mongo, s3, unique, auditor_client, operator_auditor
):
    """A version the index does not name is still read: one that is not a signed checkpoint under
    its own name (here: unsigned bytes written as a new version of the last checkpoint's object) is a
    problem, where verification used to read only the version the index named."""
    await publish(
        topics.ACCESS_RECORDED, [access_event(actor=f"it-forge-{unique}", tenant=f"it-{unique}")], key=unique
    )
    entry = await _a_checkpoint(mongo)
    forged = s3.put_object(Bucket=WORM_BUCKET, Key=entry["object_key"], Body=b'{"forged": true}')
    try:
        report = await verify_range(auditor_client, operator_auditor, entry["_id"], entry["last_sequence"])
    finally:
        s3.delete_object(Bucket=WORM_BUCKET, Key=entry["object_key"], VersionId=forged["VersionId"])
    assert not report["ok"], report
    assert (
        f"object {entry['object_key']} ({forged['VersionId']}) in the object-lock bucket is no checkpoint"
        in report["checkpoint_problems"]
    )
    again = await verify_range(auditor_client, operator_auditor, entry["_id"], entry["last_sequence"])
    assert again["ok"], again


# ---- crash safety ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_killed_mid_stream_and_restarted_leaves_no_gap_and_no_duplicate(
    mongo, unique, auditor_client, operator_auditor
):
    events = [access_event(actor=f"it-kill-{unique}-{i}", tenant=f"it-{unique}") for i in range(60)]

    async def produce() -> None:
        for i in range(0, len(events), 5):
            await publish(topics.ACCESS_RECORDED, events[i : i + 5], key=f"kill-{unique}-{i % 3}")
            await asyncio.sleep(0.2)

    producing = asyncio.create_task(produce())
    try:
        await wait_for_records(mongo, [events[0].id])
        kill_hard("audit")
        await producing
    finally:
        if not producing.done():
            producing.cancel()
        await asyncio.to_thread(restart, "audit")

    ids = [e.id for e in events]
    stored = await wait_for_records(mongo, ids, timeout=180)
    records = mongo["audit"]["records"].find({"event_id": {"$in": ids}}, {"event_id": 1})
    copies = Counter([d["event_id"] async for d in records])
    assert copies == Counter(ids)  # one record per event, none twice
    sequences = sorted(d["sequence"] for d in stored.values())
    report = await verify_range(auditor_client, operator_auditor, sequences[0], sequences[-1])
    assert report["ok"] is True, report
    assert report["chain"]["checked"] == sequences[-1] - sequences[0] + 1


# ---- auditor API -------------------------------------------------------------------------------


async def test_auditor_api_filters_pages_fhir_and_tenant_scope(
    mongo, unique, auditor_client, operator_auditor
):
    tenant, actor = f"it-{unique}", f"it-api-{unique}"
    studies = [f"sk-{unique}-{i % 2}" for i in range(7)]
    events = [
        access_event(
            actor=actor,
            tenant=tenant,
            action="retrieve",
            target=f"/studies/{study}",
            roles=["uploader"],
            correlation_id=f"corr-{unique}",
        )
        for study in studies
    ]
    await publish(topics.ACCESS_RECORDED, events, key=f"api-{unique}")
    await publish(
        topics.ACCESS_RECORDED, [access_event(actor=actor, tenant=f"other-{unique}")], key=f"api-{unique}"
    )
    await wait_for_records(mongo, [e.id for e in events])

    ids: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"actor": actor, "tenant": tenant, "limit": 3, "order": "desc"}
        if cursor:
            params["cursor"] = cursor
        page = (await auditor_client.get("/audit/events", params=params, headers=operator_auditor)).json()
        ids.extend(r["event_id"] for r in page["records"] if r["tenant"] == tenant)
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert ids == [e.id for e in reversed(events)]

    by_study = await auditor_client.get(
        "/audit/events", params={"study": studies[1]}, headers=operator_auditor
    )
    assert {r["event_id"] for r in by_study.json()["records"]} == {
        e.id for e, s in zip(events, studies) if s == studies[1]
    }
    by_correlation = await auditor_client.get(
        "/audit/events", params={"correlation_id": f"corr-{unique}"}, headers=operator_auditor
    )
    assert len(by_correlation.json()["records"]) == 7
    since = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    later = await auditor_client.get(
        "/audit/events", params={"actor": actor, "since": since}, headers=operator_auditor
    )
    assert later.json()["records"] == []

    fhir = await auditor_client.get(
        "/audit/events", params={"actor": actor, "limit": 2}, headers=operator_auditor | {"Accept": FHIR_JSON}
    )
    assert fhir.headers["content-type"].startswith(FHIR_JSON)
    bundle = fhir.json()
    validate_fhir(bundle)
    assert bundle["type"] == "searchset" and len(bundle["entry"]) == 2
    assert any(link["relation"] == "next" for link in bundle["link"])
    assert bundle["entry"][0]["resource"]["resourceType"] == "AuditEvent"
    entry = bundle["entry"][0]
    read = await auditor_client.get(entry["fullUrl"], headers=operator_auditor)  # the fullUrl resolves
    assert read.status_code == 200 and read.headers["content-type"].startswith(FHIR_JSON)
    assert read.json() == entry["resource"]
    validate_fhir(read.json())

    tenant_auditor = bearer(f"it-auditor-{unique}", tenant, "auditor")
    assert entry["resource"]["id"] == events[0].id
    assert (await auditor_client.get(entry["fullUrl"], headers=tenant_auditor)).json() == entry["resource"]
    other_auditor = bearer(f"it-auditor-{unique}", f"other-{unique}", "auditor")
    refused = await auditor_client.get(entry["fullUrl"], headers=other_auditor)
    assert refused.status_code == 404, "another tenant's record is as absent as a made-up id"
    made_up = await auditor_client.get("/audit/fhir/AuditEvent/no-such-event", headers=operator_auditor)
    assert made_up.status_code == 404 and made_up.json() == refused.json()
    # A FHIR client reads the error as an OperationOutcome (twenty-fourth session).
    assert (
        made_up.headers["content-type"] == FHIR_JSON and made_up.json()["resourceType"] == "OperationOutcome"
    )
    validate_fhir(made_up.json())
    bad_id = await auditor_client.get("/audit/fhir/AuditEvent/not_a_fhir_id!", headers=operator_auditor)
    assert bad_id.status_code == 422 and "not_a_fhir_id" not in bad_id.text
    own = (await auditor_client.get("/audit/events", params={"actor": actor}, headers=tenant_auditor)).json()
    assert {r["tenant"] for r in own["records"]} == {tenant}
    assert len(own["records"]) == 7

    bad_cursor = await auditor_client.get(
        "/audit/events", params={"cursor": "nonsense"}, headers=operator_auditor
    )
    assert bad_cursor.status_code == 400


async def test_non_auditors_are_refused_and_every_call_is_audited(mongo, unique, auditor_client):
    clinician = bearer(f"it-clin-{unique}", f"it-{unique}", "clinician")
    assert (await auditor_client.get("/audit/events", headers=clinician)).status_code == 403
    assert (await auditor_client.get("/audit/verify", headers=clinician)).status_code == 403
    assert (await auditor_client.get("/audit/export", headers=clinician)).status_code == 403
    assert (await auditor_client.get("/audit/events")).status_code == 401
    tenant_auditor = bearer(f"it-aud-{unique}", f"it-{unique}", "auditor")
    assert (await auditor_client.get("/audit/export", headers=tenant_auditor)).status_code == 404

    deadline = time.monotonic() + 60
    while True:
        calls = [
            d
            async for d in mongo["audit"]["records"].find(
                {
                    "event_type": "enclave.access.recorded",
                    "actor": {"$in": [f"it-clin-{unique}", f"it-aud-{unique}"]},
                }
            )
        ]
        if len(calls) >= 4:
            break
        assert time.monotonic() < deadline, f"only {len(calls)} auditor API calls were audited"
        await asyncio.sleep(0.5)
    assert {c["envelope"]["data"]["outcome"] for c in calls} == {"denied", "not_found"}
    assert all(c["event_code"]["code"] == "110101" for c in calls)  # Audit Log Used


async def test_a_call_answered_422_is_audited_as_rejected_not_as_allowed(mongo, unique, auditor_client):
    """FastAPI runs the guard before it validates a route's parameters: an auditor's query with an
    invalid parameter was recorded as an allowed call with status 200 (found by an API hunt)."""
    auditor = bearer(f"it-aud422-{unique}", f"it-{unique}", "auditor")
    response = await auditor_client.get("/audit/events", params={"limit": "many"}, headers=auditor)
    assert response.status_code == 422
    deadline = time.monotonic() + 60
    while (
        record := await mongo["audit"]["records"].find_one(
            {"event_type": "enclave.access.recorded", "actor": f"it-aud422-{unique}"}
        )
    ) is None:
        assert time.monotonic() < deadline, "the refused call was not audited"
        await asyncio.sleep(0.5)
    data = record["envelope"]["data"]
    assert (data["outcome"], data["status_code"], data["detail"]) == ("rejected", 422, "invalid_request")
    assert record["outcome"] != 0  # not a success in the record's DICOM outcome either


async def test_export_bundle_verifies_offline_and_cli_verifies_the_database(
    mongo, unique, auditor_client, operator_auditor, tmp_path: Path
):
    events = [access_event(actor=f"it-export-{unique}-{i}", tenant=f"it-{unique}") for i in range(4)]
    await publish(topics.ACCESS_RECORDED, events, key=f"export-{unique}")
    stored = await wait_for_records(mongo, [e.id for e in events])
    sequences = sorted(d["sequence"] for d in stored.values())

    response = await auditor_client.get(
        "/audit/export",
        params={"from_sequence": sequences[0], "to_sequence": sequences[-1]},
        headers=operator_auditor,
    )
    assert response.status_code == 200, response.text
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(response.content)
    with tarfile.open(bundle) as tar:
        assert {"manifest.json", "manifest.sig", "records.ndjson"} <= set(tar.getnames())
    key = tmp_path / "audit-signing.pub.pem"
    key.write_text((await auditor_client.get("/audit/public-key", headers=operator_auditor)).text)

    verify = [str(ROOT / ".venv/bin/enclave-audit-verify-bundle"), str(bundle), "--public-key", str(key)]
    ok = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "VERIFIED" in ok.stdout

    tampered = tmp_path / "tampered.tar"
    raw = bytearray(bundle.read_bytes())
    at = raw.find(events[1].id.encode())
    raw[at] = ord("0") if raw[at] != ord("0") else ord("1")
    tampered.write_bytes(bytes(raw))
    refused = subprocess.run(
        [*verify[:1], str(tampered), *verify[2:]], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1, refused.stdout

    env = os.environ | dev_env() | service_identity("audit") | {"ENCLAVE_MONGO_URL": MONGO_URL}
    cli = subprocess.run(
        [
            str(ROOT / ".venv/bin/enclave-audit-verify"),
            "--from",
            str(sequences[0]),
            "--to",
            str(sequences[-1]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "VERIFIED" in cli.stdout


# ---- anomaly alerts ----------------------------------------------------------------------------


async def test_break_glass_raises_one_security_alert_that_is_itself_audited(mongo, unique):
    actor = f"it-glass-{unique}"
    event = access_event(actor=actor, tenant=f"it-{unique}", action="break_glass", roles=["clinician"])
    await publish(topics.ACCESS_RECORDED, [event, event], key=event.id)
    alerts = await wait_for_events(
        topics.SECURITY_ALERT,
        lambda e: e.data.get("subject") == actor and e.data.get("rule") == "break_glass",
    )
    alert = alerts[0]
    assert alert.causation_id == event.id
    assert alert.data["severity"] == "high"
    record = await wait_for_records(mongo, [alert.id])
    assert record[alert.id]["event_type"] == "enclave.security.alert"
    copies = {"causation_id": event.id, "outcome_description": "break_glass"}
    assert await mongo["audit"]["records"].count_documents(copies) == 1  # redelivery raised no second alert


async def test_one_break_glass_opening_is_one_audit_alert_and_a_refused_attempt_is_named_so(unique):
    """Through the gateway: a clinician opens one break-glass session (one `break_glass` alert from
    the audit service, besides the gateway's own `break_glass_opened`); an admin, who may not, is
    refused (403): a `break_glass_refused` alert, and none claims that break-glass access was used."""
    from .support import read_all

    tenant, clinician, admin = f"it-bg-{unique}", f"dr-bg-{unique}", f"adm-bg-{unique}"
    gateway = f"http://127.0.0.1:{SERVICE_PORTS['gateway']}"
    body = {
        "patient_id": f"P-{unique}",
        "justification": "unconscious patient in the emergency room, no consent possible",
        "duration_minutes": 30,
    }
    async with httpx.AsyncClient(timeout=30) as client:
        opened = await client.post(
            f"{gateway}/api/v1/break-glass", json=body, headers=bearer(clinician, tenant, "clinician")
        )
        assert opened.status_code == 201, opened.text
        refused = await client.post(
            f"{gateway}/api/v1/break-glass", json=body, headers=bearer(admin, tenant, "admin")
        )
        assert refused.status_code == 403, refused.text

    def from_audit(e: Envelope) -> bool:
        return (
            e.source == "audit" and e.tenant == tenant and str(e.data.get("rule")).startswith("break_glass")
        )

    await wait_for_events(topics.SECURITY_ALERT, from_audit, count=2)
    alerts = await read_all(topics.SECURITY_ALERT, from_audit, settle=3.0)
    assert sorted((a.data["rule"], a.data["subject"], a.data["severity"]) for a in alerts) == [
        ("break_glass", clinician, "high"),
        ("break_glass_refused", admin, "medium"),
    ]


async def test_grants_are_security_attribute_changes_and_an_opened_break_glass_an_override(mongo, unique):
    """Through the gateway (action `manage_grants`): a grant, its revocation and a second revocation
    (409) are 110113 + 110137, action U; before, they were 110103 DICOM Instances Accessed, R.
    Reading the grant (`read_grants`) is 110100, action R: before, it was coded as a change. The
    gateway's `break_glass_opened` alert carries 110127 (before: 110113 alone)."""
    tenant, admin, clinician = f"it-grants-{unique}", f"adm-grants-{unique}", f"dr-grants-{unique}"
    gateway = f"http://127.0.0.1:{SERVICE_PORTS['gateway']}"
    grant = {
        "grantee": f"cg-{unique}",
        "patient_id": f"P-{unique}",
        "actions": ["read_status"],
        "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        "justification": "caregiver follow-up agreed with the care team",
    }
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as client:
        created = await client.post("/api/v1/grants", json=grant, headers=bearer(admin, tenant, "admin"))
        assert created.status_code == 201, created.text
        url = f"/api/v1/grants/{created.json()['grant_id']}"
        read = await client.get(url, headers=bearer(admin, tenant, "admin"))
        assert read.status_code == 200, read.text
        assert (await client.delete(url, headers=bearer(admin, tenant, "admin"))).status_code == 200
        assert (await client.delete(url, headers=bearer(admin, tenant, "admin"))).status_code == 409
        opened = await client.post(
            "/api/v1/break-glass",
            json={"patient_id": f"P-{unique}", "justification": "unconscious patient, no consent possible"},
            headers=bearer(clinician, tenant, "clinician"),
        )
        assert opened.status_code == 201, opened.text

    changes = ("grant_created:", "grant_revoked:", "grant_already_revoked:")
    records = mongo["audit"]["records"]
    deadline = time.monotonic() + 90
    while True:
        found = [
            d
            async for d in records.find({"actor": admin, "tenant": tenant})
            if str(d["envelope"]["data"].get("detail")).startswith(changes)
        ]
        alert = await records.find_one(
            {
                "tenant": tenant,
                "event_type": "enclave.security.alert",
                "outcome_description": "break_glass_opened",
            }
        )
        reads = [d async for d in records.find({"actor": admin, "tenant": tenant})]
        reads = [d for d in reads if d["envelope"]["data"].get("action") == "read_grants"]
        if len(found) == 3 and alert is not None and reads:
            break
        assert time.monotonic() < deadline, (
            f"{len(found)} of 3 grant records, alert {alert is not None}, {len(reads)} reads"
        )
        await asyncio.sleep(0.5)
    for record in found:
        assert record["envelope"]["data"]["action"] == "manage_grants"
        assert (record["event_code"]["code"], record["action"]) == ("110113", "U")
        assert [c["code"] for c in record["event_type_codes"]] == ["110137"]
    assert sorted(r["outcome"] for r in found) == [0, 0, 4]
    [read_record] = reads
    assert (read_record["event_code"]["code"], read_record["action"]) == ("110100", "R")
    assert read_record["event_type_codes"] == [] and read_record["outcome"] == 0
    assert (alert["event_code"]["code"], [c["code"] for c in alert["event_type_codes"]]) == (
        "110113",
        ["110127"],
    )


async def test_gateway_reads_are_filed_under_patient_and_study_and_many_studies_alert(
    mongo, unique, auditor_client, operator_auditor
):
    """A clinician reads instances of 20 studies through the gateway: each read is an audit record
    under the patient and the study (auditor queries find it), and the many-studies rule fires."""
    from enclave_audit.anomaly import (
        RULE_MANY_STUDIES,
        RULE_OFF_HOURS,
        AnomalyDetector,
        AnomalyThresholds,
        InMemoryAuditHistory,
    )

    from .support import mr_instance, read_all

    hours = AnomalyDetector(AnomalyThresholds(), InMemoryAuditHistory())
    outside_hours_at_start = not hours.within_business_hours(datetime.now(UTC))

    limit = AnomalyThresholds().distinct_studies_limit  # the service runs with the defaults
    tenant, clinician = f"it-reads-{unique}", f"dr-many-{unique}"
    gateway = f"http://127.0.0.1:{SERVICE_PORTS['gateway']}"
    async with httpx.AsyncClient(base_url=gateway, timeout=60.0) as client:
        files = [("files", (f"s{i}.dcm", mr_instance()[0], "application/dicom")) for i in range(limit)]
        uploaded = await client.post(
            "/api/v1/imaging/upload", files=files, headers=bearer("it-pacs", tenant, "uploader")
        )
        assert uploaded.status_code == 200, uploaded.text
        statuses = []
        for accepted in uploaded.json()["accepted"]:
            read = await client.get(
                f"/api/v1/imaging/{accepted['imaging_id']}", headers=bearer(clinician, tenant, "clinician")
            )
            assert read.status_code == 200, read.text
            statuses.append(read.json())
    assert len({s["study_key"] for s in statuses}) == limit
    (alert,) = await wait_for_events(
        topics.SECURITY_ALERT,
        lambda e: e.data.get("rule") == RULE_MANY_STUDIES and e.data.get("subject") == clinician,
        timeout=120,
    )
    assert alert.tenant == tenant and alert.data["severity"] in ("medium", "high")
    # the hours rule (business hours 07-19 UTC, Monday to Friday, by default) on the same reads:
    # one alert outside them (not repeated for the next reads), none inside
    outside_hours = not hours.within_business_hours(datetime.now(UTC))
    off_hours = await read_all(
        topics.SECURITY_ALERT,
        lambda e: e.data.get("rule") == RULE_OFF_HOURS and e.data.get("subject") == clinician,
    )
    if outside_hours and outside_hours_at_start:
        assert len(off_hours) == 1 and off_hours[0].data["severity"] == "low"
    elif not outside_hours and not outside_hours_at_start:
        assert off_hours == []
    study = statuses[-1]["study_key"]
    by_study = await auditor_client.get(
        "/audit/events", params={"study": study, "actor": clinician}, headers=operator_auditor
    )
    assert by_study.status_code == 200, by_study.text
    reads = [r for r in by_study.json()["records"] if r["tenant"] == tenant]
    assert reads and all(
        {"kind": "study", "object_id": study}
        in [{"kind": o["kind"], "object_id": o["object_id"]} for o in r["objects"]]
        for r in reads
    )


async def test_an_export_larger_than_a_bundle_may_hold_is_refused_with_what_to_do(
    mongo, unique, auditor_client, operator_auditor
):
    """An export bundle is built on the audit pod's /tmp (an emptyDir whose size limit evicts the pod,
    the consumer and checkpointer with it) before it is sent: a range over
    ENCLAVE_AUDIT_MAX_EXPORT_RECORDS (3 for this test) is refused with 413 saying how to export it in
    parts. Before the tenth session a whole-chain export of a few days of trail evicted the pod."""
    events = [access_event(actor=f"it-big-export-{unique}-{i}", tenant=f"it-{unique}") for i in range(4)]
    await publish(topics.ACCESS_RECORDED, events, key=f"big-export-{unique}")
    stored = await wait_for_records(mongo, [e.id for e in events])
    sequences = sorted(d["sequence"] for d in stored.values())
    with restarted_with("audit", {"ENCLAVE_AUDIT_MAX_EXPORT_RECORDS": "3"}):
        response = await auditor_client.get(
            "/audit/export",
            params={"from_sequence": sequences[0], "to_sequence": sequences[-1]},
            headers=operator_auditor,
        )
        assert response.status_code == 413, response.text
        detail = response.json()["detail"]
        assert detail["code"] == "export_too_large"
        assert "at most 3" in detail["message"] and "from_sequence and to_sequence" in detail["message"]


async def test_times_and_sequences_past_what_the_store_holds_are_client_errors(
    auditor_client, operator_auditor
):
    """Found by an API hunt (thirteenth session): each of these was a 500. A time whose UTC value is
    past the year 9999 (or before 1), and a sequence number past 64 bits."""
    for params in (
        {"since": "9999-12-31T23:59:59-14:00"},
        {"since": "0001-01-01T00:00:00+14:00"},
        {"until": "9999-12-31T23:59:59-23:59"},
    ):
        response = await auditor_client.get("/audit/events", params=params, headers=operator_auditor)
        assert response.status_code == 400, (params, response.text)
        assert response.json()["detail"]["code"] == "bad_time"
    for route in ("/audit/verify", "/audit/export"):
        for params in ({"from_sequence": 2**63}, {"from_sequence": 1, "to_sequence": 10**20}):
            response = await auditor_client.get(route, params=params, headers=operator_auditor)
            assert response.status_code == 422, (route, params, response.text)
            assert "less than or equal to 9223372036854775807" in response.text
    reversed_range = await auditor_client.get(
        "/audit/export", params={"from_sequence": 5, "to_sequence": 2}, headers=operator_auditor
    )
    assert reversed_range.status_code == 400
    assert (
        "to_sequence must be greater than or equal to from_sequence"
        in reversed_range.json()["detail"]["message"]
    )


async def test_the_auditor_api_limits_heads_answers_head_and_echoes_no_input(
    auditor_client, operator_auditor
):
    """Found by an API hunt (thirteenth session): the audit service had no limit on a request's head
    (the gateway's 431 was the gateway's alone), its 422 echoed the value sent, a trailing slash was
    a 307 and HEAD a 405. The service's HTTP app now has what the gateway has."""
    padded = operator_auditor | {"X-Padding": "x" * (33 * 1024)}
    response = await auditor_client.get("/audit/public-key", headers=padded)
    assert response.status_code == 431
    detail = response.json()["detail"]
    assert detail["code"] == "headers_too_large" and "ENCLAVE_AUDIT_MAX_HEADER_BYTES" in detail["message"]

    planted = "PHI-MRN-40412-QQ"
    response = await auditor_client.get("/audit/events", params={"limit": planted}, headers=operator_auditor)
    assert response.status_code == 422 and planted not in response.text
    assert response.json()["detail"]["problems"][0]["field"] == "query.limit"

    head = await auditor_client.head("/audit/public-key", headers=operator_auditor)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
    assert _two_on_one_connection(operator_auditor, "HEAD", "GET") == [200, 200]
    head_export = await auditor_client.head("/audit/export", headers=operator_auditor)
    assert head_export.status_code == 200 and head_export.content == b""  # no bundle was built for it
    slashed = await auditor_client.get("/audit/events/", headers=operator_auditor)
    assert slashed.status_code == 404 and "do not end in '/'" in slashed.json()["detail"]["message"]


def _two_on_one_connection(headers: dict[str, str], *methods: str) -> list[int]:
    """The statuses of requests for the public key sent one after the other on one kept-alive
    connection. A HEAD once made the server expect a GET's body: it dropped the connection after the
    headers, so the next request on it got no answer (seen as a flaky "Server disconnected")."""
    url = httpx.URL(AUDIT_URL)
    statuses = []
    with socket.create_connection((url.host, url.port), timeout=30) as conn:
        reader = conn.makefile("rb")
        for method in methods:
            head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            conn.sendall(f"{method} /audit/public-key HTTP/1.1\r\nHost: {url.host}\r\n{head}\r\n".encode())
            status_line = reader.readline()
            assert status_line, f"no answer to the {method} on the kept-alive connection"
            statuses.append(int(status_line.split()[1]))
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if method != "HEAD":
                reader.read(length)
    return statuses
