"""What was de-identified (collection ``deidentified``): one document per tenant and instance key.

The document is claimed before the work starts and holds the outcome (the published envelope) once it
is done, so a redelivery or a duplicate upload re-emits that outcome instead of de-identifying again.
A claim held by another delivery for less than ``CLAIM_STALE_AFTER`` makes this delivery wait (a
transient error); older claims are taken over (their holder crashed). No transactions: FerretDB v1
has none, and a conditional update on the claim holder is enough.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from enclave_common.envelope import Envelope
from enclave_common.errors import TransientError
from enclave_common.mongo import paged
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

COLLECTION = "deidentified"
CLAIM_STALE_AFTER = timedelta(minutes=10)
PROCESSING = "processing"


class InstanceBeingProcessed(TransientError):
    code = "instance_being_processed"


def record_id(tenant: str, instance_key: str) -> str:
    return f"{tenant}|{instance_key}"


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
        if doc["status"] != PROCESSING and doc.get("source_sha256") == sha256:
            return doc
        if doc["status"] == PROCESSING and doc.get("claimed_by") != event_id:
            claimed_at = doc["claimed_at"]
            if claimed_at.tzinfo is None:
                claimed_at = claimed_at.replace(tzinfo=UTC)
            if now - claimed_at < CLAIM_STALE_AFTER:
                raise InstanceBeingProcessed(
                    "another delivery is de-identifying this instance; retrying later"
                )
        result = await self.collection.update_one(
            {"_id": _id, "status": doc["status"], "claimed_by": doc.get("claimed_by")}, {"$set": claim}
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
                }
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

    def released_objects(self) -> AsyncIterator[dict[str, Any]]:
        """Every de-identified object (tenant, study key, object ref): what a KEK rotation re-wraps,
        paged (``enclave_common.mongo.paged``: the rotation re-writes an object per document)."""
        return paged(self.collection, {"status": "deidentified"}, {"tenant": 1, "study_key": 1, "object": 1})
