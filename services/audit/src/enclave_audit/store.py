"""The audit database (MongoDB, db ``audit``): records, checkpoint index, raised alerts.

Append-only by construction: this module has inserts and finds, no update and no delete.

- ``records``: one document per audited message. ``_id`` is the *audit key* (the event id, or for
  a dead-lettered copy ``dlq:<topic>:<event id>:<code>``), so MongoDB's own ``_id`` index makes a
  redelivery a no-op; a unique index on ``sequence`` makes two writers unable to take the same
  position (the loser re-reads the head and retries). Times are BSON dates (range queries); every
  other field is the record's JSON form, so the record hash is recomputed from the document.
- ``checkpoints``: ``_id`` = first sequence (unique), the signed document as stored in WORM.
- ``alerts``: ``_id`` = the alert's event id; answers "was this rule raised recently".

Works on FerretDB v1 (no transactions, ``$lookup``, TTL, nor matching whole sub-documents or
``$elemMatch`` on sub-fields in arrays): participant objects are filtered by the dotted path
``objects.object_id`` and the exact ``(kind, id)`` pair is re-checked in Python.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import pymongo
from enclave_common.envelope import canonical_request_id
from enclave_common.errors import TransientError
from pydantic import TypeAdapter
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError, ExecutionTimeout

from enclave_audit.anomaly import AlertDraft
from enclave_audit.chain import GENESIS, ChainHead, chain_record
from enclave_audit.checkpoints import Checkpoint
from enclave_audit.codes import ObjectKind
from enclave_audit.records import AuditRecord, AuditRecordDraft, UtcMillis

RECORDS: Final = "records"
CHECKPOINTS: Final = "checkpoints"
ALERTS: Final = "alerts"
_TIME_FIELDS: Final = ("event_time", "recorded_at")
_TIME_JSON: Final = TypeAdapter(UtcMillis)
#: Appends that lose the race for a sequence to another writer before giving up (transient).
MAX_SEQUENCE_CONFLICTS: Final = 50
READ_BATCH: Final = 1000

#: Indexes that keep every auditor filter and the anomaly rules on an index (MongoDB); each ends
#: in ``sequence`` so a cursor page is an index range.
RECORD_INDEXES: Final[tuple[tuple[str, list[tuple[str, int]], bool], ...]] = (
    ("sequence_unique", [("sequence", ASCENDING)], True),
    ("actor_seq", [("actor", ASCENDING), ("sequence", DESCENDING)], False),
    ("tenant_seq", [("tenant", ASCENDING), ("sequence", DESCENDING)], False),
    ("object_ids_seq", [("objects.object_id", ASCENDING), ("sequence", DESCENDING)], False),
    ("correlation_seq", [("correlation_id", ASCENDING), ("sequence", DESCENDING)], False),
    ("event_id", [("event_id", ASCENDING)], False),
    ("action_outcome_seq", [("action", ASCENDING), ("outcome", ASCENDING), ("sequence", DESCENDING)], False),
    ("event_time", [("event_time", ASCENDING)], False),
    ("actor_type_time", [("actor", ASCENDING), ("event_type", ASCENDING), ("event_time", ASCENDING)], False),
    ("code_time", [("event_code.code", ASCENDING), ("event_time", ASCENDING)], False),
    # The event_code and event_type_code filters (GET /audit/events), in sequence order.
    ("code_seq", [("event_code.code", ASCENDING), ("sequence", DESCENDING)], False),
    ("type_code_seq", [("event_type_codes.code", ASCENDING), ("sequence", DESCENDING)], False),
)
#: Every index the service needs, as (collection, name, keys, unique).
INDEXES: Final[tuple[tuple[str, str, list[tuple[str, int]], bool], ...]] = (
    *((RECORDS, name, keys, unique) for name, keys, unique in RECORD_INDEXES),
    (
        ALERTS,
        "rule_1_subject_1_at_-1",
        [("rule", ASCENDING), ("subject", ASCENDING), ("at", DESCENDING)],
        False,
    ),
    (CHECKPOINTS, "last_sequence", [("last_sequence", ASCENDING)], False),
)


def to_document(record: AuditRecord, audit_key: str) -> dict[str, Any]:
    """The stored form: the record's JSON, times as BSON dates, under its audit key."""
    document = record.model_dump(mode="json")
    for name in _TIME_FIELDS:
        document[name] = getattr(record, name)
    return {"_id": audit_key, **document}


def json_form(document: Mapping[str, Any]) -> dict[str, Any]:
    """A stored document back in the JSON form its hash was computed over (for verification)."""
    out = {k: v for k, v in document.items() if k != "_id"}
    for name in _TIME_FIELDS:
        value = out.get(name)
        if isinstance(value, datetime):
            out[name] = _TIME_JSON.dump_python(value, mode="json")
    return out


