"""How analysis assembles a series whose members do not all reach it.

A series in which de-identification quarantined one instance (burned-in text risk) must still come
to an outcome: the quarantined member settles as excluded, the series completes, and analysis
publishes its result or its failure for the members it has. Until the ninth session analysis
dead-lettered every ``instance.quarantined`` event (a TypeError in its handler), so such a series
never completed and the hospital never got an answer; no test sent one.

Here the series has two releasable slices besides the quarantined one: fewer than a volume needs,
so the outcome is a prompt, deterministic ``analysis.failed`` naming the two members.

The bounded retries of a series whose analysis fails unexpectedly count attempts in the series
document; that bookkeeping is checked here on FerretDB (the decisions on top of it are unit-tested in
``services/analysis/tests/test_attempts.py``).
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from enclave_analysis.assembly import SeriesAssembly
from enclave_common import topics
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.events import AnalysisFailed, InstanceRejected, UploadCompleted
from pydicom.uid import generate_uid

from .support import admin_command, mr_instance, publish, read_all, restarted_with, wait_for_events
from .test_gateway_support import GATEWAY, bearer, new_tenant


async def test_a_series_with_a_quarantined_member_still_gets_its_outcome_and_nothing_is_dead_lettered():
    tenant = new_tenant("it-asm")
    headers = bearer("it-asm-pacs", tenant, "uploader")
    study, series = generate_uid(), generate_uid()
    releasable = [mr_instance(study_uid=study, series_uid=series)[0] for _ in range(2)]
    _, burned = mr_instance(study_uid=study, series_uid=series)
    burned.BurnedInAnnotation = "YES"
    out = io.BytesIO()
    burned.save_as(out, enforce_file_format=True)
    files = [
        ("file", (f"{i}.dcm", data, "application/dicom"))
        for i, data in enumerate([*releasable, out.getvalue()])
    ]

    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.post(f"{GATEWAY}/api/v1/imaging/upload", files=files, headers=headers)
    assert answer.status_code == 200, answer.text
    ids = [a["imaging_id"] for a in answer.json()["accepted"]]
    assert len(ids) == 3

    (quarantined,) = await wait_for_events(
        topics.INSTANCE_QUARANTINED, lambda e: e.data.get("instance_upload_id") == ids[2], timeout=120
    )
    assert quarantined.data["reason_code"] == "burned_in_risk"
    (failed,) = await wait_for_events(topics.ANALYSIS_FAILED, lambda e: e.tenant == tenant, timeout=180)
    outcome = failed.payload(AnalysisFailed)
    assert sorted(outcome.instance_upload_ids) == sorted(ids[:2])
    assert "has 2 de-identified instance(s)" in outcome.reason
    assert (
        await read_all(topics.dlq(topics.INSTANCE_QUARANTINED), lambda e: e.tenant == tenant, settle=1.0)
        == []
    )

    # The uploader, who may not read results, learns from the status that the analysis failed and
    # why (its read model consumes the event a moment later); the quarantined instance says its own.
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(60):
            views = [(await client.get(f"{GATEWAY}/api/v1/imaging/{i}", headers=headers)).json() for i in ids]
            if all(view.get("analysis_status") for view in views[:2]):
                break
            await asyncio.sleep(0.5)
    for view in views[:2]:
        assert (view["status"], view["analysis_id"]) == ("deidentified", outcome.analysis_id), view
        assert (view["analysis_status"], view["analysis_reason_code"]) == ("failed", outcome.reason_code), (
            view
        )
    assert (views[2]["status"], views[2]["reason_code"], views[2]["analysis_status"]) == (
        "quarantined",
        "burned_in_risk",
        None,
    )


async def test_an_instance_uploaded_twice_counts_once_toward_the_minimum():
    """Before: the same instance uploaded twice (the second answered ``duplicate``) was reported as
    "the series has 2 de-identified instance(s)", though the volume drops repeated SOP Instance UIDs."""
    tenant = new_tenant("it-asm")
    headers = bearer("it-asm-pacs", tenant, "uploader")
    data = mr_instance()[0]
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(2):  # two requests within the quiet period: one analysis sees both
            answer = await client.post(
                f"{GATEWAY}/api/v1/imaging/upload",
                files=[("file", ("a.dcm", data, "application/dicom"))],
                headers=headers,
            )
            assert answer.status_code == 200, answer.text
    (failed,) = await wait_for_events(
        topics.ANALYSIS_FAILED,
        lambda e: e.tenant == tenant and len(e.data.get("instance_upload_ids", [])) == 2,
        timeout=180,
    )
    assert "has 1 de-identified instance(s)" in failed.data["reason"]
    assert "instances uploaded more than once count once: 2 uploads" in failed.data["reason"]


async def test_a_series_that_stays_incomplete_is_reported_and_analysed_when_its_last_member_settles(mongo):
    """A member that never gets an outcome (here announced by an upload but lost before ingest; in
    production, e.g., dead-lettered by deid for a key problem) no longer leaves its series waiting
    in silence: after ``ENCLAVE_ANALYSIS_INCOMPLETE_AFTER_S`` (set to 20 s for this test) the series
    is reported ``series_incomplete``, naming what it awaits. When the member settles at last (here
    rejected, as ingest rejects an upload that broke off), the series is assembled again and gets a
    new outcome under a new event id, which the gateway's status shows."""
    with restarted_with("analysis", {"ENCLAVE_ANALYSIS_INCOMPLETE_AFTER_S": "20"}):
        tenant = new_tenant("it-asm")
        async with httpx.AsyncClient(timeout=60) as client:
            ids = await _upload_series(client, tenant)
            (completed,) = await wait_for_events(topics.UPLOAD_COMPLETED, lambda e: e.tenant == tenant)

            # A second upload of the same series whose one instance never reaches ingest.
            lost, upload_id = new_event_id(), new_event_id()
            announced = UploadCompleted(
                upload_id=upload_id,
                instance_upload_ids=[lost],
                series_keys=completed.payload(UploadCompleted).series_keys,
                accepted=1,
                rejected=0,
            )
            envelope = Envelope.for_topic(
                topics.UPLOAD_COMPLETED,
                announced,
                source="gateway",
                tenant=tenant,
                actor="it-test",
                correlation_id=upload_id,
            )
            await publish(topics.UPLOAD_COMPLETED, [envelope], key=upload_id)

            (reported,) = await wait_for_events(
                topics.ANALYSIS_FAILED, lambda e: e.tenant == tenant, timeout=180
            )
            incomplete = reported.payload(AnalysisFailed)
            assert incomplete.reason_code == "series_incomplete"
            assert incomplete.reason.startswith(
                "1 of the 4 instances uploaded for this series have had no outcome"
            )
            assert reported.data["awaiting_instance_upload_ids"] == [lost]
            assert sorted(incomplete.instance_upload_ids) == ids

            # Later: once the series document is finished. (The event is published just before that
            # write; on FerretDB 1.x, which applies an update as a read and a write outside a
            # transaction, a member settling at the same moment could be overwritten by it. MongoDB
            # applies both atomically: the series would then stay collecting and be analysed again.)
            for _ in range(60):
                doc = await mongo["analysis"]["series"].find_one({"analysis_id": incomplete.analysis_id})
                if doc is not None and doc.get("reason_code") == "series_incomplete":
                    break
                await asyncio.sleep(0.5)
            rejected = Envelope.for_topic(
                topics.INSTANCE_REJECTED,
                InstanceRejected(
                    upload_id=upload_id,
                    instance_upload_id=lost,
                    reason_code="upload_incomplete",
                    reason="only 1 of 3 chunks of the instance arrived",
                ),
                source="ingest",
                tenant=tenant,
                actor="it-test",
                correlation_id=upload_id,
            )
            await publish(topics.INSTANCE_REJECTED, [rejected], key=lost)

            def later_outcome(e: Envelope) -> bool:
                return e.tenant == tenant and e.id != reported.id

            outcomes = await wait_for_events(
                (topics.ANALYSIS_COMPLETED, topics.ANALYSIS_FAILED), later_outcome, timeout=180
            )
            (after,) = outcomes
            assert after.data["analysis_id"] == incomplete.analysis_id  # the same members, a new outcome
            assert after.data.get("reason_code") != "series_incomplete"
            assert "awaiting_instance_upload_ids" not in after.data

            # The gateway's status follows the newest outcome (its read model consumes the events).
            clinician = bearer("it-asm-clinician", tenant, "clinician")
            for _ in range(60):
                status = await client.get(f"{GATEWAY}/api/v1/imaging/{ids[0]}/analysis", headers=clinician)
                assert status.status_code == 200, status.text
                if status.json().get("reason_code") == after.data.get("reason_code"):
                    break
                await asyncio.sleep(1)
            assert status.json()["analysis_id"] == incomplete.analysis_id, status.text
            assert status.json().get("reason_code") == after.data.get("reason_code"), status.text


