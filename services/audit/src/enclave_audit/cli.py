"""``enclave-audit-verify``: verify the audit trail straight from the database (operators, CI, cron).

    enclave-audit-verify                      # the whole chain and every checkpoint
    enclave-audit-verify --from 1000 --to 2000
    enclave-audit-verify --no-worm            # skip comparing checkpoints with their WORM copies

Reads the same settings as the service (``ENCLAVE_AUDIT_*`` / ``ENCLAVE_*``): the database, the
object store and the signing key file (only its public half is used). Exit code 0 when the trail
verifies, 1 when it does not (the first broken record and every checkpoint problem are printed),
2 when it cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from enclave_common.errors import PermanentError, TransientError, unavailable_dependency
from enclave_common.storage import S3ObjectStore
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from enclave_audit.config import AuditSettings
from enclave_audit.signing import Ed25519Signer, load_public_key_pem, trusted_keys
from enclave_audit.store import CheckpointEntry, SyncRecordReader
from enclave_audit.verification import (
    RangeBeyondChain,
    StoredCheckpoint,
    TrailReport,
    index_copies,
    read_stored_checkpoints,
    verify_trail,
)


def _stored(
    settings: AuditSettings, first: int, last: int | None, indexed: Sequence[CheckpointEntry] = ()
) -> list[StoredCheckpoint]:
    def unreadable(object_key: str, exc: Exception) -> None:
        print(f"warn  {object_key}: {type(exc).__name__}", file=sys.stderr)

    objects = S3ObjectStore(settings)
    return asyncio.run(
        read_stored_checkpoints(objects, settings.worm_bucket, first, last, unreadable, indexed)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="enclave-audit-verify", description="Verify the audit trail in the database."
    )
    parser.add_argument("--from", dest="first", type=int, default=1, help="first sequence (default 1)")
    parser.add_argument("--to", dest="last", type=int, default=None, help="last sequence (default: the end)")
    parser.add_argument("--public-key", help="Ed25519 public key PEM (default: from the signing key file)")
    parser.add_argument(
        "--no-worm", action="store_true", help="do not compare checkpoints with the WORM bucket"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.first < 1 or (args.last is not None and args.last < args.first):
        print("--from must be >= 1 and --to >= --from", file=sys.stderr)
        return 2

    settings = AuditSettings()
    try:
        if args.public_key:
            public_key = load_public_key_pem(open(args.public_key, "rb").read())  # noqa: SIM115
        elif settings.signing_key_file is not None:
            public_key = Ed25519Signer.from_pem(settings.signing_key_file.read_bytes()).public_key
        else:
            public_key = None
        # With the keys of a rotation (ENCLAVE_AUDIT_TRUSTED_PUBLIC_KEYS_DIR), as the service does.
        keys = trusted_keys(public_key, settings.trusted_public_keys_dir) if public_key else None
    except (OSError, ValueError) as exc:
        print(f"cannot load the public key: {exc}", file=sys.stderr)
        return 2

    client: MongoClient[dict[str, Any]] = MongoClient(
        settings.mongo_url.get_secret_value(), tz_aware=True, serverSelectionTimeoutMS=5000
    )
    try:
        reader = SyncRecordReader(client[settings.mongo_database])
        entries = reader.checkpoints_between(args.first, args.last)
        stored = [] if args.no_worm else _stored(settings, args.first, args.last, entries)
        report = verify_trail(
            reader,
            first=args.first,
            last=args.last,
            checkpoints=entries,
            public_key=keys,
            worm_copies=None if args.no_worm else index_copies(entries, stored),
            stored=stored,
        )
    except RangeBeyondChain as exc:
        print(f"{exc}; nothing was verified", file=sys.stderr)
        return 2
    except PyMongoError as exc:
        print(f"cannot read the audit database: {type(exc).__name__}", file=sys.stderr)
        return 2
    except Exception as exc:
        if unavailable_dependency(exc) is None:
            raise
        print(
            f"cannot read the WORM bucket: {_store_failure(exc)}; nothing was verified "
            "(check ENCLAVE_S3_* and retry, or --no-worm to verify without the WORM copies)",
            file=sys.stderr,
        )
        return 2
    finally:
        client.close()
    print_report(report, as_json=args.json, signatures_checked=public_key is not None)
    return 0 if report.ok else 1


def _store_failure(exc: Exception) -> str:
    """What the object store answered: the text of Enclave's own error, which names the S3 error
    code only (``object store get failed (InvalidAccessKeyId)``), else the exception's type."""
    return str(exc) if isinstance(exc, TransientError | PermanentError) else type(exc).__name__


def print_report(report: TrailReport, *, as_json: bool, signatures_checked: bool) -> None:
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    chain = report.chain
    if chain.ok:
        print(f"ok    chain: {chain.checked} records verify ({chain.first_sequence}..{chain.last_sequence})")
    else:
        print(f"FAIL  chain: record {chain.broken_sequence}: {chain.reason}: {chain.detail}")
    if not signatures_checked:
        print("warn  no public key: checkpoint signatures were not checked")
    for problem in report.checkpoint_problems:
        print(f"FAIL  {problem}")
    if report.checkpoints_checked and not report.checkpoint_problems:
        print(f"ok    {report.checkpoints_checked} checkpoints verify")
    print("VERIFIED" if report.ok else "NOT VERIFIED")


if __name__ == "__main__":
    raise SystemExit(main())
