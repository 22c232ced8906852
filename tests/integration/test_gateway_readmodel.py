"""The gateway's read model on the real stack: an event Kafka delivers again, after the status has
moved past it, changes nothing (docs/gateway.md, Status and results: idempotent by business key,
without an event-id guard)."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid

import httpx
import pydicom
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_common.events import AnalysisCompleted

from .conftest import KAFKA
from .support import mr_instance, publish, wait_for_events
from .test_gateway_support import GATEWAY, bearer, new_tenant, wait_for_status

PAST_STORED = {"deidentified", "quarantined", "analysed"}
GATEWAY_GROUP = "enclave-gateway"


async def _consumed_by_gateway(partition: TopicPartition, offset: int, timeout: float = 60.0) -> None:
    """Wait until the gateway's consumer group committed past ``offset`` (it handled the record)."""
    # Not subscribed: reading the group's committed offset does not join (or rebalance) the group.
    reader = AIOKafkaConsumer(bootstrap_servers=KAFKA, group_id=GATEWAY_GROUP, enable_auto_commit=False)
    await reader.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            committed = await reader.committed(partition)
            if committed is not None and committed > offset:
                return
            await asyncio.sleep(0.5)
    finally:
        await reader.stop()
    raise AssertionError(f"the gateway did not consume {partition} offset {offset} within {timeout:.0f} s")


async def test_a_redelivered_stored_event_does_not_move_the_status_back(mongo):
    tenant = new_tenant()
    headers = bearer("it-portal", tenant, "uploader")
    data, _ = mr_instance()
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{GATEWAY}/api/v1/imaging/upload",
            files=[("files", ("scan.dcm", data, "application/dicom"))],
            headers=headers,
        )
        assert answer.status_code == 200, answer.text
        imaging_id = answer.json()["accepted"][0]["imaging_id"]
        url = f"{GATEWAY}/api/v1/imaging/{imaging_id}"
        before = await wait_for_status(client, url, headers, PAST_STORED)

        # Kafka delivers the instance's `instance.stored` again: the same record, the same event id.
        [stored] = await wait_for_events(
            topics.INSTANCE_STORED, lambda e: e.data.get("instance_upload_id") == imaging_id
        )
        producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", enable_idempotence=True)
        await producer.start()
        try:
            sent = await producer.send_and_wait(
                topics.INSTANCE_STORED, stored.to_bytes(), key=imaging_id.encode()
            )
        finally:
            await producer.stop()
        await _consumed_by_gateway(TopicPartition(sent.topic, sent.partition), sent.offset)

        after = (await client.get(url, headers=headers)).json()
        # Still past `stored`, not rewritten (analysis_id may still change: the one-instance series
        # gets its analysis outcome after the analysis service's quiet period).
        fields = ("status", "duplicate", "updated_at", "study_key", "series_key")
        assert {f: after[f] for f in fields} == {f: before[f] for f in fields}
    # Handled without an event-id guard: the gateway keeps no processed-event record of it.
    assert await mongo["gateway"]["processed_events"].find_one({"_id": stored.id}) is None


async def test_the_patient_query_pages_through_every_instance_in_upload_order():
    """A patient with more instances than one page (five studies of 250 slices pass the page size of
    1000) gets all of them, page by page, none twice: until the tenth session the query silently
    answered the first 1000 only, so the newest studies of a long-followed patient were missing."""
    tenant = new_tenant()
    patient_id = f"PAGE-{uuid.uuid4().hex[:8]}"
    uploader = bearer("it-portal", tenant, "uploader")
    clinician = bearer("it-dr", tenant, "clinician")
    files = [
        ("files", (f"{i}.dcm", mr_instance(patient_id=patient_id)[0], "application/dicom")) for i in range(5)
    ]
    url = f"{GATEWAY}/api/v1/imaging/patient/{patient_id}"
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(f"{GATEWAY}/api/v1/imaging/upload", files=files, headers=uploader)
        assert answer.status_code == 200, answer.text
        ids = [a["imaging_id"] for a in answer.json()["accepted"]]

        pages, after = [], None
        while True:
            params = {"limit": 2, **({"after": after} if after else {})}
            page = await client.get(url, params=params, headers=clinician)
            assert page.status_code == 200, page.text
            pages.append([i["imaging_id"] for i in page.json()["instances"]])
            after = page.json()["next_after"]
            if after is None:
                break
            assert after == pages[-1][-1]
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [i for p in pages for i in p] == sorted(ids)

        whole = (await client.get(url, headers=clinician)).json()
        assert [i["imaging_id"] for i in whole["instances"]] == sorted(ids) and whole["next_after"] is None

        for bad in ({"limit": 0}, {"limit": 1001}, {"after": patient_id}):
            refused = await client.get(url, params=bad, headers=clinician)
            assert refused.status_code == 422, (bad, refused.text)
            assert patient_id not in refused.text
        too_long = "P" * 65  # no upload holds it: PatientID is an LO, at most 64 characters
        refused = await client.get(f"{GATEWAY}/api/v1/imaging/patient/{too_long}", headers=clinician)
        assert refused.status_code == 422 and too_long not in refused.text
        assert "at most 64 characters" in refused.json()["problems"][0]["problem"]


