"""Re-de-identify released copies under the current rules (``enclave-deid-redo``).

A record made under an older revision (``enclave_deid.revision``) is redone from its original: the
record is claimed like a delivery claims it (``DeidRecords.claim_for_redo``: the service waits for
the claim, and takes it over only after ``CLAIM_STALE_AFTER``), the original is read from the
originals bucket and must have the SHA-256 the record was made from, and it is de-identified by the
same pipeline as the service's into a **new object key**. The record then names the new copy, the
revision and the new outcome, with ``pending`` work tied to that outcome's event id: store (or
erase) the instance's linkage, publish the outcome for every upload told of the old copy, then delete
every version of the old key. Nothing outside the record changes before that commit. ``pending`` is
finished by any later run (or by this one at once), so a run killed at any point leaves no record
naming a deleted object, no linkage of a copy the record does not name, and no copy that a later run
does not delete; a new version the service processes meanwhile turns ``pending`` into deletions only
(``DeidRecords.claim``). Only a failing burned-in check withdraws a copy (``instance.quarantined``
for each upload, its linkage erased, the copy deleted); a limit, an unreadable original, an error in
de-identification or a changed pseudonym or UID refuses the instance (``refused_<code>``, the copy
untouched, the refusal noted on the record), and ``withdraw_unredoable`` withdraws the copies that
can never be redone (:data:`UNREDOABLE`).

One instance at a time, records read a page at a time. Nothing printed or raised names more than
opaque keys.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from enclave_common import topics
from enclave_common.envelope import Envelope, EventData, derived_event_id
from enclave_common.errors import PermanentError
from enclave_common.events import InstanceDeidentified, InstanceQuarantined, ObjectRef
from enclave_common.study_key_objects import StudyKeyShredded

from enclave_deid.handlers import SOURCE, deid_object_key
from enclave_deid.linkage import LinkageVault
from enclave_deid.pipeline import (
    WITHHELD,
    OriginalChanged,
    OriginalUndecryptable,
    Quarantined,
    Released,
    describe_policy,
)
from enclave_deid.policy import DeidPolicy
from enclave_deid.records import DEIDENTIFIED, PROCESSING, QUARANTINED, DeidRecords, claim_is_stale
from enclave_deid.revision import DEID_REVISION, revision_of

#: S3 error codes of an original that is not there (``enclave_common.storage.s3_error``).
MISSING_OBJECT = frozenset({"s3_NoSuchKey", "s3_NoSuchVersion", "s3_404"})
#: Refusals after which the copy can never be made again (``--withdraw-unredoable`` withdraws it).
UNREDOABLE = frozenset({"study_key_shredded", "original_missing", "original_changed"})


class Pipeline(Protocol):
    bucket: str

    async def run_original(
        self,
        tenant: str,
        study_key: str,
        original: ObjectRef,
        policy: DeidPolicy,
        object_key: str,
        *,
        expected_sha256: str | None = None,
    ) -> Released | Quarantined: ...


class Store(Protocol):
    async def delete_all_versions(self, bucket: str, key: str) -> int: ...


class Publisher(Protocol):
    async def publish(self, topic: str, envelope: Envelope, *, key: str) -> None: ...


@dataclass
class RedoTally:
    """What a run found (``selected``, by reason) and did (``outcomes``): counts only."""

    selected: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {
            "selected": sum(self.selected.values()),
            "by_reason": dict(sorted(self.selected.items())),
            "outcomes": dict(sorted(self.outcomes.items())),
        }


def selection_reason(doc: dict[str, Any]) -> str:
    """Why a record is taken: ``interrupted`` (a redo's claim), ``unfinished`` (a redo's pending
    work), ``refused_<code>`` (an earlier run refused it), else ``revision_<n>`` (made under revision n)."""
    if "redo" in doc:
        return "interrupted"
    if "pending" in doc:
        return "unfinished"
    if "redo_refused" in doc:
        return f"refused_{doc['redo_refused']['code']}"
    return f"revision_{revision_of(doc)}"


class CopyRedo:
    """One run of the command: its claims, events and object keys derive from ``correlation_id``."""

    def __init__(
        self,
        *,
        records: DeidRecords,
        vault: LinkageVault,
        pipeline: Pipeline,
        store: Store,
        publisher: Publisher,
        policy_for: Callable[[str], DeidPolicy],
        originals_bucket: str,
        actor: str,
        correlation_id: str,
        progress: Callable[[RedoTally], None] | None = None,
        withdraw_unredoable: bool = False,
    ) -> None:
        self.records = records
        self.vault = vault
        self.pipeline = pipeline
        self.store = store
        self.publisher = publisher
        self.policy_for = policy_for
        self.originals_bucket = originals_bucket
        self.actor = actor
        self.correlation_id = correlation_id
        self.claimant = f"redo:{correlation_id}"
        self.progress = progress
        self.withdraw_unredoable = withdraw_unredoable
        self.tally = RedoTally()

    async def run(
        self, tenant: str, *, study_key: str | None = None, everything: bool = False, dry_run: bool = False
    ) -> RedoTally:
        """Redo the selected records of ``tenant`` (``everything``: every released one, whatever its
        revision); with ``dry_run`` only count them by reason."""
        below = None if everything else DEID_REVISION
        async for doc in self.records.redo_candidates(tenant, study_key, below):
            self.tally.selected[selection_reason(doc)] += 1
            if not dry_run:
                self.tally.outcomes[await self.handle(doc, everything=everything)] += 1
            if self.progress is not None:
                self.progress(self.tally)
        return self.tally

    async def handle(self, doc: dict[str, Any], *, everything: bool = False) -> str:
        """Finish what an earlier run left, then redo the record if it is still stale; the outcome's name."""
        if "redo" in doc:
            if doc.get("status") == PROCESSING and not claim_is_stale(doc):
                return "busy"
            if not await self.records.restore_redo(doc):
                return "busy"
            doc = await self.records.get(doc["_id"]) or {}
        finished = False
        if "pending" in doc:
            await self.settle(doc)
            finished = True
            doc = await self.records.get(doc["_id"]) or {}
        if doc.get("status") != DEIDENTIFIED or "pending" in doc:
            return "finished" if finished else "changed"
        if not everything and revision_of(doc) >= DEID_REVISION:
            return "finished" if finished else "changed"
        return await self.redo(doc)

    async def redo(self, doc: dict[str, Any]) -> str:
        tenant, instance_key = doc["tenant"], doc["instance_key"]
        data = doc["outcome"]["data"]
        study_key = data["study_key"]
        outcome_event_id = self._outcome_event_id(doc)
        target = self._target(doc)
        target_key = target["key"]
        if not await self.records.claim_for_redo(doc, self.claimant, target):
            return "busy"
        original = (
            ObjectRef(**doc["original"])
            if doc.get("original")
            # Records before the eighteenth session: ingest's key of the first upload's original.
            else ObjectRef(bucket=self.originals_bucket, key=f"originals/{data['instance_upload_id']}")
        )
        try:
            outcome: Released | Quarantined = await self.pipeline.run_original(
                tenant,
                study_key,
                original,
                self.policy_for(tenant),
                target_key,
                expected_sha256=doc["source_sha256"],
            )
        except (*WITHHELD, StudyKeyShredded, OriginalChanged, OriginalUndecryptable) as exc:
            # A limit, an unreadable original or an error inside de-identification (which may be a
            # lack of memory or a bug) says nothing about what the copy holds: it is not withdrawn.
            return await self._refuse(doc, exc.code)
        except PermanentError as exc:
            if exc.code not in MISSING_OBJECT:
                await self._give_back(doc)
                raise
            return await self._refuse(doc, "original_missing")
        except BaseException:
            await self._give_back(doc)
            raise
        if isinstance(outcome, Released) and _identity(outcome) != _identity(data):
            # Pseudonym and UIDs are keyed on inputs a redo does not change: other ones mean another
            # pseudonym key or salt than at release, and the new copy would split its study.
            return await self._refuse(doc, "identity_changed")
        if isinstance(outcome, Released):
            profile, options = describe_policy(self.policy_for(tenant))
            released = InstanceDeidentified.model_validate(
                {
                    **data,
                    "patient_pseudonym": outcome.patient_pseudonym,
                    "deid_study_uid": outcome.deid_study_uid,
                    "deid_series_uid": outcome.deid_series_uid,
                    "deid_instance_uid": outcome.deid_instance_uid,
                    "object": outcome.object.model_dump(),
                    "profile": profile,
                    "options": options,
                }
            )
            sealed = await self.vault.seal(
                outcome.linkage, instance_key, study_key, patient_key=data.get("patient_key")
            )
            fields = {
                "status": DEIDENTIFIED,
                "outcome": _outcome(topics.INSTANCE_DEIDENTIFIED, released, outcome_event_id),
                "object": outcome.object.model_dump(),
                "patient_pseudonym": outcome.patient_pseudonym,
                "kek_id": outcome.kek_id,
                "size": outcome.size,
            }
            done = await self._finish(doc, original, fields, linkage={"store": sealed})
            return "redone" if done else "busy"
        # The burned-in check of the current rules releases nothing of this instance: withdrawn.
        return await self._withdraw(doc, original, outcome.code, outcome.reason, f"withdrawn_{outcome.code}")

    async def _withdraw(
        self, doc: dict[str, Any], original: ObjectRef | None, code: str, reason: str, name: str
    ) -> str:
        """Record the copy as withdrawn (``instance.quarantined`` with ``code``, linkage erased, every
        version of the copy and of the run's target deleted, all as ``pending`` work)."""
        data = doc["outcome"]["data"]
        outcome_event_id = self._outcome_event_id(doc)
        withheld = InstanceQuarantined(
            upload_id=data["upload_id"],
            instance_upload_id=data["instance_upload_id"],
            study_key=data["study_key"],
            series_key=data["series_key"],
            reason_code=code,
            reason=reason,
        )
        fields = {
            "status": QUARANTINED,
            "outcome": _outcome(topics.INSTANCE_QUARANTINED, withheld, outcome_event_id),
        }
        done = await self._finish(
            doc,
            original,
            fields,
            linkage={"erase": True},
            unset=("object", "patient_pseudonym", "kek_id", "size"),
        )
        return name if done else "busy"

    async def _finish(
        self,
        doc: dict[str, Any],
        original: ObjectRef | None,
        fields: dict[str, Any],
        *,
        linkage: dict[str, Any],
        unset: tuple[str, ...] = (),
    ) -> bool:
        """Commit the redo's outcome while the claim holds, then do its ``pending`` work; False when
        the claim was taken over (the run held it past ``CLAIM_STALE_AFTER``)."""
        now = datetime.now(UTC)
        old = {"bucket": doc["object"]["bucket"], "key": doc["object"]["key"]}
        target = self._target(doc)
        common: dict[str, Any] = {"revision": DEID_REVISION, "redone_at": now, "finished_at": now}
        if original is not None:
            common["original"] = original.model_dump()
        pending = {
            "publish": True,
            "event_id": fields["outcome"]["event_id"],
            # The run's target too: a withdrawal names no copy, and settle keeps the one named.
            "purge": [old, target],
            "linkage": linkage,
        }
        done = await self.records.finish_redo(
            doc["_id"], self.claimant, {**common, **fields}, unset=(*unset, "redo_refused"), pending=pending
        )
        if done is None:
            # Nothing names what this run wrote, and nothing was changed beside it.
            await self.store.delete_all_versions(target["bucket"], target["key"])
            return False
        await self.settle(done)
        return True

    def _outcome_event_id(self, doc: dict[str, Any]) -> str:
        """The id of the outcome this run records for the instance (its events' ids derive from it)."""
        return derived_event_id(self.correlation_id, "deid.redo", doc["instance_key"])

    def _target(self, doc: dict[str, Any]) -> dict[str, str]:
        """The key this run writes the instance's new copy to (a new one per run and instance)."""
        key = deid_object_key(self._outcome_event_id(doc), doc["instance_key"])
        return {"bucket": self.pipeline.bucket, "key": key}

    async def _refuse(self, doc: dict[str, Any], code: str) -> str:
        """Hand the claim back, the copy untouched, and note the refusal on the record (so the next
        run reports it as known, ``still_refused_<code>``); with ``withdraw_unredoable`` a copy that
        can never be redone is withdrawn instead."""
        if self.withdraw_unredoable and code in UNREDOABLE:
            reason = (
                f"a released copy that cannot be made again under the current rules ({code}) was "
                "withdrawn by enclave-deid-redo --withdraw-unredoable"
            )
            return await self._withdraw(
                doc, None, f"unredoable_{code}", reason, f"withdrawn_unredoable_{code}"
            )
        await self._give_back(doc)
        known = (doc.get("redo_refused") or {}).get("code") == code
        await self.records.note_refused(doc["_id"], doc["outcome"]["event_id"], code)
        return f"still_refused_{code}" if known else f"refused_{code}"

    async def settle(self, doc: dict[str, Any]) -> None:
        """A redo's pending work, each step idempotent: when the record's outcome is still the one the
        work was left for (not replaced by the service's new version of the instance), store or erase
        the instance's linkage and publish the outcome for every upload told of the old copy (ids
        derived from the outcome's, so publishing again is a redelivery); then delete every version
        of each replaced key the record no longer names."""
        fresh = await self.records.get(doc["_id"])
        if fresh is None or "pending" not in fresh:
            return
        pending = fresh["pending"]
        outcome = fresh.get("outcome") or {}
        current = (
            fresh.get("status") != PROCESSING
            and pending.get("event_id") is not None
            and pending.get("event_id") == outcome.get("event_id")
        )
        if current and "linkage" in pending:
            linkage = pending["linkage"]
            if "store" in linkage:
                await self.vault.save(linkage["store"])
            elif linkage.get("erase"):
                await self.vault.erase_instance(fresh["tenant"], fresh["instance_key"])
        if current and pending.get("publish"):
            for envelope, key in self._envelopes(fresh):
                await self.publisher.publish(outcome["topic"], envelope, key=key)
            await self.records.mark_published(fresh["_id"], outcome["event_id"])
        named = fresh.get("object") or {}
        for ref in pending.get("purge", []):
            if (ref["bucket"], ref["key"]) != (named.get("bucket"), named.get("key")):
                await self.store.delete_all_versions(ref["bucket"], ref["key"])
        await self.records.clear_pending(fresh["_id"], pending)

    def _envelopes(self, doc: dict[str, Any]) -> list[tuple[Envelope, str]]:
        outcome = doc["outcome"]
        data = outcome["data"]
        uploads = {data["instance_upload_id"]: data["upload_id"]}
        for emitted in doc.get("emitted") or ():
            uploads.setdefault(emitted["instance_upload_id"], emitted["upload_id"])
        kind = topics.event_type(outcome["topic"])
        out = []
        for instance_upload_id, upload_id in uploads.items():
            out.append(
                (
                    Envelope(
                        id=derived_event_id(outcome["event_id"], kind, instance_upload_id),
                        type=kind,
                        source=SOURCE,
                        tenant=doc["tenant"],
                        actor=self.actor,
                        correlation_id=self.correlation_id,
                        data={**data, "upload_id": upload_id, "instance_upload_id": instance_upload_id},
                    ),
                    data["series_key"],
                )
            )
        return out

    async def _give_back(self, doc: dict[str, Any]) -> None:
        """Return the claim: the record's outcome stands; the target key, if written, is purged."""
        claimed = await self.records.get(doc["_id"])
        if claimed is None or claimed.get("claimed_by") != self.claimant or "redo" not in claimed:
            return
        if await self.records.restore_redo(claimed):
            restored = await self.records.get(doc["_id"])
            if restored is not None and "pending" in restored:
                await self.settle(restored)


def _identity(released: Released | dict[str, Any]) -> tuple[str, ...]:
    names = ("patient_pseudonym", "deid_study_uid", "deid_series_uid", "deid_instance_uid")
    if isinstance(released, dict):
        return tuple(str(released.get(name)) for name in names)
    return tuple(str(getattr(released, name)) for name in names)


def _outcome(topic: str, data: EventData, event_id: str) -> dict[str, Any]:
    return {"topic": topic, "data": data.model_dump(mode="json"), "event_id": event_id}
