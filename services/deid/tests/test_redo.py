"""``enclave-deid-redo`` without network (``enclave_deid.redo``, the records' redo claims): which
records are selected, what a redo changes, that a second run redoes nothing, refusals (original
changed, study shredded, original missing), claim contention with the service, and runs stopped
part-way finished by the next one. The de-identification itself is the service's pipeline (its own
tests); here it is a fake that says what it would have written."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from deid_fakemongo import FakeDatabase
from enclave_common import topics
from enclave_common.crypto import LocalKeyring
from enclave_common.envelope import Envelope, derived_event_id, new_event_id
from enclave_common.errors import PermanentError
from enclave_common.events import ObjectRef
from enclave_common.study_key_objects import StudyKeyShredded
from enclave_deid.deidentify import LinkageRecord
from enclave_deid.handlers import InstanceStoredHandler
from enclave_deid.linkage import LinkageVault
from enclave_deid.pipeline import (
    InstanceTooComplex,
    InstanceTooLarge,
    OriginalChanged,
    Quarantined,
    Released,
    UnreadableInstance,
    UnsupportedInstance,
)
from enclave_deid.policy import DeidPolicy
from enclave_deid.records import DeidRecords, InstanceBeingProcessed, record_id
from enclave_deid.redo import CopyRedo
from enclave_deid.revision import DEID_REVISION

TENANT = "hospital-a"
DEID_BUCKET = "enclave-deidentified"
SHA = "a" * 64


class FakePipeline:
    bucket = DEID_BUCKET

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        #: Per instance key: an exception to raise or a Quarantined to return.
        self.results: dict[str, BaseException | Quarantined] = {}
        self.during: Callable[[], Any] | None = None

    async def run_original(
        self,
        tenant: str,
        study_key: str,
        original: ObjectRef,
        policy: DeidPolicy,
        object_key: str,
        *,
        expected_sha256: str | None = None,
    ) -> Released | Quarantined:
        self.calls.append(
            {
                "tenant": tenant,
                "study_key": study_key,
                "original": original,
                "key": object_key,
                "sha": expected_sha256,
            }
        )
        if self.during is not None:
            await self.during()
        for key, result in self.results.items():
            if original.key.endswith(key):
                if isinstance(result, BaseException):
                    raise result
                return result
        return Released(
            object=ObjectRef(bucket=DEID_BUCKET, key=object_key, version_id="v-new"),
            patient_pseudonym="PSEUDO-OLD",  # the same keys: the same pseudonym and UIDs
            deid_study_uid="2.25.1",
            deid_series_uid="2.25.2",
            deid_instance_uid="2.25.3",
            linkage=LinkageRecord(tenant, "PSEUDO-OLD", "PID", "NAME", "", -7, {"2.25.3": "1.2.3"}),
            kek_id="deid-kek:1",
            size=1234,
        )


class FakeStore:
    def __init__(self) -> None:
        self.deleted: list[tuple[str, str]] = []

    async def delete_all_versions(self, bucket: str, key: str) -> int:
        self.deleted.append((bucket, key))
        return 1


class FakePublisher:
    def __init__(self, fail_after: int | None = None) -> None:
        self.published: list[tuple[str, Envelope, str]] = []
        self.fail_after = fail_after

    async def publish(self, topic: str, envelope: Envelope, *, key: str) -> None:
        if self.fail_after is not None and len(self.published) >= self.fail_after:
            raise ConnectionError("Kafka is gone")
        self.published.append((topic, envelope, key))


class World:
    def __init__(self) -> None:
        self.db = FakeDatabase()
        self.records = DeidRecords(self.db)  # type: ignore[arg-type]
        self.vault = LinkageVault(self.db, LocalKeyring.generate("linkage"))  # type: ignore[arg-type]
        self.pipeline = FakePipeline()
        self.store = FakeStore()
        self.publisher = FakePublisher()

    def redo(self, actor: str = "user:privacy-officer", *, withdraw_unredoable: bool = False) -> CopyRedo:
        return CopyRedo(
            records=self.records,
            vault=self.vault,
            pipeline=self.pipeline,
            store=self.store,
            publisher=self.publisher,
            policy_for=lambda tenant: DeidPolicy(retain_longitudinal_modified_dates=True),
            originals_bucket="enclave-originals",
            actor=actor,
            correlation_id=new_event_id(),
            withdraw_unredoable=withdraw_unredoable,
        )

    def record(
        self, n: int, *, tenant: str = TENANT, study: str = "study-1", **fields: Any
    ) -> dict[str, Any]:
        """A finished record as the service writes it (``revision`` absent: before the eighteenth session)."""
        instance_key = f"inst-{n}"
        data = {
            "upload_id": f"up-{n}",
            "instance_upload_id": f"iu-{n}",
            "patient_pseudonym": "PSEUDO-OLD",
            "patient_key": "pk-1",
            "study_key": study,
            "series_key": "series-1",
            "instance_key": instance_key,
            "deid_study_uid": "2.25.1",
            "deid_series_uid": "2.25.2",
            "deid_instance_uid": "2.25.3",
            "object": {"bucket": DEID_BUCKET, "key": f"deidentified/old-{n}", "version_id": "v-old"},
            "profile": "PS3.15 2024b Basic Application Confidentiality Profile",
            "options": ["retain_longitudinal_modified_dates"],
        }
        doc = {
            "_id": record_id(tenant, instance_key),
            "tenant": tenant,
            "instance_key": instance_key,
            "status": "deidentified",
            "source_sha256": SHA,
            "claimed_by": new_event_id(),
            "claimed_at": datetime.now(UTC) - timedelta(days=30),
            "outcome": {"topic": topics.INSTANCE_DEIDENTIFIED, "data": data, "event_id": new_event_id()},
            "study_key": study,
            "patient_pseudonym": "PSEUDO-OLD",
            "object": dict(data["object"]),  # type: ignore[call-overload]
            "kek_id": "deid-kek:1",
            "size": 1000,
            **fields,
        }
        self.db["deidentified"].docs[doc["_id"]] = copy.deepcopy(doc)
        return doc

    def doc(self, n: int, tenant: str = TENANT) -> dict[str, Any]:
        return self.db["deidentified"].docs[record_id(tenant, f"inst-{n}")]


async def test_only_stale_released_copies_of_the_tenant_and_study_are_selected() -> None:
    world = World()
    world.record(1)  # revision 0 (no field)
    world.record(2, revision=0)
    world.record(3, revision=DEID_REVISION)  # current
    world.record(4, status="quarantined")
    world.record(5, tenant="hospital-b")
    world.record(6, study="study-2")
    tally = await world.redo().run(TENANT, study_key="study-1")
    assert tally.summary() == {
        "selected": 2,
        "by_reason": {"revision_0": 2},
        "outcomes": {"redone": 2},
    }
    assert sorted(call["original"].key for call in world.pipeline.calls) == [
        "originals/iu-1",
        "originals/iu-2",
    ]
    assert world.doc(3)["object"]["key"] == "deidentified/old-3"
    assert world.doc(6)["object"]["key"] == "deidentified/old-6"
    assert world.doc(5, "hospital-b")["object"]["key"] == "deidentified/old-5"
    everything = await world.redo().run(TENANT, everything=True)
    assert everything.selected == {"revision_1": 3, "revision_0": 1}  # 1, 2 (just redone), 3 and 6
    assert everything.outcomes == {"redone": 4}


async def test_dry_run_counts_by_reason_and_changes_nothing() -> None:
    world = World()
    world.record(1)
    world.record(2, revision=0)
    world.record(3, pending={"publish": False, "purge": [{"bucket": DEID_BUCKET, "key": "deidentified/x"}]})
    before = {k: dict(v) for k, v in world.db["deidentified"].docs.items()}
    tally = await world.redo().run(TENANT, dry_run=True)
    assert tally.summary() == {"selected": 3, "by_reason": {"revision_0": 2, "unfinished": 1}, "outcomes": {}}
    assert world.db["deidentified"].docs == before
    assert world.pipeline.calls == world.publisher.published == world.store.deleted == []


async def test_a_redo_replaces_the_copy_deletes_the_old_key_and_tells_every_upload() -> None:
    world = World()
    old = world.record(1, emitted=[{"upload_id": "up-dup", "instance_upload_id": "iu-dup"}])
    redo = world.redo(actor="user:po")
    assert (await redo.run(TENANT)).outcomes == {"redone": 1}
    call = world.pipeline.calls[0]
    assert call["sha"] == SHA and call["study_key"] == "study-1"
    assert call["original"] == ObjectRef(bucket="enclave-originals", key="originals/iu-1")
    doc = world.doc(1)
    assert doc["status"] == "deidentified" and doc["revision"] == DEID_REVISION
    assert doc["object"] == {"bucket": DEID_BUCKET, "key": call["key"], "version_id": "v-new"}
    assert call["key"] != old["object"]["key"] and call["key"].startswith("deidentified/")
    assert doc["original"] == {"bucket": "enclave-originals", "key": "originals/iu-1", "version_id": None}
    assert doc["outcome"]["event_id"] == derived_event_id(redo.correlation_id, "deid.redo", "inst-1")
    assert doc["outcome"]["data"]["object"] == doc["object"]
    assert doc["outcome"]["data"]["instance_upload_id"] == "iu-1"  # the same instance ids
    assert "pending" not in doc and "redo" not in doc
    assert world.store.deleted == [(DEID_BUCKET, "deidentified/old-1")]
    published = {
        env.data["instance_upload_id"]: (topic, env, key) for topic, env, key in world.publisher.published
    }
    assert set(published) == {"iu-1", "iu-dup"}
    for iuid, (topic, env, key) in published.items():
        assert topic == topics.INSTANCE_DEIDENTIFIED and key == "series-1"
        assert env.data["object"] == doc["object"] and env.actor == "user:po"
        assert env.correlation_id == redo.correlation_id
        assert env.id == derived_event_id(doc["outcome"]["event_id"], env.type, iuid)
    assert published["iu-dup"][1].data["upload_id"] == "up-dup"
    assert await world.vault.collection.find_one({"_id": f"{TENANT}|inst-1"}) is not None


async def test_a_second_run_redoes_nothing() -> None:
    world = World()
    world.record(1)
    world.record(2)
    assert (await world.redo().run(TENANT)).outcomes == {"redone": 2}
    calls, published, deleted = (
        len(world.pipeline.calls),
        len(world.publisher.published),
        len(world.store.deleted),
    )
    again = await world.redo().run(TENANT)
    assert again.summary() == {"selected": 0, "by_reason": {}, "outcomes": {}}
    assert (len(world.pipeline.calls), len(world.publisher.published), len(world.store.deleted)) == (
        calls,
        published,
        deleted,
    )


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (OriginalChanged("sha differs"), "refused_original_changed"),
        (StudyKeyShredded("gone"), "refused_study_key_shredded"),
        (
            PermanentError("object store get failed (NoSuchKey)", code="s3_NoSuchKey"),
            "refused_original_missing",
        ),
    ],
)
async def test_a_refused_instance_keeps_its_copy_and_the_run_goes_on(error: Exception, outcome: str) -> None:
    world = World()
    world.record(1)
    world.record(2)
    world.pipeline.results["iu-1"] = error
    tally = await world.redo().run(TENANT)
    assert tally.outcomes == {outcome: 1, "redone": 1}
    doc = world.doc(1)
    assert doc["status"] == "deidentified" and doc["object"]["key"] == "deidentified/old-1"
    assert "revision" not in doc and "redo" not in doc and "pending" not in doc
    assert (DEID_BUCKET, "deidentified/old-1") not in world.store.deleted
    assert {env.data["instance_upload_id"] for _, env, _ in world.publisher.published} == {"iu-2"}
    assert doc["redo_refused"]["code"] == outcome.removeprefix("refused_")
    # still stale: the next run tries it again, and reports a refusal it knows as such
    dry = await world.redo().run(TENANT, dry_run=True)
    assert dry.selected == {outcome: 1}
    assert (await world.redo().run(TENANT)).outcomes == {f"still_{outcome}": 1}
    assert world.doc(1)["object"]["key"] == "deidentified/old-1"


async def test_the_service_waits_for_a_redo_claim_and_the_redo_for_a_service_claim() -> None:
    world = World()
    world.record(1)
    seen: list[type[BaseException]] = []

    async def a_redelivery_arrives() -> None:
        with pytest.raises(InstanceBeingProcessed) as raised:
            await world.records.claim(TENANT, "inst-1", SHA, new_event_id())
        seen.append(type(raised.value))

    world.pipeline.during = a_redelivery_arrives
    assert (await world.redo().run(TENANT)).outcomes == {"redone": 1}
    assert seen == [InstanceBeingProcessed]
    # the redelivery, retried once the redo is done, re-emits the new outcome
    done = await world.records.claim(TENANT, "inst-1", SHA, new_event_id())
    assert done is not None and done["outcome"]["data"]["object"]["version_id"] == "v-new"

    # a record the service is working on (a new version) is left alone
    world.record(2)
    assert await world.records.claim(TENANT, "inst-2", "b" * 64, "service-event") is None
    assert (await world.redo().run(TENANT)).summary()["selected"] == 0
    assert world.doc(2)["claimed_by"] == "service-event"


async def test_a_fresh_claim_of_another_run_is_busy_and_a_stale_one_is_taken_over() -> None:
    world = World()
    target = {"bucket": DEID_BUCKET, "key": "deidentified/half-written"}
    fresh = {
        "status": "processing",
        "claimed_by": "redo:other",
        "claimed_at": datetime.now(UTC),
        "redo": {"target": target},
    }
    world.record(1, **fresh)
    assert (await world.redo().run(TENANT)).outcomes == {"busy": 1}
    assert world.doc(1)["claimed_by"] == "redo:other" and world.pipeline.calls == []

    world.doc(1)["claimed_at"] = datetime.now(UTC) - timedelta(minutes=11)  # its holder died
    tally = await world.redo().run(TENANT)
    assert tally.selected == {"interrupted": 1} and tally.outcomes == {"redone": 1}
    assert (DEID_BUCKET, "deidentified/half-written") in world.store.deleted
    assert (DEID_BUCKET, "deidentified/old-1") in world.store.deleted
    assert world.doc(1)["revision"] == DEID_REVISION and "redo" not in world.doc(1)


async def test_the_service_takes_over_a_dead_redo_claim_and_re_emits_the_old_outcome() -> None:
    world = World()
    target = {"bucket": DEID_BUCKET, "key": "deidentified/half-written"}
    stale = datetime.now(UTC) - timedelta(minutes=11)
    world.record(1, status="processing", claimed_by="redo:dead", claimed_at=stale, redo={"target": target})
    done = await world.records.claim(TENANT, "inst-1", SHA, new_event_id())
    assert done is not None and done["object"]["key"] == "deidentified/old-1"
    doc = world.doc(1)
    assert doc["status"] == "deidentified" and "redo" not in doc
    assert doc["pending"] == {"publish": False, "purge": [target]}  # the next run deletes what it wrote
    tally = await world.redo().run(TENANT)
    assert tally.selected == {"unfinished": 1} and tally.outcomes == {"redone": 1}
    assert (DEID_BUCKET, "deidentified/half-written") in world.store.deleted


async def test_a_run_that_fails_mid_instance_gives_the_claim_back_and_loses_no_copy() -> None:
    world = World()
    world.record(1)
    world.pipeline.results["iu-1"] = RuntimeError("the object store went away")
    with pytest.raises(RuntimeError):
        await world.redo().run(TENANT)
    doc = world.doc(1)
    assert doc["status"] == "deidentified" and doc["object"]["key"] == "deidentified/old-1"
    assert "redo" not in doc and "pending" not in doc
    written = world.pipeline.calls[0]["key"]
    assert world.store.deleted == [(DEID_BUCKET, written)]  # whatever it may have written
    del world.pipeline.results["iu-1"]
    assert (await world.redo().run(TENANT)).outcomes == {"redone": 1}


async def test_a_run_stopped_before_it_published_is_finished_by_the_next() -> None:
    world = World()
    world.record(1)
    world.publisher = FakePublisher(fail_after=0)
    with pytest.raises(ConnectionError):
        await world.redo().run(TENANT)
    doc = world.doc(1)
    # the record names the new copy (it exists), the old one is not deleted before the event is out
    assert doc["object"]["version_id"] == "v-new" and doc["pending"]["publish"] is True
    assert world.store.deleted == []
    world.publisher = FakePublisher()
    tally = await world.redo().run(TENANT)
    assert tally.selected == {"unfinished": 1} and tally.outcomes == {"finished": 1}
    assert len(world.pipeline.calls) == 1  # not de-identified again
    [(_, env, _)] = world.publisher.published
    assert env.id == derived_event_id(doc["outcome"]["event_id"], env.type, "iu-1")
    assert world.store.deleted == [(DEID_BUCKET, "deidentified/old-1")]
    assert "pending" not in world.doc(1)


async def test_a_copy_the_current_rules_would_not_release_is_withdrawn() -> None:
    world = World()
    world.record(1)
    await world.vault.collection.replace_one({"_id": f"{TENANT}|inst-1"}, {"_id": f"{TENANT}|inst-1"})
    world.pipeline.results["iu-1"] = Quarantined("BurnedInAnnotation is YES", code="burned_in_risk")
    assert (await world.redo().run(TENANT)).outcomes == {"withdrawn_burned_in_risk": 1}
    doc = world.doc(1)
    assert doc["status"] == "quarantined" and "object" not in doc and doc["revision"] == DEID_REVISION
    # the old copy, and the run's own key (nothing was written there; a withdrawal names no copy)
    assert world.store.deleted == [
        (DEID_BUCKET, "deidentified/old-1"),
        (DEID_BUCKET, world.pipeline.calls[0]["key"]),
    ]
    [(topic, env, _)] = world.publisher.published
    assert topic == topics.INSTANCE_QUARANTINED and env.data["reason_code"] == "burned_in_risk"
    assert env.data["instance_upload_id"] == "iu-1"
    assert await world.vault.collection.find_one({"_id": f"{TENANT}|inst-1"}) is None
    assert (await world.redo().run(TENANT)).summary()["selected"] == 0


async def test_a_recorded_original_is_used_rather_than_derived() -> None:
    world = World()
    world.record(1, original={"bucket": "enclave-originals", "key": "originals/first", "version_id": "v1"})
    await world.redo().run(TENANT)
    assert world.pipeline.calls[0]["original"] == ObjectRef(
        bucket="enclave-originals", key="originals/first", version_id="v1"
    )


class _Runtime:
    def __init__(self, publisher: FakePublisher) -> None:
        self.publisher = publisher


async def test_a_re_emitted_upload_is_noted_and_waits_when_a_redo_replaces_the_outcome() -> None:
    from enclave_common.events import InstanceStored

    world = World()
    world.record(1)
    handler = InstanceStoredHandler(_Runtime(world.publisher), None, world.records, world.vault)  # type: ignore[arg-type]
    stored = InstanceStored(
        upload_id="up-dup",
        instance_upload_id="iu-dup",
        patient_key="pk-1",
        study_key="study-1",
        series_key="series-1",
        instance_key="inst-1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        object=ObjectRef(bucket="enclave-originals", key="originals/iu-1"),
        sha256=SHA,
        size=10,
        kek_id="k",
        duplicate="duplicate",
    )
    cause = Envelope.for_topic(
        topics.INSTANCE_STORED,
        stored,
        source="ingest",
        tenant=TENANT,
        actor="service:ingest",
        correlation_id="c",
    )
    done = await world.records.claim(TENANT, "inst-1", SHA, cause.id)
    assert done is not None
    await handler._reemit(done, cause, stored)
    assert world.doc(1)["emitted"] == [{"upload_id": "up-dup", "instance_upload_id": "iu-dup"}]
    # the redo tells the duplicate upload of its copy too
    await world.redo().run(TENANT)
    assert "iu-dup" in {env.data["instance_upload_id"] for _, env, _ in world.publisher.published}
    # a re-emit of the outcome read before a redo replaced it is retried (and then re-emits the new one)
    with pytest.raises(InstanceBeingProcessed):
        await handler._reemit(done, cause, stored)


class _RotationStore:
    """The object store of a key rotation; a redo replaces the record's copy while the rotation writes."""

    def __init__(self, blobs: dict[str, bytes], on_put: Callable[[], None]) -> None:
        self.blobs = blobs
        self.on_put = on_put
        self.deleted: list[tuple[str, str]] = []

    def __call__(self, settings: Any) -> _RotationStore:
        return self

    async def open(self, bucket: str, key: str, version_id: str | None = None) -> Any:
        import io

        if key not in self.blobs:
            raise PermanentError("object store get failed (NoSuchKey)", code="s3_NoSuchKey")
        return io.BytesIO(self.blobs[key])

    async def put(self, bucket: str, key: str, body: Any) -> Any:
        from enclave_common.storage import StoredObject

        body.read()
        self.on_put()
        return StoredObject(bucket, key, "v-rotated")

    async def delete_all_versions(self, bucket: str, key: str) -> int:
        self.deleted.append((bucket, key))
        return 1


