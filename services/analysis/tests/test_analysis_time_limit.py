"""An analysis that does not end is stopped after ``ENCLAVE_ANALYSIS_MAX_ANALYSIS_S``, and the series
is reported failed (``analysis_timed_out``), not retried: a native decoder hung on a pathological
codestream (its worker process is killed and replaced), an object store whose reads of the members
stall, or one that stalls while the reports are stored (those stored are deleted: no outcome names
them). Until the eighteenth session nothing bounded an analysis: it held the replica until the
15-minute lease handed the series to another replica, which hung on it too; until the nineteenth the
limit bounded the worker only, and a stalled read or write held the claim past the lease, so two
replicas analysed the same series.

The worker's analyser is the builtin ``eval`` (a function of this module could not be unpickled by
the spawned worker, which does not import the tests); the object store is a fake whose reads or
writes can be made to stall, with members encrypted as deid stores them."""

from __future__ import annotations

import asyncio
import io
import os
import time
from multiprocessing.connection import wait
from types import SimpleNamespace
from typing import IO, Any

import pydantic
import pydicom
import pytest
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.errors import REASON_CODES, AnalysisTimedOut
from enclave_analysis.handlers import AnalysisService
from enclave_analysis.main import analysis_worker
from enclave_common import topics
from enclave_common.crypto import LocalKeyring, ObjectIdentity, encrypt_bytes
from enclave_common.envelope import Envelope
from enclave_common.storage import StoredObject
from prometheus_client import CollectorRegistry
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

HANG = "__import__('time').sleep(120)"
WORKER_PID = "__import__('os').getpid()"
MEMBERS = [
    {
        "_id": f"iu-{n}",
        "state": "deidentified",
        "study_key": "st",
        "instance_key": f"ik-{n}",
        "object": {"bucket": "deid", "key": f"copies/c{n}", "version_id": None},
    }
    for n in range(3)
]
SERIES = {"_id": "t:sk", "tenant": "t", "series_key": "sk", "changed_at": 1, "attempts": 1}
REPORTS = [(name, "application/dicom", b"report") for name in ("sr.dcm", "seg.dcm", "report.png")]
#: The slowest an attempt stopped by a 1 s limit may take here; the old code never ended.
GUARD_S = 20.0


class Assembly:
    def __init__(self) -> None:
        self.steps: list[Any] = []

    missing = staticmethod(lambda series: [])

    async def members_of(self, series_id: str) -> list[dict[str, Any]]:
        return MEMBERS

    async def decide(self, series: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
        return outcome

    async def retry_later(self, series: dict[str, Any], delay_s: float, *, counted: bool) -> None:
        self.steps.append(("retry", counted))

    async def finish(
        self, series: dict[str, Any], analysis_id: str, outcome: str, reason: Any = None
    ) -> None:
        self.steps.append(("finish", outcome, reason))


class Publisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, Envelope]] = []

    async def publish(self, topic: str, envelope: Envelope, *, key: str) -> None:
        self.published.append((topic, envelope))


def member_file(n: int) -> bytes:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.InstanceNumber = MRImageStorage, n
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


class Store:
    """The object store as the service reads members from it and stores reports in it (versioned).
    After ``reads_answered`` reads (``puts_answered`` puts) every further one stalls for good;
    ``read_error`` is raised by every read instead."""

    def __init__(self, kek: LocalKeyring) -> None:
        self.objects: dict[str, bytes] = {}
        for n, member in enumerate(MEMBERS):
            key = member["object"]["key"]
            identity = ObjectIdentity("t", "st", key)
            dek, wrapped = kek.generate_data_key(identity.key_context())
            self.objects[key] = encrypt_bytes(member_file(n), dek, wrapped, identity)
        self.reads_answered: int | None = None
        self.puts_answered: int | None = None
        self.read_error: BaseException | None = None
        self.reads: list[str] = []
        self.stored: list[tuple[str, str]] = []
        self.stalled = 0

    async def _stall(self) -> None:
        self.stalled += 1
        await asyncio.Event().wait()

    async def read(self, bucket: str, key: str, version_id: str | None = None) -> bytes:
        if self.read_error is not None:
            raise self.read_error
        if self.reads_answered is not None and len(self.reads) >= self.reads_answered:
            await self._stall()
        self.reads.append(key)
        return self.objects[key]

    async def put(
        self, bucket: str, key: str, body: IO[bytes], *, metadata: dict[str, str] | None = None
    ) -> StoredObject:
        if self.puts_answered is not None and len(self.stored) >= self.puts_answered:
            await self._stall()
        self.stored.append((key, f"v-{len(self.stored)}"))
        return StoredObject(bucket, key, self.stored[-1][1])


