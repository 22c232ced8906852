"""The read model is idempotent by business key, so it runs without the event-id guard: a redelivered
event, or an older one arriving after a newer one, changes nothing, and each event costs one read and
at most one write of the status (docs/gateway.md, Status and results)."""

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
from enclave_gateway.readmodel import ReadModel
from pydantic import BaseModel, SecretStr
from pymongo.errors import DuplicateKeyError

TENANT = "tenant-a"
KEY = "k" * 43


class FakeCollection:
    """By ``_id`` only, like every read-model command: find_one, update_one ($set, upsert),
    replace_one (upsert), insert_one. Counts the commands it was sent."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.commands: list[str] = []

    async def find_one(self, filter: dict[str, Any], projection: Any = None) -> dict[str, Any] | None:
        self.commands.append("find")
        doc = self.docs.get(filter["_id"])
        return copy.deepcopy(doc) if doc is not None else None

    async def update_one(self, filter: dict[str, Any], update: dict[str, Any], upsert: bool = False) -> None:
        self.commands.append("update")
        doc = self.docs.get(filter["_id"])
        if doc is None:
            if not upsert:
                return
            doc = self.docs[filter["_id"]] = {"_id": filter["_id"]}
        doc.update(copy.deepcopy(update["$set"]))

    async def replace_one(self, filter: dict[str, Any], doc: dict[str, Any], upsert: bool = False) -> None:
        self.commands.append("replace")
        self.docs[filter["_id"]] = copy.deepcopy(doc)

    async def insert_one(self, doc: dict[str, Any]) -> None:
        self.commands.append("insert")
        if doc["_id"] in self.docs:
            raise DuplicateKeyError("duplicate")
        self.docs[doc["_id"]] = copy.deepcopy(doc)


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


def stored(iuid: str) -> Envelope:
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
    )


def deidentified(iuid: str) -> Envelope:
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
    )


async def test_a_redelivered_event_changes_nothing_and_costs_one_read() -> None:
    model, db = read_model()
    iuid = new_event_id()
    first = stored(iuid)
    await model.on_event(first)
    after_once = copy.deepcopy(db["instances"].docs)
    assert after_once[iuid]["status"] == "stored"
    assert db["instances"].commands == ["find", "update"]

    db["instances"].commands.clear()
    await model.on_event(first)  # the same event, redelivered
    assert db["instances"].docs == after_once
    assert db["instances"].commands == ["find"]


async def test_an_older_event_after_a_newer_one_does_not_move_the_status_back() -> None:
    model, db = read_model()
    iuid = new_event_id()
    early = stored(iuid)
    await model.on_event(deidentified(iuid))  # overtook the stored event
    await model.on_event(early)
    await model.on_event(early)
    doc = db["instances"].docs[iuid]
    assert (doc["status"], doc["rank"]) == ("deidentified", 2)
    assert "duplicate" not in doc  # the older event wrote nothing


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
    assert (doc["status"], doc["reason_code"]) == ("failed", "bad")


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_a_redelivered_analysis_event_writes_the_same_analysis(outcome: str) -> None:
    model, db = read_model()
    members = [new_event_id(), new_event_id()]
    for iuid in members:
        await model.on_event(deidentified(iuid))
    analysis_id = new_event_id()
    at = datetime.now(UTC) - timedelta(hours=1)
    if outcome == "completed":
        payload: BaseModel = AnalysisCompleted(
            analysis_id=analysis_id,
            study_key=KEY,
            series_key=KEY,
            instance_upload_ids=members,
            measures={"brain_volume_ml": 1200.5},
            qc={"passed": True},
            reports=[],
        )
        topic = topics.ANALYSIS_COMPLETED
    else:
        payload = AnalysisFailed(
            analysis_id=analysis_id,
            study_key=KEY,
            series_key=KEY,
            instance_upload_ids=members,
            reason_code="too_few_slices",
            reason="the series has too few slices",
        )
        topic = topics.ANALYSIS_FAILED
    done = event(topic, payload, at=at)
    await model.on_event(done)
    once = (copy.deepcopy(db["analyses"].docs), copy.deepcopy(db["instances"].docs))
    assert once[0][analysis_id]["recorded_at"] == at  # the event's time, not the handling time
    await model.on_event(done)
    assert (db["analyses"].docs, db["instances"].docs) == once
    for iuid in members:
        assert db["instances"].docs[iuid]["analysis_id"] == analysis_id
        expected = "analysed" if outcome == "completed" else "deidentified"
        assert db["instances"].docs[iuid]["status"] == expected


def test_the_gateway_consumer_runs_without_the_event_id_guard() -> None:
    app = create_app(GatewaySettings(pseudonym_key=SecretStr(base64.b64encode(bytes(32)).decode())))
    assert isinstance(app.state.runtime.processed, IdempotentByBusinessKey)


async def test_the_guard_never_reports_an_event_as_seen() -> None:
    guard = IdempotentByBusinessKey()
    await guard.mark("some-id", topics.INSTANCE_STORED)
    assert await guard.seen("some-id") is False
