"""Benchmark of the audit hash chain: append rate, streaming verify time, Merkle checkpoint time.

Plain script (not a test). Records are realistic access/stored events; chained records are
written as NDJSON to a temporary file and verified by streaming it back, so memory stays bounded
at 1 million records. With ``--db-records N`` (needs the stack's MongoDB-wire server) the same
records go through the service's own store: ingest rate with the chain (one ``insert_one`` per
record, as the consumer does), p95 of the auditor queries with the service's indexes, and
verification read back from the database. It uses a scratch database, dropped afterwards.

    uv run python bench/audit_chain.py --records 1000000
    scripts/with-stack.sh uv run python bench/audit_chain.py --records 1000000 --db-records 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from enclave_audit.chain import HashChain, canonical_json, verify_chain
from enclave_audit.checkpoints import Checkpoint, CheckpointRoots, build_checkpoint, verify_checkpoint
from enclave_audit.merkle import MerkleTreeBuilder
from enclave_audit.records import AuditRecord, AuditRecordDraft, record_from_event
from enclave_audit.signing import Ed25519Signer

T0 = datetime(2024, 5, 6, 14, 0, tzinfo=UTC)


def envelopes(count: int) -> Iterator[tuple[dict[str, Any], str]]:
    for n in range(count):
        when = (T0 + timedelta(milliseconds=n)).isoformat()
        base = {
            "id": str(uuid.UUID(int=n + 1)),
            "time": when,
            "schema_version": "1.0",
            "correlation_id": f"upload-{n // 50}",
            "tenant": f"hospital-{n % 3}",
        }
        if n % 2:
            data = {
                "actor": f"user-{n % 97}",
                "roles": ["clinician"],
                "action": "retrieve",
                "target": f"/studies/sk-{n % 5000}/series/se-{n % 20000}",
                "outcome": "success",
                "status_code": 200,
                "source_address": f"10.0.{n % 256}.{n % 200}",
            }
            yield (
                base
                | {
                    "type": "enclave.access.recorded",
                    "source": "gateway",
                    "actor": data["actor"],
                    "data": data,
                },
                ("enclave.access.recorded.v1"),
            )
        else:
            data = {
                "upload_id": f"upload-{n // 50}",
                "instance_upload_id": f"iu-{n}",
                "patient_key": f"pk-{n % 3000}",
                "study_key": f"sk-{n % 5000}",
                "series_key": f"se-{n % 20000}",
                "instance_key": f"ik-{n}",
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
                "object": {"bucket": "originals", "key": f"obj/{n:012d}"},
                "sha256": "ab" * 32,
                "size": 524288 + n % 1000,
                "kek_id": "kek-1",
                "duplicate": "new",
            }
            yield (
                base
                | {
                    "type": "enclave.instance.stored",
                    "source": "ingest",
                    "actor": "svc-ingest",
                    "data": data,
                },
                ("enclave.instance.stored.v1"),
            )


async def db_part(n: int, mongo_url: str, query_runs: int) -> list[tuple[str, str, str]]:
    """Ingest, query and verify through the service's store, on a scratch database."""
    from enclave_audit.store import AuditStore, EventQuery, SyncRecordReader
    from enclave_audit.verification import verify_trail
    from pymongo import AsyncMongoClient, MongoClient

    name = f"audit_bench_{uuid.uuid4().hex[:8]}"
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000
    )
    sync: MongoClient[dict[str, Any]] = MongoClient(mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000)
    rows: list[tuple[str, str, str]] = []
    try:
        server = (await client.admin.command("buildInfo")).get("version", "?")
        store = AuditStore(client[name])
        await store.ensure_indexes()
        start = time.perf_counter()
        for env, topic in envelopes(n):
            draft = record_from_event(env, topic)
            await store.append(draft, draft.event_id)
        ingest = time.perf_counter() - start
        rows.append(
            (
                "DB ingest (chain + insert_one, 1 writer)",
                f"{n / ingest:,.0f} events/s",
                f"{n:,} records, server {server}",
            )
        )

        queries = {
            "actor, newest 100": EventQuery(actor="user-7", order="desc"),
            "study, 100": EventQuery(study="sk-42"),
            "correlation id": EventQuery(correlation_id=f"upload-{n // 100}"),
            "time range, 100": EventQuery(since=T0 + timedelta(milliseconds=n // 2)),
        }
        for label, query in queries.items():
            timings = []
            for _ in range(query_runs):
                t = time.perf_counter()
                await store.query(query, 100)
                timings.append(time.perf_counter() - t)
            p95 = statistics.quantiles(timings, n=20)[-1] if len(timings) >= 2 else timings[0]
            rows.append(
                (f"DB query p95: {label}", f"{p95 * 1000:,.1f} ms", f"{query_runs} runs, {n:,} records")
            )

        start = time.perf_counter()
        report = await asyncio.to_thread(verify_trail, SyncRecordReader(sync[name]))
        verified = time.perf_counter() - start
        if not report.ok:
            raise SystemExit(f"database chain did not verify: {report}")
        rows.append(
            ("DB verify (read back + re-hash)", f"{verified:,.1f} s", f"{n / verified:,.0f} records/s")
        )
    finally:
        await client.drop_database(name)
        await client.close()
        sync.close()
    return rows


def checkpoints_every(store: IO[bytes], every: int, signer: Ed25519Signer) -> list[Checkpoint]:
    """Signed checkpoints tiling the NDJSON chain in ``store``, one per ``every`` records."""
    store.seek(0)
    signed: list[Checkpoint] = []
    batch: list[AuditRecord] = []
    for line in store:
        batch.append(AuditRecord.model_construct(**json.loads(line)))
        if len(batch) == every:
            signed.append(
                build_checkpoint(batch, signer=signer, created_at=T0, previous=signed[-1] if signed else None)
            )
            batch = []
    return signed


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--checkpoint-every", type=int, default=10_000)
    parser.add_argument("--db-records", type=int, default=0, help="also measure the database part (0: skip)")
    parser.add_argument("--query-runs", type=int, default=20)
    parser.add_argument(
        "--mongo-url", default=os.environ.get("ENCLAVE_MONGO_URL", "mongodb://127.0.0.1:27018/")
    )
    args = parser.parse_args()
    n = args.records
    rows: list[tuple[str, str, str]] = []

    drafts: list[AuditRecordDraft] = []
    sample = min(n, 20_000)
    start = time.perf_counter()
    for env, topic in envelopes(sample):
        drafts.append(record_from_event(env, topic, received_at=T0))
    mapped = time.perf_counter() - start
    rows.append(("map event -> record draft", f"{sample / mapped:,.0f} events/s", f"{sample:,} events"))

    chain = HashChain()
    signer = Ed25519Signer.generate()
    with tempfile.TemporaryFile() as store:
        start = time.perf_counter()
        for i in range(n):
            record = chain.append(drafts[i % sample].model_copy(update={"event_id": f"ev-{i}"}))
            store.write(canonical_json(record.model_dump(mode="json")) + b"\n")
        appended = time.perf_counter() - start
        rows.append(
            (
                "append (canonical JSON + SHA-256)",
                f"{n / appended:,.0f} events/s",
                f"{n:,} records, {appended:,.1f} s",
            )
        )
        size_mib = store.tell() / 2**20

        store.seek(0)
        start = time.perf_counter()
        result = verify_chain(json.loads(line) for line in store)
        verified = time.perf_counter() - start
        if not (result.ok and result.checked == n):
            raise SystemExit(f"chain did not verify: {result}")
        rows.append(
            ("verify chain (stream, parse + re-hash)", f"{verified:,.1f} s", f"{n / verified:,.0f} records/s")
        )

        start = time.perf_counter()
        signed = checkpoints_every(store, args.checkpoint_every, signer)
        cp_time = time.perf_counter() - start
        previous = signed[-1] if signed else None
        rows.append(
            (
                "build + sign checkpoints",
                f"{cp_time:,.1f} s",
                f"{len(signed)} x {args.checkpoint_every:,} records",
            )
        )

        # Whole-chain verification as the service runs it: the chain and every checkpoint's root, with
        # a checkpoint every 1,000 records (the deployed 5-minute checkpoints at ~3 records/s), side
        # by side with the chain alone above.
        tiles = checkpoints_every(store, 1000, signer)
        store.seek(0)
        start = time.perf_counter()
        roots = CheckpointRoots(tiles)
        result = verify_chain((json.loads(line) for line in store), on_record=roots.add)
        with_roots = time.perf_counter() - start
        matched = sum(root == cp.root_hash for cp, root, _ in roots.completed)
        if not result.ok or matched != len(tiles):
            raise SystemExit(f"checkpoint roots did not verify: {matched} of {len(tiles)}")
        rows.append(
            (
                "verify chain + checkpoint roots",
                f"{with_roots:,.1f} s",
                f"{len(tiles):,} checkpoints of 1,000 records; chain alone {verified:,.1f} s",
            )
        )

    hashes = [f"{i:064x}" for i in range(n)]
    start = time.perf_counter()
    builder = MerkleTreeBuilder()
    for h in hashes:
        builder.append(h)
    builder.root()
    rows.append(("Merkle root (RFC 6962)", f"{time.perf_counter() - start:,.2f} s", f"{n:,} leaves"))
    if previous is not None:
        start = time.perf_counter()
        for _ in range(1000):
            verify_checkpoint(previous, signer.public_key)
        rows.append(
            ("verify checkpoint signature", f"{(time.perf_counter() - start) * 1000:,.0f} us", "each")
        )
    rows.append(("NDJSON size", f"{size_mib:,.0f} MiB", f"{size_mib * 2**20 / n:,.0f} bytes/record"))
    if args.db_records:
        rows.extend(asyncio.run(db_part(args.db_records, args.mongo_url, args.query_runs)))
    rows.append(("peak RSS", f"{rss_mib():,.0f} MiB", "bounded: records streamed"))

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'result':>18}  detail")
    print("-" * (width + 40))
    for name, value, detail in rows:
        print(f"{name:<{width}}  {value:>18}  {detail}")


if __name__ == "__main__":
    main()
