"""An analysis that does not end is stopped after ``ENCLAVE_ANALYSIS_MAX_ANALYSIS_S``. A native decoder
hung on a pathological codestream (its worker process is killed and replaced): the series is reported
failed (``analysis_timed_out``), not retried. An object store too slow for the limit while the members
are read, or the reports stored (those stored are deleted: no outcome names them): the series is tried
again later, its attempt not counted, as in a store outage. Until the eighteenth session nothing
bounded an analysis: it held the replica until the 15-minute lease handed the series to another
replica, which hung on it too; until the nineteenth the limit bounded the worker only, and a stalled
read or write held the claim past the lease, so two replicas analysed the same series; in the
nineteenth a store merely slow for the limit failed the series for good (``analysis_timed_out``, a
review of that session).

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
from enclave_analysis.config import DISCARD_TIMEOUT_S, AnalysisSettings
from enclave_analysis.errors import REASON_CODES, AnalysisTimedOut, ObjectStoreTooSlow
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
    ``read_error`` is raised by every read instead; every read and put first waits ``delay_s`` (a
    store that answers, slowly)."""

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
        self.delay_s = 0.0

    async def _stall(self) -> None:
        self.stalled += 1
        await asyncio.Event().wait()

    async def read(self, bucket: str, key: str, version_id: str | None = None) -> bytes:
        await asyncio.sleep(self.delay_s)
        if self.read_error is not None:
            raise self.read_error
        if self.reads_answered is not None and len(self.reads) >= self.reads_answered:
            await self._stall()
        self.reads.append(key)
        return self.objects[key]

    async def put(
        self, bucket: str, key: str, body: IO[bytes], *, metadata: dict[str, str] | None = None
    ) -> StoredObject:
        await asyncio.sleep(self.delay_s)
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


def slow_store_retried(service: AnalysisService) -> None:
    """No outcome published; the claim given back to be tried again later, its attempt not counted,
    and counted as a slow object store (``enclave_analysis_attempt_failures_total``)."""
    assert service.runtime.publisher.published == []  # type: ignore[attr-defined]
    assert service.assembly.steps == [("retry", False)]  # type: ignore[attr-defined]
    registry = service.runtime.registry
    assert (
        registry.get_sample_value("enclave_analysis_attempt_failures_total", {"cause": "slow_object_store"})
        == 1
    )
    assert registry.get_sample_value("enclave_analysis_attempt_failures_total", {"cause": "unexpected"}) == 0


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


async def test_a_series_whose_member_reads_stall_is_stopped_at_the_limit_and_tried_again_later() -> None:
    """The limit bounds reading the members too: a stalled object store no longer holds the claim
    past its lease (the old code waited here for good), and the series is not failed for the store's
    fault (the nineteenth session's code reported it ``analysis_timed_out``)."""
    service, store, versions, analysed = on_store()
    store.reads_answered = 1
    started = time.monotonic()
    await asyncio.wait_for(service.attempt(dict(SERIES)), GUARD_S)
    assert 1.0 <= time.monotonic() - started < 5
    slow_store_retried(service)
    assert store.reads == ["copies/c0"] and store.stalled == 1
    assert analysed == [] and store.stored == [] and versions.deleted == []


async def test_a_slow_but_working_store_is_tried_again_not_failed_for_good() -> None:
    """Every read answers, in 0.4 s: three members do not fit the 1 s limit. A degraded store is a
    dependency problem: the series is tried again, its attempt not counted, as when a read fails
    (review of the nineteenth session: it ended ``failed/analysis_timed_out``)."""
    service, store, versions, analysed = on_store()
    store.delay_s = 0.4
    await asyncio.wait_for(service.attempt(dict(SERIES)), GUARD_S)
    slow_store_retried(service)
    assert len(store.reads) < len(MEMBERS) and store.stalled == 0 and analysed == []


