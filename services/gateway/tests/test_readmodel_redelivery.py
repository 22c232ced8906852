"""The read model's writes are idempotent and commutative, so it runs without the event-id guard: a
redelivered event changes nothing, events in any order end in the same document, and each event is
one database command (docs/gateway.md, Status and results)."""

from __future__ import annotations

import base64
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from enclave_common import topics
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.events import (
    AnalysisCompleted,
    AnalysisFailed,
    InstanceDeidentified,
    InstanceRejected,
    InstanceStored,
    ObjectRef,
)
from enclave_common.idempotency import IdempotentByBusinessKey
from enclave_gateway.config import GatewaySettings
from enclave_gateway.main import create_app
from enclave_gateway.readmodel import LatestAnalysis, ReadModel, analysis_id_of, latest_analysis_of, status_of
from pydantic import BaseModel, SecretStr
from pymongo.errors import DuplicateKeyError

TENANT = "tenant-a"
KEY = "k" * 43


class FakeCollection:
    """By ``_id`` only, like every read-model write: update_one ($set, $max, upsert), replace_one
    (upsert). Counts the commands it was sent."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.commands: list[str] = []

    async def update_one(self, filter: dict[str, Any], update: dict[str, Any], upsert: bool = False) -> None:
        self.commands.append("update")
        doc = self.docs.get(filter["_id"])
        if doc is None:
            if not upsert:
                return
            doc = self.docs[filter["_id"]] = {"_id": filter["_id"]}
        doc.update(copy.deepcopy(update.get("$set", {})))
        for field, value in update.get("$max", {}).items():
            if field not in doc or value > doc[field]:
                doc[field] = value

    async def replace_one(self, filter: dict[str, Any], doc: dict[str, Any], upsert: bool = False) -> None:
        """By ``_id``, and ``recorded_at`` ``$lte`` when given; an unmatched upsert of an existing
        ``_id`` is a duplicate key, as in MongoDB and FerretDB."""
        self.commands.append("replace")
        existing = self.docs.get(filter["_id"])
        bound = filter.get("recorded_at", {}).get("$lte")
        if existing is not None and bound is not None and not existing["recorded_at"] <= bound:
            raise DuplicateKeyError("E11000 duplicate key error")
        self.docs[filter["_id"]] = copy.deepcopy(doc)


def read_model() -> tuple[ReadModel, dict[str, FakeCollection]]:
    db = {"instances": FakeCollection(), "analyses": FakeCollection()}
    return ReadModel(db), db


def event(topic: str, payload: BaseModel, *, at: datetime | None = None) -> Envelope:
    envelope = Envelope.for_topic(
        topic, payload, source="test", tenant=TENANT, actor="service:test", correlation_id=new_event_id()
    )
    if at is not None:
        envelope = envelope.model_copy(update={"time": at})
    return envelope


def stored(iuid: str, at: datetime | None = None) -> Envelope:
    return event(
        topics.INSTANCE_STORED,
        InstanceStored(
            upload_id=new_event_id(),
            instance_upload_id=iuid,
            patient_key=KEY,
            study_key=KEY,
            series_key=KEY,
            instance_key=KEY,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            object=ObjectRef(bucket="b", key="k"),
            sha256="0" * 64,
            size=1,
            kek_id="kek",
            duplicate="new",
        ),
        at=at,
    )


def deidentified(iuid: str, at: datetime | None = None) -> Envelope:
    return event(
        topics.INSTANCE_DEIDENTIFIED,
        InstanceDeidentified(
            upload_id=new_event_id(),
            instance_upload_id=iuid,
            patient_pseudonym=KEY,
            study_key=KEY,
            series_key=KEY,
            instance_key=KEY,
            deid_study_uid="2.25.1",
            deid_series_uid="2.25.2",
            deid_instance_uid="2.25.3",
            object=ObjectRef(bucket="b", key="k"),
            profile="basic",
            options=[],
        ),
        at=at,
    )


async def test_a_redelivered_event_changes_nothing_and_is_one_command() -> None:
    model, db = read_model()
    iuid = new_event_id()
    first = stored(iuid)
    await model.on_event(first)
    after_once = copy.deepcopy(db["instances"].docs)
    assert status_of(after_once[iuid]) == "stored"
    assert after_once[iuid]["updated_at"] == first.time  # the event's time, not the handling time
    await model.on_event(first)  # the same event, redelivered
    assert db["instances"].docs == after_once
    assert db["instances"].commands == ["update", "update"]


async def test_events_in_any_order_end_in_the_same_document() -> None:
    iuid = new_event_id()
    start = datetime.now(UTC)
    events = [stored(iuid, at=start), deidentified(iuid, at=start + timedelta(seconds=2))]
    in_order, _ = read_model()
    for e in events:
        await in_order.on_event(e)
    overtaken, db = read_model()
    for e in (events[1], events[0], events[1], events[0]):  # de-identified first, each twice
        await overtaken.on_event(e)
    assert db["instances"].docs == in_order.instances.docs
    doc = db["instances"].docs[iuid]
    assert status_of(doc) == "deidentified"
    assert doc["duplicate"] == "new" and doc["profile"] == "basic"  # the overtaken event's fields too
    assert doc["updated_at"] == events[1].time


async def test_failure_is_terminal_against_redelivered_progress() -> None:
    model, db = read_model()
    iuid = new_event_id()
    rejected = event(
        topics.INSTANCE_REJECTED,
        InstanceRejected(
            upload_id=new_event_id(), instance_upload_id=iuid, reason_code="bad", reason="unreadable"
        ),
    )
    await model.on_event(rejected)
    await model.on_event(stored(iuid))
    await model.on_event(rejected)
    doc = db["instances"].docs[iuid]
    assert (status_of(doc), doc["reason_code"]) == ("failed", "bad")


def analysis_event(outcome: str, analysis_id: str, members: list[str], at: datetime) -> Envelope:
    base: dict[str, Any] = {
        "analysis_id": analysis_id,
        "study_key": KEY,
        "series_key": KEY,
        "instance_upload_ids": members,
    }
    if outcome == "completed":
        done = AnalysisCompleted(
            **base, measures={"brain_volume_ml": 1200.5}, qc={"passed": True}, reports=[]
        )
        return event(topics.ANALYSIS_COMPLETED, done, at=at)
    failed = AnalysisFailed(**base, reason_code="too_few_slices", reason="the series has too few slices")
    return event(topics.ANALYSIS_FAILED, failed, at=at)


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_a_redelivered_analysis_event_writes_the_same_analysis(outcome: str) -> None:
    model, db = read_model()
    members = [new_event_id(), new_event_id()]
    for iuid in members:
        await model.on_event(deidentified(iuid))
    analysis_id = new_event_id()
    at = datetime.now(UTC) - timedelta(hours=1)
    done = analysis_event(outcome, analysis_id, members, at)
    await model.on_event(done)
    once = (copy.deepcopy(db["analyses"].docs), copy.deepcopy(db["instances"].docs))
    assert once[0][analysis_id]["recorded_at"] == at  # the event's time, not the handling time
    await model.on_event(done)
    assert (db["analyses"].docs, db["instances"].docs) == once
    for iuid in members:
        assert analysis_id_of(db["instances"].docs[iuid]) == analysis_id
        expected = "analysed" if outcome == "completed" else "deidentified"
        assert status_of(db["instances"].docs[iuid]) == expected
        # The outcome is kept with the id: the status route says a failed analysis failed, and why.
        reason = "too_few_slices" if outcome == "failed" else None
        assert latest_analysis_of(db["instances"].docs[iuid]) == LatestAnalysis(analysis_id, outcome, reason)


@pytest.mark.parametrize("earlier", ["completed", "failed"])
async def test_an_earlier_analysis_delivered_again_does_not_replace_a_later_one(earlier: str) -> None:
    """A series analysed twice (a late member makes a new member set): the instance keeps pointing
    at the later analysis, whatever is delivered again afterwards."""
    model, db = read_model()
    members = [new_event_id(), new_event_id(), new_event_id()]
    start = datetime.now(UTC)
    first = analysis_event(earlier, "an-first", members[:2], start)
    later = analysis_event("completed", "an-later", members, start + timedelta(minutes=1))
    # The analysis service publishes the earlier outcome again (a lease ran out): same event id,
    # a new envelope time, later than the later analysis's.
    republished = first.model_copy(update={"time": start + timedelta(hours=1)})
    for e in (first, later, first, republished):
        await model.on_event(e)
    for iuid in members:
        assert analysis_id_of(db["instances"].docs[iuid]) == "an-later"
        assert status_of(db["instances"].docs[iuid]) == "analysed"
        assert latest_analysis_of(db["instances"].docs[iuid]) == LatestAnalysis("an-later", "completed")


async def test_an_earlier_outcome_of_the_same_analysis_delivered_again_does_not_replace_the_later() -> None:
    """A series analysed again under its id (a rerun, or after ``enclave-deid-redo`` changed its
    copies): Kafka delivers the first outcome again after the second. The analysis keeps the second's
    measures; until a review of the eighteenth session the first's came back."""
    model, db = read_model()
    members = [new_event_id()]
    start = datetime.now(UTC)
    first = analysis_event("completed", "an-1", members, start)
    again = analysis_event("completed", "an-1", members, start + timedelta(minutes=5))
    again.data["measures"] = {"brain_volume_ml": 1187.25}
    for e in (first, again, first):
        await model.on_event(e)
    stored_analysis = db["analyses"].docs["an-1"]
    assert stored_analysis["measures"] == {"brain_volume_ml": 1187.25}
    assert stored_analysis["recorded_at"] == again.time
    await model.on_event(again)  # the later one delivered again writes the same
    assert db["analyses"].docs["an-1"]["measures"] == {"brain_volume_ml": 1187.25}


