"""The :class:`~enclave_common.auth.restrictions.RestrictionStore` in MongoDB (collections
``restrictions`` and ``restriction_history``).

One document per restricted patient, ``_id`` its pseudonym: pseudonyms are tenant-scoped keyed HMACs,
so one pseudonym names one patient of one tenant, and the tenant is stored and checked as well. The
lookup every PHI read of a clinician makes is a read by ``_id`` alone (the one query FerretDB v1
answers from its primary key instead of a scan); the tenant is then compared here. A lifted
restriction is kept in ``restriction_history`` (``_id`` its pseudonym and the time it was made, so a
repeated lift writes the same document): written before the restriction is removed, and marked
``lifted`` with who, when and why only once the removal took (a document without ``lifted`` is a lifting
that did not happen). Single-document writes only (FerretDB v1 has no transactions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pymongo
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from enclave_common.auth.grants_mongo import aware_utc
from enclave_common.auth.restrictions import Restriction, RestrictionContended

COLLECTION = "restrictions"
HISTORY = "restriction_history"


def restriction_to_document(restriction: Restriction) -> dict[str, Any]:
    return {
        "_id": restriction.patient_key,
        "tenant": restriction.tenant,
        "justification": restriction.justification,
        "restricted_by": restriction.restricted_by,
        "restricted_at": restriction.restricted_at,
        "revision": restriction.revision,
    }


def _made(restriction: Restriction) -> dict[str, Any]:
    """The filter of ``restriction``: the one made then (not one made after it), at any revision."""
    return {
        "_id": restriction.patient_key,
        "tenant": restriction.tenant,
        "restricted_at": restriction.restricted_at,
    }


def restriction_from_document(doc: Mapping[str, Any]) -> Restriction:
    return Restriction(
        tenant=doc["tenant"],
        patient_key=str(doc["_id"]),
        justification=doc["justification"],
        restricted_by=doc["restricted_by"],
        restricted_at=aware_utc(doc["restricted_at"]),
        revision=doc["revision"],
    )


class MongoRestrictionStore:
    """Restrictions in ``database["restrictions"]`` (a pymongo ``AsyncMongoClient`` database)."""

    def __init__(self, database: AsyncDatabase[Any], *, read_timeout_s: float | None = None) -> None:
        """``read_timeout_s``: how long each lookup (:meth:`get`, :meth:`list`) may take, server
        selection included (pymongo's client-side operation timeout); None leaves the client's own
        bounds. Writes are not bounded here: a write given up on may still be applied."""
        self._collection = database[COLLECTION]
        self._history = database[HISTORY]
        self._read_timeout_s = read_timeout_s

    async def ensure_indexes(self) -> None:
        # The admins' listing of their tenant's restrictions (GET /api/v1/restrictions).
        await self._collection.create_index([("tenant", 1), ("_id", 1)], name="tenant_patient")
        await self._history.create_index([("tenant", 1), ("patient_key", 1)], name="tenant_patient")

    async def restrict(self, restriction: Restriction) -> Restriction | None:
        for _ in range(3):  # a restriction lifted between the insert and the read: insert again
            try:
                await self._collection.insert_one(restriction_to_document(restriction))
            except DuplicateKeyError:
                if (existing := await self.get(restriction.tenant, restriction.patient_key)) is not None:
                    return existing
            else:
                return None
        raise RestrictionContended(
            "the patient's restriction was changed by other requests while this one was stored; retry"
        )

    async def confirm(self, restriction: Restriction) -> Restriction | None:
        doc = await self._collection.find_one_and_update(
            _made(restriction),
            {"$inc": {"revision": 1}},
            return_document=ReturnDocument.AFTER,
        )
        return None if doc is None else restriction_from_document(doc)

    async def lift(
        self, restriction: Restriction, *, lifted_by: str, lifted_at: datetime, justification: str
    ) -> Restriction | None:
        if await self.get(restriction.tenant, restriction.patient_key) != restriction:
            return None
        made = int(restriction.restricted_at.timestamp() * 1000)
        history_id = f"{restriction.patient_key}:{made}"
        # Kept first, so a removal is never without its history; marked lifted once the removal took.
        await self._history.update_one(
            {"_id": history_id},
            {
                "$setOnInsert": {
                    **restriction_to_document(restriction),
                    "_id": history_id,
                    "patient_key": restriction.patient_key,
                }
            },
            upsert=True,
        )
        # That one at the revision read: not one confirmed to an admin since.
        removed = await self._collection.delete_one(_made(restriction) | {"revision": restriction.revision})
        if removed.deleted_count != 1:
            return None
        await self._history.update_one(
            {"_id": history_id},
            {
                "$set": {
                    "lifted": True,
                    "lifted_by": lifted_by,
                    "lifted_at": lifted_at,
                    "lift_justification": justification,
                }
            },
        )
        return restriction

    async def get(self, tenant: str, patient_key: str) -> Restriction | None:
        with pymongo.timeout(self._read_timeout_s):
            doc = await self._collection.find_one({"_id": patient_key})
        if doc is None or doc.get("tenant") != tenant:
            return None
        return restriction_from_document(doc)

    async def list(self, tenant: str, *, limit: int, after: str | None = None) -> Sequence[Restriction]:
        query: dict[str, Any] = {"tenant": tenant}
        if after is not None:
            query["_id"] = {"$gt": after}
        with pymongo.timeout(self._read_timeout_s):
            cursor = self._collection.find(query).sort("_id", 1).limit(limit)
            return [restriction_from_document(doc) async for doc in cursor]