async def test_the_limit_run_out_in_the_object_store_is_a_transient_error_naming_the_stage() -> None:
    service, store, _, _ = on_store()
    store.reads_answered = 0
    with pytest.raises(ObjectStoreTooSlow) as stopped:
        await service._analyse_within_limit("t", "st", "an", [[m] for m in MEMBERS], uploads=3)
    assert not isinstance(stopped.value, AnalysisTimedOut)
    assert stopped.value.code == "object_store_too_slow"
    assert (
        "time limit of 1 s (ENCLAVE_ANALYSIS_MAX_ANALYSIS_S) ran out while reading the series' members"
        in stopped.value.reason
    )
    assert "object_store_too_slow" not in REASON_CODES  # never an analysis.failed reason


async def test_a_series_read_in_time_is_analysed_as_before() -> None:
    """The real reading path under the limit: every member read, decrypted and parsed."""
    service, store, _, analysed = on_store()
    await asyncio.wait_for(service.attempt(dict(SERIES)), GUARD_S)
    [(topic, envelope)] = service.runtime.publisher.published  # type: ignore[attr-defined]
    assert topic == topics.ANALYSIS_COMPLETED and analysed == [3]
    assert [r["version_id"] for r in envelope.data["reports"]] == ["v-0", "v-1", "v-2"]


async def test_reports_stored_before_the_limit_are_deleted_and_the_series_is_tried_again() -> None:
    """An object store that stalls while the reports are stored: the report versions stored by then,
    which no outcome names and which are not the whole result, are deleted (the old code waited here
    for good), and the series is tried again later, its attempt not counted (the nineteenth
    session's code reported it ``analysis_timed_out``)."""
    service, store, versions, analysed = on_store()
    store.puts_answered = 1
    await asyncio.wait_for(service.attempt(dict(SERIES)), GUARD_S)
    slow_store_retried(service)
    assert analysed == [3] and store.stalled == 1
    [(key, version)] = versions.deleted
    assert key.startswith("reports/an-") and key.endswith("/sr.dcm") and version == "v-0"
    assert store.stored == []


async def test_a_series_tried_again_after_a_slow_store_is_analysed_once_the_store_keeps_up() -> None:
    """The retry of a series whose reports were cut by the limit stores them whole, and its outcome
    names only those (nothing the stopped run left is named)."""
    service, store, versions, analysed = on_store()
    store.puts_answered = 2
    await asyncio.wait_for(service.attempt(dict(SERIES)), GUARD_S)
    assert sorted(v for _, v in versions.deleted) == ["v-0", "v-1"] and store.stored == []
    store.puts_answered = None
    await asyncio.wait_for(service.attempt(dict(SERIES)), GUARD_S)
    [(topic, envelope)] = service.runtime.publisher.published  # type: ignore[attr-defined]
    assert topic == topics.ANALYSIS_COMPLETED and analysed == [3, 3]
    assert [r["version_id"] for r in envelope.data["reports"]] == [v for _, v in store.stored]
    assert service.assembly.steps == [("retry", False), ("finish", "completed", None)]  # type: ignore[attr-defined]


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


def test_the_time_limit_leaves_the_lease_room_for_deleting_the_reports_it_cut() -> None:
    """After the limit, the reports stored by then are deleted, for up to ``DISCARD_TIMEOUT_S``, while
    the claim still holds: a limit just under the lease would let that run past it (review of the
    nineteenth session: 895 s was accepted with a 900 s lease)."""
    assert DISCARD_TIMEOUT_S == 10.0
    with pytest.raises(pydantic.ValidationError) as refused:
        AnalysisSettings(max_analysis_s=895.0, lease_s=900.0)
    message = str(refused.value)
    assert (
        "ENCLAVE_ANALYSIS_MAX_ANALYSIS_S (895) must be below ENCLAVE_ANALYSIS_LEASE_S (900) minus 10 s"
        in message
    )
    assert "below 890" in message
    with pytest.raises(pydantic.ValidationError):
        AnalysisSettings(max_analysis_s=890.0, lease_s=900.0)
    assert AnalysisSettings(max_analysis_s=889.0, lease_s=900.0).max_analysis_s == 889.0
