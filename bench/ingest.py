"""Benchmark: ingest throughput from sealed chunks on Kafka to ``instance.stored`` (the running stack).

    python bench/ingest.py [--small 200] [--large 4] [--large-mib 32] [--keep-downstream]

The gateway's own code validates and seals each instance and publishes its chunks (acks=all), as an
upload would; nothing goes through HTTP, so what is measured is the ingest service: reassembling
and unsealing the chunks, checking the digest, envelope-encrypting under the study key, writing to
the object store and the catalogue, and publishing ``instance.stored``. The clock runs from the
first chunk published to the last ``instance.stored`` seen.

The de-identification, analysis and audit services consume what ingest produces and share this
2-core machine; by default they are paused (SIGSTOP, resumed in ``finally``) during the measured
window, so the number is ingest's, and they catch up afterwards. ``--keep-downstream`` measures
with them running.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pydicom
from aiokafka import AIOKafkaConsumer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_common.events import InstanceStored
from enclave_common.kafka import EventPublisher, create_broker
from enclave_common.pseudonyms import pseudonymizer_from_base64
from enclave_common.settings import BaseServiceSettings
from enclave_gateway.handoff import Handoff, SealedInstance
from enclave_gateway.uploads import keys_for
from enclave_gateway.validation import InstanceInfo, InstanceInspector, ValidationPolicy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gateway as gateway_bench  # noqa: E402  (bench/gateway.py: the same MR instances and dev env)

STATE = gateway_bench.STATE
MIB = 1024 * 1024
CHUNK_BYTES = 1 * MIB
DOWNSTREAM = ("deid", "analysis", "audit")


def large_instances(count: int, mib: int) -> list[bytes]:
    """``count`` MR instances with ``mib`` MiB of pixel data each (one study and series)."""
    template = pydicom.dcmread(io.BytesIO(gateway_bench.mr_instances(1)[0]))
    side = int((mib * MIB / 2) ** 0.5)
    template.Rows = template.Columns = side
    template.PixelData = os.urandom(side * side * 2)
    return gateway_bench.numbered_copies(template, count)


async def run(
    instances: list[bytes], env: dict[str, str], recipient: X25519PublicKey, spool: Path
) -> tuple[float, float, int]:
    """(seconds to publish, seconds to the last instance.stored, instances stored)."""
    os.environ.update(env)
    settings = BaseServiceSettings(service_name="bench_ingest")
    pseudonymizer = pseudonymizer_from_base64(env["ENCLAVE_PSEUDONYM_KEY"], "ENCLAVE_PSEUDONYM_KEY")
    tenant = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    policy = ValidationPolicy()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=env["ENCLAVE_KAFKA_BOOTSTRAP_SERVERS"],
        group_id=f"bench-ingest-{uuid.uuid4().hex}",
        auto_offset_reset="latest",
        enable_auto_commit=False,
    )
    await consumer.start()
    broker = create_broker(settings)
    await broker.start()
    handoff = Handoff(EventPublisher(broker), timeout_s=60.0)
    try:
        consumer.subscribe([topics.INSTANCE_STORED])
        while not consumer.assignment():  # joined, and positioned at the end, before we publish
            await consumer.getmany(timeout_ms=200)
        for partition in consumer.assignment():
            await consumer.position(partition)

        sealed: list[tuple[SealedInstance, InstanceInfo]] = []
        for data in instances:  # validation and sealing are the gateway's work: not on the clock
            inspector = InstanceInspector(policy, None)
            assert inspector.feed(data) is None
            info = inspector.finish()
            assert isinstance(info, InstanceInfo), info
            part = SealedInstance(recipient, tenant, spool, CHUNK_BYTES)
            part.feed(data)
            part.finish()
            sealed.append((part, info))
        wanted = {part.instance_upload_id for part, _ in sealed}

        started = time.perf_counter()
        upload_id = str(uuid.uuid4())
        for part, info in sealed:
            keys = keys_for(pseudonymizer, tenant, info)
            await handoff.publish_instance(
                part,
                upload_id=upload_id,
                actor="bench-ingest",
                sha256=info.sha256,
                keys=keys,
                sop_class_uid=info.sop_class_uid,
                transfer_syntax_uid=info.transfer_syntax_uid,
            )
            part.discard()
        published = time.perf_counter() - started

        seen: set[str] = set()
        deadline = time.monotonic() + 600
        while seen != wanted and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000, max_records=1000)
            for records in batch.values():
                for record in records:
                    envelope = Envelope.from_bytes(record.value)
                    stored = envelope.payload(InstanceStored)
                    if stored.instance_upload_id in wanted:
                        seen.add(stored.instance_upload_id)
        return published, time.perf_counter() - started, len(seen)
    finally:
        await broker.stop()
        await consumer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=200, help="128 KiB MR instances")
    parser.add_argument("--large", type=int, default=4, help="large MR instances")
    parser.add_argument("--large-mib", type=int, default=32)
    parser.add_argument("--keep-downstream", action="store_true", help="do not pause deid/analysis/audit")
    args = parser.parse_args()
    env = gateway_bench.dev_env()
    recipient = serialization.load_pem_public_key(
        Path(env["ENCLAVE_GATEWAY_INGEST_PUBLIC_KEY_FILE"]).read_bytes()
    )
    assert isinstance(recipient, X25519PublicKey)
    sets = [
        (f"{args.small} x {128} KiB", gateway_bench.mr_instances(args.small)),
        (f"{args.large} x {args.large_mib} MiB", large_instances(args.large, args.large_mib)),
    ]
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="enclave-bench-ingest-") as spool,
        gateway_bench.paused(() if args.keep_downstream else DOWNSTREAM),
    ):
        for name, instances in sets:
            size = sum(len(i) for i in instances)
            published, total, stored = asyncio.run(run(instances, env, recipient, Path(spool)))
            rows.append((name, len(instances), stored, published, total, stored / total, size / MIB / total))
    mode = "running" if args.keep_downstream else "paused (SIGSTOP) during the run"
    print(f"\nIngest: sealed chunks on Kafka -> instance.stored (downstream services {mode})")
    print(
        f"{'set':<16} {'sent':>5} {'stored':>6} {'publish s':>9} {'to stored s':>11} {'inst/s':>7} {'MiB/s':>7}"
    )
    for name, sent, stored, published, total, rate, mib in rows:
        print(f"{name:<16} {sent:>5} {stored:>6} {published:>9.2f} {total:>11.2f} {rate:>7.1f} {mib:>7.1f}")
    return 0 if all(row[1] == row[2] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
