"""The chunk consumer: spool sealed chunks, store complete instances, commit only what is safe.

This consumer does not use the generic ``reliable_consumer``: one instance spans many messages, so the
unit of work is the instance, and the committed offset of a partition must stay before the first
chunk of any instance that is not yet stored (see ``spool.OffsetTracker``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_common.errors import PermanentError, classify_exception
from enclave_common.events import InstanceRejected, InstanceStored, KeyEvent, UploadChunk
from enclave_common.kafka import CONSUMER_GROUP_TIMING, dead_letter, rewind
from enclave_common.service import ServiceRuntime
from faststream import AckPolicy
from faststream.kafka.annotations import KafkaMessage
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from enclave_ingest.catalogue import Catalogue
from enclave_ingest.pipeline import ChunkStreamMeta, InstancePipeline, Outcome
from enclave_ingest.spool import ChunkSpool, OffsetTracker, PendingInstance

log = structlog.get_logger("enclave.ingest")
T = TypeVar("T")
#: The consumer group of the chunk consumer (its offsets, and the DLQ copies' x-dlq-consumer-group).
GROUP_ID = "enclave-ingest"

#: How long one delivery keeps retrying a transient failure before it is redelivered.
TRANSIENT_BUDGET_S = 120.0


class _ForgetRevoked(ConsumerRebalanceListener):  # type: ignore[misc]
    """After a rebalance took partitions away, forget their unfinished instances (the new owner, or
    this consumer again, redelivers them from their first chunk).

    It waits for the chunk being handled (``lock``): a rebalance starts whenever the group loses
    its coordinator, e.g. while Kafka restarts, and discarding the spool of the instance being stored
    at that moment made its chunks vanish under the pipeline, which rejected an acknowledged upload
    (``unexpected FileNotFoundError``)."""

    def __init__(self, tracker: OffsetTracker, spool: ChunkSpool, lock: asyncio.Lock) -> None:
        self.tracker = tracker
        self.spool = spool
        self.lock = lock

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.lock:
            for instance_upload_id in self.tracker.forget_partitions(
                {(tp.topic, tp.partition) for tp in revoked}
            ):
                self.spool.discard(instance_upload_id)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None


class _BudgetSpent(Exception):
    """A transient failure outlasted ``TRANSIENT_BUDGET_S``: the instance is redelivered."""


class _TransientRetries:
    """Retries of one instance's work: one budget and one attempt count across its steps."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        self.started = asyncio.get_running_loop().time()
        self.attempt = 0

    async def run(self, work: Callable[[], Awaitable[T]], doing: str) -> T:
        """``work()``, retried on transient failures; a permanent one is raised as its
        ``PermanentError``, a transient one that outlasts the budget as ``_BudgetSpent``."""
        while True:
            try:
                return await work()
            except Exception as exc:
                error = classify_exception(exc)
                if isinstance(error, PermanentError):
                    if error is exc:
                        raise
                    raise error from exc
                self.runtime.consumer_metrics.retries.labels(topics.UPLOAD_CHUNK).inc()
                if asyncio.get_running_loop().time() - self.started > TRANSIENT_BUDGET_S:
                    log.warning(
                        "transient failure persists; the instance will be redelivered", error=error.reason
                    )
                    raise _BudgetSpent from exc
                log.info(f"transient failure {doing}; retrying", attempt=self.attempt + 1, error=error.reason)
                await asyncio.sleep(max(0.5, self.runtime.retry.delay(self.attempt)))
                self.attempt += 1


