"""The hash chain that makes the audit trail tamper-evident.

Record ``n`` carries ``sequence = n``, ``prev_hash`` = the hash of record ``n - 1`` (the genesis hash
for record 1) and ``record_hash = SHA-256(JCS(record without record_hash))``, where JCS is the RFC
8785 JSON Canonicalization Scheme (the ``rfc8785`` package). Changing, deleting, reordering or
inserting a record breaks either its own hash or the next record's link; :func:`verify_chain`
streams over records in sequence order and names the first one that breaks and why.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import rfc8785
from pydantic import BaseModel, ValidationError

from enclave_audit.records import AuditRecord, AuditRecordDraft

#: The ``prev_hash`` of record 1: SHA-256 of a fixed, versioned label.
GENESIS_HASH: Final = hashlib.sha256(b"enclave.audit.chain.genesis.v1").hexdigest()
_MAX_SAFE_INTEGER: Final = 2**53 - 1


def canonical_json(value: Any) -> bytes:
    """RFC 8785 canonical JSON bytes (sorted keys, ECMAScript number form, no whitespace).

    The ``rfc8785`` package is the reference; it is pure Python and costs ~130 us per record. When
    a document holds no float whose ECMAScript form differs from Python's ``repr`` and no key
    outside the Basic Multilingual Plane (where UTF-16 and code point order differ), the standard
    library's C encoder yields the same bytes five times faster, so that path is taken; a property
    test checks both agree.
    """
    if _json_matches_jcs(value):
        return json.dumps(
            value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")
    return rfc8785.dumps(value)


def _json_matches_jcs(value: Any) -> bool:
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return kind is not int or abs(value) <= _MAX_SAFE_INTEGER
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or (not key.isascii() and any(ord(c) > 0xFFFF for c in key)):
                return False
            if not _json_matches_jcs(item):
                return False
        return True
    if kind is list:
        return all(_json_matches_jcs(item) for item in value)
    if kind is float:
        # Python's repr and ECMAScript agree on fixed notation in this range for non-integral values.
        return 1e-4 <= abs(value) < 1e16 and not value.is_integer()
    return False


def record_body(record: AuditRecord) -> dict[str, Any]:
    """The JSON document a record's hash is computed over: every field except ``record_hash``."""
    return record.model_dump(mode="json", exclude={"record_hash"})


def compute_record_hash(body: Mapping[str, Any]) -> str:
    """Hex SHA-256 over the canonical JSON of a record body."""
    return hashlib.sha256(canonical_json(body)).hexdigest()


@dataclass(frozen=True)
class ChainHead:
    """The last record of a chain (or of the part before a verified range): its sequence and hash."""

    sequence: int
    record_hash: str


#: The head of an empty chain.
GENESIS: Final = ChainHead(sequence=0, record_hash=GENESIS_HASH)


def chain_record(draft: AuditRecordDraft, head: ChainHead) -> AuditRecord:
    """Place ``draft`` after ``head``: assign the next sequence, link the previous hash, hash it."""
    link: dict[str, Any] = {"sequence": head.sequence + 1, "prev_hash": head.record_hash}
    fields = _DRAFT_FIELDS
    record_hash = compute_record_hash(draft.model_dump(mode="json", include=fields) | link)
    # The draft is already validated; construct skips a second validation of the same values.
    values = {name: getattr(draft, name) for name in fields}
    return AuditRecord.model_construct(**values, **link, record_hash=record_hash)


_DRAFT_FIELDS: Final = frozenset(AuditRecordDraft.model_fields)
_BODY_FIELDS: Final = frozenset(AuditRecord.model_fields) - {"record_hash"}


def _hash_verified_document(document: Mapping[str, Any]) -> AuditRecord | None:
    """Fast path for documents already in JSON form (NDJSON, bundles): hash them as they are.

    If the document's own fields hash to its ``record_hash``, they are byte for byte what was
    hashed when the record was appended (SHA-256 is collision resistant), so full validation can
    be skipped. Anything else (BSON datetimes, a mismatch, missing fields) returns None and takes
    the validating path, which also names what is wrong.
    """
    record_hash = document.get("record_hash")
    if not isinstance(record_hash, str) or not document.keys() >= _BODY_FIELDS:
        return None
    try:
        actual = compute_record_hash({name: document[name] for name in _BODY_FIELDS})
    except (TypeError, ValueError):
        return None
    if actual != record_hash:
        return None
    return AuditRecord.model_construct(
        **{name: document[name] for name in _BODY_FIELDS}, record_hash=record_hash
    )


