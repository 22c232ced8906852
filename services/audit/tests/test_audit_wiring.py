"""The pure parts of the wiring: message -> record keys, alert ids, query filters, cursors, the
stored document form, and trail verification against checkpoints (no network)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from enclave_audit.anomaly import AlertDraft
from enclave_audit.chain import GENESIS, ChainHead, HashChain, verify_chain
from enclave_audit.checkpoints import build_checkpoint
from enclave_audit.handlers import alert_envelope, audit_key, decode_headers, draft_for_message
from enclave_audit.records import AuditRecord
from enclave_audit.signing import Ed25519Signer
from enclave_audit.store import (
    CheckpointEntry,
    CursorError,
    EventQuery,
    decode_cursor,
    encode_cursor,
    json_form,
    to_document,
)
from enclave_audit.verification import RangeBeyondChain, StoredCheckpoint, verify_trail

from .conftest import BASE_TIME, access, chained_records

DLQ_TOPIC = "enclave.access.recorded.v1.dlq"


def test_an_event_is_keyed_by_its_id_and_its_dead_lettered_copy_by_topic_id_and_code():
    body = json.dumps(access(3)).encode()
    original = draft_for_message(body, "enclave.access.recorded.v1", {})
    headers = decode_headers([("x-dlq-code", b"schema"), ("x-dlq-reason", b"field missing")])
    copy = draft_for_message(body, DLQ_TOPIC, headers)
    assert audit_key(original, {}) == original.event_id
    assert audit_key(copy, headers) == f"dlq:{DLQ_TOPIC}:{original.event_id}:schema"
    assert copy.dead_lettered and copy.outcome == 8
    assert copy.outcome_description == "dead-lettered from enclave.access.recorded.v1: [schema] field missing"


def test_a_message_that_is_not_an_envelope_is_audited_under_a_stable_derived_id():
    first = draft_for_message(b"\x00\xffnot json", DLQ_TOPIC, {})
    again = draft_for_message(b"\x00\xffnot json", DLQ_TOPIC, {})
    other = draft_for_message(b"other bytes", DLQ_TOPIC, {})
    assert first.event_id.startswith("derived-")
    assert first.event_id == again.event_id != other.event_id
    assert first.envelope["data"]["unparsed_message"]["omitted"] == "bytes"
    assert draft_for_message(b"[1, 2]", DLQ_TOPIC, {}).event_id.startswith("derived-")


def _alert(subject: str = "dr-who", rule: str = "break_glass") -> AlertDraft:
    now = datetime(2024, 5, 6, 3, 0, tzinfo=UTC)
    return AlertDraft(
        rule=rule,
        severity="high",
        subject=subject,
        tenant="hospital-a",
        detail="break-glass access used",
        count=1,
        threshold=1,
        window_start=now,
        window_end=now,
        triggering_event_id="x",
    )


def test_alert_ids_are_derived_from_cause_rule_and_subject():
    record = draft_for_message(json.dumps(access(1)).encode(), "enclave.access.recorded.v1", {})
    first, again = alert_envelope(record, _alert()), alert_envelope(record, _alert())
    assert first.id == again.id
    assert alert_envelope(record, _alert(subject="other")).id != first.id
    assert alert_envelope(record, _alert(rule="access_outside_hours")).id != first.id
    assert first.causation_id == record.event_id and first.type == "enclave.security.alert"
    derived = draft_for_message(b"opaque", DLQ_TOPIC, {})
    assert alert_envelope(derived, _alert()).id == alert_envelope(derived, _alert()).id


def test_query_filter_uses_record_fields_and_cursor_direction():
    query = EventQuery(
        tenant="t",
        actor="a",
        study="s",
        patient="p",
        outcome=4,
        since=BASE_TIME,
        order="desc",
        after_sequence=10,
    )
    found = query.mongo_filter()
    assert found["tenant"] == "t" and found["actor"] == "a" and found["outcome"] == 4
    assert found["objects.object_id"] == {"$all": ["p", "s"]}
    assert found["event_time"] == {"$gte": BASE_TIME}
    assert found["sequence"] == {"$lt": 10}
    assert EventQuery(after_sequence=10).mongo_filter()["sequence"] == {"$gt": 10}
    assert EventQuery().mongo_filter() == {}


def test_object_filters_are_rechecked_on_the_exact_kind():
    record = chained_records(1)[0]
    study = record.object_ids(record.objects[0].kind)[0]
    assert EventQuery(study=study).matches(record) is (record.objects[0].kind.value == "study")
    assert EventQuery(patient=study).matches(record) is (record.objects[0].kind.value == "patient")


def test_cursor_round_trip_and_refusals():
    assert decode_cursor(encode_cursor(42, "asc"), "asc") == 42
    with pytest.raises(CursorError, match="order=asc"):
        decode_cursor(encode_cursor(42, "asc"), "desc")
    for garbage in ("nonsense", "", encode_cursor(-1, "asc"), "eyJzIjogIngifQ"):
        with pytest.raises(CursorError):
            decode_cursor(garbage, "asc")


def test_stored_document_round_trips_to_the_hashed_form():
    records = chained_records(5)
    documents = [to_document(r, r.event_id) for r in records]
    assert all(isinstance(d["event_time"], datetime) for d in documents)
    result = verify_chain(json_form(d) for d in documents)
    assert result.ok and result.checked == 5
    # what pymongo returns without tz_aware: naive UTC datetimes; the hash must not move
    naive = [d | {"event_time": d["event_time"].replace(tzinfo=None)} for d in documents]
    assert verify_chain(json_form(d) for d in naive).ok


class FakeReader:
    """SyncRecordReader over a list of stored documents."""

    def __init__(self, documents: list[dict[str, Any]], signed: int = 0) -> None:
        self.documents = documents
        self.signed = signed

    def last_signed_sequence(self) -> int:
        return self.signed

    def head(self) -> ChainHead:
        last = max(self.documents, key=lambda d: d["sequence"], default=None)
        return GENESIS if last is None else ChainHead(last["sequence"], last["record_hash"])

    def anchor_before(self, first: int) -> ChainHead | None:
        if first <= 1:
            return GENESIS
        found = [d for d in self.documents if d["sequence"] == first - 1]
        return ChainHead(found[0]["sequence"], found[0]["record_hash"]) if found else None

    def iter_documents(self, first: int = 1, last: int | None = None) -> Iterator[dict[str, Any]]:
        for d in sorted(self.documents, key=lambda d: d["sequence"]):
            if d["sequence"] >= first and (last is None or d["sequence"] <= last):
                yield json_form(d)


def _checkpointed(records: list[AuditRecord], signer: Ed25519Signer, size: int) -> list[CheckpointEntry]:
    entries, previous = [], None
    for start in range(0, len(records), size):
        cp = build_checkpoint(
            records[start : start + size], signer=signer, created_at=BASE_TIME, previous=previous
        )
        entries.append(CheckpointEntry(cp, cp.object_key, "v1", cp.to_bytes()))
        previous = cp
    return entries


def test_trail_verifies_with_its_checkpoints_and_worm_copies():
    signer = Ed25519Signer.generate()
    records = chained_records(12)
    entries = _checkpointed(records, signer, 4)
    reader = FakeReader([to_document(r, r.event_id) for r in records])
    worm = {e.object_key: e.raw for e in entries}
    report = verify_trail(reader, checkpoints=entries, public_key=signer.public_key, worm_copies=worm)  # type: ignore[arg-type]
    assert report.ok, report
    assert report.checkpoints_checked == 3
    ranged = verify_trail(reader, first=5, last=8, checkpoints=entries[1:2], public_key=signer.public_key)  # type: ignore[arg-type]
    assert ranged.ok and ranged.chain.checked == 4


def test_a_rehashed_forgery_passes_the_chain_but_not_the_signed_root():
    signer = Ed25519Signer.generate()
    records = chained_records(8)
    entries = _checkpointed(records, signer, 4)
    forger = HashChain(ChainHead(4, records[3].record_hash))
    forged: list[AuditRecord] = records[:4]
    for r in records[4:]:
        forged.append(forger.append(r.model_copy(update={"actor": "mallory"}) if r.sequence == 6 else r))
    reader = FakeReader([to_document(r, r.event_id) for r in forged])
    report = verify_trail(reader, checkpoints=entries, public_key=signer.public_key)  # type: ignore[arg-type]
    assert report.chain.ok  # every hash and link was recomputed
    assert not report.ok
    assert report.checkpoint_problems == [
        "checkpoint 5..8: the records do not match the signed Merkle root "
        "(a record in this range was changed and the chain re-hashed)"
    ]


def test_index_differing_from_worm_copy_and_truncation_are_reported():
    signer = Ed25519Signer.generate()
    records = chained_records(8)
    entries = _checkpointed(records, signer, 4)
    reader = FakeReader([to_document(r, r.event_id) for r in records[:7]])  # the last record deleted
    worm = {entries[0].object_key: b"{}", entries[1].object_key: entries[1].raw}
    report = verify_trail(reader, checkpoints=entries, public_key=signer.public_key, worm_copies=worm)  # type: ignore[arg-type]
    assert report.chain.reason == "truncated" and report.chain.broken_sequence == 8
    assert "checkpoint 1..4: the database index differs from the WORM copy" in report.checkpoint_problems


def test_a_range_past_the_end_is_a_client_error_and_its_end_is_clamped():
    """Before: records past the last one were "missing" or "truncated", a verification failure that
    pages as possible tampering, for a range the chain never reached."""
    signer = Ed25519Signer.generate()
    records = chained_records(8)
    entries = _checkpointed(records, signer, 4)
    reader = FakeReader([to_document(r, r.event_id) for r in records])
    report = verify_trail(
        reader, first=5, last=100_000, checkpoints=entries[1:], public_key=signer.public_key
    )  # type: ignore[arg-type]
    assert report.ok, report
    assert (report.last_sequence, report.chain.checked) == (8, 4)
    for first in (9, 1000):
        with pytest.raises(
            RangeBeyondChain, match=r"starts at \d+, past the end of the chain: it holds records 1..8"
        ):
            verify_trail(reader, first=first, last=first + 1000, checkpoints=[], public_key=signer.public_key)  # type: ignore[arg-type]
    empty = verify_trail(FakeReader([]), first=1, last=5, checkpoints=[])  # type: ignore[arg-type]
    assert empty.ok and empty.chain.checked == 0


def test_records_deleted_from_the_tail_of_a_signed_range_are_still_found_however_far_the_range_reaches():
    signer = Ed25519Signer.generate()
    records = chained_records(8)
    entries = _checkpointed(records, signer, 4)
    reader = FakeReader([to_document(r, r.event_id) for r in records[:6]], signed=8)  # 7 and 8 deleted
    for last in (None, 8, 100_000):
        report = verify_trail(reader, first=1, last=last, checkpoints=entries, public_key=signer.public_key)  # type: ignore[arg-type]
        assert not report.ok
        assert (report.chain.reason, report.chain.broken_sequence) == ("truncated", 7), last
    inside = verify_trail(
        reader, first=8, last=100_000, checkpoints=entries[1:], public_key=signer.public_key
    )  # type: ignore[arg-type]
    assert (inside.ok, inside.chain.reason, inside.chain.broken_sequence) == (False, "missing_sequence", 7)
    with pytest.raises(RangeBeyondChain, match=r"records 1..8 \(signed; the last one stored is 6"):
        verify_trail(reader, first=9, last=100_000, checkpoints=[], public_key=signer.public_key)  # type: ignore[arg-type]


def test_settings_read_nested_anomaly_thresholds_and_refuse_bad_pages(monkeypatch):
    from enclave_audit.config import AuditSettings
    from pydantic import ValidationError

    monkeypatch.setenv("ENCLAVE_AUDIT_ANOMALY__AUTH_FAILURE_LIMIT", "3")
    monkeypatch.setenv("ENCLAVE_AUDIT_ANOMALY__TIMEZONE", "Europe/Paris")
    monkeypatch.setenv("ENCLAVE_AUDIT_CHECKPOINT_INTERVAL_S", "300")
    settings = AuditSettings()
    assert settings.anomaly.auth_failure_limit == 3
    assert settings.anomaly.timezone == "Europe/Paris"
    assert settings.checkpoint_interval_s == 300
    assert settings.retention.days == 2192
    monkeypatch.setenv("ENCLAVE_AUDIT_ANOMALY__TIMEZONE", "Mars/Olympus")
    with pytest.raises(ValidationError, match="IANA"):
        AuditSettings()
    monkeypatch.delenv("ENCLAVE_AUDIT_ANOMALY__TIMEZONE")
    with pytest.raises(ValidationError, match="default_page_size"):
        AuditSettings(default_page_size=500, max_page_size=100)


def test_removing_the_index_entries_of_the_tail_does_not_hide_its_truncation():
    """Whoever can write the database deletes the last records and the index entry of the
    checkpoint that signed them: the object-lock bucket still has the checkpoint, so the chain's
    end is where it signed."""
    signer = Ed25519Signer.generate()
    records = chained_records(8)
    entries = _checkpointed(records, signer, 4)
    stored = [StoredCheckpoint(e.object_key, "v1", e.raw) for e in entries]
    reader = FakeReader([to_document(r, r.event_id) for r in records[:5]], signed=4)  # 6..8 deleted
    hidden = verify_trail(reader, checkpoints=entries[:1], public_key=signer.public_key)  # type: ignore[arg-type]
    assert hidden.ok  # what the database alone says: nothing is missing
    report = verify_trail(reader, checkpoints=entries[:1], public_key=signer.public_key, stored=stored)  # type: ignore[arg-type]
    assert not report.ok
    assert (report.chain.reason, report.chain.broken_sequence) == ("truncated", 6)


def test_every_stored_version_must_be_a_signed_checkpoint_under_its_own_name():
    signer = Ed25519Signer.generate()
    records = chained_records(8)
    entries = _checkpointed(records, signer, 4)
    reader = FakeReader([to_document(r, r.event_id) for r in records], signed=8)
    other = Ed25519Signer.generate()
    forged = build_checkpoint(records[4:], signer=other, created_at=BASE_TIME, previous=entries[0].checkpoint)
    stored = [
        *(StoredCheckpoint(e.object_key, "v1", e.raw) for e in entries),
        StoredCheckpoint(entries[1].object_key, "v2", forged.to_bytes()),  # a second version, other key
        StoredCheckpoint(entries[0].object_key, "v2", entries[1].raw),  # 5..8 under 1..4's name
        StoredCheckpoint("checkpoints/000000000009-000000000010.json", "v1", b"{}"),
    ]
    report = verify_trail(reader, checkpoints=entries, public_key=signer.public_key, stored=stored)  # type: ignore[arg-type]
    assert report.chain.ok and not report.ok
    assert report.checkpoint_problems == [
        f"object {entries[0].object_key} (v2) holds checkpoint 5..8",
        "object checkpoints/000000000009-000000000010.json (v1) in the object-lock bucket is no checkpoint",
        f"checkpoint 5..8 in the object-lock bucket (v2): signed with key {other.key_id}, which is not "
        "among the trusted keys",
    ]


def test_a_checkpoint_missing_between_indexed_ones_is_reported():
    signer = Ed25519Signer.generate()
    records = chained_records(12)
    entries = _checkpointed(records, signer, 4)
    reader = FakeReader([to_document(r, r.event_id) for r in records], signed=12)
    report = verify_trail(reader, checkpoints=[entries[0], entries[2]], public_key=signer.public_key)  # type: ignore[arg-type]
    assert report.chain.ok and not report.ok
    assert report.checkpoint_problems == ["no indexed checkpoint covers 5..8: index entries were removed"]
    first_gone = verify_trail(reader, checkpoints=entries[1:], public_key=signer.public_key)  # type: ignore[arg-type]
    assert first_gone.checkpoint_problems == ["no indexed checkpoint covers 1..4: index entries were removed"]
