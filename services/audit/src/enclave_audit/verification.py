"""Verification of the stored trail: the hash chain over a range, and the signed checkpoints.

Blocking code over :class:`~enclave_audit.store.SyncRecordReader` (the API runs it in a worker
thread; the CLI runs it directly). The chain names the first broken record; the checkpoints catch
what the chain alone cannot: a forger who changed a record *and* re-hashed everything after it,
or a database index that no longer matches the WORM copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from enclave_common.errors import unavailable_dependency
from enclave_common.storage import ObjectStore
from pydantic import BaseModel

from enclave_audit.chain import BreakReason, VerifyResult, verify_chain
from enclave_audit.checkpoints import (
    CHECKPOINT_PREFIX,
    Checkpoint,
    CheckpointRoots,
    checkpoint_key_bound,
    overlap_search_start,
    stored_checkpoint,
    verify_checkpoint,
)
from enclave_audit.store import CheckpointEntry, SyncRecordReader


class TrailReport(BaseModel):
    """The answer of ``GET /audit/verify`` and ``enclave-audit-verify``."""

    ok: bool
    first_sequence: int
    last_sequence: int | None
    chain: VerifyResult
    checkpoints_checked: int = 0
    checkpoint_problems: list[str] = []


class RangeBeyondChain(ValueError):
    """A range starting after the chain's end: nothing to verify, and nothing said about the trail.

    A client error (the API answers 400 ``bad_range``, the CLI exits 2), not a broken trail that
    would count in ``enclave_audit_verify_failures_total`` and page as possible tampering."""

    def __init__(self, first: int, end: int, stored: int) -> None:
        message = f"the range starts at {first}, past the end of the chain: it holds records 1..{end}"
        if stored < end:
            message += f" (signed; the last one stored is {stored}: verify the whole chain)"
        super().__init__(message)


def verify_trail(
    reader: SyncRecordReader,
    *,
    first: int = 1,
    last: int | None = None,
    checkpoints: Sequence[CheckpointEntry] = (),
    public_key: Ed25519PublicKey | Mapping[str, Ed25519PublicKey] | None = None,
    worm_copies: Mapping[str, bytes] | None = None,
    stored: Sequence[StoredCheckpoint] = (),
) -> TrailReport:
    """Verify records ``first..last`` (``last`` None: to the end) and the checkpoints overlapping them.

    ``worm_copies`` maps a checkpoint's object key to the bytes read from the object-lock bucket;
    when given, the database index must match them byte for byte. Without ``public_key`` the
    checkpoint signatures are not checked (the chain and the roots still are).

    The chain's end is its last stored record or the last sequence signed by a checkpoint,
    whichever is higher: records deleted from the tail of a signed range stay ``truncated`` (or, for
    a range starting among them, ``missing_sequence``) however far ``last`` reaches. A ``last``
    past that end is clamped to it; a ``first`` past it raises :class:`RangeBeyondChain` (the whole
    chain, ``first`` 1, never does: an empty chain verifies).

    ``stored`` is every version of every checkpoint in the object-lock bucket from the first one
    overlapping the range on (:func:`read_stored_checkpoints`), indexed or not: the bucket, not the
    database index, is what nobody can rewrite. Each must be a checkpoint under its own name, signed,
    and match the records it covers; what it signs counts toward the chain's end. So removing index
    entries hides nothing: a truncated tail is still ``truncated``, and records a checkpoint signed
    cannot be signed again differently (the checkpointer refuses) without a stored one disagreeing.
    Checkpoints that are stored but not indexed are not a problem in themselves: a writer that lost
    the race to index a range stores one, and so does a replica that dies before indexing its own
    (the checkpointer adopts it). A gap between two indexed checkpoints is.
    """
    last_stored = reader.head().sequence
    found = _stored_checkpoints(stored)
    signed = max(
        [
            reader.last_signed_sequence(),
            *(e.checkpoint.last_sequence for e in checkpoints),
            *(cp.last_sequence for _, cp in found.versions),
        ]
    )
    end = max(last_stored, signed)
    if first > max(end, 1):
        raise RangeBeyondChain(first, end, last_stored)
    if last is not None and last > end:
        last = end or None
    anchor = reader.anchor_before(first)
    if anchor is None:
        missing = VerifyResult(
            ok=False,
            checked=0,
            broken_sequence=first - 1,
            reason=BreakReason.MISSING_SEQUENCE,
            detail=f"record {first - 1}, the anchor of the range, is missing",
        )
        return TrailReport(ok=False, first_sequence=first, last_sequence=last, chain=missing)

    def inside(cp: Checkpoint) -> bool:
        return cp.first_sequence >= first and (last is None or cp.last_sequence <= last)

    indexed = {e.raw for e in checkpoints}
    unindexed = [(s, cp) for s, cp in found.versions if s.raw not in indexed]
    covered = [e.checkpoint for e in checkpoints if inside(e.checkpoint)]
    covered += [cp for _, cp in unindexed if inside(cp)]
    # To the end: at least to the last sequence any checkpoint signed, indexed or not.
    expected_last = last if last is not None else (signed or None)
    computed = CheckpointRoots(covered)
    chain = verify_chain(
        reader.iter_documents(first, last),
        anchor=anchor,
        expected_last_sequence=expected_last,
        on_record=computed.add,
    )
    roots = {cp.checkpoint_hash(): (root, last_hash) for cp, root, last_hash in computed.completed}

    def disagrees(cp: Checkpoint) -> bool:
        root, last_hash = roots.get(cp.checkpoint_hash(), (cp.root_hash, cp.last_record_hash))
        return root != cp.root_hash or last_hash != cp.last_record_hash

    problems = list(found.problems)
    for s, cp in unindexed:
        where = (
            f"checkpoint {cp.first_sequence}..{cp.last_sequence} in the object-lock bucket ({s.version_id})"
        )
        if public_key is not None and not (check := verify_checkpoint(cp, public_key)).ok:
            problems.append(f"{where}: {check.reason}")
        elif disagrees(cp):
            problems.append(f"{where}: the records do not match its signed Merkle root")
    previous: Checkpoint | None = None
    for entry in checkpoints:
        cp = entry.checkpoint
        span = f"{cp.first_sequence}..{cp.last_sequence}"
        if entry.object_key != cp.object_key:
            problems.append(f"checkpoint {span}: its index entry names another object, {entry.object_key}")
        if (previous is None and first == 1 and cp.first_sequence != 1) or (
            previous is not None and previous.last_sequence + 1 < cp.first_sequence
        ):
            gap_start = previous.last_sequence + 1 if previous else 1
            problems.append(
                f"no indexed checkpoint covers {gap_start}..{cp.first_sequence - 1}: "
                "index entries were removed"
            )
        if worm_copies is not None:
            worm = worm_copies.get(entry.object_key)
            if worm is None:
                problems.append(f"checkpoint {span}: its WORM copy {entry.object_key} could not be read")
            elif worm != entry.raw:
                problems.append(f"checkpoint {span}: the database index differs from the WORM copy")
        adjacent = (
            previous if previous is not None and previous.last_sequence + 1 == cp.first_sequence else None
        )
        if public_key is not None:
            check = verify_checkpoint(cp, public_key, previous=adjacent)
            if not check.ok:
                problems.append(f"checkpoint {span}: {check.reason}")
        if disagrees(cp):
            problems.append(
                f"checkpoint {span}: the records do not match the signed Merkle root "
                "(a record in this range was changed and the chain re-hashed)"
            )
        previous = cp

    return TrailReport(
        ok=chain.ok and not problems,
        first_sequence=first,
        last_sequence=chain.last_sequence if last is None else last,
        chain=chain,
        checkpoints_checked=len(checkpoints),
        checkpoint_problems=problems,
    )


@dataclass(frozen=True)
class StoredCheckpoint:
    """One version of a checkpoint object, as the object-lock bucket holds it."""

    key: str
    version_id: str
    raw: bytes = field(repr=False)


@dataclass
class _Found:
    versions: list[tuple[StoredCheckpoint, Checkpoint]]
    problems: list[str]


def _stored_checkpoints(stored: Sequence[StoredCheckpoint]) -> _Found:
    found = _Found([], [])
    for s in stored:
        cp = stored_checkpoint(s.key, s.raw)
        if isinstance(cp, Checkpoint):
            found.versions.append((s, cp))
        else:
            found.problems.append(f"object {s.key} ({s.version_id}) {cp}")
    return found


async def read_stored_checkpoints(
    objects: ObjectStore,
    bucket: str,
    first: int,
    last: int | None,
    on_unreadable: Callable[[str, Exception], None],
    indexed: Sequence[CheckpointEntry] = (),
) -> list[StoredCheckpoint]:
    """Every version of every checkpoint object that may cover some of ``first..last`` (``last``
    None: to the end), for the API's and the CLI's verification. Listed from the first of the
    ``indexed`` checkpoints overlapping the range too, when that is further back: one signed before
    the span cap (``MAX_CHECKPOINT_RECORDS``) may reach further than the cap.

    A store that does not answer raises: that says nothing about the trail, so the call answers 503
    (the CLI exits 2) instead of reporting "the WORM copy could not be read", a verification failure
    that counts in ``enclave_audit_verify_failures_total`` and pages as possible tampering. A version
    the store cannot give (e.g. it is gone) is left out and passed to ``on_unreadable``; if the
    index names it, ``verify_trail`` reports it as a problem of its checkpoint."""
    start = min(first, indexed[0].checkpoint.first_sequence) if indexed else first
    listed = await objects.list_versions(
        bucket,
        CHECKPOINT_PREFIX,
        after=overlap_search_start(start),
        until=None if last is None else checkpoint_key_bound(last),
    )
    stored = []
    for key, version_id in listed:
        try:
            body = await objects.open(bucket, key, version_id)
            stored.append(StoredCheckpoint(key, version_id, await asyncio.to_thread(body.read)))
        except Exception as exc:
            if unavailable_dependency(exc) is not None:
                raise
            on_unreadable(key, exc)
    return stored


def index_copies(entries: Sequence[CheckpointEntry], stored: Sequence[StoredCheckpoint]) -> dict[str, bytes]:
    """The stored bytes of the version each index entry names (``verify_trail``'s ``worm_copies``)."""
    by_version = {(s.key, s.version_id): s.raw for s in stored}
    return {
        e.object_key: by_version[(e.object_key, e.version_id or "")]
        for e in entries
        if (e.object_key, e.version_id or "") in by_version
    }
