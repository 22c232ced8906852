"""Offline verifier of an audit evidence bundle.

Usage: ``python -m enclave_audit.verify_bundle bundle.tar --public-key audit-signing.pub.pem``

Checks, with nothing but the bundle and the audit service's Ed25519 public key: the manifest
signature; the SHA-256 and size of every file; each checkpoint's signature and the links between
consecutive checkpoints; every record's hash and the hash chain from the manifest's anchor to the
last record; and, for every checkpoint the bundle fully covers, the RFC 6962 Merkle root and the
chain head it signed. Exits 0 when everything holds, 1 when anything fails, 2 on usage errors
(a missing file or key, a file that is not a tar archive).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import sys
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ValidationError

from enclave_audit.chain import ChainHead, verify_chain
from enclave_audit.checkpoints import Checkpoint, CheckpointRoots, verify_checkpoint
from enclave_audit.export import (
    CHECKPOINT_DIR,
    MANIFEST_PATH,
    RECORDS_PATH,
    SIGNATURE_PATH,
    BundleManifest,
)
from enclave_audit.signing import ed25519_key_id, load_public_key_pem, verify_signature

MAX_SMALL_FILE: Final = 16 * 1024 * 1024


class NotATarArchive(ValueError):
    """The file is no bundle at all (e.g. the JSON error of a refused export saved by ``curl -o``):
    unusable input, not a check that failed."""


class BundleVerification(BaseModel):
    """Outcome of verifying a bundle: the checks that passed, and the problems found."""

    ok: bool
    passed: list[str]
    problems: list[str]
    record_count: int = 0
    first_sequence: int | None = None
    last_sequence: int | None = None


def verify_bundle(
    bundle: IO[bytes], public_key: Ed25519PublicKey, other_keys: Sequence[Ed25519PublicKey] = ()
) -> BundleVerification:
    """Verify a bundle read from a seekable binary file; :class:`NotATarArchive` if it is not a tar."""
    passed: list[str] = []
    problems: list[str] = []

    def result(count: int = 0, first: int | None = None, last: int | None = None) -> BundleVerification:
        return BundleVerification(
            ok=not problems,
            passed=passed,
            problems=problems,
            record_count=count,
            first_sequence=first,
            last_sequence=last,
        )

    try:
        tar = tarfile.open(fileobj=bundle, mode="r:*")  # noqa: SIM115 (closed by the ``with tar`` below)
    except tarfile.TarError:
        raise NotATarArchive("not a tar archive") from None
    with tar:
        try:
            listed_members = tar.getmembers()
        except tarfile.TarError:
            raise NotATarArchive("not a complete tar archive (cut short?)") from None
        members = {}
        for member in listed_members:
            if not member.isfile():
                problems.append(f"{member.name}: only regular files are allowed in a bundle")
            elif member.name in members:
                problems.append(f"{member.name}: appears twice")
            else:
                members[member.name] = member
        if problems:
            return result()

        def read_small(name: str) -> bytes | None:
            member = members.get(name)
            if member is None:
                problems.append(f"{name}: missing")
                return None
            if member.size > MAX_SMALL_FILE:
                problems.append(f"{name}: {member.size} bytes, at most {MAX_SMALL_FILE} allowed")
                return None
            handle = tar.extractfile(member)
            return handle.read() if handle is not None else None

        manifest_bytes = read_small(MANIFEST_PATH)
        signature_text = read_small(SIGNATURE_PATH)
        if manifest_bytes is None or signature_text is None:
            return result()
        key_id = ed25519_key_id(public_key)
        try:
            signature = base64.b64decode(signature_text.strip(), validate=True)
        except binascii.Error:
            problems.append(f"{SIGNATURE_PATH}: not base64")
            return result()
        if not verify_signature(public_key, signature, manifest_bytes):
            problems.append(f"{SIGNATURE_PATH}: manifest signature does not verify with key {key_id}")
            return result()
        try:
            manifest = BundleManifest.model_validate_json(manifest_bytes)
        except ValidationError:
            problems.append(f"{MANIFEST_PATH}: signed, but not a {BundleManifest.__name__} document")
            return result()
        if manifest.key_id != key_id:
            problems.append(f"manifest names key {manifest.key_id}, verified with {key_id}")
            return result()
        passed.append(f"manifest signature verifies with key {key_id}")

        listed = {f.path for f in manifest.files}
        if RECORDS_PATH not in listed:
            problems.append(f"{MANIFEST_PATH}: does not list {RECORDS_PATH}")
            return result()
        extra = sorted(set(members) - listed - {MANIFEST_PATH, SIGNATURE_PATH})
        problems.extend(f"{name}: in the archive but not in the manifest" for name in extra)
        for entry in manifest.files:
            listed_member = members.get(entry.path)
            if listed_member is None:
                problems.append(f"{entry.path}: listed in the manifest but missing")
                continue
            digest, size = _hash_member(tar, listed_member)
            if (digest, size) != (entry.sha256, entry.size):
                problems.append(f"{entry.path}: SHA-256 or size differs from the manifest")
        if problems:
            return result()
        passed.append(f"{len(manifest.files)} files match their manifest hashes")

        trusted = {ed25519_key_id(k): k for k in (public_key, *other_keys)}
        checkpoints = _verify_checkpoints(tar, members, manifest, trusted, passed, problems)
        count, first, last = _verify_records(
            tar, members[RECORDS_PATH], manifest, checkpoints, passed, problems
        )
        return result(count, first, last)


def _hash_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    handle = tar.extractfile(member)
    if handle is not None:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _verify_checkpoints(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    manifest: BundleManifest,
    trusted: Mapping[str, Ed25519PublicKey],
    passed: list[str],
    problems: list[str],
) -> list[Checkpoint]:
    checkpoints: list[Checkpoint] = []
    previous: Checkpoint | None = None
    for ref in sorted(manifest.checkpoints, key=lambda r: r.first_sequence):
        if not ref.path.startswith(CHECKPOINT_DIR):
            problems.append(f"{ref.path}: checkpoints must live under {CHECKPOINT_DIR}")
            continue
        handle = tar.extractfile(members[ref.path])
        raw = handle.read() if handle is not None else b""
        adjacent = previous if previous and previous.last_sequence + 1 == ref.first_sequence else None
        check = verify_checkpoint(raw, trusted, previous=adjacent)
        if not check.ok:
            problems.append(f"{ref.path}: {check.reason}")
            continue
        checkpoint = Checkpoint.from_bytes(raw)
        if (checkpoint.first_sequence, checkpoint.last_sequence, checkpoint.root_hash) != (
            ref.first_sequence,
            ref.last_sequence,
            ref.root_hash,
        ):
            problems.append(f"{ref.path}: differs from its manifest reference")
            continue
        checkpoints.append(checkpoint)
        previous = checkpoint
    if manifest.checkpoints and len(checkpoints) == len(manifest.checkpoints):
        passed.append(f"{len(checkpoints)} checkpoint signatures verify and chain to each other")
    return checkpoints


def _verify_records(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    manifest: BundleManifest,
    checkpoints: Sequence[Checkpoint],
    passed: list[str],
    problems: list[str],
) -> tuple[int, int | None, int | None]:
    first, last = manifest.first_sequence, manifest.last_sequence
    covered = [
        cp
        for cp in checkpoints
        if first is not None and last is not None and cp.first_sequence >= first and cp.last_sequence <= last
    ]
    covered_ids = {id(cp) for cp in covered}
    partial = [cp for cp in checkpoints if id(cp) not in covered_ids]
    computed = CheckpointRoots(covered)
    roots_ok: list[Checkpoint] = []

    for cp in checkpoints:
        if cp.last_sequence == manifest.anchor_sequence and cp.last_record_hash != manifest.anchor_hash:
            problems.append(
                f"anchor hash differs from the chain head signed by checkpoint ..{cp.last_sequence}"
            )

    handle = tar.extractfile(member)
    lines = _json_lines(handle, problems) if handle is not None else iter(())
    chain = verify_chain(
        lines,
        anchor=ChainHead(manifest.anchor_sequence, manifest.anchor_hash),
        expected_last_sequence=last,
        on_record=computed.add,
    )
    for cp, root, last_hash in computed.completed:
        if root != cp.root_hash or last_hash != cp.last_record_hash:
            problems.append(
                f"records {cp.first_sequence}..{cp.last_sequence} do not match their checkpoint root"
            )
        else:
            roots_ok.append(cp)
    if not chain.ok:
        problems.append(f"{RECORDS_PATH}: record {chain.broken_sequence}: {chain.detail}")
    elif chain.checked != manifest.record_count:
        problems.append(f"{RECORDS_PATH}: {chain.checked} records, the manifest says {manifest.record_count}")
    else:
        passed.append(
            f"{chain.checked} records hash correctly and chain from anchor {manifest.anchor_sequence}"
            + (f" through {chain.last_sequence}" if chain.last_sequence is not None else "")
        )
    if covered and len(roots_ok) == len(covered):
        passed.append(f"Merkle roots of {len(covered)} fully covered checkpoints match the records")
    for cp in partial:
        passed.append(
            f"checkpoint {cp.first_sequence}..{cp.last_sequence} is only partly in the bundle: "
            "its signature was checked, its root could not be"
        )
    return chain.checked, chain.first_sequence, chain.last_sequence


def _json_lines(handle: IO[bytes], problems: list[str]) -> Iterator[dict[str, object]]:
    for number, line in enumerate(handle, start=1):
        try:
            document = json.loads(line)
        except ValueError:
            problems.append(f"{RECORDS_PATH}: line {number} is not JSON")
            return
        if not isinstance(document, dict):
            problems.append(f"{RECORDS_PATH}: line {number} is not a JSON object")
            return
        yield document


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m enclave_audit.verify_bundle",
        description="Verify an Enclave audit evidence bundle offline.",
    )
    parser.add_argument("bundle", type=Path, help="the bundle (.tar) downloaded from GET /audit/export")
    parser.add_argument(
        "--public-key", type=Path, required=True, help="the audit service's Ed25519 public key (PEM)"
    )
    parser.add_argument(
        "--also-trust",
        type=Path,
        action="append",
        default=[],
        help="the public key (PEM) of an earlier signing key, for checkpoints signed before a rotation",
    )
    args = parser.parse_args(argv)
    keys = []
    for path in (args.public_key, *args.also_trust):
        try:
            keys.append(load_public_key_pem(path.read_bytes()))
        except (OSError, ValueError) as exc:
            print(f"cannot use public key {path}: {exc}", file=sys.stderr)
            return 2
    try:
        with args.bundle.open("rb") as bundle:
            outcome = verify_bundle(bundle, keys[0], keys[1:])
    except OSError as exc:
        print(f"cannot read bundle {args.bundle}: {exc}", file=sys.stderr)
        return 2
    except NotATarArchive as exc:
        hint = _json_hint(args.bundle)
        print(f"cannot read bundle {args.bundle}: {exc}{hint}; nothing was verified", file=sys.stderr)
        return 2
    for line in outcome.passed:
        print(f"ok    {line}")
    for line in outcome.problems:
        print(f"FAIL  {line}")
    if outcome.ok:
        print(
            f"VERIFIED: {outcome.record_count} records, "
            f"sequence {outcome.first_sequence}..{outcome.last_sequence}"
        )
        return 0
    print(f"NOT VERIFIED: {len(outcome.problems)} problem(s)")
    return 1


def _json_hint(path: Path) -> str:
    """A hint when the file holds JSON: most likely the error answer of a refused export."""
    with path.open("rb") as file:
        start = file.read(64).lstrip()
    if start.startswith(b"{"):
        return " (it holds JSON, likely the export's error answer: download with curl -f)"
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
