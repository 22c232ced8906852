"""A replica stopped in order (SIGTERM: a rolling update, a scale-down) while it analyses a claimed
series releases the claim at once, its attempt not counted, so another replica takes the series now.
Before, the claim kept its 15-minute lease and the attempt counted: each rolling update delayed the
series and took one of its attempts, and enough of them failed a good series
(``analysis_internal_error``). A claim whose outcome was recorded stays as it is (that outcome is
the one published), and a replica whose lease ran out cannot release the claim another replica took.

The series bookkeeping is the real ``SeriesAssembly`` on an in-memory collection that applies the
few MongoDB operators it uses (the same on the real FerretDB: ``tests/integration``)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from enclave_analysis.assembly import SeriesAssembly
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.handlers import AnalysisService
from enclave_common import topics
from enclave_common.envelope import Envelope
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

SERIES_ID = "t:sk"


def _field(doc: dict[str, Any], path: str) -> tuple[bool, Any]:
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _matches(doc: dict[str, Any], query: dict[str, Any]) -> bool:
    for key, condition in query.items():
        if key == "$or":
            if not any(_matches(doc, alternative) for alternative in condition):
                return False
            continue
        found, value = _field(doc, key)
        if isinstance(condition, dict) and all(op.startswith("$") for op in condition):
            for op, arg in condition.items():
                ok = {
                    "$exists": lambda arg=arg: found == arg,
                    "$ne": lambda arg=arg: not (found and value == arg),
                    "$lte": lambda arg=arg: found and value <= arg,
                }[op]()
                if not ok:
                    return False
        elif not (found and value == condition):
            return False
    return True


class Collection:
    """The MongoDB collection operations ``SeriesAssembly`` uses here, in memory."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}

    def find(self, query: dict[str, Any], projection: Any = None) -> AsyncIterator[dict[str, Any]]:
        async def matching() -> AsyncIterator[dict[str, Any]]:
            for doc in [d for d in self.docs.values() if _matches(d, query)]:
                yield copy.deepcopy(doc)

        return matching()

    async def find_one(self, query: dict[str, Any], projection: Any = None) -> dict[str, Any] | None:
        return next((copy.deepcopy(d) for d in self.docs.values() if _matches(d, query)), None)

    async def update_one(self, query: dict[str, Any], update: dict[str, Any]) -> SimpleNamespace:
        doc = next((d for d in self.docs.values() if _matches(d, query)), None)
        if doc is None:
            return SimpleNamespace(matched_count=0, modified_count=0)
        before = copy.deepcopy(doc)
        doc.update(update.get("$set", {}))
        for key, by in update.get("$inc", {}).items():
            doc[key] = doc.get(key, 0) + by
        for key in update.get("$unset", {}):
            doc.pop(key, None)
        return SimpleNamespace(matched_count=1, modified_count=int(doc != before))

    async def find_one_and_update(
        self, query: dict[str, Any], update: dict[str, Any], return_document: Any = None
    ) -> dict[str, Any] | None:
        done = await self.update_one(query, update)
        return await self.find_one({"_id": query["_id"]}) if done.matched_count else None


class Publisher:
    """Publishes, or (``blocked``) waits for good, as a publish under way when the service stops."""

    def __init__(self, *, blocked: bool = False) -> None:
        self.blocked = blocked
        self.started = asyncio.Event()
        self.published: list[tuple[str, Envelope]] = []

    async def publish(self, topic: str, envelope: Envelope, *, key: str) -> None:
        self.started.set()
        if self.blocked:
            await asyncio.Event().wait()
        self.published.append((topic, envelope))


