"""The time limit of one analysis on the real stack (docs/analysis.md, "A bound on one analysis's
time"): it bounds reading the series' members from the object store, not only the worker, and an
object store too slow for it is a dependency problem: the series is tried again later, not failed.

A series of two slices, fewer than a volume needs, fails ``analysis_error`` ("has 2 de-identified
instance(s)") after its members are read, before any worker runs. The operator re-runs it
(``enclave-analysis-rerun``) while the analysis service runs with a limit of 1 ms
(``ENCLAVE_ANALYSIS_MAX_ANALYSIS_S``): no read of a member from MinIO ends that soon. The attempt is
stopped while the members are read and handed back to be tried again after the retry delay, its
attempt not counted (the series document shows it claimable with no attempt spent) and counted in
``enclave_analysis_attempt_failures_total{cause="slow_object_store"}``; no outcome is published for
it, and no report of it is in the results bucket. Once the service runs with its usual limit, the
series is analysed again and fails ``analysis_error`` as before, on its first counted attempt.
Until the nineteenth session, when only the worker was bounded, the members were read however long
it took (a stalled object store held the claim past its lease); in the nineteenth the read past the
limit failed the series for good (``analysis_timed_out``), a store's slowness taken for the series'.

The re-run, not an upload, starts the analysis under the short limit: the service runs with it only
for seconds, whatever backlog of events the shared stack has (series analysed meanwhile are tried
again later, not failed).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from enclave_common import topics
from enclave_common.events import AnalysisFailed
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from .conftest import SERVICE_PORTS
from .support import admin_command, mr_instance, restarted_with, wait_for_events
from .test_analysis_after_redo import RESULTS_BUCKET
from .test_gateway_support import GATEWAY, bearer, new_tenant


async def test_a_read_past_the_limit_is_tried_again_later_not_failed(mongo, s3):
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
    analysis_id = first.data["analysis_id"]
    await _finished(mongo, analysis_id, "analysis_error")  # what the re-run picks

    with restarted_with("analysis", {"ENCLAVE_ANALYSIS_MAX_ANALYSIS_S": "0.001"}):
        rerun = admin_command(
            "enclave-analysis-rerun",
            *("--reason-code", "analysis_error", "--tenant", tenant, "--actor", "user:it-sre"),
            *("--reason", "the time limit covers reading the members"),
        )
        assert rerun.returncode == 0, rerun.stderr
        assert json.loads(rerun.stdout)["series"] == 1
        retried = await _tried_again(mongo, analysis_id)
        assert _slow_store_failures() >= 1
    assert retried["lease_until"] > retried["changed_at"]  # claimable again after the retry delay

    # Back on the usual limit, the series is analysed again once the retry delay passes: the same
    # outcome as before (not analysis_timed_out: the slow store published nothing), its attempt the
    # first one counted.
    (again,) = await wait_for_events(
        topics.ANALYSIS_FAILED, lambda e: e.tenant == tenant and e.id != first.id, timeout=300
    )
    outcome = again.payload(AnalysisFailed)
    assert outcome.reason_code == "analysis_error", outcome.reason
    assert sorted(outcome.instance_upload_ids) == ids and outcome.analysis_id == analysis_id
    doc = await _finished(mongo, analysis_id, "analysis_error")
    assert doc["attempts"] == 1

    stored = s3.list_object_versions(Bucket=RESULTS_BUCKET, Prefix=f"reports/{analysis_id}/")
    assert stored.get("Versions", []) == [] and stored.get("DeleteMarkers", []) == []


async def _tried_again(mongo: Any, analysis_id: str) -> dict[str, Any]:
    """The series document once an attempt was handed back to be tried again without counting: still
    held for analysis (``analysing``, its lease moved to the retry), no attempt spent (a claim counts
    one, the retry gives it back)."""
    doc = None
    for _ in range(120):
        doc = await mongo["analysis"]["series"].find_one({"analysis_id": analysis_id})
        if doc is not None and doc.get("status") == "analysing" and doc.get("attempts") == 0:
            return dict(doc)
        await asyncio.sleep(0.5)
    raise AssertionError(f"series of {analysis_id} was not handed back to be tried again: {doc}")


def _slow_store_failures() -> float:
    """``enclave_analysis_attempt_failures_total{cause="slow_object_store"}`` of the analysis service."""
    text = httpx.get(f"http://127.0.0.1:{SERVICE_PORTS['analysis']}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "enclave_analysis_attempt_failures_total" and sample.labels.get("cause") == (
                "slow_object_store"
            ):
                return sample.value
    raise AssertionError("enclave_analysis_attempt_failures_total has no slow_object_store cause")


async def _finished(mongo: Any, analysis_id: str, reason_code: str) -> dict[str, Any]:
    """The series document once it is finished failed with ``reason_code`` (the outcome is published
    just before this write)."""
    for _ in range(60):
        doc = await mongo["analysis"]["series"].find_one({"analysis_id": analysis_id})
        if doc is not None and doc.get("status") == "failed" and doc.get("reason_code") == reason_code:
            return dict(doc)
        await asyncio.sleep(0.5)
    raise AssertionError(f"series of {analysis_id} not finished failed with {reason_code}: {doc}")
