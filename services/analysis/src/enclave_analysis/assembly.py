"""Series assembly, restart-safe: all state is in the analysis database, never only in memory.

``upload.completed`` says which instance uploads a request accepted: they become the *expected*
members of every series that request touched. ``instance.deidentified`` brings a member;
``instance.quarantined`` and ``instance.rejected`` settle expected members that will never come.
Each settled instance is added to the ``settled`` set of every series its upload touched, so a
series doc alone says whether it is complete: ``expected ⊆ settled``, and nothing changed for the
quiet period. Out-of-order, duplicate and late events are fine: every write is an idempotent upsert
or ``$addToSet``; a late member re-opens a finished series (analysed again, under a new analysis id).

A member keeps the time of the event that settled it (``event_time``, the envelope's): an older event
for the same upload (a redelivery that arrives after ``enclave-deid-redo`` re-published the upload's
outcome) changes nothing, so it cannot bring back a copy the redo deleted. An instance uploaded more
than once is several members but one instance: it is analysed from the copy of the most recent
outcome among its members (``instance_copies``).

Every lookup on the hot path is by ``_id``: a MongoDB-wire server without secondary-index pushdown
(FerretDB v1) would otherwise scan a collection per event.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

#: ``reopen``'s reason code for series that finished before their reason code was recorded (before
#: the tenth session's release).
UNRECORDED = "unrecorded"


def analysis_id_for(series_key: str, members: list[str]) -> str:
    """Deterministic: the same set of members always gives the same analysis id."""
    digest = hashlib.sha256("|".join([series_key, *sorted(members)]).encode()).hexdigest()
    return f"an-{digest[:32]}"


def _recency(member: dict[str, Any]) -> tuple[bool, datetime]:
    at = member.get("event_time")
    if not isinstance(at, datetime):
        return (False, datetime.min)
    return (True, at.replace(tzinfo=None) if at.tzinfo is None else at.astimezone(UTC).replace(tzinfo=None))


def instance_copies(members: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The series' de-identified instances, each as the de-identified members that carry a copy of
    it, the most recent outcome first (``event_time``).

    An instance is its ``instance_key`` (deid's own identity of an instance, which its records and
    the copies' object keys are made of); every upload of it is a member. ``enclave-deid-redo``
    re-publishes an instance's outcome, with a new copy, only for the uploads its record knows of
    (records before the eighteenth session knew only the first upload), and deletes the old copy: so
    members of the same instance may name a copy that is gone, and the most recent outcome is the
    one to read. An instance whose most recent outcome excluded it (the redo withdrew the copy:
    ``instance.quarantined``) is left out, whatever its other members say. A member without an
    ``instance_key`` (recorded before it was kept) is an instance of its own."""
    by_instance: dict[str, list[dict[str, Any]]] = {}
    for member in members:
        if member.get("state") in ("deidentified", "excluded"):
            by_instance.setdefault(member.get("instance_key") or f"upload:{member['_id']}", []).append(member)
    out = []
    for _, group in sorted(by_instance.items()):
        group.sort(key=lambda m: (_recency(m), m["_id"]), reverse=True)
        if group[0]["state"] == "deidentified":
            out.append([m for m in group if m["state"] == "deidentified"])
    return out


