"""Analysis after ``enclave-deid-redo`` on the real stack (docs/analysis.md, "One slice per instance").

A series is uploaded twice (the second upload a duplicate of each instance). Its deid records are
made to look like records before the eighteenth session, which did not note duplicate uploads
(``emitted`` names only the first), and the redo replaces every copy: it re-publishes the outcome
for the first uploads only and deletes the old copies, which the duplicates' members still name.
Until then analysis re-analysed the series, failed reading a deleted copy on every attempt and
ended ``analysis_internal_error``; now it reads each instance once, from its newest copy.

The member bookkeeping that keeps a redelivered older outcome from bringing back a deleted copy is
checked on FerretDB itself (``SeriesAssembly.settle``'s conditional upsert).
"""

from __future__ import annotations

import asyncio
import io
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from enclave_analysis.assembly import SeriesAssembly
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.phantoms import mni152_volume, write_mr_series
from enclave_analysis.report_versions import S3ReportVersions
from enclave_common import topics
from enclave_common.envelope import new_event_id
from enclave_common.events import AnalysisCompleted, AnalysisFailed, InstanceDeidentified
from pydicom.uid import generate_uid

from .support import admin_command, mr_instance, read_all, wait_for_events
from .test_deid import _store
from .test_deid_redo import _versions
from .test_gateway_support import GATEWAY, bearer, new_tenant

#: One report written three times (the results bucket of the local stack is the deid bucket).
#: Where analysis writes its reports: its own bucket, not deid's (deploy/iam/enclave-analysis.json).
RESULTS_BUCKET = AnalysisSettings.model_fields["results_bucket"].default
SR_VERSIONS = [("sr.dcm", b"first"), ("sr.dcm", b"second"), ("seg.dcm", b"third")]


async def test_an_older_outcome_of_an_upload_never_replaces_the_newer_one(mongo):
    db = mongo[f"it_analysis_{uuid.uuid4().hex[:10]}"]
    assembly = SeriesAssembly(db)
    old, new = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC)
    try:

        async def settle(state: str, fields: dict[str, object], at: datetime) -> None:
            await assembly.settle("t", "se", "iu-1", "up-1", state, fields, "corr", at)

        redone = {"object": {"bucket": "b", "key": "new", "version_id": "2"}, "instance_key": "ik"}
        await settle("deidentified", redone, new)
        await settle("deidentified", {**redone, "object": {"bucket": "b", "key": "old"}}, old)  # redelivered
        member = await db["members"].find_one({"_id": "iu-1"})
        assert member["object"]["key"] == "new" and member["state"] == "deidentified"
        assert (await db["series"].find_one({"_id": "t:se"}))["settled"] == ["iu-1"]

        await settle("excluded", {"reason_code": "burned_in_risk"}, new + timedelta(seconds=1))  # withdrawn
        member = await db["members"].find_one({"_id": "iu-1"})
        assert member["state"] == "excluded" and member["instance_key"] == "ik"
    finally:
        await mongo.drop_database(db.name)


async def _upload(files: list[bytes], headers: dict[str, str]) -> list[str]:
    parts = [("file", (f"{n}.dcm", data, "application/dicom")) for n, data in enumerate(files)]
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.post(f"{GATEWAY}/api/v1/imaging/upload", files=parts, headers=headers)
    assert answer.status_code == 200, answer.text
    return [a["imaging_id"] for a in answer.json()["accepted"]]


async def test_after_a_redo_that_missed_duplicate_uploads_the_series_is_analysed_not_failed(mongo):
    tenant = new_tenant("it-anredo")
    headers = bearer("it-anredo-pacs", tenant, "uploader")
    study, series = generate_uid(), generate_uid()
    files = [mr_instance(study_uid=study, series_uid=series)[0] for _ in range(2)]
    first = await _upload(files, headers)
    released = await wait_for_events(
        topics.INSTANCE_DEIDENTIFIED,
        lambda e: e.data.get("instance_upload_id") in first,
        count=2,
        timeout=120,
    )
    duplicates = await _upload(files, headers)
    uploads = sorted(first + duplicates)
    before = await wait_for_events(
        topics.ANALYSIS_FAILED,
        lambda e: e.tenant == tenant and sorted(e.data["instance_upload_ids"]) == uploads,
        timeout=180,
    )
    assert before[0].data["reason_code"] == "analysis_error"
    seen = {e.id for e in await read_all(topics.ANALYSIS_FAILED, lambda e: e.tenant == tenant, settle=1.0)}

    # Records as an older deid left them: the duplicate uploads not noted.
    records = mongo["deid"]["deidentified"]
    old_keys = {}
    for event in released:
        copy = event.payload(InstanceDeidentified)
        old_keys[copy.instance_key] = copy.object.key
        done = await records.update_one(
            {"_id": f"{tenant}|{copy.instance_key}"},
            {
                "$set": {
                    "emitted": [{"upload_id": copy.upload_id, "instance_upload_id": copy.instance_upload_id}]
                }
            },
        )
        assert done.matched_count == 1

    actor = f"user:it-anredo-{new_event_id()[-6:]}"
    redo = admin_command(
        "enclave-deid-redo",
        "--tenant",
        tenant,
        "--all",
        "--actor",
        actor,
        "--reason",
        "analysis after a redo test",
    )
    assert redo.returncode == 0, redo.stderr
    for key in old_keys.values():
        assert _versions(key) == []
    # The duplicates' members still name the deleted copies: nothing told analysis of theirs.
    stale = [await mongo["analysis"]["members"].find_one({"_id": iuid}) for iuid in duplicates]
    assert {m["object"]["key"] for m in stale} == set(old_keys.values())

    (after,) = await wait_for_events(
        topics.ANALYSIS_FAILED,
        lambda e: e.tenant == tenant and e.id not in seen,
        timeout=150,
    )
    outcome = after.payload(AnalysisFailed)
    assert outcome.reason_code == "analysis_error", outcome.reason
    assert sorted(outcome.instance_upload_ids) == uploads
    assert "has 2 de-identified instance(s)" in outcome.reason