async def test_an_analysis_outcome_arriving_before_the_instance_events_is_kept() -> None:
    model, db = read_model()
    iuid = new_event_id()
    outcome = analysis_event("failed", "an-early", [iuid], datetime.now(UTC))
    for e in (outcome, stored(iuid), deidentified(iuid)):
        await model.on_event(e)
    doc = db["instances"].docs[iuid]
    assert (analysis_id_of(doc), status_of(doc), doc["tenant"]) == ("an-early", "deidentified", TENANT)


def test_documents_written_before_the_rank_was_the_source_of_truth_read_the_same() -> None:
    assert status_of({"rank": 9, "status": "quarantined"}) == "quarantined"
    assert status_of({"rank": 2, "status": "deidentified"}) == "deidentified"
    assert analysis_id_of({"analysis_id": "an-1"}) == "an-1"
    assert analysis_id_of({}) is None
    # Before the outcome was kept with the id (twelfth session): the id, no outcome.
    assert latest_analysis_of({"latest_analysis": "ev-1|an-1"}) == LatestAnalysis("an-1")


def test_the_gateway_consumer_runs_without_the_event_id_guard() -> None:
    app = create_app(GatewaySettings(pseudonym_key=SecretStr(base64.b64encode(bytes(32)).decode())))
    assert isinstance(app.state.runtime.processed, IdempotentByBusinessKey)


async def test_the_guard_never_reports_an_event_as_seen() -> None:
    guard = IdempotentByBusinessKey()
    await guard.mark("some-id", topics.INSTANCE_STORED)
    assert await guard.seen("some-id") is False
