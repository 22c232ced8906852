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

import io
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from enclave_analysis.assembly import SeriesAssembly
from enclave_common import topics
from enclave_common.events import AnalysisFailed
from pydicom.uid import generate_uid

from .support import mr_instance, read_all, wait_for_events
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
    [ready] = await assembly.ready(quiet_period_s=0)
    claimed = await assembly.claim(ready, lease_s=900)
    assert claimed is not None and claimed["attempts"] == 1
    assert await assembly.ready(quiet_period_s=0) == []  # leased

    await assembly.retry_later(claimed, delay_s=0, counted=True)
    [again] = await assembly.ready(quiet_period_s=0)
    claimed = await assembly.claim(again, lease_s=900)
    assert claimed is not None and claimed["attempts"] == 2

    await assembly.retry_later(claimed, delay_s=3600, counted=False)
    assert await assembly.ready(quiet_period_s=0) == []  # waits for the delay
    assert (await assembly.series.find_one({"_id": claimed["_id"]}))["attempts"] == 1

    await assembly.expect("t", ["sk"], ["iu-2"], "up-2")  # a new member: a new analysis
    assert (await assembly.series.find_one({"_id": claimed["_id"]}))["attempts"] == 0


async def test_a_rejected_member_settles_the_series_of_its_upload_on_the_real_database(assembly):
    """A rejected instance has no series key: it settles in every series its upload touched, so the
    series document alone says the series is complete."""
    await assembly.expect("t", ["sk"], ["iu-1", "iu-2"], "up-1")
    await assembly.settle("t", "sk", "iu-1", "up-1", "deidentified", {}, "up-1")
    await assembly.settle("t", None, "iu-2", "up-1", "excluded", {"reason_code": "integrity"}, "up-1")
    series = await assembly.series.find_one({"_id": assembly.series_id("t", "sk")})
    assert sorted(series["settled"]) == ["iu-1", "iu-2"]
    assert SeriesAssembly.complete(series)
