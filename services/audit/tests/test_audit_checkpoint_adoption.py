"""What the checkpointer does with checkpoints the object-lock bucket holds and the index does not.

A replica that died between storing a checkpoint and indexing it leaves one; so does a writer that
lost the race to index the same range; so does whoever removes index entries from the database.
Signing a range again would let whoever can write the database change the records, remove or
redirect the index entries, and have the audit service sign the forgery: a checkpoint stored at the
next start is adopted when the records match it, a stored checkpoint covering the records to be
signed must match them, and the last indexed entry must be a genuine checkpoint under its own name.
Otherwise nothing is signed. Verification (``verify_trail`` with ``stored``) reads the same bucket.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from enclave_audit.chain import GENESIS, ChainHead, HashChain
from enclave_audit.checkpoints import CHECKPOINT_PREFIX, build_checkpoint
from enclave_audit.handlers import AuditMetrics, Checkpointer
from enclave_audit.records import AuditRecord
from enclave_audit.signing import Ed25519Signer, trusted_keys
from enclave_audit.store import CheckpointEntry, json_form, to_document
from enclave_audit.verification import StoredCheckpoint, TrailReport, index_copies, verify_trail
from enclave_common.storage import StoredObject
from prometheus_client import CollectorRegistry

from .conftest import chained_records


class Bucket:
    """The object-lock bucket: every version of every key is kept, listed in key order."""

    def __init__(self) -> None:
        self.versions: dict[str, list[bytes]] = {}

    async def list_versions(
        self, bucket: str, prefix: str, *, after: str = "", until: str | None = None
    ) -> list[tuple[str, str]]:
        keys = sorted(k for k in self.versions if k.startswith(prefix) and k > after)
        return [
            (k, f"v{i}")
            for k in keys
            if until is None or k <= until
            for i in reversed(range(len(self.versions[k])))
        ]

    async def open(self, bucket: str, key: str, version_id: str | None = None) -> Any:
        return io.BytesIO(self.versions[key][int((version_id or "v0")[1:])])

    async def put_locked(self, bucket: str, key: str, data: bytes, *, retain_until: datetime) -> StoredObject:
        self.versions.setdefault(key, []).append(data)
        return StoredObject(bucket, key, f"v{len(self.versions[key]) - 1}", len(data))


class Index:
    """The audit database: records and the checkpoint index; also the verifier's reader."""

    def __init__(self, records: list[AuditRecord]) -> None:
        self.records = {r.sequence: to_document(r, r.event_id) for r in records}
        self.entries: dict[int, CheckpointEntry] = {}
        self.head: ChainHead | None = None

    async def last_checkpoint(self) -> CheckpointEntry | None:
        return self.entries[max(self.entries)] if self.entries else None

    async def read_head(self) -> ChainHead:
        return self.head_of()

    def head_of(self) -> ChainHead:
        last = self.records[max(self.records)]
        return ChainHead(last["sequence"], last["record_hash"])

    async def iter_range(
        self, first: int = 1, last: int | None = None, *, projection: Any = None
    ) -> AsyncIterator[dict[str, Any]]:
        for sequence in self._sequences(first, last):
            yield self.records[sequence]

    def _sequences(self, first: int, last: int | None) -> list[int]:
        return [s for s in sorted(self.records) if s >= first and (last is None or s <= last)]

    async def add_checkpoint(self, entry: CheckpointEntry) -> bool:
        if entry.checkpoint.first_sequence in self.entries:
            return False
        self.entries[entry.checkpoint.first_sequence] = entry
        return True

    def add(self, records: list[AuditRecord]) -> None:
        self.records |= {r.sequence: to_document(r, r.event_id) for r in records}


