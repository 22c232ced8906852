"""Signed evidence bundles: a range of audit records that a third party can verify offline.

A bundle is one POSIX tar stream holding

- ``records.ndjson``: the records, one RFC 8785 canonical JSON document per line, in sequence order;
- ``checkpoints/<first>-<last>.json``: the signed checkpoints overlapping the range, as stored;
- ``manifest.json``: format, range, the anchor (sequence and hash of the record just before the
  range), record count, SHA-256 and size of every other file, and the checkpoint references;
- ``manifest.sig``: base64 Ed25519 signature over the exact bytes of ``manifest.json``.

``python -m enclave_audit.verify_bundle bundle.tar --public-key key.pem`` checks all of it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import IO, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from enclave_audit.chain import GENESIS, ChainHead, canonical_json
from enclave_audit.checkpoints import Checkpoint
from enclave_audit.records import HEX_SHA256, AuditRecord, UtcMillis
from enclave_audit.signing import Signer

BUNDLE_FORMAT: Final = "enclave.audit.bundle.v1"
MANIFEST_PATH: Final = "manifest.json"
SIGNATURE_PATH: Final = "manifest.sig"
RECORDS_PATH: Final = "records.ndjson"
CHECKPOINT_DIR: Final = "checkpoints/"
#: Records are spooled in memory up to this size, then to a temporary file.
SPOOL_IN_MEMORY_BYTES: Final = 64 * 1024 * 1024


class BundleFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    sha256: str = Field(pattern=HEX_SHA256)
    size: int = Field(ge=0)


class BundleCheckpointRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    first_sequence: int
    last_sequence: int
    root_hash: str = Field(pattern=HEX_SHA256)
    checkpoint_hash: str = Field(pattern=HEX_SHA256)


class BundleManifest(BaseModel):
    """What the bundle contains; signed, so none of it can be changed without the signature failing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["enclave.audit.bundle.v1"] = BUNDLE_FORMAT
    created_at: UtcMillis
    key_id: str
    anchor_sequence: int = Field(ge=0)
    anchor_hash: str = Field(pattern=HEX_SHA256)
    first_sequence: int | None = None
    last_sequence: int | None = None
    record_count: int = Field(ge=0)
    files: tuple[BundleFile, ...]
    checkpoints: tuple[BundleCheckpointRef, ...] = ()

    def to_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))


def covering_range(first: int, last: int, checkpoints: Sequence[Checkpoint]) -> tuple[int, int]:
    """Widen ``first..last`` to checkpoint boundaries, so every checkpoint in the bundle is fully covered."""
    for cp in checkpoints:
        if cp.covers(first):
            first = cp.first_sequence
        if cp.covers(last):
            last = cp.last_sequence
    return first, last


def overlapping_checkpoints(first: int, last: int, checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
    """Checkpoints that share at least one sequence with ``first..last``, in sequence order."""
    found = [cp for cp in checkpoints if cp.first_sequence <= last and cp.last_sequence >= first]
    return sorted(found, key=lambda cp: cp.first_sequence)


def write_bundle(
    out: IO[bytes],
    records: Iterable[AuditRecord],
    *,
    signer: Signer,
    created_at: datetime,
    anchor: ChainHead = GENESIS,
    checkpoints: Sequence[Checkpoint] = (),
) -> BundleManifest:
    """Write a bundle of ``records`` (ascending, starting right after ``anchor``) as a tar stream.

    ``out`` may be unseekable (an HTTP response body). Records are spooled once to learn their
    hash and size before the tar headers are written; memory stays bounded by the spool size.
    """
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES) as spool:
        digest = hashlib.sha256()
        count, first, last = 0, None, None
        for record in records:
            line = canonical_json(record.model_dump(mode="json")) + b"\n"
            spool.write(line)
            digest.update(line)
            count += 1
            first = record.sequence if first is None else first
            last = record.sequence
        size = spool.tell()
        spool.seek(0)

        checkpoint_files = [(f"{CHECKPOINT_DIR}{cp.object_key.rsplit('/', 1)[-1]}", cp) for cp in checkpoints]
        files = [BundleFile(path=RECORDS_PATH, sha256=digest.hexdigest(), size=size)]
        refs = []
        for path, cp in checkpoint_files:
            raw = cp.to_bytes()
            files.append(BundleFile(path=path, sha256=hashlib.sha256(raw).hexdigest(), size=len(raw)))
            refs.append(
                BundleCheckpointRef(
                    path=path,
                    first_sequence=cp.first_sequence,
                    last_sequence=cp.last_sequence,
                    root_hash=cp.root_hash,
                    checkpoint_hash=cp.checkpoint_hash(),
                )
            )
        manifest = BundleManifest(
            created_at=created_at,
            key_id=signer.key_id,
            anchor_sequence=anchor.sequence,
            anchor_hash=anchor.record_hash,
            first_sequence=first,
            last_sequence=last,
            record_count=count,
            files=tuple(files),
            checkpoints=tuple(refs),
        )
        manifest_bytes = manifest.to_bytes()
        signature = base64.b64encode(signer.sign(manifest_bytes)) + b"\n"

        mtime = int(manifest.created_at.timestamp())
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, MANIFEST_PATH, io.BytesIO(manifest_bytes), len(manifest_bytes), mtime)
            _add(tar, SIGNATURE_PATH, io.BytesIO(signature), len(signature), mtime)
            for path, cp in checkpoint_files:
                raw = cp.to_bytes()
                _add(tar, path, io.BytesIO(raw), len(raw), mtime)
            _add(tar, RECORDS_PATH, spool, size, mtime)
    return manifest


def build_bundle(
    records: Iterable[AuditRecord],
    *,
    signer: Signer,
    created_at: datetime,
    anchor: ChainHead = GENESIS,
    checkpoints: Sequence[Checkpoint] = (),
) -> bytes:
    """The bundle as bytes (for small ranges and tests; prefer :func:`write_bundle` to stream)."""
    out = io.BytesIO()
    write_bundle(out, records, signer=signer, created_at=created_at, anchor=anchor, checkpoints=checkpoints)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: IO[bytes], size: int, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o444
    tar.addfile(info, data)
