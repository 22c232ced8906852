"""The ingest catalogue (its own MongoDB database): instances stored or rejected, and study keys.

Nothing here is PHI: keys are pseudonyms, object keys are opaque, hashes are of encrypted content's
plaintext (SHA-256, as the gateway computed it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from enclave_common.crypto import StudyKeyRecord, WrappedKey
from enclave_common.mongo import paged
from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError


class Catalogue:
    def __init__(self, db: Any) -> None:
        self.instances = db["instances"]
        self.study_keys = db["study_keys"]
        #: One document per (tenant, SOP instance pseudonym) listing its stored versions: the duplicate
        #: check is a lookup by ``_id``, not a query (no scan on servers without index pushdown).
        self.instance_keys = db["instance_keys"]

    async def ensure_indexes(self) -> None:
        await self.instances.create_index([("tenant", ASCENDING), ("instance_key", ASCENDING)])
        await self.instances.create_index([("tenant", ASCENDING), ("study_key", ASCENDING)])

    async def get(self, instance_upload_id: str) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self.instances.find_one({"_id": instance_upload_id})
        return doc

    async def stored_versions(self, tenant: str, instance_key: str) -> list[dict[str, Any]]:
        """The stored versions of one SOP instance: ``_id`` lookups only (index document, then each)."""
        index = await self.instance_keys.find_one({"_id": f"{tenant}|{instance_key}"})
        versions: dict[str, str] = (index or {}).get("versions") or {}
        found = []
        for instance_upload_id in sorted(set(versions.values())):
            doc = await self.instances.find_one({"_id": instance_upload_id})
            if doc is not None and doc.get("status") == "stored":
                found.append(doc)
        return found

    async def record(self, instance_upload_id: str, doc: dict[str, Any]) -> None:
        """Insert or replace the outcome of one instance upload (idempotent on redelivery).

        A stored instance is first listed in its ``instance_keys`` document (content digest ->
        instance upload), then recorded: a crash in between leaves an entry whose instance is not
        (yet) ``stored``, which :meth:`stored_versions` skips, and the redelivery writes both again.
        One field per digest, so two versions never rewrite the same field.
        """
        if doc.get("status") == "stored":
            await self.instance_keys.update_one(
                {"_id": f"{doc['tenant']}|{doc['instance_key']}"},
                {"$set": {f"versions.{doc['sha256']}": instance_upload_id}},
                upsert=True,
            )
        await self.instances.replace_one(
            {"_id": instance_upload_id},
            {**doc, "_id": instance_upload_id, "recorded_at": datetime.now(UTC)},
            upsert=True,
        )

    async def study_objects(self, tenant: str, study_key: str) -> AsyncIterator[dict[str, Any]]:
        async for doc in self.instances.find({"tenant": tenant, "study_key": study_key, "status": "stored"}):
            yield doc

    def all_stored(self, tenant: str | None = None, page: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every stored instance (of ``tenant``), paged (``enclave_common.mongo.paged``): the scrub
        may take hours over them, reading and decrypting each object."""
        query: dict[str, Any] = {"status": "stored"}
        if tenant is not None:
            query["tenant"] = tenant
        return paged(self.instances, query, page=page)

    # ---- study keys -------------------------------------------------------------------------

    @staticmethod
    def _key_id(tenant: str, study_key: str) -> str:
        return f"{tenant}:{study_key}"

    async def claim_study_key(self, record: StudyKeyRecord) -> StudyKeyRecord:
        """Insert this study's key record unless one exists; return the one that won."""
        try:
            await self.study_keys.insert_one(
                {
                    "_id": self._key_id(record.tenant, record.study_key),
                    "tenant": record.tenant,
                    "study_key": record.study_key,
                    "status": "active",
                    "wrapped": record.wrapped.to_json_dict(),
                    "created_at": datetime.now(UTC),
                }
            )
            return record
        except DuplicateKeyError:
            existing = await self.study_key(record.tenant, record.study_key)
            assert existing is not None
            return existing

    async def study_key_doc(self, tenant: str, study_key: str) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self.study_keys.find_one({"_id": self._key_id(tenant, study_key)})
        return doc

    async def study_key(self, tenant: str, study_key: str) -> StudyKeyRecord | None:
        doc = await self.study_key_doc(tenant, study_key)
        if doc is None or doc.get("status") != "active":
            return None
        return StudyKeyRecord(tenant, study_key, WrappedKey.from_json_dict(doc["wrapped"]))

    async def active_study_keys(self) -> AsyncIterator[StudyKeyRecord]:
        async for doc in self.study_keys.find({"status": "active"}):
            yield StudyKeyRecord(doc["tenant"], doc["study_key"], WrappedKey.from_json_dict(doc["wrapped"]))

    async def replace_study_key(self, record: StudyKeyRecord) -> None:
        await self.study_keys.update_one(
            {"_id": self._key_id(record.tenant, record.study_key), "status": "active"},
            {"$set": {"wrapped": record.wrapped.to_json_dict(), "rewrapped_at": datetime.now(UTC)}},
        )

    async def is_shredded(self, tenant: str, study_key: str) -> bool:
        doc = await self.study_keys.find_one({"_id": self._key_id(tenant, study_key)}, {"status": 1})
        return doc is not None and doc.get("status") == "shredded"

    async def mark_shredded(self, tenant: str, study_key: str, actor: str) -> bool:
        """Destroy the key material, keep the fact (who, when) for the catalogue and audit."""
        result = await self.study_keys.update_one(
            {"_id": self._key_id(tenant, study_key), "status": "active"},
            {
                "$set": {
                    "status": "shredded",
                    "wrapped": None,
                    "shredded_at": datetime.now(UTC),
                    "shredded_by": actor,
                }
            },
        )
        await self.instances.update_many(
            {"tenant": tenant, "study_key": study_key, "status": "stored"}, {"$set": {"status": "shredded"}}
        )
        return bool(result.modified_count)
