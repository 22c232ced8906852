"""The :class:`~enclave_common.auth.grants.GrantStore` in MongoDB (collection ``grants``).

Works on FerretDB v1 as on MongoDB >= 6: single-document writes only (no transactions), no TTL
index (expired grants stay as history; ``active_for`` filters by time), no keys with dots.
Datetimes are stored as BSON dates (UTC) and read back timezone-aware.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, overload

import pymongo
import structlog
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from enclave_common.auth.actions import Action
from enclave_common.auth.grants import Grant, GrantKind, GrantQuery

COLLECTION = "grants"
log = structlog.get_logger("enclave.grants")


def grant_to_document(grant: Grant) -> dict[str, Any]:
    return {
        "_id": grant.grant_id,
        "kind": grant.kind.value,
        "grantee": grant.grantee,
        "tenant": grant.tenant,
        "patient_key": grant.patient_key,
        "actions": sorted(a.value for a in grant.actions),
        "not_before": grant.not_before,
        "expires_at": grant.expires_at,
        "justification": grant.justification,
        "created_by": grant.created_by,
        "created_at": grant.created_at,
        "revoked_at": grant.revoked_at,
        "revoked_by": grant.revoked_by,
        "revocation_recorded": grant.revocation_recorded,
    }


@overload
def aware_utc(value: datetime) -> datetime: ...
@overload
def aware_utc(value: None) -> None: ...
def aware_utc(value: datetime | None) -> datetime | None:
    """A stored date as a timezone-aware UTC datetime (pymongo reads it naive without ``tz_aware``)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _required_time(doc: Mapping[str, Any], key: str) -> datetime:
    value = aware_utc(doc.get(key))
    if value is None:
        raise ValueError(f"grant document lacks {key}")
    return value


def grant_from_document(doc: Mapping[str, Any]) -> Grant:
    not_before, expires_at, created_at = (
        _required_time(doc, k) for k in ("not_before", "expires_at", "created_at")
    )
    return Grant(
        grant_id=str(doc["_id"]),
        kind=GrantKind(doc["kind"]),
        grantee=doc["grantee"],
        tenant=doc["tenant"],
        patient_key=doc["patient_key"],
        actions=frozenset(Action(a) for a in doc["actions"]),
        not_before=not_before,
        expires_at=expires_at,
        justification=doc["justification"],
        created_by=doc["created_by"],
        created_at=created_at,
        revoked_at=aware_utc(doc.get("revoked_at")),
        revoked_by=doc.get("revoked_by"),
        revocation_recorded=bool(doc.get("revocation_recorded", True)),
    )


def active_grants_filter(subject: str, tenant: str, patient_key: str, now: datetime) -> dict[str, Any]:
    """The query of :meth:`MongoGrantStore.active_for` (equality and range operators only).
    Revocation is checked on the results (``Grant.is_active``), as in the in-memory store."""
    return {
        "tenant": tenant,
        "grantee": subject,
        "patient_key": patient_key,
        "not_before": {"$lte": now},
        "expires_at": {"$gt": now},
    }


def grant_query_filter(tenant: str, query: GrantQuery, after: str | None) -> dict[str, Any]:
    """The query of :meth:`MongoGrantStore.list` (equality and range operators only; a revocation is
    effective from its instant, so a grant in effect has no ``revoked_at``)."""
    found: dict[str, Any] = {"tenant": tenant}
    if after is not None:
        found["_id"] = {"$gt": after}
    if query.kind is not None:
        found["kind"] = query.kind.value
    if query.grantee is not None:
        found["grantee"] = query.grantee
    if query.patient_key is not None:
        found["patient_key"] = query.patient_key
    expires_after = [t for t in (query.active_at, query.unexpired_at) if t is not None]
    if expires_after:
        found.update({"revoked_at": None, "expires_at": {"$gt": max(expires_after)}})
    if query.active_at is not None:
        found["not_before"] = {"$lte": query.active_at}
    return found