def from_document(document: Mapping[str, Any]) -> AuditRecord:
    return AuditRecord.model_validate(json_form(document))


# --- auditor queries -------------------------------------------------------------------------

Order = Literal["asc", "desc"]


@dataclass(frozen=True)
class EventQuery:
    """Filters of ``GET /audit/events``; ``tenant`` is set by the API from the caller's token."""

    tenant: str | None = None
    actor: str | None = None
    patient: str | None = None
    study: str | None = None
    action: str | None = None
    outcome: int | None = None
    event_type: str | None = None
    #: The record's EventID code (``event_code.code``: ``110113``...).
    event_code: str | None = None
    #: One of the record's EventTypeCodes (``110137`` a change of access, ``110127`` break-glass...).
    event_type_code: str | None = None
    correlation_id: str | None = None
    event_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    order: Order = "asc"
    after_sequence: int | None = None

    def mongo_filter(self) -> dict[str, Any]:
        """The MongoDB filter (participant objects by ``objects.object_id``; see :meth:`matches`)."""
        query: dict[str, Any] = {}
        for name in ("tenant", "actor", "action", "outcome", "event_type", "correlation_id", "event_id"):
            value = getattr(self, name)
            if value is not None:
                query[name] = value
        canonical = canonical_request_id(self.correlation_id)
        if self.correlation_id is not None and canonical not in (None, self.correlation_id):
            # A request id as the client sent it (upper case, nginx's 32 hex digits) finds the record,
            # which holds its canonical form, and a record stored as sent before (the sixteenth session).
            query["correlation_id"] = {"$in": [self.correlation_id, canonical]}
        if self.event_code is not None:
            query["event_code.code"] = self.event_code
        if self.event_type_code is not None:
            # A dotted path into the array of codes: FerretDB v1 matches it (not $elemMatch).
            query["event_type_codes.code"] = self.event_type_code
        object_ids = [v for v in (self.patient, self.study) if v is not None]
        if object_ids:
            # Dotted paths, not whole sub-documents: FerretDB v1 matches neither those nor $elemMatch
            # on sub-fields. Pseudonyms differ per kind, and matches() re-checks the exact pair.
            query["objects.object_id"] = object_ids[0] if len(object_ids) == 1 else {"$all": object_ids}
        times: dict[str, datetime] = {}
        if self.since is not None:
            times["$gte"] = self.since
        if self.until is not None:
            times["$lt"] = self.until
        if times:
            query["event_time"] = times
        if self.after_sequence is not None:
            query["sequence"] = {"$gt" if self.order == "asc" else "$lt": self.after_sequence}
        return query

    def matches(self, record: AuditRecord) -> bool:
        """The exact checks of the filters on nested fields (the object filters' (kind, id) pairs, the
        codes), after the database's dotted-path match."""
        wanted = [(ObjectKind.PATIENT, self.patient), (ObjectKind.STUDY, self.study)]
        return (
            all(v is None or v in record.object_ids(kind) for kind, v in wanted)
            and self.event_code in (None, record.event_code.code)
            and (
                self.event_type_code is None
                or any(c.code == self.event_type_code for c in record.event_type_codes)
            )
        )


class CursorError(ValueError):
    """A pagination cursor that this service did not issue (or for another sort order).

    Its message never quotes the text decoded from the cursor: an auditor may paste anything there.
    """


#: The largest sequence number a query may name: the database stores 64-bit signed integers.
MAX_SEQUENCE: Final = 2**63 - 1
#: Unpadded base64url (RFC 4648 section 5) of at most 64 characters: an issued cursor is 50 at most.
_CURSOR_TEXT: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CURSOR_RULE: Final = (
    "a cursor is the next_cursor of the previous page, passed unchanged with the same order "
    f"(unpadded base64url naming a sequence number 1..{MAX_SEQUENCE} and the order asc or desc); "
    "omit it to start from the first page"
)


def encode_cursor(sequence: int, order: Order) -> str:
    raw = json.dumps({"s": sequence, "o": order}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, order: Order) -> int:
    """The sequence after which the next page starts, from a cursor :func:`encode_cursor` made."""
    not_issued = CursorError(f"the cursor is not one this API issued: {_CURSOR_RULE}")
    if not _CURSOR_TEXT.fullmatch(cursor):
        raise not_issued
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        raise not_issued from None
    if not isinstance(value, dict) or value.keys() != {"s", "o"}:
        raise not_issued
    sequence, cursor_order = value["s"], value["o"]
    # type(), not isinstance(): JSON true is a Python bool, which is an int.
    if type(sequence) is not int or not 1 <= sequence <= MAX_SEQUENCE or cursor_order not in ("asc", "desc"):
        raise not_issued
    if cursor_order != order:
        raise CursorError(
            f"the cursor was issued for order={cursor_order}: repeat the query with order={cursor_order}, "
            "or omit the cursor to start from the first page"
        )
    return sequence