class Reader:
    """The same database as ``verify_trail`` reads it (``SyncRecordReader``)."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def head(self) -> ChainHead:
        return self.index.head_of()

    def last_signed_sequence(self) -> int:
        entries = self.index.entries
        return entries[max(entries)].checkpoint.last_sequence if entries else 0

    def anchor_before(self, first: int) -> ChainHead | None:
        if first <= 1:
            return GENESIS
        found = self.index.records.get(first - 1)
        return ChainHead(found["sequence"], found["record_hash"]) if found else None

    def iter_documents(self, first: int = 1, last: int | None = None) -> Any:
        return (json_form(self.index.records[s]) for s in self.index._sequences(first, last))


def _checkpointer(
    index: Index, bucket: Bucket, signer: Ed25519Signer, every: int = 4, trusted: Any = None
) -> tuple[Checkpointer, AuditMetrics]:
    metrics = AuditMetrics(CollectorRegistry())
    checkpointer = Checkpointer(
        index,  # type: ignore[arg-type]
        bucket,  # type: ignore[arg-type]
        signer,
        bucket="worm",
        retention_days=1,
        every_records=every,
        interval_s=3600,
        metrics=metrics,
        trusted=trusted,
    )
    return checkpointer, metrics


def _failures(metrics: AuditMetrics) -> float:
    (family,) = metrics.verify_failures.collect()
    return next(s.value for s in family.samples if s.name.endswith("_total"))


def _forge(index: Index, records: list[AuditRecord], start: int, last: int, target: int) -> None:
    """Rewrite record ``target`` and re-hash ``start..last`` after it: a chain that verifies."""
    forger = HashChain(ChainHead(start - 1, records[start - 2].record_hash))
    for record in records[start - 1 : last]:
        changed = record.model_copy(update={"actor": "mallory"}) if record.sequence == target else record
        index.add([forger.append(changed)])


async def _verify(index: Index, bucket: Bucket, signer: Ed25519Signer) -> TrailReport:
    """Whole-chain verification as the API does it."""
    entries = [index.entries[k] for k in sorted(index.entries)]
    stored = [
        StoredCheckpoint(key, version, (await bucket.open("worm", key, version)).read())
        for key, version in await bucket.list_versions("worm", CHECKPOINT_PREFIX)
    ]
    return verify_trail(
        Reader(index),  # type: ignore[arg-type]
        checkpoints=entries,
        public_key=signer.public_key,
        worm_copies=index_copies(entries, stored),
        stored=stored,
    )


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
    assert (await _verify(index, bucket, signer)).ok  # nothing is wrong with the trail meanwhile
    checkpointer, metrics = _checkpointer(index, bucket, signer)

    (adopted,) = await checkpointer.tick(force=True)
    assert (adopted.object_key, adopted.version_id) == (key, "v0")
    assert len(bucket.versions[key]) == 1  # nothing signed again
    assert sorted(index.entries) == [1, 5] and _failures(metrics) == 0


async def test_a_forged_tail_whose_index_entry_was_removed_is_not_signed_and_is_found() -> None:
    """Before: the checkpointer signed records 5..8 again, forgery included, as a new version of the
    same object; verification then read the version the index named and found nothing wrong."""
    records = chained_records(10)
    index, bucket, signer = await _two_checkpoints(records[:8])
    _forge(index, records, 5, 8, target=6)
    key = index.entries[5].object_key
    del index.entries[5]
    checkpointer, metrics = _checkpointer(index, bucket, signer)

    assert await checkpointer.tick(force=True) == []
    assert len(bucket.versions[key]) == 1 and sorted(index.entries) == [1]
    assert _failures(metrics) == 1

    # More records arrive: still nothing signed while the stored checkpoint disagrees.
    forger = HashChain(ChainHead(8, index.records[8]["record_hash"]))
    index.add([forger.append(r) for r in records[8:]])
    assert await checkpointer.tick(force=True) == []
    assert len(bucket.versions) == 2 and _failures(metrics) == 2

    report = await _verify(index, bucket, signer)
    assert not report.ok
    assert report.checkpoint_problems == [
        "checkpoint 5..8 in the object-lock bucket (v0): the records do not match its signed Merkle root"
    ]


async def test_an_index_entry_redirected_to_another_object_is_refused_and_found() -> None:
    """The last remaining entry's object key rewritten to the removed checkpoint's: the bucket
    search then started past the genuine 5..8 and the forgery was signed as its second version."""
    records = chained_records(8)
    index, bucket, signer = await _two_checkpoints(records)
    _forge(index, records, 5, 8, target=6)
    genuine = index.entries.pop(5).object_key
    index.entries[1].object_key = genuine
    checkpointer, metrics = _checkpointer(index, bucket, signer)
    assert await checkpointer.tick(force=True) == []
    assert len(bucket.versions[genuine]) == 1 and _failures(metrics) == 1
    problems = (await _verify(index, bucket, signer)).checkpoint_problems
    assert f"checkpoint 1..4: its index entry names another object, {genuine}" in problems


async def test_a_lost_race_orphan_indexed_in_place_of_the_winner_does_not_get_later_records_signed() -> None:
    """Two writers signed 5..6 (indexed) and 5..7 (orphan); 7..8 followed. Someone indexes the
    orphan instead of 5..6 and 7..8, and rewrites record 8: the genuine 7..8 still covers it."""
    records = chained_records(10)
    signer = Ed25519Signer.generate()
    index, bucket = Index(records[:6]), Bucket()
    checkpointer, _ = _checkpointer(index, bucket, signer, every=4)
    await checkpointer.tick(force=True)  # 1..4
    await checkpointer.tick(force=True)  # 5..6
    orphan = build_checkpoint(
        records[4:7], signer=signer, created_at=records[0].event_time, previous=index.entries[1].checkpoint
    )
    await bucket.put_locked("worm", orphan.object_key, orphan.to_bytes(), retain_until=datetime.now())
    index.add(records[6:8])
    await checkpointer.tick(force=True)  # 7..8
    assert sorted(index.entries) == [1, 5, 7] and (await _verify(index, bucket, signer)).ok

    del index.entries[5], index.entries[7]
    index.entries[5] = CheckpointEntry(orphan, orphan.object_key, "v0", orphan.to_bytes())
    _forge(index, records, 8, 8, target=8)
    forger = HashChain(ChainHead(8, index.records[8]["record_hash"]))
    index.add([forger.append(r) for r in records[8:]])
    attacked, metrics = _checkpointer(index, bucket, signer)
    assert await attacked.tick(force=True) == []
    assert _failures(metrics) == 1
    assert not (await _verify(index, bucket, signer)).ok


async def test_a_writer_that_lost_the_race_to_index_leaves_an_orphan_that_blocks_nothing() -> None:
    records = chained_records(8)
    signer = Ed25519Signer.generate()
    index, bucket = Index(records[:4]), Bucket()
    checkpointer, metrics = _checkpointer(index, bucket, signer)
    await checkpointer.tick(force=True)  # 1..4
    for orphan in (records[:3], records[:5]):  # 1..3 sorts before 1..4, 1..5 after it
        cp = build_checkpoint(orphan, signer=signer, created_at=records[0].event_time, previous=None)
        await bucket.put_locked("worm", cp.object_key, cp.to_bytes(), retain_until=datetime.now())
    index.add(records[4:])

    (made,) = await checkpointer.tick(force=True)
    assert (made.checkpoint.first_sequence, made.checkpoint.last_sequence) == (5, 8)
    assert _failures(metrics) == 0
    report = await _verify(index, bucket, signer)
    assert report.ok, report  # genuine orphans that match the records are no alarm


async def test_with_nothing_stored_the_checkpointer_signs_as_before() -> None:
    records = chained_records(4)
    signer = Ed25519Signer.generate()
    index, bucket = Index(records), Bucket()
    checkpointer, metrics = _checkpointer(index, bucket, signer)
    (made,) = await checkpointer.tick(force=True)
    assert made.object_key == f"{CHECKPOINT_PREFIX}000000000001-000000000004.json"
    expected = build_checkpoint(records, signer=signer, created_at=made.checkpoint.created_at, previous=None)
    assert made.checkpoint == expected and _failures(metrics) == 0


async def test_a_lost_race_checkpoint_that_started_before_the_last_indexed_one_still_guards_its_records() -> (
    None
):
    """Three writers at once (two replicas and the surge pod of a rolling update), each sizing its
    checkpoint from its own idea of the head: 7..8 is indexed, 7..12 lost the race, 9..9 follows.
    The stored 7..12 covers records after the last indexed checkpoint although it starts before it:
    when record 11 is rewritten, nothing may be signed over it."""
    records = chained_records(16)
    signer = Ed25519Signer.generate()
    index, bucket = Index(records[:6]), Bucket()
    checkpointer, metrics = _checkpointer(index, bucket, signer, every=8)
    await checkpointer.tick(force=True)  # 1..6
    index.add(records[6:12])
    first = index.entries[1]
    await checkpointer.make(first, 7, 8)  # the winner
    lost = build_checkpoint(
        records[6:12], signer=signer, created_at=records[0].event_time, previous=first.checkpoint
    )
    await bucket.put_locked("worm", lost.object_key, lost.to_bytes(), retain_until=datetime.now())
    await checkpointer.make(index.entries[7], 9, 9)
    assert sorted(index.entries) == [1, 7, 9] and (await _verify(index, bucket, signer)).ok

    _forge(index, records, 10, 16, target=11)
    assert await checkpointer.tick(force=True) == []
    assert sorted(index.entries) == [1, 7, 9] and _failures(metrics) == 1
    assert not (await _verify(index, bucket, signer)).ok


async def test_after_a_signing_key_rotation_the_old_keys_checkpoints_are_trusted_when_configured() -> None:
    """Without the old public key (ENCLAVE_AUDIT_TRUSTED_PUBLIC_KEYS_DIR) the last checkpoint is not
    genuine to the new key: nothing is signed, and it says why."""
    records = chained_records(8)
    old, new = Ed25519Signer.generate(), Ed25519Signer.generate()
    index, bucket = Index(records[:4]), Bucket()
    await _checkpointer(index, bucket, old)[0].tick(force=True)
    index.add(records[4:])

    untrusting, metrics = _checkpointer(index, bucket, new)
    assert await untrusting.tick(force=True) == [] and _failures(metrics) == 1

    rotated, metrics = _checkpointer(index, bucket, new, trusted={old.key_id: old.public_key})
    (made,) = await rotated.tick(force=True)
    assert (made.checkpoint.first_sequence, made.checkpoint.key_id) == (5, new.key_id)
    assert _failures(metrics) == 0


async def test_an_object_that_is_no_checkpoint_by_name_does_not_block_signing() -> None:
    """A console's folder marker or a stray file under the prefix (verification reports it)."""
    records = chained_records(4)
    signer = Ed25519Signer.generate()
    index, bucket = Index(records), Bucket()
    for stray in (CHECKPOINT_PREFIX, f"{CHECKPOINT_PREFIX}.keep"):
        await bucket.put_locked("worm", stray, b"", retain_until=datetime.now())
    checkpointer, metrics = _checkpointer(index, bucket, signer)
    assert len(await checkpointer.tick(force=True)) == 1 and _failures(metrics) == 0


async def test_a_refused_checkpointer_tries_again_an_interval_later_not_at_every_poll() -> None:
    records = chained_records(12)
    index, bucket, signer = await _two_checkpoints(records[:8])
    _forge(index, records, 5, 8, target=6)
    del index.entries[5]
    index.add(records[8:])  # pending >= every_records: due at every poll
    checkpointer, metrics = _checkpointer(index, bucket, signer)
    for _ in range(3):
        assert await checkpointer.tick() == []
    assert _failures(metrics) == 1


async def test_a_broken_chain_is_refused_once_an_interval_too() -> None:
    records = chained_records(12)
    index, bucket, signer = await _two_checkpoints(records[:8])
    index.add(records[8:])
    del index.records[10]  # a record deleted after the last checkpoint
    checkpointer, metrics = _checkpointer(index, bucket, signer)
    for _ in range(3):
        assert await checkpointer.tick() == []
    assert _failures(metrics) == 1


def test_a_trusted_key_file_that_is_no_public_key_is_named(tmp_path) -> None:
    (tmp_path / "next.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match=r"next\.pem: not an Ed25519 public key in PEM"):
        trusted_keys(None, tmp_path)
    assert trusted_keys(None, tmp_path / "absent") == {}  # an optional ConfigMap not created yet
