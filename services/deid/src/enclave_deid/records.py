"""What was de-identified (collection ``deidentified``): one document per tenant and instance key.

The document is claimed before the work starts and holds the outcome (the published envelope) once it
is done, so a redelivery or a duplicate upload re-emits that outcome instead of de-identifying again.
A claim held by another delivery for less than ``CLAIM_STALE_AFTER`` makes this delivery wait (a
transient error); older claims are taken over (their holder crashed). No transactions: FerretDB v1
has none, and a conditional update on the claim holder is enough.

Since the eighteenth session a finished record also holds the ``revision`` of the rules its copy was
made under (``enclave_deid.revision``), the ``original`` it was made from, and ``emitted``: every
upload (``upload_id``, ``instance_upload_id``) its outcome was published for, duplicates included
(the last ``EMITTED_KEPT``).
``enclave-deid-redo`` (``enclave_deid.redo``) claims finished records the same way (``redo`` names
the copy it writes) and leaves ``pending`` work (its linkage change, publishing the new outcome
named by ``pending.event_id``, deleting the replaced copies) that any later run finishes, and notes
a refusal in ``redo_refused``. A new version claimed over ``pending`` turns it into deletions only,
and the service's ``finish`` drops the redo's marks (``redone_at``, ``redo_refused``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from enclave_common.envelope import Envelope
from enclave_common.errors import TransientError
from enclave_common.mongo import paged
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

COLLECTION = "deidentified"
CLAIM_STALE_AFTER = timedelta(minutes=10)
PROCESSING = "processing"
DEIDENTIFIED = "deidentified"
QUARANTINED = "quarantined"
#: How many distinct uploads of an instance a record keeps in ``emitted`` (the most recent first noted).
EMITTED_KEPT = 100


class InstanceBeingProcessed(TransientError):
    code = "instance_being_processed"


def record_id(tenant: str, instance_key: str) -> str:
    return f"{tenant}|{instance_key}"


def claim_is_stale(doc: dict[str, Any], now: datetime | None = None) -> bool:
    """Whether a claim is older than ``CLAIM_STALE_AFTER`` (its holder is taken to have died)."""
    claimed_at: datetime = doc["claimed_at"]
    if claimed_at.tzinfo is None:
        claimed_at = claimed_at.replace(tzinfo=UTC)
    return (now or datetime.now(UTC)) - claimed_at >= CLAIM_STALE_AFTER


class DeidRecords:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self.collection = db[COLLECTION]

    async def ensure_indexes(self) -> None:
        await self.collection.create_index([("tenant", 1), ("object.key", 1)])

    async def claim(
        self, tenant: str, instance_key: str, sha256: str, event_id: str
    ) -> dict[str, Any] | None:
        """The finished record to re-emit, or None when this delivery now owns the work.

        A finished record of other content (``new_version`` of the instance) is claimed for new work.
        """
        _id = record_id(tenant, instance_key)
        now = datetime.now(UTC)
        claim = {"status": PROCESSING, "source_sha256": sha256, "claimed_by": event_id, "claimed_at": now}
        doc = await self.collection.find_one({"_id": _id})
        if doc is None:
            try:
                await self.collection.insert_one(
                    {"_id": _id, "tenant": tenant, "instance_key": instance_key, **claim}
                )
                return None
            except DuplicateKeyError:
                doc = await self.collection.find_one({"_id": _id})
                if doc is None:
                    raise InstanceBeingProcessed("the instance record vanished while claiming it") from None
        if doc["status"] == PROCESSING and "redo" in doc and claim_is_stale(doc, now):
            # A redo command died holding its claim: the record's finished outcome stands again.
            await self.restore_redo(doc)
            doc = await self.collection.find_one({"_id": _id})
            if doc is None or doc["status"] == PROCESSING:
                raise InstanceBeingProcessed("the instance record changed while claiming it; retrying later")
        if doc["status"] != PROCESSING and doc.get("source_sha256") == sha256:
            return doc
        if doc["status"] == PROCESSING and doc.get("claimed_by") != event_id and not claim_is_stale(doc, now):
            raise InstanceBeingProcessed("another delivery is de-identifying this instance; retrying later")
        update: dict[str, Any] = {"$set": claim}
        if "pending" in doc:
            # A redo's unfinished work on the previous content: its outcome is no longer the record's
            # (not published, its linkage not stored), and a copy no event named yet is deleted too.
            pending = doc["pending"]
            purge = list(pending.get("purge", []))
            if pending.get("publish") and doc.get("object"):
                purge.append({"bucket": doc["object"]["bucket"], "key": doc["object"]["key"]})
            update["$set"] = {**claim, "pending": {"publish": False, "purge": purge}}
        result = await self.collection.update_one(
            {"_id": _id, "status": doc["status"], "claimed_by": doc.get("claimed_by")}, update
        )
        if result.matched_count == 0:
            raise InstanceBeingProcessed("another delivery claimed this instance first; retrying later")
        return None

    async def finish(
        self,
        tenant: str,
        instance_key: str,
        *,
        status: str,
        topic: str,
        envelope: Envelope,
        extra: dict[str, Any],
    ) -> None:
        """Record the outcome (the envelope as published) and release the claim."""
        await self.collection.update_one(
            {"_id": record_id(tenant, instance_key)},
            {
                "$set": {
                    "status": status,
                    "outcome": {"topic": topic, "data": envelope.data, "event_id": envelope.id},
                    "finished_at": datetime.now(UTC),
                    **extra,
                },
                # A redo's marks belong to the outcome it replaced (``redone_at`` gives re-emits ids of
                # their own; ``redo_refused`` was about the previous content).
                "$unset": {"redone_at": "", "redo_refused": ""},
            },
        )

    async def release(self, tenant: str, instance_key: str, event_id: str) -> None:
        """Drop this delivery's claim after a permanent failure, so a later upload can try again."""
        await self.collection.delete_one(
            {
                "_id": record_id(tenant, instance_key),
                "status": PROCESSING,
                "claimed_by": event_id,
                "outcome": {"$exists": False},
            }
        )

    async def note_emitted(
        self, tenant: str, instance_key: str, outcome_event_id: str, upload_id: str, instance_upload_id: str
    ) -> bool:
        """Add an upload to those the outcome is published for, if the outcome is still
        ``outcome_event_id`` (False: a redo replaced it meanwhile; read the record again). Only the
        last ``EMITTED_KEPT`` distinct uploads are kept: the oldest are dropped (a redo does not
        tell them of its new copy), so an instance resent thousands of times keeps a small record."""
        query = {"_id": record_id(tenant, instance_key), "outcome.event_id": outcome_event_id}
        found = await self.collection.find_one_and_update(
            query,
            {"$addToSet": {"emitted": {"upload_id": upload_id, "instance_upload_id": instance_upload_id}}},
            return_document=ReturnDocument.AFTER,
        )
        if found is None:
            return False
        # One $pop per surplus entry: FerretDB v1 ignores $push's $slice.
        for _ in range(len(found.get("emitted") or ()) - EMITTED_KEPT):
            await self.collection.update_one(query, {"$pop": {"emitted": -1}})
        return True

    async def outcome_event_id(self, tenant: str, instance_key: str) -> str | None:
        doc = await self.collection.find_one(
            {"_id": record_id(tenant, instance_key)}, {"outcome.event_id": 1}
        )
        return ((doc or {}).get("outcome") or {}).get("event_id")

    # -- enclave-deid-redo ----------------------------------------------------------------------------

    async def get(self, _id: str) -> dict[str, Any] | None:
        return await self.collection.find_one({"_id": _id})

    def redo_candidates(
        self, tenant: str, study_key: str | None, below_revision: int | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Released records of ``tenant`` made under a revision below ``below_revision`` (every
        released record when None), and records a redo left unfinished (``pending`` work, or a
        ``redo`` claim), paged in ``_id`` order."""
        if below_revision is None:
            stale: list[dict[str, Any]] = [{"status": DEIDENTIFIED}]
        else:
            stale = [
                {"status": DEIDENTIFIED, "revision": {"$exists": False}},
                {"status": DEIDENTIFIED, "revision": {"$lt": below_revision}},
            ]
        query: dict[str, Any] = {
            "tenant": tenant,
            "$or": [*stale, {"pending": {"$exists": True}}, {"redo": {"$exists": True}}],
        }
        if study_key is not None:
            query["study_key"] = study_key
        return paged(self.collection, query)

    async def claim_for_redo(self, doc: dict[str, Any], claimant: str, target: dict[str, Any]) -> bool:
        """Claim a released record as it was read (same outcome) for a redo writing ``target``; False
        if it changed or another claims it (the service then waits for this claim, or takes it over
        after ``CLAIM_STALE_AFTER`` with ``restore_redo``)."""
        done = await self.collection.update_one(
            {
                "_id": doc["_id"],
                "status": DEIDENTIFIED,
                "outcome.event_id": doc["outcome"]["event_id"],
                "pending": {"$exists": False},
            },
            {
                "$set": {
                    "status": PROCESSING,
                    "claimed_by": claimant,
                    "claimed_at": datetime.now(UTC),
                    "redo": {"target": target},
                }
            },
        )
        return done.matched_count == 1

    async def restore_redo(self, doc: dict[str, Any]) -> bool:
        """Give a redo claim's record its finished state back (the claim's holder stopped, or gave it
        up); the copy the redo may have written is left to ``pending`` to delete (no event named it)."""
        done = await self.collection.update_one(
            {"_id": doc["_id"], "status": PROCESSING, "claimed_by": doc.get("claimed_by")},
            {
                "$set": {
                    "status": DEIDENTIFIED,
                    "pending": {"publish": False, "purge": [doc["redo"]["target"]]},
                },
                "$unset": {"redo": ""},
            },
        )
        return done.matched_count == 1

    async def finish_redo(
        self,
        _id: str,
        claimant: str,
        fields: dict[str, Any],
        *,
        unset: tuple[str, ...] = (),
        pending: dict[str, Any],
    ) -> dict[str, Any] | None:
        """Record a redo's outcome while this claim holds the record, with the work that follows as
        ``pending`` (its linkage change, publishing the outcome ``pending.event_id``, deleting the
        replaced keys); the record as it is now, or None when the claim was taken over."""
        found: dict[str, Any] | None = await self.collection.find_one_and_update(
            {"_id": _id, "status": PROCESSING, "claimed_by": claimant, "redo": {"$exists": True}},
            {
                "$set": {**fields, "pending": pending},
                "$unset": {"redo": "", **{name: "" for name in unset}},
            },
            return_document=ReturnDocument.AFTER,
        )
        return found

    async def note_refused(self, _id: str, outcome_event_id: str, code: str) -> None:
        """Note that a redo refused the record's copy (``code``), if its outcome is still the one refused."""
        await self.collection.update_one(
            {"_id": _id, "status": DEIDENTIFIED, "outcome.event_id": outcome_event_id},
            {"$set": {"redo_refused": {"code": code, "at": datetime.now(UTC)}}},
        )

    async def mark_published(self, _id: str, outcome_event_id: str) -> None:
        await self.collection.update_one(
            {"_id": _id, "outcome.event_id": outcome_event_id}, {"$set": {"pending.publish": False}}
        )

    async def clear_pending(self, _id: str, pending: dict[str, Any]) -> None:
        """Drop ``pending`` once its work is done, unless it changed meanwhile (then a later run does it)."""
        await self.collection.update_one(
            {"_id": _id, "pending.purge": pending.get("purge", [])}, {"$unset": {"pending": ""}}
        )

    def released_objects(self) -> AsyncIterator[dict[str, Any]]:
        """Every de-identified object (tenant, study key, object ref): what a KEK rotation re-wraps,
        paged (``enclave_common.mongo.paged``: the rotation re-writes an object per document)."""
        return paged(self.collection, {"status": "deidentified"}, {"tenant": 1, "study_key": 1, "object": 1})
