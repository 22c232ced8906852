"""``enclave-dlq``: inspect and replay dead-letter topics (docs/operations.md, "Replay a DLQ").

    enclave-dlq inspect enclave.instance.stored.v1.dlq [--code unreadable_dicom] [--group enclave-deid]
    enclave-dlq replay enclave.instance.stored.v1.dlq --code C [--group enclave-deid] \
        --actor user:sre-jane --reason "deid fixed for the unreadable files of incident 42"

``inspect`` prints one line per message: partition:offset, event id, type, consumer group, code and
reason (never the payload). ``replay`` re-publishes each selected message's original bytes to its
original topic (header ``x-original-topic``), with the same event id, so the consumer handles it
again once the cause is fixed; consumers do not mark dead-lettered events as processed, so the
replay is not skipped. A replay is audited (``enclave_common.operator_actions``): an ``access.recorded``
event naming the actor, the topic, the selection and the reason is acknowledged before the first
message is re-published, and a second one says how many were replayed or where it stopped. Reads the same environment as the services (``ENCLAVE_KAFKA_BOOTSTRAP_SERVERS``,
and ``ENCLAVE_KAFKA_SECURITY_PROTOCOL`` with the ``ENCLAVE_KAFKA_SSL_*`` files for TLS); in Kubernetes
it runs with the operator's Kafka identity (the ``enclave-toolbox`` pod, deploy/k8s/ops).

The topic is read without a consumer group, partition by partition, from the beginning up to the
end offsets taken when the command starts, one fetched batch at a time: every message present then
is seen (a quiet poll does not end the read early), and memory does not grow with the topic. Before the
tenth session the tool stopped at the first poll that returned nothing for 2 seconds, which a new
consumer group's first poll often does on a production broker (its initial rebalance delay), so it
could report "0 message(s)" and replay nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from enclave_common.kafka import connection_options
from enclave_common.operator_actions import OperatorAction, OperatorActionRefused, record_end, record_start
from enclave_common.settings import BaseServiceSettings


class DlqReadError(Exception):
    """The topic could not be read to its end (unknown topic, or the read stalled)."""


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, str]

    @property
    def envelope(self) -> dict[str, Any]:
        try:
            parsed = json.loads(self.value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}


async def read_dead_letters(
    connection: dict[str, Any], topic: str, *, stall_timeout_s: float = 30.0
) -> AsyncIterator[DeadLetter]:
    """Every message of ``topic`` up to its end offsets at the start; raises DlqReadError if a
    partition gives nothing for ``stall_timeout_s`` before its end is reached."""
    admin = AIOKafkaAdminClient(**connection)
    await admin.start()
    try:
        # Listed first: describing a topic that does not exist would create it on a broker that
        # auto-creates topics.
        known = topic in await admin.list_topics()
        [description] = await admin.describe_topics([topic]) if known else [{}]
    finally:
        await admin.close()
    partitions = [p["partition"] for p in description.get("partitions", [])]
    if not known or description.get("error_code") or not partitions:
        raise DlqReadError(f"topic {topic} does not exist (or this identity may not describe it)")
    # earliest: if retention removes messages under the read, it goes on from the oldest left
    # instead of jumping to the end.
    consumer = AIOKafkaConsumer(
        **connection, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        ends = await consumer.end_offsets(assigned)
        remaining = {tp for tp in assigned if ends[tp] > await consumer.position(tp)}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=int(stall_timeout_s * 1000))
            if not batch:
                left = {tp.partition: ends[tp] - await consumer.position(tp) for tp in remaining}
                raise DlqReadError(f"reading {topic} stalled with messages left (partition: count): {left}")
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue  # arrived after the start: not part of this run
                    yield DeadLetter(
                        partition=record.partition,
                        offset=record.offset,
                        key=record.key,
                        value=record.value,
                        headers={k: (v or b"").decode(errors="replace") for k, v in record.headers},
                    )
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


async def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="enclave-dlq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["inspect", "replay"])
    parser.add_argument("topic", help="a dead-letter topic, <topic>.dlq")
    parser.add_argument("--code", help="only messages with this x-dlq-code")
    parser.add_argument("--group", help="only messages dead-lettered by this consumer group")
    parser.add_argument(
        "--actor", default="", help="replay: who runs it (e.g. user:sre-jane), for the audit trail"
    )
    parser.add_argument(
        "--reason", default="", help="replay: why (10 to 500 characters), for the audit trail"
    )
    args = parser.parse_args(argv)
    if not args.topic.endswith(".dlq"):
        parser.error("the topic must be a dead-letter topic ending in .dlq")
    settings = BaseServiceSettings()
    connection = connection_options(settings)
    selection = f"code={args.code or '*'} group={args.group or '*'}"
    audited: OperatorAction | None = None
    if args.command == "replay":
        try:
            audited = OperatorAction.checked(
                source="enclave-dlq",
                actor=args.actor,
                action="dlq_replay",
                target=f"topic:{args.topic}",
                reason=args.reason,
            )
        except OperatorActionRefused as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 2
        await record_start(settings, audited, f"started; {selection}")

    def selected(message: DeadLetter) -> bool:
        return (args.code is None or message.headers.get("x-dlq-code") == args.code) and (
            args.group is None or message.headers.get("x-dlq-consumer-group") == args.group
        )

    count = 0

    async def stopped(cause: str) -> None:
        """A replay that stops part-way says, and records, how far it got."""
        if audited is not None:
            print(f"replayed {count} message(s) before stopping", file=sys.stderr)
            detail = f"stopped after {count} message(s): {cause}; {selection}"
            await record_end(settings, audited.event(outcome="error", status_code=500, detail=detail))

    producer: AIOKafkaProducer | None = None
    try:
        if audited is not None:
            producer = AIOKafkaProducer(
                **connection, acks="all", enable_idempotence=True, max_request_size=4 * 1024 * 1024
            )
            await producer.start()
        async for message in read_dead_letters(connection, args.topic):
            if not selected(message):
                continue
            h = message.headers
            if producer is None:
                count += 1
                envelope = message.envelope
                print(
                    f"{message.partition}:{message.offset} id={envelope.get('id')} type={envelope.get('type')} "
                    f"group={h.get('x-dlq-consumer-group', '-')} code={h.get('x-dlq-code')} "
                    f"reason={h.get('x-dlq-reason')}"
                )
                continue
            original = h.get("x-original-topic")
            if not original:
                raise DlqReadError(f"message {message.partition}:{message.offset} has no x-original-topic")
            await producer.send_and_wait(original, message.value, key=message.key)
            count += 1
    except DlqReadError as exc:  # a read that cannot go on is refused with its reason
        print(f"refused: {exc}", file=sys.stderr)
        await stopped(str(exc))
        return 2
    except BaseException as exc:  # Kafka failing under the replay, an interrupt: raised
        await stopped(type(exc).__name__)
        raise
    finally:
        if producer is not None:
            await producer.stop()
    if audited is None:
        print(f"{count} message(s)")
        return 0
    await record_end(settings, audited.event(detail=f"replayed {count} message(s); {selection}"))
    print(f"replayed {count} message(s)")
    return 0


def main() -> int:
    return asyncio.run(run(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