@pytest.fixture
def db() -> dict[str, Collection]:
    """One analysis database, shared by the replicas of a test."""
    members = [
        {"_id": f"iu-{n}", "series_id": SERIES_ID, "state": "deidentified", "study_key": "st-1", "object": {}}
        for n in range(3)
    ]
    collections = {"members": Collection(), "series": Collection(), "uploads": Collection()}
    collections["members"].docs = {m["_id"]: m for m in members}
    collections["series"].docs[SERIES_ID] = {
        "_id": SERIES_ID,
        "tenant": "t",
        "series_key": "sk",
        "status": "collecting",
        "changed_at": datetime.now(UTC) - timedelta(hours=1),
        "correlation_id": "c",
        "attempts": 0,
        "expected": [m["_id"] for m in members],
        "settled": [m["_id"] for m in members],
    }
    return collections


def replica(db: dict[str, Collection], publisher: Publisher | None = None) -> AnalysisService:
    runtime = SimpleNamespace(
        publisher=publisher or Publisher(), registry=CollectorRegistry(), count_crypto=lambda _: None
    )
    return AnalysisService(
        runtime,  # type: ignore[arg-type]
        AnalysisSettings(lease_s=900),
        SeriesAssembly(db),
        store=None,  # type: ignore[arg-type]
        analyser=None,  # type: ignore[arg-type]
    )


async def claim(service: AnalysisService, lease_s: float = 900) -> dict[str, Any] | None:
    """What the assembler does: the series ready for analysis, claimed."""
    ready = await service.assembly.ready(quiet_period_s=0, incomplete_after_s=86400)
    if not ready:
        return None
    return await service.assembly.claim(ready[0], lease_s)


async def stop_while(service: AnalysisService, claimed: dict[str, Any], started: asyncio.Event) -> None:
    """Run the analysis of ``claimed`` until ``started``, then stop it as the service's shutdown
    does (the assembler task is cancelled)."""
    running = asyncio.create_task(service.attempt(claimed))
    await asyncio.wait_for(started.wait(), 10)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_a_stopped_analysis_releases_its_claim_uncounted_and_another_replica_claims_it_at_once(
    db,
) -> None:
    stopping = replica(db)
    claimed = await claim(stopping)
    assert claimed is not None and claimed["attempts"] == 1
    loading = asyncio.Event()

    in_progress: list[float | None] = []

    async def load(tenant: str, member: dict[str, Any], *_: Any) -> Any:  # mid-analysis: reading the series
        in_progress.append(stopping.runtime.registry.get_sample_value("enclave_analysis_series_in_progress"))
        loading.set()
        await asyncio.Event().wait()

    stopping._load = load  # type: ignore[method-assign]
    with capture_logs() as logs:
        await stop_while(stopping, claimed, loading)
    # What the autoscaling counts (deploy/k8s): 1 while the replica analyses, 0 once it stopped.
    assert in_progress == [1.0]
    assert stopping.runtime.registry.get_sample_value("enclave_analysis_series_in_progress") == 0

    stored = db["series"].docs[SERIES_ID]
    assert stored["status"] == "analysing" and stored["attempts"] == 0
    assert stored["lease_until"] <= datetime.now(UTC)
    [entry] = [e for e in logs if e.get("released") is not None]
    assert entry["event"] == "analysis stopped; claim released, attempt not counted"
    assert (entry["series_id"], entry["released"]) == (SERIES_ID, True)

    taken = await claim(replica(db))
    assert taken is not None and taken["attempts"] == 1 and taken["claim_id"] != claimed["claim_id"]


def _one_slice(service: AnalysisService) -> None:
    """Every member loads as the same one slice: the analysis fails at once (too few instances),
    without ANTs."""

    async def load(tenant: str, member: dict[str, Any], *_: Any) -> Any:
        dataset = pydicom.Dataset()
        dataset.SOPInstanceUID = "1.2.3"
        return dataset

    service._load = load  # type: ignore[method-assign]


