"""Analysis wiring: collect de-identified members per series, analyse complete series, publish.

Event handlers only record facts (idempotent upserts); a background assembler finds series that
are complete, claims one at a time (a lease, so a replica that dies is taken over; one stopped in
order releases its claim at once), runs the CPU-bound pipeline in a worker process (ANTs holds the
GIL for seconds), stores the reports encrypted, and publishes ``analysis.completed`` or ``analysis.failed``. The outcome's event id is kept with the claim, so a
re-run after a crash publishes the same event again, not a second one.
"""

from __future__ import annotations

import asyncio
import functools
import io
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pydicom
import structlog
from enclave_common import topics
from enclave_common.crypto import KeyEncryptionKeyProvider, ObjectIdentity, decrypt_bytes, encrypt_bytes
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.errors import PermanentError, TransientError, classify_exception
from enclave_common.events import (
    AnalysisCompleted,
    AnalysisFailed,
    InstanceDeidentified,
    InstanceQuarantined,
    InstanceRejected,
    ObjectRef,
    UploadCompleted,
)
from enclave_common.service import ServiceRuntime
from enclave_common.storage import S3ObjectStore
from prometheus_client import Counter, Gauge
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from enclave_analysis.assembly import SeriesAssembly, analysis_id_for, instance_copies
from enclave_analysis.config import DISCARD_TIMEOUT_S, AnalysisSettings
from enclave_analysis.errors import (
    AnalysisError,
    AnalysisTimedOut,
    ObjectStoreTooSlow,
    RepeatedFailure,
    SeriesIncomplete,
    SeriesTooLargeError,
)
from enclave_analysis.native_stderr import run_capturing_native_stderr
from enclave_analysis.report_versions import ReportVersions, S3ReportVersions

log = structlog.get_logger("enclave.analysis")

#: At most this many of a series' missing instance upload ids are listed in its ``series_incomplete``
#: failure (``awaiting_instance_upload_ids``; the reason gives the count).
AWAITING_LISTED = 100

#: S3 error codes of an object (or version) that is not there (``enclave_common.storage.s3_error``).
MISSING_OBJECT = frozenset({"s3_NoSuchKey", "s3_NoSuchVersion", "s3_404"})

#: A claim whose analysis was stopped is released within this long, or left to its lease (the
#: database did not answer): the service's shutdown does not wait longer for it.
RELEASE_TIMEOUT_S = 5.0

#: The stages of one analysis (``_analyse_within_limit``) that wait on the object store: the limit
#: running out in one of them is the store's slowness (``ObjectStoreTooSlow``), not the series'.
READING, ANALYSING, STORING = "reading the series' members", "analysing the series", "storing the reports"
OBJECT_STORE_STAGES = frozenset({READING, STORING})


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


#: (datasets) -> (measures, qc, unavailable reasons, reports as (name, media type, bytes))
SeriesAnalyser = Callable[
    [list[pydicom.Dataset]],
    tuple[dict[str, float | None], dict[str, Any], dict[str, str], list[tuple[str, str, bytes]]],
]