async def test_superseded_report_versions_are_deleted_from_the_versioned_results_bucket():
    """``S3ReportVersions`` on MinIO: what the service deletes once a newer result supersedes a report
    (``services/analysis/tests/test_superseded_reports.py`` has when and which)."""
    store = _store()
    prefix = f"reports/it-{uuid.uuid4().hex}/"
    written = [
        await store.put(RESULTS_BUCKET, f"{prefix}{name}", io.BytesIO(body)) for name, body in SR_VERSIONS
    ]
    versions = S3ReportVersions(store)
    listed = await versions.versions(RESULTS_BUCKET, prefix)
    assert sorted(listed) == sorted((w.key, w.version_id) for w in written)
    newest = (written[-1].key, written[-1].version_id)
    await versions.delete(RESULTS_BUCKET, [v for v in listed if v != newest])
    assert await versions.versions(RESULTS_BUCKET, prefix) == [newest]
    assert await store.read(RESULTS_BUCKET, newest[0]) == SR_VERSIONS[-1][1]
    await versions.delete(RESULTS_BUCKET, [newest])
    assert await versions.versions(RESULTS_BUCKET, prefix) == []


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_a_series_analysed_again_leaves_only_the_new_report_versions():
    """The MNI brain analysed, then re-run by an operator: the reports are written again at the same
    keys, and only the versions the new ``analysis.completed`` names are left in the results bucket."""
    tenant = new_tenant("it-anrerun")
    datasets = write_mr_series(mni152_volume(), patient_id=f"AR-{uuid.uuid4().hex[:6]}")
    uploaded: list[str] = []
    for start in range(0, len(datasets), 50):
        batch = []
        for ds in datasets[start : start + 50]:
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            batch.append(out.getvalue())
        uploaded += await _upload(batch, bearer("it-anrerun-pacs", tenant, "uploader"))
    (first,) = await wait_for_events(topics.ANALYSIS_COMPLETED, lambda e: e.tenant == tenant, timeout=600)
    done = first.payload(AnalysisCompleted)
    assert sorted(done.instance_upload_ids) == sorted(uploaded)
    prefix = f"reports/{done.analysis_id}/"
    assert {r.bucket for r in done.reports} == {RESULTS_BUCKET}  # not in deid's bucket (deploy/iam)
    versions = S3ReportVersions(_store())
    assert sorted(await versions.versions(RESULTS_BUCKET, prefix)) == sorted(
        (r.key, r.version_id) for r in done.reports
    )

    rerun = admin_command(
        "enclave-analysis-rerun", "--status", "completed", "--tenant", tenant, "--series-key", done.series_key,
        "--actor", "user:it-anrerun", "--reason", "superseded report versions test",
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    (second,) = await wait_for_events(
        topics.ANALYSIS_COMPLETED, lambda e: e.tenant == tenant and e.id != first.id, timeout=600
    )
    again = second.payload(AnalysisCompleted)
    assert again.analysis_id == done.analysis_id
    assert {r.key for r in again.reports} == {r.key for r in done.reports}
    assert {r.version_id for r in again.reports}.isdisjoint(r.version_id for r in done.reports)
    for _ in range(60):  # deleted after the event is published, before the series is finished
        left = sorted(await versions.versions(RESULTS_BUCKET, prefix))
        if len(left) == len(again.reports):
            break
        await asyncio.sleep(0.5)
    assert left == sorted((r.key, r.version_id) for r in again.reports)
