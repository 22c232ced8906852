"""Signed checkpoints: a Merkle root over a range of records, chained and signed with Ed25519.

A checkpoint pins ``first_sequence..last_sequence``: the RFC 6962 root of their record hashes,
the last record hash (so it also pins the hash chain's head), the hash of the previous checkpoint
(so checkpoints form their own chain) and when it was made. It is stored as RFC 8785 canonical JSON
in an object-lock bucket (COMPLIANCE mode): once written, neither the audit service nor an admin
can rewrite history below it without the signature or the WORM copy giving it away.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from enclave_audit.chain import canonical_json
from enclave_audit.merkle import MerkleTreeBuilder
from enclave_audit.records import HEX_SHA256, AuditRecord, UtcMillis
from enclave_audit.signing import Signer, ed25519_key_id, verify_signature

CHECKPOINT_FORMAT: Final = "enclave.audit.checkpoint.v1"
#: ``prev_checkpoint_hash`` of the first checkpoint.
CHECKPOINT_GENESIS_HASH: Final = hashlib.sha256(b"enclave.audit.checkpoint.genesis.v1").hexdigest()
#: Where checkpoints are in the object-lock bucket: ``checkpoints/<first>-<last>.json``, each number
#: zero-padded to 12 digits, so names sort by sequence (S3 lists keys in that order).
CHECKPOINT_PREFIX: Final = "checkpoints/"
#: No checkpoint spans more records (``ENCLAVE_AUDIT_CHECKPOINT_EVERY_RECORDS`` is at most this), so
#: the stored checkpoints overlapping a sequence start at most this far before it: that is where
#: the checkpointer and verification start listing the bucket.
MAX_CHECKPOINT_RECORDS: Final = 10_000
_OBJECT_KEY = re.compile(r"checkpoints/(\d{12})-(\d{12})\.json")


def checkpoint_object_key(first: int, last: int) -> str:
    return f"{CHECKPOINT_PREFIX}{first:012d}-{last:012d}.json"


def checkpoint_key_prefix(first: int) -> str:
    """What the object keys of the checkpoints starting at ``first`` begin with."""
    return f"{CHECKPOINT_PREFIX}{first:012d}-"


def overlap_search_start(sequence: int) -> str:
    """The key to list the bucket after, to find every stored checkpoint that covers ``sequence``."""
    return checkpoint_key_prefix(max(1, sequence - MAX_CHECKPOINT_RECORDS))


def checkpoint_key_bound(first: int) -> str:
    """A key after those of every checkpoint starting at ``first`` or before, and before the others."""
    return f"{checkpoint_key_prefix(first)}~"


def checkpoint_range(object_key: str) -> tuple[int, int] | None:
    """``(first, last)`` of a checkpoint's object key; None for any other name."""
    match = _OBJECT_KEY.fullmatch(object_key)
    return (int(match[1]), int(match[2])) if match else None


class CheckpointError(ValueError):
    """A checkpoint could not be built from the records given (gap, wrong start, empty range)."""


class Checkpoint(BaseModel):
    """The signed document. ``signature`` is base64 Ed25519 over the canonical JSON of the rest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["enclave.audit.checkpoint.v1"] = CHECKPOINT_FORMAT
    first_sequence: int = Field(ge=1)
    last_sequence: int = Field(ge=1)
    tree_size: int = Field(ge=1)
    root_hash: str = Field(pattern=HEX_SHA256)
    last_record_hash: str = Field(pattern=HEX_SHA256)
    prev_checkpoint_hash: str = Field(pattern=HEX_SHA256)
    created_at: UtcMillis
    key_id: str
    signature: str = ""

    def signed_bytes(self) -> bytes:
        """The bytes the signature covers: the canonical JSON of every field but ``signature``."""
        return canonical_json(self.model_dump(mode="json", exclude={"signature"}))

    def to_bytes(self) -> bytes:
        """The canonical JSON stored in the object-lock bucket (and in evidence bundles)."""
        return canonical_json(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Checkpoint:
        return cls.model_validate_json(raw)

    def checkpoint_hash(self) -> str:
        """Hex SHA-256 of the stored bytes: what the next checkpoint's ``prev_checkpoint_hash`` holds."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def object_key(self) -> str:
        """Object name in the checkpoint bucket; zero-padded so names sort by sequence."""
        return checkpoint_object_key(self.first_sequence, self.last_sequence)

    def covers(self, sequence: int) -> bool:
        return self.first_sequence <= sequence <= self.last_sequence


def stored_checkpoint(key: str, raw: bytes) -> Checkpoint | str:
    """The checkpoint the object ``key`` of the bucket holds, or what is wrong with it (it holds no
    checkpoint, or one whose name is another's)."""
    try:
        checkpoint = Checkpoint.from_bytes(raw)
    except ValueError:
        return "in the object-lock bucket is no checkpoint"
    if checkpoint.object_key != key:
        return f"holds checkpoint {checkpoint.first_sequence}..{checkpoint.last_sequence}"
    return checkpoint


