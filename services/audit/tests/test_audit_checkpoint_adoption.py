"""The checkpointer finds a checkpoint in the object-lock bucket that the database index lacks.

A replica that died between storing a checkpoint and indexing it leaves one; so does whoever removed
index entries from the database. Signing that range anew would let a database writer change the
tail's records, remove its index entries and have the audit service sign the forgery: the stored
checkpoint is adopted when the records still match it, and nothing is signed any more when not.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from enclave_audit.chain import ChainHead, HashChain
from enclave_audit.checkpoints import CHECKPOINT_PREFIX, build_checkpoint
from enclave_audit.handlers import AuditMetrics, Checkpointer
from enclave_audit.records import AuditRecord
from enclave_audit.signing import Ed25519Signer
from enclave_audit.store import CheckpointEntry, to_document
from enclave_audit.verification import unindexed_checkpoints
from enclave_common.storage import StoredObject
from prometheus_client import CollectorRegistry

from .conftest import chained_records


class Bucket:
    """The object-lock bucket: versions per key, listed in key order."""

    def __init__(self) -> None:
        self.versions: dict[str, list[bytes]] = {}

    async def keys_after(self, bucket: str, prefix: str, start_after: str, *, limit: int = 1000) -> list[str]:
        return sorted(k for k in self.versions if k.startswith(prefix) and k > start_after)[:limit]

    async def versions_of(self, bucket: str, key: str) -> list[str]:
        return [f"v{i}" for i in reversed(range(len(self.versions.get(key, []))))]

    async def open(self, bucket: str, key: str, version_id: str | None = None) -> Any:
        return io.BytesIO(self.versions[key][int((version_id or "v0")[1:])])

    async def put_locked(self, bucket: str, key: str, data: bytes, *, retain_until: datetime) -> StoredObject:
        self.versions.setdefault(key, []).append(data)
        return StoredObject(bucket, key, f"v{len(self.versions[key]) - 1}", len(data))


class Index:
    """The audit database: records and the checkpoint index."""

    def __init__(self, records: list[AuditRecord]) -> None:
        self.records = {r.sequence: to_document(r, r.event_id) for r in records}
        self.entries: dict[int, CheckpointEntry] = {}
        self.head: ChainHead | None = None

    async def last_checkpoint(self) -> CheckpointEntry | None:
        return self.entries[max(self.entries)] if self.entries else None

    async def read_head(self) -> ChainHead:
        last = self.records[max(self.records)]
        return ChainHead(last["sequence"], last["record_hash"])

    async def iter_range(self, first: int = 1, last: int | None = None) -> AsyncIterator[dict[str, Any]]:
        for sequence in sorted(self.records):
            if sequence >= first and (last is None or sequence <= last):
                yield self.records[sequence]

    async def add_checkpoint(self, entry: CheckpointEntry) -> bool:
        if entry.checkpoint.first_sequence in self.entries:
            return False
        self.entries[entry.checkpoint.first_sequence] = entry
        return True


def _checkpointer(index: Index, bucket: Bucket, signer: Ed25519Signer) -> tuple[Checkpointer, AuditMetrics]:
    metrics = AuditMetrics(CollectorRegistry())
    checkpointer = Checkpointer(
        index,  # type: ignore[arg-type]
        bucket,  # type: ignore[arg-type]
        signer,
        bucket="worm",
        retention_days=1,
        every_records=4,
        interval_s=3600,
        metrics=metrics,
    )
    return checkpointer, metrics


def _failures(metrics: AuditMetrics) -> float:
    (family,) = metrics.verify_failures.collect()
    return next(s.value for s in family.samples if s.name.endswith("_total"))


async def _two_checkpoints(records: list[AuditRecord]) -> tuple[Index, Bucket, Ed25519Signer]:
    signer = Ed25519Signer.generate()
    index, bucket = Index(records), Bucket()
    checkpointer, _ = _checkpointer(index, bucket, signer)
    made = await checkpointer.tick(force=True)
    assert [e.checkpoint.last_sequence for e in made] == [4, 8]
    return index, bucket, signer


async def test_a_stored_checkpoint_the_index_lacks_is_adopted_when_the_records_match() -> None:
    records = chained_records(8)
    index, bucket, signer = await _two_checkpoints(records)
    key = index.entries[5].object_key
    del index.entries[5]  # a replica died after storing it, before indexing it
    checkpointer, metrics = _checkpointer(index, bucket, signer)

    (adopted,) = await checkpointer.tick(force=True)
    assert (adopted.object_key, adopted.version_id) == (key, "v0")
    assert len(bucket.versions[key]) == 1  # nothing signed again
    assert sorted(index.entries) == [1, 5] and _failures(metrics) == 0


async def test_a_forged_tail_whose_index_entry_was_removed_is_not_signed() -> None:
    """Before: the checkpointer signed records 5..8 again, forgery included, as a new version of the
    same object; verification then read the version the index named and found nothing wrong."""
    records = chained_records(8)
    index, bucket, signer = await _two_checkpoints(records)
    forger = HashChain(ChainHead(4, records[3].record_hash))
    for record in records[4:]:
        forged = forger.append(
            record.model_copy(update={"actor": "mallory"}) if record.sequence == 6 else record
        )
        index.records[forged.sequence] = to_document(forged, forged.event_id)
    key = index.entries[5].object_key
    del index.entries[5]
    checkpointer, metrics = _checkpointer(index, bucket, signer)

    assert await checkpointer.tick(force=True) == []
    assert len(bucket.versions[key]) == 1 and sorted(index.entries) == [1]
    assert _failures(metrics) == 1

    # More records arrive: still nothing signed while the stored checkpoint cannot be adopted.
    for record in chained_records(10)[8:]:
        appended = forger.append(record)
        index.records[appended.sequence] = to_document(appended, appended.event_id)
    assert await checkpointer.tick(force=True) == []
    assert list(bucket.versions) == [index.entries[1].object_key, key] and _failures(metrics) == 2


async def test_a_stored_checkpoint_with_a_second_version_is_not_adopted() -> None:
    records = chained_records(8)
    index, bucket, signer = await _two_checkpoints(records)
    key = index.entries[5].object_key
    bucket.versions[key].append(bucket.versions[key][0])  # someone wrote the key again
    del index.entries[5]
    checkpointer, metrics = _checkpointer(index, bucket, signer)
    assert await checkpointer.tick(force=True) == []
    assert sorted(index.entries) == [1] and _failures(metrics) == 1


async def test_with_nothing_unindexed_the_checkpointer_signs_as_before() -> None:
    records = chained_records(4)
    signer = Ed25519Signer.generate()
    index, bucket = Index(records), Bucket()
    checkpointer, metrics = _checkpointer(index, bucket, signer)
    (made,) = await checkpointer.tick(force=True)
    assert made.object_key == f"{CHECKPOINT_PREFIX}000000000001-000000000004.json"
    expected = build_checkpoint(records, signer=signer, created_at=made.checkpoint.created_at, previous=None)
    assert made.checkpoint == expected and _failures(metrics) == 0


async def test_a_second_writer_that_lost_the_race_to_index_leaves_an_orphan_that_blocks_nothing() -> None:
    """Two replicas sign at once from the same start: both store, one index insert wins. The loser's
    object starts inside the indexed checkpoint; it is neither adopted nor reported."""
    records = chained_records(8)
    signer = Ed25519Signer.generate()
    index, bucket = Index(records[:4]), Bucket()
    checkpointer, metrics = _checkpointer(index, bucket, signer)
    await checkpointer.tick(force=True)  # 1..4
    lost = build_checkpoint(records[:3], signer=signer, created_at=records[0].event_time, previous=None)
    longer = build_checkpoint(records[:5], signer=signer, created_at=records[0].event_time, previous=None)
    for orphan in (lost, longer):  # 1..3 sorts before 1..4, 1..5 after it
        await bucket.put_locked("worm", orphan.object_key, orphan.to_bytes(), retain_until=datetime.now())
    index.records |= {r.sequence: to_document(r, r.event_id) for r in records[4:]}

    (made,) = await checkpointer.tick(force=True)
    assert (made.checkpoint.first_sequence, made.checkpoint.last_sequence) == (5, 8)
    assert _failures(metrics) == 0
    assert await unindexed_checkpoints(bucket, "worm", made.object_key) == []  # type: ignore[arg-type]
