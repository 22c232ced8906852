"""The :class:`~enclave_common.auth.restrictions.RestrictionStore` in MongoDB (collection
``restrictions``).

One document per restricted patient, ``_id`` its pseudonym: pseudonyms are tenant-scoped keyed HMACs,
so one pseudonym names one patient of one tenant, and the tenant is stored and checked as well. The
lookup every PHI read of a clinician makes is a read by ``_id`` alone (the one query FerretDB v1
answers from its primary key instead of a scan); the tenant is then compared here. Single-document
writes only (FerretDB v1 has no transactions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pymongo
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from enclave_common.auth.restrictions import Restriction

COLLECTION = "restrictions"


def restriction_to_document(restriction: Restriction) -> dict[str, Any]:
    return {
        "_id": restriction.patient_key,
        "tenant": restriction.tenant,
        "justification": restriction.justification,
        "restricted_by": restriction.restricted_by,
        "restricted_at": restriction.restricted_at,
    }


def restriction_from_document(doc: Mapping[str, Any]) -> Restriction:
    at: datetime = doc["restricted_at"]
    return Restriction(
        tenant=doc["tenant"],
        patient_key=str(doc["_id"]),
        justification=doc["justification"],
        restricted_by=doc["restricted_by"],
        restricted_at=at if at.tzinfo is not None else at.replace(tzinfo=UTC),
    )


class MongoRestrictionStore:
    """Restrictions in ``database["restrictions"]`` (a pymongo ``AsyncMongoClient`` database)."""

    def __init__(self, database: AsyncDatabase[Any], *, read_timeout_s: float | None = None) -> None:
        """``read_timeout_s``: how long each lookup (:meth:`get`, :meth:`list`) may take, server
        selection included (pymongo's client-side operation timeout); None leaves the client's own
        bounds. Writes are not bounded here: a write given up on may still be applied."""
        self._collection = database[COLLECTION]
        self._read_timeout_s = read_timeout_s

    async def ensure_indexes(self) -> None:
        # The admins' listing of their tenant's restrictions (GET /api/v1/restrictions).
        await self._collection.create_index([("tenant", 1), ("_id", 1)], name="tenant_patient")

    async def restrict(self, restriction: Restriction) -> Restriction | None:
        for _ in range(3):  # a restriction lifted between the insert and the read: insert again
            try:
                await self._collection.insert_one(restriction_to_document(restriction))
            except DuplicateKeyError:
                if (existing := await self.get(restriction.tenant, restriction.patient_key)) is not None:
                    return existing
            else:
                return None
        raise RuntimeError("the patient's restriction was changed concurrently three times; try again")

    async def lift(self, tenant: str, patient_key: str) -> Restriction | None:
        doc = await self._collection.find_one_and_delete({"_id": patient_key, "tenant": tenant})
        return None if doc is None else restriction_from_document(doc)

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