async def test_a_rotation_does_not_write_back_a_copy_a_redo_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    from enclave_common.crypto import encrypt_bytes
    from enclave_deid import cli
    from enclave_deid.config import DeidSettings
    from enclave_deid.pipeline import deid_object_identity

    world = World()
    world.record(1)
    keyring = LocalKeyring.generate("deid")
    identity = deid_object_identity(TENANT, "study-1", "deidentified/old-1")
    dek, wrapped = keyring.generate_data_key(identity.key_context())
    blob = encrypt_bytes(b"DICM" * 100, dek, wrapped, identity)

    def a_redo_replaces_the_copy() -> None:
        world.doc(1)["object"] = {"bucket": DEID_BUCKET, "key": "deidentified/new-1", "version_id": "v-new"}

    store = _RotationStore({"deidentified/old-1": blob}, a_redo_replaces_the_copy)
    monkeypatch.setattr(cli, "S3ObjectStore", store)
    keyring.rotate()
    clients = type("Clients", (), {"db": world.db})()
    rewrapped = [_ async for _ in cli._rewrap_all(DeidSettings(), clients, keyring)]  # type: ignore[arg-type]
    assert rewrapped == [cli.SKIPPED]
    assert world.doc(1)["object"] == {
        "bucket": DEID_BUCKET,
        "key": "deidentified/new-1",
        "version_id": "v-new",
    }
    assert store.deleted == [(DEID_BUCKET, "deidentified/old-1")]