class Versions:
    """``ReportVersions`` on ``Store``: what the service deleted."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.deleted: list[tuple[str, str]] = []

    async def versions(self, bucket: str, prefix: str) -> list[tuple[str, str]]:
        return [v for v in reversed(self.store.stored) if v[0].startswith(prefix)]

    async def delete(self, bucket: str, versions: list[tuple[str, str]]) -> None:
        self.deleted += versions
        self.store.stored = [v for v in self.store.stored if v not in versions]


def runtime() -> Any:
    return SimpleNamespace(publisher=Publisher(), registry=CollectorRegistry(), count_crypto=lambda _: None)


@pytest.fixture
def service() -> Any:
    made = AnalysisService(
        runtime(),
        AnalysisSettings(max_analysis_s=2.0),
        Assembly(),  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        analyser=eval,  # type: ignore[arg-type]
        executor_factory=analysis_worker,
    )
    yield made
    made.shutdown()


def on_store() -> tuple[AnalysisService, Store, Versions, list[int]]:
    """A service reading its members from ``Store`` and analysing in a thread; the analyses run."""
    kek = LocalKeyring.generate()
    store = Store(kek)
    versions = Versions(store)
    analysed: list[int] = []

    def analyser(datasets: list[pydicom.Dataset]) -> Any:
        analysed.append(len(datasets))
        return {"icv_ml": 1.0}, {}, {}, REPORTS

    made = AnalysisService(
        runtime(),
        AnalysisSettings(max_analysis_s=1.0),
        Assembly(),  # type: ignore[arg-type]
        store,  # type: ignore[arg-type]
        analyser,
        report_versions=versions,  # type: ignore[arg-type]
    )
    made.kek = kek
    return made, store, versions, analysed


def timed_out(service: AnalysisService) -> Envelope:
    """The one outcome published: ``analysis_timed_out``, the series finished with it."""
    [(topic, envelope)] = service.runtime.publisher.published  # type: ignore[attr-defined]
    assert topic == topics.ANALYSIS_FAILED and envelope.data["reason_code"] == "analysis_timed_out"
    assert service.assembly.steps == [("finish", "failed", "analysis_timed_out")]  # type: ignore[attr-defined]
    assert "reports" not in envelope.data
    return envelope


async def test_an_analysis_past_its_time_is_stopped_its_worker_killed_and_a_new_one_takes_the_next(
    service,
) -> None:
    worker_pid = await service._run_analyser(WORKER_PID)  # the worker is up (spawning it is not timed)
    [worker] = service._executor._processes.values()
    real = service._run_analyser
    service._run_analyser = lambda datasets: real(HANG)

    async def load(tenant: str, member: dict[str, Any], *_: Any) -> Any:
        return {"SOPInstanceUID": member["_id"]}

    service._load = load
    started = time.monotonic()
    with pytest.raises(AnalysisTimedOut) as stopped:
        await service._analyse_within_limit("t", "st", "an", [[m] for m in MEMBERS], uploads=3)
    assert 2.0 <= time.monotonic() - started < 10
    assert "ran longer than 2 s and was stopped while analysing the series" in stopped.value.reason
    assert "ENCLAVE_ANALYSIS_MAX_ANALYSIS_S" in stopped.value.reason
    assert await asyncio.to_thread(wait, [worker.sentinel], 5.0) == [worker.sentinel]
    assert await real(WORKER_PID) not in (None, os.getpid(), worker_pid)


async def test_a_series_whose_analysis_hangs_is_reported_failed_not_tried_again(service) -> None:
    real = service._run_analyser

    async def hanging(datasets: list[Any]) -> Any:
        return await real(HANG)

    async def load(tenant: str, member: dict[str, Any], *_: Any) -> Any:
        return {"SOPInstanceUID": member["_id"]}

    service._run_analyser = hanging
    service._load = load
    await service.attempt(dict(SERIES))
    timed_out(service)
    assert "analysis_timed_out" in REASON_CODES  # what enclave-analysis-rerun --reason-code accepts


async def test_a_series_whose_member_reads_stall_is_stopped_at_the_limit_and_reported_timed_out() -> None:
    """The limit bounds reading the members too: a stalled object store no longer holds the claim
    past its lease (the old code waited here for good)."""
    service, store, versions, analysed = on_store()
    store.reads_answered = 1
    started = time.monotonic()
    await asyncio.wait_for(service.attempt(dict(SERIES)), GUARD_S)
    assert 1.0 <= time.monotonic() - started < 5
    envelope = timed_out(service)
    assert "ran longer than 1 s and was stopped while reading the series' members" in envelope.data["reason"]
    assert store.reads == ["copies/c0"] and store.stalled == 1
    assert analysed == [] and store.stored == [] and versions.deleted == []


async def test_a_series_read_in_time_is_analysed_as_before() -> None:
    """The real reading path under the limit: every member read, decrypted and parsed."""
    service, store, _, analysed = on_store()
    await asyncio.wait_for(service.attempt(dict(SERIES)), GUARD_S)
    [(topic, envelope)] = service.runtime.publisher.published  # type: ignore[attr-defined]
    assert topic == topics.ANALYSIS_COMPLETED and analysed == [3]
    assert [r["version_id"] for r in envelope.data["reports"]] == ["v-0", "v-1", "v-2"]


async def test_reports_stored_before_the_limit_are_deleted_and_the_outcome_names_none() -> None:
    """An object store that stalls while the reports are stored: the series is reported timed out,
    and the report versions stored by then, which no outcome names and which are not the whole
    result, are deleted (the old code waited here for good)."""
    service, store, versions, analysed = on_store()
    store.puts_answered = 1
    await asyncio.wait_for(service.attempt(dict(SERIES)), GUARD_S)
    envelope = timed_out(service)
    assert "stopped while storing the reports" in envelope.data["reason"]
    assert analysed == [3] and store.stalled == 1
    [(key, version)] = versions.deleted
    assert key == f"reports/{envelope.data['analysis_id']}/sr.dcm" and version == "v-0"
    assert store.stored == []


async def test_a_timeout_error_the_analyser_raises_itself_is_not_the_time_limit(service) -> None:
    """Only the limit's own expiry is ``analysis_timed_out``; a TimeoutError from inside the analysis
    is an error of the analysis, and the worker is not killed for it (review, eighteenth session)."""
    worker_pid = await service._run_analyser(WORKER_PID)
    real = service._run_analyser
    service._run_analyser = lambda datasets: real("(_ for _ in ()).throw(TimeoutError('inside'))")

    async def load(tenant: str, member: dict[str, Any], *_: Any) -> Any:
        return {"SOPInstanceUID": member["_id"]}

    service._load = load
    with pytest.raises(TimeoutError) as raised:
        await service._analyse_within_limit("t", "st", "an", [[m] for m in MEMBERS], uploads=3)
    assert not isinstance(raised.value, AnalysisTimedOut)
    assert await real(WORKER_PID) == worker_pid  # the same worker


async def test_a_timeout_error_of_a_member_read_is_a_dependency_outage_not_the_time_limit() -> None:
    """A read that times out in the client (a socket timeout) is retried without counting, as any
    object store outage, now that reading is within the limit's reach."""
    service, store, _, _ = on_store()
    store.read_error = TimeoutError("read timed out")
    await service.attempt(dict(SERIES))
    assert service.runtime.publisher.published == []  # type: ignore[attr-defined]
    assert service.assembly.steps == [("retry", False)]  # type: ignore[attr-defined]


def test_the_time_limit_must_end_an_analysis_before_its_lease_does() -> None:
    with pytest.raises(pydantic.ValidationError, match="must be below ENCLAVE_ANALYSIS_LEASE_S"):
        AnalysisSettings(max_analysis_s=900.0, lease_s=900.0)
    assert AnalysisSettings().max_analysis_s == 600.0
