"""The gateway's read model (CQRS): status and results built by consuming events into its own
database. Status only moves forward (received < stored < de-identified < analysed); ``failed`` and
``quarantined`` are terminal.

Every event is one update by ``_id`` whose result does not depend on how often or in what order
events are applied:

- the status is a rank kept with ``$max`` (it never moves back), and the status is read from it;
- each status's own fields (``duplicate``, ``profile``, ``reason``...) are ``$set`` with the values
  of the event that carries them, whatever order the events came in;
- ``updated_at`` is the latest event time (``$max``), not the time of handling;
- the instance's analysis is a last-writer-wins register ordered by the analysis event's id (a
  UUIDv7 the analysis service draws when it claims a member set and keeps when it publishes again):
  ``latest_analysis = "<event id>|<analysis id>|<outcome>[|<reason code>]"`` under ``$max``, so the
  status route tells whether the series' latest analysis completed or failed (and why) without
  another read;
- an analysis is replaced by its id, with its event's time.

So the consumer runs without the event-id guard (``IdempotentByBusinessKey``): a redelivered event is
applied again and changes nothing, in one database command per event instead of four (the guard's
check and mark, a read and a write). On MongoDB each such update is atomic, so two replicas
consuming at once end in the same document too. FerretDB 1.x (the local stack) applies an update as
a read and a write outside a transaction (FerretDB issue #3040): two writers of one document at the
same moment can lose one write there; the local stack runs one gateway, whose consumer applies one
event at a time. A filter on anything but ``_id`` would make FerretDB (SQLite) scan the whole
collection: no write here needs one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pymongo
import structlog
from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_common.events import (
    AnalysisCompleted,
    AnalysisFailed,
    InstanceDeidentified,
    InstanceQuarantined,
    InstanceRejected,
    InstanceStored,
)
from enclave_common.pseudonyms import InstanceKeys
from pymongo import ASCENDING
from pymongo.errors import BulkWriteError, DuplicateKeyError

log = structlog.get_logger("enclave.gateway")

DUPLICATE_KEY = 11000


def _upload_fields(
    tenant: str, upload_id: str, keys: InstanceKeys, sop_class_uid: str, now: datetime
) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "upload_id": upload_id,
        "patient_key": keys.patient_key,
        "study_key": keys.study_key,
        "series_key": keys.series_key,
        "instance_key": keys.instance_key,
        "sop_class_uid": sop_class_uid,
        "received_at": now,
    }


RANK = {"received": 0, "stored": 1, "deidentified": 2, "analysed": 3, "failed": 9, "quarantined": 9}
#: The terminal rank; which terminal status it is, is kept in ``terminal``.
TERMINAL_RANK = 9
_STATUS_OF_RANK = {rank: status for status, rank in RANK.items() if rank < TERMINAL_RANK}


def status_of(doc: dict[str, Any]) -> str:
    """The status of a read-model document (from its rank; documents written before the rank was
    the source of truth also carry ``status``)."""
    rank = doc.get("rank", 0)
    if rank >= TERMINAL_RANK:
        return str(doc.get("terminal") or doc.get("status") or "failed")
    return _STATUS_OF_RANK.get(rank, str(doc.get("status", "received")))


@dataclass(frozen=True, slots=True)
class LatestAnalysis:
    """The latest analysis (by its event's id) that covered an instance, as its document keeps it."""

    analysis_id: str
    #: ``completed`` or ``failed``; None in documents written before the outcome was kept with the id.
    outcome: str | None = None
    #: Why it failed (docs/analysis.md § Failure reasons); None when it completed.
    reason_code: str | None = None


def latest_analysis_of(doc: dict[str, Any]) -> LatestAnalysis | None:
    latest = doc.get("latest_analysis")
    if isinstance(latest, str) and "|" in latest:
        _, analysis_id, *rest = latest.split("|", 3)
        return LatestAnalysis(analysis_id, *rest)
    legacy = doc.get("analysis_id")
    return LatestAnalysis(str(legacy)) if legacy else None


def analysis_id_of(doc: dict[str, Any]) -> str | None:
    """The id of the latest analysis (by its event's id) that covered the instance."""
    latest = latest_analysis_of(doc)
    return latest.analysis_id if latest else None


def _register(order: str, *values: str) -> str:
    """``values`` ordered under ``$max`` by ``order`` (a UUIDv7 event id: fixed width, time first)."""
    return "|".join((order, *values))


class GroupedInserts:
    """Inserts of concurrent requests written together (group commit): while one ``insert_many`` is
    in flight, the documents that arrive wait and go in the next one. A request waits at most one
    round trip longer; the database gets one command per round trip instead of one per request.
    Measured on FerretDB (SQLite): ~1.7 ms of its CPU per insert command and ~0.1 ms per document.
    """

    def __init__(self, collection: Any, *, timeout_s: float | None = None) -> None:
        """``timeout_s``: how long each ``insert_many`` may take, server selection included (pymongo's
        client-side operation timeout); past it every request of the group fails as a database that
        did not answer. None: pymongo's own bounds (about 30 s for a silent database)."""
        self._collection = collection
        self._timeout_s = timeout_s
        self._queue: list[tuple[list[dict[str, Any]], asyncio.Future[list[int]]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def insert(self, docs: list[dict[str, Any]]) -> list[int]:
        """Insert ``docs``; returns the indexes (into ``docs``) whose ``_id`` already existed.
        Raises what the database raised for any of them (the others of the group are unaffected)."""
        done: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._queue.append((docs, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return await done

    async def _write(self) -> None:
        while self._queue:
            group, self._queue = self._queue, []
            failure: BulkWriteError | None = None
            try:
                with pymongo.timeout(self._timeout_s):
                    await self._collection.insert_many([d for docs, _ in group for d in docs], ordered=False)
            except BulkWriteError as exc:
                failure = exc
            except Exception as exc:
                # The database is unreachable: every request of the group fails, and so does every
                # request that queued meanwhile, instead of waiting one more time limit for its own
                # round trip (a silent database answered the second group after twice the limit).
                group, self._queue = group + self._queue, []
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            errors = failure.details.get("writeErrors", []) if failure is not None else []
            codes = {error["index"]: error.get("code") for error in errors}
            start = 0
            for docs, done in group:
                mine = {i - start: codes[i] for i in range(start, start + len(docs)) if i in codes}
                start += len(docs)
                if done.done():
                    continue  # the request is gone (client disconnected)
                if failure is not None and any(code != DUPLICATE_KEY for code in mine.values()):
                    done.set_exception(failure)
                else:
                    done.set_result(sorted(mine))


class ReadModel:
    def __init__(
        self, db: Any, *, read_timeout_s: float | None = None, write_timeout_s: float | None = None
    ) -> None:
        """``read_timeout_s``: how long each read a route makes (:meth:`get`, :meth:`for_patient`,
        :meth:`analyses_of`, :meth:`analysis`) may take in all, server selection included (pymongo's
        client-side operation timeout, which also sends the server ``maxTimeMS``); past it the read
        fails as a database that did not answer (503). ``write_timeout_s``: the same for the writes
        of an upload's records (:meth:`record_uploads`). None: pymongo's own bounds only (a silent
        database took about 30 s, the monitor's cycle). The consumers' writes keep those."""
        self.instances = db["instances"]
        self.analyses = db["analyses"]
        self._inserts = GroupedInserts(self.instances, timeout_s=write_timeout_s)
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s

    async def ensure_indexes(self) -> None:
        await self.instances.create_index([("tenant", ASCENDING), ("patient_key", ASCENDING)])
        await self.instances.create_index([("tenant", ASCENDING), ("series_key", ASCENDING)])
        # One upload's instances (GET /api/v1/uploads/{upload_id}).
        await self.instances.create_index([("tenant", ASCENDING), ("upload_id", ASCENDING)])
        await self.analyses.create_index([("tenant", ASCENDING), ("_id", ASCENDING)])

    async def record_uploads(
        self, tenant: str, upload_id: str, instances: list[tuple[str, InstanceKeys, str]]
    ) -> None:
        """Record the instances of an upload as received: ``(instance_upload_id, keys, sop_class_uid)``.

        An insert, not an upsert (the ids are new; FerretDB's upsert costs several times an insert),
        grouped with the inserts of concurrent requests (:class:`GroupedInserts`). An event that
        overtook the upload may already have created a record: that one keeps its status and gets
        the upload's fields.
        """
        if not instances:
            return
        now = datetime.now(UTC)
        docs = [
            {"_id": instance_upload_id, "rank": 0, "created_at": now}
            | _upload_fields(tenant, upload_id, keys, sop_class_uid, now)
            for instance_upload_id, keys, sop_class_uid in instances
        ]
        for index in await self._inserts.insert(docs):
            instance_upload_id, keys, sop_class_uid = instances[index]
            with pymongo.timeout(self.write_timeout_s):
                await self.instances.update_one(
                    {"_id": instance_upload_id},
                    {"$set": _upload_fields(tenant, upload_id, keys, sop_class_uid, now)},
                )

    async def advance(
        self,
        instance_upload_id: str,
        tenant: str,
        status: str,
        fields: dict[str, Any],
        at: datetime,
        *,
        maxed: dict[str, Any] | None = None,
    ) -> None:
        """Apply an event that moves an instance to ``status`` (at event time ``at``): one upsert by
        ``_id``. The rank and ``updated_at`` only grow (``$max``), so an event that arrives after a
        later one, or again, leaves the status where it is; its own ``fields`` are written with the
        same values each time."""
        rank = RANK[status]
        values = {"tenant": tenant, **fields}
        if rank >= TERMINAL_RANK:
            values["terminal"] = status
        await self._upsert(
            instance_upload_id, {"$max": {"rank": rank, "updated_at": at, **(maxed or {})}, "$set": values}
        )

    async def _upsert(self, instance_upload_id: str, update: dict[str, Any]) -> None:
        try:
            await self.instances.update_one({"_id": instance_upload_id}, update, upsert=True)
        except DuplicateKeyError:
            # The upload path inserted the document while this upsert created it: apply it again.
            await self.instances.update_one({"_id": instance_upload_id}, update, upsert=True)

    async def get(self, instance_upload_id: str) -> dict[str, Any] | None:
        with pymongo.timeout(self.read_timeout_s):
            doc: dict[str, Any] | None = await self.instances.find_one({"_id": instance_upload_id})
        return doc

    async def for_patient(
        self, tenant: str, patient_key: str, limit: int, after: str | None = None
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` instances of the patient in upload order (by imaging id, a UUIDv7: time
        first), those after the imaging id ``after`` when given. The (tenant, patient_key) index finds
        them; their sort by ``_id`` is in memory (one patient's instances: thousands at most). No index
        with ``_id`` was added: every index costs each upload's read-model insert."""
        with pymongo.timeout(self.read_timeout_s):
            return await _page_by_id(
                self.instances, {"tenant": tenant, "patient_key": patient_key}, limit, after
            )

    async def upload_statuses(self, tenant: str, upload_id: str) -> list[dict[str, Any]]:
        """The status fields of every instance of one upload of ``tenant`` (``_id``, ``rank``,
        ``terminal``, ``status``: a few dozen bytes each), found by the (tenant, upload_id) index. All
        of them, to count their statuses: an upload holds at most ``max_parts`` instances (10,000 by
        default)."""
        with pymongo.timeout(self.read_timeout_s):
            cursor = self.instances.find(
                {"tenant": tenant, "upload_id": upload_id}, {"rank": 1, "terminal": 1, "status": 1}
            )
            return [doc async for doc in cursor]

    async def upload_page(
        self, tenant: str, upload_id: str, limit: int, after: str | None = None
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` instances of one upload of ``tenant`` in imaging id order, those after the
        imaging id ``after`` when given, without the patient's and the instance's keys."""
        with pymongo.timeout(self.read_timeout_s):
            return await _page_by_id(
                self.instances, {"tenant": tenant, "upload_id": upload_id}, limit, after, projection=_NO_KEYS
            )

    async def analyses_of(self, tenant: str, limit: int, after: str | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` analyses of the tenant by analysis id (a digest: a stable order to page in,
        not a time order), those after ``after`` when given; the (tenant, _id) index finds them."""
        with pymongo.timeout(self.read_timeout_s):
            return await _page_by_id(self.analyses, {"tenant": tenant}, limit, after)

    async def analysis(self, analysis_id: str) -> dict[str, Any] | None:
        with pymongo.timeout(self.read_timeout_s):
            doc: dict[str, Any] | None = await self.analyses.find_one({"_id": analysis_id})
        return doc

    # ---- event handlers ---------------------------------------------------------------------

    async def on_event(self, envelope: Envelope) -> None:
        kind = envelope.type
        if kind == topics.event_type(topics.INSTANCE_STORED):
            stored = envelope.payload(InstanceStored)
            await self.advance(
                stored.instance_upload_id,
                envelope.tenant,
                "stored",
                {
                    "duplicate": stored.duplicate,
                    "patient_key": stored.patient_key,
                    "series_key": stored.series_key,
                    "study_key": stored.study_key,
                },
                envelope.time,
            )
        elif kind == topics.event_type(topics.INSTANCE_REJECTED):
            rejected = envelope.payload(InstanceRejected)
            await self.advance(
                rejected.instance_upload_id,
                envelope.tenant,
                "failed",
                {"reason_code": rejected.reason_code, "reason": rejected.reason},
                envelope.time,
            )
        elif kind == topics.event_type(topics.INSTANCE_DEIDENTIFIED):
            deid = envelope.payload(InstanceDeidentified)
            await self.advance(
                deid.instance_upload_id,
                envelope.tenant,
                "deidentified",
                {"profile": deid.profile},
                envelope.time,
            )
        elif kind == topics.event_type(topics.INSTANCE_QUARANTINED):
            quarantined = envelope.payload(InstanceQuarantined)
            await self.advance(
                quarantined.instance_upload_id,
                envelope.tenant,
                "quarantined",
                {"reason_code": quarantined.reason_code, "reason": quarantined.reason},
                envelope.time,
            )
        elif kind == topics.event_type(topics.ANALYSIS_COMPLETED):
            done = envelope.payload(AnalysisCompleted)
            await self._store_analysis(
                envelope,
                done.analysis_id,
                done.series_key,
                "completed",
                {
                    "measures": done.measures,
                    "qc": done.qc,
                    "reports": [r.model_dump() for r in done.reports],
                    "reasons": envelope.data.get("reasons", {}),
                },
            )
            latest = _register(envelope.id, done.analysis_id, "completed")
            for iuid in done.instance_upload_ids:
                await self.advance(
                    iuid, envelope.tenant, "analysed", {}, envelope.time, maxed={"latest_analysis": latest}
                )
        elif kind == topics.event_type(topics.ANALYSIS_FAILED):
            failed = envelope.payload(AnalysisFailed)
            await self._store_analysis(
                envelope,
                failed.analysis_id,
                failed.series_key,
                "failed",
                {
                    "reason_code": failed.reason_code,
                    "reason": failed.reason,
                },
            )
            latest = _register(envelope.id, failed.analysis_id, "failed", failed.reason_code)
            for iuid in failed.instance_upload_ids:  # by _id: FerretDB scans for ``$in``
                # Upserted: the outcome may arrive before the instance's other events.
                await self._upsert(
                    iuid, {"$max": {"latest_analysis": latest}, "$set": {"tenant": envelope.tenant}}
                )

    async def _store_analysis(
        self, envelope: Envelope, analysis_id: str, series_key: str, status: str, fields: dict[str, Any]
    ) -> None:
        """The analysis's outcome, unless a later one of the same analysis id is recorded: a series
        analysed again under its id (``enclave-analysis-rerun``, or after ``enclave-deid-redo``) has
        a new outcome, and the earlier event delivered again must not bring back its measures. The
        analysis service publishes only its current outcome, so a later event time is a later
        outcome; an earlier one finds the filter unmatched and its upsert a duplicate ``_id``."""
        try:
            await self.analyses.replace_one(
                {"_id": analysis_id, "recorded_at": {"$lte": envelope.time}},
                {
                    "_id": analysis_id,
                    "tenant": envelope.tenant,
                    "series_key": series_key,
                    "status": status,
                    "recorded_at": envelope.time,  # the event's, not now: redelivering it writes the same
                    **fields,
                },
                upsert=True,
            )
        except DuplicateKeyError:
            log.info("an earlier outcome of an analysis delivered again; the later one is kept")


#: What a status view does not need: the patient's and the instance's keys.
_NO_KEYS = {"patient_key": 0, "instance_key": 0}


async def _page_by_id(
    collection: Any,
    query: dict[str, Any],
    limit: int,
    after: str | None,
    projection: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Up to ``limit`` documents matching ``query`` in ``_id`` order, those after ``after`` when given."""
    if after is not None:
        query = {**query, "_id": {"$gt": after}}
    cursor = collection.find(query, projection).sort("_id", ASCENDING).limit(limit)
    return [doc async for doc in cursor]


READ_MODEL_TOPICS = (
    topics.INSTANCE_STORED,
    topics.INSTANCE_REJECTED,
    topics.INSTANCE_DEIDENTIFIED,
    topics.INSTANCE_QUARANTINED,
    topics.ANALYSIS_COMPLETED,
    topics.ANALYSIS_FAILED,
)