class SeriesAssembly:
    def __init__(self, db: Any) -> None:
        self.members = db["members"]
        self.series = db["series"]
        self.uploads = db["uploads"]

    async def ensure_indexes(self) -> None:
        await self.members.create_index([("series_id", ASCENDING)])
        await self.series.create_index([("status", ASCENDING), ("changed_at", ASCENDING)])

    @staticmethod
    def series_id(tenant: str, series_key: str) -> str:
        return f"{tenant}:{series_key}"

    async def expect(
        self, tenant: str, series_keys: list[str], instance_upload_ids: list[str], upload_id: str
    ) -> None:
        """An upload announced these instances; the series it touched wait until they settle."""
        series_ids = [self.series_id(tenant, key) for key in series_keys]
        await self.uploads.replace_one(
            {"_id": upload_id},
            {
                "_id": upload_id,
                "tenant": tenant,
                "series_ids": series_ids,
                "instance_upload_ids": instance_upload_ids,
            },
            upsert=True,
        )
        already = [
            iuid for iuid in instance_upload_ids if await self.members.find_one({"_id": iuid}, {"_id": 1})
        ]
        for series_key, series_id in zip(series_keys, series_ids, strict=True):
            await self._touch(tenant, series_key, upload_id)
            update: dict[str, Any] = {"$addToSet": {"expected": {"$each": instance_upload_ids}}}
            await self.series.update_one({"_id": series_id}, update)
            if already:
                await self.series.update_one(
                    {"_id": series_id}, {"$addToSet": {"settled": {"$each": already}}}
                )

    async def settle(
        self,
        tenant: str,
        series_key: str | None,
        instance_upload_id: str,
        upload_id: str,
        state: str,
        fields: dict[str, Any],
        correlation_id: str,
        event_time: datetime | None = None,
    ) -> None:
        """A member got its outcome: ``deidentified`` (with its object) or ``excluded``, told by an
        event of ``event_time``. An outcome older than the one the member has (a redelivery after a
        newer outcome of the same upload) changes nothing."""
        own = self.series_id(tenant, series_key) if series_key else None
        member: dict[str, Any] = {"_id": instance_upload_id}
        values = {"state": state, "tenant": tenant, "series_id": own, **fields}
        if event_time is not None:
            member["$or"] = [{"event_time": {"$exists": False}}, {"event_time": {"$lte": event_time}}]
            values["event_time"] = event_time
        try:
            await self.members.update_one(member, {"$set": values}, upsert=True)
        except DuplicateKeyError:
            # The member exists and has a newer outcome (the filter did not match it, so the upsert
            # tried to insert it): this event is superseded; the newer one settled the series.
            return
        upload = await self.uploads.find_one({"_id": upload_id})
        targets = set(upload["series_ids"]) if upload else set()
        if own and series_key:
            await self._touch(tenant, series_key, correlation_id)
            targets.add(own)
        for series_id in targets:
            added = await self.series.update_one(
                {"_id": series_id}, {"$addToSet": {"settled": instance_upload_id}}
            )
            if added.modified_count and series_id != own:
                # Another series of the upload was waiting for this member (it may have been reported
                # incomplete already): it changed, so it is assembled again.
                await self.series.update_one({"_id": series_id}, self._changed(correlation_id))

    async def _touch(self, tenant: str, series_key: str, correlation_id: str) -> None:
        update = self._changed(correlation_id)
        update["$setOnInsert"] = {
            "tenant": tenant,
            "series_key": series_key,
            "created_at": update["$set"]["changed_at"],
        }
        await self.series.update_one({"_id": self.series_id(tenant, series_key)}, update, upsert=True)

    @staticmethod
    def _changed(correlation_id: str) -> dict[str, Any]:
        """The update that marks a series changed. A change makes a new analysis: its attempts count
        from zero again, and its outcome gets a new event id even when its members are the same (a
        late member excluded): reusing the last run's id would make consumers drop it as a
        redelivery."""
        return {
            "$set": {
                "status": "collecting",
                "changed_at": datetime.now(UTC),
                "correlation_id": correlation_id,
                "attempts": 0,
            },
            "$unset": {"pending_event": ""},
        }

    @classmethod
    def complete(cls, series: dict[str, Any]) -> bool:
        return not cls.missing(series)

    @staticmethod
    def missing(series: dict[str, Any]) -> list[str]:
        """The expected members that have no outcome yet."""
        return sorted(set(series.get("expected") or ()) - set(series.get("settled") or ()))

    async def ready(self, quiet_period_s: float, incomplete_after_s: float) -> list[dict[str, Any]]:
        """Series that are complete and quiet, or unchanged for ``incomplete_after_s`` although
        incomplete (to be reported, not analysed), or whose analysing lease expired."""
        now = datetime.now(UTC)
        overdue = now - timedelta(seconds=incomplete_after_s)
        cursor = self.series.find(
            {
                "$or": [
                    {"status": "collecting", "changed_at": {"$lte": now - timedelta(seconds=quiet_period_s)}},
                    {"status": "analysing", "lease_until": {"$lte": now}},
                ]
            }
        )
        out: list[dict[str, Any]] = []
        async for doc in cursor:
            if (
                doc["status"] == "analysing"
                or self.complete(doc)
                or await self._repair(doc)
                or doc["changed_at"] <= overdue
            ):
                out.append(doc)
            if len(out) >= 20:
                break
        return out

    async def _repair(self, series: dict[str, Any]) -> bool:
        """True if the members missing from ``settled`` have in fact settled (and record them).

        A MongoDB-wire server that applies ``$addToSet`` as read-modify-write (FerretDB v1) can lose
        one of two concurrent updates of the same series document; the members collection, written
        by ``_id``, is the source of truth. Checked only for a few missing members, by ``_id``.
        """
        missing = set(series.get("expected") or ()) - set(series.get("settled") or ())
        if not missing or len(missing) > 50:
            return False
        for iuid in missing:
            member = await self.members.find_one({"_id": iuid}, {"state": 1})
            if member is None or member.get("state") == "expected":
                return False
        await self.series.update_one(
            {"_id": series["_id"]}, {"$addToSet": {"settled": {"$each": sorted(missing)}}}
        )
        series["settled"] = [*(series.get("settled") or ()), *sorted(missing)]
        return True

    async def members_of(self, series_id: str) -> list[dict[str, Any]]:
        return [doc async for doc in self.members.find({"series_id": series_id})]

    async def claim(self, series: dict[str, Any], lease_s: float) -> dict[str, Any] | None:
        """Take the series for analysis unless it changed (or another replica took it) meanwhile.
        Every claim counts an attempt (``attempts``): a process that dies while analysing cannot
        count its own. Each claim gets an id of its own (``claim_id``), so a replica can tell its
        claim from the one another replica made after its lease ran out (``release``)."""
        now = datetime.now(UTC)
        claimed: dict[str, Any] | None = await self.series.find_one_and_update(
            {"_id": series["_id"], "status": series["status"], "changed_at": series["changed_at"]},
            {
                "$set": {
                    "status": "analysing",
                    "lease_until": now + timedelta(seconds=lease_s),
                    "claim_id": uuid.uuid4().hex,
                },
                "$inc": {"attempts": 1},
            },
            return_document=ReturnDocument.AFTER,
        )
        return claimed

    async def release(self, series: dict[str, Any]) -> bool:
        """Give up a claim whose analysis was stopped (the replica is shutting down): the series can
        be claimed again at once, and the attempt does not count. Only this very claim is released,
        not one another replica made after its lease ran out, and only while no outcome is recorded
        for it (``decide``): a recorded outcome is published by this claim (``AnalysisService``
        publishes it before it stops) or, failing that, by the next claim after the lease, so that one
        claim publishes one event. True if released."""
        released = await self.series.update_one(
            {
                "_id": series["_id"],
                "status": "analysing",
                "changed_at": series["changed_at"],
                "claim_id": series["claim_id"],
                "pending_event.envelope": {"$exists": False},
            },
            {"$set": {"lease_until": datetime.now(UTC)}, "$inc": {"attempts": -1}},
        )
        return bool(released.modified_count)

    async def held(self, series: dict[str, Any]) -> dict[str, Any] | None:
        """The series as it is now if this very claim still holds it (unchanged, not taken over)."""
        found: dict[str, Any] | None = await self.series.find_one(
            {
                "_id": series["_id"],
                "status": "analysing",
                "changed_at": series["changed_at"],
                "claim_id": series["claim_id"],
            }
        )
        return found

    async def retry_later(self, series: dict[str, Any], delay_s: float, *, counted: bool) -> None:
        """Let the series be claimed again after ``delay_s`` (its attempt not counted when a
        dependency outage, not the analysis, failed it)."""
        update: dict[str, Any] = {"$set": {"lease_until": datetime.now(UTC) + timedelta(seconds=delay_s)}}
        if not counted:
            update["$inc"] = {"attempts": -1}
        # This very claim: a replica whose lease ran out must not shorten the lease of the replica
        # that took the series over, nor give back its attempt.
        mine = {"claim_id": series["claim_id"]} if "claim_id" in series else {}
        await self.series.update_one(
            {"_id": series["_id"], "status": "analysing", "changed_at": series["changed_at"], **mine}, update
        )

    async def decide(self, series: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any] | None:
        """Record the claim's outcome event (``pending_event``: its topic, outcome, reason code and
        envelope as JSON) before it is published: an outbox. Returns what to publish: ``outcome``,
        or the outcome another replica recorded first for the same claim (its lease ran out while
        this one analysed), so that one claim publishes one event, whichever replica runs it. None
        if the series changed since it was claimed (``_changed`` drops a recorded outcome): a new run
        follows, and no outcome of this one is published. A process that dies after publishing
        publishes the recorded event again at the next claim (``AnalysisService.analyse``), not the
        outcome of a new run under the same event id."""
        claim = {"_id": series["_id"], "status": "analysing", "changed_at": series["changed_at"]}
        # Nothing recorded for this member set yet. An outcome recorded for another member set (a
        # member settled, and the process died before the series was marked changed) is replaced:
        # this run analysed the members the series has now.
        unrecorded = [
            {"pending_event.envelope": {"$exists": False}},
            {"pending_event.analysis_id": {"$ne": outcome["analysis_id"]}},
        ]
        recorded = await self.series.update_one(
            {**claim, "$or": unrecorded}, {"$set": {"pending_event": outcome}}
        )
        if recorded.matched_count:
            return outcome
        current = await self.series.find_one(claim, {"pending_event": 1})
        earlier = (current or {}).get("pending_event") or {}
        if earlier.get("analysis_id") == outcome["analysis_id"] and earlier.get("envelope"):
            return dict(earlier)
        return None

    async def mark_changed(self, series: dict[str, Any]) -> None:
        """Mark a claimed series changed (``_changed``), unless it changed already."""
        await self.series.update_one(
            {"_id": series["_id"], "status": "analysing", "changed_at": series["changed_at"]},
            self._changed(series.get("correlation_id") or series["_id"]),
        )

    async def finish(
        self, series: dict[str, Any], analysis_id: str, outcome: str, reason_code: str | None = None
    ) -> None:
        """Done, unless a member arrived while analysing (then it stays collecting and runs again)."""
        await self.series.update_one(
            {"_id": series["_id"], "status": "analysing", "changed_at": series["changed_at"]},
            {
                "$set": {
                    "status": outcome,
                    "analysis_id": analysis_id,
                    "reason_code": reason_code,
                    "finished_at": datetime.now(UTC),
                }
            },
        )

    async def reopen(
        self,
        *,
        status: str,
        reason_code: str | None = None,
        tenant: str | None = None,
        series_key: str | None = None,
        dry_run: bool = False,
        into: list[str] | None = None,
    ) -> list[str]:
        """An operator's re-run: the finished series that match are assembled and analysed again, as
        if they had changed (new attempts, a new outcome event). Returns their ids, appended to
        ``into`` (when given) as each is marked, so a caller can tell how far a failed run got."""
        query: dict[str, Any] = {"status": status}
        if reason_code == UNRECORDED:
            query["reason_code"] = {"$exists": False}
        elif reason_code is not None:
            query["reason_code"] = reason_code
        if tenant is not None:
            query["tenant"] = tenant
        if series_key is not None:
            query["series_key"] = series_key
        found = [doc async for doc in self.series.find(query, {"_id": 1, "correlation_id": 1})]
        reopened: list[str] = into if into is not None else []
        for doc in found:
            if dry_run:
                reopened.append(doc["_id"])
                continue
            update = self._changed(doc.get("correlation_id") or doc["_id"])
            # Only if it is still as found: a series that changed meanwhile is being assembled anyway.
            done = await self.series.update_one({"_id": doc["_id"], "status": status}, update)
            if done.modified_count:
                reopened.append(doc["_id"])
        return reopened
