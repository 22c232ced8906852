"""Inspect and replay dead-letter topics (the runbook's `scripts/dlq.py`).

    .venv/bin/python scripts/dlq.py inspect enclave.instance.stored.v1.dlq
    .venv/bin/python scripts/dlq.py replay enclave.instance.stored.v1.dlq [--code unreadable_dicom] [--group enclave-deid]

`inspect` prints one line per message: offset, event id, type, consumer group, code and reason (never
the payload). `replay` re-publishes each selected message's original bytes to its original topic
(header `x-original-topic`), with the same event id, so the consumer handles it again once the cause
is fixed; consumers do not mark dead-lettered events as processed, so the replay is not skipped.
Reads the same environment as the services (`ENCLAVE_KAFKA_BOOTSTRAP_SERVERS`, and
`ENCLAVE_KAFKA_SECURITY_PROTOCOL` with the `ENCLAVE_KAFKA_SSL_*` files for TLS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from enclave_common.kafka import connection_options
from enclave_common.settings import BaseServiceSettings


async def read_dlq(connection: dict[str, Any], topic: str) -> list[dict[str, object]]:
    consumer = AIOKafkaConsumer(
        topic,
        **connection,
        group_id=f"enclave-dlq-tool-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    rows: list[dict[str, object]] = []
    try:
        while batch := await consumer.getmany(timeout_ms=2000):
            for records in batch.values():
                for record in records:
                    headers = {k: v.decode() for k, v in record.headers}
                    try:
                        envelope = json.loads(record.value)
                    except ValueError:
                        envelope = {}
                    rows.append(
                        {
                            "offset": record.offset,
                            "partition": record.partition,
                            "key": record.key,
                            "value": record.value,
                            "event_id": envelope.get("id"),
                            "type": envelope.get("type"),
                            "headers": headers,
                        }
                    )
    finally:
        await consumer.stop()
    return rows


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["inspect", "replay"])
    parser.add_argument("topic", help="a dead-letter topic, <topic>.dlq")
    parser.add_argument("--code", help="only messages with this x-dlq-code")
    parser.add_argument("--group", help="only messages dead-lettered by this consumer group")
    args = parser.parse_args(argv)
    if not args.topic.endswith(".dlq"):
        parser.error("the topic must be a dead-letter topic ending in .dlq")
    connection = connection_options(BaseServiceSettings())
    rows = [
        r
        for r in await read_dlq(connection, args.topic)
        if (args.code is None or r["headers"].get("x-dlq-code") == args.code)  # type: ignore[union-attr]
        and (args.group is None or r["headers"].get("x-dlq-consumer-group") == args.group)  # type: ignore[union-attr]
    ]
    if args.command == "inspect":
        for r in rows:
            h = r["headers"]
            print(
                f"{r['partition']}:{r['offset']} id={r['event_id']} type={r['type']} "
                f"group={h.get('x-dlq-consumer-group', '-')} code={h.get('x-dlq-code')} reason={h.get('x-dlq-reason')}"  # type: ignore[union-attr]
            )
        print(f"{len(rows)} message(s)")
        return 0
    producer = AIOKafkaProducer(
        **connection, acks="all", enable_idempotence=True, max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    try:
        for r in rows:
            original = r["headers"]["x-original-topic"]  # type: ignore[index]
            await producer.send_and_wait(original, r["value"], key=r["key"])  # type: ignore[arg-type]
    finally:
        await producer.stop()
    print(f"replayed {len(rows)} message(s)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