# --- the store -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppendOutcome:
    """The record at the audit key, and whether this call stored it (False: a redelivery)."""

    record: AuditRecord
    stored: bool


@dataclass
class CheckpointEntry:
    """A checkpoint as indexed in the database, with where its WORM copy lives."""

    checkpoint: Checkpoint
    object_key: str
    version_id: str | None
    raw: bytes = field(repr=False, default=b"")


class QueryTimeout(TransientError):
    """An auditor's query the database did not finish within ``ENCLAVE_AUDIT_QUERY_TIMEOUT_S``."""

    code = "query_timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"the query did not finish within {timeout_s:g} s (ENCLAVE_AUDIT_QUERY_TIMEOUT_S): narrow it "
            "(since/until, patient, study, actor, correlation_id, event_type) or retry later"
        )


class AuditStore:
    """Async access to the audit database; the only writer of the hash chain in this process."""

    def __init__(self, database: Any) -> None:
        self.db = database
        self.records = database[RECORDS]
        self.checkpoints = database[CHECKPOINTS]
        self.alerts = database[ALERTS]
        self._lock = asyncio.Lock()
        self._head: ChainHead | None = None

    async def ensure_indexes(self) -> None:
        """Create the indexes (the migration's job: needs ``createIndex``, which the service's own
        role does not hold in production; see ``enclave-audit-migrate``)."""
        for collection, name, keys, unique in INDEXES:
            await self.db[collection].create_index(keys, name=name, unique=unique)

    async def missing_indexes(self) -> list[str]:
        """``collection.name`` of every index the queries need that the database lacks, or holds
        under that name with other keys or without ``unique`` (reads only: ``listIndexes``, which the
        append-only role holds)."""
        present: dict[str, dict[str, tuple[list[tuple[str, int]], bool]]] = {}
        for collection in sorted({c for c, *_ in INDEXES}):
            present[collection] = {
                index["name"]: ([(k, int(v)) for k, v in index["key"].items()], bool(index.get("unique")))
                async for index in await self.db[collection].list_indexes()
            }
        return [
            f"{c}.{name}"
            for c, name, keys, unique in INDEXES
            if present[c].get(name) != ([(k, int(v)) for k, v in keys], unique)
        ]

    async def read_head(self) -> ChainHead:
        """The last stored record (resume point after a restart), or the genesis head."""
        last = await self.records.find_one(
            {}, sort=[("sequence", DESCENDING)], projection={"sequence": 1, "record_hash": 1}
        )
        return GENESIS if last is None else ChainHead(last["sequence"], last["record_hash"])

    @property
    def head(self) -> ChainHead | None:
        """The head as this process last knew it (None before the first append or after an error)."""
        return self._head

    async def append(self, draft: AuditRecordDraft, audit_key: str) -> AppendOutcome:
        """Chain and insert ``draft`` once per ``audit_key``, whatever the redeliveries and replicas."""
        async with self._lock:
            for _ in range(MAX_SEQUENCE_CONFLICTS):
                if self._head is None:
                    self._head = await self.read_head()
                record = chain_record(draft, self._head)
                try:
                    await self.records.insert_one(to_document(record, audit_key))
                except DuplicateKeyError:
                    existing = await self.records.find_one({"_id": audit_key})
                    if existing is not None:
                        return AppendOutcome(from_document(existing), stored=False)
                    self._head = None  # another writer took this sequence: re-read the head
                    continue
                except BaseException:
                    self._head = None  # the insert may or may not have happened: re-read first
                    raise
                self._head = ChainHead(record.sequence, record.record_hash)
                return AppendOutcome(record, stored=True)
        raise TransientError(f"lost the race for the next sequence {MAX_SEQUENCE_CONFLICTS} times")

    async def find_by_key(self, audit_key: str) -> AuditRecord | None:
        document = await self.records.find_one({"_id": audit_key})
        return None if document is None else from_document(document)

    async def record_at(self, sequence: int) -> dict[str, Any] | None:
        return await self.records.find_one({"sequence": sequence})  # type: ignore[no-any-return]

    async def iter_range(
        self, first: int = 1, last: int | None = None, *, projection: dict[str, int] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Stored documents of ``first..last`` in sequence order, read in batches."""
        query: dict[str, Any] = {"$gte": first}
        if last is not None:
            query["$lte"] = last
        cursor = self.records.find({"sequence": query}, projection=projection).sort("sequence", ASCENDING)
        async for document in cursor.batch_size(READ_BATCH):
            yield document

    async def query(
        self, query: EventQuery, limit: int, *, timeout_s: float | None = None
    ) -> list[AuditRecord]:
        """The records ``query`` selects, at most ``limit``, read within ``timeout_s`` (pymongo's
        operation timeout, which also sends the server ``maxTimeMS``). A query the server stops at
        that limit, or that pymongo does not send because no time is left, is :class:`QueryTimeout`.
        A database that does not answer at all (unreachable, or silent until the limit passed) stays
        pymongo's ``ServerSelectionTimeoutError`` or ``NetworkTimeout``: 503 ``dependency_unavailable``,
        since a silent database is not a query to narrow."""
        direction = ASCENDING if query.order == "asc" else DESCENDING
        try:
            with pymongo.timeout(timeout_s):
                cursor = self.records.find(query.mongo_filter()).sort("sequence", direction).limit(limit)
                records = [from_document(d) async for d in cursor]
        except ExecutionTimeout as exc:
            if timeout_s is None:
                raise
            raise QueryTimeout(timeout_s) from exc
        return [r for r in records if query.matches(r)]

    # checkpoints

    async def last_checkpoint(self) -> CheckpointEntry | None:
        document = await self.checkpoints.find_one({}, sort=[("_id", DESCENDING)])
        return None if document is None else _checkpoint_entry(document)

    async def add_checkpoint(self, entry: CheckpointEntry) -> bool:
        """Index a checkpoint already written to WORM; False if another writer indexed this range first."""
        cp = entry.checkpoint
        try:
            await self.checkpoints.insert_one(
                {
                    "_id": cp.first_sequence,
                    "last_sequence": cp.last_sequence,
                    "document": cp.to_bytes().decode(),
                    "checkpoint_hash": cp.checkpoint_hash(),
                    "object_key": entry.object_key,
                    "version_id": entry.version_id,
                    "created_at": cp.created_at,
                }
            )
        except DuplicateKeyError:
            return False
        return True

    async def checkpoints_between(self, first: int, last: int | None) -> list[CheckpointEntry]:
        """Checkpoints sharing at least one sequence with ``first..last``, in order."""
        query: dict[str, Any] = {"last_sequence": {"$gte": first}}
        if last is not None:
            query["_id"] = {"$lte": last}
        cursor = self.checkpoints.find(query).sort("_id", ASCENDING)
        return [_checkpoint_entry(d) async for d in cursor]

    # alerts

    async def record_alert(self, event_id: str, alert: AlertDraft) -> None:
        try:
            await self.alerts.insert_one(
                {"_id": event_id, "rule": alert.rule, "subject": alert.subject, "at": alert.window_end}
            )
        except DuplicateKeyError:
            return


def _checkpoint_entry(document: Mapping[str, Any]) -> CheckpointEntry:
    raw = str(document["document"]).encode()
    return CheckpointEntry(
        checkpoint=Checkpoint.from_bytes(raw),
        object_key=document["object_key"],
        version_id=document.get("version_id"),
        raw=raw,
    )


class SyncRecordReader:
    """Blocking reads for work done in a worker thread (export bundles, the CLI)."""

    def __init__(self, database: Any) -> None:
        self.records = database[RECORDS]
        self.checkpoints = database[CHECKPOINTS]

    def head(self) -> ChainHead:
        last = self.records.find_one(
            {}, sort=[("sequence", DESCENDING)], projection={"sequence": 1, "record_hash": 1}
        )
        return GENESIS if last is None else ChainHead(last["sequence"], last["record_hash"])

    def last_signed_sequence(self) -> int:
        """The last sequence a checkpoint signed (0 before the first): records up to it must exist."""
        document = self.checkpoints.find_one({}, sort=[("_id", DESCENDING)], projection={"last_sequence": 1})
        return 0 if document is None else int(document["last_sequence"])

    def anchor_before(self, first: int) -> ChainHead | None:
        """The head just before ``first`` (genesis for 1); None when that record is missing."""
        if first <= 1:
            return GENESIS
        document = self.records.find_one(
            {"sequence": first - 1}, projection={"sequence": 1, "record_hash": 1}
        )
        return None if document is None else ChainHead(document["sequence"], document["record_hash"])

    def iter_documents(self, first: int = 1, last: int | None = None) -> Iterator[dict[str, Any]]:
        query: dict[str, Any] = {"$gte": first}
        if last is not None:
            query["$lte"] = last
        cursor = self.records.find({"sequence": query}).sort("sequence", ASCENDING).batch_size(READ_BATCH)
        for document in cursor:
            yield json_form(document)

    def iter_records(self, first: int = 1, last: int | None = None) -> Iterator[AuditRecord]:
        for document in self.iter_documents(first, last):
            yield AuditRecord.model_validate(document)

    def checkpoints_between(self, first: int, last: int | None) -> list[CheckpointEntry]:
        query: dict[str, Any] = {"last_sequence": {"$gte": first}}
        if last is not None:
            query["_id"] = {"$lte": last}
        return [_checkpoint_entry(d) for d in self.checkpoints.find(query).sort("_id", ASCENDING)]