async def test_stopped_after_its_outcome_was_recorded_a_replica_publishes_it_before_it_stops(db) -> None:
    """Stopped between recording its outcome and publishing it: the stopping replica publishes the
    recorded outcome itself and finishes the series. Before, the claim was kept and the outcome
    waited for the 15-minute lease and the next claim."""
    publisher = Publisher()
    stopping = replica(db, publisher)
    claimed = await claim(stopping)
    assert claimed is not None
    _one_slice(stopping)
    recorded = asyncio.Event()

    async def members_changed(series: dict[str, Any], analysed: list[str]) -> bool:  # after decide()
        recorded.set()
        await asyncio.Event().wait()
        return False

    stopping._members_changed = members_changed  # type: ignore[method-assign]
    with capture_logs() as logs:
        await stop_while(stopping, claimed, recorded)

    stored = db["series"].docs[SERIES_ID]
    [(topic, envelope)] = publisher.published
    assert topic == topics.ANALYSIS_FAILED
    assert envelope == Envelope.model_validate_json(stored["pending_event"]["envelope"])
    assert stored["status"] == "failed" and stored["attempts"] == 1
    [entry] = [e for e in logs if e.get("released") is not None]
    assert entry["event"] == "analysis stopped after its outcome was recorded; outcome published"
    assert await claim(replica(db)) is None  # finished: nothing left to claim


async def test_a_recorded_outcome_the_stop_cannot_publish_is_published_by_the_next_claim(
    db, monkeypatch
) -> None:
    """Stopped while it publishes, and the publish does not finish within the stop's bound: the
    recorded outcome is published by the next claim, after the lease, as when the process dies."""
    monkeypatch.setattr("enclave_analysis.handlers.RELEASE_TIMEOUT_S", 0.2)
    publishing = Publisher(blocked=True)
    stopping = replica(db, publishing)
    claimed = await claim(stopping)
    assert claimed is not None
    _one_slice(stopping)
    with capture_logs() as logs:
        await stop_while(stopping, claimed, publishing.started)

    stored = db["series"].docs[SERIES_ID]
    assert stored["attempts"] == 1 and stored["lease_until"] == claimed["lease_until"]
    recorded = Envelope.model_validate_json(stored["pending_event"]["envelope"])
    assert await claim(replica(db)) is None  # leased
    assert [e["event"] for e in logs if e.get("series_id") == SERIES_ID] == [
        "analysis stopped; its claim could not be released and is taken over after its lease"
    ]

    db["series"].docs[SERIES_ID]["lease_until"] = datetime.now(UTC)  # the lease ran out
    publisher = Publisher()
    next_replica = replica(db, publisher)
    taken = await claim(next_replica)
    assert taken is not None
    await next_replica.attempt(taken)
    [(topic, envelope)] = publisher.published
    assert (topic, envelope) == (topics.ANALYSIS_FAILED, recorded)


async def test_a_stale_release_does_not_clear_the_claim_another_replica_took_over(db) -> None:
    """The first replica's lease ran out (it was stalled) and a second one claimed the series; the
    first one stops and releases what it believes is its claim: the second one's stays."""
    first = await claim(replica(db), lease_s=0)
    assert first is not None
    second = await claim(replica(db))
    assert second is not None and second["attempts"] == 2

    assembly = SeriesAssembly(db)
    assert await assembly.release(first) is False
    stored = db["series"].docs[SERIES_ID]
    assert (stored["claim_id"], stored["attempts"], stored["lease_until"]) == (
        second["claim_id"],
        2,
        second["lease_until"],
    )
    assert await assembly.release(second) is True
    assert db["series"].docs[SERIES_ID]["attempts"] == 1


async def test_a_stale_retry_does_not_shorten_the_lease_of_the_replica_that_took_over(db) -> None:
    """As a stale release: the first replica's analysis fails after a second one claimed the series;
    its retry must not move the second one's lease nor give back its attempt."""
    first = await claim(replica(db), lease_s=0)
    second = await claim(replica(db))
    assert first is not None and second is not None

    await SeriesAssembly(db).retry_later(first, 0, counted=False)
    stored = db["series"].docs[SERIES_ID]
    assert (stored["attempts"], stored["lease_until"]) == (2, second["lease_until"])
