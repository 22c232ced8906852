"""Series assembly, restart-safe: all state is in the analysis database, never only in memory.

``upload.completed`` says which instance uploads a request accepted (the expected members of each
series); ``instance.deidentified`` brings members, ``instance.quarantined`` and ``instance.rejected``
settle expected members that will never come. A series is *ready* when every expected member is
settled, at least one member is de-identified, and nothing changed for the quiet period. Out-of-order,
duplicate and late events are fine: every write is an idempotent upsert keyed by the instance upload
id, and a late member re-opens a finished series (it is analysed again, under a new analysis id).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReturnDocument


def analysis_id_for(series_key: str, members: list[str]) -> str:
    """Deterministic: the same set of members always gives the same analysis id."""
    digest = hashlib.sha256("|".join([series_key, *sorted(members)]).encode()).hexdigest()
    return f"an-{digest[:32]}"


class SeriesAssembly:
    def __init__(self, db: Any) -> None:
        self.members = db["members"]
        self.series = db["series"]
        self.uploads = db["uploads"]

    async def ensure_indexes(self) -> None:
        await self.members.create_index([("series_id", ASCENDING)])
        await self.series.create_index([("status", ASCENDING), ("changed_at", ASCENDING)])
        await self.uploads.create_index([("series_ids", ASCENDING)])

    @staticmethod
    def series_id(tenant: str, series_key: str) -> str:
        return f"{tenant}:{series_key}"

    async def expect(
        self, tenant: str, series_keys: list[str], instance_upload_ids: list[str], correlation_id: str
    ) -> None:
        """An upload announced these instances; their series cannot complete before they settle."""
        await self.uploads.replace_one(
            {"_id": correlation_id},
            {
                "_id": correlation_id,
                "tenant": tenant,
                "series_ids": [self.series_id(tenant, key) for key in series_keys],
                "instance_upload_ids": instance_upload_ids,
            },
            upsert=True,
        )
        for series_key in series_keys:
            await self._touch(tenant, series_key, correlation_id)

    async def settle(
        self,
        tenant: str,
        series_key: str,
        instance_upload_id: str,
        state: str,
        fields: dict[str, Any],
        correlation_id: str,
    ) -> None:
        """A member got its outcome: ``deidentified`` (with its object) or ``excluded``."""
        await self.members.update_one(
            {"_id": instance_upload_id},
            {
                "$set": {
                    "state": state,
                    "tenant": tenant,
                    "series_id": self.series_id(tenant, series_key),
                    **fields,
                }
            },
            upsert=True,
        )
        await self._touch(tenant, series_key, correlation_id)

    async def _touch(self, tenant: str, series_key: str, correlation_id: str) -> None:
        now = datetime.now(UTC)
        await self.series.update_one(
            {"_id": self.series_id(tenant, series_key)},
            {
                "$set": {"status": "collecting", "changed_at": now, "correlation_id": correlation_id},
                "$setOnInsert": {"tenant": tenant, "series_key": series_key, "created_at": now},
            },
            upsert=True,
        )

    async def ready(self, quiet_period_s: float, lease_s: float) -> list[dict[str, Any]]:
        """Series that look complete (quiet and collecting), or whose analysing lease expired."""
        now = datetime.now(UTC)
        cursor = self.series.find(
            {
                "$or": [
                    {"status": "collecting", "changed_at": {"$lte": now - timedelta(seconds=quiet_period_s)}},
                    {"status": "analysing", "lease_until": {"$lte": now}},
                ]
            }
        ).limit(20)
        return [doc async for doc in cursor]

    async def members_of(self, series_id: str) -> list[dict[str, Any]]:
        return [doc async for doc in self.members.find({"series_id": series_id})]

    async def unsettled(self, series_id: str) -> int:
        """Members announced by the uploads that touched this series that have no outcome yet."""
        expected: set[str] = set()
        async for upload in self.uploads.find({"series_ids": series_id}):
            expected.update(upload["instance_upload_ids"])
        if not expected:
            return 0
        settled = await self.members.count_documents({"_id": {"$in": sorted(expected)}})
        return len(expected) - settled

    async def claim(self, series: dict[str, Any], lease_s: float) -> dict[str, Any] | None:
        """Take the series for analysis unless it changed (or another replica took it) meanwhile."""
        now = datetime.now(UTC)
        claimed: dict[str, Any] | None = await self.series.find_one_and_update(
            {"_id": series["_id"], "status": series["status"], "changed_at": series["changed_at"]},
            {"$set": {"status": "analysing", "lease_until": now + timedelta(seconds=lease_s)}},
            return_document=ReturnDocument.AFTER,
        )
        return claimed

    async def finish(self, series: dict[str, Any], analysis_id: str, outcome: str) -> None:
        """Done, unless a member arrived while analysing (then it stays collecting and runs again)."""
        await self.series.update_one(
            {"_id": series["_id"], "status": "analysing", "changed_at": series["changed_at"]},
            {"$set": {"status": outcome, "analysis_id": analysis_id, "finished_at": datetime.now(UTC)}},
        )