async def test_a_non_ascii_patient_id_finds_every_instance_whatever_ingest_decides():
    """Found by a pipeline hunt: the gateway read PatientID's bytes as ASCII while ingest decoded them
    in the instance's character set, so the two derived different patient keys. An instance ingest
    refused (here a second, different instance under a SOP Instance UID already stored) kept the
    gateway's key and was missing from the patient query under the id the hospital uses."""
    tenant = new_tenant()
    patient_id = f"HÜNTER-山田-{uuid.uuid4().hex[:6]}"
    uploader = bearer("it-portal", tenant, "uploader")
    clinician = bearer("it-dr", tenant, "clinician")

    def utf8_instance(sop_instance_uid: str | None = None, comment: str = "first") -> bytes:
        _, ds = mr_instance(patient_id=patient_id)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageComments = comment
        if sop_instance_uid:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    first = utf8_instance()
    sop_uid = pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID
    async with httpx.AsyncClient(timeout=30) as client:
        ids = []
        for data in (first, utf8_instance(sop_uid, comment="second, different")):
            files = [("files", ("x.dcm", data, "application/dicom"))]
            answer = await client.post(f"{GATEWAY}/api/v1/imaging/upload", files=files, headers=uploader)
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["accepted"][0]["imaging_id"])
            url = f"{GATEWAY}/api/v1/imaging/{ids[-1]}"
            await wait_for_status(client, url, clinician, {"stored", "failed", *PAST_STORED})
        second = (await client.get(f"{GATEWAY}/api/v1/imaging/{ids[1]}", headers=clinician)).json()
        assert second["status"] == "failed" and second["reason_code"] == "duplicate_conflict", second
        results = await client.get(f"{GATEWAY}/api/v1/imaging/{ids[1]}/analysis", headers=clinician)
        assert results.status_code == 200, results.text
        assert results.json()["status"] == "not_analysed", "not pending forever: no analysis will include it"
        assert results.json()["instance_status"] == "failed" and results.json()["analysis"] is None
        listed = await client.get(f"{GATEWAY}/api/v1/imaging/patient/{patient_id}", headers=clinician)
        assert listed.status_code == 200, listed.text
        assert sorted(i["imaging_id"] for i in listed.json()["instances"]) == sorted(ids)


async def test_researchers_page_through_their_tenants_de_identified_results():
    """``read_results_deid`` had no route: a researcher could read instance statuses only. The results
    of a tenant's analyses are listed without the imaging ids and report objects that lead back to an
    identified instance, page by page, and never another tenant's."""
    tenant, other = new_tenant(), new_tenant()
    done = [
        AnalysisCompleted(
            analysis_id=f"an-{uuid.uuid4().hex}",
            study_key=f"sk-{i}",
            series_key=f"se-{i}",
            instance_upload_ids=[str(uuid.uuid4())],
            measures={"total_brain_volume_ml": 1000.0 + i},
            qc={"verdict": "pass"},
            reports=[],
        )
        for i in range(3)
    ]
    for owner, results in (
        (tenant, done),
        (other, [done[0].model_copy(update={"analysis_id": "an-" + "0" * 32})]),
    ):
        envelopes = [
            Envelope.for_topic(
                topics.ANALYSIS_COMPLETED, d, source="analysis", tenant=owner, actor="it", correlation_id="c"
            )
            for d in results
        ]
        await publish(topics.ANALYSIS_COMPLETED, envelopes, key=f"research-{owner}")
    researcher = bearer("it-researcher", tenant, "researcher")
    url = f"{GATEWAY}/api/v1/research/analyses"
    async with httpx.AsyncClient(timeout=30) as client:
        deadline = time.monotonic() + 60
        while True:
            listed = (await client.get(url, headers=researcher)).json()["analyses"]
            if len(listed) == 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert sorted(a["analysis_id"] for a in listed) == sorted(d.analysis_id for d in done)
        pages, after = [], None
        while True:
            page = (
                await client.get(
                    url, params={"limit": 2, **({"after": after} if after else {})}, headers=researcher
                )
            ).json()
            pages.append([a["analysis_id"] for a in page["analyses"]])
            if (after := page["next_after"]) is None:
                break
        assert [len(p) for p in pages] == [2, 1] and sorted(sum(pages, [])) == sorted(
            d.analysis_id for d in done
        )
        first = next(a for a in listed if a["analysis_id"] == done[0].analysis_id)
        assert first["status"] == "completed" and first["series_key"] == "se-0"
        assert first["measures"] == {"total_brain_volume_ml": 1000.0} and first["qc"] == {"verdict": "pass"}
        assert "imaging_id" not in first and "reports" not in first
        assert done[0].instance_upload_ids[0] not in json.dumps(listed)
        refused = await client.get(url, params={"after": "not-an-analysis-id"}, headers=researcher)
        assert refused.status_code == 422
