"""Ingest on the real stack: reassembly, encryption at rest, duplicates, crashes and outages."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from enclave_common import topics
from enclave_common.crypto import LocalKeyring, ObjectIdentity, decrypt_bytes
from enclave_common.envelope import new_event_id
from enclave_common.events import InstanceRejected, InstanceStored
from enclave_common.settings import BaseServiceSettings
from enclave_common.storage import S3ObjectStore
from enclave_common.study_key_objects import StudyKeyObjects
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pymongo import AsyncMongoClient

from .conftest import KAFKA, MONGO_URL, S3_ENDPOINT, S3_KEY, S3_SECRET
from .support import (
    PHI,
    dev_env,
    kill_hard,
    mr_instance,
    publish,
    restart,
    sealed_chunk_envelopes,
    service_identity,
    wait_for_events,
)

TENANT = "hospital-it-ingest"


def _store() -> S3ObjectStore:
    return S3ObjectStore(
        BaseServiceSettings(
            s3_endpoint_url=S3_ENDPOINT, s3_access_key_id=S3_KEY, s3_secret_access_key=S3_SECRET
        )
    )


async def _decrypt_original(stored: InstanceStored, tenant: str = TENANT) -> bytes:
    store = _store()
    keys = StudyKeyObjects(
        store, stored.object.bucket, LocalKeyring.load(dev_env()["ENCLAVE_INGEST_KEYRING_FILE"])
    )
    provider = await keys.object_provider(tenant, stored.study_key)
    blob = await store.read(stored.object.bucket, stored.object.key, stored.object.version_id)
    return decrypt_bytes(blob, ObjectIdentity(tenant, stored.study_key, stored.object.key), provider)


async def _send(data: bytes, upload_id: str, chunk_bytes: int = 4096) -> str:
    envs = sealed_chunk_envelopes(data, tenant=TENANT, upload_id=upload_id, chunk_bytes=chunk_bytes)
    iuid = envs[0].data["instance_upload_id"]
    await publish(topics.UPLOAD_CHUNK, envs, key=iuid)
    return iuid


def _for(iuid: str):
    return lambda env: env.data.get("instance_upload_id") == iuid


async def test_instance_is_reassembled_encrypted_and_readable_back():
    data, _ = mr_instance()
    upload_id = new_event_id()
    iuid = await _send(data, upload_id)
    (event,) = await wait_for_events(topics.INSTANCE_STORED, _for(iuid))
    stored = event.payload(InstanceStored)
    assert stored.duplicate == "new"
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size == len(data)
    assert event.correlation_id == upload_id and event.causation_id is not None
    # the object is ciphertext under an opaque key, and decrypts to exactly what was sent
    assert re.fullmatch(r"originals/[0-9a-f-]{36}", stored.object.key)
    raw = await _store().read(stored.object.bucket, stored.object.key)
    for value in PHI.values():
        assert value.encode() not in raw
    assert await _decrypt_original(stored) == data
    # the event carries no PHI
    text = event.to_bytes().decode()
    for value in PHI.values():
        assert value not in text


async def test_a_deflated_instance_larger_than_the_header_prefix_is_stored():
    """Found by a pipeline hunt: the gateway accepts deflated instances up to its instance limit, but
    ingest parsed the 4 MiB header prefix with pydicom, which inflates the whole rest of a deflated
    file at once: a truncated stream, so every deflated instance past 4 MiB was refused (as
    "unexpected_error"). 5 MiB of incompressible pixel data keep it past the prefix once deflated."""
    _, ds = mr_instance()
    ds.Rows, ds.Columns = 5 * 1024, 512  # 16-bit: 5 MiB
    ds.PixelData = os.urandom(5 * 1024 * 1024)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert len(data) > 5 * 1024 * 1024
    iuid = await _send(data, new_event_id(), chunk_bytes=512 * 1024)
    (event,) = await wait_for_events((topics.INSTANCE_STORED, topics.INSTANCE_REJECTED), _for(iuid))
    assert event.type == topics.event_type(topics.INSTANCE_STORED), event.data  # not rejected
    assert await _decrypt_original(event.payload(InstanceStored)) == data


async def test_identical_resend_is_a_duplicate_and_different_content_is_refused():
    data, ds = mr_instance()
    first = await _send(data, new_event_id())
    (stored_event,) = await wait_for_events(topics.INSTANCE_STORED, _for(first))
    again = await _send(data, new_event_id())
    (dup_event,) = await wait_for_events(topics.INSTANCE_STORED, _for(again))
    dup = dup_event.payload(InstanceStored)
    assert dup.duplicate == "duplicate"
    assert dup.object == stored_event.payload(InstanceStored).object  # no new object
    ds.SeriesDescription = "changed content, same SOP Instance UID"
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    conflict = await _send(buf.getvalue(), new_event_id())
    (rejected,) = await wait_for_events(topics.INSTANCE_REJECTED, _for(conflict))
    payload = rejected.payload(InstanceRejected)
    assert payload.reason_code == "duplicate_conflict"
    assert "different content" in payload.reason


async def test_forged_or_corrupted_chunks_are_rejected_with_a_reason():
    data, _ = mr_instance()
    envs = sealed_chunk_envelopes(data, tenant=TENANT, upload_id=new_event_id())
    iuid = envs[0].data["instance_upload_id"]
    tampered = envs[1].model_dump()
    sealed = bytearray(envs[1].payload.__self__.data["sealed"] if False else b"")
    from enclave_common.events import UploadChunk

    chunk = envs[1].payload(UploadChunk)
    sealed = bytearray(chunk.sealed)
    sealed[-1] ^= 0xFF
    tampered["data"] = chunk.model_copy(update={"sealed": bytes(sealed)}).model_dump(mode="json")
    from enclave_common.envelope import Envelope

    envs[1] = Envelope.model_validate(tampered)
    await publish(topics.UPLOAD_CHUNK, envs, key=iuid)
    (rejected,) = await wait_for_events(topics.INSTANCE_REJECTED, _for(iuid))
    assert rejected.payload(InstanceRejected).reason_code == "unseal_failed"


@pytest.mark.slow
async def test_ingest_killed_mid_instance_stores_every_instance_exactly_once():
    instances = [mr_instance() for _ in range(4)]
    upload_id = new_event_id()
    all_envs = [
        sealed_chunk_envelopes(data, tenant=TENANT, upload_id=upload_id, chunk_bytes=2048)
        for data, _ in instances
    ]
    iuids = [envs[0].data["instance_upload_id"] for envs in all_envs]
    for envs, iuid in zip(all_envs, iuids, strict=True):
        await publish(topics.UPLOAD_CHUNK, envs[: len(envs) // 2], key=iuid)
    await asyncio.sleep(3)  # ingest spools the first halves
    kill_hard("ingest")
    for envs, iuid in zip(all_envs, iuids, strict=True):
        await publish(topics.UPLOAD_CHUNK, envs[len(envs) // 2 :], key=iuid)
    restart("ingest")
    events = await wait_for_events(
        topics.INSTANCE_STORED, lambda e: e.data.get("instance_upload_id") in iuids, count=4, timeout=90
    )
    by_iuid = {e.data["instance_upload_id"]: e.payload(InstanceStored) for e in events}
    assert set(by_iuid) == set(iuids)
    for (data, _), iuid in zip(instances, iuids, strict=True):
        assert await _decrypt_original(by_iuid[iuid]) == data
    client: AsyncMongoClient = AsyncMongoClient(MONGO_URL)
    try:
        docs = [d async for d in client["ingest"]["instances"].find({"_id": {"$in": iuids}})]
        assert sorted(d["_id"] for d in docs) == sorted(iuids)
        assert {d["status"] for d in docs} == {"stored"}
    finally:
        await client.close()


@pytest.mark.slow
async def test_object_store_outage_waits_and_loses_nothing():
    kill_hard("minio")
    try:
        data, _ = mr_instance()
        iuid = await _send(data, new_event_id())
        await asyncio.sleep(4)
    finally:
        restart("minio")
    (event,) = await wait_for_events(topics.INSTANCE_STORED, _for(iuid), timeout=120)
    assert await _decrypt_original(event.payload(InstanceStored)) == data


async def test_rotation_rewraps_every_study_key_and_shredding_makes_a_study_unreadable():
    """Rotate the KEK (every study key re-wrapped, objects untouched), retire the old version, read
    every object back; then crypto-shred one study: its objects no longer decrypt, others still do."""
    import json
    import os
    import subprocess

    from enclave_common.study_key_objects import StudyKeyShredded

    from .support import ROOT

    a, _ = mr_instance()
    b, _ = mr_instance()
    events = []
    for data in (a, b):
        iuid = await _send(data, new_event_id())
        events.append((await wait_for_events(topics.INSTANCE_STORED, _for(iuid)))[0].payload(InstanceStored))
    env = {**os.environ, **dev_env(), **service_identity("ingest")}  # as in the ingest pod
    keyring_path = dev_env()["ENCLAVE_INGEST_KEYRING_FILE"]
    before = json.loads(Path(keyring_path).read_text())["current_version"]
    blobs_before = [await _store().read(s.object.bucket, s.object.key, s.object.version_id) for s in events]
    cli = str(ROOT / ".venv/bin/enclave-ingest-keys")
    anonymous = subprocess.run([cli, "rotate"], env=env, capture_output=True, text=True)
    assert anonymous.returncode == 2 and "--actor is required" in anonymous.stderr
    assert json.loads(Path(keyring_path).read_text())["current_version"] == before  # refused: nothing done
    out = subprocess.run(
        [cli, "--actor", "it-admin", "rotate"], env=env, capture_output=True, text=True, check=True
    )
    assert "study keys re-wrapped" in out.stdout
    subprocess.run(
        [cli, "--actor", "it-admin", "retire", "--version", str(before)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    keyring = json.loads(Path(keyring_path).read_text())
    assert keyring["current_version"] == before + 1 and str(before) not in keyring["versions"]
    for stored, data, blob in zip(events, (a, b), blobs_before, strict=True):
        # payload objects were not rewritten, and they still decrypt through the re-wrapped study key
        assert await _store().read(stored.object.bucket, stored.object.key, stored.object.version_id) == blob
        assert await _decrypt_original(stored) == data
    stored_a = events[0]
    subprocess.run(
        [
            cli,
            "--actor",
            "it-admin",
            "shred",
            "--tenant",
            TENANT,
            "--study-key",
            stored_a.study_key,
            "--reason",
            "erasure request",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    with pytest.raises(StudyKeyShredded, match="crypto-shredded"):
        await _decrypt_original(stored_a)
    assert await _decrypt_original(events[1]) == b
    (shred_event,) = await wait_for_events(
        topics.KEY_SHREDDED, lambda e: e.data.get("study_key") == stored_a.study_key
    )
    assert shred_event.actor == "it-admin"
    # the catalogue keeps the fact of deletion
    client: AsyncMongoClient = AsyncMongoClient(MONGO_URL)
    try:
        doc = await client["ingest"]["study_keys"].find_one({"_id": f"{TENANT}:{stored_a.study_key}"})
        assert doc["status"] == "shredded" and doc["wrapped"] is None and doc["shredded_by"] == "it-admin"
    finally:
        await client.close()
    # a new instance of a shredded study is refused
    again = await _send(a, new_event_id())
    (refused,) = await wait_for_events(topics.INSTANCE_REJECTED, _for(again))
    assert refused.payload(InstanceRejected).reason_code in ("study_shredded", "duplicate_conflict")


async def test_scrub_reports_the_corrupted_object_and_segment():
    import os
    import subprocess

    from .support import ROOT

    data, _ = mr_instance()
    iuid = await _send(data, new_event_id())
    (event,) = await wait_for_events(topics.INSTANCE_STORED, _for(iuid))
    stored = event.payload(InstanceStored)
    store = _store()
    blob = bytearray(await store.read(stored.object.bucket, stored.object.key))
    blob[-5] ^= 0x01  # flip one bit in the last segment's tag
    import io

    await store.put(stored.object.bucket, stored.object.key, io.BytesIO(bytes(blob)))
    # the catalogue still points at the good version; point the check at the latest by re-recording it
    client: AsyncMongoClient = AsyncMongoClient(MONGO_URL)
    try:
        await client["ingest"]["instances"].update_one({"_id": iuid}, {"$set": {"object.version_id": None}})
    finally:
        await client.close()
    env = {**os.environ, **dev_env(), **service_identity("ingest")}  # as in the ingest pod
    out = subprocess.run(
        [str(ROOT / ".venv/bin/enclave-ingest-keys"), "scrub", "--tenant", TENANT],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    line = next(row for row in out.stdout.splitlines() if iuid in row)
    assert "segment=0" in line and "authentication" in line


async def test_an_instance_whose_upload_broke_off_is_given_up_and_no_longer_holds_its_partition():
    """The first chunk of a three-chunk instance is appended, then nothing more of it (the gateway was
    killed or Kafka failed mid-instance; the client got no acknowledgement). An hour later by Kafka's
    clock (the record's timestamp is set two hours back) a complete instance lands on the same
    partition: the broken one is rejected as ``upload_incomplete``, the complete one is stored, and
    the group's committed offset reaches the partition's end. Before, the committed offset stayed at
    the broken chunk for good: the lag grew with every upload and each restart read everything after
    it again."""
    data, _ = mr_instance()
    broken = sealed_chunk_envelopes(
        data, tenant=TENANT, upload_id=new_event_id(), chunk_bytes=len(data) // 3 + 1
    )
    assert len(broken) == 3
    broken_iuid = broken[0].data["instance_upload_id"]
    complete = sealed_chunk_envelopes(mr_instance()[0], tenant=TENANT, upload_id=new_event_id())
    complete_iuid = complete[0].data["instance_upload_id"]

    # A partition that nothing else holds back: after `make chaos`, for example, instances broken off
    # less than an hour ago hold theirs (rightly), and the committed offset could not pass them.
    free = await _partition_fully_committed(topics.UPLOAD_CHUNK, "enclave-ingest")
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        two_hours_ago = int((time.time() - 7200) * 1000)
        sent = await producer.send_and_wait(
            topics.UPLOAD_CHUNK,
            broken[0].to_bytes(),
            key=broken_iuid.encode(),
            partition=free,
            timestamp_ms=two_hours_ago,
        )
        for envelope in complete:  # the same partition
            last = await producer.send_and_wait(
                topics.UPLOAD_CHUNK, envelope.to_bytes(), key=broken_iuid.encode(), partition=free
            )
    finally:
        await producer.stop()
    assert last.partition == sent.partition == free

    (rejected,) = await wait_for_events(topics.INSTANCE_REJECTED, _for(broken_iuid), timeout=120)
    outcome = rejected.payload(InstanceRejected)
    assert outcome.reason_code == "upload_incomplete"
    assert "only 1 of 3 chunks" in outcome.reason
    await wait_for_events(topics.INSTANCE_STORED, _for(complete_iuid), timeout=120)

    partition = TopicPartition(topics.UPLOAD_CHUNK, sent.partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, group_id="enclave-ingest", enable_auto_commit=False)
    await consumer.start()
    try:
        committed = None
        for _ in range(60):
            committed = await consumer.committed(partition)
            if committed is not None and committed > last.offset:
                break
            await asyncio.sleep(1)
        assert committed is not None and committed > last.offset, (committed, sent.offset, last.offset)
    finally:
        await consumer.stop()


async def test_the_catalogue_walk_of_the_scrub_pages_by_id_on_the_real_database(mongo):
    """The scrub walks every stored instance a page at a time, a fresh query each, so a scrub of hours
    (each object read and decrypted) is not cut off by the server's cursor timeout and loses nothing
    it found; before, one cursor walked the whole catalogue."""
    from enclave_ingest.catalogue import Catalogue

    db = mongo[f"it_catalogue_{new_event_id()[-10:]}"]
    try:
        catalogue = Catalogue(db)
        docs = [
            {"_id": f"iu-{n:02d}", "status": "stored", "tenant": "t-a" if n % 3 else "t-b"} for n in range(7)
        ]
        await db["instances"].insert_many([*docs, {"_id": "iu-99", "status": "rejected", "tenant": "t-a"}])
        walked = [d["_id"] async for d in catalogue.all_stored(page=2)]
        assert walked == [d["_id"] for d in docs]
        only_a = [d["_id"] async for d in catalogue.all_stored("t-a", page=2)]
        assert only_a == [d["_id"] for d in docs if d["tenant"] == "t-a"]
    finally:
        await mongo.drop_database(db.name)


async def _partition_fully_committed(topic: str, group: str, timeout_s: float = 90) -> int:
    """A partition of ``topic`` whose committed offset for ``group`` is its end: no unfinished
    instance holds it back."""
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        producer = AIOKafkaProducer(bootstrap_servers=KAFKA)
        await producer.start()
        try:
            partitions = [TopicPartition(topic, p) for p in sorted(await producer.partitions_for(topic))]
        finally:
            await producer.stop()
        assert partitions, topic
        deadline = time.monotonic() + timeout_s
        while True:
            ends = await consumer.end_offsets(partitions)
            for partition in partitions:
                committed = await consumer.committed(partition)  # None: never committed
                if committed == ends[partition] or (committed is None and ends[partition] == 0):
                    return partition.partition
            assert time.monotonic() < deadline, (
                f"every partition of {topic} is held back by an unfinished instance (an upload broken "
                f"off less than ENCLAVE_INGEST_INCOMPLETE_AFTER_S ago, e.g. by make chaos)"
            )
            await asyncio.sleep(2)
    finally:
        await consumer.stop()