class AnalysisService:
    def __init__(
        self,
        runtime: ServiceRuntime,
        settings: AnalysisSettings,
        assembly: SeriesAssembly,
        store: S3ObjectStore,
        analyser: SeriesAnalyser,
        executor_factory: Callable[[], Executor] | None = None,
        report_versions: ReportVersions | None = None,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.assembly = assembly
        self.attempt_failures = Counter(
            "enclave_analysis_attempt_failures",
            "Series analyses that failed and will be tried again, by cause (unexpected; dependency; "
            "slow_object_store: the time limit ran out while the object store was read or written)",
            ["cause"],
            registry=runtime.registry,
        )
        for cause in ("unexpected", "dependency", "slow_object_store"):
            # At 0 from the start: a series that appears at its first failure starts at 1, where
            # increase() sees no rise, and EnclaveAnalysisFailedUnexpectedly missed that failure.
            self.attempt_failures.labels(cause)
        # Analysis's Kafka lag says nothing of its work (each instance is filed in the assembler at
        # once): these show it. A replica sees the whole assembler, so across replicas read max().
        self.series_ready = Gauge(
            "enclave_analysis_series_ready",
            "Series ready to be analysed or reported at the assembler's last look (complete and quiet, "
            "overdue, or whose lease ran out), at most 20",
            registry=runtime.registry,
        )
        self.assembler_last_look = Gauge(
            "enclave_analysis_assembler_last_look_timestamp_seconds",
            "When the assembler last looked for ready series or took the next one of them (Unix time); "
            "nothing moves it while one series is analysed",
            registry=runtime.registry,
        )
        self.in_progress = Gauge(
            "enclave_analysis_series_in_progress",
            "Series this replica is analysing now (0 or 1): with the series ready, the work analysis "
            "has, which its autoscaling follows",
            registry=runtime.registry,
        )
        self.outcomes = Counter(
            "enclave_analysis_outcomes",
            "Series outcomes published, by outcome (completed, failed)",
            ["outcome"],
            registry=runtime.registry,
        )
        for outcome in ("completed", "failed"):  # present at 0, so a rule on their increase can fire
            self.outcomes.labels(outcome)
        self.superseded_reports = Counter(
            "enclave_analysis_superseded_report_versions",
            "Report versions a newer result of the same series superseded, by outcome (deleted; kept: "
            "the object store refused to delete them, see the log)",
            ["outcome"],
            registry=runtime.registry,
        )
        for kept in ("deleted", "kept"):
            self.superseded_reports.labels(kept)
        self.store = store
        self.report_versions = report_versions or (S3ReportVersions(store) if store is not None else None)
        self.analyser = analyser
        #: Where the analyser runs: a worker process (main.py), so ANTs, which holds the GIL for
        #: seconds at a time, does not stall the event loop (Kafka heartbeats, /healthz), and a worker
        #: killed for memory takes only its analysis with it. None: a thread (unit tests).
        self._executor_factory = executor_factory
        self._executor = executor_factory() if executor_factory is not None else None
        #: Set at startup (key files are read then, not at construction).
        self.kek: KeyEncryptionKeyProvider | None = None

    def register(self) -> None:
        self.runtime.consume(topics.INSTANCE_DEIDENTIFIED, self.on_deidentified)
        self.runtime.consume(topics.INSTANCE_QUARANTINED, self.on_excluded)
        self.runtime.consume(topics.INSTANCE_REJECTED, self.on_excluded)
        self.runtime.consume(topics.UPLOAD_COMPLETED, self.on_upload_completed)

    async def on_deidentified(self, envelope: Envelope) -> None:
        deid = envelope.payload(InstanceDeidentified)
        await self.assembly.settle(
            envelope.tenant,
            deid.series_key,
            deid.instance_upload_id,
            deid.upload_id,
            "deidentified",
            {
                "study_key": deid.study_key,
                "object": deid.object.model_dump(),
                "instance_key": deid.instance_key,
            },
            envelope.correlation_id,
            envelope.time,
        )

    async def on_excluded(self, envelope: Envelope) -> None:
        if envelope.type == topics.event_type(topics.INSTANCE_QUARANTINED):
            quarantined = envelope.payload(InstanceQuarantined)
            await self.assembly.settle(
                envelope.tenant,
                quarantined.series_key,
                quarantined.instance_upload_id,
                quarantined.upload_id,
                "excluded",
                {"reason_code": quarantined.reason_code},
                envelope.correlation_id,
                envelope.time,
            )
        else:
            rejected = envelope.payload(InstanceRejected)
            # A rejected instance has no series key (its header may be unreadable): it settles in the
            # series its upload touched, like any member, so the series document alone says whether
            # the series is complete (it relied on the completeness repair, which checks at most 50).
            await self.assembly.settle(
                envelope.tenant,
                None,
                rejected.instance_upload_id,
                rejected.upload_id,
                "excluded",
                {"reason_code": rejected.reason_code},
                envelope.correlation_id,
                envelope.time,
            )

    async def on_upload_completed(self, envelope: Envelope) -> None:
        done = envelope.payload(UploadCompleted)
        if done.instance_upload_ids:
            await self.assembly.expect(
                envelope.tenant, done.series_keys, done.instance_upload_ids, done.upload_id
            )

    # ---- the assembler ----------------------------------------------------------------------

    async def run_assembler(self) -> None:
        while True:
            try:
                ready = await self.assembly.ready(
                    self.settings.quiet_period_s, self.settings.incomplete_after_s
                )
                self.series_ready.set(len(ready))
                self.assembler_last_look.set_to_current_time()
                for taken, series in enumerate(ready, start=1):
                    self.assembler_last_look.set_to_current_time()  # a pass may hold 20 analyses
                    # This one is taken now (or by another replica): it is in hand, not waiting, for
                    # what autoscaling adds up (waiting + in progress), so it is not counted twice.
                    self.series_ready.set(len(ready) - taken)
                    claimed = await self.assembly.claim(series, self.settings.lease_s)
                    if claimed is not None:
                        await self.attempt(claimed)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep assembling; a claimed series stays claimable after its lease
                log.warning("assembler pass failed", exc_info=exc)
            await asyncio.sleep(self.settings.scan_interval_s)

    async def attempt(self, series: dict[str, Any]) -> None:
        """Analyse a claimed series. An unexpected error lets it be claimed again after
        ``retry_delay_s``; after ``max_attempts`` it is reported failed instead (``analyse``). A
        dependency outage is retried the same way without counting, and so is an object store too
        slow for the time limit (``ObjectStoreTooSlow``; counted apart, ``slow_object_store``, since a
        store that stays that slow retries the series for good). Stopped (the service shuts down),
        the claim is released at once without counting (``_release``)."""
        self.in_progress.inc()
        try:
            await self.analyse(series)
        except asyncio.CancelledError:
            await self._release(series)
            raise
        except Exception as exc:
            transient = isinstance(classify_exception(exc), TransientError)
            cause = (
                "slow_object_store"
                if isinstance(exc, ObjectStoreTooSlow)
                else "dependency"
                if transient
                else "unexpected"
            )
            # Where ITK raised, when it said so on stderr in the worker (``native_stderr``): no text.
            native = getattr(exc, "native_error_at", None)
            log.error(
                "series analysis failed; it will be tried again",
                series_id=series["_id"],
                attempt=series.get("attempts"),
                counted=not transient,
                cause=cause,
                exc_info=exc,
                **({"native_error_at": native} if isinstance(native, str) else {}),
            )
            self.attempt_failures.labels(cause).inc()
            await self.assembly.retry_later(series, self.settings.retry_delay_s, counted=not transient)
        finally:
            self.in_progress.dec()

    async def _release(self, series: dict[str, Any]) -> None:
        """The analysis of a claimed series was stopped (a rolling update, a scale-down; its worker
        process is killed, ``_run_analyser``): another replica may claim the series now rather than
        after the lease, and the attempt is not counted, so restarts cannot fail a good series. A
        claim whose outcome was recorded, or that another replica took over, stays as it is
        (``SeriesAssembly.release``); a crash leaves the claim to its lease, as before."""
        started = time.monotonic()
        published = False
        try:
            released = await asyncio.wait_for(self.assembly.release(series), RELEASE_TIMEOUT_S)
            if not released:  # stopped after its outcome was recorded: publish it now, not after the lease
                published = await asyncio.wait_for(self._publish_recorded(series), RELEASE_TIMEOUT_S)
        except Exception as exc:
            log.warning(
                "analysis stopped; its claim could not be released and is taken over after its lease",
                series_id=series["_id"],
                exc_info=exc,
            )
            return
        if released:
            event = "analysis stopped; claim released, attempt not counted"
        elif published:
            event = "analysis stopped after its outcome was recorded; outcome published"
        else:
            event = "analysis stopped; claim kept: another replica holds it, or the series changed"
        log.info(
            event,
            series_id=series["_id"],
            attempt=series.get("attempts"),
            released=released,
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _publish_recorded(self, series: dict[str, Any]) -> bool:
        """Publish the outcome this claim recorded (``decide``) if it still holds the series and the
        outcome is for the members the series has now (what the next claim would check); True if so."""
        held = await self.assembly.held(series)
        recorded = await self._recorded_outcome(held) if held is not None else None
        if held is None or recorded is None:
            return False
        await self._publish(held, recorded, again=False)
        return True

    async def _recorded_outcome(self, series: dict[str, Any]) -> dict[str, Any] | None:
        """The outcome recorded for this claim (``pending_event``) when it is for the series' current
        de-identified members, else None (none recorded, or a member settled since)."""
        member_ids = sorted(m["_id"] for m in await self._deidentified_members(series["_id"]))
        return _recorded(series, analysis_id_for(series["series_key"], member_ids))

    async def _deidentified_members(self, series_id: str) -> list[dict[str, Any]]:
        return [m for copies in await self._instances(series_id) for m in copies]

    async def _instances(self, series_id: str) -> list[list[dict[str, Any]]]:
        """The series' de-identified instances, each as its members, most recent outcome first
        (``instance_copies``)."""
        return instance_copies(await self.assembly.members_of(series_id))

    async def analyse(self, series: dict[str, Any]) -> None:
        instances = await self._instances(series["_id"])
        members = [m for copies in instances for m in copies]
        member_ids = sorted(m["_id"] for m in members)
        analysis_id = analysis_id_for(series["series_key"], member_ids)
        tenant, series_key = series["tenant"], series["series_key"]
        pending = series.get("pending_event") or {}
        if (recorded := _recorded(series, analysis_id)) is not None:
            # This claim's outcome was recorded, and perhaps published, by a process that died before
            # it finished the series: the same event again, not a new run (whose outcome could
            # differ: a completed analysis published, then past the last attempt, was published again
            # as failed under the same event id before this outbox).
            await self._publish(series, recorded, again=True)
            return
        # A claim recorded by an earlier version kept only the event id (and may have published an
        # outcome under it; not a repeated failure, below).
        event_id = pending.get("event_id") if pending.get("analysis_id") == analysis_id else None
        study_key = members[0]["study_key"] if members else ""
        base = {
            "analysis_id": analysis_id,
            "study_key": study_key,
            "series_key": series_key,
            "instance_upload_ids": member_ids,
        }
        data: AnalysisCompleted | AnalysisFailed
        extra: dict[str, Any] = {}
        missing = self.assembly.missing(series)
        try:
            if int(series.get("attempts") or 1) > self.settings.max_attempts:
                raise RepeatedFailure(
                    f"the analysis of this series failed on each of {self.settings.max_attempts} attempts "
                    "with an internal error; it is not tried again unless the series changes. The "
                    "analysis service's logs name the error; report it to the operators"
                )
            if missing:
                extra = {"awaiting_instance_upload_ids": missing[:AWAITING_LISTED]}
                raise SeriesIncomplete(
                    f"{len(missing)} of the {len(series.get('expected') or ())} instances uploaded for this "
                    f"series have had no outcome (neither de-identified, quarantined nor rejected) for "
                    f"{_duration(self.settings.incomplete_after_s)}; the status of each uploaded instance "
                    "says where it stopped. The series is analysed when they arrive"
                )
            measures, qc, reasons, refs = await self._analyse_within_limit(
                tenant, study_key, analysis_id, instances, uploads=len(members)
            )
            data = AnalysisCompleted(**base, measures=measures, qc=qc, reports=refs)
            extra = {"reasons": reasons}
            topic, outcome = topics.ANALYSIS_COMPLETED, "completed"
        except AnalysisError as exc:
            if isinstance(exc, RepeatedFailure):
                event_id = None  # never under an id an earlier run may have published a result under
            data = AnalysisFailed(
                **base, reason_code=getattr(exc, "code", "analysis_error"), reason=exc.reason
            )
            topic, outcome = topics.ANALYSIS_FAILED, "failed"
        envelope = Envelope(
            id=event_id or new_event_id(),
            type=topics.event_type(topic),
            source="analysis",
            tenant=tenant,
            actor="service:analysis",
            correlation_id=series.get("correlation_id") or analysis_id,
            data={**data.model_dump(mode="json"), **extra},
        )
        decided = await self.assembly.decide(
            series,
            {
                "analysis_id": analysis_id,
                "event_id": envelope.id,
                "topic": topic,
                "outcome": outcome,
                "reason_code": getattr(data, "reason_code", None),
                # As JSON text: the keys of the measures and reasons are not field names to store.
                "envelope": envelope.model_dump_json(),
            },
        )
        if decided is None:
            log.info(
                "series changed, or was finished by another replica, while it was analysed; this run's outcome is not published",
                outcome_dropped=outcome,
                analysis_id=analysis_id,
            )
            return
        if decided["event_id"] == envelope.id and await self._members_changed(series, member_ids):
            return
        await self._publish(series, decided, again=decided["event_id"] != envelope.id)
        log.info(
            "series analysed",
            outcome=decided["outcome"],
            reason_code=decided.get("reason_code"),
            analysis_id=analysis_id,
            instances=len(members),
            awaiting=len(missing),
        )

    async def _analyse_within_limit(
        self,
        tenant: str,
        study_key: str,
        analysis_id: str,
        instances: list[list[dict[str, Any]]],
        *,
        uploads: int,
    ) -> tuple[dict[str, float | None], dict[str, Any], dict[str, str], list[ObjectRef]]:
        """Read the members, run the analyser and store its reports, all within
        ``ENCLAVE_ANALYSIS_MAX_ANALYSIS_S``. Past it the step under way is stopped (a worker running
        the analyser is killed, ``_run_analyser``) and the reports this run stored are deleted. Run out
        in the worker, ``AnalysisTimedOut`` is raised (the series' outcome); run out while the object
        store was read or written, ``ObjectStoreTooSlow`` (the store's slowness, not the series': tried
        again, ``attempt``). Only the limit's own expiry is either: a ``TimeoutError`` raised inside
        (the analyser's, a client's) is passed on as it is. Recording and publishing the outcome come
        after and are not bounded: the outbox makes them safe past the lease (``analyse``), and
        cutting them would turn an analysis that ended into one that timed out."""
        limit = self.settings.max_analysis_s
        stage = READING
        started = time.monotonic()
        analysing_from: float | None = None
        written: list[ObjectRef] = []
        bound = asyncio.timeout(limit)
        try:
            async with bound:
                # One copy per instance (an instance uploaded twice is two members but one slice), then
                # distinct SOP Instance UIDs count toward the minimum (the volume drops repeated ones).
                budget = ByteBudget(self.settings.max_series_bytes)
                datasets = [await self._load_instance(tenant, copies, budget) for copies in instances]
                distinct = len(
                    {str(ds.get("SOPInstanceUID", f"member-{i}")) for i, ds in enumerate(datasets)}
                )
                if distinct < self.settings.min_instances:
                    raise AnalysisError(
                        f"the series has {distinct} de-identified instance(s); a volume needs at least "
                        f"{self.settings.min_instances} slices of a T1-weighted brain acquisition"
                        + (
                            f" (instances uploaded more than once count once: {uploads} uploads)"
                            if distinct < uploads
                            else ""
                        )
                    )
                stage, analysing_from = ANALYSING, time.monotonic()
                measures, qc, reasons, reports = await self._run_analyser(datasets)
                stage = STORING
                for report in reports:
                    written.append(await self._store_report(tenant, study_key, analysis_id, *report))
        except TimeoutError:
            if not bound.expired():
                raise  # raised inside the analysis (the analyser's, a client's), not the limit
            slow_store = stage in OBJECT_STORE_STAGES
            log.error(
                "analysis ran past its time limit and was stopped",
                stage=stage,
                limit_s=limit,
                # How the limit was spent: a slow read leaves the worker less of it.
                reading_s=round((analysing_from or time.monotonic()) - started, 1),
                worker_killed=stage == ANALYSING and self._executor is not None,
                reports_stored=len(written),
                outcome="tried again (slow object store)" if slow_store else "failed (analysis_timed_out)",
            )
            await self._discard_reports(analysis_id, written)
            if slow_store:
                raise ObjectStoreTooSlow(
                    f"the object store answered too slowly: the analysis's time limit of {_duration(limit)} "
                    f"(ENCLAVE_ANALYSIS_MAX_ANALYSIS_S) ran out while {stage}; the series is analysed "
                    "again later, its attempt not counted"
                ) from None
            raise AnalysisTimedOut(
                f"the analysis of this series ran longer than {_duration(limit)} and was stopped while "
                f"{stage} (ENCLAVE_ANALYSIS_MAX_ANALYSIS_S, which bounds reading the members, the "
                "analysis and storing the reports); it is not tried again unless the series changes. "
                "The operators can re-run it (enclave-analysis-rerun --reason-code analysis_timed_out)"
            ) from None
        return measures, qc, reasons, written

    async def _discard_reports(self, analysis_id: str, written: list[ObjectRef]) -> None:
        """Delete the report versions a run stopped by its time limit stored: no outcome names them,
        and they are not the whole result. Waits at most ``DISCARD_TIMEOUT_S`` (the object store may
        be what stalled); what is left then, or a store that refuses, is logged, and the purge of the
        series' next completed analysis deletes it (``_purge_superseded_reports``). So is a report
        whose storing was under way at the limit and that lands later: a store's write in a thread
        cannot be called back."""
        versions = [(ref.key, ref.version_id) for ref in written if ref.version_id]
        if not versions or self.report_versions is None:
            return
        try:
            await asyncio.wait_for(
                self.report_versions.delete(written[0].bucket, versions), DISCARD_TIMEOUT_S
            )
        except Exception as exc:
            log.warning(
                "reports of an analysis stopped by its time limit could not be deleted; the next "
                "completed analysis of the series deletes them",
                analysis_id=analysis_id,
                versions=len(versions),
                exc_info=exc,
            )
            return
        log.info(
            "reports of an analysis stopped by its time limit deleted",
            analysis_id=analysis_id,
            versions=len(versions),
        )

    async def _members_changed(self, series: dict[str, Any], analysed: list[str]) -> bool:
        """Whether a member settled as de-identified since this run read them (the members collection
        is the source of truth) although the series document does not say it changed: then it is
        marked changed, and this run's outcome is not published. On MongoDB the change marks the
        document itself and ``decide`` refuses; FerretDB 1.x applies an update as a read and a write
        outside a transaction, and ``decide``'s write could undo the change a settling member made in
        between (the series would be finished with that member left out)."""
        now = sorted(m["_id"] for m in await self._deidentified_members(series["_id"]))
        if now == analysed:
            return False
        await self.assembly.mark_changed(series)
        log.info(
            "a member settled while the series was analysed; it is analysed again",
            analysed=len(analysed),
            members=len(now),
        )
        return True

    async def _publish(self, series: dict[str, Any], decided: dict[str, Any], *, again: bool) -> None:
        """Publish a claim's recorded outcome event (``SeriesAssembly.decide``), then finish the series."""
        envelope = Envelope.model_validate_json(decided["envelope"])
        await self.runtime.publisher.publish(decided["topic"], envelope, key=series["series_key"])
        self.outcomes.labels(decided["outcome"]).inc()
        await self._purge_superseded_reports(series, decided["analysis_id"], envelope)
        await self.assembly.finish(
            series, decided["analysis_id"], decided["outcome"], decided.get("reason_code")
        )
        if again:
            log.info(
                "series outcome recorded earlier published",
                outcome=decided["outcome"],
                analysis_id=decided["analysis_id"],
            )

    async def _purge_superseded_reports(
        self, series: dict[str, Any], analysis_id: str, envelope: Envelope
    ) -> None:
        """Delete the report versions a completed outcome, once published, supersedes: every version
        under its reports' prefix but its own (the same keys, written again when the same members are
        analysed again), and the reports of the series' previous analysis (other members). Done before
        the series is finished: a process that dies part-way publishes the recorded outcome again at
        the next claim and deletes the rest (``analyse``). An object store that refuses (no
        permission) leaves them, logged and counted; the series is finished all the same. A failed
        outcome deletes nothing (the last result stays the one there is), nor does a bucket without
        versioning (no version ids to keep)."""
        if envelope.type != topics.event_type(topics.ANALYSIS_COMPLETED) or self.report_versions is None:
            return
        reports = envelope.data.get("reports") or []
        if not reports or any(not r.get("version_id") for r in reports):
            return
        keep = {r["key"]: r["version_id"] for r in reports}
        bucket = reports[0]["bucket"]
        previous = series.get("analysis_id")
        stale: list[tuple[str, str]] = []
        try:
            # Under this analysis's prefix only versions older than the one kept of the same key go
            # (a listing gives each key's newest version first): a replica that stalled here while
            # another analysed the same members again and published newer reports deletes none of
            # them (the review of the eighteenth session), and a key whose kept version is already
            # gone is left alone.
            stale += _older_than_kept(
                await self.report_versions.versions(bucket, f"reports/{analysis_id}/"), keep
            )
            if isinstance(previous, str) and previous and previous != analysis_id:
                stale += await self.report_versions.versions(bucket, f"reports/{previous}/")
            if stale and await self.assembly.held(series) is None:
                return  # taken over meanwhile: the replica that holds the series decides
            if stale:
                await self.report_versions.delete(bucket, stale)
        except PermanentError as exc:  # no permission to list or delete versions: they stay
            self.superseded_reports.labels("kept").inc(len(stale))
            log.error(
                "superseded report versions could not be deleted; they stay in the results bucket",
                analysis_id=analysis_id,
                versions=len(stale),
                code=exc.code,
            )
            return
        if not stale:
            return
        self.superseded_reports.labels("deleted").inc(len(stale))
        log.info("superseded report versions deleted", analysis_id=analysis_id, versions=len(stale))

    async def _run_analyser(
        self, datasets: list[pydicom.Dataset]
    ) -> tuple[dict[str, float | None], dict[str, Any], dict[str, str], list[tuple[str, str, bytes]]]:
        if self._executor is None:
            return await asyncio.to_thread(self.analyser, datasets)
        # What ITK and ANTs print to stderr in the worker stays out of the service's log (native_stderr).
        captured = functools.partial(run_capturing_native_stderr, self.analyser)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, captured, datasets)
        except asyncio.CancelledError:
            # The service stops, or the analysis ran past its time limit (``_analyse_within_limit``;
            # a native decoder that does not return, say): ANTs would run on to the end of the
            # analysis in the worker, for minutes, orphaned once the service exits, its result waited
            # for by nobody. The worker is killed, not waited for.
            _kill_workers(self._executor)
            assert self._executor_factory is not None
            self._executor = self._executor_factory()  # its process starts with the next analysis
            raise
        except BrokenProcessPool:
            # The worker died (killed for memory, say): a new one for the next analysis; this attempt
            # counts as an unexpected failure (``attempt``).
            log.error("analysis worker process died; starting a new one")
            self._executor.shutdown(wait=False, cancel_futures=True)
            assert self._executor_factory is not None
            self._executor = self._executor_factory()
            raise

    def warm_up(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (imports, template loading) where the analyser runs, ahead of the first series."""
        if self._executor is not None:
            self._executor.submit(fn)

    def shutdown(self) -> None:
        """Stop the worker process now, busy or not (an analysis was stopped and released, or the
        warm-up is still loading templates)."""
        if self._executor is not None:
            _kill_workers(self._executor)

    async def _load_instance(
        self, tenant: str, copies: list[dict[str, Any]], budget: ByteBudget
    ) -> pydicom.Dataset:
        """An instance from the copy its most recent outcome names, or, when that copy is gone, from
        the next most recent one that is there (an outcome can be read before the one that replaced
        its copy, ``enclave-deid-redo``, arrives). Each copy is tried once; none there: the first
        copy's error (an unexpected failure: the attempt is counted)."""
        tried: set[tuple[str | None, str | None, str | None]] = set()
        first: PermanentError | None = None
        for member in copies:
            ref = member.get("object") or {}
            at = (ref.get("bucket"), ref.get("key"), ref.get("version_id"))
            if at in tried:
                continue
            tried.add(at)
            try:
                return await self._load(tenant, member, budget)
            except PermanentError as exc:
                if exc.code not in MISSING_OBJECT:
                    raise
                first = first or exc
                log.warning(
                    "a member's copy is not in the object store; trying an older outcome's", code=exc.code
                )
        assert first is not None
        raise first

    async def _load(self, tenant: str, member: dict[str, Any], budget: ByteBudget) -> pydicom.Dataset:
        """One member, read and parsed in a thread (not in the event loop: a large or deflated one
        took seconds), its bytes (inflated, for a deflated one) counted against the series' ``budget``."""
        assert self.kek is not None
        ref = ObjectRef(**member["object"])
        blob = await self.store.read(ref.bucket, ref.key, ref.version_id)
        plain = await asyncio.to_thread(
            decrypt_bytes, blob, ObjectIdentity(tenant, member["study_key"], ref.key), self.kek
        )
        del blob
        self.runtime.count_crypto("decrypt")
        return await asyncio.to_thread(read_member, plain, budget)

    async def _store_report(
        self, tenant: str, study_key: str, analysis_id: str, name: str, media_type: str, body: bytes
    ) -> ObjectRef:
        assert self.kek is not None
        key = f"reports/{analysis_id}/{name}"
        identity = ObjectIdentity(tenant, study_key, key)
        dek, wrapped = self.kek.generate_data_key(identity.key_context())
        ciphertext = await asyncio.to_thread(encrypt_bytes, body, dek, wrapped, identity)
        self.runtime.count_crypto("encrypt")
        stored = await self.store.put(
            self.settings.results_bucket, key, io.BytesIO(ciphertext), metadata={"media-type": media_type}
        )
        return ObjectRef(bucket=stored.bucket, key=key, version_id=stored.version_id)


class ByteBudget:
    """What is left of the bytes a series' members may hold (``ENCLAVE_ANALYSIS_MAX_SERIES_BYTES``):
    every member is held in memory at once, in the service and again in the worker."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.remaining = limit

    def take(self, size: int) -> None:
        if size > self.remaining:
            raise SeriesTooLargeError(
                f"the de-identified instances of this series hold more than {_mib(self.limit)} (a deflated "
                f"instance counted inflated); at most {_mib(self.limit)} per series are analysed "
                "(ENCLAVE_ANALYSIS_MAX_SERIES_BYTES)"
            )
        self.remaining -= size


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB"


def member_size(plain: bytes, bound: int) -> int:
    """The bytes ``plain`` (a DICOM file) holds once read: its length, or for a deflated one its
    length inflated (pydicom inflates it whole), counted in 1 MiB pieces that are dropped, and only
    up to just past ``bound``."""
    fp = io.BytesIO(plain)
    try:
        read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
    except Exception:  # not a file pydicom reads: dcmread says so
        return len(plain)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return len(plain)
    start = fp.tell()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size, pending = start, plain[start:]
    try:
        while size <= bound and not inflater.eof:
            piece = inflater.decompress(pending, 2**20)
            size += len(piece)
            pending = inflater.unconsumed_tail
            if not piece and not pending:  # truncated: dcmread fails on it
                break
    except zlib.error:  # dcmread fails on it too
        return len(plain)
    return size


def read_member(plain: bytes, budget: ByteBudget) -> pydicom.Dataset:
    """Parse one member once its size fits the series' ``budget``. The dataset does not keep the
    bytes it was read from (pydicom's ``buffer``): it held each member twice, and both were pickled
    to the worker."""
    budget.take(member_size(plain, budget.remaining))
    dataset = pydicom.dcmread(io.BytesIO(plain))
    dataset.buffer = None
    return dataset


def _kill_workers(executor: Executor) -> None:
    """Shut ``executor`` down and kill its worker processes (SIGKILL: nothing in an analysis that
    did not finish is worth keeping; the next worker removes its temporary files, ``workdir``).
    ``ProcessPoolExecutor`` has no public way to do it before Python 3.14 (``kill_workers``)."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    if isinstance(executor, ProcessPoolExecutor):
        for process in processes:
            process.kill()


def _recorded(series: dict[str, Any], analysis_id: str) -> dict[str, Any] | None:
    """The outcome event a claim recorded (``SeriesAssembly.decide``) when it is for ``analysis_id``
    (the series' members now), else None."""
    pending = series.get("pending_event") or {}
    return dict(pending) if pending.get("analysis_id") == analysis_id and pending.get("envelope") else None


def _older_than_kept(listed: list[tuple[str, str]], keep: dict[str, str]) -> list[tuple[str, str]]:
    """The versions of ``listed`` (each key's newest first) that are older than the version ``keep``
    names for their key, and every version of a key ``keep`` does not name; none of a key whose kept
    version is not listed."""
    stale: list[tuple[str, str]] = []
    seen_kept: set[str] = set()
    for key, version in listed:
        if key not in keep:
            stale.append((key, version))
        elif version == keep[key]:
            seen_kept.add(key)
        elif key in seen_kept:
            stale.append((key, version))
    return stale
