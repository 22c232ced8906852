"""Verification of the stored trail: the hash chain over a range, and the signed checkpoints.

Blocking code over :class:`~enclave_audit.store.SyncRecordReader` (the API runs it in a worker
thread; the CLI runs it directly). The chain names the first broken record; the checkpoints catch
what the chain alone cannot: a forger who changed a record *and* re-hashed everything after it,
or a database index that no longer matches the WORM copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from enclave_common.errors import unavailable_dependency
from enclave_common.storage import ObjectStore
from pydantic import BaseModel

from enclave_audit.chain import BreakReason, VerifyResult, verify_chain
from enclave_audit.checkpoints import (
    CHECKPOINT_PREFIX,
    Checkpoint,
    CheckpointRoots,
    checkpoint_range,
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
    public_key: Ed25519PublicKey | None = None,
    worm_copies: Mapping[str, bytes] | None = None,
    unindexed: Sequence[str] = (),
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

    ``unindexed`` are the object keys of checkpoints in the object-lock bucket after the last one the
    database indexes (:func:`unindexed_checkpoints`). Each is a problem (index entries were removed,
    or a replica died between storing and indexing it, which the checkpointer repairs by adopting
    it), and what they sign counts toward the chain's end. So do checkpoints missing between two
    indexed ones. Without this, removing the tail's index entries along with its records would hide
    the truncation.
    """
    stored = reader.head().sequence
    spans = [(key, checkpoint_range(key)) for key in unindexed]
    signed = max(
        [
            reader.last_signed_sequence(),
            *(e.checkpoint.last_sequence for e in checkpoints),
            *(span[1] for _, span in spans if span is not None),
        ]
    )
    end = max(stored, signed)
    if first > max(end, 1):
        raise RangeBeyondChain(first, end, stored)
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

    covered = [
        e.checkpoint
        for e in checkpoints
        if e.checkpoint.first_sequence >= first and (last is None or e.checkpoint.last_sequence <= last)
    ]
    # To the end: at least to the last sequence any checkpoint signed, indexed or not.
    expected_last = last if last is not None else (signed or None)
    computed = CheckpointRoots(covered)
    chain = verify_chain(
        reader.iter_documents(first, last),
        anchor=anchor,
        expected_last_sequence=expected_last,
        on_record=computed.add,
    )
    roots = {cp.first_sequence: (root, last_hash) for cp, root, last_hash in computed.completed}

    problems: list[str] = []
    for key, span in spans:
        where = f"checkpoint {span[0]}..{span[1]}" if span else f"object {key}"
        problems.append(
            f"{where} is in the object-lock bucket but not in the database index (index entries "
            "removed, or not yet indexed after a replica died: the checkpointer then adopts it)"
        )
    previous: Checkpoint | None = None
    for entry in checkpoints:
        cp = entry.checkpoint
        span = f"{cp.first_sequence}..{cp.last_sequence}"
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
        if cp.first_sequence in roots:
            root, last_hash = roots[cp.first_sequence]
            if root != cp.root_hash or last_hash != cp.last_record_hash:
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


async def unindexed_checkpoints(objects: ObjectStore, bucket: str, last_indexed: str | None) -> list[str]:
    """Object keys of the checkpoints in the object-lock bucket that start after the last indexed one
    (its key; None: there is none), in order; at most 1,000 are listed.

    Left out: checkpoints that start inside the last indexed one. A second writer that lost the race
    to index the same range stored them (the index refused its insert); they are harmless orphans,
    and any with a smaller end sort before the indexed one anyway."""
    span = checkpoint_range(last_indexed) if last_indexed else None
    indexed_end = span[1] if span else 0
    keys = await objects.keys_after(bucket, CHECKPOINT_PREFIX, last_indexed or CHECKPOINT_PREFIX)
    return [key for key in keys if (found := checkpoint_range(key)) is None or found[0] > indexed_end]


async def read_worm_copies(
    objects: ObjectStore,
    bucket: str,
    entries: Sequence[CheckpointEntry],
    on_unreadable: Callable[[str, Exception], None],
) -> dict[str, bytes]:
    """The WORM copy of each checkpoint, by object key (the API's and the CLI's verification).

    A store that does not answer raises: that says nothing about the trail, so the call answers 503
    (the CLI exits 2) instead of reporting "the WORM copy could not be read", a verification failure
    that counts in ``enclave_audit_verify_failures_total`` and pages as possible tampering. A copy the
    store cannot give (e.g. it is gone) is left out and passed to ``on_unreadable``; ``verify_trail``
    then reports it as a problem of its checkpoint."""
    worm: dict[str, bytes] = {}
    for entry in entries:
        try:
            body = await objects.open(bucket, entry.object_key, entry.version_id)
            worm[entry.object_key] = await asyncio.to_thread(body.read)
        except Exception as exc:
            if unavailable_dependency(exc) is not None:
                raise
            on_unreadable(entry.object_key, exc)
    return worm