@pytest.mark.parametrize(
    "error",
    [
        InstanceTooLarge("instance is 9 bytes; at most 8 (ENCLAVE_DEID_MAX_INSTANCE_BYTES)"),
        InstanceTooComplex("more than 10 data elements"),
        UnreadableInstance("does not parse"),
        UnsupportedInstance("could not be de-identified (MemoryError)"),
    ],
)
async def test_a_limit_or_an_error_in_de_identification_refuses_and_never_withdraws(error: Exception) -> None:
    """Only the burned-in check (a Quarantined outcome) withdraws a copy: a smaller limit than at
    release, a lack of memory or a bug in new code refuses the instance and keeps its copy."""
    world = World()
    world.record(1)
    await world.vault.collection.replace_one({"_id": f"{TENANT}|inst-1"}, {"_id": f"{TENANT}|inst-1"})
    world.pipeline.results["iu-1"] = error
    tally = await world.redo().run(TENANT)
    assert tally.outcomes == {f"refused_{error.code}": 1}  # type: ignore[attr-defined]
    doc = world.doc(1)
    assert doc["status"] == "deidentified" and doc["object"]["key"] == "deidentified/old-1"
    assert "redo" not in doc and "pending" not in doc and "revision" not in doc
    assert world.store.deleted == [(DEID_BUCKET, world.pipeline.calls[0]["key"])]  # only what it wrote
    assert world.publisher.published == []
    assert await world.vault.collection.find_one({"_id": f"{TENANT}|inst-1"}) is not None


