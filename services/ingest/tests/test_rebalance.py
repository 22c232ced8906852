"""What a Kafka restart does to the chunk consumer. A rebalance while an instance is being stored
(the group loses its coordinator): the revoke listener waits for the chunk being handled instead
of discarding its spool under the pipeline, so the acknowledged instance is stored, not rejected.
A restarted broker answers "unknown topic" for a while: publishing the outcome is retried, and a
chunk whose handling fails anyway is rewound (delivered again), never left behind."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import TopicAuthorizationFailedError, UnknownTopicOrPartitionError
from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_common.events import InstanceStored, ObjectRef, UploadChunk
from enclave_common.kafka import ConsumerMetrics, RetryPolicy
from enclave_ingest.handlers import ChunkConsumer
from enclave_ingest.pipeline import ChunkStreamMeta, Outcome
from enclave_ingest.spool import ChunkSpool
from prometheus_client import CollectorRegistry

INSTANCE = "01a2033b-be48-704a-8a9d-b1a1f0d0f75b"
SEALED = b"sealed bytes of the only chunk"


class GatedPipeline:
    """Reads the spooled chunks only once the test opens the gate (the window a rebalance hits)."""

    def __init__(self, spool: ChunkSpool) -> None:
        self.spool = spool
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.read: list[bytes] = []

    async def process(self, meta: ChunkStreamMeta) -> Outcome:
        self.entered.set()
        await self.gate.wait()
        self.read = list(self.spool.chunks(meta.instance_upload_id, meta.count))
        return Outcome(
            InstanceStored(
                upload_id=meta.upload_id,
                instance_upload_id=meta.instance_upload_id,
                patient_key="p",
                study_key="s",
                series_key="se",
                instance_key="i",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                object=ObjectRef(bucket="b", key="k"),
                sha256=meta.sha256,
                size=meta.total_size,
                kek_id="kek",
                duplicate="new",
            )
        )


class Published:
    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.topics: list[str] = []
        self.failures = failures or []

    async def dead_letter(self, body: bytes, *, topic: str, **kwargs: Any) -> None:
        self.topics.append(topic)

    async def publish(self, topic: str, envelope: Envelope, *, key: str) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.topics.append(topic)


class Catalogue:
    def __init__(self) -> None:
        self.instances = SimpleNamespace(update_one=self._update_one)

    async def get(self, instance_upload_id: str) -> dict[str, Any] | None:
        return None

    async def _update_one(self, *args: Any, **kwargs: Any) -> None:
        return None


def chunk_message(index: int = 0) -> Any:
    envelope = Envelope.for_topic(
        topics.UPLOAD_CHUNK,
        UploadChunk(
            upload_id="u",
            instance_upload_id=INSTANCE,
            index=index,
            count=1,
            sealed=SEALED,
            total_size=len(SEALED),
            sha256="0" * 64,
        ),
        source="gateway",
        tenant="hospital-a",
        actor="pacs",
        correlation_id="u",
    )
    record = SimpleNamespace(
        topic=topics.UPLOAD_CHUNK, partition=0, offset=7, timestamp=1_700_000_000_000, key=INSTANCE.encode()
    )
    settled: list[str] = []

    async def nack() -> None:
        settled.append("nack")

    return SimpleNamespace(
        raw_message=record, body=envelope.to_bytes(), consumer=None, nack=nack, settled=settled
    )


def _consumer(tmp_path: Path, published: Published) -> tuple[ChunkConsumer, GatedPipeline]:
    spool = ChunkSpool(tmp_path)
    spool.prepare()
    runtime = SimpleNamespace(
        retry=RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.01),
        publisher=published,
        count_crypto=lambda operation: None,
        consumer_metrics=ConsumerMetrics(CollectorRegistry()),
        registry=CollectorRegistry(),
        broker=SimpleNamespace(publish=published.dead_letter),
    )
    consumer = ChunkConsumer(runtime, Catalogue(), spool)  # type: ignore[arg-type]
    pipeline = GatedPipeline(spool)
    consumer.pipeline = pipeline  # type: ignore[assignment]
    return consumer, pipeline


async def test_a_revoke_during_a_store_waits_for_it_and_the_instance_is_stored(tmp_path: Path) -> None:
    published = Published()
    consumer, pipeline = _consumer(tmp_path, published)
    listener = consumer.listener

    handling = asyncio.create_task(consumer.on_chunk(None, chunk_message()))
    await asyncio.wait_for(pipeline.entered.wait(), 5)
    revoking = asyncio.create_task(listener.on_partitions_revoked({TopicPartition(topics.UPLOAD_CHUNK, 0)}))
    await asyncio.sleep(0.05)
    assert not revoking.done(), "the revoke must wait for the instance being stored"
    pipeline.gate.set()
    await asyncio.wait_for(asyncio.gather(handling, revoking), 5)

    assert pipeline.read == [SEALED]
    assert published.topics == [topics.INSTANCE_STORED]
    assert list(tmp_path.iterdir()) == [], "the stored instance's spool is cleaned up"
    assert consumer.tracker.pending == {}


async def test_an_outcome_kafka_does_not_take_yet_is_published_once_it_does(tmp_path: Path) -> None:
    published = Published([UnknownTopicOrPartitionError(), UnknownTopicOrPartitionError()])
    consumer, pipeline = _consumer(tmp_path, published)
    pipeline.gate.set()
    msg = chunk_message()
    await asyncio.wait_for(consumer.on_chunk(None, msg), 10)
    assert published.topics == [topics.INSTANCE_STORED] and msg.settled == []
    assert consumer.tracker.pending == {} and list(tmp_path.iterdir()) == []
    # The chunk's handling is timed like every other service's events (enclave_handler_seconds).
    (family,) = consumer.runtime.consumer_metrics.handler_seconds.collect()
    samples = {s.name: s.value for s in family.samples if s.labels.get("topic") == topics.UPLOAD_CHUNK}
    assert samples["enclave_handler_seconds_count"] == 1 and samples["enclave_handler_seconds_sum"] > 0


async def test_a_chunk_whose_handling_fails_is_rewound_not_left_behind(tmp_path: Path) -> None:
    """Left to FastStream, the chunk would be neither committed nor delivered again until a restart."""
    published = Published([TopicAuthorizationFailedError()])  # not retriable: escapes the store
    consumer, pipeline = _consumer(tmp_path, published)
    pipeline.gate.set()
    msg = chunk_message()
    await asyncio.wait_for(consumer.on_chunk(None, msg), 10)
    assert msg.settled == ["nack"] and published.topics == []
    assert INSTANCE in consumer.tracker.pending  # the partition's committed offset stays before it
    await asyncio.wait_for(consumer.on_chunk(None, chunk_message()), 10)  # delivered again
    assert published.topics == [topics.INSTANCE_STORED] and consumer.tracker.pending == {}


async def test_an_inconsistent_chunk_is_dead_lettered_and_does_not_hold_its_partition_back(
    tmp_path: Path,
) -> None:
    """Chunk 1 of a one-chunk instance starts nothing: tracked, it would have kept the partition's
    committed offset before it for good."""
    published = Published()
    consumer, _ = _consumer(tmp_path, published)
    await asyncio.wait_for(consumer.on_chunk(None, chunk_message(index=1)), 10)
    assert published.topics == [topics.dlq(topics.UPLOAD_CHUNK)]
    assert consumer.tracker.pending == {}
    assert consumer.tracker.safe_offset((topics.UPLOAD_CHUNK, 0)) == 8
