"""The time limit of one analysis on the real stack (docs/analysis.md, "A bound on one analysis's
time"): it bounds reading the series' members from the object store, not only the worker.

A series of two slices, fewer than a volume needs, fails ``analysis_error`` ("has 2 de-identified
instance(s)") after its members are read, before any worker runs. The operator re-runs it
(``enclave-analysis-rerun``) while the analysis service runs with a limit of 1 ms
(``ENCLAVE_ANALYSIS_MAX_ANALYSIS_S``): no read of a member from MinIO ends that soon. Until the
nineteenth session, when only the worker was bounded, the members were read however long it took
and the re-run failed ``analysis_error`` again (a stalled object store held the claim past its lease
the same way). Now it fails ``analysis_timed_out``, its series document is finished with that
outcome (the claim is not left to its lease), and no report of it is in the results bucket.

The re-run, not an upload, starts the analysis under the short limit: the service runs with it only
for seconds, whatever backlog of events the shared stack has, since every series analysed meanwhile
would time out too.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from enclave_common import topics
from enclave_common.events import AnalysisFailed
from pydicom.uid import generate_uid

from .support import admin_command, mr_instance, restarted_with, wait_for_events
from .test_analysis_after_redo import RESULTS_BUCKET
from .test_gateway_support import GATEWAY, bearer, new_tenant


async def test_reading_the_members_counts_toward_the_limit_and_a_series_past_it_is_timed_out(mongo, s3):
    tenant = new_tenant("it-antime")
    study, series = generate_uid(), generate_uid()
    files = [
        ("file", (f"{n}.dcm", mr_instance(study_uid=study, series_uid=series)[0], "application/dicom"))
        for n in range(2)
    ]
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.post(
            f"{GATEWAY}/api/v1/imaging/upload",
            files=files,
            headers=bearer("it-antime-pacs", tenant, "uploader"),
        )
    assert answer.status_code == 200, answer.text
    ids = sorted(a["imaging_id"] for a in answer.json()["accepted"])
    (first,) = await wait_for_events(topics.ANALYSIS_FAILED, lambda e: e.tenant == tenant, timeout=300)
    assert first.data["reason_code"] == "analysis_error", first.data["reason"]
    assert "has 2 de-identified instance(s)" in first.data["reason"]
    await _finished(mongo, first.data["analysis_id"], "analysis_error")  # what the re-run picks

    with restarted_with("analysis", {"ENCLAVE_ANALYSIS_MAX_ANALYSIS_S": "0.001"}):
        rerun = admin_command(
            "enclave-analysis-rerun",
            *("--reason-code", "analysis_error", "--tenant", tenant, "--actor", "user:it-sre"),
            *("--reason", "the time limit covers reading the members"),
        )
        assert rerun.returncode == 0, rerun.stderr
        assert json.loads(rerun.stdout)["series"] == 1
        (failed,) = await wait_for_events(
            topics.ANALYSIS_FAILED, lambda e: e.tenant == tenant and e.id != first.id, timeout=120
        )
    outcome = failed.payload(AnalysisFailed)
    assert outcome.reason_code == "analysis_timed_out", outcome.reason
    assert "was stopped while reading the series' members" in outcome.reason
    assert sorted(outcome.instance_upload_ids) == ids and outcome.analysis_id == first.data["analysis_id"]

    doc = await _finished(mongo, outcome.analysis_id, "analysis_timed_out")
    assert doc["attempts"] == 1

    stored = s3.list_object_versions(Bucket=RESULTS_BUCKET, Prefix=f"reports/{outcome.analysis_id}/")
    assert stored.get("Versions", []) == [] and stored.get("DeleteMarkers", []) == []


async def _finished(mongo: Any, analysis_id: str, reason_code: str) -> dict[str, Any]:
    """The series document once it is finished failed with ``reason_code`` (the outcome is published
    just before this write)."""
    for _ in range(60):
        doc = await mongo["analysis"]["series"].find_one({"analysis_id": analysis_id})
        if doc is not None and doc.get("status") == "failed" and doc.get("reason_code") == reason_code:
            return dict(doc)
        await asyncio.sleep(0.5)
    raise AssertionError(f"series of {analysis_id} not finished failed with {reason_code}: {doc}")