class CheckpointRoots:
    """The Merkle root and the last record hash of each checkpoint, computed while the records are
    walked once in ascending sequence order (``add``, as ``verify_chain``'s ``on_record``).

    Each record meets only the checkpoints that cover it, so a walk costs O(records + checkpoints).
    Before the tenth session every record was tested against every checkpoint: a whole-chain
    verification of a month of trail (a checkpoint every 5 minutes) spent ~25 minutes on that alone,
    and more every day after.
    """

    def __init__(self, checkpoints: Iterable[Checkpoint]) -> None:
        self._pending = sorted(checkpoints, key=lambda cp: (cp.first_sequence, cp.last_sequence))
        self._next = 0
        self._open: list[tuple[Checkpoint, MerkleTreeBuilder]] = []
        #: (checkpoint, root hex, hash of its last record), in the order the checkpoints completed.
        self.completed: list[tuple[Checkpoint, str, str]] = []

    def add(self, record: AuditRecord) -> None:
        sequence = record.sequence
        while self._next < len(self._pending) and self._pending[self._next].first_sequence <= sequence:
            self._open.append((self._pending[self._next], MerkleTreeBuilder()))
            self._next += 1
        still_open: list[tuple[Checkpoint, MerkleTreeBuilder]] = []
        for checkpoint, builder in self._open:
            if checkpoint.last_sequence < sequence:
                continue  # passed without its last record (a gap: the chain reports it)
            builder.append(record.record_hash)
            if sequence == checkpoint.last_sequence:
                self.completed.append((checkpoint, builder.root().hex(), record.record_hash))
            else:
                still_open.append((checkpoint, builder))
        self._open = still_open


def build_checkpoint(
    records: Iterable[AuditRecord],
    *,
    signer: Signer,
    created_at: datetime,
    previous: Checkpoint | None = None,
) -> Checkpoint:
    """Sign a checkpoint over ``records`` (contiguous, ascending), continuing after ``previous``.

    The records must start right after the previous checkpoint (or at 1 without one): checkpoints
    tile the chain without gaps, so every record ends up under exactly one signed root.
    """
    expected = previous.last_sequence + 1 if previous is not None else 1
    builder = MerkleTreeBuilder()
    first: int | None = None
    last: AuditRecord | None = None
    for record in records:
        if record.sequence != expected:
            raise CheckpointError(
                f"checkpoint records must be contiguous: sequence {expected} expected, got {record.sequence}"
            )
        if first is None:
            first = record.sequence
        builder.append(record.record_hash)
        last = record
        expected += 1
    if first is None or last is None:
        raise CheckpointError("a checkpoint needs at least one record; the range given was empty")
    unsigned = Checkpoint(
        first_sequence=first,
        last_sequence=last.sequence,
        tree_size=builder.size,
        root_hash=builder.root().hex(),
        last_record_hash=last.record_hash,
        prev_checkpoint_hash=previous.checkpoint_hash() if previous is not None else CHECKPOINT_GENESIS_HASH,
        created_at=created_at,
        key_id=signer.key_id,
    )
    signature = signer.sign(unsigned.signed_bytes())
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode("ascii")})


class CheckpointVerification(BaseModel):
    """Result of checking one checkpoint: OK, or why not."""

    ok: bool
    first_sequence: int | None = None
    last_sequence: int | None = None
    reason: str | None = None


def verify_checkpoint(
    checkpoint: Checkpoint | bytes,
    public_keys: Ed25519PublicKey | Mapping[str, Ed25519PublicKey],
    *,
    record_hashes: Iterable[str] | None = None,
    previous: Checkpoint | None = None,
) -> CheckpointVerification:
    """Check a checkpoint's signature and, when given, its Merkle root and link to the previous one.

    ``record_hashes`` are the hashes of records ``first_sequence..last_sequence`` in order (e.g.
    read back from the database); ``previous`` is the checkpoint just before it.
    """
    if isinstance(checkpoint, bytes):
        try:
            checkpoint = Checkpoint.from_bytes(checkpoint)
        except ValidationError as exc:
            fields = ", ".join(sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]})) or "document"
            return CheckpointVerification(ok=False, reason=f"checkpoint is malformed: {fields}")

    def failed(reason: str) -> CheckpointVerification:
        return CheckpointVerification(
            ok=False,
            first_sequence=checkpoint.first_sequence,
            last_sequence=checkpoint.last_sequence,
            reason=reason,
        )

    keys = (
        {ed25519_key_id(public_keys): public_keys}
        if isinstance(public_keys, Ed25519PublicKey)
        else dict(public_keys)
    )
    key = keys.get(checkpoint.key_id)
    if key is None:
        return failed(f"signed with key {checkpoint.key_id}, which is not among the trusted keys")
    try:
        signature = base64.b64decode(checkpoint.signature, validate=True)
    except binascii.Error:
        return failed("signature is not valid base64")
    if not verify_signature(key, signature, checkpoint.signed_bytes()):
        return failed("signature does not verify: the checkpoint was altered or signed by another key")
    if checkpoint.last_sequence - checkpoint.first_sequence + 1 != checkpoint.tree_size:
        return failed("tree_size does not match the sequence range")
    if previous is not None:
        if checkpoint.prev_checkpoint_hash != previous.checkpoint_hash():
            ending = previous.last_sequence
            return failed(f"prev_checkpoint_hash does not match the checkpoint ending at {ending}")
        if checkpoint.first_sequence != previous.last_sequence + 1:
            return failed(f"does not start right after the previous checkpoint ({previous.last_sequence})")
    if record_hashes is not None:
        builder = MerkleTreeBuilder()
        last_hash = None
        for record_hash in record_hashes:
            builder.append(record_hash)
            last_hash = record_hash
        if builder.size != checkpoint.tree_size:
            return failed(f"{builder.size} records given, the checkpoint covers {checkpoint.tree_size}")
        if builder.root().hex() != checkpoint.root_hash:
            return failed("Merkle root of the records does not match the signed root")
        if last_hash != checkpoint.last_record_hash:
            return failed("last record hash does not match the signed chain head")
    return CheckpointVerification(
        ok=True, first_sequence=checkpoint.first_sequence, last_sequence=checkpoint.last_sequence
    )