async def test_the_command_applies_the_services_key_guard_before_anything_is_recorded(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shell holding the gateway/ingest pseudonym key as deid's would make copies with other
    pseudonyms, UIDs and date shifts: the command stops as the service does, before its audit record."""
    import argparse
    import base64

    from enclave_common.errors import ConfigurationError
    from enclave_deid import cli
    from enclave_deid.config import DeidSettings

    keyring = tmp_path / "keyring.json"
    LocalKeyring.generate("test-kek").save(keyring)
    key = base64.b64encode(bytes(range(32))).decode()
    for name, value in {
        "ENCLAVE_DEID_KEYRING_FILE": str(keyring),
        "ENCLAVE_DEID_ORIGINALS_KEYRING_FILE": str(keyring),
        "ENCLAVE_PSEUDONYM_KEY": key,
        "ENCLAVE_DEID_PSEUDONYM_KEY": key,
    }.items():
        monkeypatch.setenv(name, value)
    started: list[object] = []

    async def record_start(*args: object) -> None:
        started.append(args)

    monkeypatch.setattr(cli, "record_start", record_start)
    args = argparse.Namespace(
        dry_run=False,
        tenant=TENANT,
        study_key=None,
        everything=False,
        actor="user:po",
        withdraw_unredoable=False,
    )
    with pytest.raises(ConfigurationError, match="equals ENCLAVE_PSEUDONYM_KEY"):
        await cli._redo(args, DeidSettings(), object())  # type: ignore[arg-type]
    assert started == []


async def test_an_instance_whose_pseudonym_or_uids_would_change_is_refused_and_keeps_its_copy() -> None:
    """The pseudonym and UIDs are keyed on inputs a redo does not change: new ones mean another key
    or salt than at release (a study split), so the copy is not replaced."""
    world = World()
    world.record(1)
    world.record(2)
    world.record(3)
    world.doc(2)["outcome"]["data"]["deid_series_uid"] = "2.25.999"
    world.doc(3)["outcome"]["data"]["patient_pseudonym"] = world.doc(3)["patient_pseudonym"] = "PSEUDO-X"
    tally = await world.redo().run(TENANT)
    assert tally.outcomes == {"redone": 1, "refused_identity_changed": 2}
    assert world.doc(1)["revision"] == DEID_REVISION  # the one whose identity holds
    for n in (2, 3):
        doc = world.doc(n)
        assert doc["object"]["key"] == f"deidentified/old-{n}" and "revision" not in doc
        assert "pending" not in doc and "redo" not in doc
    written = {call["key"] for call in world.pipeline.calls[1:]}
    assert set(world.store.deleted) >= {(DEID_BUCKET, key) for key in written}
    assert {env.data["instance_upload_id"] for _, env, _ in world.publisher.published} == {"iu-1"}


@pytest.mark.parametrize("result", [None, Quarantined("BurnedInAnnotation is YES", code="burned_in_risk")])
async def test_the_linkage_changes_only_once_the_record_names_the_outcome(result: Quarantined | None) -> None:
    """A claim taken over while the run works on it (the run held it past CLAIM_STALE_AFTER, or was
    killed): the record keeps its outcome, and the linkage stays the one of the copy it names."""
    world = World()
    world.record(1)
    linkage = {"_id": f"{TENANT}|inst-1", "patient_pseudonym": "PSEUDO-OLD", "marker": "as released"}
    await world.vault.collection.replace_one({"_id": linkage["_id"]}, linkage)
    if result is not None:
        world.pipeline.results["iu-1"] = result

    async def the_service_takes_the_claim_over() -> None:
        world.doc(1)["claimed_at"] = datetime.now(UTC) - timedelta(minutes=11)
        assert await world.records.claim(TENANT, "inst-1", SHA, new_event_id()) is not None

    world.pipeline.during = the_service_takes_the_claim_over
    assert (await world.redo().run(TENANT)).outcomes == {"busy": 1}
    doc = world.doc(1)
    assert doc["status"] == "deidentified" and doc["object"]["key"] == "deidentified/old-1"
    assert await world.vault.collection.find_one({"_id": linkage["_id"]}) == linkage
    # what the run wrote is deleted at once, and named in the restored record's pending purge
    written = (DEID_BUCKET, world.pipeline.calls[0]["key"])
    assert world.store.deleted == [written] and doc["pending"]["purge"] == [
        dict(zip(("bucket", "key"), written))
    ]
    assert world.publisher.published == []


async def test_a_run_killed_after_its_record_was_committed_has_its_linkage_change_done_by_the_next() -> None:
    world = World()
    world.record(1)
    await world.vault.collection.replace_one({"_id": f"{TENANT}|inst-1"}, {"_id": f"{TENANT}|inst-1"})
    world.pipeline.results["iu-1"] = Quarantined("BurnedInAnnotation is YES", code="burned_in_risk")
    redo = world.redo()
    committed = redo.records.finish_redo

    async def killed_after_the_commit(*args: Any, **kwargs: Any) -> None:
        await committed(*args, **kwargs)
        raise KeyboardInterrupt  # as a kill: nothing after the commit runs

    redo.records.finish_redo = killed_after_the_commit  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        await redo.run(TENANT)
    doc = world.doc(1)
    assert doc["status"] == "quarantined" and doc["pending"]["linkage"] == {"erase": True}
    assert await world.vault.collection.find_one({"_id": f"{TENANT}|inst-1"}) is not None
    tally = await world.redo().run(TENANT)
    assert tally.selected == {"unfinished": 1} and tally.outcomes == {"finished": 1}
    assert await world.vault.collection.find_one({"_id": f"{TENANT}|inst-1"}) is None
    assert "pending" not in world.doc(1)
    assert [topic for topic, _, _ in world.publisher.published] == [topics.INSTANCE_QUARANTINED]


async def _the_service_releases_a_new_version(world: World, n: int) -> dict[str, Any]:
    """What the service's handler does to the record for a new version of the instance (other content)."""
    instance_key = f"inst-{n}"
    assert await world.records.claim(TENANT, instance_key, "b" * 64, "service-event") is None
    data = {**world.doc(n)["outcome"]["data"], "object": {"bucket": DEID_BUCKET, "key": "deidentified/v2"}}
    envelope = Envelope(
        id=new_event_id(),
        type=topics.event_type(topics.INSTANCE_DEIDENTIFIED),
        source="deid",
        tenant=TENANT,
        actor="service:deid",
        correlation_id="c",
        data=data,
    )
    await world.records.finish(
        TENANT,
        instance_key,
        status="deidentified",
        topic=topics.INSTANCE_DEIDENTIFIED,
        envelope=envelope,
        extra={"object": data["object"], "revision": DEID_REVISION},
    )
    return world.doc(n)


async def test_pending_work_left_before_a_new_version_publishes_nothing_of_the_services_outcome() -> None:
    """A run stopped before it published, then the service's new version of the instance: the next
    run does not publish the service's outcome again (as the operator, with new ids), and deletes the
    redo's copy that no event named, as well as the old one."""
    world = World()
    world.record(1)
    world.publisher = FakePublisher(fail_after=0)
    with pytest.raises(ConnectionError):
        await world.redo().run(TENANT)
    redo_copy = world.doc(1)["object"]["key"]
    doc = await _the_service_releases_a_new_version(world, 1)
    assert "redone_at" not in doc  # the service's outcome is its own (ids of a redelivery, not a redo's)
    assert doc["object"]["key"] == "deidentified/v2" and doc["pending"]["publish"] is False
    world.publisher = FakePublisher()
    tally = await world.redo().run(TENANT)
    assert tally.selected == {"unfinished": 1} and tally.outcomes == {"finished": 1}
    assert world.publisher.published == []
    assert set(world.store.deleted) == {(DEID_BUCKET, "deidentified/old-1"), (DEID_BUCKET, redo_copy)}
    assert "pending" not in world.doc(1) and world.doc(1)["object"]["key"] == "deidentified/v2"


async def test_a_new_version_after_a_redo_clears_what_the_redo_noted() -> None:
    world = World()
    world.record(1)
    world.pipeline.results["iu-1"] = OriginalChanged("sha differs")
    await world.redo().run(TENANT)
    assert "redo_refused" in world.doc(1)
    del world.pipeline.results["iu-1"]
    await world.redo().run(TENANT)
    assert "redone_at" in world.doc(1) and "redo_refused" not in world.doc(1)
    world.doc(1)["redo_refused"] = {"code": "original_changed"}
    doc = await _the_service_releases_a_new_version(world, 1)
    assert "redone_at" not in doc and "redo_refused" not in doc


UNREDOABLE_ERRORS = [
    (OriginalChanged("sha differs"), "original_changed"),
    (StudyKeyShredded("gone"), "study_key_shredded"),
    (PermanentError("object store get failed (NoSuchKey)", code="s3_NoSuchKey"), "original_missing"),
]


@pytest.mark.parametrize(("error", "code"), UNREDOABLE_ERRORS)
async def test_withdraw_unredoable_withdraws_a_copy_that_can_never_be_redone(
    error: Exception, code: str
) -> None:
    world = World()
    world.record(1, emitted=[{"upload_id": "up-dup", "instance_upload_id": "iu-dup"}])
    await world.vault.collection.replace_one({"_id": f"{TENANT}|inst-1"}, {"_id": f"{TENANT}|inst-1"})
    world.pipeline.results["iu-1"] = error
    assert (await world.redo().run(TENANT)).outcomes == {f"refused_{code}": 1}  # without the flag
    assert world.doc(1)["object"]["key"] == "deidentified/old-1"
    tally = await world.redo(withdraw_unredoable=True).run(TENANT)
    assert tally.selected == {f"refused_{code}": 1}
    assert tally.outcomes == {f"withdrawn_unredoable_{code}": 1}
    doc = world.doc(1)
    assert doc["status"] == "quarantined" and "object" not in doc and doc["revision"] == DEID_REVISION
    assert "redo_refused" not in doc and "pending" not in doc and "redo" not in doc
    assert (DEID_BUCKET, "deidentified/old-1") in world.store.deleted
    assert await world.vault.collection.find_one({"_id": f"{TENANT}|inst-1"}) is None
    told = {env.data["instance_upload_id"]: (topic, env) for topic, env, _ in world.publisher.published}
    assert set(told) == {"iu-1", "iu-dup"}
    for topic, env in told.values():
        assert topic == topics.INSTANCE_QUARANTINED and env.data["reason_code"] == f"unredoable_{code}"
        assert "withdraw-unredoable" in env.data["reason"]
    assert (await world.redo(withdraw_unredoable=True).run(TENANT)).summary()["selected"] == 0


async def test_withdraw_unredoable_keeps_a_copy_refused_for_a_reason_that_may_pass() -> None:
    world = World()
    world.record(1)
    world.pipeline.results["iu-1"] = InstanceTooLarge("at most 8 bytes (ENCLAVE_DEID_MAX_INSTANCE_BYTES)")
    tally = await world.redo(withdraw_unredoable=True).run(TENANT)
    assert tally.outcomes == {"refused_instance_too_large": 1}
    assert world.doc(1)["status"] == "deidentified" and world.doc(1)["object"]["key"] == "deidentified/old-1"
    assert world.publisher.published == []


def test_a_refusal_reported_before_does_not_make_every_run_exit_3() -> None:
    import argparse
    from collections import Counter

    from enclave_deid.cli import _redo_target, redo_exit_code
    from enclave_deid.redo import RedoTally

    assert redo_exit_code(RedoTally(outcomes=Counter({"redone": 2, "refused_original_missing": 1}))) == 3
    assert redo_exit_code(RedoTally(outcomes=Counter({"busy": 1}))) == 3
    assert (
        redo_exit_code(RedoTally(outcomes=Counter({"redone": 2, "still_refused_original_missing": 1}))) == 0
    )
    assert redo_exit_code(RedoTally(outcomes=Counter({"withdrawn_unredoable_study_key_shredded": 1}))) == 0
    args = argparse.Namespace(tenant="t", study_key=None, everything=False, withdraw_unredoable=True)
    assert _redo_target(args) == f"tenant:t/revision_below:{DEID_REVISION}/withdraw_unredoable"


async def test_a_rotation_skips_a_copy_a_redo_deleted_under_it_and_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding: the rotation read a page of records, a redo replaced one and deleted its old key,
    and the rotation's open failed NoSuchKey and stopped. Now it skips that copy (counted) and goes on;
    a copy missing while its record still names it still stops the rotation (it is lost)."""
    from enclave_common.crypto import encrypt_bytes
    from enclave_deid import cli
    from enclave_deid.config import DeidSettings
    from enclave_deid.pipeline import deid_object_identity

    world = World()
    world.record(1)
    world.record(2)
    keyring = LocalKeyring.generate("deid")
    identity = deid_object_identity(TENANT, "study-1", "deidentified/old-2")
    dek, wrapped = keyring.generate_data_key(identity.key_context())
    store = _RotationStore(
        {"deidentified/old-2": encrypt_bytes(b"DICM" * 100, dek, wrapped, identity)}, lambda: None
    )
    monkeypatch.setattr(cli, "S3ObjectStore", store)
    real_open = store.open

    async def open_after_a_redo_replaced_copy_1(bucket: str, key: str, version_id: str | None = None) -> Any:
        if key == "deidentified/old-1":
            world.doc(1)["object"] = {"bucket": DEID_BUCKET, "key": "deidentified/new-1", "version_id": "v"}
        return await real_open(bucket, key, version_id)

    store.open = open_after_a_redo_replaced_copy_1  # type: ignore[method-assign]
    keyring.rotate()
    clients = type("Clients", (), {"db": world.db})()
    done = [_ async for _ in cli._rewrap_all(DeidSettings(), clients, keyring)]  # type: ignore[arg-type]
    assert done == [cli.SKIPPED, cli.REWRAPPED]
    assert world.doc(2)["object"]["version_id"] == "v-rotated"

    # copy 1's record now names deidentified/new-1, which is not there: a lost copy stops the rotation
    with pytest.raises(PermanentError):
        [_ async for _ in cli._rewrap_all(DeidSettings(), clients, keyring)]  # type: ignore[arg-type]


async def test_emitted_keeps_the_last_uploads_only() -> None:
    """An instance resent thousands of times: the record keeps the last EMITTED_KEPT distinct uploads
    (a redo tells those), not one entry per upload ever made."""
    from enclave_deid.records import EMITTED_KEPT

    world = World()
    event_id = world.record(1, emitted=[{"upload_id": "up-1", "instance_upload_id": "iu-1"}])["outcome"][
        "event_id"
    ]
    for n in range(EMITTED_KEPT + 5):
        assert await world.records.note_emitted(TENANT, "inst-1", event_id, f"up-d{n}", f"iu-d{n}")
    assert await world.records.note_emitted(TENANT, "inst-1", event_id, "up-d7", "iu-d7")  # already there
    emitted = [e["instance_upload_id"] for e in world.doc(1)["emitted"]]
    assert emitted == [f"iu-d{n}" for n in range(5, EMITTED_KEPT + 5)]
    assert not await world.records.note_emitted(TENANT, "inst-1", "another-outcome", "up-x", "iu-x")
