"""No service dead-lettered anything for an unexpected error while the integration tests ran.

An ``unexpected_error`` in a DLQ copy's ``x-dlq-code`` header means a handler raised an exception
nobody classified: a bug, never bad input (bad input is a coded permanent error). Tests check the
outcomes they wait for; a handler that failed on the side (analysis dead-lettering every
``instance.quarantined`` event, found in the ninth session, was one) shows only here. The dead-letter
topics' end offsets are taken when the session's first test starts (``dead_letter_offsets``, see
conftest), and this test, run last, reads everything after them."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition

from .conftest import KAFKA


async def test_no_service_dead_lettered_an_event_for_an_unexpected_error(
    dead_letter_offsets: dict[TopicPartition, int],
) -> None:
    assert dead_letter_offsets, "no dead-letter topic was found: scripts/dev_setup.py creates them"
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False)
    await consumer.start()
    unexpected: list[str] = []
    try:
        partitions = list(dead_letter_offsets)
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        pending = {tp for tp in partitions if ends[tp] > dead_letter_offsets[tp]}
        for tp in pending:
            consumer.seek(tp, dead_letter_offsets[tp])
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=5000)
            if not batch:
                break
            for tp, records in batch.items():
                for record in records:
                    headers = {key: value.decode() for key, value in record.headers}
                    if headers.get("x-dlq-code") == "unexpected_error":
                        unexpected.append(f"{tp.topic}: {headers.get('x-dlq-reason')}")
                if records and records[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    assert unexpected == [], "\n".join(unexpected)