class ChunkConsumer:
    def __init__(
        self,
        runtime: ServiceRuntime,
        catalogue: Catalogue,
        spool: ChunkSpool,
        *,
        abandon_after_s: float = 3600.0,
        spool_capacity_bytes: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.catalogue = catalogue
        self.spool = spool
        #: Set at startup, once the keys have been read (I/O does not happen at construction).
        self.pipeline: InstancePipeline | None = None
        self.tracker = OffsetTracker(abandon_after_ms=int(abandon_after_s * 1000))
        self.abandoned = Counter(
            "enclave_ingest_abandoned_instances",
            "Instances given up because their upload broke off (upload_incomplete)",
            registry=runtime.registry,
        )
        Gauge(
            "enclave_ingest_spool_bytes",
            "Sealed chunks held in the spool for instances not yet complete",
            registry=runtime.registry,
        ).set_function(lambda: spool.held_bytes)
        Gauge(
            "enclave_ingest_spool_instances",
            "Unfinished instances with chunks in the spool (broken-off uploads stay until given up)",
            registry=runtime.registry,
        ).set_function(lambda: spool.held_instances)
        if spool_capacity_bytes is not None:
            Gauge(
                "enclave_ingest_spool_capacity_bytes",
                "Size of the spool's volume (ENCLAVE_INGEST_SPOOL_CAPACITY_BYTES), for the filling alert",
                registry=runtime.registry,
            ).set(spool_capacity_bytes)
        self.lock = asyncio.Lock()
        self.listener = _ForgetRevoked(self.tracker, self.spool, self.lock)

    def register(self) -> None:
        self.runtime.broker.subscriber(
            topics.UPLOAD_CHUNK,
            group_id=GROUP_ID,
            ack_policy=AckPolicy.MANUAL,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            max_poll_interval_ms=15 * 60 * 1000,
            **CONSUMER_GROUP_TIMING,
            listener=self.listener,
            title="ingest:upload.chunk",
            description="Sealed chunks of accepted instances (UploadChunk); reassembled, verified, encrypted, stored.",
        )(self.on_chunk)

    async def on_chunk(self, _: Any, msg: KafkaMessage) -> None:
        record = msg.raw_message
        assert not isinstance(record, tuple)
        partition = (record.topic, record.partition)
        async with self.lock:
            abandoned = self.tracker.observe(partition, record.offset, record.timestamp)
            try:
                envelope = Envelope.from_bytes(msg.body)
                chunk: UploadChunk | None = envelope.payload(UploadChunk)
            except ValidationError:
                chunk = None
            try:
                for pending in abandoned:
                    if chunk is None or pending.instance_upload_id != chunk.instance_upload_id:
                        await self._abandon(pending)
            except Exception as exc:  # its outcome could not be published: read this record again
                await rewind(msg, exc, self.runtime.retry, topic=topics.UPLOAD_CHUNK)
                return
            if chunk is None:
                await self._dead_letter(
                    msg,
                    PermanentError("chunk message is not an UploadChunk envelope", code="contract_violation"),
                )
                await self._commit(msg, partition)
                return
            structlog.contextvars.bind_contextvars(
                correlation_id=envelope.correlation_id, event_id=envelope.id
            )
            try:
                # One chunk is the event here: the last one's time includes storing the instance.
                with self.runtime.consumer_metrics.handler_seconds.labels(topics.UPLOAD_CHUNK).time():
                    await self._handle(envelope, chunk, partition, record.offset, record.timestamp, msg)
            except Exception as exc:
                # Left to FastStream, the chunk would be neither committed nor redelivered: the consumer
                # would move on and the instance stay unstored until a restart. Rewind to it instead;
                # storing is idempotent for one upload id.
                self.runtime.consumer_metrics.retries.labels(topics.UPLOAD_CHUNK).inc()
                await rewind(msg, exc, self.runtime.retry, topic=topics.UPLOAD_CHUNK)
            finally:
                structlog.contextvars.unbind_contextvars("correlation_id", "event_id")

    async def _handle(
        self,
        envelope: Envelope,
        chunk: UploadChunk,
        partition: tuple[str, int],
        offset: int,
        timestamp_ms: int,
        msg: KafkaMessage,
    ) -> None:
        # One catalogue lookup per instance (when its first chunk is seen), not one per chunk.
        known = chunk.instance_upload_id in self.tracker.pending
        done = None if known else await self.catalogue.get(chunk.instance_upload_id)
        if done is not None and "outcome" in done:
            if chunk.index == chunk.count - 1:
                await self._republish(done["outcome"])
            await self._commit(msg, partition)
            return
        tracked = self.tracker.pending.get(chunk.instance_upload_id)
        if chunk.index >= chunk.count or (tracked is not None and chunk.count != tracked.count):
            # Checked before tracking: a chunk that starts nothing must not hold the partition back.
            await self._dead_letter(
                msg, PermanentError("chunk index/count inconsistent", code="contract_violation")
            )
            await self._commit(msg, partition)
            return
        pending = self.tracker.track(chunk.instance_upload_id, chunk.count, partition, offset, timestamp_ms)
        meta = {
            "tenant": envelope.tenant,
            "upload_id": chunk.upload_id,
            "count": chunk.count,
            "total_size": chunk.total_size,
            "sha256": chunk.sha256,
        }
        await asyncio.to_thread(self.spool.write, chunk.instance_upload_id, chunk.index, chunk.sealed, meta)
        pending.received.add(chunk.index)
        if chunk.index == chunk.count - 1:
            pending.last_event_id = envelope.id
        if pending.complete:
            if not pending.last_event_id:
                pending.last_event_id = envelope.id
            stream = ChunkStreamMeta(
                tenant=envelope.tenant,
                upload_id=chunk.upload_id,
                instance_upload_id=chunk.instance_upload_id,
                count=chunk.count,
                total_size=chunk.total_size,
                sha256=chunk.sha256,
            )
            ok = await self._store(stream, envelope)
            if not ok:
                await msg.nack()
                return
            self.tracker.finish(chunk.instance_upload_id)
            self.spool.discard(chunk.instance_upload_id)
        await self._commit(msg, partition)

    async def _abandon(self, pending: PendingInstance) -> None:
        """Give up an instance whose upload broke off (see ``spool``): record and publish its
        ``instance.rejected`` (``upload_incomplete``), then forget it, so its partition's committed
        offset moves on. Its client got no acknowledgement and sends the instance again."""
        iuid = pending.instance_upload_id
        try:
            meta = await asyncio.to_thread(self.spool.meta, iuid)
        except FileNotFoundError:  # none of its chunks reached the spool: nothing to settle
            meta = None
        if meta is not None:
            upload_id = str(meta["upload_id"])
            rejected = InstanceRejected(
                upload_id=upload_id,
                instance_upload_id=iuid,
                reason_code="upload_incomplete",
                reason=(
                    f"only {len(pending.received)} of {pending.count} chunks of the instance arrived: the "
                    "upload that sent it broke off and was not acknowledged, so its client sends it again"
                ),
            )
            envelope = Envelope.for_topic(
                topics.INSTANCE_REJECTED,
                rejected,
                source="ingest",
                tenant=str(meta["tenant"]),
                actor="service:ingest",
                correlation_id=upload_id,
            )
            await _TransientRetries(self.runtime).run(
                lambda: self._record_and_publish(topics.INSTANCE_REJECTED, envelope, None),
                "publishing an outcome",
            )
        log.warning(
            "instance abandoned: its upload broke off",
            instance_upload_id=iuid,
            chunks_received=len(pending.received),
            chunks=pending.count,
        )
        self.abandoned.inc()
        self.tracker.finish(iuid)
        self.spool.discard(iuid)

    async def _store(self, stream: ChunkStreamMeta, cause: Envelope) -> bool:
        """Store one complete instance and publish its outcome; False if a transient failure persisted
        (storing, recording or publishing: a Kafka that was just restarted answers "unknown topic"
        for a while)."""
        retries = _TransientRetries(self.runtime)
        try:
            try:
                assert self.pipeline is not None, "the pipeline is built at startup"
                pipeline = self.pipeline
                outcome: Outcome | None = await retries.run(
                    lambda: pipeline.process(stream), "storing an instance"
                )
            except PermanentError as error:
                log.warning("instance rejected", code=error.code, reason=error.reason)
                outcome_event: InstanceStored | InstanceRejected = InstanceRejected(
                    upload_id=stream.upload_id,
                    instance_upload_id=stream.instance_upload_id,
                    reason_code=error.code,
                    reason=error.reason,
                )
                outcome = None
            if outcome is not None:
                outcome_event = outcome.event
                self.runtime.count_crypto("unseal")
                if isinstance(outcome_event, InstanceStored) and outcome_event.duplicate != "duplicate":
                    self.runtime.count_crypto("encrypt")
            topic = (
                topics.INSTANCE_STORED
                if isinstance(outcome_event, InstanceStored)
                else topics.INSTANCE_REJECTED
            )
            envelope = Envelope.for_topic(
                topic,
                outcome_event,
                source="ingest",
                tenant=stream.tenant,
                actor="service:ingest",
                correlation_id=cause.correlation_id,
                cause=cause,
                discriminator=stream.instance_upload_id,
            )
            key_event = self._key_event(stream, cause, outcome.new_study_key) if outcome is not None else None
            # A permanent failure here is not expected: it escapes, and on_chunk redelivers the chunk.
            await retries.run(
                lambda: self._record_and_publish(topic, envelope, key_event), "publishing an outcome"
            )
            return True
        except _BudgetSpent:
            return False

    def _key_event(
        self, stream: ChunkStreamMeta, cause: Envelope, new_study_key: str | None
    ) -> Envelope | None:
        if not new_study_key:
            return None
        return Envelope.for_topic(
            topics.KEY_CREATED,
            KeyEvent(
                operation="created", key_id=f"study:{stream.tenant}:{new_study_key}", study_key=new_study_key
            ),
            source="ingest",
            tenant=stream.tenant,
            actor="service:ingest",
            correlation_id=cause.correlation_id,
            cause=cause,
            discriminator=f"key:{new_study_key}",
        )

    async def _record_and_publish(self, topic: str, envelope: Envelope, key_event: Envelope | None) -> None:
        """Record an instance's outcome in the catalogue (what a redelivery republishes), then publish it."""
        instance_upload_id = str(envelope.data["instance_upload_id"])
        await self.catalogue.instances.update_one(
            {"_id": instance_upload_id},
            {
                "$set": {
                    "outcome": {"topic": topic, "envelope": envelope.model_dump(mode="json")},
                    "tenant": envelope.tenant,
                }
            },
            upsert=True,
        )
        if key_event is not None:
            await self.runtime.publisher.publish(
                topics.KEY_CREATED, key_event, key=key_event.data["study_key"]
            )
        await self.runtime.publisher.publish(topic, envelope, key=instance_upload_id)
        log.info("instance outcome published", topic=topic, instance_upload_id=instance_upload_id)

    async def _republish(self, outcome: dict[str, Any]) -> None:
        envelope = Envelope.model_validate(outcome["envelope"])
        await self.runtime.publisher.publish(
            outcome["topic"], envelope, key=str(envelope.data.get("instance_upload_id", ""))
        )

    async def _commit(self, msg: KafkaMessage, partition: tuple[str, int]) -> None:
        offset = self.tracker.safe_offset(partition)
        consumer = getattr(msg, "consumer", None)
        if offset is None or consumer is None or not hasattr(consumer, "assignment"):
            return
        await consumer.commit({TopicPartition(*partition): offset})

    async def _dead_letter(self, msg: KafkaMessage, error: PermanentError) -> None:
        # The shared copy's headers: it lacked x-dlq-consumer-group (so `enclave-dlq --group
        # enclave-ingest` selected nothing) and x-failed-at.
        await dead_letter(self.runtime.broker, topics.UPLOAD_CHUNK, msg.body, msg, error, GROUP_ID)
        self.runtime.consumer_metrics.dlq.labels(topics.UPLOAD_CHUNK, error.code).inc()
