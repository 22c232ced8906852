"""The consumer wrapper: idempotency guard, transient retries, permanent errors to the DLQ."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest
from aiokafka.errors import CommitFailedError, KafkaConnectionError, KafkaError, UnknownTopicOrPartitionError
from enclave_common import kafka as kafka_module
from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_common.errors import PermanentError, TransientError
from enclave_common.events import KeyEvent
from enclave_common.idempotency import InMemoryProcessedEvents
from enclave_common.kafka import ConsumerMetrics, RetryPolicy, reliable_consumer
from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.message import FakeConsumer
from prometheus_client import CollectorRegistry

TOPIC = topics.KEY_CREATED


def _event() -> Envelope:
    return Envelope.for_topic(
        TOPIC,
        KeyEvent(operation="created", key_id="kek-1"),
        source="test",
        tenant="t1",
        actor="svc",
        correlation_id="c1",
    )


def _wire(handler, processed=None):
    broker = KafkaBroker()
    processed = processed or InMemoryProcessedEvents()
    dead: list[tuple[bytes, dict]] = []

    @broker.subscriber(topics.dlq(TOPIC))
    async def collect(_: object, msg: KafkaMessage) -> None:
        dead.append((msg.body, dict(msg.headers)))

    reliable_consumer(
        broker,
        {TOPIC: handler},
        group_id="test",
        processed=processed,
        retry=RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.002),
        metrics=ConsumerMetrics(CollectorRegistry()),
    )
    return broker, processed, dead


async def _deliver_one(handler):
    """Wire ``handler``, deliver one event; the event, the processed-events guard and the DLQ."""
    broker, processed, dead = _wire(handler)
    event = _event()
    async with TestKafkaBroker(broker) as br:
        await br.publish(event.to_bytes(), topic=TOPIC)
    return event, processed, dead


async def test_each_event_id_is_handled_once():
    seen: list[str] = []

    async def handler(env: Envelope) -> None:
        seen.append(env.id)

    broker, processed, _ = _wire(handler)
    event = _event()
    async with TestKafkaBroker(broker) as br:
        await br.publish(event.to_bytes(), topic=TOPIC)
        await br.publish(event.to_bytes(), topic=TOPIC)
    assert seen == [event.id]
    assert await processed.seen(event.id)


async def test_transient_errors_are_retried_then_succeed():
    calls = 0

    async def handler(env: Envelope) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("object store down")

    broker, processed, dead = _wire(handler)
    async with TestKafkaBroker(broker) as br:
        await br.publish(_event().to_bytes(), topic=TOPIC)
    assert calls == 3
    assert dead == []


async def test_transient_error_that_persists_is_not_marked_processed():
    async def handler(env: Envelope) -> None:
        raise TransientError("still down")

    broker, processed, dead = _wire(handler)
    event = _event()
    async with TestKafkaBroker(broker) as br:
        await br.publish(event.to_bytes(), topic=TOPIC)
    assert not await processed.seen(event.id)
    assert dead == []


async def test_permanent_error_goes_to_dlq_with_reason_and_stays_replayable():
    async def handler(env: Envelope) -> None:
        raise PermanentError("transfer syntax 1.2.3 is not accepted", code="bad_transfer_syntax")

    event, processed, dead = await _deliver_one(handler)
    assert len(dead) == 1
    body, headers = dead[0]
    assert Envelope.from_bytes(body).id == event.id
    assert headers["x-dlq-code"] == "bad_transfer_syntax"
    assert headers["x-dlq-reason"] == "transfer syntax 1.2.3 is not accepted"
    assert headers["x-original-topic"] == TOPIC
    assert headers["x-dlq-consumer-group"] == "test"
    # not marked: once the cause is fixed, replaying the DLQ message gets it handled
    assert not await processed.seen(event.id)


async def test_unexpected_exception_is_dead_lettered_without_its_text():
    async def handler(env: Envelope) -> None:
        raise KeyError("DOE^JANE")

    broker, _, dead = _wire(handler)
    async with TestKafkaBroker(broker) as br:
        await br.publish(_event().to_bytes(), topic=TOPIC)
    _, headers = dead[0]
    assert headers["x-dlq-code"] == "unexpected_error"
    assert "DOE^JANE" not in headers["x-dlq-reason"]


async def test_a_message_that_is_not_an_envelope_is_dead_lettered():
    async def handler(env: Envelope) -> None:
        pytest.fail("handler must not see a malformed message")

    broker, _, dead = _wire(handler)
    async with TestKafkaBroker(broker) as br:
        await br.publish(b"not json", topic=TOPIC)
    assert dead[0][1]["x-dlq-code"] == "contract_violation"


@pytest.mark.parametrize(
    "failure",
    [UnknownTopicOrPartitionError(), KafkaError("Unexpected error during batch delivery")],
    ids=["retriable", "client-broke"],
)
async def test_a_kafka_error_the_client_calls_retriable_is_retried_not_dead_lettered(failure):
    """A broker that was just restarted answers 'unknown topic' while it loads its topics: the
    handler's publish fails that way for a while. A producer whose sender stopped refuses publishes
    with aiokafka's bare KafkaError until the service replaces it (SenderWatchdog). Both are
    transient, not a reason to dead-letter."""
    calls = 0

    async def handler(env: Envelope) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise failure

    event, processed, dead = await _deliver_one(handler)
    assert calls == 3 and dead == [] and await processed.seen(event.id)


def _write_to_a_full_disk() -> None:
    """A real ENOSPC from the kernel: /dev/full refuses every write as a full disk does."""
    with open("/dev/full", "wb", buffering=0) as full:
        full.write(b"sealed chunk")


async def test_a_full_local_disk_is_retried_not_dead_lettered():
    """A service whose work disk filled up (deid's work directory, ingest's spool) must not
    dead-letter what it could not write: once space is freed, the same event succeeds. Seen on the
    stack: deid dead-lettered an instance with 'unexpected OSError' while its disk was full."""
    calls = 0

    async def handler(env: Envelope) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            _write_to_a_full_disk()

    event, processed, dead = await _deliver_one(handler)
    assert calls == 3 and dead == [] and await processed.seen(event.id)


async def test_any_other_failed_system_call_is_still_dead_lettered():
    async def handler(env: Envelope) -> None:
        raise OSError(errno.EIO, "Input/output error")

    event, processed, dead = await _deliver_one(handler)
    assert [headers["x-dlq-code"] for _, headers in dead] == ["unexpected_error"]


async def test_a_message_whose_dead_lettering_fails_is_rewound_not_skipped(monkeypatch):
    """If settling fails (here the DLQ publish), the consumer is rewound to the message: it is
    neither acknowledged nor left behind for the next commit to skip."""
    settled: list[str] = []
    monkeypatch.setattr(FakeConsumer, "commit", lambda self: _note(settled, "commit"))
    monkeypatch.setattr(
        FakeConsumer, "seek", lambda self, partition, offset: settled.append(f"seek {offset}")
    )

    async def failing_dead_letter(*args: object, **kwargs: object) -> None:
        raise KafkaConnectionError("broker away")

    monkeypatch.setattr(kafka_module, "dead_letter", failing_dead_letter)

    async def handler(env: Envelope) -> None:
        raise PermanentError("not a DICOM instance", code="not_dicom")

    event, processed, dead = await _deliver_one(handler)
    assert [s.split()[0] for s in settled] == ["seek"] and dead == []
    assert not await processed.seen(event.id)


async def _note(settled: list[str], what: str) -> None:
    settled.append(what)


@pytest.mark.parametrize(
    ("error", "waits"), [(CommitFailedError("rebalanced"), []), (KafkaConnectionError(), [5.0])]
)
async def test_rewind_waits_only_when_something_failed_not_after_a_refused_commit(monkeypatch, error, waits):
    """A commit refused after a rebalance needs no pause (the work is done, the redelivery is
    skipped as a duplicate); any other failure waits before the message comes back."""
    slept: list[float] = []
    nacked: list[bool] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def nack() -> None:
        nacked.append(True)

    monkeypatch.setattr(kafka_module.asyncio, "sleep", sleep)
    await kafka_module.rewind(
        SimpleNamespace(nack=nack),
        error,
        RetryPolicy(max_delay_s=5.0),
        topic=TOPIC,  # type: ignore[arg-type]
    )
    assert slept == waits and nacked == [True]