class MongoGrantStore:
    """Grants in ``database["grants"]``; the database object (pymongo ``AsyncMongoClient``) is
    passed in by the service's wiring."""

    def __init__(self, database: AsyncDatabase[Any], *, read_timeout_s: float | None = None) -> None:
        """``read_timeout_s``: how long each lookup a request makes (:meth:`get`, :meth:`active_for`,
        :meth:`list`) may take, server selection included (pymongo's client-side operation timeout,
        which also sends the server ``maxTimeMS``); None leaves the client's own bounds."""
        self._collection = database[COLLECTION]
        self._read_timeout_s = read_timeout_s

    async def ensure_indexes(self) -> None:
        await self._collection.create_index(
            [("tenant", 1), ("grantee", 1), ("patient_key", 1)], name="grantee_patient"
        )
        # The admins' listing (GET /api/v1/grants), in grant id order within the tenant.
        await self._collection.create_index([("tenant", 1), ("_id", 1)], name="tenant_grants")
        # A patient's grants (the listing filtered on a patient, and a restriction naming those in effect).
        await self._collection.create_index([("tenant", 1), ("patient_key", 1)], name="tenant_patient")
        # The gateway's sweep of revocations not yet in the audit trail (every minute, per replica).
        await self._collection.create_index(
            [("revocation_recorded", 1), ("revoked_at", 1)], name="unrecorded_revocations"
        )

    async def create(self, grant: Grant) -> None:
        try:
            await self._collection.insert_one(grant_to_document(grant))
        except DuplicateKeyError:
            raise ValueError("a grant with this grant_id already exists; grant ids must be unique") from None

    async def revoke(self, grant_id: str, *, tenant: str, revoked_by: str, now: datetime) -> bool:
        result = await self._collection.update_one(
            {"_id": grant_id, "tenant": tenant, "revoked_at": None},
            {"$set": {"revoked_at": now, "revoked_by": revoked_by, "revocation_recorded": False}},
        )
        return result.modified_count == 1

    async def mark_revocation_recorded(self, grant_id: str, *, tenant: str) -> None:
        await self._collection.update_one(
            {"_id": grant_id, "tenant": tenant}, {"$set": {"revocation_recorded": True}}
        )

    async def unrecorded_revocations(self, *, before: datetime, limit: int) -> Sequence[Grant]:
        """A document that is no grant (by hand, or of a newer version) is logged with its id and left
        out, so it does not hold back the others."""
        cursor = (
            self._collection.find({"revocation_recorded": False, "revoked_at": {"$lt": before}})
            .sort("revoked_at", 1)
            .limit(limit)
        )
        grants = []
        async for doc in cursor:
            try:
                grants.append(grant_from_document(doc))
            except (KeyError, ValueError, TypeError) as exc:
                log.error(
                    "a stored grant could not be read", grant_id=str(doc.get("_id")), error=type(exc).__name__
                )
        return grants

    async def get(self, grant_id: str, *, tenant: str) -> Grant | None:
        with pymongo.timeout(self._read_timeout_s):
            doc = await self._collection.find_one({"_id": grant_id, "tenant": tenant})
        return None if doc is None else grant_from_document(doc)

    async def list(
        self, tenant: str, query: GrantQuery, *, limit: int, after: str | None = None
    ) -> Sequence[Grant]:
        with pymongo.timeout(self._read_timeout_s):
            cursor = (
                self._collection.find(grant_query_filter(tenant, query, after)).sort("_id", 1).limit(limit)
            )
            return [grant_from_document(doc) async for doc in cursor]

    async def active_for(self, subject: str, tenant: str, patient_key: str, now: datetime) -> Sequence[Grant]:
        with pymongo.timeout(self._read_timeout_s):
            cursor = self._collection.find(active_grants_filter(subject, tenant, patient_key, now))
            grants = [grant_from_document(doc) async for doc in cursor]
        return [g for g in grants if g.is_active(now)]