async def _upload_series(client: httpx.AsyncClient, tenant: str) -> list[str]:
    """Three copies of one MR slice as one series, in one form upload: one slice position, so its
    analysis fails deterministically (``series_geometry``). Their imaging ids, sorted."""
    study, series = generate_uid(), generate_uid()
    files = [
        ("file", (f"{i}.dcm", mr_instance(study_uid=study, series_uid=series)[0], "application/dicom"))
        for i in range(3)
    ]
    headers = bearer("it-asm-pacs", tenant, "uploader")
    answer = await client.post(f"{GATEWAY}/api/v1/imaging/upload", files=files, headers=headers)
    assert answer.status_code == 200, answer.text
    return sorted(a["imaging_id"] for a in answer.json()["accepted"])


def _rerun_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return admin_command("enclave-analysis-rerun", *args)


async def test_an_operator_reruns_failed_series_and_each_gets_a_new_outcome():
    """`enclave-analysis-rerun` (e.g. after a fix for ``analysis_internal_error``) makes the running
    service analyse the matching failed series again; each publishes a new outcome event. A dry run
    and another tenant's filter change nothing. (Before the tenth session a failed series was only
    analysed again when a new instance was uploaded to it.)"""
    tenant = new_tenant("it-rerun")
    async with httpx.AsyncClient(timeout=60) as client:
        await _upload_series(client, tenant)
    (first,) = await wait_for_events(topics.ANALYSIS_FAILED, lambda e: e.tenant == tenant, timeout=180)
    code = first.data["reason_code"]

    dry = _rerun_cli("--reason-code", code, "--tenant", tenant, "--actor", "user:it-sre", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["series"] == 1
    reason = ("--reason", "the analysis bug of incident 7 is fixed")
    other_tenant = new_tenant("it-rerun")
    other = _rerun_cli("--reason-code", code, "--tenant", other_tenant, "--actor", "user:it-sre", *reason)
    assert json.loads(other.stdout)["series"] == 0
    unexplained = _rerun_cli("--reason-code", code, "--tenant", tenant, "--actor", "user:it-sre")
    assert unexplained.returncode == 2 and "--reason must be 10 to 500 characters" in unexplained.stderr
    assert await read_all(topics.ANALYSIS_FAILED, lambda e: e.tenant == tenant, settle=1.0) == [first]

    done = _rerun_cli("--reason-code", code, "--tenant", tenant, "--actor", "user:it-sre", *reason)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["series"] == 1 and result["series_ids"] == [f"{tenant}:{first.data['series_key']}"]
    # audited, each re-run acknowledged before it marked anything; the dry run and the refused
    # attempt recorded nothing
    recorded = await read_all(
        topics.ACCESS_RECORDED,
        lambda e: e.tenant in (tenant, other_tenant) and e.source == "enclave-analysis-rerun",
    )
    runs = {t: [r.data["detail"] for r in recorded if r.tenant == t] for t in (other_tenant, tenant)}
    said = "reason: the analysis bug of incident 7 is fixed"
    assert runs == {
        other_tenant: [f"{said}; started", f"{said}; re-opened 0 series"],
        tenant: [f"{said}; started", f"{said}; re-opened 1 series"],
    }  # one partition per run (keyed by its correlation id): in order within it
    assert {(r.actor, r.data["action"], r.data["target"]) for r in recorded} == {
        ("user:it-sre", "analysis_rerun", f"reason_code:{code}/status:failed")
    }
    (again,) = await wait_for_events(
        topics.ANALYSIS_FAILED, lambda e: e.tenant == tenant and e.id != first.id, timeout=180
    )
    assert again.data["reason_code"] == code and again.data["analysis_id"] == first.data["analysis_id"]
    assert "series re-run requested" in done.stderr and tenant in done.stderr


@pytest.fixture
async def assembly(mongo) -> AsyncIterator[SeriesAssembly]:
    """The analysis service's series bookkeeping on a scratch database of the real FerretDB."""
    db = mongo[f"it_assembly_{uuid.uuid4().hex[:10]}"]
    try:
        yield SeriesAssembly(db)
    finally:
        await mongo.drop_database(db.name)


async def test_attempts_are_counted_per_claim_on_the_real_database_and_reset_by_a_change(assembly):
    """What the assembler's bounded retries rest on, on FerretDB: every claim counts an attempt, a
    retry that a dependency outage caused gives it back and waits, and a new member starts the
    count again."""
    await assembly.expect("t", ["sk"], ["iu-1"], "up-1")
    await assembly.settle("t", "sk", "iu-1", "up-1", "deidentified", {}, "up-1")
    [ready] = await assembly.ready(quiet_period_s=0, incomplete_after_s=3600)
    claimed = await assembly.claim(ready, lease_s=900)
    assert claimed is not None and claimed["attempts"] == 1
    assert await assembly.ready(quiet_period_s=0, incomplete_after_s=3600) == []  # leased

    await assembly.retry_later(claimed, delay_s=0, counted=True)
    [again] = await assembly.ready(quiet_period_s=0, incomplete_after_s=3600)
    claimed = await assembly.claim(again, lease_s=900)
    assert claimed is not None and claimed["attempts"] == 2

    await assembly.retry_later(claimed, delay_s=3600, counted=False)
    assert await assembly.ready(quiet_period_s=0, incomplete_after_s=3600) == []  # waits for the delay
    assert (await assembly.series.find_one({"_id": claimed["_id"]}))["attempts"] == 1

    await assembly.expect("t", ["sk"], ["iu-2"], "up-2")  # a new member: a new analysis
    assert (await assembly.series.find_one({"_id": claimed["_id"]}))["attempts"] == 0


async def test_a_stopped_analysis_releases_only_its_own_unrecorded_claim_on_the_real_database(assembly):
    """What a replica stopped mid-analysis does, on FerretDB: its release makes the series claimable
    at once without counting the attempt; a release by a replica whose lease ran out leaves the
    claim another replica took; a claim whose outcome is recorded is not released."""
    await assembly.expect("t", ["sk"], ["iu-1"], "up-1")
    await assembly.settle("t", "sk", "iu-1", "up-1", "deidentified", {}, "up-1")
    [ready] = await assembly.ready(quiet_period_s=0, incomplete_after_s=3600)
    stalled = await assembly.claim(ready, lease_s=0)  # its lease runs out at once
    [expired] = await assembly.ready(quiet_period_s=0, incomplete_after_s=3600)
    current = await assembly.claim(expired, lease_s=900)
    assert stalled is not None and current is not None and current["attempts"] == 2

    assert await assembly.release(stalled) is False
    stored = await assembly.series.find_one({"_id": current["_id"]})
    assert (stored["claim_id"], stored["attempts"]) == (current["claim_id"], 2)
    assert await assembly.ready(quiet_period_s=0, incomplete_after_s=3600) == []  # still leased

    assert await assembly.release(current) is True
    [released] = await assembly.ready(quiet_period_s=0, incomplete_after_s=3600)
    taken = await assembly.claim(released, lease_s=900)
    assert taken is not None and taken["attempts"] == 2

    assert await assembly.decide(taken, _outcome("ev-r", "completed")) == _outcome("ev-r", "completed")
    assert await assembly.release(taken) is False
    assert await assembly.ready(quiet_period_s=0, incomplete_after_s=3600) == []


def _outcome(event_id: str, outcome: str) -> dict[str, Any]:
    return {
        "analysis_id": "an-1",
        "event_id": event_id,
        "topic": f"analysis.{outcome}",
        "outcome": outcome,
        "reason_code": None,
        "envelope": json.dumps({"id": event_id}),
    }


async def test_a_claim_records_one_outcome_on_the_real_database_and_a_change_drops_it(assembly):
    """The outbox the analysis outcome rests on, on FerretDB: the first outcome recorded for a claim
    is the one every replica publishes (a second replica whose lease overlapped gets it back, not its
    own); a change drops it, and a run of the old claim then publishes nothing."""
    await assembly.expect("t", ["sk"], ["iu-1"], "up-1")
    await assembly.settle("t", "sk", "iu-1", "up-1", "deidentified", {}, "up-1")
    [ready] = await assembly.ready(quiet_period_s=0, incomplete_after_s=3600)
    first = await assembly.claim(ready, lease_s=0)  # its lease runs out at once
    assert first is not None
    [expired] = await assembly.ready(quiet_period_s=0, incomplete_after_s=3600)
    second = await assembly.claim(expired, lease_s=900)
    assert second is not None and second["attempts"] == 2

    assert await assembly.decide(second, _outcome("ev-b", "completed")) == _outcome("ev-b", "completed")
    assert await assembly.decide(first, _outcome("ev-a", "failed")) == _outcome("ev-b", "completed")
    stored = await assembly.series.find_one({"_id": second["_id"]})
    assert stored["pending_event"] == _outcome("ev-b", "completed")

    # An outcome recorded for another member set (a member settled, and the process died before the
    # series was marked changed) is replaced by the outcome of the members the series has now.
    other = {**_outcome("ev-d", "completed"), "analysis_id": "an-2"}
    assert await assembly.decide(second, other) == other

    await assembly.expect("t", ["sk"], ["iu-2"], "up-2")  # the series changed
    assert "pending_event" not in await assembly.series.find_one({"_id": second["_id"]})
    assert await assembly.decide(second, _outcome("ev-c", "completed")) is None
    assert "pending_event" not in await assembly.series.find_one({"_id": second["_id"]})


async def test_a_rejected_member_settles_the_series_of_its_upload_on_the_real_database(assembly):
    """A rejected instance has no series key: it settles in every series its upload touched, so the
    series document alone says the series is complete."""
    await assembly.expect("t", ["sk"], ["iu-1", "iu-2"], "up-1")
    await assembly.settle("t", "sk", "iu-1", "up-1", "deidentified", {}, "up-1")
    await assembly.settle("t", None, "iu-2", "up-1", "excluded", {"reason_code": "integrity"}, "up-1")
    series = await assembly.series.find_one({"_id": assembly.series_id("t", "sk")})
    assert sorted(series["settled"]) == ["iu-1", "iu-2"]
    assert SeriesAssembly.complete(series)


async def test_an_incomplete_series_becomes_ready_only_when_overdue_on_the_real_database(assembly):
    """An incomplete series is handed to the analysis (to be reported ``series_incomplete``) only once
    it has been unchanged for ``incomplete_after_s``; a change gives its next outcome a new event id."""
    await assembly.expect("t", ["sk"], ["iu-1", "iu-lost"], "up-1")
    await assembly.settle("t", "sk", "iu-1", "up-1", "deidentified", {}, "up-1")
    assert await assembly.ready(quiet_period_s=0, incomplete_after_s=3600) == []
    [overdue] = await assembly.ready(quiet_period_s=0, incomplete_after_s=0)
    assert SeriesAssembly.missing(overdue) == ["iu-lost"]

    claimed = await assembly.claim(overdue, lease_s=900)
    await assembly.series.update_one(
        {"_id": overdue["_id"]}, {"$set": {"pending_event": {"analysis_id": "an-x", "event_id": "ev-x"}}}
    )
    await assembly.finish(claimed, "an-x", "failed")  # reported series_incomplete
    assert await assembly.ready(quiet_period_s=0, incomplete_after_s=0) == []

    # The missing member is rejected at last (no series key: it settles through its upload).
    await assembly.settle(
        "t", None, "iu-lost", "up-1", "excluded", {"reason_code": "upload_incomplete"}, "up-1"
    )
    [reopened] = await assembly.ready(quiet_period_s=0, incomplete_after_s=3600)
    assert reopened["status"] == "collecting" and SeriesAssembly.complete(reopened)
    assert "pending_event" not in reopened and reopened["attempts"] == 0

    # A redelivery of the same outcome changes nothing.
    claimed = await assembly.claim(reopened, lease_s=900)
    await assembly.finish(claimed, "an-y", "completed")
    await assembly.settle(
        "t", None, "iu-lost", "up-1", "excluded", {"reason_code": "upload_incomplete"}, "up-1"
    )
    assert (await assembly.series.find_one({"_id": overdue["_id"]}))["status"] == "completed"


async def test_reopen_takes_only_the_finished_series_that_match_on_the_real_database(assembly):
    """The bookkeeping behind `enclave-analysis-rerun`: finished series are chosen by status, reason
    code, tenant and series key; a dry run changes nothing; a re-opened series is assembled again with
    its attempts counted from zero and its upload's correlation id."""
    outcomes = {
        "sk-bug": ("failed", "analysis_internal_error"),
        "sk-geo": ("failed", "series_geometry"),
        "sk-ok": ("completed", None),
    }
    for key in outcomes:
        await assembly.expect("t", [key], [f"iu-{key}"], f"up-{key}")
        await assembly.settle("t", key, f"iu-{key}", f"up-{key}", "deidentified", {}, f"up-{key}")
    for ready in await assembly.ready(quiet_period_s=0, incomplete_after_s=3600):
        claimed = await assembly.claim(ready, lease_s=900)
        await assembly.finish(claimed, "an-1", *outcomes[ready["series_key"]])
    assert await assembly.ready(quiet_period_s=0, incomplete_after_s=3600) == []

    dry = await assembly.reopen(status="failed", reason_code="analysis_internal_error", dry_run=True)
    assert dry == ["t:sk-bug"]
    assert await assembly.ready(quiet_period_s=0, incomplete_after_s=3600) == []
    assert await assembly.reopen(status="failed", reason_code="analysis_internal_error", tenant="other") == []

    assert await assembly.reopen(status="failed", reason_code="analysis_internal_error") == ["t:sk-bug"]
    [ready] = await assembly.ready(quiet_period_s=0, incomplete_after_s=3600)
    assert ready["_id"] == "t:sk-bug" and ready["attempts"] == 0 and ready["correlation_id"] == "up-sk-bug"
    assert await assembly.reopen(status="completed", series_key="sk-ok") == ["t:sk-ok"]

    # A series that failed before reason codes were recorded has none: "unrecorded" finds it.
    await assembly.series.insert_one(
        {"_id": "t:sk-old", "tenant": "t", "series_key": "sk-old", "status": "failed"}
    )
    assert await assembly.reopen(status="failed", reason_code="unrecorded") == ["t:sk-old"]