class HashChain:
    """An appender that remembers the head. The store must persist records in ``append`` order.

    Resuming after a restart is ``HashChain(head=ChainHead(last.sequence, last.record_hash))`` from
    the last stored record; the store's unique index on ``sequence`` refuses a second writer.
    """

    def __init__(self, head: ChainHead = GENESIS) -> None:
        self.head = head

    def append(self, draft: AuditRecordDraft) -> AuditRecord:
        record = chain_record(draft, self.head)
        self.head = ChainHead(record.sequence, record.record_hash)
        return record


class BreakReason(StrEnum):
    """Why a chain does not verify."""

    HASH_MISMATCH = "hash_mismatch"
    PREV_HASH_MISMATCH = "prev_hash_mismatch"
    MISSING_SEQUENCE = "missing_sequence"
    OUT_OF_ORDER = "out_of_order"
    MALFORMED = "malformed"
    TRUNCATED = "truncated"


class VerifyResult(BaseModel):
    """The answer of a verification: OK, or the first broken sequence number and why."""

    ok: bool
    checked: int
    first_sequence: int | None = None
    last_sequence: int | None = None
    last_hash: str | None = None
    broken_sequence: int | None = None
    reason: BreakReason | None = None
    detail: str | None = None


def verify_chain(
    records: Iterable[AuditRecord | Mapping[str, Any]],
    *,
    anchor: ChainHead = GENESIS,
    expected_last_sequence: int | None = None,
    on_record: Callable[[AuditRecord], None] | None = None,
) -> VerifyResult:
    """Verify records given in ascending sequence order, starting right after ``anchor``.

    Streams: memory stays constant whatever the number of records. ``anchor`` is the record just
    before a verified range (``GENESIS`` for the whole chain); ``expected_last_sequence`` (e.g. from
    a signed checkpoint) also catches records deleted at the end. ``on_record`` sees every record
    that verified, e.g. to feed a Merkle tree.
    """
    head = anchor
    checked = 0
    first: int | None = None

    def broken(sequence: int | None, reason: BreakReason, detail: str) -> VerifyResult:
        return VerifyResult(
            ok=False,
            checked=checked,
            first_sequence=first,
            last_sequence=head.sequence if checked else None,
            last_hash=head.record_hash if checked else None,
            broken_sequence=sequence,
            reason=reason,
            detail=detail,
        )

    for item in records:
        expected = head.sequence + 1
        trusted = _hash_verified_document(item) if isinstance(item, Mapping) else None
        try:
            record = trusted or (item if isinstance(item, AuditRecord) else AuditRecord.model_validate(item))
        except ValidationError as exc:
            fields = ", ".join(sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]}))
            raw_seq = item.get("sequence") if isinstance(item, Mapping) else None
            sequence = raw_seq if isinstance(raw_seq, int) else expected
            return broken(sequence, BreakReason.MALFORMED, f"record {sequence} is malformed: {fields}")
        if record.sequence > expected:
            return broken(
                expected,
                BreakReason.MISSING_SEQUENCE,
                f"sequence {expected} expected, found {record.sequence}: "
                f"records {expected}..{record.sequence - 1} are missing or out of order",
            )
        if record.sequence < expected:
            return broken(
                record.sequence,
                BreakReason.OUT_OF_ORDER,
                f"sequence {record.sequence} found after {head.sequence}: duplicated or out of order",
            )
        if trusted is None and compute_record_hash(record_body(record)) != record.record_hash:
            return broken(
                record.sequence,
                BreakReason.HASH_MISMATCH,
                f"record {record.sequence} does not hash to its record_hash: its content was changed",
            )
        if record.prev_hash != head.record_hash:
            return broken(
                record.sequence,
                BreakReason.PREV_HASH_MISMATCH,
                f"prev_hash of record {record.sequence} does not match the hash of record {head.sequence}: "
                "one of them was replaced or re-hashed",
            )
        if first is None:
            first = record.sequence
        checked += 1
        head = ChainHead(record.sequence, record.record_hash)
        if on_record is not None:
            on_record(record)

    if expected_last_sequence is not None and head.sequence < expected_last_sequence:
        return broken(
            head.sequence + 1,
            BreakReason.TRUNCATED,
            f"chain ends at {head.sequence}, expected up to {expected_last_sequence}: records were removed",
        )
    return VerifyResult(
        ok=True,
        checked=checked,
        first_sequence=first,
        last_sequence=head.sequence if checked else None,
        last_hash=head.record_hash if checked else None,
    )
