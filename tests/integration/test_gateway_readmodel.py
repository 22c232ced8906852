"""The gateway's read model on the real stack: an event Kafka delivers again, after the status has
moved past it, changes nothing (docs/gateway.md, Status and results: idempotent by business key,
without an event-id guard)."""

from __future__ import annotations

import asyncio
import time

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from enclave_common import topics

from .conftest import KAFKA
from .support import mr_instance, wait_for_events
from .test_gateway_support import GATEWAY, bearer, new_tenant, wait_for_status

PAST_STORED = {"deidentified", "quarantined", "analysed"}
GATEWAY_GROUP = "enclave-gateway"


async def _consumed_by_gateway(partition: TopicPartition, offset: int, timeout: float = 60.0) -> None:
    """Wait until the gateway's consumer group committed past ``offset`` (it handled the record)."""
    # Not subscribed: reading the group's committed offset does not join (or rebalance) the group.
    reader = AIOKafkaConsumer(bootstrap_servers=KAFKA, group_id=GATEWAY_GROUP, enable_auto_commit=False)
    await reader.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            committed = await reader.committed(partition)
            if committed is not None and committed > offset:
                return
            await asyncio.sleep(0.5)
    finally:
        await reader.stop()
    raise AssertionError(f"the gateway did not consume {partition} offset {offset} within {timeout:.0f} s")


async def test_a_redelivered_stored_event_does_not_move_the_status_back(mongo):
    tenant = new_tenant()
    headers = bearer("it-portal", tenant, "uploader")
    data, _ = mr_instance()
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{GATEWAY}/api/v1/imaging/upload",
            files=[("files", ("scan.dcm", data, "application/dicom"))],
            headers=headers,
        )
        assert answer.status_code == 200, answer.text
        imaging_id = answer.json()["accepted"][0]["imaging_id"]
        url = f"{GATEWAY}/api/v1/imaging/{imaging_id}"
        before = await wait_for_status(client, url, headers, PAST_STORED)

        # Kafka delivers the instance's `instance.stored` again: the same record, the same event id.
        [stored] = await wait_for_events(
            topics.INSTANCE_STORED, lambda e: e.data.get("instance_upload_id") == imaging_id
        )
        producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", enable_idempotence=True)
        await producer.start()
        try:
            sent = await producer.send_and_wait(
                topics.INSTANCE_STORED, stored.to_bytes(), key=imaging_id.encode()
            )
        finally:
            await producer.stop()
        await _consumed_by_gateway(TopicPartition(sent.topic, sent.partition), sent.offset)

        after = (await client.get(url, headers=headers)).json()
        # Still past `stored`, not rewritten (analysis_id may still change: the one-instance series
        # gets its analysis outcome after the analysis service's quiet period).
        fields = ("status", "duplicate", "updated_at", "study_key", "series_key")
        assert {f: after[f] for f in fields} == {f: before[f] for f in fields}
    # Handled without an event-id guard: the gateway keeps no processed-event record of it.
    assert await mongo["gateway"]["processed_events"].find_one({"_id": stored.id}) is None
