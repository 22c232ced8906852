"""One slice per de-identified instance, read from the copy of its most recent outcome.

``enclave-deid-redo`` replaces a released copy under a new object key, deletes every version of the
old key, and re-publishes ``instance.deidentified`` for the uploads its record knows of; records made
before the eighteenth session did not know of duplicate uploads, so their members keep naming the
deleted copy. Until then analysis read every member, duplicates included: the series re-analysed
after a redo failed reading the deleted copy on every attempt and ended ``analysis_internal_error``.
(Duplicates were never counted twice: the volume drops repeated SOP Instance UIDs, and the minimum
counts distinct ones; they were read twice, though.)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pydicom
from enclave_analysis.assembly import instance_copies
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.handlers import AnalysisService
from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_common.errors import PermanentError
from prometheus_client import CollectorRegistry

OLD = datetime(2026, 1, 1, tzinfo=UTC)
NEW = OLD + timedelta(days=300)


def member(
    upload: str, instance: str, key: str, at: datetime | None, state: str = "deidentified"
) -> dict[str, Any]:
    found: dict[str, Any] = {"_id": upload, "state": state, "study_key": "st-1", "instance_key": instance}
    found["object"] = {"bucket": "b", "key": key, "version_id": None}
    if at is not None:
        found["event_time"] = at
    return found


def test_each_instance_is_its_members_most_recent_outcome_first_and_a_withdrawn_one_is_left_out() -> None:
    members = [
        member("iu-dup", "ik-1", "old-1", OLD),  # a duplicate upload the redo did not know of
        member("iu-1", "ik-1", "new-1", NEW),
        member("iu-2", "ik-2", "copy-2", None),  # settled before event times were kept
        member("iu-3", "ik-3", "old-3", OLD),
        member("iu-3b", "ik-3", "old-3", NEW, state="excluded"),  # the redo withdrew the copy
        member("iu-4", "ik-4", "gone", NEW, state="expected"),
    ]
    copies = instance_copies(members)
    assert [[m["_id"] for m in group] for group in copies] == [["iu-1", "iu-dup"], ["iu-2"]]


class Assembly:
    def __init__(self, members: list[dict[str, Any]]) -> None:
        self.members = members
        self.retried: list[bool] = []
        self.finished: list[tuple[str, str | None]] = []

    missing = staticmethod(lambda series: [])

    async def members_of(self, series_id: str) -> list[dict[str, Any]]:
        return self.members

    async def decide(self, series: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
        return outcome

    async def retry_later(self, series: dict[str, Any], delay_s: float, *, counted: bool) -> None:
        self.retried.append(counted)

    async def finish(
        self, series: dict[str, Any], analysis_id: str, outcome: str, reason: Any = None
    ) -> None:
        self.finished.append((outcome, reason))


class Publisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, Envelope]] = []

    async def publish(self, topic: str, envelope: Envelope, *, key: str) -> None:
        self.published.append((topic, envelope))


def run(
    members: list[dict[str, Any]], deleted: set[str]
) -> tuple[AnalysisService, Assembly, list[str], list[int]]:
    """A service whose object store has every copy but ``deleted``; what it read, what it analysed."""
    assembly = Assembly(members)
    runtime = SimpleNamespace(
        publisher=Publisher(), registry=CollectorRegistry(), count_crypto=lambda _: None
    )
    analysed: list[int] = []

    def analyser(datasets: list[pydicom.Dataset]) -> Any:
        analysed.append(len(datasets))
        return {"brain_volume_ml": 1.0}, {}, {}, []

    analysis = AnalysisService(runtime, AnalysisSettings(min_instances=2), assembly, None, analyser)  # type: ignore[arg-type]
    read: list[str] = []

    async def load(tenant: str, found: dict[str, Any], *_: Any) -> pydicom.Dataset:
        key = found["object"]["key"]
        read.append(key)
        if key in deleted:
            raise PermanentError("object store get failed (NoSuchKey)", code="s3_NoSuchKey")
        ds = pydicom.Dataset()
        ds.SOPInstanceUID = "2.25." + str(int(found["instance_key"].removeprefix("ik-")))
        return ds

    analysis._load = load  # type: ignore[method-assign]
    return analysis, assembly, read, analysed


SERIES = {"_id": "t:sk", "tenant": "t", "series_key": "sk", "changed_at": 1, "attempts": 1}


async def test_after_a_redo_the_series_is_analysed_from_the_new_copies_not_failed_on_the_deleted_ones() -> (
    None
):
    members = [
        member(f"iu-{n}{dup}", f"ik-{n}", f"{'old' if dup else 'new'}-{n}", OLD if dup else NEW)
        for n in range(3)
        for dup in ("", "-dup")
    ]
    analysis, assembly, read, analysed = run(members, deleted={"old-0", "old-1", "old-2"})
    await analysis.attempt(dict(SERIES))
    assert assembly.retried == []
    assert read == ["new-0", "new-1", "new-2"]  # each instance once, never the deleted copies
    assert analysed == [3]
    [(topic, envelope)] = analysis.runtime.publisher.published
    assert topic == topics.ANALYSIS_COMPLETED
    assert sorted(envelope.data["instance_upload_ids"]) == sorted(m["_id"] for m in members)


async def test_a_copy_that_is_gone_is_replaced_by_an_older_outcomes_copy_that_is_there() -> None:
    """An outcome naming a copy that is not there (yet, or any more) does not fail the series while
    another member of the instance names one that is."""
    members = [member("iu-0", "ik-0", "newer-0", NEW), member("iu-0b", "ik-0", "older-0", OLD)]
    members += [member("iu-1", "ik-1", "copy-1", OLD)]
    analysis, assembly, read, analysed = run(members, deleted={"newer-0"})
    await analysis.attempt(dict(SERIES))
    assert read == ["newer-0", "older-0", "copy-1"] and analysed == [2]
    assert assembly.finished == [("completed", None)]


async def test_an_instance_with_no_copy_left_fails_the_attempt_and_counts_it() -> None:
    members = [member("iu-0", "ik-0", "gone-0", NEW), member("iu-0b", "ik-0", "gone-0b", OLD)]
    members += [member("iu-1", "ik-1", "copy-1", OLD)]
    analysis, assembly, read, analysed = run(members, deleted={"gone-0", "gone-0b"})
    await analysis.attempt(dict(SERIES))
    assert read == ["gone-0", "gone-0b"] and analysed == []
    assert assembly.retried == [True] and assembly.finished == []
